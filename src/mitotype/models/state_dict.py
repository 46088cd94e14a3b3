"""Reading weights files without running code from them: safetensors, or torch.load(weights_only=True)."""

from __future__ import annotations

from pathlib import Path

import torch

from mitotype.errors import MitotypeError


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A dict of tensors (a ``{"state_dict": ...}`` wrapper is unwrapped), or a one-line error."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MitotypeError(f"{path}: not a readable weights file ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise MitotypeError(f"{path}: expected a dict of tensors (a state dict)")
    return dict(state)
