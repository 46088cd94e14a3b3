"""Foundation models (pathology ViTs and natural-image DINOv3) by linear probe or LoRA: the ``fm`` arch.

One table says, per model, what a caller would otherwise copy from each model card: the timm name,
the normalisation and input size its weights expect, the constructor arguments its hub config
lacks (Virchow's MLP layer and activation, UNI's LayerScale init...) and how its tokens pool into
one feature vector. ``model.backbone`` is a short name from the table or any timm name.

A saved ``fm`` model carries only what it trained (LoRA adapters, heads, neck); its card names the
backbone and its weight source (``build.backbone``, ``build.pretrained``), and loading rebuilds the
backbone from that source, so five folds of a 1 GB backbone are not five copies of it. A backbone
trained from no source (``none``, the tests' tiny ViTs) cannot be rebuilt and travels whole.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import torch
from torch import nn

from mitotype.config import ModelConfig
from mitotype.errors import MitotypeError
from mitotype.models.blocks import build_neck
from mitotype.models.pretrained import Normalization, create_backbone
from mitotype.models.registry import MitotypeModel, check_options, register_model

IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
VIT_LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")  # timm ViT: attention in/out, MLP in/out
POOLS = ("cls", "cls+mean", "timm")  # class token | class token ++ mean of patch tokens | the timm model's own pooling
MODES = ("probe", "lora")
FM_OPTIONS = ("mode", "r", "alpha", "dropout", "target_modules", "pool", "neck_dim")


@dataclass(frozen=True)
class FoundationSpec:
    name: str  # short name, usable as model.backbone
    timm_name: str
    norm: Normalization
    input_size: int
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm constructor kwargs; layer classes by name (see LAYER_CLASSES)
    pool: str = "cls"
    lora_targets: tuple[str, ...] = VIT_LORA_TARGETS
    any_size: bool = False  # takes any input size (dynamic_img_size or RoPE); else only input_size


_UNI2_H = {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
           "no_embed_class": True, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True}
_DINOV3_SWIGLU = ("qkv", "proj", "fc1_g", "fc1_x", "fc2")  # the ViT-H+ MLP is a SwiGLU with separate gate and value layers
FOUNDATION_MODELS: dict[str, FoundationSpec] = {s.name: s for s in (
    FoundationSpec("virchow2", "hf-hub:paige-ai/Virchow2", IMAGENET, 224, {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"},
                   pool="cls+mean", any_size=True),  # hub config: reg_tokens 4, dynamic_img_size; card: class token ++ mean of patches
    FoundationSpec("uni", "hf-hub:MahmoodLab/UNI", IMAGENET, 224, {"init_values": 1e-5, "dynamic_img_size": True}, any_size=True),
    FoundationSpec("uni2-h", "hf-hub:MahmoodLab/UNI2-h", IMAGENET, 224, _UNI2_H, any_size=True),
    FoundationSpec("h-optimus-0", "hf-hub:bioptimus/H-optimus-0", Normalization((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)),
                   224, {"init_values": 1e-5, "dynamic_img_size": False}),
    FoundationSpec("gigapath", "hf-hub:prov-gigapath/prov-gigapath", IMAGENET, 224),
    FoundationSpec("dinov3-vits16", "vit_small_patch16_dinov3.lvd1689m", IMAGENET, 256, pool="cls+mean", any_size=True),
    FoundationSpec("dinov3-vitl16", "vit_large_patch16_dinov3.lvd1689m", IMAGENET, 256, pool="cls+mean", any_size=True),
    FoundationSpec("dinov3-vith16plus", "vit_huge_plus_patch16_dinov3.lvd1689m", IMAGENET, 256, pool="cls+mean",
                   lora_targets=_DINOV3_SWIGLU, any_size=True),
)}


def _layer_classes() -> dict[str, Callable[..., Any]]:
    """The only classes a kwarg may name: config and cards hold names, never importable paths."""
    from timm import layers

    return {"SwiGLUPacked": layers.SwiGLUPacked, "SwiGLU": layers.SwiGLU, "GluMlp": layers.GluMlp, "Mlp": layers.Mlp,
            "SiLU": nn.SiLU, "GELU": nn.GELU, "ReLU": nn.ReLU, "LayerNorm": nn.LayerNorm}


LAYER_KWARG_SUFFIXES = ("_layer", "_fn", "_cls")  # timm kwargs whose values are classes or callables


def resolve_kwargs(kwargs: dict[str, Any], where: str = "model.kwargs") -> dict[str, Any]:
    """Constructor kwargs with layer-class names replaced by the allowed classes; any other name is refused."""
    allowed = _layer_classes()
    out = dict(kwargs)
    for key, value in kwargs.items():
        if key.endswith(LAYER_KWARG_SUFFIXES):
            if not isinstance(value, str) or value not in allowed:
                raise MitotypeError(f"{where}.{key}: {value!r} is not an allowed layer class (allowed: {', '.join(allowed)})")
            out[key] = allowed[value]
    return out


class PooledViT(nn.Module):
    """A timm ViT (num_classes=0) whose tokens pool into one vector: ``cls``, ``cls+mean`` or timm's own head pooling."""

    def __init__(self, vit: nn.Module, pool: str):
        super().__init__()
        self.vit, self.pool = vit, pool
        vit_width = cast(int, vit.num_features)  # a timm attribute; torch types module attributes Tensor | Module
        width: int = getattr(vit, "head_hidden_size", vit_width) if pool == "timm" else vit_width
        self.num_features = 2 * width if pool == "cls+mean" else width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)  # type: ignore[operator]  # timm ViT methods; torch types them Tensor | Module
        if self.pool == "timm":
            return self.vit.forward_head(tokens, pre_logits=True)  # type: ignore[operator]  # as above
        if self.pool == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, self.vit.num_prefix_tokens :].mean(dim=1)], dim=1)


class FoundationModel(MitotypeModel):
    """A foundation backbone with a linear head; probe: backbone frozen (and cacheable), lora: adapters train.

    ``embed`` takes cached ``features`` from the batch when they are there (training/features.py),
    so a probe trains its head through the one loop without running the backbone again.
    """

    def __init__(self, backbone: PooledViT, *, mode: str, source: str, identity: dict[str, Any], **kwargs):
        super().__init__(backbone, **kwargs)
        self.mode, self.source, self.identity = mode, source, identity

    @property
    def frozen_backbone(self) -> bool:
        return self.mode == "probe"

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "features" in batch:
            return batch["features"]
        return super().embed(batch)

    def train(self, mode: bool = True) -> FoundationModel:
        super().train(mode)
        if self.frozen_backbone:  # a frozen backbone never drops paths: its features match the cache
            self.backbone.eval()
        return self

    def _travels(self, key: str) -> bool:
        return self.source == "none" or not key.startswith("backbone.") or ".lora_" in key

    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint or artifact carries: heads, neck, LoRA adapters; the backbone only without a source."""
        return {k: v for k, v in self.state_dict().items() if self._travels(k)}

    def load_saved_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.saved_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{len(missing)} tensor(s) missing (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")
        self.load_state_dict(state, strict=False)

    def feature_identity(self) -> dict[str, Any]:
        """What the cached features depend on besides the images: backbone, weights, pooling, preprocessing."""
        norm = self.normalization()
        identity = {**self.identity, "input_size": self.input_size, "center_crop": self.center_crop, "norm": [*norm.mean, *norm.std]}
        if self.source == "none":  # random weights: the weights themselves are the source
            digest = hashlib.sha1()
            for k, v in sorted(self.backbone.state_dict().items()):
                digest.update(k.encode() + v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            identity["weights"] = digest.hexdigest()
        return identity


@register_model("fm")
def foundation_classifier(cfg: ModelConfig, pretrained: bool = True) -> FoundationModel:
    """``model.backbone`` from the table (or any timm ViT name), probe or LoRA per ``model.options.mode``.

    The backbone's weights always come from ``model.pretrained``, also when loading a saved model
    (``pretrained=False``): the saved state leaves them out (see :class:`FoundationModel`).
    """
    check_options(cfg, FM_OPTIONS)
    opts = cfg.options
    spec = FOUNDATION_MODELS.get(cfg.backbone)
    mode = _choice(opts, "mode", "probe", MODES)
    pool = _choice(opts, "pool", spec.pool if spec else "timm", POOLS)
    if spec and not spec.any_size and cfg.input_size != spec.input_size:
        raise MitotypeError(f"config model.input_size: {spec.name} takes {spec.input_size} px inputs, not {cfg.input_size}")
    name = spec.timm_name if spec else cfg.backbone
    raw_kwargs = {**(spec.kwargs if spec else {}), **cfg.kwargs}
    kwargs = resolve_kwargs(raw_kwargs)
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    try:
        vit, norm = create_backbone(name, cfg.pretrained, **kwargs)
    except (OSError, ValueError) as err:  # an hf-hub: name needs the hub's config.json even without hub weights
        first = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise MitotypeError(f"model.backbone: could not get the hub config of '{name}' ({type(err).__name__}: {first}); "
                            "run once online so it is cached, or use a timm architecture name") from None
    backbone = PooledViT(vit, pool)
    if mode == "probe":
        backbone.requires_grad_(False)
    else:
        add_lora(vit, opts, spec.lora_targets if spec else VIT_LORA_TARGETS, name)
    identity = {"backbone": name, "pretrained": _source_identity(cfg.pretrained), "kwargs": sorted((k, repr(v)) for k, v in raw_kwargs.items()),
                "pool": pool, "drop_path_rate": cfg.drop_path_rate}
    return FoundationModel(backbone, mode=mode, source=cfg.pretrained, identity=identity, heads=list(cfg.heads),
                           norm=spec.norm if spec else norm, input_size=cfg.input_size, drop_rate=cfg.drop_rate,
                           reduce_heads=cfg.reduce_heads, center_crop=cfg.center_crop, neck=build_neck(opts, backbone.num_features))


def add_lora(vit: nn.Module, opts: dict[str, Any], default_targets: tuple[str, ...], name: str) -> None:
    """peft LoRA adapters on the transformer blocks' layers named in ``target_modules``; all else frozen."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise MitotypeError("config model.options.mode=lora needs peft: pip install 'mitotype[fm]'") from None
    targets = opts.get("target_modules", list(default_targets))
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) and re.fullmatch(r"[A-Za-z_][\w]*", t) for t in targets)):
        raise MitotypeError(f"config model.options.target_modules: expected a list of layer names such as {list(VIT_LORA_TARGETS)}, got {targets!r}")
    r = _number(opts, "r", 8, integer=True)
    alpha = _number(opts, "alpha", 16)
    dropout = _number(opts, "dropout", 0.0, hi=0.999)
    pattern = r"(.*\.)?blocks\.\d+\.(.*\.)?(" + "|".join(targets) + ")"  # inside the blocks only: not the patch embedding's proj
    try:
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none"), vit)
    except ValueError as err:
        first = str(err).splitlines()[0][:120]
        raise MitotypeError(f"config model.options.target_modules: {targets} match no layer in the blocks of {name} ({first})") from None
    for key, param in vit.named_parameters():
        param.requires_grad_(".lora_" in key)


def _source_identity(source: str) -> str:
    """A weight source as the feature cache sees it: a file also by its size and modification time."""
    if source.startswith("file:") and os.path.isfile(source[5:]):
        st = Path(source[5:]).stat()
        return f"{source}|{st.st_size}|{st.st_mtime_ns}"
    return source


def _choice(opts: dict[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = opts.get(key, default)
    if value not in choices:
        raise MitotypeError(f"config model.options.{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _number(opts: dict[str, Any], key: str, default: float, *, integer: bool = False, hi: float | None = None) -> Any:
    value = opts.get(key, default)
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not ok or not (value >= 0 if hi else value > 0) or (hi is not None and value > hi):
        kind = "a positive integer" if integer else (f"a number in [0, {hi}]" if hi else "a positive number")
        raise MitotypeError(f"config model.options.{key}: expected {kind}, got {value!r}")
    return value

