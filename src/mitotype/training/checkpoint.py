"""Resumable checkpoints: everything needed to continue exactly where a run stopped.

Model, optimiser, scheduler, every RNG (torch, the sampler's and augmentation's generators), the
epoch, the best score and the history. Written atomically every epoch; read back with
``weights_only=True``, so opening a checkpoint never runs code from it.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import torch

from mitotype._io import atomic_path
from mitotype.errors import MitotypeError


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: a failed write (torch reports a full disk as a RuntimeError) keeps the last checkpoint."""
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as err:  # torch's C++ writer: "PytorchStreamWriter failed writing file ..."
            raise OSError(errno.EIO, f"checkpoint write failed: {str(err).splitlines()[0][:160]}") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MitotypeError(f"{path}: unreadable checkpoint ({type(err).__name__}); delete it to start the run afresh") from None
