"""Losses over a model's named outputs: each head is scored against its manifest column."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mitotype.config import LossConfig
from mitotype.models.registry import Head


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Binary focal loss on two-class logits (Lin et al. 2017): down-weights easy, well-classified
    patches so the rare, subtle atypical figures drive the gradient. ``alpha`` weights class 1."""
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    weight = torch.where(target == 1, alpha, 1.0 - alpha)
    return (-weight * (1.0 - log_p.exp()).pow(gamma) * log_p).mean()


class HeadLoss(nn.Module):
    """Sum over heads of CE or focal loss; the recipe's heads say which column each reads."""

    def __init__(self, cfg: LossConfig, heads: dict[str, Head], class_counts: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.heads = heads
        weight = None
        if cfg.class_weights and class_counts is not None:
            weight = class_counts.sum() / (len(class_counts) * class_counts.clamp(min=1))
        self.register_buffer("class_weight", weight if weight is not None else torch.ones(0), persistent=False)

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=next(iter(outputs.values())).device)
        for name, head in self.heads.items():
            logits, target = outputs[name], targets[head.target]
            if self.cfg.name == "focal":
                total = total + focal_loss(logits, target, self.cfg.focal_alpha, self.cfg.focal_gamma)
            else:
                weight = self.class_weight if self.class_weight.numel() else None
                total = total + F.cross_entropy(logits.float(), target, weight=weight, label_smoothing=self.cfg.label_smoothing)
        return total
