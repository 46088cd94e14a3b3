"""The model artifact: ``model.safetensors`` (weights, no pickle) + ``model.json`` (the card).

The card says everything needed to use the weights without the run that made them: the resolved
config (recipe, backbone, heads), preprocessing (patch size, input size, normalisation), class
names, decision threshold, what data it was trained on and its measured metrics. ``predict``,
``evaluate`` and later ``export`` and the bundled model all read this one format.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import mitotype
from mitotype._io import atomic_path, write_json
from mitotype.config import Config, config_from_dict
from mitotype.errors import MitotypeError
from mitotype.models.pretrained import Normalization
from mitotype.models.registry import MitotypeModel, create_model

CARD_FORMAT = "mitotype-model/1"
WEIGHTS_NAME, CARD_NAME = "model.safetensors", "model.json"


@dataclass
class LoadedModel:
    model: MitotypeModel
    card: dict[str, Any]
    path: Path

    @property
    def threshold(self) -> float:
        return float(self.card["threshold"])

    @property
    def patch_size(self) -> int:
        return int(self.card["preprocessing"]["patch_size"])

    @property
    def size_policy(self) -> str:
        return str(self.card["preprocessing"].get("size_policy", "error"))


def save_model(model: MitotypeModel, cfg: Config, out_dir: Path, threshold: float, trained_on: dict, metrics: dict) -> None:
    """Write weights and card atomically (weights first: a card always points at whole weights)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": CARD_FORMAT})
    norm = model.normalization()
    card = {
        "format": CARD_FORMAT,
        "mitotype_version": mitotype.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": cfg.recipe,
        "arch": cfg.model.arch,
        "backbone": cfg.model.backbone,
        "heads": {name: {"target": h.target, "num_classes": h.num_classes} for name, h in model.head_specs.items()},
        "class_names": list(mitotype.CLASS_NAMES),
        "positive_class": "atypical",
        "preprocessing": {
            "patch_size": cfg.data.patch_size,
            "size_policy": cfg.data.size_policy,
            "input_size": cfg.model.input_size,
            "input": "RGB uint8 / 255, resized to input_size inside the model",
            "mean": list(norm.mean),
            "std": list(norm.std),
        },
        "threshold": float(threshold),
        "trained_on": trained_on,
        "metrics": metrics,
        "config": cfg.to_dict(),
    }
    write_json(out_dir / CARD_NAME, card)


def add_card_metrics(folder: Path, name: str, metrics: dict) -> None:
    """Record a measurement (e.g. the held-out fold's metrics) in an existing card."""
    card_path = Path(folder) / CARD_NAME
    card = json.loads(card_path.read_text())
    card.setdefault("metrics", {})[name] = metrics
    write_json(card_path, card)


def model_dirs(path: Path) -> list[Path]:
    """The artifact folders behind PATH: one model, or the fold models of a cross-validation run."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if (path / CARD_NAME).is_file():
        return [path]
    folds = sorted(p for p in path.glob("fold_*") if (p / CARD_NAME).is_file())
    if folds:
        return folds
    raise MitotypeError(f"{path}: no model here (expected {CARD_NAME} + {WEIGHTS_NAME}, or fold_*/ of a cv run)")


def load_model(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the architecture from the card and load the weights; runs no code from the files."""
    folder = model_dirs(path)[0] if not (Path(path) / CARD_NAME).is_file() else Path(path)
    card_path, weights_path = folder / CARD_NAME, folder / WEIGHTS_NAME
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MitotypeError(f"{card_path}: unreadable model card ({err})") from None
    if card.get("format") != CARD_FORMAT:
        raise MitotypeError(f"{card_path}: not a mitotype model card (format {card.get('format')!r})")
    if not weights_path.is_file():
        raise MitotypeError(f"{weights_path}: weights missing beside the card")
    cfg = config_from_dict(card["config"])
    model = create_model(cfg.model, pretrained=False)
    model.set_normalization(Normalization(tuple(card["preprocessing"]["mean"]), tuple(card["preprocessing"]["std"])))
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except Exception as err:  # noqa: BLE001
        raise MitotypeError(f"{weights_path}: weights do not fit the card's model ({str(err).splitlines()[0][:160]})") from None
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    return LoadedModel(model, card, folder)


def load_ensemble(path: Path, device: str | torch.device = "cpu") -> list[LoadedModel]:
    return [load_model(p, device) for p in model_dirs(path)]
