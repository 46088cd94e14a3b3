"""Run configuration: plain dataclasses, loaded from YAML, overridden by ``section.field=value``.

A recipe (``configs/NAME.yaml``) is only a set of overrides of these defaults, so every recipe runs
through the same code; the resolved config is saved with each run so it can be re-run exactly.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.resources
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mitotype import DEFAULT_RECIPE  # noqa: F401 (re-exported beside the recipes)
from mitotype.errors import MitotypeError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

    import torch

RECIPES = importlib.resources.files("mitotype") / "configs"  # recipes ship inside the package


class BackendName(str, enum.Enum):
    """What runs a model (``--backend``): see :mod:`mitotype.inference.runtime`. Here, in the base
    layer, so the command line offers the choices without importing torch."""

    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"
    openvino = "openvino"
    openvino_bf16 = "openvino-bf16"


class SizePolicy(str, enum.Enum):
    """What happens to a patch of another size than the model's (``--size-policy``; ``data.size_policy``)."""

    error = "error"
    center_crop = "center-crop"
    resize = "resize"


class BBoxFormat(str, enum.Enum):
    """How COCO-style boxes of a point file are read (``--bbox-format``): corners (MIDOG) or x, y, w, h."""

    auto = "auto"
    xyxy = "xyxy"
    xywh = "xywh"


class PointFormat(str, enum.Enum):
    """How a detection table is written (``detect --format``): see :mod:`mitotype.data.point_formats`.

    csv: the table itself; geojson: a FeatureCollection of points QuPath imports; asap: ASAP XML
    (one file per image); midog: a MIDOG-style COCO JSON that :func:`~mitotype.data.points.read_points`
    reads back."""

    csv = "csv"
    geojson = "geojson"
    asap = "asap"
    midog = "midog"


def _number(name: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MitotypeError(f"augment.{name} must be a number, got {value!r}")
    value = float(value)
    if not lo <= value <= hi:  # also rejects NaN
        raise MitotypeError(f"augment.{name} must be in [{lo:g}, {hi:g}], got {value:g}")
    return value


@dataclass
class AugmentConfig:
    """What :class:`BatchAugment` does. The defaults are flips and 90 degree turns only."""

    flip: bool = True  # random horizontal + vertical flips
    rot90: bool = True  # random multiples of 90 degrees (needs H == W)
    rotate_degrees: float = 0.0  # extra rotation, uniform in [-d, d], reflection padding
    crop_scale: tuple[float, float] = (1.0, 1.0)  # random resized crop, area fraction; (1, 1) = off
    brightness: float = 0.0  # factor in [1-b, 1+b]
    contrast: float = 0.0  # factor in [1-c, 1+c] around the image's mean grey
    saturation: float = 0.0  # factor in [1-s, 1+s], blend with greyscale
    hue: float = 0.0  # shift in [-h, h] turns (rotation in YIQ space), h <= 0.5
    hed_sigma: float = 0.0  # HED jitter: hed * (1 + U(-sigma, sigma)) ...
    hed_bias: float = 0.0  # ... + U(-bias, bias), per image and stain channel (rgb2hed units)
    p: float = 1.0  # probability that a sample gets the colour / stain part at all
    # JPEG re-compression, last: with probability jpeg_p a sample is encoded and decoded at a quality
    # drawn in [lo, hi] (whole-slide images are JPEG tiles; training PNGs are not). 0 = off.
    jpeg_p: float = 0.0
    jpeg_quality: tuple[int, int] = (70, 95)
    # Stain mixing (UnSA), after everything else: with probability stain_mix_p an image's own stain
    # vectors (estimated without labels, Macenko) move U(0, stain_mix_max) of the way to another
    # image's of the batch (1: swapped). Off by default.
    stain_mix_p: float = 0.0
    stain_mix_max: float = 1.0

    def __post_init__(self) -> None:
        for name in ("flip", "rot90"):
            if not isinstance(getattr(self, name), bool):
                raise MitotypeError(f"augment.{name} must be true or false, got {getattr(self, name)!r}")
        self.rotate_degrees = _number("rotate_degrees", self.rotate_degrees, 0.0, 180.0)
        for name in ("brightness", "contrast", "saturation"):
            setattr(self, name, _number(name, getattr(self, name), 0.0, 1.0))
        self.hue = _number("hue", self.hue, 0.0, 0.5)
        self.hed_sigma = _number("hed_sigma", self.hed_sigma, 0.0, 1.0)
        self.hed_bias = _number("hed_bias", self.hed_bias, 0.0, 1.0)
        self.p = _number("p", self.p, 0.0, 1.0)
        self.jpeg_p = _number("jpeg_p", self.jpeg_p, 0.0, 1.0)
        self.stain_mix_p = _number("stain_mix_p", self.stain_mix_p, 0.0, 1.0)
        self.stain_mix_max = _number("stain_mix_max", self.stain_mix_max, 0.0, 1.0)
        q = self.jpeg_quality
        if isinstance(q, (str, bytes)) or not hasattr(q, "__len__") or len(q) != 2:
            raise MitotypeError(f"augment.jpeg_quality must be a pair [min, max], got {q!r}")
        lo_q, hi_q = (_number("jpeg_quality", v, 1.0, 100.0) for v in q)
        if not (lo_q == int(lo_q) and hi_q == int(hi_q) and lo_q <= hi_q):
            raise MitotypeError(f"augment.jpeg_quality must be whole numbers 1 <= min <= max <= 100, got {q!r}")
        self.jpeg_quality = (int(lo_q), int(hi_q))
        cs = self.crop_scale
        if isinstance(cs, (str, bytes)) or not hasattr(cs, "__len__") or len(cs) != 2:
            raise MitotypeError(f"augment.crop_scale must be a pair [min, max], got {cs!r}")
        lo = _number("crop_scale", cs[0], 0.0, 1.0)
        hi = _number("crop_scale", cs[1], 0.0, 1.0)
        if not 0.0 < lo <= hi:
            raise MitotypeError(f"augment.crop_scale must satisfy 0 < min <= max <= 1, got {cs!r}")
        self.crop_scale = (lo, hi)

    @classmethod
    def off(cls) -> AugmentConfig:
        """A config that changes nothing (for evaluation)."""
        return cls(flip=False, rot90=False)

    @property
    def crop_on(self) -> bool:
        return self.crop_scale[0] < 1.0

    @property
    def geometry_on(self) -> bool:
        return self.flip or self.rot90 or self.rotate_degrees > 0 or self.crop_on

    @property
    def stain_on(self) -> bool:
        return self.hed_sigma > 0 or self.hed_bias > 0

    @property
    def jitter_on(self) -> bool:
        return self.brightness > 0 or self.contrast > 0 or self.saturation > 0 or self.hue > 0

    @property
    def colour_on(self) -> bool:
        return self.p > 0 and (self.stain_on or self.jitter_on)

    @property
    def jpeg_on(self) -> bool:
        return self.jpeg_p > 0

    @property
    def stain_mix_on(self) -> bool:
        return self.stain_mix_p > 0 and self.stain_mix_max > 0

    @property
    def is_identity(self) -> bool:
        return not (self.geometry_on or self.colour_on or self.jpeg_on or self.stain_mix_on)



@dataclass
class DataConfig:
    patch_size: int = 128  # every patch must have this size, unless size_policy says otherwise
    size_policy: str = "error"  # error | center-crop | resize: what to do with patches of another size
    on_bad_image: str = "error"  # error | skip: unreadable / non-RGB images
    cache_dir: str | None = None  # memory-map decoded images here (None: decode into memory)
    split_seed: int = 42  # StratifiedGroupKFold seed
    val_fraction: float = 0.0  # grouped inner validation split for early stopping (0 = none)
    stratify: list[str] = field(default_factory=lambda: ["label"])  # grouped folds balance the combinations of these columns
    mpp: float | None = None  # microns per pixel of the patches (AMi-Br: 0.25); stored in the model card


@dataclass
class HeadConfig:
    """One named output of the model, trained against manifest column ``target``.

    ``positive`` lists the classes that count as atypical when this head is reduced to
    ``p_atypical`` (``[1]`` for a binary head; ``[2, 3]`` for NMF-easy, NMF-hard, AMF-easy, AMF-hard).
    Rows whose target is missing (NaN or -1) do not contribute to this head's loss.
    """

    name: str = "label"
    target: str = "label"
    num_classes: int = 2
    weight: float = 1.0  # this head's share of the total loss
    positive: list[int] = field(default_factory=lambda: [1])


@dataclass
class ModelConfig:
    arch: str = "timm"  # model builder in the registry (mitotype.models.registry)
    backbone: str = "tf_efficientnet_lite0"  # timm model name
    pretrained: str = "none"  # imagenet (Lite packages, else timm's if cached, else scratch), imagenet-lite0|1|2, hub, file:PATH, none
    input_size: int = 128  # patches are resized to this inside the model
    center_crop: int = 0  # keep the central N px of the patch before resizing (0: the whole patch)
    drop_rate: float = 0.2
    drop_path_rate: float = 0.0
    freeze_groups: int = 0  # freeze the first N of timm's coarse parameter groups (stem, stages...)
    heads: list[HeadConfig] = field(default_factory=lambda: [HeadConfig()])
    reduce: str = "mean"  # how the reduce_heads' positive-class probabilities become p_atypical
    reduce_heads: list[str] = field(default_factory=lambda: ["label"])
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for timm's constructor
    options: dict[str, Any] = field(default_factory=dict)  # the arch's own settings (blocks, neck, adapters); checked by its builder


REDUCTIONS = ("mean",)  # mean over reduce_heads of the probability of their positive classes


def validate_model_config(m: ModelConfig, where: str = "config model") -> None:
    """Heads and their reduction must be consistent; shared by configs and model cards."""
    if m.center_crop and m.center_crop < 8:
        raise MitotypeError(f"{where}.center_crop: {m.center_crop} must be 0 (off) or at least 8 px")
    if not m.heads:
        raise MitotypeError(f"{where}.heads: a model needs at least one head")
    names = [h.name for h in m.heads]
    if len(set(names)) != len(names):
        raise MitotypeError(f"{where}.heads: head names must be unique (got {', '.join(names)})")
    for i, h in enumerate(m.heads):
        at = f"{where}.heads[{i}]"
        if not h.name or not h.target:
            raise MitotypeError(f"{at}: name and target must be non-empty")
        if h.num_classes < 1:
            raise MitotypeError(f"{at}.num_classes: {h.num_classes} must be 1 (one logit: binary) or at least 2")
        n = max(h.num_classes, 2)  # a 1-logit head is binary: its logit is log P(1) - log P(0)
        if not math.isfinite(h.weight) or h.weight < 0:
            raise MitotypeError(f"{at}.weight: {h.weight} must be a finite number >= 0")
        if not h.positive or len(set(h.positive)) != len(h.positive) or len(h.positive) >= n or not all(0 <= c < n for c in h.positive):
            raise MitotypeError(f"{at}.positive: {h.positive} must be distinct class indices in 0..{n - 1}, not all of them")
    if not any(h.weight > 0 for h in m.heads):
        raise MitotypeError(f"{where}.heads: at least one head needs a weight > 0")
    if m.reduce not in REDUCTIONS:
        raise MitotypeError(f"{where}.reduce: '{m.reduce}' is not one of {', '.join(REDUCTIONS)}")
    unknown = [n for n in m.reduce_heads if n not in names]
    if not m.reduce_heads or unknown:
        raise MitotypeError(f"{where}.reduce_heads: {m.reduce_heads} must name some of the heads ({', '.join(names)})")


@dataclass
class LossConfig:
    name: str = "ce"  # ce | focal | bce (binary cross-entropy on each head's positive-class log-odds)
    focal_alpha: float = 0.25  # weight of the atypical (positive) class in focal loss
    focal_gamma: float = 2.0
    class_weights: bool = False  # weight cross-entropy by inverse class frequency
    label_smoothing: float = 0.0
    incdp_weight: float = 0.0  # InCDP feature-diversity term (training/losses.diversity_loss) on the heads' input; 0 = off
    heatmap_sigma_um: float = 1.5  # a heat-map detector's target: Gaussian of this sigma around each figure's centre cell


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adamw"  # adamw | adam
    lr: float = 1e-3
    backbone_lr_scale: float = 1.0  # backbone lr = lr * this (heads get lr)
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine decays to lr * this
    sampler: str = "balanced"  # balanced (classes drawn equally often) | shuffle | diverse (DGSB: classes, then clusters within each, equally)
    diverse_clusters: int = 8  # sampler diverse: k-means clusters per class
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    ema_decay: float = 0.0  # exponential moving average of the weights (e.g. 0.999; 0 = off): validated and saved instead of the raw weights
    patience: int = 0  # early stopping on validation balanced accuracy (0 = off)
    threshold: float | str = 0.5  # decision threshold; "auto": best on the validation rows; "oof" (cv): best on the other folds' out-of-fold predictions
    amp: bool = True  # mixed precision (CUDA only)
    channels_last: bool = True  # NHWC tensors: faster convolutions on CPU (oneDNN) and GPU
    seed: int = 0
    deterministic_algorithms: bool = False  # torch's deterministic mode: needed on CUDA, ~1.5x slower steps on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 256
    keep_epoch_checkpoints: bool = False  # keep every epoch's weights besides the resumable last.pt


@dataclass
class CandidateConfig:
    """How a detector finds the places its classifier looks at (``task: detect`` recipes only).

    Mitotic figures are the darkest haematoxylin blobs, so candidates are the local maxima of the
    smoothed haematoxylin optical density (colour deconvolution) above a floor: cheap, and on the
    AMi-Br patches 99.5% of the figures have one within 7.5 um. The classifier then tells mitosis
    from look-alike at each; survivors closer than ``nms_um`` keep only the highest score.
    """

    sigma_um: float = 0.75  # Gaussian smoothing of the haematoxylin density before the peaks
    min_od: float = 0.6  # a peak's smoothed haematoxylin optical density must reach this (AMi-Br: 99.75% of figures kept)
    min_distance_um: float = 3.0  # peaks closer than this merge into one candidate
    nms_um: float = 7.5  # detections closer than this keep only the best (MIDOG's match radius)
    radius_um: float = 7.5  # a candidate within this of a true figure is a positive (training sets)
    negatives_per_figure: int = 4  # look-alikes kept per true figure when building a training set
    recentre_fraction: float = 0.5  # move each detection to its blob's centre (pixels above this share of the peak); 0 = off
    recentre_um: float = 8.0  # ... within this distance of the peak
    grid_um: float = 0.0  # the density's sampling: every pixel (0) or one sample per grid_um (0.5 at 0.25 um/px: a quarter of the work)


@dataclass
class Config:
    recipe: str = "default"
    description: str = ""
    task: str = "classify"  # classify (atypical vs normal patch) | detect (mitosis vs look-alike at haematoxylin candidates)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML value against a field's type; ints become floats where floats are expected."""
    hint = annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except MitotypeError:
                continue
        raise MitotypeError(f"config {where}: {value!r} is not a valid {_type_name(hint)}")
    if hint is type(None):
        if value is None:
            return None
        raise MitotypeError(f"config {where}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise MitotypeError(f"config {where}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise MitotypeError(f"config {where}: expected a mapping of names to values, got {value!r}")
        return dict(value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a dataclass type (a hint is never an instance)
        if not isinstance(value, dict):
            raise MitotypeError(f"config {where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(hint))}")
        obj = hint()
        _apply(obj, value, where)
        return obj
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise MitotypeError(f"config {where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # nan / inf / .inf: no setting of ours means that
                raise MitotypeError(f"config {where}: {value!r} is not a finite number")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise MitotypeError(f"config {where}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _apply(obj: Any, values: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise MitotypeError(f"{where}: unknown config key '{key}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise MitotypeError(f"{where}: '{key}' must be a mapping of its fields")
            _apply(current, value, f"{where}: {key}")
        else:
            value = _coerce(value, hints[key], f"{where.split(': ', 1)[-1]}.{key}".lstrip("."))
            if isinstance(current, dict) and isinstance(value, dict):  # model.options.X=v keeps the recipe's other options
                value = {**current, **value}
            setattr(obj, key, value)


def packaged_recipes() -> dict[str, Traversable]:
    """The recipes that ship with mitotype, by name."""
    return {Path(f.name).stem: f for f in sorted(RECIPES.iterdir(), key=lambda f: f.name) if f.name.endswith(".yaml")}


def resolve_recipe(name_or_path: str) -> Traversable:
    """A recipe is a YAML path, a name in ./configs (or ./configs/experiments), or a packaged name."""
    candidates: list[Traversable] = [Path(name_or_path)]
    if not name_or_path.endswith((".yaml", ".yml")):
        local = Path.cwd() / "configs"
        candidates += [local / f"{name_or_path}.yaml", local / "experiments" / f"{name_or_path}.yaml"]
        candidates += [f for name, f in packaged_recipes().items() if name == name_or_path]
    for path in candidates:
        if path.is_file():
            return path
    raise MitotypeError(f"recipe '{name_or_path}' not found (known recipes: {', '.join(packaged_recipes()) or 'none'})")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise MitotypeError(f"override '{text}' must look like section.field=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the recipe's YAML, then ``section.field=value`` overrides, each checked."""
    cfg = Config()
    if recipe:
        path = resolve_recipe(recipe)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise MitotypeError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise MitotypeError(f"{path}: a config must be a mapping of sections")
        values.setdefault("recipe", Path(path.name).stem)
        _apply(cfg, values, str(path))
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        _apply(cfg, nested, f"override '{text}'")
    validate_config(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = Config()
    _apply(cfg, values, "saved config")
    return cfg


SIZE_POLICIES = tuple(p.value for p in SizePolicy)
_CHOICES = {
    ("data", "size_policy"): SIZE_POLICIES,
    ("data", "on_bad_image"): ("error", "skip"),
    ("loss", "name"): ("ce", "focal", "bce"),
    ("train", "optimizer"): ("adamw", "adam"),
    ("train", "sampler"): ("balanced", "shuffle", "diverse"),
}


TASKS = ("classify", "detect")
THRESHOLD_RULES = ("auto", "oof")  # a threshold chosen from predictions instead of given


def fixed_threshold(t: TrainConfig) -> float:
    """The threshold before any is chosen: the given number, or 0.5 where a rule picks it later."""
    return 0.5 if t.threshold in THRESHOLD_RULES else float(t.threshold)


def validate_config(cfg: Config) -> None:
    _check_finite(cfg, "config")
    validate_model_config(cfg.model)
    if cfg.model.center_crop > cfg.data.patch_size:
        raise MitotypeError(f"config model.center_crop: {cfg.model.center_crop} px is larger than data.patch_size {cfg.data.patch_size}")
    cfg.augment.__post_init__()  # the augmentation config checks its own ranges
    for (section, name), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise MitotypeError(f"config {section}.{name}: '{value}' is not one of {', '.join(choices)}")
    if isinstance(cfg.train.threshold, str) and cfg.train.threshold not in THRESHOLD_RULES:
        raise MitotypeError(f"config train.threshold: '{cfg.train.threshold}' must be a number in (0, 1), 'auto' or 'oof'")
    if isinstance(cfg.train.threshold, float) and not 0 < cfg.train.threshold < 1:
        raise MitotypeError(f"config train.threshold: {cfg.train.threshold} must be in (0, 1)")
    ranges = {
        "train.epochs": (1, None), "train.batch_size": (1, None), "train.diverse_clusters": (1, 1000), "train.eval_batch_size": (1, None),
        "train.lr": (1e-12, None), "train.weight_decay": (0, None), "train.warmup_epochs": (0, None),
        "train.min_lr_ratio": (0, 1), "train.patience": (0, None), "train.grad_clip": (0, None),
        "train.backbone_lr_scale": (0, None), "train.ema_decay": (0, 0.999999), "loss.label_smoothing": (0, 0.999), "loss.focal_alpha": (0, 1),
        "loss.incdp_weight": (0, 100),
        "loss.heatmap_sigma_um": (0.1, 20),
        "loss.focal_gamma": (0, None), "model.input_size": (8, None), "data.patch_size": (8, None),
        "model.drop_rate": (0, 0.999), "model.drop_path_rate": (0, 0.999), "model.freeze_groups": (0, None),
    }
    for key, (lo, hi) in ranges.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not math.isfinite(value) or value < lo or (hi is not None and value > hi):
            raise MitotypeError(f"config {key}: {value} is out of range ({lo} .. {hi if hi is not None else 'inf'})")
    if cfg.task not in TASKS:
        raise MitotypeError(f"config task: '{cfg.task}' is not one of {', '.join(TASKS)}")
    validate_candidates(cfg.candidates)
    if not 0 <= cfg.data.val_fraction < 1:
        raise MitotypeError("config data.val_fraction: must be in [0, 1)")
    if not cfg.data.stratify or len(set(cfg.data.stratify)) != len(cfg.data.stratify) or not all(cfg.data.stratify):
        raise MitotypeError(f"config data.stratify: {cfg.data.stratify} must be distinct manifest column names, e.g. [label, hard]")


def validate_candidates(c: CandidateConfig, where: str = "config candidates") -> None:
    """Ranges of the candidate finder's settings (also checked when a detector's card is read)."""
    limits = {"sigma_um": (0.0, 10.0), "min_od": (0.0, 5.0), "min_distance_um": (0.0, 50.0), "nms_um": (0.0, 100.0),
              "radius_um": (0.1, 100.0), "negatives_per_figure": (0, 10_000), "recentre_fraction": (0.0, 1.0),
              "recentre_um": (0.5, 50.0), "grid_um": (0.0, 2.0)}
    for name, (lo, hi) in limits.items():
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not lo <= value <= hi:
            raise MitotypeError(f"{where}.{name}: {value!r} is out of range ({lo} .. {hi})")


def _check_finite(value: Any, where: str) -> None:
    """Every float anywhere in the config is finite: a config built in Python skips :func:`_coerce`."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _check_finite(getattr(value, f.name), f"{where}.{f.name}" if where != "config" else f"config {f.name}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise MitotypeError(f"{where}: {value} is not a finite number")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def record_config(path: Path, cfg: Config, resume: bool) -> None:
    """Write a run's config.yaml; on resume refuse a changed one, since a resumed run must end as
    the uninterrupted run would (only the device may change)."""
    from mitotype._io import write_text

    if resume and path.is_file():
        changed = config_change(path, cfg)
        if changed:
            raise MitotypeError(f"{path}: {{resume}} with a changed config ({changed}); resume with the original settings or start a new run",
                                options=("resume",))
        return
    write_text(path, dump_config(cfg))


def config_change(path: Path, cfg: Config) -> str:
    """The first field (``section.field``) where the run's saved config.yaml differs from ``cfg``, or
    "": what decides whether a run may be resumed or reused. The device does not count: where it
    ran does not change what it learned."""
    old, new = (yaml.safe_load(text) or {} for text in (path.read_text(), dump_config(cfg)))
    for values in (old, new):
        values.get("train", {}).pop("device", None)
    _drop_new_defaults(old, new, yaml.safe_load(dump_config(Config())))
    return first_difference(old, new)


def _drop_new_defaults(old: dict, new: dict, defaults: dict) -> None:
    """Remove from ``new`` the sections and fields added since the run was made (absent from ``old``)
    that hold their default: a newer mitotype's options, left alone, change nothing it learned."""
    for key in set(new) - set(old):
        if isinstance(defaults, dict) and key in defaults and new[key] == defaults[key]:
            del new[key]
    for key in set(new) & set(old):
        if isinstance(new[key], dict) and isinstance(old[key], dict):
            _drop_new_defaults(old[key], new[key], defaults.get(key, {}) if isinstance(defaults, dict) else {})


def first_difference(old: Any, new: Any, where: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = first_difference(old.get(key), new.get(key), f"{where}.{key}".lstrip("."))
            if found:
                return found
        return ""
    return "" if old == new else f"{where}: {old!r} -> {new!r}"


def resolve_device(name: str = "auto") -> "torch.device":
    """The torch device an option names (auto: CUDA when present); one line naming the option otherwise."""
    import torch  # here, not at the top: reading a config must not load torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MitotypeError(f"device '{name}': expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MitotypeError(f"device '{name}': CUDA is not available on this machine (use device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MitotypeError(f"device '{name}': this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise MitotypeError(f"device '{name}': expected auto, cpu, cuda or cuda:N")
    return device
