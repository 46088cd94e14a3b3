"""Domains beyond the dataset name: the scanner of each patch where the source says it, and
leave-one-domain-out folds, the out-of-domain question users ask of their own data.

MIDOG 2021 numbers its breast-cancer slides by scanner (Aubreville et al., MIDOG 2021): 001-050
Hamamatsu XR (C12740-21), 051-100 Hamamatsu S360 (C13210), 101-150 Aperio ScanScope CS2, so a
MIDOG21 slide's file name tells its scanner.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from mitotype.errors import MitotypeError

MIDOG21_SCANNERS = ((1, 50, "Hamamatsu XR"), (51, 100, "Hamamatsu S360"), (101, 150, "Aperio ScanScope CS2"))


def midog21_scanner(slide: str) -> str:
    """The scanner of a MIDOG 2021 slide from its number ("007.tiff" -> Hamamatsu XR); "" if unknown."""
    match = re.match(r"^0*(\d+)", slide.rsplit("/", 1)[-1])
    if match:
        number = int(match.group(1))
        for lo, hi, name in MIDOG21_SCANNERS:
            if lo <= number <= hi:
                return name
    return ""


def scanners(df: pd.DataFrame) -> list[str]:
    """A ``scanner`` value per row: the source's own column when it has one, else known from the
    dataset (MIDOG21 slide numbers), else ""."""
    if "scanner" in df:
        return ["" if pd.isna(v) else str(v) for v in df["scanner"]]
    is_midog21 = df["domain"].str.upper().str.replace("_", "").isin(["MIDOG21", "MIDOG2021"])
    return [midog21_scanner(g) if m else "" for g, m in zip(df["group"], is_midog21)]


def domain_key(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    """One key per row joining ``columns`` (e.g. domain + scanner); empty parts are left out."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MitotypeError(f"{{group_by}}: the data has no column '{missing[0]}' (columns: {', '.join(df.columns)})", options=("group_by",))
    parts = df[columns].fillna("").astype(str)
    return parts.apply(lambda row: "/".join(v for v in row if v), axis=1)


def leave_one_out_folds(df: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, list[str]]:
    """Fold i holds out every row whose key (see :func:`domain_key`) is the i-th value (sorted).

    Each held-out domain must hold both classes, and rows without a key cannot be placed.
    """
    key = domain_key(df, columns)
    if (key == "").any():
        first = df["path"][key == ""].iloc[0]
        raise MitotypeError(f"{{group_by}} {','.join(columns)}: {int((key == '').sum())} patch(es) have no value, e.g. {first}", options=("group_by",))
    names = sorted(key.unique())
    if len(names) < 2:
        raise MitotypeError(f"{{group_by}} {','.join(columns)}: only one value ({names[0] if names else 'none'}); nothing to leave out", options=("group_by",))
    folds = key.map({name: i for i, name in enumerate(names)}).to_numpy()
    for i, name in enumerate(names):
        if df["label"].to_numpy()[folds == i].min() == df["label"].to_numpy()[folds == i].max():
            raise MitotypeError(f"{{group_by}} {','.join(columns)}: held-out domain '{name}' has only one class", options=("group_by",))
    return folds, names
