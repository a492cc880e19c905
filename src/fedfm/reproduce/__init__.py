"""Every documented number from a results file, and one command to make it again.

``results``: the results format (head, measurements, kinds); ``stats``: mean ± 95% interval and
the paired test; ``judge``: a rerun against the committed results; ``catalogue``: the documented
experiments (``benchmarks/reproduce.toml``); ``sweeps``: a sweep's cells as measurements;
``runner``: ``fedfm reproduce``.
"""

from fedfm.reproduce.catalogue import Entry, find_root, load, select
from fedfm.reproduce.judge import Verdict, judge
from fedfm.reproduce.results import Measurement, measurements, stamp
from fedfm.reproduce.runner import listing, reproduce
from fedfm.reproduce.stats import Interval, Paired, interval, paired

__all__ = [
    "Entry",
    "Interval",
    "Measurement",
    "Paired",
    "Verdict",
    "find_root",
    "interval",
    "judge",
    "listing",
    "load",
    "measurements",
    "paired",
    "reproduce",
    "select",
    "stamp",
]
