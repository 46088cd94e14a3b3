"""The model artifact: ``model.safetensors`` (weights, no pickle) + ``model.json`` (the card).

The card (see :mod:`mitotype.models.card`) holds what builds the model apart from its provenance
(training config, data, command, metrics), so ``predict``, ``evaluate``, ``export`` and the bundled
model rebuild a network from its card alone, and a card keeps loading after the config changes.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import mitotype
from mitotype._io import atomic_path, code_revision, write_json
from mitotype.config import Config
from mitotype.errors import MitotypeError
from mitotype.models.card import CARD_FORMAT, build_spec, class_names, model_config, read_card
from mitotype.models.pretrained import Normalization, weights_source
from mitotype.models.registry import MitotypeModel, create_model

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
        return int(self.card["build"]["patch_size"])

    @property
    def size_policy(self) -> str:
        return str(self.card["build"]["size_policy"])

    @property
    def mpp(self) -> float | None:
        return self.card["build"].get("mpp")


def save_model(model: MitotypeModel, cfg: Config, out_dir: Path, *, threshold: float, trained_on: dict, metrics: dict) -> None:
    """Write weights and card atomically (weights first: a card always points at whole weights).

    Weights that are not finite (a diverged run) are refused: such a model is never saved as done.
    """
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.saved_state_dict().items()}
    broken = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:
        raise MitotypeError(f"{out_dir}: the trained weights are not finite (e.g. {broken}); the model was not saved, lower train.lr")
    if not math.isfinite(threshold) or not 0 < threshold < 1:
        raise MitotypeError(f"{out_dir}: decision threshold {threshold} is not in (0, 1); the model was not saved")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": CARD_FORMAT})
        expected = sum(v.numel() * v.element_size() for v in state.values())
        if tmp.stat().st_size < expected:  # a full disk can truncate the file without an error
            raise OSError(28, f"No space left on device? {tmp.stat().st_size} of {expected} bytes written")
    norm = model.normalization()
    card = {
        "format": CARD_FORMAT,
        "mitotype_version": mitotype.__version__,
        "code": code_revision(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "build": build_spec(cfg.model, mean=norm.mean, std=norm.std, patch_size=cfg.data.patch_size,
                            size_policy=cfg.data.size_policy, mpp=cfg.data.mpp, task=cfg.task, candidates=cfg.candidates,
                            detector=getattr(model, "detector_kind", "candidates")),
        "class_names": class_names(cfg.task),
        "positive_class": class_names(cfg.task)[1],
        "threshold": float(threshold),
        "provenance": {
            "recipe": cfg.recipe, "description": cfg.description, "command": _command(),
            "config": cfg.to_dict(), "trained_on": trained_on, "metrics": metrics,
            "weights": weights_source(model) or cfg.model.pretrained,  # the starting weights used, e.g. none after imagenet fell back
        },
    }
    write_json(out_dir / CARD_NAME, card)


def _command() -> str:
    """The mitotype command line that made the model, when it was made from the CLI."""
    return " ".join(["mitotype", *sys.argv[1:]]) if Path(sys.argv[0]).name == "mitotype" else ""


def add_card_metrics(folder: Path, name: str, metrics: dict) -> None:
    """Record a measurement (e.g. the held-out fold's metrics) in an existing card's provenance."""
    card_path = Path(folder) / CARD_NAME
    card = read_card(read_card_json(card_path), card_path)
    card["provenance"].setdefault("metrics", {})[name] = metrics
    write_json(card_path, card)


def set_card_threshold(folder: Path, threshold: float, rule: str) -> None:
    """Store a threshold chosen after training (``rule`` says how) in an existing card."""
    card_path = Path(folder) / CARD_NAME
    card = read_card(read_card_json(card_path), card_path)
    card["threshold"] = min(max(float(threshold), 1e-6), 1 - 1e-6)  # a card's threshold lies strictly inside (0, 1)
    card["provenance"]["threshold_rule"] = rule
    write_json(card_path, card)


def load_card_threshold(folder: Path) -> float:
    card_path = Path(folder) / CARD_NAME
    return float(read_card(read_card_json(card_path), card_path)["threshold"])


def read_card_json(card_path: Path) -> Any:
    try:
        return json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MitotypeError(f"{card_path}: unreadable model card ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


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
    """Rebuild the architecture from the card's ``build`` section and load the weights; every card
    field is checked first, and no code from the files is run."""
    folder = model_dirs(path)[0] if not (Path(path) / CARD_NAME).is_file() else Path(path)
    card_path, weights_path = folder / CARD_NAME, folder / WEIGHTS_NAME
    card = read_card(read_card_json(card_path), card_path)
    if not weights_path.is_file():
        raise MitotypeError(f"{weights_path}: weights missing beside the card")
    try:
        model = create_model(model_config(card), pretrained=False)
    except MitotypeError as err:
        raise MitotypeError(f"{card_path}: {err}") from None
    image = card["build"]["views"]["image"]
    model.set_normalization(Normalization(tuple(image["mean"]), tuple(image["std"])))
    try:
        model.load_saved_state_dict(load_file(str(weights_path)))
    except Exception as err:
        raise MitotypeError(f"{weights_path}: weights do not fit the card's model ({str(err).splitlines()[0][:160]})") from None
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    return LoadedModel(model, card, folder)


def load_ensemble(path: Path, device: str | torch.device = "cpu") -> list[LoadedModel]:
    return [load_model(p, device) for p in model_dirs(path)]
