"""Checks on the real AMi-Br training split; skipped with a message when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mitotype.data.images import decode_all
from mitotype.data.readers import read_dataset
from mitotype.data.splits import grouped_folds

ROOT = Path(os.environ.get("MITOTYPE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
AMIBR = ROOT / "ami-br-train"
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not AMIBR.is_dir(), reason=f"AMi-Br training split not found at {AMIBR} (set MITOTYPE_DATA)"),
]


def test_amibr_train_reads_as_published() -> None:
    result = read_dataset(AMIBR)
    df = result.manifest
    assert result.problems == []
    assert len(df) == 2894 and int((df["label"] == 1).sum()) == 648
    assert df["group"].nunique() == 146
    assert set(df["domain"]) == {"MIDOG21", "TUPAC16"}
    assert (df["n_votes"] == 3).all()
    majority = (df["votes_atypical"] >= 2).astype(int)
    assert (majority == df["label"]).all()  # folder label = experts' majority


def test_amibr_folds_keep_slides_apart_and_patches_decode() -> None:
    df = read_dataset(AMIBR).manifest
    folds = grouped_folds(df, 5, seed=42)
    assert (df.assign(fold=folds).groupby("group")["fold"].nunique() == 1).all()
    store, bad = decode_all(df["path"].tolist()[:64], 128)
    assert bad == [] and store.batch(range(64)).shape == (64, 128, 128, 3)
