"""Engines execute a cohort and yield one ClientResult per client. They know nothing of strategy.

Every engine runs the same ``fedfm.training.client_update``; a contract test checks that they
agree for the same seed. Engines are registered by name; ``run.engine`` picks one.
"""

from fedfm.engines.inprocess import InProcessEngine
from fedfm.registry import Registry

ENGINES: Registry = Registry("engine")
ENGINES.register("inprocess")(InProcessEngine)


@ENGINES.register("ray")
def _ray(*args, **kwargs):
    """Cohorts on a Ray cluster (``pip install 'fedfm[ray]'``); see ``fedfm.engines.ray_engine``."""
    from fedfm.engines.ray_engine import RayEngine

    return RayEngine(*args, **kwargs)


__all__ = ["ENGINES", "InProcessEngine"]
