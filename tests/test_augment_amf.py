"""`mitotype data augment-amf`: counts, determinism, untouched originals, group keeping, each transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from conftest import run_cli, write_class_folders
from mitotype.data.augment_amf import augment_amf
from mitotype.data.readers import read_dataset
from mitotype.data.splits import grouped_folds
from mitotype.errors import MitotypeError

N_ATYP, N_NORM = 12, 28


@pytest.fixture(scope="module")
def augmented(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("amf")
    src = write_class_folders(root / "in", n_atypical=N_ATYP, n_normal=N_NORM)
    augment_amf(src, root / "out", seed=0)
    return src, root / "out"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _param(text: str, name: str) -> float:
    return float(dict(part.split("=") for part in text.split(";"))[name])


def test_counts_layout_and_summary(tmp_path: Path) -> None:
    src = write_class_folders(tmp_path / "in", n_atypical=7, n_normal=9, n_slides=4)
    summary = augment_amf(src, tmp_path / "out")
    assert (summary.n_atypical, summary.n_normal, summary.n_variants, summary.n_images) == (7, 9, 28, 9 + 5 * 7)
    assert len(list((tmp_path / "out" / "Atypical").iterdir())) == 5 * 7
    assert len(list((tmp_path / "out" / "Normal").iterdir())) == 9
    df = read_dataset(tmp_path / "out").manifest
    assert len(df) == 9 + 5 * 7 and (df["label"] == 1).sum() == 35
    assert df["variant"].value_counts().to_dict() == {"original": 16, "rotate": 7, "hflip_brightness": 7,
                                                      "vflip_contrast": 7, "rotate_sharpness": 7}
    assert sorted(p.name for p in (tmp_path / "out" / "Atypical").glob("A_003*")) == [
        "A_003.png", "A_003_aug1.png", "A_003_aug2.png", "A_003_aug3.png", "A_003_aug4.png"]


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, augmented: tuple[Path, Path]) -> None:
    src, first = augmented
    augment_amf(src, tmp_path / "again", seed=0)
    augment_amf(src, tmp_path / "other", seed=1)
    a, b, c = _files(first), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert a == b
    assert a.keys() == c.keys()
    variants = [k for k in a if "_aug" in k]
    assert len(variants) == 4 * N_ATYP
    assert all(a[k] != c[k] for k in variants)  # every variant redrawn (rotations of >= 5 degrees, factors to 1e-4)
    assert all(a[k] == c[k] for k in a if k not in variants and k != "metadata.csv")


def test_originals_are_byte_copies(augmented: tuple[Path, Path]) -> None:
    src, out = augmented
    for folder in ("Atypical", "Normal"):
        for original in (src / folder).iterdir():
            assert (out / folder / original.name).read_bytes() == original.read_bytes()


def test_variants_keep_group_domain_votes_and_fold(augmented: tuple[Path, Path]) -> None:
    src, out = augmented
    before = read_dataset(src).manifest.assign(filename=lambda d: d["path"].map(lambda p: Path(p).name)).set_index("filename")
    df = read_dataset(out).manifest
    df["filename"] = df["path"].map(lambda p: Path(p).name)
    df["original"] = df["augmented_from"].fillna("").where(df["augmented_from"].fillna("") != "", df["filename"])
    kept = ["label", "group", "domain", "expert_1", "expert_2", "expert_3", "votes_atypical", "hard", "subtype", "x", "y", "uid"]
    for col in kept:
        assert df[col].tolist() == before.loc[df["original"], col].tolist(), col
    assert df["group"].nunique() == before["group"].nunique() == 10
    folds = grouped_folds(df, 5, seed=3)
    fold_of = dict(zip(df["filename"], folds))
    variants = df[df["variant"] != "original"]
    assert len(variants) == 4 * N_ATYP
    assert all(fold_of[v] == fold_of[o] for v, o in zip(variants["filename"], variants["original"]))


def test_each_transform_does_what_it_names(augmented: tuple[Path, Path]) -> None:
    _, out = augmented
    meta = pd.read_csv(out / "metadata.csv", keep_default_na=False)
    signs = set()
    for row in meta[meta["variant"] != "original"].itertuples():
        original = Image.open(out / "Atypical" / row.augmented_from).convert("RGB")
        orig, got = np.asarray(original, dtype=np.int16), _pixels(out / "Atypical" / row.filename)
        assert got.shape == orig.shape
        if row.variant == "rotate":
            angle = _param(row.variant_params, "angle")
            assert 15 <= abs(angle) <= 30
            signs.add(np.sign(angle))
            assert (got[[0, 0, -1, -1], [0, -1, 0, -1]] == 255).all()  # corners left uncovered are white
            ref = original.rotate(angle, resample=Image.BILINEAR, fillcolor=(255, 255, 255))
            assert (got == np.asarray(ref)).all()
        elif row.variant == "hflip_brightness":
            factor = _param(row.variant_params, "factor")
            assert 0.9 <= factor <= 1.1
            assert np.abs(got - np.clip(orig[:, ::-1] * factor, 0, 255)).max() <= 1
        elif row.variant == "vflip_contrast":
            factor = _param(row.variant_params, "factor")
            assert 0.9 <= factor <= 1.1
            grey = int(np.asarray(original.convert("L"), dtype=np.float64).mean() + 0.5)
            assert np.abs(got - np.clip(grey + factor * (orig[::-1] - grey), 0, 255)).max() <= 1
        else:
            assert row.variant == "rotate_sharpness"
            angle, factor = _param(row.variant_params, "angle"), _param(row.variant_params, "factor")
            assert 5 <= abs(angle) <= 15 and 0.9 <= factor <= 1.1
            rotated = original.rotate(angle, resample=Image.BILINEAR, fillcolor=(255, 255, 255))
            assert (got == np.asarray(ImageEnhance.Sharpness(rotated).enhance(factor))).all()
            assert (got[[0, 0, -1, -1], [0, -1, 0, -1]] == 255).all()
    assert signs == {-1.0, 1.0}


def test_split_folders_with_repeated_names_and_no_metadata(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "in" / "train", n_atypical=3, n_normal=2, metadata=False)
    write_class_folders(tmp_path / "in" / "test", n_atypical=3, n_normal=2, metadata=False, seed=1)
    augment_amf(tmp_path / "in", tmp_path / "out")
    before = read_dataset(tmp_path / "in").manifest
    df = read_dataset(tmp_path / "out").manifest
    assert len(df) == 4 + 5 * 6 and df["path"].nunique() == len(df)
    assert sorted(p.name for p in (tmp_path / "out" / "Atypical").glob("A_000*.png")) == [
        "A_000-1.png", "A_000-1_aug1.png", "A_000-1_aug2.png", "A_000-1_aug3.png", "A_000-1_aug4.png",
        "A_000.png", "A_000_aug1.png", "A_000_aug2.png", "A_000_aug3.png", "A_000_aug4.png"]
    assert df["source_split"].value_counts().to_dict() == {"test": 17, "train": 17}
    # no slides known: each input patch is its own group, shared by its variants only
    assert df["group"].nunique() == len(before)
    assert set(df["group"]) == set(before["group"])
    assert (df["domain"] == "").all()


def test_cli_writes_and_reports_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    src = write_class_folders(tmp_path / "in", n_atypical=2, n_normal=3, n_slides=2)
    code, stdout, stderr = run_cli(monkeypatch, capsys, "data", "augment-amf", src, tmp_path / "out", "--seed", "5")
    assert code == 0, stderr
    assert "13 patches" in stdout and "2 atypical + 8 variants, 3 normal" in stdout
    assert len(read_dataset(tmp_path / "out").manifest) == 13


def test_cli_missing_input_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code, _, stderr = run_cli(monkeypatch, capsys, "data", "augment-amf", tmp_path / "nope", tmp_path / "out")
    assert code == 2
    assert stderr.startswith("error: ") and str(tmp_path / "nope") in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_out_and_out_among_input_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    src = write_class_folders(tmp_path / "in", n_atypical=2, n_normal=2, n_slides=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, stderr = run_cli(monkeypatch, capsys, "data", "augment-amf", src, tmp_path / "out")
    assert code == 2 and "not empty" in stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    with pytest.raises(MitotypeError, match="a folder of input images"):
        augment_amf(src, src / "Atypical" / "aug")
    assert not (src / "Atypical" / "aug").exists()


def test_unlabelled_input_and_no_atypical_refused(tmp_path: Path) -> None:
    src = write_class_folders(tmp_path / "in", n_atypical=2, n_normal=2, n_slides=2)
    paths = sorted(str(p) for p in src.rglob("*.png"))
    pd.DataFrame({"path": paths}).to_csv(tmp_path / "unlabelled.csv", index=False)
    with pytest.raises(MitotypeError, match=r"unlabelled\.csv: 4 patch\(es\) have no label"):
        augment_amf(tmp_path / "unlabelled.csv", tmp_path / "o1")
    pd.DataFrame({"path": paths, "label": 0}).to_csv(tmp_path / "normal.csv", index=False)
    with pytest.raises(MitotypeError, match="no atypical patches"):
        augment_amf(tmp_path / "normal.csv", tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_failure_removes_what_it_wrote(tmp_path: Path) -> None:
    src = write_class_folders(tmp_path / "in", n_atypical=3, n_normal=2, n_slides=2)
    (src / "Atypical" / "A_002.png").write_bytes(b"not a png")
    (tmp_path / "out").mkdir()
    with pytest.raises(MitotypeError, match=r"A_002\.png: cannot decode image"):
        augment_amf(src, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # empty again: the same command can be rerun
