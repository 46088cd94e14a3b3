"""Bundle a cv run into the package: the model ``predict`` uses when no ``--model`` is given
(:mod:`mitotype.models.bundled` reads it). A workflow, since it reads a whole run directory.

The fold models are copied in half precision with each card converted to the current format, and
``bundle.json`` says where they came from: recipe, command, the run's cross-validated metrics, the
leave-one-source-out figures when given, and the bundle's size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from mitotype._io import atomic_path, write_json
from mitotype.errors import MitotypeError
from mitotype.evaluation.metrics import CROSS_FITTED_RULE, cross_fitted_metrics, summarize_folds
from mitotype.models.artifact import CARD_NAME, WEIGHTS_NAME, model_dirs, read_card_json, set_card_threshold
from mitotype.models.bundled import BUNDLE_INFO
from mitotype.models.card import CARD_FORMAT, read_card
from mitotype.models.ensemble import Ensemble


def bundle_run(run: Path, out: Path, *, command: str = "", half: bool = True, domain_run: Path | None = None,
               oof_thresholds: bool = False, evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy the fold models of cv run ``run`` into ``out`` (weights in float16 when ``half``), with
    each card converted to the current format and ``bundle.json`` summarising the run; ``domain_run``,
    the same recipe's leave-one-source-out cv run (``--group-by``), adds its per-source figures.
    ``oof_thresholds`` gives each fold model the threshold best on the other folds' out-of-fold
    predictions (what ``train.threshold=oof`` does in ``cv``), for a run trained at a fixed one.
    ``evaluation`` (e.g. a detector's figures on held-out mosaics) is kept in ``bundle.json`` as given."""
    folds = model_dirs(run)
    summary_path = Path(run) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    held = _per_source(Path(domain_run), summary.get("recipe")) if domain_run is not None else None
    fitted = _oof_thresholds(Path(run)) if oof_thresholds else None
    staging = Path(out).with_name(Path(out).name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    for i, folder in enumerate(folds):
        card = read_card(read_card_json(folder / CARD_NAME), folder / CARD_NAME)
        state = load_file(str(folder / WEIGHTS_NAME))
        if half:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        target = staging / f"fold_{i}"
        target.mkdir(parents=True)
        with atomic_path(target / WEIGHTS_NAME) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": CARD_FORMAT})
        card["provenance"]["bundled_from"] = str(folder)
        write_json(target / CARD_NAME, card)
        if fitted is not None:
            set_card_threshold(target, fitted["thresholds"][folder.name], f"{CROSS_FITTED_RULE} (bundled)")
    info = {
        "source_run": str(run), "command": command, "folds": len(folds), "weights": "float16" if half else "float32",
        "recipe": summary.get("recipe"), "cv": {k: summary.get(k) for k in ("folds", "n", "n_atypical", "groups", "mean", "sd", "out_of_fold", "per_fold")},
        "bytes": sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()),
    }
    if held is not None:
        info["leave_one_source_out"] = held
    if evaluation is not None:
        info["evaluation"] = evaluation
    if fitted is not None:
        info["threshold_rule"], info["cv_at_oof_thresholds"] = CROSS_FITTED_RULE, fitted
    write_json(staging / BUNDLE_INFO, info)
    if Path(out).exists():
        shutil.rmtree(out)
    staging.rename(out)
    return info


def _oof_thresholds(run: Path) -> dict[str, Any]:
    """Each fold's threshold chosen on the other folds' out-of-fold predictions, and the run's
    held-out figures at those thresholds (mean ± sd over folds), from ``oof_predictions.csv``."""
    oof = pd.read_csv(run / "oof_predictions.csv")
    y, p, fold = oof["label"].to_numpy(), oof["p_atypical"].to_numpy(), oof["fold"].to_numpy()
    fitted_metrics = cross_fitted_metrics(y, p, fold)
    fitted = {k: t for k, (t, _) in fitted_metrics.items()}
    spread = summarize_folds([m for _, m in fitted_metrics.values()])
    return {"thresholds": {f"fold_{k}": t for k, t in fitted.items()}, "mean": {m: v["mean"] for m, v in spread.items()},
            "sd": {m: v["sd"] for m, v in spread.items()}, "ensemble_threshold": float(np.mean(list(fitted.values())))}


def _per_source(domain_run: Path, recipe: str | None) -> dict[str, Any]:
    """Each held-out source's figures from the recipe's leave-one-source-out cv run, checked first."""
    held = json.loads((domain_run / "summary.json").read_text())
    if held.get("recipe") != recipe or not held.get("group_by"):
        raise MitotypeError(f"{domain_run}: not a leave-one-source-out run (--group-by) of recipe {recipe}")
    keys = ("n", "balanced_accuracy", "roc_auc", "sensitivity", "specificity")
    return {"source_run": str(domain_run), "group_by": held["group_by"],
            "per_source": {f["held_out"]: {k: f[k] for k in keys} for f in held["per_fold"]}}


def half_precision_gap(run: Path, bundle: Path, images: torch.Tensor) -> float:
    """Largest |p_atypical(float32) - p_atypical(float16 weights)| over ``images`` (uint8 NHWC):
    the cost of halving the bundle, measured rather than assumed."""
    full = Ensemble.load(run, device="cpu").p_atypical(images)
    half = Ensemble.load(bundle, device="cpu").p_atypical(images)
    return float(np.abs(full - half).max())
