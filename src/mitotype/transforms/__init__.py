"""Batched, device-side augmentation and H&E stain conversion."""

from mitotype.transforms.augment import AugmentConfig, BatchAugment, dihedral_view, dihedral_views
from mitotype.transforms.batch import build_batch, to_input
from mitotype.transforms.stain import hed_jitter, hed_to_rgb, rgb_to_hed

__all__ = [
    "AugmentConfig",
    "BatchAugment",
    "build_batch",
    "dihedral_view",
    "dihedral_views",
    "hed_jitter",
    "hed_to_rgb",
    "rgb_to_hed",
    "to_input",
]
