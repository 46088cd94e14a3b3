"""Centre-point targets for a heat-map detector: the points travel, the loss renders them.

A training row is a crop of a point-annotated image (``mitotype data crops``) whose ``points``
column lists its figures' centres in crop pixels (JSON ``[[x, y], ...]``; ``[]`` for a crop without
one). The loop carries them as a (N, K, 2) tensor, NaN-padded, indexed like any other target; the
augmentation moves them with the image (:meth:`BatchAugment.with_points`), so flips, turns and
rotations can never disagree with the target; the loss renders the Gaussians at the network's
output stride only then, at the size of the map the network returned.

Loss: CenterNet's penalty-reduced focal loss (Zhou et al. 2019, after CornerNet). A 64 x 64 map
holds ~1 positive cell among 4,096; plain BCE is dominated by the easy background and learns low,
broad peaks, which the peak finder then splits or loses. The focal term ``(1 - p)^a`` / ``p^a``
puts the gradient on the few hard cells, and ``(1 - y)^b`` spares the cells near a centre (y close
to 1) from being pushed to 0, so a figure gives one sharp peak; it is normalised by the number of
figures, so crops without any still teach the background. ``loss.name: bce`` is the plain
alternative (mean BCE against the Gaussian target), kept for comparison.
"""

from __future__ import annotations

import json
import math
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mitotype.config import Config
from mitotype.data.images import BatchSource
from mitotype.errors import MitotypeError
from mitotype.models.registry import MitotypeModel
from mitotype.transforms.augment import POINT_TARGET
from mitotype.transforms.batch import build_batch

FOCAL_BETA = 4.0  # CenterNet's b: how much a cell near a centre is spared
DENSE_LOSSES = ("focal", "bce")


def point_targets(manifest: pd.DataFrame, column: str = POINT_TARGET) -> dict[str, torch.Tensor]:
    """``{column: (N, K, 2) float32}``: each row's points (x, y in crop pixels), NaN past its own count.

    Checked here, before training: a missing column or a cell that is not a JSON list of [x, y]
    pairs of finite numbers is one line naming the column and the crop."""
    if column not in manifest.columns:
        raise MitotypeError(f"model.heads: a heat-map detector reads column '{column}' (each crop's points), which the data does "
                            "not have; build the data with `mitotype data crops`")
    rows: list[np.ndarray] = []
    for i, cell in enumerate(manifest[column].tolist()):
        try:
            xy = np.asarray(json.loads(cell) if isinstance(cell, str) else cell, dtype=np.float64).reshape(-1, 2)
            ok = bool(np.isfinite(xy).all())
        except (TypeError, ValueError, json.JSONDecodeError):
            ok = False
        if not ok:
            raise MitotypeError(f"column '{column}': value {cell!r} of {manifest['path'].iloc[i]} is not a JSON list of [x, y] pairs")
        rows.append(xy)
    out = np.full((len(rows), max([1, *map(len, rows)]), 2), np.nan, dtype=np.float32)
    for i, xy in enumerate(rows):
        out[i, : len(xy)] = xy
    return {column: torch.from_numpy(out)}


def render_heatmap(points: torch.Tensor, shape: tuple[int, int], *, stride: int, sigma: float) -> torch.Tensor:
    """(B, 1, h, w) target: 1 at the cell holding each point (x, y in input pixels), a Gaussian of
    ``sigma`` cells around it, the maximum where figures overlap; NaN points draw nothing.

    The centre is rounded to its cell, as CenterNet does, so every figure has exactly one cell at 1:
    the focal loss's positives. Cell j covers input pixels [stride j, stride (j + 1))."""
    b, h, w = points.shape[0], *shape
    cells = torch.floor(points.float() / stride)  # (B, K, 2)
    ys = torch.arange(h, device=points.device, dtype=torch.float32)
    xs = torch.arange(w, device=points.device, dtype=torch.float32)
    dx2 = (xs[None, None, :] - cells[..., 0:1]) ** 2  # (B, K, w)
    dy2 = (ys[None, None, :] - cells[..., 1:2]) ** 2  # (B, K, h)
    g = torch.exp(-(dy2[..., :, None] + dx2[..., None, :]) / (2 * sigma**2))  # (B, K, h, w)
    g = torch.nan_to_num(g, nan=0.0)
    return (g.amax(dim=1) if g.shape[1] else torch.zeros(b, h, w, device=points.device)).unsqueeze(1)


def penalty_reduced_focal(logits: torch.Tensor, target: torch.Tensor, *, alpha: float, beta: float = FOCAL_BETA) -> torch.Tensor:
    """CenterNet's focal loss on (B, 1, h, w) logits against a rendered target (1 at centres)."""
    logits = logits.float()
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    positive = target >= 1.0
    pos = ((1 - p) ** alpha * log_p)[positive].sum()
    neg = ((1 - target) ** beta * p**alpha * log_not_p)[~positive].sum()
    return -(pos + neg) / positive.sum().clamp(min=1)


class HeatmapLoss(nn.Module):
    """The loss of a heat-map head: its points rendered at the map's size, then focal or BCE."""

    def __init__(self, cfg: Config, head: str, *, stride: int):
        super().__init__()
        if cfg.loss.name not in DENSE_LOSSES:
            raise MitotypeError(f"config loss.name: '{cfg.loss.name}' is not a heat-map loss (one of {', '.join(DENSE_LOSSES)})")
        if cfg.loss.incdp_weight > 0:
            raise MitotypeError("config loss.incdp_weight: the InCDP term needs pooled features; a heat-map detector has none (use 0)")
        mpp = cfg.data.mpp or 0.25
        self.head, self.stride, self.name, self.alpha = head, stride, cfg.loss.name, cfg.loss.focal_gamma
        self.sigma = cfg.loss.heatmap_sigma_um / mpp / stride  # in output cells

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs[self.head]
        h, w = logits.shape[-2:]
        target = render_heatmap(targets[POINT_TARGET], (h, w), stride=self.stride, sigma=self.sigma)
        if self.name == "bce":
            return F.binary_cross_entropy_with_logits(logits.float(), target)
        return penalty_reduced_focal(logits, target, alpha=self.alpha)


class HeatmapObjective:
    """A heat-map detector's targets, loss and validation (the mean loss on the validation crops,
    unaugmented: lower is better); its threshold is chosen afterwards on whole images
    (benchmarks/detector_threshold.py), not on crops."""

    def __init__(self, cfg: Config, model: MitotypeModel, manifest: pd.DataFrame):
        self.cfg = cfg
        head = next(iter(model.head_specs))
        self.targets = point_targets(manifest, model.head_specs[head].target)
        if cfg.task != "detect":
            raise MitotypeError(f"config task: '{cfg.task}' with a heat-map model (model.arch {cfg.model.arch}); it is a detector: task: detect")
        self.criterion = HeatmapLoss(cfg, head, stride=cast(int, model.output_stride))

    @torch.no_grad()
    def validate(self, model: MitotypeModel, store: BatchSource, rows: np.ndarray, device: torch.device) -> tuple[dict[str, Any], float]:
        was_training = model.training
        model.eval()
        total, size = 0.0, self.cfg.train.eval_batch_size
        for s in range(0, len(rows), size):
            part = rows[s : s + size]
            outputs = model(build_batch(store.batch(part), device, channels_last=True))
            targets = {k: v[part].to(device) for k, v in self.targets.items()}
            total += float(self.criterion(outputs, targets)) * len(part)
        model.train(was_training)
        loss = total / max(1, len(rows))
        return {"val_loss": loss}, -loss if math.isfinite(loss) else -math.inf

    def finish(self, model: MitotypeModel, store: BatchSource, rows: np.ndarray | None, device: torch.device
               ) -> tuple[float, dict[str, Any], pd.DataFrame | None]:
        """(threshold, validation metrics, no per-row predictions): the configured threshold stands."""
        from mitotype.config import fixed_threshold

        metrics = self.validate(model, store, rows, device)[0] if rows is not None and len(rows) else {}
        return fixed_threshold(self.cfg.train), metrics, None
