"""One LightningDataModule per dataset; `common` holds what they share (split, transforms, loaders)."""

from src.data.common import DataError, ImageClassificationDataModule

__all__ = ["DataError", "ImageClassificationDataModule"]
