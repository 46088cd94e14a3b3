"""What a dataset holds and what is wrong with it, before any training (``mitotype data inspect``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mitotype.data.images import find_bad_images
from mitotype.data.readers import ReadResult, read_dataset


def inspect_dataset(path: Path, *, skip_missing: bool = False, decode: bool = True, patch_size: int = 128, size_policy: str = "error") -> ReadResult:
    """Read the dataset and, with ``decode``, try every image: all problems are collected, none raised."""
    result = read_dataset(path, require_labels=False, skip_missing=skip_missing)
    if decode and len(result.manifest):
        result.problems.extend(find_bad_images(result.manifest["path"].tolist(), patch_size, size_policy))
    return result


def class_counts(df: pd.DataFrame) -> list[tuple[str, int, int, int]]:
    """(class, patches, groups, hard) per class present."""
    rows = []
    for label, name in ((1, "atypical"), (0, "normal"), (-1, "unlabelled")):
        part = df[df["label"] == label]
        if len(part):
            rows.append((name, len(part), part["group"].nunique(), int(part["hard"].sum())))
    return rows


def domain_counts(df: pd.DataFrame) -> list[tuple[str, int, int, int]]:
    """(domain, patches, atypical, groups) per known domain."""
    known = df[df["domain"] != ""]
    return [(str(d), len(p), int((p["label"] == 1).sum()), p["group"].nunique()) for d, p in known.groupby("domain")]


def group_counts(df: pd.DataFrame) -> list[tuple[str, int, int, str]]:
    """(group, patches, atypical, domain) per group, largest first."""
    rows = [(str(g), len(p), int((p["label"] == 1).sum()), ",".join(sorted(set(p["domain"]) - {""}))) for g, p in df.groupby("group")]
    return sorted(rows, key=lambda r: (-r[1], r[0]))
