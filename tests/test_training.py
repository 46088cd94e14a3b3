from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mitotype.config import LossConfig, load_config
from mitotype.errors import MitotypeError
from mitotype.evaluation.metrics import best_threshold, binary_metrics
from mitotype.models.registry import Head
from mitotype.training.checkpoint import load_checkpoint
from mitotype.training.loop import Interrupted, epoch_order, fit, stop_after
from mitotype.training.losses import MISSING, HeadLoss, class_weights, focal_loss, head_targets
from mitotype.workflows.runs import cross_validate, load_dataset, train
from mitotype.training.schedule import WarmupCosine


# Non-trivial logits for both classes; references are computed with ``math`` from the formulas.
LOGITS = [[2.0, -1.0], [0.1, 0.3], [-3.0, 3.0], [0.5, -0.7], [1.2, 1.0]]
TARGET = [0, 1, 1, 0, 1]


def _log_softmax(row: list[float]) -> list[float]:
    norm = math.log(sum(math.exp(v) for v in row))
    return [v - norm for v in row]


def _focal_reference(logits, target, alpha, gamma, positive=(1,)) -> float:
    """Lin et al. (2017): -alpha_t (1 - p_t)^gamma log p_t, alpha_t = alpha on positive rows, 1 - alpha on the rest."""
    terms = []
    for row, t in zip(logits, target):
        log_pt = _log_softmax(row)[t]
        a = alpha if t in positive else 1 - alpha
        terms.append(-a * (1 - math.exp(log_pt)) ** gamma * log_pt)
    return sum(terms) / len(terms)


def _weighted_ce_reference(logits, target, weight) -> float:
    """PyTorch's weighted mean: sum_i w[t_i] * (-log p_{t_i}) / sum_i w[t_i]."""
    num = sum(weight[t] * -_log_softmax(row)[t] for row, t in zip(logits, target))
    return num / sum(weight[t] for t in target)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.8, 0.0), (0.5, 1.5)])
def test_focal_loss_matches_the_reference_formula_for_both_classes(alpha: float, gamma: float) -> None:
    logits, target = torch.tensor(LOGITS), torch.tensor(TARGET)
    assert focal_loss(logits, target, alpha=alpha, gamma=gamma).item() == pytest.approx(_focal_reference(LOGITS, TARGET, alpha, gamma), rel=1e-5, abs=1e-7)
    for i in range(len(TARGET)):  # row by row: alpha on atypical rows, 1 - alpha on normal ones
        one = focal_loss(logits[i : i + 1], target[i : i + 1], alpha=alpha, gamma=gamma).item()
        assert one == pytest.approx(_focal_reference(LOGITS[i : i + 1], TARGET[i : i + 1], alpha, gamma), rel=1e-5, abs=1e-7), i
    four = [[0.3, -0.2, 1.1, 0.4], [2.0, 0.0, -1.0, 0.5], [-0.5, 0.2, 0.1, 1.7]]
    got = focal_loss(torch.tensor(four), torch.tensor([3, 0, 2]), alpha=alpha, gamma=gamma, positive=[2, 3]).item()
    assert got == pytest.approx(_focal_reference(four, [3, 0, 2], alpha, gamma, positive=(2, 3)), rel=1e-5, abs=1e-7)


def test_focal_loss_downweights_easy_patches() -> None:
    easy, hard = torch.tensor([[-3.0, 3.0]]), torch.tensor([[0.1, 0.3]])
    one = torch.tensor([1])
    ratio = lambda x: focal_loss(x, one, alpha=0.5, gamma=2.0) / focal_loss(x, one, alpha=0.5, gamma=0.0)  # noqa: E731
    assert ratio(easy) < ratio(hard) < 1


def test_class_weighted_cross_entropy_matches_the_reference_formula() -> None:
    heads = {"label": Head("label")}
    train_targets = {"label": torch.tensor([0] * 30 + [1] * 10)}
    assert class_weights(train_targets["label"], 2).tolist() == pytest.approx([40 / 60, 40 / 20])
    assert class_weights(torch.tensor([0, 0, 1, MISSING, MISSING]), 2).tolist() == pytest.approx([3 / 4, 3 / 2])  # missing: not counted
    outputs, targets = {"label": torch.tensor(LOGITS)}, {"label": torch.tensor(TARGET)}
    weighted = HeadLoss(LossConfig(name="ce", class_weights=True), heads, train_targets)(outputs, targets).item()
    assert weighted == pytest.approx(_weighted_ce_reference(LOGITS, TARGET, [40 / 60, 2.0]), rel=1e-5, abs=1e-7)
    plain = HeadLoss(LossConfig(name="ce", class_weights=False), heads, train_targets)(outputs, targets).item()
    assert plain == pytest.approx(_weighted_ce_reference(LOGITS, TARGET, [1.0, 1.0]), rel=1e-5, abs=1e-7)
    assert abs(weighted - plain) > 0.05
    focal = HeadLoss(LossConfig(name="focal", focal_alpha=0.3, focal_gamma=2.0), heads, train_targets)(outputs, targets).item()
    assert focal == pytest.approx(_focal_reference(LOGITS, TARGET, 0.3, 2.0), rel=1e-5, abs=1e-7)
    smooth = HeadLoss(LossConfig(name="ce", label_smoothing=0.2), heads)(outputs, targets).item()
    want = sum(0.8 * -_log_softmax(r)[t] + 0.2 * -sum(_log_softmax(r)) / 2 for r, t in zip(LOGITS, TARGET)) / len(TARGET)
    assert smooth == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_head_loss_weights_heads_reads_their_columns_and_ignores_missing_targets() -> None:
    heads = {"label": Head("label", target="label"), "expert": Head("expert", target="expert1", weight=0.5)}
    outputs = {"label": torch.tensor(LOGITS), "expert": torch.tensor(LOGITS[::-1])}
    expert = [1, MISSING, 0, MISSING, 1]
    loss = HeadLoss(LossConfig(name="ce"), heads)(outputs, {"label": torch.tensor(TARGET), "expert1": torch.tensor(expert)}).item()
    known = [i for i, t in enumerate(expert) if t != MISSING]
    want = _weighted_ce_reference(LOGITS, TARGET, [1, 1]) + 0.5 * _weighted_ce_reference(
        [LOGITS[::-1][i] for i in known], [expert[i] for i in known], [1, 1])
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-7)
    focal = HeadLoss(LossConfig(name="focal", focal_alpha=0.7, focal_gamma=1.0), heads)
    got = focal(outputs, {"label": torch.tensor(TARGET), "expert1": torch.tensor(expert)}).item()
    want = _focal_reference(LOGITS, TARGET, 0.7, 1.0) + 0.5 * _focal_reference(
        [LOGITS[::-1][i] for i in known], [expert[i] for i in known], 0.7, 1.0)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)
    none_known = {"label": torch.tensor(TARGET), "expert1": torch.full((5,), MISSING)}
    assert HeadLoss(LossConfig(name="ce"), heads)(outputs, none_known).item() == pytest.approx(
        _weighted_ce_reference(LOGITS, TARGET, [1, 1]), rel=1e-5, abs=1e-7)  # a head with no target in the batch adds nothing


def test_fit_weights_the_loss_by_the_training_rows_class_counts(amibr: Path, tiny: list[str], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import mitotype.training.objectives as objectives

    built: list[HeadLoss] = []

    class Recorded(HeadLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(objectives, "HeadLoss", Recorded)
    cfg, ds = _data(amibr, tiny, "train.epochs=1", "loss.class_weights=true")
    train_idx = np.flatnonzero(np.arange(len(ds.manifest)) % 5 != 0)
    fit(cfg, ds.manifest, ds.store, tmp_path / "run", train_idx=train_idx, show_progress=False)
    counts = np.bincount(ds.manifest["label"].to_numpy()[train_idx], minlength=2)
    assert built[0].class_weight_label.tolist() == pytest.approx((counts.sum() / (2 * counts)).tolist())
    cfg, _ = _data(amibr, tiny, "train.epochs=1")
    fit(cfg, ds.manifest, ds.store, tmp_path / "plain", train_idx=train_idx, show_progress=False)
    assert built[1].class_weight_label.numel() == 0  # off by default


def test_head_loss_goes_on_past_a_head_without_targets_and_keeps_each_heads_positive_classes() -> None:
    heads = {"expert": Head("expert", target="expert1"), "off": Head("off", target="label", weight=0.0),
             "phase": Head("phase", target="phase", num_classes=4, positive=[2, 3])}
    four = [[0.3, -0.2, 1.1, 0.4], [2.0, 0.0, -1.0, 0.5], [-0.5, 0.2, 0.1, 1.7]]
    outputs = {"expert": torch.tensor(LOGITS[:3]), "off": torch.tensor(LOGITS[:3]), "phase": torch.tensor(four)}
    targets = {"expert1": torch.full((3,), MISSING), "label": torch.tensor([0, 1, 1]), "phase": torch.tensor([3, 0, 2])}
    focal = HeadLoss(LossConfig(name="focal", focal_alpha=0.9, focal_gamma=1.0), heads)
    assert focal(outputs, targets).item() == pytest.approx(_focal_reference(four, [3, 0, 2], 0.9, 1.0, positive=(2, 3)), rel=1e-5)
    ce = HeadLoss(LossConfig(name="ce", class_weights=True), heads, {"expert1": torch.tensor([0, 0, 0]), "label": torch.tensor([0, 1]),
                                                                     "phase": torch.tensor([0, 0, 2, MISSING])})
    assert ce.class_weight_expert.tolist() == pytest.approx([1 / 2, 3 / 2])  # a class absent from training still has its weight
    assert ce.class_weight_phase.tolist() == pytest.approx([3 / 8, 3 / 4, 3 / 4, 3 / 4])
    assert ce.state_dict() == {}  # class weights follow from the data; they are not model state
    assert ce(outputs, targets).item() == pytest.approx(_weighted_ce_reference(four, [3, 0, 2], [3 / 8, 3 / 4, 3 / 4, 3 / 4]), rel=1e-5)


def test_head_targets_mark_missing_values_and_reject_foreign_classes() -> None:
    manifest = pd.DataFrame({"path": [f"p{i}.png" for i in range(4)], "label": [0, 1, 1, 0],
                             "expert1": [1.0, float("nan"), 0.0, -1.0], "phase": [0, 3, 1, 2]})
    heads = {"label": Head("label"), "expert": Head("expert", target="expert1")}
    targets = head_targets(manifest, heads)
    assert targets["label"].tolist() == [0, 1, 1, 0] and targets["expert1"].tolist() == [1, MISSING, 0, MISSING]
    with pytest.raises(MitotypeError, match="value 3 of p1.png"):
        head_targets(manifest, {"phase": Head("phase", target="phase")})
    assert head_targets(manifest, {"phase": Head("phase", target="phase", num_classes=4)})["phase"].tolist() == [0, 3, 1, 2]
    with pytest.raises(MitotypeError, match="reads column 'votes'"):
        head_targets(manifest, {"v": Head("v", target="votes")})


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
    a = fit(cfg, ds.manifest, ds.store, tmp_path / "a", train_idx=idx, show_progress=False)
    b = fit(cfg, ds.manifest, ds.store, tmp_path / "b", train_idx=idx, show_progress=False)
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name


def test_resume_ends_exactly_like_an_uninterrupted_run(amibr: Path, tiny: list[str], tmp_path: Path) -> None:
    cfg, ds = _data(amibr, tiny, "train.epochs=3", "model.drop_rate=0.3")
    manifest = ds.manifest
    train_idx, val_idx = np.flatnonzero(np.arange(len(manifest)) % 4 != 0), np.flatnonzero(np.arange(len(manifest)) % 4 == 0)
    whole = fit(cfg, manifest, ds.store, tmp_path / "whole", train_idx=train_idx, val_idx=val_idx, show_progress=False)
    with pytest.raises(Interrupted):
        fit(cfg, manifest, ds.store, tmp_path / "cut", train_idx=train_idx, val_idx=val_idx, on_epoch=stop_after(1), show_progress=False)
    assert not (tmp_path / "cut" / "model.json").exists()
    resumed = fit(cfg, manifest, ds.store, tmp_path / "cut", train_idx=train_idx, val_idx=val_idx, resume=True, show_progress=False)
    drop = ("train_seconds",)
    strip = lambda h: [{k: v for k, v in r.items() if k not in drop} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    pd.testing.assert_frame_equal(resumed.val_predictions, whole.val_predictions)
    for (name, x), (_, y) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(x, y), name


def _scripted_val_scores(monkeypatch: pytest.MonkeyPatch, scores: list[float]) -> None:
    """The loop's validation balanced accuracy, epoch by epoch, replaced by ``scores``."""
    import mitotype.training.objectives as objectives

    script, real = iter(scores), objectives.binary_metrics

    def scripted(y, p, threshold=0.5):
        metrics = real(y, p, threshold)
        return {**metrics, "balanced_accuracy": next(script, metrics["balanced_accuracy"])}

    monkeypatch.setattr(objectives, "binary_metrics", scripted)


def test_early_stopping_stops_after_patience_and_keeps_the_best_epoch(amibr: Path, tiny: list[str], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, ds = _data(amibr, tiny, "train.epochs=8", "train.patience=2", "train.keep_epoch_checkpoints=true")
    idx = np.arange(len(ds.manifest))
    _scripted_val_scores(monkeypatch, [0.5, 0.7, 0.6, 0.7, 0.9, 0.95])  # best at epoch 2; 0.7 again is no gain
    result = fit(cfg, ds.manifest, ds.store, tmp_path / "run", train_idx=idx[idx % 4 != 0], val_idx=idx[idx % 4 == 0], show_progress=False)
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
    result = fit(cfg, ds.manifest, ds.store, tmp_path / "off", train_idx=idx[idx % 4 != 0], val_idx=idx[idx % 4 == 0], show_progress=False)
    assert len(result.history) == 5


def test_cv_writes_oof_predictions_and_resumes_finished_folds(amibr: Path, tiny: list[str], tmp_path: Path) -> None:
    cfg, ds = _data(amibr, tiny, "train.epochs=1")
    summary = cross_validate(cfg, ds, folds=3, out=tmp_path / "cv", n_boot=50, show_progress=False)
    oof = pd.read_csv(tmp_path / "cv" / "oof_predictions.csv")
    assert oof["p_atypical"].between(0, 1).all() and set(oof["fold"]) == {0, 1, 2}
    assert oof.groupby("group")["fold"].nunique().max() == 1
    assert len(summary["per_fold"]) == 3 and set(summary["mean"]) >= {"balanced_accuracy", "roc_auc"}
    fitted = summary["cross_fitted_threshold"]
    others = [best_threshold(oof["label"][oof["fold"] != k], oof["p_atypical"][oof["fold"] != k]) for k in range(3)]
    assert fitted["thresholds"] == pytest.approx(others)
    at_k = [binary_metrics(oof["label"][oof["fold"] == k], oof["p_atypical"][oof["fold"] == k], others[k])["balanced_accuracy"] for k in range(3)]
    assert fitted["mean"]["balanced_accuracy"] == pytest.approx(np.mean(at_k))
    for name in ("summary.json", "splits.csv", "oof/metrics.json", "oof/roc.png", "fold_2/model.safetensors"):
        assert (tmp_path / "cv" / name).is_file(), name
    card = json.loads((tmp_path / "cv" / "fold_1" / "model.json").read_text())
    assert card["provenance"]["metrics"]["held_out_fold"]["n"] == summary["per_fold"][1]["n"]
    with pytest.raises(MitotypeError, match="resume with other folds"):
        cross_validate(cfg, ds, folds=4, out=tmp_path / "cv", resume=True, n_boot=50, show_progress=False)


def test_cv_threshold_oof_gives_each_fold_the_threshold_best_on_the_other_folds(amibr: Path, tiny: list[str], tmp_path: Path) -> None:
    cfg, ds = _data(amibr, tiny, "train.epochs=1", "train.threshold=oof")
    summary = cross_validate(cfg, ds, folds=3, out=tmp_path / "cv", n_boot=50, show_progress=False)
    oof = pd.read_csv(tmp_path / "cv" / "oof_predictions.csv")
    y, p, fold = oof["label"].to_numpy(), oof["p_atypical"].to_numpy(), oof["fold"].to_numpy()
    for k in range(3):
        want = min(max(best_threshold(y[fold != k], p[fold != k]), 1e-6), 1 - 1e-6)
        card = json.loads((tmp_path / "cv" / f"fold_{k}" / "model.json").read_text())
        assert card["threshold"] == pytest.approx(want) and "other folds" in card["provenance"]["threshold_rule"]
        held = binary_metrics(y[fold == k], p[fold == k], want)
        assert summary["per_fold"][k]["threshold"] == pytest.approx(want)
        assert summary["per_fold"][k]["balanced_accuracy"] == pytest.approx(held["balanced_accuracy"])
        assert card["provenance"]["metrics"]["held_out_fold"]["sensitivity"] == pytest.approx(held["sensitivity"])
    assert summary["mean"]["balanced_accuracy"] == pytest.approx(summary["cross_fitted_threshold"]["mean"]["balanced_accuracy"])
    assert summary["out_of_fold"]["threshold"] == pytest.approx(np.mean([f["threshold"] for f in summary["per_fold"]]))
    with pytest.warns(UserWarning, match="threshold=oof is chosen by cv"):
        assert train(cfg, ds, tmp_path / "one", show_progress=False)["threshold"] == 0.5


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


def test_ema_validates_and_saves_the_moving_average_not_the_raw_weights(amibr: Path, tiny: list[str], tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With a decay of almost 1 the average barely leaves the initial weights, while training moves the raw ones."""
    import mitotype.training.loop as loop
    from mitotype.models.registry import create_model

    averages, updates, scored = [], [], []

    class Counted(loop.ModelEmaV3):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            averages.append(self)

        def update(self, model, step=None):
            updates.append(step)
            super().update(model, step)

    import mitotype.training.objectives as objectives

    real_ensemble = objectives.Ensemble
    monkeypatch.setattr(loop, "ModelEmaV3", Counted)
    monkeypatch.setattr(objectives, "Ensemble", lambda nets, **k: scored.append(nets[0]) or real_ensemble(nets, **k))
    cfg, ds = _data(amibr, tiny, "train.epochs=2", "train.ema_decay=0.999999", "train.lr=0.01")
    rows = np.arange(len(ds.manifest))
    result = fit(cfg, ds.manifest, ds.store, tmp_path / "run", train_idx=rows, show_progress=False)
    assert len(updates) == 2 * math.ceil(len(rows) / cfg.train.batch_size)  # once after every optimiser step
    loop.seed_everything(cfg.train.seed)
    init = create_model(cfg.model).state_dict()
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    saved, raw = result.model.state_dict(), checkpoint["model"]
    for name in ("heads.label.weight", "backbone.conv_stem.weight"):
        assert torch.allclose(saved[name], init[name], atol=1e-4), name
        assert not torch.allclose(raw[name], init[name], atol=1e-3), name
    for name, value in checkpoint["ema"].items():
        assert torch.equal(value.cpu(), saved[name].cpu()), name

    # an interrupted run resumes the average too, and ends as the uninterrupted one
    cfg, _ = _data(amibr, tiny, "train.epochs=3", "train.ema_decay=0.6")
    whole = fit(cfg, ds.manifest, ds.store, tmp_path / "whole", train_idx=rows, show_progress=False)
    with pytest.raises(Interrupted):
        fit(cfg, ds.manifest, ds.store, tmp_path / "cut", train_idx=rows, on_epoch=stop_after(1), show_progress=False)
    resumed = fit(cfg, ds.manifest, ds.store, tmp_path / "cut", train_idx=rows, resume=True, show_progress=False)
    for (name, x), (_, y) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(x, y), name

    # with validation rows, every epoch scores the average
    averages.clear(), scored.clear()
    fit(cfg, ds.manifest, ds.store, tmp_path / "val", train_idx=rows[rows % 4 != 0], val_idx=rows[rows % 4 == 0], show_progress=False)
    assert len(scored) == 3 + 1 and all(m is averages[0].module for m in scored[:3])  # 3 epochs, then the saved model


def test_the_backbone_learns_at_its_scaled_rate_and_the_heads_at_the_full_rate(tiny: list[str]) -> None:
    from mitotype.models.registry import create_model
    from mitotype.training.loop import build_optimizer

    for optimizer in ("adamw", "adam"):
        cfg = load_config(None, tiny + ["train.lr=0.004", "train.backbone_lr_scale=0.25", f"train.optimizer={optimizer}"])
        model = create_model(cfg.model)
        built = build_optimizer(model, cfg)
        assert type(built) is {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[optimizer]
        backbone, heads = built.param_groups
        assert (backbone["lr"], heads["lr"]) == (0.001, 0.004)
        assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
        assert {id(p) for p in heads["params"]} == {id(p) for n, p in model.named_parameters() if not n.startswith("backbone.")}


def test_the_card_says_what_the_model_was_trained_on(amibr: Path, tiny: list[str], tmp_path: Path) -> None:
    cfg, ds = _data(amibr, tiny, "train.epochs=2")
    rows = np.arange(len(ds.manifest))
    train_idx, val_idx = rows[rows % 5 != 0], rows[rows % 5 == 0]
    result = fit(cfg, ds.manifest, ds.store, tmp_path / "run", train_idx=train_idx, val_idx=val_idx, show_progress=False)
    provenance = json.loads((tmp_path / "run" / "model.json").read_text())["provenance"]
    trained = ds.manifest.iloc[train_idx]
    assert provenance["trained_on"] == {
        "source": str(amibr), "n": len(train_idx), "n_atypical": int((trained["label"] == 1).sum()),
        "groups": trained["group"].nunique(), "domains": ["DOM_A", "DOM_B"], "epochs": 2,
    }
    assert provenance["metrics"]["validation"]["balanced_accuracy"] == result.val_metrics["balanced_accuracy"]
    assert provenance["metrics"]["validation"]["n"] == len(val_idx)


def test_schedule_and_augmentation_come_from_the_config(amibr: Path, tiny: list[str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import mitotype.training.loop as loop

    seen = {}
    real_schedule, real_augment = loop.warmup_cosine, loop.BatchAugment
    monkeypatch.setattr(loop, "warmup_cosine", lambda opt, warmup, total, floor: seen.update(schedule=(warmup, total, floor))
                        or real_schedule(opt, warmup, total, floor))
    monkeypatch.setattr(loop, "BatchAugment", lambda config: seen.update(augment=config) or real_augment(config))
    cfg, ds = _data(amibr, tiny, "train.epochs=3", "train.warmup_epochs=1.5", "train.min_lr_ratio=0.05", "train.batch_size=8",
                    "augment.hue=0.07")
    rows = np.arange(len(ds.manifest))
    fit(cfg, ds.manifest, ds.store, tmp_path / "run", train_idx=rows, show_progress=False)
    steps = math.ceil(len(rows) / 8)
    assert seen["schedule"] == (round(1.5 * steps), 3 * steps, 0.05)
    assert seen["augment"] is cfg.augment and seen["augment"].hue == 0.07


def test_settings_that_need_validation_rows_warn_when_there_are_none(amibr: Path, tiny: list[str], tmp_path: Path) -> None:
    cfg, ds = _data(amibr, tiny, "train.epochs=1", "train.threshold=auto")
    rows = np.arange(len(ds.manifest))
    with pytest.warns(UserWarning) as caught:
        fit(cfg, ds.manifest, ds.store, tmp_path / "a", train_idx=rows, show_progress=False)
    messages = [str(w.message) for w in caught if "needs validation rows" in str(w.message)]
    assert messages == ["train.threshold=auto needs validation rows (data.val_fraction, a validation dataset or a val/ split); ignored"]
    cfg, _ = _data(amibr, tiny, "train.epochs=1", "train.patience=1")
    with pytest.warns(UserWarning) as caught:
        fit(cfg, ds.manifest, ds.store, tmp_path / "b", train_idx=rows, show_progress=False)
    assert [str(w.message) for w in caught if "needs validation rows" in str(w.message)] == [
        "train.patience=1 needs validation rows (data.val_fraction, a validation dataset or a val/ split); ignored"]
    assert "validation" not in json.loads((tmp_path / "b" / "model.json").read_text())["provenance"]["metrics"]


def test_deterministic_mode_is_switched_on_when_asked(amibr: Path, tiny: list[str], tmp_path: Path) -> None:
    cfg, ds = _data(amibr, tiny, "train.epochs=1", "train.deterministic_algorithms=true")
    try:
        fit(cfg, ds.manifest, ds.store, tmp_path / "run", train_idx=np.arange(len(ds.manifest)), show_progress=False)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_each_epoch_feeds_every_drawn_row_once_augmented_in_float32_and_logs_the_mean_loss(
        amibr: Path, tiny: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mitotype.training.loop as loop
    import mitotype.training.objectives as objectives

    cfg, ds = _data(amibr, tiny, "train.epochs=2", "train.batch_size=12", "train.amp=true")
    rows = np.arange(len(ds.manifest))
    train_idx = rows[rows % 4 != 0]
    fed, augmented, losses, dtypes = [], [], [], []
    real_batch, real_order = ds.store.batch, loop.epoch_order
    monkeypatch.setattr(ds.store, "batch", lambda r: fed.append(np.asarray(r).copy()) or real_batch(r))
    orders = []
    monkeypatch.setattr(loop, "epoch_order", lambda *a: orders.append(real_order(*a)) or orders[-1])

    class Augment(loop.BatchAugment):
        def with_points(self, x, generator, points=None):
            augmented.append(len(x))
            return super().with_points(x, generator, points)

    class Loss(objectives.HeadLoss):
        def forward(self, outputs, targets):
            dtypes.append(outputs["label"].dtype)
            loss = super().forward(outputs, targets)
            losses.append(loss.detach())
            return loss

    monkeypatch.setattr(loop, "BatchAugment", Augment)
    monkeypatch.setattr(objectives, "HeadLoss", Loss)
    result = fit(cfg, ds.manifest, ds.store, tmp_path / "nested" / "run", train_idx=train_idx, show_progress=False)
    steps = math.ceil(len(train_idx) / 12)
    sizes = [12] * (steps - 1) + [len(train_idx) - 12 * (steps - 1)]
    for epoch in range(2):
        batches = fed[epoch * steps : (epoch + 1) * steps]
        assert [len(b) for b in batches] == sizes
        assert np.array_equal(np.concatenate(batches), train_idx[orders[epoch]])  # the drawn order, each row once
        assert result.history[epoch]["train_loss"] == pytest.approx(float(torch.stack(losses[epoch * steps : (epoch + 1) * steps]).mean()))
    assert augmented == sizes * 2 and set(dtypes) == {torch.float32}  # autocast is for CUDA only


def test_resuming_with_a_changed_config_is_refused(amibr: Path, tiny: list[str], tmp_path: Path) -> None:
    cfg, ds = _data(amibr, tiny, "train.epochs=2")
    rows = np.arange(len(ds.manifest))
    with pytest.raises(Interrupted):
        fit(cfg, ds.manifest, ds.store, tmp_path / "run", train_idx=rows, on_epoch=stop_after(1), show_progress=False)
    changed, _ = _data(amibr, tiny, "train.epochs=2", "train.lr=0.01")
    with pytest.raises(MitotypeError, match=r"changed config \(train\.lr: 0\.001 -> 0\.01\)"):
        fit(changed, ds.manifest, ds.store, tmp_path / "run", train_idx=rows, resume=True, show_progress=False)


def test_history_lr_validation_threshold_seconds_and_divergence(amibr: Path, tiny: list[str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import mitotype.training.objectives as objectives
    from mitotype.evaluation.metrics import binary_metrics

    cfg, ds = _data(amibr, tiny, "train.epochs=2", "train.threshold=0.3", "train.min_lr_ratio=0.1", "train.lr=0.002")
    rows = np.arange(len(ds.manifest))
    val_idx = rows[rows % 4 == 0]
    scores: list[np.ndarray] = []

    class Recorded(objectives.Ensemble):
        def score_store(self, *args, **kwargs):
            scores.append(super().score_store(*args, **kwargs))
            return scores[-1]

    monkeypatch.setattr(objectives, "Ensemble", Recorded)
    tic = time.perf_counter()
    result = fit(cfg, ds.manifest, ds.store, tmp_path / "run", train_idx=rows[rows % 4 != 0], val_idx=val_idx, show_progress=False)
    assert 0 < result.seconds <= time.perf_counter() - tic
    assert result.history[-1]["lr"] == pytest.approx(0.002 * 0.1)  # the cosine ends at lr * min_lr_ratio
    y = ds.manifest["label"].to_numpy()[val_idx]
    for record, p in zip(result.history, scores):  # validation scores at the configured threshold, not 0.5
        assert record["val_balanced_accuracy"] == binary_metrics(y, p, 0.3)["balanced_accuracy"]
        assert record["val_sensitivity"] == binary_metrics(y, p, 0.3)["sensitivity"]

    class Diverging(objectives.HeadLoss):
        def forward(self, outputs, targets):
            return super().forward(outputs, targets) * float("nan")

    monkeypatch.setattr(objectives, "HeadLoss", Diverging)
    with pytest.raises(MitotypeError, match=r"run2: training diverged in epoch 1 \(loss nan\); lower train\.lr"):
        fit(cfg, ds.manifest, ds.store, tmp_path / "run2", train_idx=rows, show_progress=False)
    assert not (tmp_path / "run2" / "checkpoints" / "last.pt").exists() and not (tmp_path / "run2" / "model.json").exists()


def test_threshold_auto_is_the_best_threshold_on_the_validation_rows(amibr: Path, tiny: list[str], tmp_path: Path) -> None:
    from mitotype.evaluation.metrics import best_threshold

    cfg, ds = _data(amibr, tiny, "train.epochs=1", "train.threshold=auto")
    rows = np.arange(len(ds.manifest))
    result = fit(cfg, ds.manifest, ds.store, tmp_path / "run", train_idx=rows[rows % 3 != 0], val_idx=rows[rows % 3 == 0], show_progress=False)
    val = result.val_predictions
    assert result.threshold == best_threshold(val["label"].to_numpy(), val["p_atypical"].to_numpy()) != 0.5


def test_a_model_that_trains_its_backbone_reads_pixels_even_with_augmentation_off(amibr: Path, tiny: list[str], tmp_path: Path) -> None:
    from mitotype.models.registry import create_model
    from mitotype.training.features import feature_view

    off = ["augment.flip=false", "augment.rot90=false", "augment.rotate_degrees=0", "augment.p=0"]
    cfg, ds = _data(amibr, tiny, *off)
    assert cfg.augment.is_identity
    model = create_model(cfg.model)
    assert not model.frozen_backbone  # its features change every step: caching them would train on stale features
    assert feature_view(cfg, model, ds.store, cache_dir=tmp_path / "features", device=torch.device("cpu")) is ds.store
    assert not (tmp_path / "features").exists()


@pytest.mark.parametrize("field, value, message", [
    ("lr", -1.0, "config train.lr: -1.0 is out of range"),
    ("threshold", 1.5, "config train.threshold: 1.5 must be in (0, 1)"),
    ("sampler", "weighted", "config train.sampler: 'weighted' is not one of balanced, shuffle"),
])
def test_a_config_built_in_python_is_validated_before_any_training(amibr: Path, tiny: list[str], tmp_path: Path,
                                                                  field: str, value: object, message: str) -> None:
    """fit, train and cross_validate check the config they are given, not only what load_config read."""
    cfg, ds = _data(amibr, tiny)
    setattr(cfg.train, field, value)
    rows = np.arange(len(ds.manifest))
    for run, out in ((lambda: fit(cfg, ds.manifest, ds.store, tmp_path / "f", train_idx=rows, show_progress=False), "f"),
                     (lambda: train(cfg, ds, tmp_path / "t", show_progress=False), "t"),
                     (lambda: cross_validate(cfg, ds, folds=2, out=tmp_path / "c", show_progress=False), "c")):
        with pytest.raises(MitotypeError) as err:
            run()
        assert str(err.value).startswith(message) and not (tmp_path / out / "checkpoints").exists()
