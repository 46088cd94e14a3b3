"""Run directories: ``train`` (one model) and ``cv`` (K grouped folds) on top of the one loop.

A run directory is the unit of reuse: ``config.yaml``, ``manifest.csv``, per-model checkpoints,
``history.csv``, the model artifact (``model.safetensors`` + ``model.json``), predictions and a
``summary.json``. A cross-validation run holds ``fold_0/ .. fold_{K-1}/`` (each a train run),
``splits.csv``, ``oof_predictions.csv`` and the out-of-fold evaluation.
"""

from __future__ import annotations

import functools
import inspect
import shutil
import time
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from mitotype._io import check_output_dir, write_csv, write_json
from mitotype.config import Config, record_config, resolve_device, validate_config
from mitotype.data.dataset import Dataset, learnable, load_dataset  # noqa: F401 (load_dataset: re-exported for the CLI)
from mitotype.data.domains import leave_one_out_folds
from mitotype.data.images import ImageStore
from mitotype.data.manifest import require_labels
from mitotype.data.splits import grouped_folds, read_split_file, train_val_split
from mitotype.errors import MitotypeError
from mitotype.evaluation.metrics import CROSS_FITTED_RULE, METRIC_NAMES, best_threshold, binary_metrics, cross_fitted_metrics, summarize_folds
from mitotype.evaluation.report import write_evaluation
from mitotype.models.artifact import add_card_metrics, load_card_threshold, load_model, set_card_threshold
from mitotype.models.ensemble import Ensemble
from mitotype.training.loop import EpochCallback, console, fit, is_complete


def check_run_dir(out: Path, resume: bool) -> Path:
    """Before any work: ``out`` can be created and written, and holds no earlier run unless resuming."""
    check_output_dir(out, "out")
    if out.is_dir() and any(out.iterdir()) and not resume:
        raise MitotypeError(f"{out}: run directory exists and is not empty; pass {{resume}} to continue it, or choose another run directory",
                            options=("resume",))
    return out


def _prepare_dir(out: Path, resume: bool) -> None:
    check_run_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)


def _write_skipped(out: Path, *datasets: Dataset | None) -> None:
    tables = [d.skipped for d in datasets if d is not None and d.skipped is not None]
    if tables:
        write_csv(out / "skipped.csv", pd.concat(tables, ignore_index=True))


def _trained_nothing(out: Path) -> bool:
    return not any(next(out.rglob(pattern), None) for pattern in ("last.pt", "*.safetensors", "model.json"))


def _clean_failed_start(job):
    """A job that fails before anything was trained in a directory it found empty or absent
    removes what it wrote there (config.yaml, manifest.csv...), so the same command can be rerun."""

    @functools.wraps(job)
    def run(*args, **kwargs):
        bound = inspect.signature(job).bind(*args, **kwargs)
        out = Path(bound.arguments["out"])
        existed = out.exists()
        fresh = not existed or (out.is_dir() and not any(out.iterdir()))
        try:
            return job(*args, **kwargs)
        except Exception:
            if fresh and out.is_dir() and _trained_nothing(out):
                if existed:
                    for entry in out.iterdir():
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                else:
                    shutil.rmtree(out)
            raise

    return run


@_clean_failed_start
def train(cfg: Config, data: Dataset, out: Path, *, resume: bool = False, val: Dataset | None = None, show_progress: bool = True,
          on_epoch: EpochCallback | None = None) -> dict:
    """One model. Validation rows: a separate dataset, the manifest's ``val`` split, or a grouped
    hold-out of ``data.val_fraction``; none if none of these is given."""
    validate_config(cfg)
    _prepare_dir(out, resume)
    _write_skipped(out, data, val)
    data = learnable(data)
    manifest, store = data.manifest, data.store
    if val is not None:
        manifest = pd.concat([manifest, val.manifest], ignore_index=True)
        pixels = [np.asarray(d.store.array[d.store.rows]) for d in (data, val)]
        store = ImageStore(np.concatenate(pixels), np.arange(len(manifest)))
        train_idx, val_idx = np.arange(len(data.manifest)), np.arange(len(data.manifest), len(manifest))
    elif (manifest["split"] == "val").any():
        train_idx, val_idx = np.flatnonzero(manifest["split"] == "train"), np.flatnonzero(manifest["split"] == "val")
    elif cfg.data.val_fraction > 0:
        train_idx, val_idx = train_val_split(manifest, cfg.data.val_fraction, cfg.data.split_seed, cfg.data.stratify)
    else:
        train_idx, val_idx = np.arange(len(manifest)), None
    require_labels(manifest.iloc[train_idx], "training rows")
    if cfg.train.threshold == "oof":
        warnings.warn("train.threshold=oof is chosen by cv on out-of-fold predictions; a single training run keeps 0.5", stacklevel=2)
    write_csv(out / "manifest.csv", manifest)
    result = fit(cfg, manifest, store, out, train_idx=train_idx, val_idx=val_idx, resume=resume, show_progress=show_progress, on_epoch=on_epoch)
    summary = {"recipe": cfg.recipe, "seconds": round(result.seconds, 1), "epochs": len(result.history), "threshold": result.threshold}
    if result.val_predictions is not None:
        write_csv(out / "val_predictions.csv", result.val_predictions)
        summary["validation"] = result.val_metrics
    write_json(out / "summary.json", summary)
    return summary


def _record_splits(path: Path, table: pd.DataFrame, resume: bool) -> None:
    """On resume, finished folds are reused only if every patch keeps its fold."""
    if resume and path.is_file():
        old = pd.read_csv(path, usecols=["path", "fold"])
        if dict(zip(old["path"], old["fold"])) != dict(zip(table["path"], table["fold"])):
            raise MitotypeError(f"{path}: {{resume}} with other folds (changed data, {{folds}}, split seed or split file); start a new run",
                                options=("resume", "folds"))
        return
    write_csv(path, table)


@_clean_failed_start
def cross_validate(
    cfg: Config, data: Dataset, *, folds: int, out: Path, resume: bool = False, split_file: Path | None = None, n_boot: int = 1000,
    group_by: list[str] | None = None, on_fold: Callable[[int, dict], None] | None = None, show_progress: bool = True,
    on_epoch: EpochCallback | None = None,
) -> dict:
    """K grouped folds: K models, out-of-fold predictions, per-fold and mean ± sd metrics.

    Folds are grouped by slide (``folds`` of them), read from ``split_file``, or, with ``group_by``
    (manifest columns such as domain and scanner), one per value: leave one domain out.
    ``on_fold(fold, metrics)`` hears each finished (or reused) fold's held-out metrics and may raise
    to stop the run there (``tune`` prunes a trial this way); finished folds stay for a resume.
    """
    validate_config(cfg)
    _prepare_dir(out, resume)
    _write_skipped(out, data)
    started = time.perf_counter()
    data = learnable(data)
    fold_of, held_out = _assign_folds(cfg, data.manifest, folds=folds, split_file=split_file, group_by=group_by)
    record_config(out / "config.yaml", cfg, resume)
    _record_splits(out / "splits.csv", data.manifest.assign(fold=fold_of), resume)
    device = resolve_device(cfg.train.device)
    p_oof = np.full(len(data.manifest), np.nan)
    done: list[_FoldResult] = []
    for fold in range(int(fold_of.max()) + 1):
        result = _run_fold(cfg, data, fold_of, fold, out, device=device, resume=resume, show_progress=show_progress, on_epoch=on_epoch)
        p_oof[result.rows] = result.p
        done.append(result)
        if on_fold is not None:
            on_fold(fold, result.metrics)
    oof = data.manifest.assign(fold=fold_of, p_atypical=p_oof)[fold_of >= 0]  # fold -1: never held out
    write_csv(out / "oof_predictions.csv", oof)
    fitted, refit = _cross_fitted_thresholds(cfg, oof, out, done)
    summary = _cv_summary(cfg, oof, out, done, fitted=fitted, refit=refit, held_out=held_out, group_by=group_by,
                          groups=int(data.manifest["group"].nunique()), n_boot=n_boot)
    summary.update(wall_seconds=round(time.perf_counter() - started, 1), device=str(device))
    write_json(out / "summary.json", summary)
    return summary


def _assign_folds(cfg: Config, manifest: pd.DataFrame, *, folds: int, split_file: Path | None,
                  group_by: list[str] | None) -> tuple[np.ndarray, list[str] | None]:
    """Each row's held-out fold (-1: never held out) and, leaving one domain out, the fold's domain."""
    if group_by:
        return leave_one_out_folds(manifest, group_by)
    if split_file:
        return read_split_file(split_file, manifest), None
    return grouped_folds(manifest, folds, cfg.data.split_seed, cfg.data.stratify), None


@dataclass
class _FoldResult:
    rows: np.ndarray  # held-out manifest positions
    p: np.ndarray
    threshold: float
    metrics: dict
    seconds: float


def _run_fold(cfg: Config, data: Dataset, fold_of: np.ndarray, fold: int, out: Path, *, device: Any, resume: bool,
              show_progress: bool, on_epoch: EpochCallback | None) -> _FoldResult:
    """Train fold ``fold`` (or reuse it when resuming a finished one) and score its held-out rows."""
    manifest, store = data.manifest, data.store
    fold_dir = out / f"fold_{fold}"
    train_idx, test_idx = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
    tic = time.perf_counter()
    if resume and is_complete(fold_dir):
        console.log(f"fold {fold}: complete, reusing {fold_dir}")
        loaded = load_model(fold_dir, device)
        model, threshold = loaded.model, loaded.threshold
    else:
        console.log(f"fold {fold + 1}/{int(fold_of.max()) + 1}: {len(train_idx)} train / {len(test_idx)} held-out patches")
        val_idx = None
        if cfg.data.val_fraction > 0:  # early stopping on an inner split, never on the held-out fold
            inner_train, inner_val = train_val_split(manifest.iloc[train_idx].reset_index(drop=True), cfg.data.val_fraction,
                                                      cfg.data.split_seed, cfg.data.stratify)
            train_idx, val_idx = train_idx[inner_train], train_idx[inner_val]
        result = fit(cfg, manifest, store, fold_dir, train_idx=train_idx, val_idx=val_idx, resume=resume, feature_dir=out / "features",
                     show_progress=show_progress, on_epoch=on_epoch)
        model, threshold = result.model, result.threshold
    p = Ensemble([model], device=device, amp=cfg.train.amp).score_store(store, test_idx, batch_size=cfg.train.eval_batch_size)
    metrics = binary_metrics(manifest["label"].to_numpy()[test_idx], p, threshold)
    add_card_metrics(fold_dir, "held_out_fold", metrics)
    console.log(f"fold {fold}: balanced accuracy {metrics['balanced_accuracy']:.3f} · AUROC {metrics['roc_auc'] or float('nan'):.3f}")
    return _FoldResult(test_idx, p, threshold, metrics, round(time.perf_counter() - tic, 1))


def _cross_fitted_thresholds(cfg: Config, oof: pd.DataFrame, out: Path, done: list[_FoldResult]) -> tuple[dict[int, float], list[dict]]:
    """Each fold's threshold best on the other folds' out-of-fold predictions, and its metrics there.
    With ``train.threshold=oof`` the fold models keep them (card threshold and held-out metrics)."""
    fitted_metrics = cross_fitted_metrics(oof["label"].to_numpy(), oof["p_atypical"].to_numpy(), oof["fold"].to_numpy())
    fitted, refit = {f: t for f, (t, _) in fitted_metrics.items()}, [m for _, m in fitted_metrics.values()]
    if cfg.train.threshold == "oof":
        for f, t in fitted.items():
            set_card_threshold(out / f"fold_{f}", t, f"{CROSS_FITTED_RULE} (train.threshold=oof)")
            add_card_metrics(out / f"fold_{f}", "held_out_fold", refit[f])
            done[f].metrics, done[f].threshold = refit[f], load_card_threshold(out / f"fold_{f}")
        console.log("thresholds from the other folds: " + ", ".join(f"fold {f} {t:.3f} (BA {m['balanced_accuracy']:.3f})"
                                                                   for (f, t), m in zip(fitted.items(), refit)))
    return fitted, refit


def _cv_summary(cfg: Config, oof: pd.DataFrame, out: Path, done: list[_FoldResult], *, fitted: dict[int, float], refit: list[dict],
                held_out: list[str] | None, group_by: list[str] | None, groups: int, n_boot: int) -> dict:
    """The pooled out-of-fold evaluation (written under ``out/oof``) and the run's summary."""
    y, p_oof = oof["label"].to_numpy(), oof["p_atypical"].to_numpy()
    thresholds = [f.threshold for f in done]
    pooled = write_evaluation(oof[["label", "p_atypical", "domain"]], out / "oof", threshold=float(np.mean(thresholds)), n_boot=n_boot,
                              title=f"{cfg.recipe}: out-of-fold")
    tuned = best_threshold(y, p_oof)
    spread, refit_spread = summarize_folds([f.metrics for f in done]), summarize_folds(refit)
    per_fold = [{"fold": i, **({"held_out": held_out[i]} if held_out else {}), "threshold": f.threshold, "seconds": f.seconds,
                 **{m: f.metrics[m] for m in METRIC_NAMES}, "n": f.metrics["n"]} for i, f in enumerate(done)]
    return {
        "recipe": cfg.recipe,
        "folds": len(done),
        "n": int(len(oof)),
        "n_atypical": int((y == 1).sum()),
        "groups": groups,
        "split_seed": cfg.data.split_seed,
        "mean": {m: v["mean"] for m, v in spread.items()},
        "sd": {m: v["sd"] for m, v in spread.items()},
        "group_by": list(group_by or []),
        "per_fold": per_fold,
        "out_of_fold": {m: pooled[m] for m in (*METRIC_NAMES, "threshold")},  # pooled at the folds' mean threshold
        "out_of_fold_ci95": pooled.get("ci95", {}),
        "out_of_fold_best_threshold": {"threshold": tuned, **{m: binary_metrics(y, p_oof, tuned)[m] for m in METRIC_NAMES}},
        # each fold scored at the threshold that is best on the other folds' out-of-fold predictions
        "cross_fitted_threshold": {"thresholds": list(fitted.values()), "mean": {m: v["mean"] for m, v in refit_spread.items()},
                                   "sd": {m: v["sd"] for m, v in refit_spread.items()}},
    }
