"""The model card: what builds the model, kept apart from how it was made.

``build`` holds only what is needed to rebuild the network and feed it (architecture, backbone,
heads and their reduction, input size, normalisation per view, patch size, microns per pixel), as
timm's ``config.json`` does; ``provenance`` holds the training config, data, command and metrics.
Loading reads ``build`` alone, so a card keeps loading after the training config changes. A card is
input like any other: every field read is checked (type, range, finite, length) and a bad one is a
one-line error naming the card and the field.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from mitotype.config import REDUCTIONS, SIZE_POLICIES, TASKS, CandidateConfig, HeadConfig, ModelConfig, validate_candidates, validate_model_config
from mitotype.errors import MitotypeError

CARD_FORMAT = "mitotype-model/2"
OLD_FORMATS = ("mitotype-model/1",)
DETECTOR_KINDS = ("candidates", "heatmap")  # build.detector of a task: detect card
BUILD_MODEL_FIELDS = ("arch", "backbone", "input_size", "center_crop", "drop_rate", "drop_path_rate", "kwargs", "options", "reduce", "reduce_heads")


def build_spec(model_cfg: ModelConfig, *, mean: tuple, std: tuple, patch_size: int, size_policy: str, mpp: float | None,
               task: str = "classify", candidates: CandidateConfig | None = None, detector: str = "candidates") -> dict[str, Any]:
    """The ``build`` section of a card for a model made from ``model_cfg``; a detector's also says which
    kind it is (``detector``: ``candidates``, a classifier of patches at haematoxylin candidates, or
    ``heatmap``, a dense map of figure centres) and holds its candidate settings, which are part of
    what it is (the weights were trained on those candidates; a heat-map detector uses ``nms_um``)."""
    spec: dict[str, Any] = {name: getattr(model_cfg, name) for name in BUILD_MODEL_FIELDS}
    spec["heads"] = [dict(vars(h)) for h in model_cfg.heads]
    spec["views"] = {"image": {"input": "RGB uint8 / 255, resized to input_size inside the model", "mean": list(mean), "std": list(std)}}
    spec.update(patch_size=patch_size, size_policy=size_policy, mpp=mpp)
    spec["pretrained"] = model_cfg.pretrained  # the weight source: what a model whose card names its backbone rebuilds it from
    spec["task"] = task
    if task == "detect":
        spec["candidates"] = dataclasses.asdict(candidates or CandidateConfig())
        spec["detector"] = detector
    return spec


def read_card(card: Any, path: Path) -> dict[str, Any]:
    """Check a card read from ``path`` and return it in the current format (older formats converted)."""
    check = _Checker(path)
    if not isinstance(card, dict):
        check.fail("(top level)", "expected a JSON object")
    fmt = card.get("format")
    if fmt in OLD_FORMATS:
        card = _from_v1(card, check)
    elif fmt != CARD_FORMAT:
        raise MitotypeError(f"{path}: not a mitotype model card (format {fmt!r}; expected {CARD_FORMAT})")
    build = check.mapping(card, "build")
    check.number(card, "threshold", lo=0, hi=1, open_interval=True)
    names = check.get(card, "class_names")
    if not (isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) and n for n in names)):
        check.fail("class_names", f"expected two class names [normal, atypical], got {names!r}")
    for name in ("arch", "backbone"):
        check.text(build, name, "build")
    check.integer(build, "input_size", "build", lo=8, hi=4096)
    check.integer(build, "patch_size", "build", lo=8, hi=4096)
    if check.integer(build, "center_crop", "build", lo=0, hi=build["patch_size"]) in range(1, 8):
        check.fail("build.center_crop", "must be 0 (off) or at least 8 px")
    check.number(build, "drop_rate", "build", lo=0, hi=1)
    check.number(build, "drop_path_rate", "build", lo=0, hi=1)
    check.text(build, "size_policy", "build", choices=SIZE_POLICIES)
    check.text(build, "reduce", "build", choices=REDUCTIONS)
    _check_task(build, check)
    if build.get("mpp") is not None:
        check.number(build, "mpp", "build", lo=0, hi=100, open_interval=True)
    check.mapping(build, "kwargs", "build")
    build.setdefault("options", {})  # cards written before model.options existed
    build.setdefault("pretrained", "none")  # cards written before the weight source was in build
    check.text(build, "pretrained", "build")
    check.mapping(build, "options", "build")
    reduce_heads = check.get(build, "reduce_heads", "build")
    if not (isinstance(reduce_heads, list) and all(isinstance(n, str) for n in reduce_heads)):
        check.fail("build.reduce_heads", f"expected a list of head names, got {reduce_heads!r}")
    heads = check.get(build, "heads", "build")
    if not isinstance(heads, list) or not heads:
        check.fail("build.heads", f"expected a non-empty list of heads, got {heads!r}")
    for i, head in enumerate(heads):
        where = f"build.heads[{i}]"
        if not isinstance(head, dict):
            check.fail(where, f"expected an object, got {head!r}")
        check.text(head, "name", where)
        check.text(head, "target", where)
        check.integer(head, "num_classes", where, lo=1, hi=1000)  # 1: one binary logit
        check.number(head, "weight", where, lo=0, hi=1e6)
        positive = check.get(head, "positive", where)
        if not (isinstance(positive, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in positive)):
            check.fail(f"{where}.positive", f"expected a list of class indices, got {positive!r}")
    image = check.mapping(check.mapping(build, "views", "build"), "image", "build.views")
    for stat in ("mean", "std"):
        values = check.get(image, stat, "build.views.image")
        ok = isinstance(values, list) and len(values) == 3 and all(_finite(v) for v in values)
        if not ok or (stat == "std" and min(values) <= 0):
            check.fail(f"build.views.image.{stat}", f"expected 3 finite numbers{' > 0' if stat == 'std' else ''}, got {values!r}")
    try:
        validate_model_config(model_config(card), where=f"{path}: build")
    except MitotypeError as err:
        raise MitotypeError(str(err)) from None
    card.setdefault("provenance", {})
    return card


def model_config(card: dict[str, Any]) -> ModelConfig:
    """The ModelConfig that rebuilds a (checked) card's network, nothing frozen; ``pretrained`` is the card's
    weight source, which builders use with ``create_model(..., pretrained=False)`` only for weights the
    saved state leaves out (a foundation model's backbone)."""
    build = card["build"]
    fields = {name: build[name] for name in BUILD_MODEL_FIELDS}
    heads = [HeadConfig(**{k: h[k] for k in ("name", "target", "num_classes", "weight", "positive")}) for h in build["heads"]]
    return ModelConfig(**fields, heads=heads, pretrained=build["pretrained"], freeze_groups=0)


def _from_v1(card: dict[str, Any], check: "_Checker") -> dict[str, Any]:
    """mitotype-model/1 kept the whole training config; take only what builds the model from it."""
    config = check.mapping(card, "config")
    model = check.mapping(config, "model", "config")
    prep = check.mapping(card, "preprocessing")
    heads = check.mapping(card, "heads")
    defaults = ModelConfig()
    build = {name: model.get(name, getattr(defaults, name)) for name in BUILD_MODEL_FIELDS}  # absent then: defaults
    build["heads"] = [{"name": n, "target": (h or {}).get("target", "label"), "num_classes": (h or {}).get("num_classes", 2),
                       "weight": 1.0, "positive": [1]} for n, h in heads.items()]
    build["reduce_heads"] = ["label"] if "label" in heads else [next(iter(heads), "label")]
    build["views"] = {"image": {"mean": prep.get("mean"), "std": prep.get("std")}}
    build.update(patch_size=prep.get("patch_size"), size_policy=prep.get("size_policy", "error"), mpp=None)
    provenance = {"recipe": card.get("recipe"), "config": config, "trained_on": card.get("trained_on", {}), "metrics": card.get("metrics", {})}
    return {"format": CARD_FORMAT, "converted_from": card["format"], "mitotype_version": card.get("mitotype_version"),
            "created": card.get("created"), "build": build, "class_names": card.get("class_names"),
            "positive_class": card.get("positive_class", "atypical"), "threshold": card.get("threshold"), "provenance": provenance}


def class_names(task: str) -> list[str]:
    """The two classes a model of ``task`` tells apart, negative first."""
    return ["look-alike", "mitosis"] if task == "detect" else ["normal", "atypical"]


def _check_task(build: dict[str, Any], check: "_Checker") -> None:
    """``task`` (absent in cards older than detection: classify) and a detector's candidate settings."""
    task = build.setdefault("task", "classify")
    check.text(build, "task", "build", choices=TASKS)
    if task != "detect":
        return
    build.setdefault("detector", "candidates")  # cards written before heat-map detectors
    check.text(build, "detector", "build", choices=DETECTOR_KINDS)
    found = check.mapping(build, "candidates", "build")
    known = {f.name for f in dataclasses.fields(CandidateConfig)}
    unknown = sorted(set(found) - known)
    if unknown:
        check.fail(f"build.candidates.{unknown[0]}", f"unknown setting (known: {', '.join(sorted(known))})")
    try:
        validate_candidates(CandidateConfig(**found), where=f"{check.path}: build.candidates")
    except TypeError as err:
        check.fail("build.candidates", str(err))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Checker:
    """Field checks whose errors name the card file and the field's dotted path."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, message: str) -> None:
        raise MitotypeError(f"{self.path}: field {field}: {message}")

    def get(self, obj: dict, key: str, where: str = "") -> Any:
        if key not in obj:
            self.fail(f"{where}.{key}".lstrip("."), "missing")
        return obj[key]

    def mapping(self, obj: dict, key: str, where: str = "") -> dict:
        value = self.get(obj, key, where)
        if not isinstance(value, dict):
            self.fail(f"{where}.{key}".lstrip("."), f"expected an object, got {value!r}")
        return value

    def text(self, obj: dict, key: str, where: str = "", choices: tuple[str, ...] | None = None) -> str:
        value = self.get(obj, key, where)
        if not isinstance(value, str) or not value or (choices and value not in choices):
            expected = f"one of {', '.join(choices)}" if choices else "a non-empty string"
            self.fail(f"{where}.{key}".lstrip("."), f"expected {expected}, got {value!r}")
        return value

    def integer(self, obj: dict, key: str, where: str = "", *, lo: int, hi: int) -> int:
        value = self.get(obj, key, where)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            self.fail(f"{where}.{key}".lstrip("."), f"expected an integer in {lo}..{hi}, got {value!r}")
        return value

    def number(self, obj: dict, key: str, where: str = "", *, lo: float, hi: float, open_interval: bool = False) -> float:
        value = self.get(obj, key, where)
        inside = _finite(value) and ((lo < value < hi) if open_interval else (lo <= value <= hi))
        if not inside:
            bounds = f"({lo}, {hi})" if open_interval else f"[{lo}, {hi}]"
            self.fail(f"{where}.{key}".lstrip("."), f"expected a finite number in {bounds}, got {value!r}")
        return float(value)
