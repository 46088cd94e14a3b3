from __future__ import annotations

from pathlib import Path

import pytest

from mitotype.config import config_from_dict, dump_config, load_config, packaged_recipes
from mitotype.errors import MitotypeError


def test_every_shipped_recipe_loads_by_name_and_experiments_by_path() -> None:
    recipes = packaged_recipes()
    assert "lite0-quick" in recipes, "the package ships its named recipes"
    for name in recipes:
        assert load_config(name).recipe == name
    experiments = sorted((Path(__file__).parents[1] / "configs" / "experiments").glob("*.yaml"))
    for path in experiments:
        assert load_config(str(path)).recipe == path.stem


def test_recipes_resolve_from_the_package_not_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here: the name must come from the installed package
    assert load_config("lite0-quick").model.pretrained == "imagenet-lite0"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text("train:\n  epochs: 3\n")
    assert load_config("mine").train.epochs == 3  # a project's own configs/ folder also works
    with pytest.raises(MitotypeError, match="known recipes: .*lite0-quick"):
        load_config("no-such-recipe")


def test_heads_are_configuration() -> None:
    cfg = load_config(None, ["model.heads=[{name: label}, {name: e1, target: expert_1, weight: 0.5}]", "model.reduce_heads=[label, e1]"])
    assert [(h.name, h.target, h.weight, h.positive) for h in cfg.model.heads] == [("label", "label", 1.0, [1]), ("e1", "expert_1", 0.5, [1])]
    for override, message in [
        ("model.heads=[{name: a}, {name: a}]", "head names must be unique"),
        ("model.reduce_heads=[nope]", "must name some of the heads"),
        ("model.heads=[{name: label, num_classes: 0}]", "num_classes: 0 must be 1 .one logit: binary. or at least 2"),
        ("model.heads=[{name: label, num_classes: 1, positive: [2]}]", r"positive: \[2\] must be distinct class indices in 0..1"),
        ("model.heads=[{name: label, positive: [2]}]", "positive"),
        ("model.heads=[{name: label, weight: -1}]", "weight"),
        ("model.heads=[{nmae: x}]", "unknown config key 'nmae'"),
        ("model.reduce=max", "reduce: 'max' is not one of mean"),
        ("model.center_crop=200", "center_crop: 200 px is larger than data.patch_size 128"),
        ("model.center_crop=4", "center_crop: 4 must be 0"),
    ]:
        with pytest.raises(MitotypeError, match=message):
            load_config(None, [override])


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config("lite0-quick", ["train.lr=3e-4", "train.epochs=2", "augment.crop_scale=[0.8, 1.0]", "model.pretrained=none"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.epochs == 2
    assert cfg.augment.crop_scale == (0.8, 1.0)
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0  # an int where a float is expected


def test_saved_config_roundtrips() -> None:
    import yaml

    cfg = load_config("lite0-quick", ["train.threshold=auto"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'lrr'"),
        ("optim.lr=1", "unknown config key 'optim'"),
        ("train.epochs=many", "expected int"),
        ("train.sampler=weird", "not one of balanced, shuffle"),
        ("augment.hue=0.9", "augment.hue must be in"),
        ("train.threshold=1.5", "must be in"),
        ("train.threshold=best", r"'best' must be a number in \(0, 1\), 'auto' or 'oof'"),
        ("noequals", "section.field=value"),
        ("loss.label_smoothing=1.5", "out of range"),
        ("train.lr=-1", "out of range"),
        ("model.input_size=0", "out of range"),
        ("loss.focal_alpha=3", "out of range"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(MitotypeError, match=message):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 3\n  warmup: 1\n")
    with pytest.raises(MitotypeError, match=r"bad.yaml: train: unknown config key 'warmup'"):
        load_config(str(path))


def test_missing_recipe_lists_known_ones() -> None:
    with pytest.raises(MitotypeError, match="known recipes: .*lite0-quick"):
        load_config("no-such-recipe")


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    from mitotype.config import record_config

    cfg = load_config("lite0-quick")
    record_config(tmp_path / "config.yaml", cfg, resume=False)
    record_config(tmp_path / "config.yaml", load_config("lite0-quick", ["train.device=cpu"]), resume=True)  # device may change
    with pytest.raises(MitotypeError, match=r"changed config \(train.epochs: 6 -> 9\)"):
        record_config(tmp_path / "config.yaml", load_config("lite0-quick", ["train.epochs=9"]), resume=True)


def test_bad_device_names_are_one_line() -> None:
    from mitotype.config import resolve_device

    with pytest.raises(MitotypeError, match="expected auto, cpu, cuda"):
        resolve_device("gpu")
    assert resolve_device("cpu").type == "cpu"


def test_an_override_of_one_option_keeps_the_recipes_other_options(tmp_path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  options: {neck_dim: 512, se_reduction: 8}\n  kwargs: {in_chans: 3}\n")
    cfg = load_config(str(recipe), ["model.options.neck_dim=256", "model.kwargs.drop_block_rate=0.1"])
    assert cfg.model.options == {"neck_dim": 256, "se_reduction": 8}
    assert cfg.model.kwargs == {"in_chans": 3, "drop_block_rate": 0.1}
