"""The manifest: one table, a row per patch, produced by every reader and consumed by every command.

Columns (always present, in this order, before any pass-through columns):

- ``path``: absolute image path
- ``label``: 1 atypical, 0 normal, -1 unknown (unlabelled inputs for prediction)
- ``group``: slide or patient; splits never put one group on both sides
- ``domain``: source dataset / scanner / lab, for per-domain metrics ("" when unknown)
- ``split``: train / val / test when the layout says so ("" otherwise)
- ``n_votes``, ``votes_atypical``: how many experts voted and how many said atypical (0 when unknown)
- ``hard``: experts disagree (False when fewer than two votes)
- ``subtype``: phase / subtype label where known, e.g. "AMF segregation"

Derived after those: ``scanner`` (see :mod:`mitotype.data.domains`) and ``label4`` (0 NMF-easy,
1 NMF-hard, 2 AMF-easy, 3 AMF-hard; NaN where hardness is unknown), a 4-class target.

Per-expert votes are kept as ``expert_1``, ``expert_2``... (1.0 atypical, 0.0 normal, NaN unknown).
Any other column a source carries passes through to every output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mitotype.data.domains import scanners
from mitotype.errors import MitotypeError

CORE_COLUMNS = ["path", "label", "group", "domain", "split", "n_votes", "votes_atypical", "hard", "subtype"]
LABEL_NAMES = {0: "normal", 1: "atypical"}
UNLABELLED = -1
NO_SLIDE = "<no slide>/"  # group of a patch whose slide is unknown: itself alone, never pooled with others


def expert_columns(df: pd.DataFrame) -> list[str]:
    return sorted((c for c in df.columns if c.startswith("expert_") and c[7:].isdigit()), key=lambda c: int(c[7:]))


def finalize(df: pd.DataFrame) -> pd.DataFrame:
    """Fill defaults, derive vote counts, ``hard`` and ``label4``, order columns, check types."""
    df = df.copy()
    if "path" not in df or "label" not in df:
        raise MitotypeError("a manifest needs at least the columns 'path' and 'label'")
    df["path"] = [str(Path(p).resolve()) for p in df["path"]]
    df["label"] = df["label"].astype(int)
    if "group" not in df:  # no slide known: each patch is its own group (its path: unique)
        df["group"] = df["path"]
    for name in ("domain", "split", "subtype"):
        if name not in df:
            df[name] = ""
    for name in ("group", "domain", "split", "subtype"):
        df[name] = ["" if pd.isna(v) else str(v) for v in df[name]]
    no_slide = df["group"].str.strip() == ""  # an empty slide cell must not pool its patches into one group
    df.loc[no_slide, "group"] = NO_SLIDE + df.loc[no_slide, "path"]
    experts = expert_columns(df)
    if experts:
        votes = df[experts].astype(float)
        df["n_votes"] = votes.notna().sum(axis=1).astype(int)
        df["votes_atypical"] = votes.fillna(0).sum(axis=1).astype(int)
    else:
        df["n_votes"] = 0
        df["votes_atypical"] = 0
    df["hard"] = (df["n_votes"] >= 2) & (df["votes_atypical"] > 0) & (df["votes_atypical"] < df["n_votes"])
    df["scanner"] = scanners(df)
    df["label4"] = label4(df)
    rest = [c for c in df.columns if c not in CORE_COLUMNS]
    return df[CORE_COLUMNS + rest].reset_index(drop=True)


def label4(df: pd.DataFrame) -> np.ndarray:
    """Class and hardness in one target: 0 NMF-easy, 1 NMF-hard, 2 AMF-easy, 3 AMF-hard (2 x label + hard);
    NaN where hardness is unknown (fewer than two expert votes) or the patch is unlabelled."""
    known = (df["n_votes"] >= 2) & (df["label"] != UNLABELLED)
    return np.where(known, 2 * df["label"] + df["hard"].astype(int), np.nan)


def read_csv_checked(path: Path, **kwargs) -> pd.DataFrame:
    """pandas.read_csv with its failures (empty, malformed, binary) as one-line errors."""
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise MitotypeError(f"{path}: not a readable CSV ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None


def read_manifest_csv(path: Path) -> pd.DataFrame:
    """Our own manifest format (as written to every run directory); relative paths are resolved
    against the CSV's folder. Labels and expert votes may be 0/1 or names. A prediction table read
    back keeps its ``true_label`` as the label, never the predicted one."""
    df = read_csv_checked(path)
    if "p_atypical" in df.columns and "label" in df.columns:
        df = df.drop(columns=["label"]).rename(columns={"true_label": "label"})
    if "label" not in df.columns:  # unlabelled: fine for prediction, refused by training
        df["label"] = UNLABELLED
    if df["path"].isna().any():
        raise MitotypeError(f"{path}: row {int(np.flatnonzero(df['path'].isna())[0]) + 2} has no path")
    df["path"] = [str(p) if Path(str(p)).is_absolute() else str(path.parent / str(p)) for p in df["path"]]
    resolved = pd.Series([str(Path(p).resolve()) for p in df["path"]])
    dup = resolved.duplicated(keep=False)
    if dup.any():
        first = resolved[dup].iloc[0]
        rows = [int(i) + 2 for i in np.flatnonzero(resolved == first)[:2]]
        raise MitotypeError(f"{path}: rows {rows[0]} and {rows[1]} name the same image {first}; each patch must appear once "
                            f"({int(dup.sum())} rows are duplicates)")
    df["label"] = [parse_label(v, f"{path} row {i + 2}") for i, v in enumerate(df["label"])]
    for col in expert_columns(df):
        df[col] = [np.nan if pd.isna(v) else float(parse_label(v, f"{path} row {i + 2} column {col}")) for i, v in enumerate(df[col])]
    if "group" not in df.columns and "slide" in df.columns:  # like the AMi-Br reader: slide names are unique per source
        domain = "domain" if "domain" in df.columns else "dataset" if "dataset" in df.columns else None
        prefix = df[domain].fillna("").astype(str) + "/" if domain else ""
        df["group"] = (prefix + df["slide"].astype(str)).where(df["slide"].notna())
    return finalize(df)


def parse_label(value: object, where: str) -> int:
    """Atypical is 1 however a source spells it: Atypical/AMF/True/1, Normal/NMF/False/0."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1, UNLABELLED):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return UNLABELLED
        if value in (0.0, 1.0):
            return int(value)
    text = str(value).strip().lower()
    if text in ("atypical", "amf", "true", "1", "yes", "1.0"):
        return 1
    if text in ("normal", "nmf", "false", "0", "no", "0.0"):
        return 0
    if text in ("", "nan", "unknown", "-1"):
        return UNLABELLED
    raise MitotypeError(f"{where}: label '{value}' is neither atypical (Atypical/AMF/1/True) nor normal (Normal/NMF/0/False)")


def require_labels(df: pd.DataFrame, what: str, two_classes: bool = True) -> None:
    """Training and evaluation need labelled rows of both classes."""
    if len(df) == 0:
        raise MitotypeError(f"{what}: the dataset is empty")
    unlabelled = int((df["label"] == UNLABELLED).sum())
    if unlabelled:
        first = df.loc[df["label"] == UNLABELLED, "path"].iloc[0]
        raise MitotypeError(f"{what}: {unlabelled} patch(es) have no label, e.g. {first}")
    if two_classes and df["label"].nunique() < 2:
        only = LABEL_NAMES[int(df["label"].iloc[0])]
        raise MitotypeError(f"{what}: only one class present ({len(df)} {only} patches); need both atypical and normal")
