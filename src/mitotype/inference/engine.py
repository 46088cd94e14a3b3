"""Inference as a pure function of (models, uint8 batch): folders, manifests, point CSVs, slides
and cluster workers all feed this one function through their own streaming readers."""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from mitotype.errors import MitotypeError
from mitotype.transforms.augment import dihedral_view
from mitotype.transforms.batch import Transform, build_batch, to_input  # noqa: F401 (to_input: re-exported)


@torch.no_grad()
def predict_batch(
    models: Sequence[nn.Module], batch_u8: torch.Tensor, device: torch.device, tta: bool = False, amp: bool = False
) -> torch.Tensor:
    """Mean p_atypical over models (a fold ensemble) and, with ``tta``, over the 8 dihedral views."""
    views: list[Transform | None] = [partial(dihedral_view, k=k) for k in range(8)] if tta else [None]
    total = torch.zeros(batch_u8.shape[0], device=device)
    for view in views:
        batch = build_batch(batch_u8, device, transform=view, channels_last=True)
        for model in models:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                outputs = model(batch)
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
            raise MitotypeError(f"device '{name}': CUDA is not available on this machine (use device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MitotypeError(f"device '{name}': this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise MitotypeError(f"device '{name}': expected auto, cpu, cuda or cuda:N")
    return device
