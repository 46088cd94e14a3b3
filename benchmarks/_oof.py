"""Out-of-fold predictions of cv runs, for the accuracy benchmarks: read one run or the mean of several
(an ensemble of recipes on the same folds), and the paired slide bootstrap of a balanced-accuracy gain.

A "run" is a ``mitotype cv`` directory or any folder holding ``oof_predictions.csv`` (and, for
leave-one-source-out runs, the ``summary.json`` that names each fold's held-out source).
``A+B+C`` averages the runs' p_atypical per patch: the out-of-fold predictions of an ensemble whose
k-th member set was trained on fold k's training part only, as in each run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

KEEP = ("path", "group", "domain", "scanner", "label", "fold")


def read_oof(spec: str) -> tuple[pd.DataFrame, dict]:
    """Out-of-fold predictions of ``spec`` (``RUN`` or ``RUN+RUN+...``) and the first run's summary."""
    frames, summaries = [], []
    for part in spec.split("+"):
        run = Path(part)
        if not (run / "oof_predictions.csv").is_file():
            raise SystemExit(f"{run}: no oof_predictions.csv (not a finished cv run)")
        frame = pd.read_csv(run / "oof_predictions.csv")
        if "p_atypical" not in frame:
            raise SystemExit(f"{run / 'oof_predictions.csv'}: no p_atypical column")
        bad = frame.index[~frame["p_atypical"].between(0, 1)]  # NaN is not between
        if len(bad):
            raise SystemExit(f"{run / 'oof_predictions.csv'}: row {bad[0] + 2}: p_atypical {frame['p_atypical'][bad[0]]} is not in [0, 1]")
        frames.append(frame)
        summaries.append(json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {})
    first = frames[0]
    out = first[[c for c in KEEP if c in first.columns]].copy()
    p = np.zeros(len(out))
    for part, frame in zip(spec.split("+"), frames):
        aligned = out[["path"]].merge(frame[["path", "fold", "p_atypical"]], on="path", how="left", suffixes=("", "_run"))
        if aligned["p_atypical"].isna().any() or len(aligned) != len(out):
            raise SystemExit(f"{part}: other patches than {spec.split('+')[0]}")
        if not (aligned["fold"].to_numpy() == out["fold"].to_numpy()).all():
            raise SystemExit(f"{part}: other folds than {spec.split('+')[0]} (an ensemble needs the same splits)")
        p += aligned["p_atypical"].to_numpy()
    out["p_atypical"] = p / len(frames)
    return out, summaries[0]


def _slide_counts(y: np.ndarray, called: np.ndarray, index: np.ndarray, n_slides: int) -> np.ndarray:
    """Per slide: [true positives, positives, true negatives, negatives]."""
    pos, neg = y == 1, y == 0
    return np.stack([np.bincount(index, weights=w, minlength=n_slides)
                     for w in (pos & called, pos, neg & ~called, neg)], axis=1)


def _balanced_accuracy(counts: np.ndarray) -> np.ndarray:
    """Balanced accuracy from summed [tp, pos, tn, neg] (last axis)."""
    return 0.5 * (counts[..., 0] / counts[..., 1] + counts[..., 2] / counts[..., 3])


def paired_bootstrap(base: pd.DataFrame, run: pd.DataFrame, n: int = 2000, seed: int = 0,
                     threshold: float = 0.5) -> dict[str, float]:
    """Pooled out-of-fold balanced accuracy of ``run`` minus ``base`` at ``threshold``, resampling slides.

    Each resample draws as many slides as there are, with replacement, and sums their confusion
    counts, so a slide's patches move together (patches of one slide are not independent).
    """
    both = base[["path", "group", "label", "p_atypical"]].merge(run[["path", "p_atypical"]], on="path", suffixes=("_base", "_run"))
    names, index = np.unique(both["group"].to_numpy(), return_inverse=True)
    y = both["label"].to_numpy()
    counts_base = _slide_counts(y, both["p_atypical_base"].to_numpy() >= threshold, index, len(names))
    counts_run = _slide_counts(y, both["p_atypical_run"].to_numpy() >= threshold, index, len(names))
    rng = np.random.default_rng(seed)
    weights = np.stack([np.bincount(rng.integers(0, len(names), len(names)), minlength=len(names)) for _ in range(n)])
    draws = _balanced_accuracy(weights @ counts_run) - _balanced_accuracy(weights @ counts_base)
    point = _balanced_accuracy(counts_run.sum(0)) - _balanced_accuracy(counts_base.sum(0))
    return {"difference": float(point), "ci95": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))],
            "resamples": n, "unit": "slide"}
