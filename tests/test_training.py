from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mitotype.config import LossConfig, load_config
from mitotype.errors import MitotypeError
from mitotype.models.registry import Head
from mitotype.training.checkpoint import load_checkpoint
from mitotype.training.loop import Interrupted, epoch_order, fit
from mitotype.training.losses import HeadLoss, focal_loss
from mitotype.workflows.runs import cross_validate, load_dataset, train
from mitotype.training.schedule import WarmupCosine


def test_focal_loss_reduces_to_weighted_ce_and_downweights_easy() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.1, 0.3], [-3.0, 3.0]])
    target = torch.tensor([0, 1, 1])
    ce = F.cross_entropy(logits, target)
    assert focal_loss(logits, target, alpha=0.5, gamma=0.0) == pytest.approx(0.5 * ce.item(), rel=1e-6)
    per_ce = F.cross_entropy(logits, target, reduction="none")
    easy_ratio = focal_loss(logits[2:], target[2:], 0.5, 2.0) / (0.5 * per_ce[2])
    hard_ratio = focal_loss(logits[1:2], target[1:2], 0.5, 2.0) / (0.5 * per_ce[1])
    assert easy_ratio < hard_ratio < 1


def test_balanced_sampler_draws_classes_equally() -> None:
    labels = np.array([1] * 100 + [0] * 900)
    order = epoch_order(labels, "balanced", torch.Generator().manual_seed(0))
    assert len(order) == 1000 and 0.45 < labels[order].mean() < 0.55
    shuffled = epoch_order(labels, "shuffle", torch.Generator().manual_seed(0))
    assert sorted(shuffled) == list(range(1000))


def test_warmup_then_cosine() -> None:
    f = WarmupCosine(warmup_steps=10, total_steps=110, min_ratio=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.505, abs=1e-3) and f(110) == pytest.approx(0.01)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def _data(amibr: Path, tiny: list[str], *extra: str):
    cfg = load_config(None, tiny + list(extra))
    return cfg, load_dataset(amibr, cfg)


def test_train_writes_a_complete_run_directory(amibr: Path, tiny: list[str], tmp_path: Path) -> None:
    cfg, ds = _data(amibr, tiny, "data.val_fraction=0.25", "train.threshold=auto")
    summary = train(cfg, ds, tmp_path / "run", show_progress=False)
    run = tmp_path / "run"
    for name in ("config.yaml", "manifest.csv", "history.csv", "model.json", "model.safetensors", "summary.json", "val_predictions.csv", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert 0 < summary["threshold"] < 1 and "validation" in summary
    state = load_checkpoint(run / "checkpoints" / "last.pt")  # weights_only: loads no code
    assert state["epoch"] == 2 and len(state["history"]) == 2
    with pytest.raises(MitotypeError, match="exists and is not empty"):
        train(cfg, ds, run, show_progress=False)


def test_training_is_deterministic_on_cpu(amibr: Path, tiny: list[str], tmp_path: Path) -> None:
    cfg, ds = _data(amibr, tiny, "train.epochs=1")
    idx = np.arange(len(ds.manifest))
    a = fit(cfg, ds.manifest, ds.store, tmp_path / "a", idx, show_progress=False)
    b = fit(cfg, ds.manifest, ds.store, tmp_path / "b", idx, show_progress=False)
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name


def test_resume_ends_exactly_like_an_uninterrupted_run(amibr: Path, tiny: list[str], tmp_path: Path) -> None:
    cfg, ds = _data(amibr, tiny, "train.epochs=3", "model.drop_rate=0.3")
    manifest = ds.manifest
    train_idx, val_idx = np.flatnonzero(np.arange(len(manifest)) % 4 != 0), np.flatnonzero(np.arange(len(manifest)) % 4 == 0)
    whole = fit(cfg, manifest, ds.store, tmp_path / "whole", train_idx, val_idx, show_progress=False)
    with pytest.raises(Interrupted):
        fit(cfg, manifest, ds.store, tmp_path / "cut", train_idx, val_idx, stop_after_epoch=1, show_progress=False)
    assert not (tmp_path / "cut" / "model.json").exists()
    resumed = fit(cfg, manifest, ds.store, tmp_path / "cut", train_idx, val_idx, resume=True, show_progress=False)
    drop = ("train_seconds",)
    strip = lambda h: [{k: v for k, v in r.items() if k not in drop} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    pd.testing.assert_frame_equal(resumed.val_predictions, whole.val_predictions)
    for (name, x), (_, y) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(x, y), name


def _scripted_val_scores(monkeypatch: pytest.MonkeyPatch, scores: list[float]) -> None:
    """The loop's validation balanced accuracy, epoch by epoch, replaced by ``scores``."""
    import mitotype.training.loop as loop

    script, real = iter(scores), loop.binary_metrics

    def scripted(y, p, threshold=0.5):
        metrics = real(y, p, threshold)
        return {**metrics, "balanced_accuracy": next(script, metrics["balanced_accuracy"])}

    monkeypatch.setattr(loop, "binary_metrics", scripted)


def test_early_stopping_stops_after_patience_and_keeps_the_best_epoch(amibr: Path, tiny: list[str], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, ds = _data(amibr, tiny, "train.epochs=8", "train.patience=2", "train.keep_epoch_checkpoints=true")
    idx = np.arange(len(ds.manifest))
    _scripted_val_scores(monkeypatch, [0.5, 0.7, 0.6, 0.7, 0.9, 0.95])  # best at epoch 2; 0.7 again is no gain
    result = fit(cfg, ds.manifest, ds.store, tmp_path / "run", idx[idx % 4 != 0], idx[idx % 4 == 0], show_progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]  # two epochs without gain, then stop
    assert [r["val_balanced_accuracy"] for r in result.history] == [0.5, 0.7, 0.6, 0.7]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("epoch_*")) == [f"epoch_00{e}.safetensors" for e in range(1, 5)]
    from safetensors.torch import load_file

    best = load_file(str(tmp_path / "run" / "checkpoints" / "epoch_002.safetensors"))
    last = load_file(str(tmp_path / "run" / "checkpoints" / "epoch_004.safetensors"))
    final = result.model.state_dict()
    assert all(torch.equal(final[k].cpu(), v) for k, v in best.items())  # the best epoch's weights are the model
    assert not all(torch.equal(final[k].cpu(), v) for k, v in last.items())

    _scripted_val_scores(monkeypatch, [0.5, 0.7, 0.6, 0.7])
    cfg, _ = _data(amibr, tiny, "train.epochs=5", "train.patience=0")  # patience 0: never stop early
    result = fit(cfg, ds.manifest, ds.store, tmp_path / "off", idx[idx % 4 != 0], idx[idx % 4 == 0], show_progress=False)
    assert len(result.history) == 5


def test_cv_writes_oof_predictions_and_resumes_finished_folds(amibr: Path, tiny: list[str], tmp_path: Path) -> None:
    cfg, ds = _data(amibr, tiny, "train.epochs=1")
    summary = cross_validate(cfg, ds, 3, tmp_path / "cv", n_boot=50, show_progress=False)
    oof = pd.read_csv(tmp_path / "cv" / "oof_predictions.csv")
    assert oof["p_atypical"].between(0, 1).all() and set(oof["fold"]) == {0, 1, 2}
    assert oof.groupby("group")["fold"].nunique().max() == 1
    assert len(summary["per_fold"]) == 3 and set(summary["mean"]) >= {"balanced_accuracy", "roc_auc"}
    for name in ("summary.json", "splits.csv", "oof/metrics.json", "oof/roc.png", "fold_2/model.safetensors"):
        assert (tmp_path / "cv" / name).is_file(), name
    card = json.loads((tmp_path / "cv" / "fold_1" / "model.json").read_text())
    assert card["provenance"]["metrics"]["held_out_fold"]["n"] == summary["per_fold"][1]["n"]
    with pytest.raises(MitotypeError, match="--resume with other folds"):
        cross_validate(cfg, ds, 4, tmp_path / "cv", resume=True, n_boot=50, show_progress=False)


def test_train_with_a_separate_validation_set_and_split_folders(tmp_path: Path, tiny: list[str]) -> None:
    from conftest import write_class_folders

    cfg = load_config(None, tiny + ["train.epochs=1", "train.threshold=auto"])
    data = load_dataset(write_class_folders(tmp_path / "train"), cfg)
    val = load_dataset(write_class_folders(tmp_path / "val", n_atypical=5, n_normal=7, seed=4), cfg)
    summary = train(cfg, data, tmp_path / "run", val=val, show_progress=False)
    assert summary["validation"]["n"] == 12
    preds = pd.read_csv(tmp_path / "run" / "val_predictions.csv")
    assert preds["path"].str.contains("/val/", regex=False).all()
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        write_class_folders(tmp_path / "s" / split, n_atypical=4, n_normal=6, seed=seed)
    with pytest.warns(UserWarning) as caught:  # the synthetic splits share slide names: warned too
        summary = train(cfg, load_dataset(tmp_path / "s", cfg), tmp_path / "run2", show_progress=False)
    assert any("test split set aside" in str(w.message) for w in caught)
    manifest = pd.read_csv(tmp_path / "run2" / "manifest.csv", keep_default_na=False)
    assert set(manifest["split"]) == {"train", "val"} and summary["validation"]["n"] == 10
