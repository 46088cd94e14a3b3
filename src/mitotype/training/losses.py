"""Losses over a model's named outputs: each head is scored against its manifest column, weighted
by the head's ``weight``; rows whose target is missing (-1) are left out of that head's loss."""

from __future__ import annotations

from typing import cast

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mitotype.config import HeadConfig, LossConfig
from mitotype.errors import MitotypeError
from mitotype.models.registry import class_logits, positive_log_odds

MISSING = -1  # target value of a row without a label for this head (e.g. an expert who did not vote)


def head_targets(manifest: pd.DataFrame, heads: dict[str, HeadConfig]) -> dict[str, torch.Tensor]:
    """Each head's target column as int64 class indices, MISSING where unknown (NaN or -1).

    Checked here, before training: a missing column, a fractional value or a class the head does
    not have is an error naming the head, the column and the first offending patch.
    """
    out: dict[str, torch.Tensor] = {}
    for head in heads.values():
        col = head.target
        if col not in manifest.columns:
            raise MitotypeError(f"model.heads: head '{head.name}' reads column '{col}', which the data does not have")
        column = manifest[col]
        numeric = pd.to_numeric(column.astype(float) if column.dtype == bool else column, errors="coerce").to_numpy(np.float64)
        unparsable = column.notna().to_numpy() & np.isnan(numeric)
        values = np.where(np.isnan(numeric), MISSING, numeric)
        n_classes = max(head.num_classes, 2)  # a 1-logit head is binary: targets 0 / 1
        bad = unparsable | (values != np.round(values)) | (values < MISSING) | (values >= n_classes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            value = column.iloc[i].item() if hasattr(column.iloc[i], "item") else column.iloc[i]
            raise MitotypeError(f"column '{col}' (head '{head.name}'): value {value!r} of {manifest['path'].iloc[i]} "
                                f"is not a class index 0..{n_classes - 1} or missing")
        out[col] = torch.from_numpy(values.astype(np.int64))
    return out


def require_targets(targets: dict[str, torch.Tensor], heads: dict[str, HeadConfig], rows: np.ndarray) -> None:
    """Every head that carries loss weight has a target on some training row; otherwise it could
    never learn (e.g. per-expert heads on data without votes), and saying so beats a silent head."""
    for head in heads.values():
        if head.weight > 0 and not bool((targets[head.target][rows] != MISSING).any()):
            raise MitotypeError(f"model.heads: head '{head.name}' has no target in column '{head.target}' on any training row; "
                                "give the data that column or set the head's weight to 0")


def focal_loss(logits: torch.Tensor, target: torch.Tensor, *, alpha: float, gamma: float, positive: list[int] | None = None) -> torch.Tensor:
    """Focal loss on class logits (Lin et al. 2017): down-weights easy, well-classified patches so the
    rare, subtle atypical figures drive the gradient. ``alpha`` weights rows whose target is one of
    the ``positive`` (atypical) classes, ``1 - alpha`` the others. Mean over the rows given."""
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    is_positive = torch.isin(target, torch.tensor(positive or [1], device=target.device))
    weight = torch.where(is_positive, alpha, 1.0 - alpha)
    return (-weight * (1.0 - log_p.exp()).pow(gamma) * log_p).mean()


def bce_loss(logits: torch.Tensor, target: torch.Tensor, positive: list[int], *, weight: torch.Tensor | None = None,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Binary cross-entropy with logits on a head's positive-class log-odds: a 1-logit head's own logit
    (torch's BCEWithLogitsLoss on one output, as the AMi-Br benchmark trains), or for a K-class head
    log P(positive) - log P(rest), which for two classes is cross-entropy itself. ``weight`` (per class
    index) gives a weighted mean, as cross-entropy's class weights do; smoothing pulls targets to 1/2."""
    log_odds = positive_log_odds(logits, positive)
    y = torch.isin(target, torch.tensor(positive, device=target.device)).float()
    y = y * (1.0 - label_smoothing) + label_smoothing / 2
    per_row = F.binary_cross_entropy_with_logits(log_odds, y, reduction="none")
    if weight is None:
        return per_row.mean()
    w = weight[target]
    return (w * per_row).sum() / w.sum()


def class_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency over the labelled rows, scaled so that a balanced set gets 1.0 each."""
    counts = torch.bincount(targets[targets != MISSING], minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp(min=1))


class HeadLoss(nn.Module):
    """Sum over heads of ``weight`` x (CE, focal or BCE loss) on the rows that have a target for the head.

    A 1-logit head z is scored as the two-class head [0, z] (z = log P(1) - log P(0)), so CE and focal
    take it too; on it CE and BCE are the same number.

    ``train_targets`` (the training rows' targets per manifest column) set the class weights of
    cross-entropy when ``loss.class_weights`` is on.
    """

    def __init__(self, cfg: LossConfig, heads: dict[str, HeadConfig], train_targets: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.cfg, self.heads = cfg, heads
        for name, head in heads.items():
            weight = torch.ones(0)
            if cfg.class_weights and train_targets is not None:
                weight = class_weights(train_targets[head.target], max(head.num_classes, 2))
            self.register_buffer(f"class_weight_{name}", weight, persistent=False)

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        # zero, but attached to the graph: a batch where no head has a target still backpropagates (nothing)
        total = cast(torch.Tensor, sum(o.sum() * 0.0 for o in outputs.values()))  # a Tensor: a model has at least one head
        for name, head in self.heads.items():
            target = targets[head.target]
            known = target != MISSING
            if head.weight == 0 or not bool(known.any()):
                continue
            logits, target = outputs[name][known].float(), target[known]
            weight = getattr(self, f"class_weight_{name}")
            if self.cfg.name == "bce":
                loss = bce_loss(logits, target, head.positive, weight=weight if weight.numel() else None,
                                label_smoothing=self.cfg.label_smoothing)
            elif self.cfg.name == "focal":
                loss = focal_loss(class_logits(logits), target, alpha=self.cfg.focal_alpha, gamma=self.cfg.focal_gamma, positive=head.positive)
            else:
                loss = F.cross_entropy(class_logits(logits), target, weight=weight if weight.numel() else None, label_smoothing=self.cfg.label_smoothing)
            total = total + head.weight * loss
        return total


def diversity_loss(features: torch.Tensor, labels: torch.Tensor, *, temperature: float = 2.0) -> torch.Tensor:
    """InCDP (after MitDet, arXiv 2307.05889): keep the classes apart without collapsing either.

    On L2-normalised features: the cosine similarity of the two class means (inter-class: lower is
    farther apart) plus, per class, the log mean Gaussian potential between its members (Wang &
    Isola's uniformity: lower is more spread, so the variety of phases and look-alikes inside a
    class is kept rather than squeezed into one point). Rows of a class alone in the batch add nothing.
    """
    z = nn.functional.normalize(features.float().flatten(1), dim=1)
    total = z.sum() * 0.0
    means = []
    for c in (0, 1):
        zc = z[labels == c]
        if len(zc) >= 2:
            d2 = torch.cdist(zc, zc).pow(2)
            off = ~torch.eye(len(zc), dtype=torch.bool, device=z.device)
            total = total + torch.log(torch.exp(-temperature * d2[off]).mean())
        if len(zc):
            means.append(zc.mean(dim=0))
    if len(means) == 2:
        total = total + nn.functional.cosine_similarity(means[0], means[1], dim=0)
    return total
