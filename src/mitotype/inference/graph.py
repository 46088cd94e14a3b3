"""The exported inference graph: uint8 RGB patches (B, H, W, 3) in, ``p_atypical`` (B,) out.

The /255, centre crop, resize and normalisation live inside it, so a user of the file needs nothing
else; a fold ensemble is ONE graph that averages its folds (exact, as :class:`Ensemble` computes it).
TTA stays outside the graph (the backends run the 8 dihedral views), so one file serves both. This
module holds what the export, the int8 path and the ONNX cache share: the graph, its card and the
check against PyTorch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Sequence, cast

import numpy as np
import torch
from torch import nn

import mitotype
from mitotype._io import code_revision
from mitotype.errors import MitotypeError
from mitotype.models.artifact import WEIGHTS_NAME
from mitotype.models.ensemble import Ensemble
from mitotype.models.registry import MitotypeModel

EXPORT_CARD_FORMAT = "mitotype-export/1"
EXPORT_VERSION = 1  # part of the cache key: a change to the graph layout re-exports cached files
OPSET = 17
TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "image", "p_atypical"


class InferenceGraph(nn.Module):
    """uint8 (B, H, W, 3) RGB -> p_atypical (B,): the fold mean of the members, each with its own
    preprocessing (inside the member's forward), exactly as :class:`Ensemble` computes it."""

    def __init__(self, nets: Sequence[nn.Module]):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float().div(255).contiguous(memory_format=torch.channels_last)
        total = torch.zeros(image.shape[0], dtype=torch.float32, device=image.device)
        for net in self.nets:  # ModuleList yields nn.Module; every member is a MitotypeModel
            total = total + cast(MitotypeModel, net).p_atypical(net({"image": x}))
        return total / len(self.nets)


def export_card_path(out: Path) -> Path:
    """Where the card of an exported file lives: ``OUT.json`` beside ``OUT``."""
    return Path(out).with_name(Path(out).name + ".json")


def weights_hash(ensemble: Ensemble) -> str:
    """sha256 over each member's weights file and build section: the identity of what is exported."""
    digest = hashlib.sha256(f"export-v{EXPORT_VERSION}".encode())
    for m in ensemble.members:
        with open(m.path / WEIGHTS_NAME, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(json.dumps(m.card["build"], sort_keys=True).encode())
    return digest.hexdigest()


def inference_graph(ensemble: Ensemble) -> InferenceGraph:
    """The ensemble's members, on the CPU, as one graph (the members' spec was checked when it loaded)."""
    return InferenceGraph([net.to("cpu").eval() for net in ensemble.nets]).eval()


def random_patches(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def torch_p(graph: nn.Module, patches: torch.Tensor) -> np.ndarray:
    return graph(patches).numpy()


def write_onnx(graph: InferenceGraph, patch_size: int, path: Path) -> None:
    """torch.onnx.export of ``graph`` with a dynamic batch axis (TorchScript-based exporter)."""
    example = random_patches(2, patch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: the shape branches are constant per model, as intended
        torch.onnx.export(graph, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)


def check_difference(diff: float, out: Path, what: str = "ONNX") -> None:
    if not np.isfinite(diff) or diff > TOLERANCE:
        raise MitotypeError(f"{out}: the {what} graph's p_atypical differs from PyTorch's by {diff:.2e} (> {TOLERANCE:g}); "
                            "nothing written")


def export_card(ensemble: Ensemble, fmt: str, precision: str) -> dict[str, Any]:
    """What a user of the exported file needs: the input contract, the build, threshold and provenance."""
    first, size = ensemble.cards[0], ensemble.patch_size
    return {
        "format": EXPORT_CARD_FORMAT,
        "export_format": fmt,
        "precision": precision,
        "mitotype_version": mitotype.__version__,
        "code": code_revision(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "opset": OPSET if fmt == "onnx" else None,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", size, size, 3], "layout": "NHWC, RGB, 0-255",
                  "note": "/255, centre crop, resize and normalisation are inside the graph; TTA is not"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch"], "meaning": "mean p(atypical) over the members"},
        "members": [str(p) for p in ensemble.paths],
        "weights_sha256": weights_hash(ensemble),
        "build": first["build"],
        "class_names": first["class_names"],
        "positive_class": first.get("positive_class", "atypical"),
        "threshold": ensemble.threshold,
        "provenance": [card.get("provenance", {}) for card in ensemble.cards],
    }


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_export_card(path: Path) -> dict[str, Any]:
    card_path = export_card_path(path)
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise MitotypeError(f"{path}: no export card {card_path.name} beside it (export with `mitotype export`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MitotypeError(f"{card_path}: unreadable export card ({type(err).__name__})") from None
    if not isinstance(card, dict) or card.get("format") != EXPORT_CARD_FORMAT:
        raise MitotypeError(f"{card_path}: not a mitotype export card (expected format {EXPORT_CARD_FORMAT})")
    if card.get("export_format") != "onnx" or not isinstance(card.get("weights_sha256"), str):
        raise MitotypeError(f"{card_path}: field export_format/weights_sha256: expected an ONNX export's card")
    return card
