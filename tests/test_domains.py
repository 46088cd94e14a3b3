"""Scanners known from the source, and leave-one-domain-out cross-validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import write_class_folders
from mitotype.config import load_config
from mitotype.data.domains import leave_one_out_folds, midog21_scanner
from mitotype.data.readers import read_dataset
from mitotype.errors import MitotypeError
from mitotype.training import loop
from mitotype.workflows.runs import cross_validate, load_dataset


@pytest.mark.parametrize("slide, scanner", [
    ("001.tiff", "Hamamatsu XR"), ("050.tiff", "Hamamatsu XR"), ("051.tiff", "Hamamatsu S360"), ("MIDOG21/100.tiff", "Hamamatsu S360"),
    ("101.tiff", "Aperio ScanScope CS2"), ("150.tiff", "Aperio ScanScope CS2"), ("151.tiff", ""), ("slide_a.tiff", ""),
])
def test_midog21_scanner_by_slide_number(slide: str, scanner: str) -> None:
    assert midog21_scanner(slide) == scanner


def test_reader_adds_the_scanner_of_midog21_slides_only(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "d", n_slides=10)
    meta = pd.read_csv(root / "metadata.csv")
    meta["dataset"] = np.where(meta.index % 2 == 0, "MIDOG21", "TUPAC16")
    meta["slide"] = [f"{(i % 3) * 50 + 7:03d}.tiff" for i in range(len(meta))]  # 007, 057, 107
    meta.to_csv(root / "metadata.csv", index=False)
    m = read_dataset(root).manifest
    midog = m[m["domain"] == "MIDOG21"]
    assert set(midog["scanner"]) == {"Hamamatsu XR", "Hamamatsu S360", "Aperio ScanScope CS2"}
    assert (m.loc[m["domain"] == "TUPAC16", "scanner"] == "").all()
    row = midog[midog["group"].str.endswith("/057.tiff")]
    assert (row["scanner"] == "Hamamatsu S360").all() and len(row)


def test_leave_one_out_folds_hold_out_each_domain_once() -> None:
    df = pd.DataFrame({"path": list("abcdefgh"), "label": [0, 1, 0, 1, 0, 1, 1, 0],
                       "domain": ["T", "T", "M", "M", "M", "M", "M", "M"], "scanner": ["", "", "XR", "XR", "S", "S", "CS", "CS"]})
    folds, names = leave_one_out_folds(df, ["domain", "scanner"])
    assert names == ["M/CS", "M/S", "M/XR", "T"]
    assert folds.tolist() == [3, 3, 2, 2, 1, 1, 0, 0]
    with pytest.raises(MitotypeError, match="held-out domain 'b' has only one class"):
        leave_one_out_folds(df.assign(domain=["a", "a", "b", "b", "a", "a", "a", "a"], label=[0, 1, 1, 1, 0, 1, 0, 1]), ["domain"])
    with pytest.raises(MitotypeError, match="no column 'site'"):
        leave_one_out_folds(df, ["site"])
    with pytest.raises(MitotypeError, match="only one value"):
        leave_one_out_folds(df.assign(domain="x"), ["domain"])


def test_cv_group_by_domain_never_trains_on_the_held_out_domain(amibr: Path, tiny: list[str], tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(None, tiny + ["train.epochs=1"])
    data = load_dataset(amibr, cfg)
    seen: list[set[str]] = []
    real_fit = loop.fit

    def spy(cfg, manifest, store, run_dir, *, train_idx, val_idx=None, **kw):
        seen.append(set(manifest["domain"].iloc[train_idx]))
        return real_fit(cfg, manifest, store, run_dir, train_idx=train_idx, val_idx=val_idx, **kw)

    monkeypatch.setattr("mitotype.workflows.runs.fit", spy)
    summary = cross_validate(cfg, data, folds=5, out=tmp_path / "loo", group_by=["domain"])
    assert summary["folds"] == 2 and [f["held_out"] for f in summary["per_fold"]] == ["DOM_A", "DOM_B"]
    assert seen == [{"DOM_B"}, {"DOM_A"}]
    assert summary["per_fold"][0]["n"] == int((data.manifest["domain"] == "DOM_A").sum())
    assert json.loads((tmp_path / "loo" / "summary.json").read_text())["group_by"] == ["domain"]


def test_cli_cv_group_by_prints_each_held_out_domain(amibr: Path, tmp_path: Path) -> None:
    from test_cli import mitotype, sets

    run = mitotype("cv", "--data", str(amibr), "--group-by", "domain", "--out", str(tmp_path / "r"), *sets("train.epochs=1"))
    assert run.returncode == 0, run.stderr
    assert "held out" in run.stdout and "DOM_A" in run.stdout and "DOM_B" in run.stdout
    assert [f["held_out"] for f in json.loads((tmp_path / "r" / "summary.json").read_text())["per_fold"]] == ["DOM_A", "DOM_B"]
    bad = mitotype("cv", "--data", str(amibr), "--group-by", " , ", "--out", str(tmp_path / "r2"))
    assert bad.returncode == 2 and "--group-by" in bad.stderr and not (tmp_path / "r2").exists()
    both = mitotype("cv", "--data", str(amibr), "--group-by", "domain", "--split-file", str(amibr / "metadata.csv"), "--out", str(tmp_path / "r3"))
    assert both.returncode == 2 and "give one of them" in both.stderr
