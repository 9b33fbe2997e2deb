"""One LightningDataModule per dataset; `common` holds what they share (split, checks, samplers), `in_memory`
and `per_sample` the two data paths that serve the splits."""

from src.data.common import DataError, ImageClassificationDataModule

__all__ = ["DataError", "ImageClassificationDataModule"]
