"""A dense heat-map detector: a timm CNN and a small top-down decoder giving one logit per 4 px.

CenterNet's shape (Zhou et al. 2019) for points: instead of scoring candidates found elsewhere, the
network paints, at output stride 4 (1 um at 0.25 um/px), the log-odds that a figure's centre lies
in each cell; detection is the peaks of that map (:mod:`mitotype.inference.detect`). The backbone's
stride-4/8/16/32 features (timm's ``forward_intermediates``; its pooling head pruned) are reduced to
``decoder_width`` channels, upsampled and summed from the coarsest down (a feature pyramid's top-down
path), then one 3x3 conv and a 1x1 to the logit. The decoder costs a few percent of the backbone.

The model is fully convolutional: it takes an image of any size (a multiple of 32 keeps every stage
aligned; the detector pads to one) and keeps the classifier's contract elsewhere: preprocessing
inside ``forward``, named outputs (``heatmap``: (B, 1, H/4, W/4) logits), ``p_atypical`` (here the
highest figure probability of each image).
"""

from __future__ import annotations

from typing import Any, Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

from mitotype.config import ModelConfig
from mitotype.errors import MitotypeError
from mitotype.models.registry import MitotypeModel, build_backbone, check_options, register_model

HEATMAP_ARCH = "heatmap"
OUTPUT_STRIDE = 4  # the map's cell in input pixels: 1 um at 0.25 um/px, 30 cells to the 7.5 um match radius
HEATMAP_OPTIONS = ("decoder_width",)
PRIOR = 0.01  # the figure probability every cell starts at (RetinaNet's bias init): the loss starts small and stable


class HeatmapModel(MitotypeModel):
    """Backbone pyramid -> top-down decoder -> one logit per ``OUTPUT_STRIDE`` px (head ``heads[0]``)."""

    detector_kind = "heatmap"  # the card's build.detector: Detector.load takes the heat-map path
    output_stride = OUTPUT_STRIDE

    def __init__(self, backbone: nn.Module, cfg: ModelConfig, norm, *, width: int):
        super().__init__(backbone, list(cfg.heads), norm, cfg.input_size, num_features=width)
        info = cast(list[dict[str, Any]], backbone.feature_info)  # timm: one entry per stage, its stride ("reduction") and channels
        taps = [i for i, f in enumerate(info) if f["reduction"] in (4, 8, 16, 32)]
        if [info[i]["reduction"] for i in taps] != [4, 8, 16, 32]:
            raise MitotypeError(f"model.backbone: {cfg.backbone} has no stride 4/8/16/32 stages for a heat-map decoder")
        self.taps = taps
        cast(Callable[..., Any], backbone.prune_intermediate_layers)(taps, prune_head=True)  # the pooled head is never used
        self.lateral = nn.ModuleList(nn.Conv2d(info[i]["num_chs"], width, 1) for i in taps)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        head = nn.Conv2d(width, 1, 1)
        nn.init.constant_(cast(torch.Tensor, head.bias), -torch.log(torch.tensor((1 - PRIOR) / PRIOR)).item())
        self.heads = nn.ModuleDict({cfg.heads[0].name: head})
        self.head_name = cfg.heads[0].name

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB at its own size -> normalised; a dense model is never resized."""
        return (x - self.mean) / self.std

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's stride-4 map (B, width, H/4, W/4)."""
        intermediates = cast(Callable[..., list[torch.Tensor]], self.backbone.forward_intermediates)
        levels = intermediates(self.prepare(batch["image"]), indices=self.taps, intermediates_only=True, stop_early=True)
        top = self.lateral[-1](levels[-1])
        for lateral, level in zip(reversed(self.lateral[:-1]), reversed(levels[:-1])):
            top = lateral(level) + F.interpolate(top, size=level.shape[-2:], mode="nearest")
        return cast(torch.Tensor, self.fuse(top))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.head_name: self.heads[self.head_name](self.embed(batch))}

    def p_atypical(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The highest figure probability of each image (B,): does it hold a mitosis at all."""
        return torch.sigmoid(outputs[self.head_name].float()).flatten(1).amax(dim=1)


@register_model(HEATMAP_ARCH)
def heatmap_detector(cfg: ModelConfig, pretrained: bool = True) -> MitotypeModel:
    """``cfg.backbone`` (its weight source as for the classifier) with the decoder; ``model.options.decoder_width``
    (default 64) channels; one head of one logit (``model.heads``: a single head with ``num_classes: 1``)."""
    check_options(cfg, HEATMAP_OPTIONS)
    width = cfg.options.get("decoder_width", 64)
    if isinstance(width, bool) or not isinstance(width, int) or not 8 <= width <= 1024:
        raise MitotypeError(f"config model.options.decoder_width: {width!r} must be an integer in 8..1024")
    if len(cfg.heads) != 1 or cfg.heads[0].num_classes != 1:
        raise MitotypeError("config model.heads: a heat-map detector has one head of one logit (num_classes: 1)")
    backbone, norm = build_backbone(cfg, pretrained)
    if not hasattr(backbone, "forward_intermediates") or not hasattr(backbone, "feature_info"):
        raise MitotypeError(f"model.backbone: {cfg.backbone} gives no intermediate features (timm forward_intermediates)")
    return HeatmapModel(backbone, cfg, norm, width=width)
