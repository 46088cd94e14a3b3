"""Run directories as the unit of reuse: what cv --resume retrains, which rows each model learns
from, and that the split seed is the one configured. Fits are counted, not inferred from equal
results (CPU training is deterministic, so a retrained fold looks exactly like a reused one)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mitotype.training.loop as loop
import mitotype.workflows.runs as runs
from conftest import write_class_folders
from mitotype.config import load_config
from mitotype.data.splits import grouped_folds, train_val_split
from mitotype.training.loop import Interrupted, stop_after
from mitotype.workflows.runs import cross_validate, load_dataset, train

TIMING = ("wall_seconds", "seconds")  # wall-clock fields: the only ones allowed to differ between runs


class FitSpy:
    """Wraps ``runs.fit``: records every call (run dir, rows, resume) and counts the epochs each
    run directory actually trains (one checkpoint is written per trained epoch)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, interrupt: str | None = None) -> None:
        self.calls: list[dict] = []
        self.epochs: Counter[str] = Counter()
        self.interrupt = interrupt
        real_fit, real_save = runs.fit, loop.save_checkpoint

        def save(path, state):
            self.epochs[Path(path).parent.parent.name] += 1
            return real_save(path, state)

        def fit(cfg, manifest, store, run_dir, *, train_idx, val_idx=None, resume=False, **kwargs):
            name = Path(run_dir).name
            self.calls.append({"dir": name, "manifest": manifest, "train": np.asarray(train_idx),
                               "val": None if val_idx is None else np.asarray(val_idx), "resume": resume})
            if name == self.interrupt:
                self.interrupt = None  # once: the resumed call runs to the end
                kwargs["on_epoch"] = stop_after(1)
            return real_fit(cfg, manifest, store, run_dir, train_idx=train_idx, val_idx=val_idx, resume=resume, **kwargs)

        monkeypatch.setattr(loop, "save_checkpoint", save)
        monkeypatch.setattr(runs, "fit", fit)


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def test_cv_resumed_inside_a_fold_matches_an_uninterrupted_run(amibr: Path, tiny: list[str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, tiny + ["train.epochs=2", "data.val_fraction=0.3", "train.threshold=auto", "model.drop_rate=0.3"])
    ds = load_dataset(amibr, cfg)
    whole = FitSpy(monkeypatch)
    cross_validate(cfg, ds, folds=3, out=tmp_path / "whole", n_boot=50, show_progress=False)
    assert whole.epochs == {"fold_0": 2, "fold_1": 2, "fold_2": 2}

    cut = FitSpy(monkeypatch, interrupt="fold_1")
    with pytest.raises(Interrupted):
        cross_validate(cfg, ds, folds=3, out=tmp_path / "cut", n_boot=50, show_progress=False)
    assert [c["dir"] for c in cut.calls] == ["fold_0", "fold_1"] and cut.epochs == {"fold_0": 2, "fold_1": 1}
    assert not (tmp_path / "cut" / "summary.json").exists()

    resumed = FitSpy(monkeypatch)
    cross_validate(cfg, ds, folds=3, out=tmp_path / "cut", resume=True, n_boot=50, show_progress=False)
    assert [(c["dir"], c["resume"]) for c in resumed.calls] == [("fold_1", True), ("fold_2", True)]  # fold 0 is not refitted
    assert resumed.epochs == {"fold_1": 1, "fold_2": 2}  # fold 1 continues from its checkpoint: one epoch left

    a = json.loads((tmp_path / "whole" / "summary.json").read_text())
    b = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert _without_timing(b) == _without_timing(a)
    assert len(a["per_fold"]) == 3 and "wall_seconds" in a  # the timing fields exist and are the only ones dropped
    for name in ("oof_predictions.csv", "splits.csv", "oof/metrics.json", *(f"fold_{k}/model.safetensors" for k in range(3))):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name

    again = FitSpy(monkeypatch)
    cross_validate(cfg, ds, folds=3, out=tmp_path / "cut", resume=True, n_boot=50, show_progress=False)
    assert again.calls == [] and sum(again.epochs.values()) == 0  # a finished cv run is all reuse
    assert _without_timing(json.loads((tmp_path / "cut" / "summary.json").read_text())) == _without_timing(a)


def _split_layout(root: Path) -> tuple[Path, set[str]]:
    """train/ val/ test/ folders; returns the root and the test patches' paths."""
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        write_class_folders(root / split, n_atypical=6, n_normal=10, seed=seed)
    return root, {str(p.resolve()) for p in (root / "test").rglob("*.png")}


def _paths(manifest: pd.DataFrame, idx: np.ndarray) -> set[str]:
    return {str(Path(p).resolve()) for p in manifest["path"].iloc[idx]}


def test_cv_never_trains_on_the_held_out_fold_the_test_split_or_its_inner_validation(tiny: list[str], tmp_path: Path,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root, test_paths = _split_layout(tmp_path / "s")
    cfg = load_config(None, tiny + ["train.epochs=1", "data.val_fraction=0.34", "data.split_seed=5"])
    ds = load_dataset(root, cfg)
    spy = FitSpy(monkeypatch)
    with pytest.warns(UserWarning, match="test split set aside"):
        cross_validate(cfg, ds, folds=3, out=tmp_path / "cv", n_boot=20, show_progress=False)
    splits = pd.read_csv(tmp_path / "cv" / "splits.csv", keep_default_na=False)
    assert not {str(Path(p).resolve()) for p in splits["path"]} & test_paths and len(splits) == 32
    assert len(spy.calls) == 3
    for fold, call in enumerate(spy.calls):
        manifest, tr, va = call["manifest"], call["train"], call["val"]
        assert list(manifest["path"]) == list(splits["path"])  # fit sees the learnable rows only
        held_out = np.flatnonzero(splits["fold"].to_numpy() == fold)
        outer_train = np.flatnonzero(splits["fold"].to_numpy() != fold)
        assert not set(tr) & set(held_out) and not set(va) & set(held_out), fold
        assert not set(tr) & set(va) and sorted([*tr, *va]) == list(outer_train), fold
        assert not set(manifest["group"].iloc[tr]) & set(manifest["group"].iloc[held_out]), fold
        assert not set(manifest["group"].iloc[tr]) & set(manifest["group"].iloc[va]), fold
        assert not (_paths(manifest, tr) | _paths(manifest, va)) & test_paths
        inner = train_val_split(manifest.iloc[outer_train].reset_index(drop=True), 0.34, seed=5)
        assert np.array_equal(va, outer_train[inner[1]]), fold  # the configured split seed, not a default
    assert np.array_equal(splits["fold"].to_numpy(), grouped_folds(spy.calls[0]["manifest"], 3, 5))


def test_cv_split_seed_is_honoured(amibr: Path, tiny: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Stop(Exception):
        pass

    seen = {}

    def no_fit(cfg, manifest, store, run_dir, *args, **kwargs):  # splits.csv is written before the first fold trains
        seen["folds"] = pd.read_csv(Path(run_dir).parent / "splits.csv")["fold"].to_numpy()
        raise Stop

    monkeypatch.setattr(runs, "fit", no_fit)
    folds = {}
    for seed in (1, 2):
        cfg = load_config(None, tiny + [f"data.split_seed={seed}"])
        ds = load_dataset(amibr, cfg)
        with pytest.raises(Stop):
            cross_validate(cfg, ds, folds=4, out=tmp_path / f"cv{seed}", show_progress=False)
        folds[seed] = seen.pop("folds")
        assert np.array_equal(folds[seed], grouped_folds(ds.manifest, 4, seed))
    assert not np.array_equal(folds[1], folds[2])


def test_train_holds_out_validation_and_test_rows(tiny: list[str], tmp_path: Path, amibr: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, test_paths = _split_layout(tmp_path / "s")
    cfg = load_config(None, tiny + ["train.epochs=1"])
    spy = FitSpy(monkeypatch)
    with pytest.warns(UserWarning, match="test split set aside"):
        train(cfg, load_dataset(root, cfg), tmp_path / "run", show_progress=False)
    (call,) = spy.calls
    manifest, tr, va = call["manifest"], call["train"], call["val"]
    assert not set(manifest["path"].map(lambda p: str(Path(p).resolve()))) & test_paths
    assert set(manifest["split"].iloc[tr]) == {"train"} and set(manifest["split"].iloc[va]) == {"val"}
    assert len(tr) == 16 and len(va) == 16

    cfg = load_config(None, tiny + ["train.epochs=1", "data.val_fraction=0.25", "data.split_seed=7"])
    ds = load_dataset(amibr, cfg)
    train(cfg, ds, tmp_path / "run2", show_progress=False)
    call = spy.calls[-1]
    want_train, want_val = train_val_split(ds.manifest, 0.25, seed=7)
    assert np.array_equal(call["train"], want_train) and np.array_equal(call["val"], want_val)
    assert not set(ds.manifest["group"].iloc[call["train"]]) & set(ds.manifest["group"].iloc[call["val"]])


def test_load_dataset_honours_the_data_section_and_names_the_dataset(tmp_path: Path) -> None:
    from conftest import TINY
    from mitotype.errors import MitotypeError

    data = write_class_folders(tmp_path / "d", n_atypical=4, n_normal=6, n_slides=3)
    cfg = load_config(None, [*TINY, "data.patch_size=24", "data.size_policy=resize", f"data.cache_dir={tmp_path / 'cache'}"])
    ds = load_dataset(data, cfg)
    assert ds.store.batch(np.arange(2)).shape == (2, 24, 24, 3)  # 32 px patches resized, as data.size_policy says
    assert any((tmp_path / "cache").iterdir())  # decoded into data.cache_dir
    sub = ds.subset(np.array([3, 1]))
    assert list(sub.manifest.columns) == list(ds.manifest.columns) and list(sub.manifest.index) == [0, 1]
    assert sub.manifest["path"].tolist() == ds.manifest["path"].iloc[[3, 1]].tolist()
    only_normal = tmp_path / "normal"
    write_class_folders(only_normal, n_atypical=0, n_normal=4, n_slides=2)
    with pytest.raises(MitotypeError, match=f"^{only_normal}: only one class present"):
        load_dataset(only_normal, cfg)


def test_an_interrupted_train_keeps_its_directory_and_a_nested_out_is_created(tmp_path: Path) -> None:
    from conftest import TINY

    data = write_class_folders(tmp_path / "d", n_atypical=6, n_normal=10, n_slides=4)
    cfg = load_config(None, [*TINY, "train.epochs=2"])
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(Interrupted):
        train(cfg, load_dataset(data, cfg), out, on_epoch=stop_after(1), show_progress=False)
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "config.yaml").is_file()  # kept for --resume
    train(cfg, load_dataset(data, cfg), out, resume=True, show_progress=False)
    assert (out / "model.json").is_file()
