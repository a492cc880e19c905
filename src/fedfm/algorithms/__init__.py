"""Strategy parts: aggregators (pure), server optimizers (FedOpt), client objectives."""

from fedfm.algorithms import robust  # noqa: F401  (registers the Byzantine-robust aggregators)
