"""The ONNX cache: each model's fp32 graph exported once, checked against PyTorch, and reused
while its weights are unchanged (keyed by their hash, so a retrained model never reads a stale file).

The check runs once, when the file is built: ONNX Runtime's and (where installed) OpenVINO's
``p_atypical`` on random patches must equal PyTorch's to :data:`~mitotype.inference.graph.TOLERANCE`,
or nothing is cached; the differences are kept in the file's card.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mitotype._io import atomic_path, write_json
from mitotype.errors import MitotypeError
from mitotype.inference.backends import OnnxBackend, OpenVinoBackend, openvino_available
from mitotype.inference.graph import (
    TOLERANCE, check_difference, export_card, export_card_path, file_hash, inference_graph, random_patches, read_export_card, torch_p,
    weights_hash, write_onnx,
)
from mitotype.models.ensemble import Backend, Ensemble

CHECK_INPUTS = "8 + 1 random uint8 patches"


def backend_difference(backend: Backend, graph: nn.Module, patch_size: int, *, n: int = 8, seed: int = 0) -> float:
    """Largest |p_backend - p_torch| on ``n`` random patches (and on a batch of 1: the batch axis is dynamic)."""
    worst = 0.0
    for patches in (random_patches(n, patch_size, seed), random_patches(1, patch_size, seed + 1)):
        worst = max(worst, float(np.abs(backend.p_atypical(patches) - torch_p(graph, patches)).max()))
    return worst


def onnx_difference(path: Path, graph: nn.Module, patch_size: int, *, n: int = 8, seed: int = 0) -> float:
    """:func:`backend_difference` of the ONNX file at ``path`` run by ONNX Runtime."""
    return backend_difference(OnnxBackend(path), graph, patch_size, n=n, seed=seed)


def check_export_matches(path: Path, ensemble: Ensemble) -> dict[str, Any]:
    """Refuse an ONNX file exported from other weights than ``ensemble``'s (its card keeps their hash)."""
    if not Path(path).is_file():
        raise MitotypeError(f"{{onnx}} {path}: no such file", options=("onnx",))
    card = read_export_card(Path(path))
    if card["weights_sha256"] != weights_hash(ensemble):
        members = ", ".join(str(p) for p in ensemble.paths)
        raise MitotypeError(f"{path}: exported from other weights than {members} (card weights_sha256 differs)")
    return card


def cache_dir() -> Path:
    """``MITOTYPE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/mitotype`` (``~/.cache/mitotype``)."""
    text = os.environ.get("MITOTYPE_CACHE_DIR", "").strip()
    if text:
        return Path(text)
    return Path(os.environ.get("XDG_CACHE_HOME", "") or Path.home() / ".cache") / "mitotype"


def cached_onnx(ensemble: Ensemble, folder: Path | None = None) -> Path:
    """The fp32 ONNX export of ``ensemble`` in the cache, made and checked on first use."""
    key = weights_hash(ensemble)
    path = Path(folder or cache_dir() / "onnx") / f"{key[:32]}.onnx"
    if path.is_file() and export_card_path(path).is_file():
        return path
    graph, size = inference_graph(ensemble), ensemble.patch_size
    card = export_card(ensemble, "onnx", "fp32")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write_onnx(graph, size, tmp)
        diff = onnx_difference(tmp, graph, size)
        check_difference(diff, path)
        card["check"] = {"max_abs_diff_vs_torch": diff, "tolerance": TOLERANCE, "inputs": CHECK_INPUTS}
        if openvino_available():
            ov_diff = backend_difference(OpenVinoBackend(tmp), graph, size)
            check_difference(ov_diff, path, "OpenVINO f32")
            card["check"]["openvino_f32_max_abs_diff_vs_torch"] = ov_diff
        card["sha256"] = file_hash(tmp)
    write_json(export_card_path(path), card)
    return path
