"""Splits that never put one slide on both sides: grouped, label-stratified, seeded."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from mitotype.data.manifest import read_csv_checked
from mitotype.errors import MitotypeError


def strata(df: pd.DataFrame, stratify: Sequence[str] = ("label",)) -> np.ndarray:
    """What the folds balance: the ``label`` column itself (the default, so folds stay as they were),
    or one code per combination of the ``stratify`` columns (e.g. label x hard); NaN is a value of its own."""
    missing = [c for c in stratify if c not in df.columns]
    if missing:
        raise MitotypeError(f"config data.stratify: column '{missing[0]}' is not in the data (columns: {', '.join(map(str, df.columns))})")
    if list(stratify) == ["label"]:
        return df["label"].to_numpy()
    keys = df[list(stratify)].astype(str).agg("|".join, axis=1)
    return np.unique(keys.to_numpy(), return_inverse=True)[1]


def grouped_folds(df: pd.DataFrame, k: int, seed: int = 42, stratify: Sequence[str] = ("label",)) -> np.ndarray:
    """Fold number (0..k-1) of each row: StratifiedGroupKFold on :func:`strata`, grouped by ``group``."""
    n_groups = df["group"].nunique()
    if k < 2:
        raise MitotypeError(f"{{folds}} {k}: need at least 2 folds", options=("folds",))
    if n_groups < k:
        raise MitotypeError(f"{{folds}} {k}: only {n_groups} group(s) (slides) in the data; use at most {n_groups} folds", options=("folds",))
    folds = np.full(len(df), -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(df)), strata(df, stratify), df["group"].to_numpy())):
        folds[test] = fold
    for fold in range(k):
        labels = df["label"].to_numpy()[folds == fold]
        if len(labels) == 0 or len(np.unique(labels)) < 2:
            raise MitotypeError(f"{{folds}} {k}: fold {fold} would hold only one class; use fewer folds", options=("folds",))
    assert_disjoint(df, folds)
    return folds


def assert_disjoint(df: pd.DataFrame, folds: np.ndarray) -> None:
    """No group in two folds; a guard on every split we make or read."""
    per_group = pd.Series(folds).groupby(df["group"].to_numpy()).nunique()
    leaking = per_group[per_group > 1]
    if len(leaking):
        raise MitotypeError(f"split puts group '{leaking.index[0]}' on both sides ({len(leaking)} group(s) in total)")


def train_val_split(df: pd.DataFrame, val_fraction: float, seed: int = 42, stratify: Sequence[str] = ("label",)) -> tuple[np.ndarray, np.ndarray]:
    """Grouped, stratified hold-out of about ``val_fraction`` of the rows (for early stopping)."""
    k = max(2, round(1 / val_fraction))
    folds = grouped_folds(df, k, seed, stratify)
    return np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)


def read_split_file(path: Path, df: pd.DataFrame) -> np.ndarray:
    """An explicit split, by ``path`` (relative to the split file) or ``group``:
    - a ``fold`` column (integers 0..K-1): K-fold cross-validation on those folds;
    - a ``split`` column (train / val / test): one model, held out on ``test``; train and val rows
      get fold -1, meaning never held out.
    """
    if not path.is_file():
        raise MitotypeError(f"{path}: split file not found")
    table = read_csv_checked(path)
    key = "path" if "path" in table else "group" if "group" in table else None
    value = "fold" if "fold" in table else "split" if "split" in table else None
    if key is None or value is None:
        raise MitotypeError(f"{path}: a split file needs a 'path' or 'group' column and a 'fold' or 'split' column")
    if table[value].isna().any():
        raise MitotypeError(f"{path}: row {int(table.index[table[value].isna()][0]) + 2} has no {value}")
    if key == "path":
        table["path"] = [str(p if Path(str(p)).is_absolute() else (path.parent / str(p)).resolve()) for p in table["path"]]
    table[key] = table[key].astype(str)
    conflicting = table.groupby(key)[value].nunique()
    if (conflicting > 1).any():
        raise MitotypeError(f"{path}: {key} '{conflicting[conflicting > 1].index[0]}' is given two different {value}s")
    mapping = dict(zip(table[key], table[value]))
    missing = [v for v in df[key].astype(str) if v not in mapping]
    if missing:
        raise MitotypeError(f"{path}: {len(missing)} {key}(s) of the data have no {value}, e.g. {missing[0]}")
    assigned = df[key].astype(str).map(mapping)
    if value == "split":
        names = {str(v).strip().lower() for v in assigned}
        if not names <= {"train", "val", "test"} or "test" not in names:
            raise MitotypeError(f"{path}: split values must be train, val or test, with some test rows (found {', '.join(sorted(names))})")
        folds = np.where(assigned.astype(str).str.strip().str.lower() == "test", 0, -1)
    else:
        try:
            folds = assigned.astype(int).to_numpy()
        except (TypeError, ValueError):
            raise MitotypeError(f"{path}: fold values must be integers 0..K-1") from None
        if sorted(set(folds)) != list(range(folds.max() + 1)):
            raise MitotypeError(f"{path}: folds must be numbered 0..K-1 without gaps (found {sorted(set(folds))})")
    labels = df["label"].to_numpy()
    for fold in range(folds.max() + 1):
        if len(np.unique(labels[folds == fold])) < 2:
            raise MitotypeError(f"{path}: held-out fold {fold} has only one class")
    assert_disjoint(df, folds)
    return folds


def training_rows(df: pd.DataFrame) -> np.ndarray:
    """Rows a model may learn from: all but a layout's ``test`` split, which is set aside with a
    warning so that ``train``/``cv`` on a split-folder dataset never see its test patches."""
    test = (df["split"] == "test").to_numpy()
    if test.any():
        warnings.warn(f"{int(test.sum())} patch(es) of the data's test split set aside: not trained on, not cross-validated", stacklevel=2)
        shared = set(df.loc[test, "group"]) & set(df.loc[~test, "group"])
        if shared:
            warnings.warn(f"{len(shared)} group(s) appear in both the test split and the rest, e.g. '{sorted(shared)[0]}'", stacklevel=2)
    return np.flatnonzero(~test)


def evaluation_rows(df: pd.DataFrame) -> np.ndarray:
    """The layout's ``test`` split when there is one (scoring train rows would flatter a model), else every row."""
    test = (df["split"] == "test").to_numpy()
    return np.flatnonzero(test) if test.any() else np.arange(len(df))
