"""``mitotype recipes``: what ships, read from the packaged YAML files each time (like timm's ``list_models``).

Nothing here names a recipe: whatever ``config.packaged_recipes()`` finds is listed, so a recipe added
by dropping a YAML into ``mitotype/configs`` shows up at once. A file that does not load is listed as
an error row naming the file and the first problem, instead of hiding the other recipes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from mitotype.config import ModelConfig, load_config, packaged_recipes
from mitotype.models.lite_weights import LITE_VARIANTS

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

WEIGHT_KINDS = ("offline", "hub", "file", "none")  # plus "error" for a recipe that does not load


@dataclass(frozen=True)
class RecipeRow:
    name: str
    description: str
    arch: str
    backbone: str
    input_size: int | None
    weights: str  # offline | hub | file | none | error (or the unknown pretrained value itself)
    source: str  # the package, hub name or file the weights come from ("" for none)
    error: str = ""  # why the YAML did not load

    def as_dict(self) -> dict:
        return asdict(self)


def weight_source(model: ModelConfig) -> tuple[str, str]:
    """(kind, where) the starting weights come from: ``offline`` (the imagenet-lite* packages), ``hub`` (``hub``, an
    ``hf-hub:`` name, or ``imagenet`` for a backbone without an offline package: from scratch when offline), ``file``, ``none``."""
    pretrained, backbone = model.pretrained, model.backbone
    offline = {arch: variant for variant, arch in LITE_VARIANTS.items()}
    if pretrained in LITE_VARIANTS:
        return "offline", pretrained
    if pretrained == "imagenet":
        return ("offline", offline[backbone]) if backbone in offline else ("hub", f"timm {backbone} ImageNet (none offline)")
    if pretrained == "hub":
        return "hub", backbone
    if pretrained.startswith("file:"):
        return "file", pretrained[5:]
    if pretrained == "none":
        return "none", ""
    return pretrained, pretrained  # a source added after this listing: shown as it is, never guessed


def recipe_row(name: str, path: Traversable) -> RecipeRow:
    """One recipe's row; loading errors of any kind become an error row (the listing must survive them)."""
    try:
        cfg = load_config(str(path))
    except Exception as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        return RecipeRow(name, "", "", "", None, "error", "", f"{path.name}: {first}")
    kind, where = weight_source(cfg.model)
    return RecipeRow(name, cfg.description, cfg.model.arch, cfg.model.backbone, cfg.model.input_size, kind, where)


def list_recipes(recipes: dict[str, Traversable] | None = None) -> list[RecipeRow]:
    """Every packaged recipe (or the given name -> YAML mapping), sorted by name."""
    found = packaged_recipes() if recipes is None else recipes
    return [recipe_row(name, found[name]) for name in sorted(found)]
