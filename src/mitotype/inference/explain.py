"""Grad-CAM overlays for a model's calls, and a contact sheet of its clearest and hardest cases.

The CAM is taken at the backbone's last spatial feature map (the tensor ``forward_features``
returns, found by hooking the backbone once, so any timm CNN works without a per-architecture
table) against the reduced atypical log-odds: the mean over ``reduce_heads`` of log P(atypical
classes) - log P(other classes). Log-odds do not saturate like a softmax probability, so the most
confident calls still get a map. A fold ensemble is explained by the mean of its members' maps
(each scaled to [0, 1] first) and its mean p_atypical, the same mean that ``predict`` reports.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from mitotype._io import atomic_path, check_output_dir, write_csv
from mitotype.data.images import iter_batches
from mitotype.data.manifest import LABEL_NAMES
from mitotype.errors import MitotypeError
from mitotype.models.ensemble import Ensemble, check_threshold
from mitotype.models.registry import MitotypeModel, positive_log_odds
from mitotype.transforms.batch import to_input

TARGETS = ("atypical", "predicted")
TILE, CAPTION, HEADER, PAD = 128, 30, 22, 6  # contact sheet geometry, px
SECTIONS = (("atypical", "confident"), ("atypical", "uncertain"), ("normal", "confident"), ("normal", "uncertain"))
SHEET_NAME, TABLE_NAME = "contact_sheet.png", "explanations.csv"


def atypical_log_odds(net: MitotypeModel, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the reduced heads of log P(positive classes) - log P(the rest): the logit of p_atypical
    for one binary head, without the saturation of the probability itself."""
    per_head = [positive_log_odds(outputs[name], net.head_specs[name].positive) for name in net.reduce_heads]
    return torch.stack(per_head).mean(dim=0)


class _TwoClassScores(nn.Module):
    """Tensor in, (B, 2) scores out, as pytorch-grad-cam expects: [-log-odds, +log-odds]."""

    def __init__(self, net: MitotypeModel):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = atypical_log_odds(self.net, self.net({"image": x.requires_grad_(True)}))
        return torch.stack([-s, s], dim=1)


def find_target_layer(backbone: nn.Module, size: int) -> nn.Module:
    """The outermost module whose output is the tensor ``backbone.forward_features`` returns (the last
    convolutional stage, e.g. EfficientNet's conv_head+bn2, ResNet's layer4); refuses backbones whose
    features are not a (B, C, H, W) map (vision transformers)."""
    if not hasattr(backbone, "forward_features"):
        raise MitotypeError(f"explain: backbone {type(backbone).__name__} has no forward_features (not a timm model)")
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    record = lambda mod, _inputs, out: seen.append((mod, out))  # noqa: E731
    hooks = [m.register_forward_hook(record) for m in backbone.modules() if m is not backbone]
    param = next(backbone.parameters())
    try:
        with torch.no_grad():
            # a timm method (checked above); torch types module attributes Tensor | Module
            feats = backbone.forward_features(torch.zeros(2, 3, size, size, device=param.device, dtype=param.dtype))  # type: ignore[operator]
    finally:
        for h in hooks:
            h.remove()
    name = type(backbone).__name__
    channels = getattr(backbone, "num_features", None)
    if not (isinstance(feats, torch.Tensor) and feats.ndim == 4 and feats.shape[1] == (channels or feats.shape[1])):
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise MitotypeError(f"explain: Grad-CAM needs a convolutional feature map (B, C, H, W); {name} gives {shape}")
    matches = [mod for mod, out in seen if out is feats]
    if not matches:
        raise MitotypeError(f"explain: could not find the module that makes {name}'s final feature map")
    return matches[-1]  # hooks fire inner-first, so the last match is the outermost module


def grad_cams(nets: Sequence[MitotypeModel], images: torch.Tensor, classes: Sequence[int] | np.ndarray) -> np.ndarray:
    """(B, H, W) Grad-CAM maps in [0, 1] of float images (B, 3, H, W), for class 1 (atypical) or 0
    (normal) per image; the mean over ``nets``. With a centre-cropping model the map covers the crop
    and is 0 outside it."""
    GradCAM, ClassifierOutputTarget = _grad_cam()
    b, _, h, w = images.shape
    total = np.zeros((b, h, w), dtype=np.float32)
    for net in nets:
        if not net.single_view:  # a CAM of a backbone run on two views at once mixes them
            raise MitotypeError(f"explain: a {type(net).__name__} feeds several views of a patch through its backbone; "
                                "Grad-CAM supports single-view models only")
        top = left = 0
        x = images
        crop = net.center_crop
        if crop and min(h, w) > crop:  # explain what the model sees; place the map back in the patch
            top, left = (h - crop) // 2, (w - crop) // 2
            x = images[..., top : top + crop, left : left + crop]
        layer = find_target_layer(net.backbone, net.input_size)
        with GradCAM(model=_TwoClassScores(net), target_layers=[layer]) as cam:
            maps = cam(input_tensor=x.detach().clone(), targets=[ClassifierOutputTarget(int(c)) for c in classes])
        total[:, top : top + maps.shape[1], left : left + maps.shape[2]] += maps
    return total / len(nets)


def _grad_cam() -> tuple[type, type]:
    """pytorch-grad-cam's GradCAM and target class, or one line saying how to install it."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise MitotypeError("explain needs pytorch-grad-cam: pip install 'mitotype[explain]'") from None
    return GradCAM, ClassifierOutputTarget


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A uint8 RGB patch with the map blended on top in the jet colormap (red = most evidence)."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * heat, 0, 255).astype(np.uint8)


def explain_path(
    model_path: Path, inputs: Path, out_dir: Path, *, n: int = 16, target: str = "atypical", threshold: float | None = None,
    device: str = "auto", size_policy: str | None = None, skip_missing: bool = False, batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Write an overlay PNG per patch under ``out_dir`` (same relative names as under INPUT, ``.png``
    appended to other suffixes), ``explanations.csv`` and ``contact_sheet.png``; return the table.
    Options and ``out_dir`` are checked before the models load."""
    from mitotype.data.readers import read_dataset

    if target not in TARGETS:
        raise MitotypeError(f"{{target}} '{target}': must be one of {', '.join(TARGETS)}", options=("target",))
    if n < 1:
        raise MitotypeError(f"{{n}} {n}: must be at least 1", options=("n",))
    if threshold is not None:
        check_threshold(threshold)
    _grad_cam()
    check_output_dir(out_dir, "explain_dir")
    ensemble = Ensemble.load(model_path, device=device, threshold=threshold)
    t = ensemble.threshold
    df = read_dataset(inputs, require_labels=False, skip_missing=skip_missing).manifest
    if df.empty:
        raise MitotypeError(f"{inputs}: no images found")
    paths = df["path"].astype(str).tolist()
    names = overlay_names(paths, Path(inputs), Path(out_dir))
    nets, torch_device = ensemble.nets, ensemble.device
    p = np.full(len(paths), np.nan)
    for index, batch in iter_batches(paths, batch_size, ensemble.patch_size, size_policy or ensemble.size_policy):
        p[index] = ensemble.p_atypical(batch)
        classes = np.ones(len(index), dtype=int) if target == "atypical" else (p[index] >= t).astype(int)
        maps = grad_cams(nets, to_input(batch, torch_device), classes)
        for i, img, cam in zip(index, batch.numpy(), maps):
            with atomic_path(names[i]) as tmp:
                Image.fromarray(overlay(img, cam)).save(tmp, format="PNG")
        if progress:
            progress(len(index))
    table = pd.DataFrame({"path": paths, "p_atypical": p, "label": np.where(p >= t, LABEL_NAMES[1], LABEL_NAMES[0]),
                          "cam_target": target, "overlay": [str(x) for x in names]})
    write_csv(Path(out_dir) / TABLE_NAME, table)
    write_contact_sheet(table, Path(out_dir) / SHEET_NAME, n=n, threshold=t)
    return table


def overlay_names(paths: Sequence[str], inputs: Path, out_dir: Path) -> list[Path]:
    """Overlay file per patch: its path relative to INPUT (a folder) or to the patches' common folder
    (a manifest) under ``out_dir``; an overlay that would replace an input or the sheet is refused."""
    root = inputs if inputs.is_dir() else Path(os.path.commonpath([str(Path(x).absolute().parent) for x in paths]))
    names = []
    for x in paths:
        rel = Path(os.path.relpath(Path(x).absolute(), root.absolute()))
        if rel.parts and rel.parts[0] == "..":
            rel = Path(Path(x).name)
        names.append(out_dir / (rel if rel.suffix.lower() == ".png" else rel.with_name(rel.name + ".png")))
    own = {(out_dir / SHEET_NAME).resolve(), (out_dir / TABLE_NAME).resolve()}
    clash = own | {Path(x).resolve() for x in paths}
    bad = next((name for name in names if name.resolve() in clash), None)
    if bad is not None:
        raise MitotypeError(f"{{explain_dir}} {out_dir}: the overlay {bad} would replace an input patch or an output; "
                            "choose another folder", options=("explain_dir",))
    return names


def select_sections(table: pd.DataFrame, n: int, threshold: float) -> list[pd.DataFrame]:
    """For each class as called: the ``n`` most confident (farthest from the threshold) and then the
    ``n`` most uncertain (nearest) of the rest, so no patch appears twice; order of SECTIONS."""
    out = []
    for cls, _ in SECTIONS[::2]:
        rows = table[table["label"] == cls]
        by_margin = rows.loc[(rows["p_atypical"] - threshold).abs().sort_values(ascending=False, kind="stable").index]
        confident = by_margin.head(min(n, (len(by_margin) + 1) // 2))
        uncertain = by_margin.drop(confident.index).iloc[::-1].head(n)
        out += [confident, uncertain]
    return out


def sheet_size(n: int) -> tuple[int, int]:
    """(width, height) of a contact sheet with ``n`` tiles per section row."""
    return PAD + n * (TILE + PAD), PAD + len(SECTIONS) * (HEADER + TILE + CAPTION + PAD)


def write_contact_sheet(table: pd.DataFrame, path: Path, *, n: int, threshold: float) -> None:
    """One row per section (confident / uncertain calls of each class): overlays with p and file name."""
    sheet = Image.new("RGB", sheet_size(n), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    y = PAD
    for (cls, kind), rows in zip(SECTIONS, select_sections(table, n, threshold)):
        draw.text((PAD, y + 4), f"most {kind} '{cls}' calls ({len(rows)})", fill="black", font=font)
        for col, (_, row) in enumerate(rows.iterrows()):
            x = PAD + col * (TILE + PAD)
            with Image.open(row["overlay"]) as im:
                sheet.paste(im.convert("RGB").resize((TILE, TILE), Image.Resampling.BILINEAR), (x, y + HEADER))
            name = Path(row["path"]).name
            draw.text((x, y + HEADER + TILE + 2), f"p {row['p_atypical']:.3f}", fill="black", font=font)
            short = name if len(name) <= 21 else name[:9] + "…" + name[-11:]
            draw.text((x, y + HEADER + TILE + 15), short, fill="dimgray", font=font)
        y += HEADER + TILE + CAPTION + PAD
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
