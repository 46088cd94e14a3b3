"""Inference as a pure function of (models, uint8 batch): folders, manifests, point CSVs, slides
and cluster workers all feed this one function through their own streaming readers."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from mitotype.errors import MitotypeError
from mitotype.transforms.augment import dihedral_views


def to_input(batch_u8: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1] on ``device`` (converted after the copy:
    a quarter of the bytes cross to the GPU)."""
    x = batch_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


@torch.no_grad()
def predict_batch(
    models: Sequence[nn.Module], batch_u8: torch.Tensor, device: torch.device, tta: bool = False, amp: bool = False
) -> torch.Tensor:
    """Mean p_atypical over models (a fold ensemble) and, with ``tta``, over the 8 dihedral views."""
    x = to_input(batch_u8, device, channels_last=True)
    views = dihedral_views(x) if tta else [x]
    total = torch.zeros(x.shape[0], device=device)
    for model in models:
        for view in views:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                outputs = model({"image": view})
            total += model.p_atypical(outputs)
    return (total / (len(models) * len(views))).cpu()


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MitotypeError(f"device '{name}': expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MitotypeError(f"device '{name}': CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MitotypeError(f"device '{name}': this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise MitotypeError(f"device '{name}': expected auto, cpu, cuda or cuda:N")
    return device
