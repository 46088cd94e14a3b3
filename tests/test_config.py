from __future__ import annotations

from pathlib import Path

import pytest

from mitotype.config import CONFIG_DIR, config_from_dict, dump_config, load_config
from mitotype.errors import MitotypeError


def test_every_shipped_recipe_loads() -> None:
    recipes = sorted(CONFIG_DIR.glob("**/*.yaml"))
    assert recipes, "configs/ holds the named recipes"
    for path in recipes:
        cfg = load_config(str(path))
        assert cfg.recipe == path.stem


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
    from mitotype.inference.engine import resolve_device

    with pytest.raises(MitotypeError, match="expected auto, cpu, cuda"):
        resolve_device("gpu")
    assert resolve_device("cpu").type == "cpu"
