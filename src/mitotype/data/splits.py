"""Splits that never put one slide on both sides: grouped, label-stratified, seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from mitotype.errors import MitotypeError


def grouped_folds(df: pd.DataFrame, k: int, seed: int = 42) -> np.ndarray:
    """Fold number (0..k-1) of each row: StratifiedGroupKFold on label, grouped by ``group``."""
    n_groups = df["group"].nunique()
    if k < 2:
        raise MitotypeError(f"--folds {k}: need at least 2 folds")
    if n_groups < k:
        raise MitotypeError(f"--folds {k}: only {n_groups} group(s) (slides) in the data; use at most {n_groups} folds")
    folds = np.full(len(df), -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(df)), df["label"].to_numpy(), df["group"].to_numpy())):
        folds[test] = fold
    for fold in range(k):
        labels = df["label"].to_numpy()[folds == fold]
        if len(labels) == 0 or len(np.unique(labels)) < 2:
            raise MitotypeError(f"--folds {k}: fold {fold} would hold only one class; use fewer folds")
    assert_disjoint(df, folds)
    return folds


def assert_disjoint(df: pd.DataFrame, folds: np.ndarray) -> None:
    """No group in two folds; a guard on every split we make or read."""
    per_group = pd.Series(folds).groupby(df["group"].to_numpy()).nunique()
    leaking = per_group[per_group > 1]
    if len(leaking):
        raise MitotypeError(f"split puts group '{leaking.index[0]}' on both sides ({len(leaking)} group(s) in total)")


def train_val_split(df: pd.DataFrame, val_fraction: float, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Grouped, stratified hold-out of about ``val_fraction`` of the rows (for early stopping)."""
    k = max(2, round(1 / val_fraction))
    folds = grouped_folds(df, k, seed)
    return np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)


def read_split_file(path: Path, df: pd.DataFrame) -> np.ndarray:
    """An explicit split: CSV with ``fold`` (int) or ``split`` (train/val/test) per ``path`` or ``group``."""
    if not path.is_file():
        raise MitotypeError(f"{path}: split file not found")
    table = pd.read_csv(path)
    key = "path" if "path" in table else "group" if "group" in table else None
    value = "fold" if "fold" in table else "split" if "split" in table else None
    if key is None or value is None:
        raise MitotypeError(f"{path}: a split file needs a 'path' or 'group' column and a 'fold' or 'split' column")
    if key == "path":
        table["path"] = [str(Path(p).resolve()) for p in table["path"]]
    mapping = dict(zip(table[key], table[value]))
    missing = [v for v in df[key] if v not in mapping]
    if missing:
        raise MitotypeError(f"{path}: {len(missing)} {key}(s) of the data have no split, e.g. {missing[0]}")
    assigned = df[key].map(mapping)
    if value == "split":
        names = sorted(set(assigned))
        assigned = assigned.map({name: i for i, name in enumerate(names)})
    folds = assigned.to_numpy(dtype=int)
    assert_disjoint(df, folds)
    return folds
