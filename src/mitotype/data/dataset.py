"""A labelled dataset read, checked and decoded once: the manifest and its uint8 patches, row for row.

Every job that trains or scores a labelled set (train, cv, benchmark, compare, tune) starts here, so
a bad image or a missing label stops the job before any training, with the problem named.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mitotype.config import Config
from mitotype.data.images import ImageStore, decode_all, skipped_table
from mitotype.data.manifest import require_labels
from mitotype.data.readers import read_dataset
from mitotype.data.splits import training_rows


@dataclass
class Dataset:
    """A manifest and its decoded patches, row for row."""

    manifest: pd.DataFrame
    store: ImageStore
    problems: list[str]
    skipped: pd.DataFrame | None = None  # (path, reason) of unusable images left out

    def subset(self, index: np.ndarray) -> "Dataset":
        return Dataset(self.manifest.iloc[index].reset_index(drop=True), self.store.subset(index), self.problems, self.skipped)


def load_dataset(path: str | Path, cfg: Config, *, skip_missing: bool = False, skipped_note: str = "skipped.csv in the run directory") -> Dataset:
    """Read, check and decode a labelled dataset once; unusable images are an error, or skipped if asked
    (the run writes their full list where ``skipped_note`` says)."""
    read = read_dataset(path, skip_missing=skip_missing)
    for problem in read.problems:  # e.g. no slide information: the user must hear it before training
        warnings.warn(problem, stacklevel=2)
    require_labels(read.manifest, str(path))
    store, bad = decode_all(read.manifest["path"].tolist(), cfg.data.patch_size, cfg.data.size_policy, on_bad_image=cfg.data.on_bad_image,
                            cache_dir=cfg.data.cache_dir, skipped_note=skipped_note)
    manifest = read.manifest.iloc[store.rows].reset_index(drop=True)
    skipped = None
    if bad:
        require_labels(manifest, f"{path} (after skipping {len(bad)} bad image(s))")
        left_out = np.setdiff1d(np.arange(len(read.manifest)), store.rows)  # in path order, like ``bad``
        skipped = skipped_table(bad, read.manifest["path"].to_numpy()[left_out].tolist())
    return Dataset(manifest, store, read.problems + bad, skipped)


def learnable(data: Dataset) -> Dataset:
    """The dataset without its layout's test split (see :func:`training_rows`)."""
    rows = training_rows(data.manifest)
    return data if len(rows) == len(data.manifest) else data.subset(rows)
