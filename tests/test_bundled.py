"""The bundled model: a cv run's fold ensemble in half precision, used by predict without --model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from mitotype.config import DEFAULT_RECIPE, load_config
from mitotype.errors import MitotypeError
from mitotype.models import bundled
from mitotype.workflows import bundle
from mitotype.models.artifact import load_ensemble
from conftest import run_cli as cli


@pytest.fixture
def cv_run(shared_cv_run: tuple[Path, Path]) -> tuple[Path, Path]:
    data, run = shared_cv_run
    return run, data


def test_bundle_halves_the_weights_and_keeps_the_cards(cv_run, tmp_path: Path) -> None:
    run, data = cv_run
    info = bundle.bundle_run(run, tmp_path / "b", command="mitotype cv ...")
    assert info["folds"] == 3 and info["weights"] == "float16" and info["command"] == "mitotype cv ..."
    assert info["cv"]["mean"]["balanced_accuracy"] == json.loads((run / "summary.json").read_text())["mean"]["balanced_accuracy"]
    weights = load_file(str(tmp_path / "b" / "fold_1" / "model.safetensors"))
    floats = [v for v in weights.values() if v.is_floating_point()]
    assert floats and all(str(v.dtype) == "torch.float16" for v in floats)
    assert info["bytes"] == sum(p.stat().st_size for p in (tmp_path / "b").rglob("*") if p.is_file() and p.name != "bundle.json")
    models = load_ensemble(tmp_path / "b")
    assert [m.card["provenance"]["bundled_from"] for m in models] == [str(run / f"fold_{k}") for k in range(3)]
    from mitotype.data.images import decode_all
    from mitotype.data.readers import read_dataset

    store, _ = decode_all(read_dataset(data).manifest["path"].tolist(), 32)
    gap = bundle.half_precision_gap(run, tmp_path / "b", store.batch(np.arange(len(store))))
    assert 0 < gap < 1e-2  # halving changes the weights, but the probabilities barely


def test_predict_without_model_uses_the_bundle(cv_run, tmp_path: Path, monkeypatch, capsys) -> None:
    run, data = cv_run
    bundle.bundle_run(run, tmp_path / "b")
    monkeypatch.setattr(bundled, "bundled_model_dir", lambda: tmp_path / "b")
    code, _, err = cli(monkeypatch, capsys, "predict", data, "--out", tmp_path / "p.csv")
    assert code == 0, err
    code, _, err = cli(monkeypatch, capsys, "predict", data, "--model", tmp_path / "b", "--out", tmp_path / "q.csv")
    assert code == 0, err
    p, q = pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "q.csv")
    assert len(p) == 40 and np.allclose(p["p_atypical"], q["p_atypical"])


def test_no_bundle_is_a_one_line_error(monkeypatch, tmp_path: Path) -> None:
    import importlib.resources

    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)
    with pytest.raises(MitotypeError, match="no bundled model; pass a model"):
        bundled.bundled_model_dir()


def test_the_shipped_bundle_is_the_default_recipes_fold_ensemble_within_40_mib() -> None:
    info = bundled.bundle_info()
    folder = bundled.bundled_model_dir()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 40 * 2**20 and info["folds"] == 5 and info["weights"] == "float16"
    models = load_ensemble(folder)
    recipe = load_config(DEFAULT_RECIPE).model  # the bundle is the default recipe's: retrained when the default changes
    assert info["recipe"] == DEFAULT_RECIPE and len(models) == 5 and all(m.threshold == 0.5 for m in models)
    for key in ("backbone", "center_crop", "input_size"):
        assert {m.card["build"][key] for m in models} == {getattr(recipe, key)}, key
    per_fold = [m.card["provenance"]["metrics"]["held_out_fold"]["balanced_accuracy"] for m in models]
    assert per_fold == [f["balanced_accuracy"] for f in info["cv"]["per_fold"]]  # each card carries its fold's measured score


def test_bundle_carries_the_leave_one_source_out_figures_of_the_same_recipe(cv_run, tmp_path: Path) -> None:
    run, _ = cv_run
    recipe = json.loads((run / "summary.json").read_text())["recipe"]
    folds = [{"fold": i, "held_out": name, "n": n, "balanced_accuracy": ba, "roc_auc": 0.8, "sensitivity": 0.7,
              "specificity": 0.9, "f1": 0.5} for i, (name, n, ba) in enumerate((("MIDOG21/Hamamatsu XR", 358, 0.78), ("TUPAC16", 1602, 0.73)))]
    (tmp_path / "loso").mkdir()
    (tmp_path / "loso" / "summary.json").write_text(json.dumps({"recipe": recipe, "group_by": ["domain", "scanner"], "per_fold": folds}))
    info = bundle.bundle_run(run, tmp_path / "b", domain_run=tmp_path / "loso")
    held = info["leave_one_source_out"]
    assert held["group_by"] == ["domain", "scanner"] and held["source_run"] == str(tmp_path / "loso")
    assert held["per_source"] == {"MIDOG21/Hamamatsu XR": {"n": 358, "balanced_accuracy": 0.78, "roc_auc": 0.8, "sensitivity": 0.7,
                                                           "specificity": 0.9},
                                  "TUPAC16": {"n": 1602, "balanced_accuracy": 0.73, "roc_auc": 0.8, "sensitivity": 0.7, "specificity": 0.9}}
    assert json.loads((tmp_path / "b" / "bundle.json").read_text())["leave_one_source_out"] == held
    (tmp_path / "loso" / "summary.json").write_text(json.dumps({"recipe": "other", "group_by": ["domain"], "per_fold": folds}))
    with pytest.raises(MitotypeError, match=r"loso: not a leave-one-source-out run \(--group-by\) of recipe"):
        bundle.bundle_run(run, tmp_path / "c", domain_run=tmp_path / "loso")
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.staging").exists()


def test_bundle_with_oof_thresholds_gives_each_fold_the_best_threshold_of_the_other_folds(cv_run, tmp_path: Path) -> None:
    from mitotype.evaluation.metrics import best_threshold, binary_metrics
    from mitotype.models.ensemble import Ensemble

    run, _ = cv_run
    oof = pd.read_csv(run / "oof_predictions.csv")
    y, p, fold = oof["label"].to_numpy(), oof["p_atypical"].to_numpy(), oof["fold"].to_numpy()
    want = [best_threshold(y[fold != k], p[fold != k]) for k in range(3)]
    assert len(set(want)) > 1  # the tiny folds disagree, so a fold-mixing bug shows
    info = bundle.bundle_run(run, tmp_path / "b", oof_thresholds=True)
    models = load_ensemble(tmp_path / "b")
    assert [m.threshold for m in models] == pytest.approx(want)
    assert all("other folds" in m.card["provenance"]["threshold_rule"] for m in models)
    at = info["cv_at_oof_thresholds"]
    assert at["thresholds"] == pytest.approx({f"fold_{k}": want[k] for k in range(3)})
    held = [binary_metrics(y[fold == k], p[fold == k], want[k])["balanced_accuracy"] for k in range(3)]
    assert at["mean"]["balanced_accuracy"] == pytest.approx(np.mean(held))
    assert Ensemble.load(tmp_path / "b").threshold == pytest.approx(at["ensemble_threshold"])
    assert [m.threshold for m in load_ensemble(run)] == [0.5] * 3  # the source run is left as it was


def test_the_shipped_detector_is_the_heat_map_within_20_mib_at_its_chosen_threshold() -> None:
    """Issue 19: the better shape ships (the heat map, by the comparison in RESULTS.md), under 20 MB,
    with the threshold chosen on training-fold mosaics and its held-out figures in bundle.json."""
    from mitotype.inference.detect import Detector, HeatmapDetector
    from mitotype.models.bundled import bundled_detector_dir

    root = bundled_detector_dir()
    info = json.loads((root / "bundle.json").read_text())
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) <= 20 * 2**20
    assert info["recipe"] == "detector-heatmap-lite0" and info["weights"] == "float16"
    det = Detector.load(root, device="cpu")
    assert isinstance(det, HeatmapDetector) and det.ensemble.task == "detect"
    assert det.threshold == pytest.approx(info["evaluation"]["threshold_choice"]["threshold"])
    assert det.threshold == pytest.approx(info["evaluation"]["held_out_mosaics"]["detector_threshold"])
