"""Engines execute a cohort and yield one ClientResult per client. They know nothing of strategy.

Every engine runs the same ``fedfm.client.program.ClientProgram``; a contract test checks that they
agree for the same seed. Each engine module registers itself (``@engine(name)``); ``run.engine``
picks one. The protocol is ``fedfm.engines.base.Engine``. The gRPC engine
(``fedfm.deploy.engine``) is not a ``run.engine`` choice: ``fedfm server`` builds it around its
serving code, whose clients connect from elsewhere.
"""

from fedfm.engines import batched as _batched  # noqa: F401
from fedfm.engines import ray_engine as _ray  # noqa: F401  (ray is imported on use)
from fedfm.engines.base import ENGINES, Engine, EngineSetup, EngineTraits, engine, engine_traits
from fedfm.engines.inprocess import InProcessEngine

__all__ = ["ENGINES", "Engine", "EngineSetup", "EngineTraits", "InProcessEngine", "engine", "engine_traits"]
