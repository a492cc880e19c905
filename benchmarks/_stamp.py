"""What every results file says about how and where it was measured (``fedfm.reproduce.results``)."""

from fedfm.reproduce.results import stamp

__all__ = ["stamp"]
