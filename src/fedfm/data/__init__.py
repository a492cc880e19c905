"""Data: sources (packaged, files, Hugging Face), splits, and partitioners."""

from fedfm.data.dataset import TextDataset

__all__ = ["TextDataset"]
