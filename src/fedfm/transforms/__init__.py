"""Update transforms between local training and aggregation: one interface with a client half and
a server half (``fedfm.transforms.base``), each built-in transform registered by its module."""

from fedfm.transforms import attack, compression, personal, rank, validation  # noqa: F401  (registration)
from fedfm.transforms import dp as _dp  # noqa: F401
from fedfm.transforms import masking as _masking  # noqa: F401
from fedfm.transforms.base import TRANSFORMS, ClientStep, Pipeline, Transform, transform

__all__ = ["TRANSFORMS", "ClientStep", "Pipeline", "Transform", "transform"]
