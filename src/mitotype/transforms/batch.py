"""The batch dict, built in one place for training, validation and inference.

A model never sees raw arrays: it gets ``{"image": float RGB in [0, 1], (B, 3, H, W)}`` on its
device, after the (training or test-time) transform. Views that later recipes add (HED channels,
a centre crop, cached features) are derived here from the transformed image, so training and
inference cannot drift apart.
"""

from __future__ import annotations

from typing import Callable

import torch

Transform = Callable[[torch.Tensor], torch.Tensor]


def to_input(batch_u8: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1] on ``device`` (converted after the copy:
    a quarter of the bytes cross to the GPU)."""
    x = batch_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def build_batch(
    images_u8: torch.Tensor, device: torch.device, *, transform: Transform | None = None, channels_last: bool = False
) -> dict[str, torch.Tensor]:
    """uint8 patches -> the model's input dict; ``transform`` (augmentation, a TTA view) acts on the
    float image before any derived view is made. A float (B, D) tensor is a batch of cached backbone
    features (training/features.py, made only where nothing transforms the images): ``{"features": ...}``."""
    if images_u8.is_floating_point() and images_u8.ndim == 2:
        return {"features": images_u8.to(device, non_blocking=True)}
    x = to_input(images_u8, device)
    if transform is not None:
        x = transform(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return {"image": x}
