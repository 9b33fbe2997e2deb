"""One LightningDataModule per dataset; `common` holds what they share, `in_memory` and `per_sample` the data paths."""

from src.data.common import DataError, ImageClassificationDataModule

__all__ = ["DataError", "ImageClassificationDataModule"]
