"""What a run trains toward: per-row targets, the loss, and how validation scores a model.

The loop (:func:`mitotype.training.loop.fit`) is the same for every recipe; the objective is the one
thing it asks the model's kind for. A classifier (and the candidate detector, a classifier of
patches) learns its heads' class columns, validated by balanced accuracy with the threshold chosen
on the validation rows; a heat-map detector learns its crops' points (:mod:`mitotype.training.dense`).
Each objective gives ``targets`` (tensors indexed by manifest row), ``criterion(outputs, targets)``,
``validate(model, store, rows, device) -> (record entries, score: higher is better)`` and
``finish(...) -> (threshold, metrics, predictions)``.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from mitotype.config import Config, fixed_threshold
from mitotype.data.images import BatchSource
from mitotype.evaluation.metrics import best_threshold, binary_metrics
from mitotype.models.ensemble import Ensemble
from mitotype.models.registry import MitotypeModel
from mitotype.training.losses import HeadLoss, head_targets, require_targets


class Objective(Protocol):
    targets: dict[str, torch.Tensor]

    @property
    def criterion(self) -> nn.Module: ...

    def validate(self, model: MitotypeModel, store: BatchSource, rows: np.ndarray, device: torch.device) -> tuple[dict[str, Any], float]: ...

    def finish(self, model: MitotypeModel, store: BatchSource, rows: np.ndarray | None, device: torch.device
               ) -> tuple[float, dict[str, Any], pd.DataFrame | None]: ...


class ClassifyObjective:
    """Heads against class columns (:class:`HeadLoss`); validation by balanced accuracy."""

    def __init__(self, cfg: Config, model: MitotypeModel, manifest: pd.DataFrame, train_idx: np.ndarray):
        self.cfg, self.manifest = cfg, manifest
        heads = {h.name: h for h in cfg.model.heads}
        self.targets = head_targets(manifest, heads)  # checked before any work
        require_targets(self.targets, heads, train_idx)
        self.criterion = HeadLoss(cfg.loss, model.head_specs, {col: v[train_idx] for col, v in self.targets.items()})

    def _scores(self, model: MitotypeModel, store: BatchSource, rows: np.ndarray, device: torch.device) -> np.ndarray:
        t = self.cfg.train
        return Ensemble([model], device=device, amp=t.amp).score_store(store, rows, batch_size=t.eval_batch_size)

    def validate(self, model: MitotypeModel, store: BatchSource, rows: np.ndarray, device: torch.device) -> tuple[dict[str, Any], float]:
        metrics = binary_metrics(self.manifest["label"].to_numpy()[rows], self._scores(model, store, rows, device), fixed_threshold(self.cfg.train))
        return {f"val_{k}": metrics[k] for k in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")}, metrics["balanced_accuracy"]

    def finish(self, model: MitotypeModel, store: BatchSource, rows: np.ndarray | None, device: torch.device
               ) -> tuple[float, dict[str, Any], pd.DataFrame | None]:
        """The threshold (``auto``: best on the validation rows), their metrics and predictions."""
        threshold = fixed_threshold(self.cfg.train)  # "oof": cross_validate sets it once every fold has predicted
        if rows is None or not len(rows):
            return threshold, {}, None
        p = self._scores(model, store, rows, device)
        y = self.manifest["label"].to_numpy()[rows]
        if self.cfg.train.threshold == "auto":
            threshold = best_threshold(y, p)
        return threshold, binary_metrics(y, p, threshold), self.manifest.iloc[rows].assign(p_atypical=p)


def objective_for(cfg: Config, model: MitotypeModel, manifest: pd.DataFrame, train_idx: np.ndarray) -> Objective:
    """The objective of ``model``'s kind: dense (a heat-map detector) or per patch (everything else)."""
    if getattr(model, "detector_kind", None) == "heatmap":
        from mitotype.training.dense import HeatmapObjective

        return HeatmapObjective(cfg, model, manifest)
    return ClassifyObjective(cfg, model, manifest, train_idx)
