"""Architectures of the literature's recipes built from a timm backbone and :mod:`mitotype.models.blocks`.

- ``timm-attention`` (recipe densenet121-se): squeeze-and-excitation on the final feature map and a
  non-local self-attention block after a chosen stage, then the backbone's own pooling.
- ``context-stain`` (recipe context-stain): the backbone sees RGB + HED stain densities (6 channels),
  of the whole patch and of its centre (upsampled), with shared weights; both pooled vectors feed the heads.

Both accept ``model.options.neck_dim`` (a shared Linear -> ReLU layer before the heads), as the plain
``timm`` arch does. Blocks are submodules of the model, not of the backbone: they train at the heads'
learning rate (they start from scratch) and are saved and rebuilt from the card like any layer.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import adapt_input_conv
from torch import nn

from mitotype.config import ModelConfig
from mitotype.errors import MitotypeError
from mitotype.models.blocks import NonLocalBlock, SqueezeExcite, build_neck, positive_int_option
from mitotype.models.pretrained import timm_num_features, timm_pretrained_cfg
from mitotype.models.registry import MitotypeModel, build_backbone, center_crop, check_options, freeze_leading_groups, register_model, resize
from mitotype.transforms.stain import rgb_to_hed

FINAL = "final"  # attention_stage naming the backbone's final feature map (before pooling)


class AttentionModel(MitotypeModel):
    """Backbone features -> SE -> (non-local, when at the final map) -> the backbone's pooling -> heads.

    With ``attention_stage`` naming a submodule, the non-local block acts on that submodule's output
    through a forward hook (a bound method, so a deep-copied model hooks its own block).
    """

    def __init__(self, backbone: nn.Module, *args: Any, se: SqueezeExcite, attention: NonLocalBlock, stage: str, **kwargs: Any):
        super().__init__(backbone, *args, **kwargs)
        self.se, self.attention, self.stage = se, attention, stage
        if stage != FINAL:
            backbone.get_submodule(stage).register_forward_hook(self._attend)

    def _attend(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return self.attention(output)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # forward_features / forward_head: timm methods; torch types module attributes Tensor | Module
        fmap = self.se(self.backbone.forward_features(self.prepare(batch["image"])))  # type: ignore[operator]
        if self.stage == FINAL:
            fmap = self.attention(fmap)
        return self.backbone.forward_head(fmap, pre_logits=True)  # type: ignore[operator]


@register_model("timm-attention")
def timm_attention(cfg: ModelConfig, pretrained: bool = True) -> MitotypeModel:
    """Any timm CNN with SE (``options.se_reduction``, default 16) on its final feature map and a
    non-local block after ``options.attention_stage`` (a submodule name such as ``features.denseblock3``;
    default ``final``: the final feature map, after SE)."""
    check_options(cfg, ("se_reduction", "attention_stage", "neck_dim"))
    reduction = positive_int_option(cfg.options, "se_reduction", 16)
    stage = cfg.options.get("attention_stage", FINAL)
    if not isinstance(stage, str) or not stage:
        raise MitotypeError(f"config model.options.attention_stage: {stage!r} must be a submodule name of the backbone or '{FINAL}'")
    backbone, norm = build_backbone(cfg, pretrained)
    stage_shape, final_shape = _probe(backbone, cfg.input_size, None if stage == FINAL else stage, cfg.backbone)
    se = SqueezeExcite(final_shape[1], reduction)
    attention = NonLocalBlock((stage_shape or final_shape)[1])
    freeze_leading_groups(backbone, cfg.freeze_groups)
    return AttentionModel(backbone, list(cfg.heads), norm, cfg.input_size, se=se, attention=attention, stage=stage,
                          drop_rate=cfg.drop_rate, reduce_heads=cfg.reduce_heads, center_crop=cfg.center_crop,
                          neck=build_neck(cfg.options, timm_num_features(backbone)))


@torch.no_grad()
def _probe(backbone: nn.Module, size: int, stage: str | None, name: str) -> tuple[torch.Size | None, torch.Size]:
    """Shapes of ``stage``'s output and of the final feature map, from one forward pass on zeros:
    the blocks' channel counts then follow from the backbone, whatever its architecture."""
    if stage is not None and stage not in dict(backbone.named_modules()):
        stages = [f["module"] for f in getattr(backbone, "feature_info", [])]
        raise MitotypeError(f"config model.options.attention_stage: '{stage}' is not a submodule of {name} "
                            f"(its stages: {', '.join(stages) or '?'})")
    seen: dict[str, Any] = {}
    handle = backbone.get_submodule(stage).register_forward_hook(lambda m, i, o: seen.update(stage=o)) if stage else None
    was_training = backbone.training
    try:
        backbone.eval()
        zeros = torch.zeros(1, timm_pretrained_cfg(backbone).get("in_chans", 3), size, size)
        final = backbone.forward_features(zeros)  # type: ignore[operator]  # a timm method; torch types it Tensor | Module
    finally:
        backbone.train(was_training)
        if handle is not None:
            handle.remove()
    for what, out in (("final feature map", final), (f"output of '{stage}'", seen.get("stage", final))):
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise MitotypeError(f"config model.backbone: the {what} of {name} is not a (B, C, H, W) map; "
                                "arch timm-attention needs a CNN")
    return (seen["stage"].shape if stage else None), final.shape


# Scale of the HED stain densities (units of stain.rgb_to_hed): mean and sd per channel over 300
# AMi-Br patches, so the stain channels enter the first convolution at about the scale of normalised RGB.
HED_MEAN = (0.04, 0.03, 0.03)
HED_STD = (0.10, 0.02, 0.07)


class ContextStainModel(MitotypeModel):
    """Two views of each patch through one backbone: the whole patch (after ``center_crop``) and its
    central ``context_crop`` px, each resized to ``input_size`` and given as normalised RGB + HED
    (6 channels); the two pooled vectors are concatenated (2 x num_features) before the heads."""

    single_view = False  # Grad-CAM (inference/explain.py) cannot separate the two views
    hed_mean: torch.Tensor  # buffers (register_buffer in __init__): the stain channels' scale
    hed_std: torch.Tensor

    def __init__(self, backbone: nn.Module, *args: Any, context_crop: int, **kwargs: Any):
        super().__init__(backbone, *args, num_features=2 * timm_num_features(backbone), **kwargs)
        self.context_crop = context_crop
        self.register_buffer("hed_mean", torch.tensor(HED_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("hed_std", torch.tensor(HED_STD).view(1, 3, 1, 1), persistent=False)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["image"]
        whole, centre = (resize(center_crop(x, size), self.input_size) for size in (self.center_crop, self.context_crop))
        views = torch.cat([whole, centre])
        stains = (rgb_to_hed(views.float()) - self.hed_mean) / self.hed_std
        features = self.backbone(torch.cat([(views - self.mean) / self.std, stains.to(views.dtype)], dim=1))
        whole, centre = features.chunk(2)
        return torch.cat([whole, centre], dim=1)


@register_model("context-stain")
def context_stain(cfg: ModelConfig, pretrained: bool = True) -> MitotypeModel:
    """Any timm CNN on RGB + HED of the patch and of its centre (``options.context_crop`` px, default 80).

    The backbone is built with 3 input channels from any ``model.pretrained`` source (hub, file:,
    offline lite weights or none), then its first convolution is widened to 6 as timm does for
    ``in_chans=6`` (``adapt_input_conv``: the RGB filters repeated and scaled by 3/6), so every weight
    source works and ImageNet filters start out reading the stain channels like colour ones.
    """
    check_options(cfg, ("context_crop", "neck_dim"))
    crop = positive_int_option(cfg.options, "context_crop", 80)
    if crop < 8:
        raise MitotypeError(f"config model.options.context_crop: {crop} must be at least 8 px")
    if "in_chans" in cfg.kwargs:
        raise MitotypeError("config model.kwargs.in_chans: arch context-stain sets the input channels itself (6: RGB + HED)")
    backbone, norm = build_backbone(cfg, pretrained)
    widen_input(backbone, 6, cfg.backbone)
    freeze_leading_groups(backbone, cfg.freeze_groups)
    return ContextStainModel(backbone, list(cfg.heads), norm, cfg.input_size, context_crop=crop,
                             drop_rate=cfg.drop_rate, reduce_heads=cfg.reduce_heads, center_crop=cfg.center_crop,
                             neck=build_neck(cfg.options, 2 * timm_num_features(backbone)))


def widen_input(backbone: nn.Module, in_chans: int, name: str) -> None:
    """Give the backbone's first convolution (timm's ``pretrained_cfg['first_conv']``) ``in_chans`` inputs."""
    first = timm_pretrained_cfg(backbone).get("first_conv")
    first = first[0] if isinstance(first, (list, tuple)) else first
    conv = dict(backbone.named_modules()).get(first or "")
    if not isinstance(conv, nn.Conv2d):
        raise MitotypeError(f"config model.backbone: {name} does not name its first convolution (timm first_conv {first!r}); "
                            "arch context-stain cannot widen its input")
    conv.weight = nn.Parameter(adapt_input_conv(in_chans, conv.weight.detach()))
    conv.in_channels = in_chans
    backbone.pretrained_cfg = {**timm_pretrained_cfg(backbone), "in_chans": in_chans}  # type: ignore[assignment]  # a plain dict attribute (timm's)
