"""Batched, device-side augmentation and H&E stain conversion."""

from mitotype.transforms.augment import AugmentConfig, BatchAugment, dihedral_views
from mitotype.transforms.stain import hed_jitter, hed_to_rgb, rgb_to_hed

__all__ = [
    "AugmentConfig",
    "BatchAugment",
    "dihedral_views",
    "hed_jitter",
    "hed_to_rgb",
    "rgb_to_hed",
]
