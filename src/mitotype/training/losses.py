"""Losses over a model's named outputs: each head is scored against its manifest column, weighted
by the head's ``weight``; rows whose target is missing (-1) are left out of that head's loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mitotype.config import HeadConfig, LossConfig
from mitotype.errors import MitotypeError

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
        bad = unparsable | (values != np.round(values)) | (values < MISSING) | (values >= head.num_classes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            value = column.iloc[i].item() if hasattr(column.iloc[i], "item") else column.iloc[i]
            raise MitotypeError(f"column '{col}' (head '{head.name}'): value {value!r} of {manifest['path'].iloc[i]} "
                                f"is not a class index 0..{head.num_classes - 1} or missing")
        out[col] = torch.from_numpy(values.astype(np.int64))
    return out


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float, positive: list[int] | None = None) -> torch.Tensor:
    """Focal loss on class logits (Lin et al. 2017): down-weights easy, well-classified patches so the
    rare, subtle atypical figures drive the gradient. ``alpha`` weights rows whose target is one of
    the ``positive`` (atypical) classes, ``1 - alpha`` the others. Mean over the rows given."""
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    is_positive = torch.isin(target, torch.tensor(positive or [1], device=target.device))
    weight = torch.where(is_positive, alpha, 1.0 - alpha)
    return (-weight * (1.0 - log_p.exp()).pow(gamma) * log_p).mean()


def class_weights(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency over the labelled rows, scaled so that a balanced set gets 1.0 each."""
    counts = torch.bincount(targets[targets != MISSING], minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp(min=1))


class HeadLoss(nn.Module):
    """Sum over heads of ``weight`` x (CE or focal loss) on the rows that have a target for the head.

    ``train_targets`` (the training rows' targets per manifest column) set the class weights of
    cross-entropy when ``loss.class_weights`` is on.
    """

    def __init__(self, cfg: LossConfig, heads: dict[str, HeadConfig], train_targets: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.cfg, self.heads = cfg, heads
        for name, head in heads.items():
            weight = torch.ones(0)
            if cfg.class_weights and train_targets is not None:
                weight = class_weights(train_targets[head.target], head.num_classes)
            self.register_buffer(f"class_weight_{name}", weight, persistent=False)

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=next(iter(outputs.values())).device)
        for name, head in self.heads.items():
            target = targets[head.target]
            known = target != MISSING
            if head.weight == 0 or not bool(known.any()):
                continue
            logits, target = outputs[name][known].float(), target[known]
            if self.cfg.name == "focal":
                loss = focal_loss(logits, target, self.cfg.focal_alpha, self.cfg.focal_gamma, head.positive)
            else:
                weight = getattr(self, f"class_weight_{name}")
                loss = F.cross_entropy(logits, target, weight=weight if weight.numel() else None, label_smoothing=self.cfg.label_smoothing)
            total = total + head.weight * loss
        return total
