"""The model card: build spec apart from provenance, old cards load, every field read is checked."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mitotype.config import load_config
from mitotype.errors import MitotypeError
from mitotype.models.artifact import CARD_NAME, add_card_metrics, load_model, save_model
from mitotype.models.registry import create_model

X = {"image": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))}


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.input_size=32", "data.patch_size=32", "data.mpp=0.25",
                             "model.heads=[{name: label}, {name: hard, target: hard}]", "model.center_crop=24"])
    model = create_model(cfg.model).eval()
    save_model(model, cfg, tmp_path / "m", threshold=0.4, trained_on={"n": 5}, metrics={"validation": {"n": 3}})
    with torch.no_grad():
        return tmp_path / "m", model.p_atypical(model(X))


def _p(folder: Path) -> torch.Tensor:
    loaded = load_model(folder)
    with torch.no_grad():
        return loaded.model.p_atypical(loaded.model(X))


def _edit(folder: Path, change) -> None:
    card = json.loads((folder / CARD_NAME).read_text())
    change(card)
    (folder / CARD_NAME).write_text(json.dumps(card))


def test_card_separates_build_from_provenance(saved) -> None:
    folder, _ = saved
    card = json.loads((folder / CARD_NAME).read_text())
    assert card["format"] == "mitotype-model/2"
    build = card["build"]
    assert build["backbone"] == "test_efficientnet" and build["input_size"] == 32 and build["center_crop"] == 24
    assert [h["name"] for h in build["heads"]] == ["label", "hard"] and build["reduce_heads"] == ["label"]
    assert build["patch_size"] == 32 and build["mpp"] == 0.25 and len(build["views"]["image"]["mean"]) == 3
    assert "config" not in build and card["provenance"]["config"]["train"]["lr"] == pytest.approx(1e-3)
    assert card["provenance"]["metrics"] == {"validation": {"n": 3}}
    add_card_metrics(folder, "held_out_fold", {"n": 7})
    assert load_model(folder).card["provenance"]["metrics"]["held_out_fold"] == {"n": 7}


def test_a_card_with_unknown_or_removed_training_keys_still_loads(saved) -> None:
    folder, p = saved

    def rename(card):
        card["provenance"]["config"]["train"]["renamed_later"] = card["provenance"]["config"]["train"].pop("lr")
        card["provenance"]["config"]["gone_section"] = {"x": 1}

    _edit(folder, rename)
    assert torch.allclose(_p(folder), p, atol=1e-6)


def test_an_old_format_card_loads_and_predicts_the_same(saved) -> None:
    folder, p = saved

    def to_v1(card):
        build, prov = card.pop("build"), card.pop("provenance")
        config = dict(prov["config"])
        config["model"] = {k: v for k, v in config["model"].items() if k not in ("heads", "reduce", "reduce_heads", "kwargs")}
        config["train"]["a_key_from_the_future"] = 1
        card.update(format="mitotype-model/1", recipe="default", config=config, trained_on=prov["trained_on"], metrics={},
                    heads={h["name"]: {"target": h["target"], "num_classes": h["num_classes"]} for h in build["heads"]},
                    preprocessing={"patch_size": 32, "size_policy": "error", "input_size": 32,
                                   "mean": build["views"]["image"]["mean"], "std": build["views"]["image"]["std"]})

    _edit(folder, to_v1)
    loaded = load_model(folder)
    assert loaded.card["converted_from"] == "mitotype-model/1" and loaded.threshold == pytest.approx(0.4)
    assert torch.allclose(_p(folder), p, atol=1e-6)


BAD_FIELDS = [
    (lambda c: c.update(threshold="high"), r"field threshold: expected a finite number in \(0, 1\)"),
    (lambda c: c.update(threshold=float("nan")), "field threshold"),
    (lambda c: c.update(threshold=1.5), "field threshold"),
    (lambda c: c.pop("threshold"), "field threshold: missing"),
    (lambda c: c.update(class_names=["normal"]), "field class_names"),
    (lambda c: c["build"].update(input_size="128"), "field build.input_size: expected an integer"),
    (lambda c: c["build"].update(input_size=True), "field build.input_size"),
    (lambda c: c["build"].update(patch_size=-3), "field build.patch_size"),
    (lambda c: c["build"].update(center_crop=5), "field build.center_crop"),
    (lambda c: c["build"].update(size_policy="stretch"), "field build.size_policy: expected one of error, center-crop, resize"),
    (lambda c: c["build"].update(mpp=0), "field build.mpp"),
    (lambda c: c["build"].update(drop_rate=float("inf")), "field build.drop_rate"),
    (lambda c: c["build"]["views"]["image"].update(mean=[0.5, 0.5]), "field build.views.image.mean: expected 3 finite numbers"),
    (lambda c: c["build"]["views"]["image"].update(std=[0.5, 0.0, 0.5]), "field build.views.image.std: expected 3 finite numbers > 0"),
    (lambda c: c["build"]["views"]["image"].update(std=[0.5, None, 0.5]), "field build.views.image.std"),
    (lambda c: c["build"]["heads"][0].update(num_classes="2"), r"field build.heads\[0\].num_classes"),
    (lambda c: c["build"]["heads"][0].update(positive=[5]), r"build.heads\[0\].positive"),
    (lambda c: c["build"].update(heads=[]), "field build.heads: expected a non-empty list"),
    (lambda c: c["build"].update(reduce_heads=["nope"]), "reduce_heads"),
    (lambda c: c["build"].update(reduce="max"), "field build.reduce"),
    (lambda c: c["build"].update(arch="evil"), "'evil' is not a registered model"),
    (lambda c: c["build"].update(backbone="no_such_net"), "'no_such_net' is not a timm model name"),
    (lambda c: c["build"].update(kwargs=[1]), "field build.kwargs: expected an object"),
    (lambda c: c.update(format="something/9"), "not a mitotype model card"),
    (lambda c: c.pop("build"), "field build: missing"),
]


@pytest.mark.parametrize("change, message", BAD_FIELDS)
def test_every_card_field_is_checked_with_a_one_line_error(saved, change, message: str) -> None:
    folder, _ = saved
    _edit(folder, change)
    with pytest.raises(MitotypeError, match=message) as info:
        load_model(folder)
    assert str(folder / CARD_NAME) in str(info.value) and "\n" not in str(info.value)


def test_a_bad_card_through_the_cli_exits_2_naming_the_field(saved, tmp_path: Path) -> None:
    folder, _ = saved
    _edit(folder, lambda c: c["build"].update(input_size=[128]))
    (tmp_path / "imgs").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    run = subprocess.run([sys.executable, "-m", "mitotype", "predict", str(tmp_path / "imgs"), "--model", str(folder),
                          "--out", str(tmp_path / "p.csv")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and "field build.input_size" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "p.csv").exists()


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.input_size=32", "data.patch_size=32"])
    model = create_model(cfg.model)
    with torch.no_grad():
        model.heads["label"].weight[0, 0] = math.nan
    with pytest.raises(MitotypeError, match="not finite .*heads.label.weight.*not saved"):
        save_model(model, cfg, tmp_path / "m", threshold=0.5, trained_on={}, metrics={})
    assert not (tmp_path / "m" / CARD_NAME).exists()


def test_a_diverged_run_stops_with_one_line_and_saves_no_model(amibr: Path, tiny: list[str], tmp_path: Path, monkeypatch) -> None:
    from mitotype.training.losses import HeadLoss
    from mitotype.workflows.runs import load_dataset, train

    real = HeadLoss.forward
    monkeypatch.setattr(HeadLoss, "forward", lambda self, o, t: real(self, o, t) * float("nan"))
    cfg = load_config(None, tiny)
    with pytest.raises(MitotypeError, match="training diverged in epoch 1 .*lower train.lr"):
        train(cfg, load_dataset(amibr, cfg), tmp_path / "run")
    assert not (tmp_path / "run" / CARD_NAME).exists() and not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
