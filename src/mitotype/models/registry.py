"""Named model builders on top of timm, and the model contract every recipe keeps.

Contract: a model takes a batch dict (``image``: float RGB in [0, 1] at the patch size, (B,3,H,W);
later recipes add views such as HED channels or a centre crop) and returns a dict of named logits.
``p_atypical`` says how those outputs reduce to one probability, so evaluation and prediction never
need to know which heads a recipe has. Resizing and normalisation live inside the model, so a
saved model needs nothing but uint8 patches and cannot be fed with the wrong statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mitotype.config import HeadConfig, ModelConfig, validate_model_config
from mitotype.errors import MitotypeError
from mitotype.models.blocks import build_neck
from mitotype.models.pretrained import Normalization, create_backbone, timm_num_features

Head = HeadConfig  # a head is configuration: name, target column, classes, loss weight, positive classes


class MitotypeModel(nn.Module):
    """Backbone -> pooled features -> one linear layer per head; preprocessing inside ``forward``.

    ``reduce_heads`` names the heads whose positive-class probabilities are averaged into
    ``p_atypical`` (one ``label`` head, or one per expert's vote).

    The class attributes and methods below are the contract the loop, the artifact writer and
    Grad-CAM rely on; subclasses override them (a foundation probe's backbone is frozen and does not
    travel with its weights, the context-stain model feeds two views through its backbone).
    """

    single_view = True  # one view of the patch goes through the backbone: Grad-CAM can explain it
    mean: torch.Tensor  # buffers (register_buffer in __init__): the normalisation statistics
    std: torch.Tensor

    @property
    def frozen_backbone(self) -> bool:
        """The backbone never trains, so its features can be computed once and cached."""
        return False

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint or artifact carries (all of them here)."""
        return self.state_dict()

    def load_saved_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`saved_state_dict` wrote."""
        self.load_state_dict(state)

    def __init__(
        self, backbone: nn.Module, heads: list[HeadConfig], norm: Normalization, input_size: int, *,
        drop_rate: float = 0.0, reduce_heads: list[str] | None = None, center_crop: int = 0,
        neck: nn.Module | None = None, num_features: int | None = None,
    ):
        """``num_features``: width of what :meth:`embed` returns (default: the backbone's); ``neck``
        (with an ``out_features``) sits between those features and the heads, e.g. a shared 512-d layer."""
        super().__init__()
        self.backbone = backbone
        self.head_specs = {h.name: h for h in heads}
        width = cast(int, neck.out_features) if neck is not None else num_features or timm_num_features(backbone)
        self.heads = nn.ModuleDict({h.name: nn.Linear(width, h.num_classes) for h in heads})
        self.reduce_heads = list(reduce_heads or [heads[0].name])
        self.neck = neck  # None: no submodule, so plain models keep their state_dict keys
        self.dropout = nn.Dropout(drop_rate)
        self.input_size, self.center_crop = input_size, center_crop
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = self.embed(batch)
        if self.neck is not None:
            features = self.neck(features)
        features = self.dropout(features)
        return {name: head(features) for name, head in self.heads.items()}

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled features of a batch; recipes with attention blocks or extra views override this."""
        return self.backbone(self.prepare(batch["image"]))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB patch -> the backbone's input: centre crop, resize to ``input_size``, normalise."""
        x = resize(center_crop(x, self.center_crop), self.input_size)
        return (x - self.mean) / self.std

    def set_normalization(self, norm: Normalization) -> None:
        """Restore the statistics a saved model was trained with (they live in its card)."""
        self.mean.copy_(torch.tensor(norm.mean).view(1, 3, 1, 1))
        self.std.copy_(torch.tensor(norm.std).view(1, 3, 1, 1))

    def normalization(self) -> Normalization:
        return Normalization(tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist()))

    def p_atypical(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over ``reduce_heads`` of the probability of each head's positive (atypical) classes."""
        per_head = [positive_probability(outputs[n], self.head_specs[n].positive) for n in self.reduce_heads]
        return torch.stack(per_head).mean(dim=0)


def class_logits(z: torch.Tensor) -> torch.Tensor:
    """A head's (B, K) class logits; a 1-logit (binary) head's z becomes [0, z], since z = log P(1) - log P(0)."""
    return torch.cat([torch.zeros_like(z), z], dim=1) if z.shape[1] == 1 else z


def positive_log_odds(z: torch.Tensor, positive: list[int]) -> torch.Tensor:
    """log P(one of the ``positive`` classes) - log P(the rest) from a head's logits (a 1-logit head's own logit)."""
    z = class_logits(z.float())
    rest = [c for c in range(z.shape[1]) if c not in positive]
    return z[:, list(positive)].logsumexp(dim=1) - z[:, rest].logsumexp(dim=1)


def positive_probability(z: torch.Tensor, positive: list[int]) -> torch.Tensor:
    """P(one of the ``positive`` classes) from a head's logits: softmax, or sigmoid for a 1-logit head."""
    z = z.float()
    if z.shape[1] == 1 and list(positive) == [1]:
        return torch.sigmoid(z[:, 0])
    return class_logits(z).softmax(dim=1)[:, positive].sum(dim=1)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` px of ``(..., H, W)``; unchanged when ``size`` is 0 or not smaller (the figure sits at the centre)."""
    if not size or min(x.shape[-2:]) <= size:
        return x
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


ModelBuilder = Callable[[ModelConfig, bool], MitotypeModel]
_BUILDERS: dict[str, ModelBuilder] = {}
# Modules whose builders register themselves on import; imported on first use, not at import time,
# so ``import mitotype`` stays cheap and free of side effects.
BUILTIN_MODULES: tuple[str, ...] = ("mitotype.models.custom", "mitotype.models.foundation", "mitotype.models.heatmap")


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Add a builder to the registry under ``name`` (the ``model.arch`` of a config)."""

    def add(fn: ModelBuilder) -> ModelBuilder:
        if name in _BUILDERS:
            raise ValueError(f"model builder '{name}' registered twice")
        _BUILDERS[name] = fn
        return fn

    return add


def _load_builtins() -> None:
    import importlib

    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def list_models() -> list[str]:
    _load_builtins()
    return sorted(_BUILDERS)


def create_model(cfg: ModelConfig, pretrained: bool = True) -> MitotypeModel:
    """Build ``cfg.arch``; with ``pretrained=False`` skip the starting weights (a checkpoint follows)."""
    validate_model_config(cfg)
    _load_builtins()
    if cfg.arch not in _BUILDERS:
        raise MitotypeError(f"model.arch: '{cfg.arch}' is not a registered model (known: {', '.join(list_models())})")
    return _BUILDERS[cfg.arch](cfg, pretrained)


@register_model("timm")
def timm_classifier(cfg: ModelConfig, pretrained: bool = True) -> MitotypeModel:
    """Any timm backbone, pooled features, dropout, the configured heads; ``model.kwargs`` go to timm."""
    check_options(cfg, TIMM_OPTIONS)
    backbone, norm = build_backbone(cfg, pretrained)
    freeze_leading_groups(backbone, cfg.freeze_groups)
    return MitotypeModel(backbone, list(cfg.heads), norm, cfg.input_size, drop_rate=cfg.drop_rate, reduce_heads=cfg.reduce_heads,
                         center_crop=cfg.center_crop, neck=build_neck(cfg.options, timm_num_features(backbone)))


def build_backbone(cfg: ModelConfig, pretrained: bool = True) -> tuple[nn.Module, Normalization]:
    """``cfg.backbone`` from its weight source, with drop-path and ``model.kwargs``, built for ``model.input_size``.

    ViTs, Swins and the like fix their input size when built (position embeddings, attention windows;
    timm marks them ``fixed_input_size``), so they are built at ``model.input_size`` (``img_size``,
    timm resamples pretrained position embeddings) and ``--set model.input_size=N`` works for them as
    it does for CNNs. An ``img_size`` in ``model.kwargs`` wins.
    """
    kwargs = {"drop_path_rate": cfg.drop_path_rate} if cfg.drop_path_rate else {}
    timm_cfg = timm.models.get_pretrained_cfg(cfg.backbone) if timm.is_model(cfg.backbone) else None
    if timm_cfg is not None and timm_cfg.fixed_input_size and "img_size" not in cfg.kwargs:
        kwargs["img_size"] = cfg.input_size
    return create_backbone(cfg.backbone, cfg.pretrained if pretrained else "none", **kwargs, **cfg.kwargs)


TIMM_OPTIONS = ("neck_dim",)  # model.options of arch timm: neck_dim adds a shared Linear -> ReLU layer before the heads


def check_options(cfg: ModelConfig, known: tuple[str, ...]) -> None:
    """A builder refuses ``model.options`` it does not use: a typo must not silently change nothing."""
    unknown = sorted(set(cfg.options) - set(known))
    if unknown:
        raise MitotypeError(f"config model.options.{unknown[0]}: not an option of arch '{cfg.arch}' (known: {', '.join(known) or 'none'})")


def freeze_leading_groups(backbone: nn.Module, n: int) -> None:
    """Stop gradients in the first ``n`` coarse parameter groups (timm's stem, then stages).

    The earliest layers hold generic edge/colour filters and run at the highest resolution, so
    freezing them halves a CPU training step at little cost in accuracy.
    """
    if n <= 0:
        return
    if not hasattr(backbone, "group_matcher"):
        raise MitotypeError(f"model.freeze_groups: {type(backbone).__name__} has no timm group_matcher; use 0")
    from timm.models import group_parameters

    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))  # type: ignore[operator]  # timm method (checked above)
    frozen = {name for gid, names in groups.items() if gid < n for name in names}
    for name, param in backbone.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
