"""Hostile input, round two (issue 9 part 4): each case ends in one line naming the file, row, field
or option, exit status 2, before any work where an output could not be written, and nothing lost."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFile

import mitotype.data.images as images
from conftest import TINY, make_patch, write_class_folders
from conftest import run_cli as cli
from helpers import assert_one_line_error
from mitotype._io import TMP_MARK, atomic_path, check_output_file, process_umask, write_csv
from mitotype.cli import main
from mitotype.data.images import BadImage, decode_patch, decode_threads
from mitotype.data.readers import read_dataset
from mitotype.data.splits import grouped_folds
from mitotype.errors import MitotypeError
from mitotype.training.checkpoint import save_checkpoint

SETS = [arg for item in (*TINY, "train.epochs=1") for arg in ("--set", item)]


def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any decoding or model loading fails the test: outputs must be checked before the work."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr("mitotype.data.dataset.decode_all", refuse)
    monkeypatch.setattr("mitotype.models.ensemble.load_ensemble", refuse)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bad")
    data = write_class_folders(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["mitotype", "train", "--data", str(data), "--out", str(root / "run"), *SETS])
        main()
    return data, root / "run"


def test_nan_and_inf_config_values_are_refused_naming_the_key(monkeypatch, capsys, tmp_path, trained) -> None:
    data, run = trained
    for value, shown in (("nan", "'nan'"), ("inf", "'inf'"), (".inf", "inf"), ("-.inf", "-inf")):
        result = cli(monkeypatch, capsys, "train", "--data", data, "--out", tmp_path / "r", *SETS, "--set", f"train.lr={value}")
        assert_one_line_error(result, f"config train.lr: {shown} is not a finite number")
    assert_one_line_error(cli(monkeypatch, capsys, "train", "--data", data, "--out", tmp_path / "r", *SETS, "--set", "augment.hed_sigma=nan"),
                   "config augment.hed_sigma: 'nan' is not a finite number")
    assert not (tmp_path / "r").exists()
    for value in ("nan", "inf"):
        assert_one_line_error(cli(monkeypatch, capsys, "predict", data, "--model", run, "--out", tmp_path / "p.csv", "--threshold", value),
                       f"--threshold {value}: must be in (0, 1)")
    assert not (tmp_path / "p.csv").exists()


def test_a_config_built_in_python_is_checked_for_finite_floats() -> None:
    from mitotype.config import Config, validate_config

    cfg = Config()
    cfg.loss.focal_gamma = float("inf")
    with pytest.raises(MitotypeError, match=r"^config loss.focal_gamma: inf is not a finite number$"):
        validate_config(cfg)


def test_an_out_that_cannot_be_written_is_refused_before_any_work(monkeypatch, capsys, tmp_path, trained) -> None:
    data, run = trained
    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    no_work(monkeypatch)
    for command in ("train", "cv"):
        assert_one_line_error(cli(monkeypatch, capsys, command, "--data", data, "--out", a_file, *SETS), f"--out {a_file}: is a file; expected a folder")
        assert_one_line_error(cli(monkeypatch, capsys, command, "--data", data, "--out", a_file / "run", *SETS), f"{a_file} is a file, not a folder")
    assert_one_line_error(cli(monkeypatch, capsys, "evaluate", "--model", run, "--data", data, "--out", a_file), f"--out {a_file}: is a file")
    assert_one_line_error(cli(monkeypatch, capsys, "predict", data, "--model", run, "--out", tmp_path), f"--out {tmp_path}: is a folder; expected a file")
    assert_one_line_error(cli(monkeypatch, capsys, "predict", data, "--model", run, "--out", a_file / "p.csv"), f"{a_file} is a file, not a folder")
    assert_one_line_error(cli(monkeypatch, capsys, "benchmark", "--train", data, "--test", f"T={data}", "--out", a_file, *SETS), "--out", "is a file")
    assert a_file.read_text() == "keep me"

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    assert_one_line_error(cli(monkeypatch, capsys, "predict", data, "--model", run, "--out", locked / "sub" / "p.csv"),
                   f"--out {locked / 'sub' / 'p.csv'}: cannot write in {locked} (Permission denied)")
    assert_one_line_error(cli(monkeypatch, capsys, "cv", "--data", data, "--out", locked / "cv", *SETS), f"cannot write in {locked}")
    assert list(locked.iterdir()) == []


def test_an_unwritable_folder_is_found_by_a_probe(monkeypatch, tmp_path) -> None:
    """os.access says yes to root on a read-only file system: a probe file tells the truth."""
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if Path(path).parent == tmp_path:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(MitotypeError) as info:
        check_output_file(tmp_path / "p.csv", "out_csv")
    assert str(info.value) == f"out_csv {tmp_path / 'p.csv'}: cannot write in {tmp_path} (Read-only file system)"
    assert info.value.render(lambda name: "--out") == f"--out {tmp_path / 'p.csv'}: cannot write in {tmp_path} (Read-only file system)"


def test_a_full_disk_keeps_the_old_file_and_says_what_was_not_written(monkeypatch, capsys, tmp_path, trained) -> None:
    data, run = trained
    target = tmp_path / "p.csv"
    target.write_text("old predictions\n")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    assert_one_line_error(cli(monkeypatch, capsys, "predict", data, "--model", run, "--out", target),
                   f"could not write {target} (No space left on device); nothing was replaced")
    assert target.read_text() == "old predictions\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.csv"]  # no temporary left behind

    ckpt = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(ckpt, {"epoch": 1})
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("PytorchStreamWriter failed writing file data/0")))
    with pytest.raises(MitotypeError, match=rf"^could not write {ckpt} \(checkpoint write failed: PytorchStreamWriter failed writing file data/0\)"):
        save_checkpoint(ckpt, {"epoch": 2})
    assert torch.load(ckpt, weights_only=True) == {"epoch": 1}
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.pt"]


def test_duplicated_manifest_rows_are_refused_with_their_row_numbers(monkeypatch, capsys, tmp_path, trained) -> None:
    data, run = trained
    paths = sorted(str(p) for p in (data / "Normal").glob("*.png"))[:4]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [paths[0], paths[1], paths[2], os.path.relpath(paths[1], tmp_path), paths[3]]}).to_csv(manifest, index=False)
    assert_one_line_error(cli(monkeypatch, capsys, "predict", manifest, "--model", run, "--out", tmp_path / "p.csv"),
                   f"{manifest}: rows 3 and 5 name the same image {paths[1]}")
    assert not (tmp_path / "p.csv").exists()


def test_every_skipped_image_is_listed_and_predict_counts_them_apart(monkeypatch, capsys, tmp_path) -> None:
    data = write_class_folders(tmp_path / "d")
    broken = sorted((data / "Normal").glob("*.png"))[:11]
    for p in broken:
        p.write_bytes(b"not a png")
    with pytest.warns(UserWarning, match=r"skipped 11 unusable image\(s\): .* \.\.\.; full list in skipped.csv in the run directory"):
        code, _, err = cli(monkeypatch, capsys, "train", "--data", data, "--out", tmp_path / "run", "--skip-bad", *SETS)
    assert code == 0, err
    listed = pd.read_csv(tmp_path / "run" / "skipped.csv")
    assert listed["path"].tolist() == [str(p) for p in broken]
    assert set(listed["reason"].str.split(" \\(").str[0]) == {"cannot decode image"}

    out = tmp_path / "pred.csv"
    with pytest.warns(UserWarning, match=rf"full list in {tmp_path / 'pred.skipped.csv'}"):
        code, stdout, err = cli(monkeypatch, capsys, "predict", data, "--model", tmp_path / "run", "--out", out, "--skip-bad",
                                "--threshold", "0.000001")  # every predicted patch is atypical: the share is of predicted ones
    assert code == 0, err
    assert (pd.read_csv(out, keep_default_na=False)["label"] == "atypical").sum() == 29
    assert f"29 patches → {out}: 29 atypical (100.0%), 11 skipped" in " ".join(stdout.split())
    assert pd.read_csv(tmp_path / "pred.skipped.csv")["path"].tolist() == [str(p) for p in broken]

    with pytest.warns(UserWarning, match="full list in .*ev/skipped.csv"):
        code, _, err = cli(monkeypatch, capsys, "evaluate", "--model", tmp_path / "run", "--data", data, "--out", tmp_path / "ev",
                           "--skip-bad", "--n-boot", "10")
    assert code == 0, err
    assert len(pd.read_csv(tmp_path / "ev" / "skipped.csv")) == 11

    for path in broken:  # the images are repaired: no list from the earlier runs may remain
        path.write_bytes((data / "Atypical" / "A_000.png").read_bytes())
    code, _, err = cli(monkeypatch, capsys, "predict", data, "--model", tmp_path / "run", "--out", out, "--skip-bad")
    assert code == 0, err
    assert not (tmp_path / "pred.skipped.csv").exists()
    code, _, err = cli(monkeypatch, capsys, "evaluate", "--model", tmp_path / "run", "--data", data, "--out", tmp_path / "ev",
                       "--skip-bad", "--n-boot", "10")
    assert code == 0, err
    assert not (tmp_path / "ev" / "skipped.csv").exists()


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says WIDTHxHEIGHT but whose pixel data is a 2x2 image's: only a reader
    that looks at the header first reports its size without failing to decode."""
    Image.new("RGB", (2, 2)).save(path)
    raw = bytearray(path.read_bytes())
    ihdr = struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(raw))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_huge_image_is_refused_from_its_header(monkeypatch, capsys, tmp_path, trained) -> None:
    data, run = trained
    flat = tmp_path / "flat"
    flat.mkdir()
    _png_header_only(flat / "tile.png", 12000, 12000)
    for policy in ("center-crop", "resize"):
        assert_one_line_error(cli(monkeypatch, capsys, "predict", flat, "--model", run, "--out", tmp_path / "p.csv", "--size-policy", policy),
                       f"{flat / 'tile.png'}: image is 12000x12000 px, over 64x the 32x32 patch area; crop patches from it first", "--skip-bad")
    Image.fromarray(make_patch(np.random.default_rng(0), True, size=40)).save(tmp_path / "p40.png")
    Image.fromarray(make_patch(np.random.default_rng(0), True, size=16)).save(tmp_path / "p16.png")
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size))
    with pytest.raises(BadImage, match=r"p40.png: image is 40x40 px, expected 32x32 \(.*or size_policy for predict/evaluate\)$"):
        decode_patch(tmp_path / "p40.png", 32, "error")
    with pytest.raises(BadImage, match="p16.png: image is 16x16 px, expected 32x32"):
        decode_patch(tmp_path / "p16.png", 32, "center-crop")
    assert loads == []  # refused from the header: no pixel decoded


def test_empty_slide_cells_and_images_without_a_row_are_each_their_own_group(tmp_path) -> None:
    data = write_class_folders(tmp_path / "d")
    meta = pd.read_csv(data / "metadata.csv")
    meta.loc[[0, 1], "slide"] = np.nan
    lonely = meta.loc[2, "filename"]
    meta.drop(index=2).to_csv(data / "metadata.csv", index=False)
    read = read_dataset(data)
    df = read.manifest.set_index(read.manifest["path"].map(lambda p: Path(p).name))
    alone = [meta.loc[0, "filename"], meta.loc[1, "filename"], lonely]
    assert df.loc[alone, "group"].tolist() == [f"<no slide>/{df.loc[name, 'path']}" for name in alone]
    assert df["group"].nunique() == 10 + 3 and "" not in set(df["group"]) and not df["group"].str.endswith("/nan").any()
    assert any(p.endswith("3 patch(es) have no slide value or no CSV row, e.g. A_000.png; each is its own group") for p in read.problems)


def test_a_manifest_slide_column_groups_when_group_is_absent(tmp_path) -> None:
    data = write_class_folders(tmp_path / "d")
    paths = sorted(str(p) for p in (data / "Atypical").glob("*.png"))[:3] + sorted(str(p) for p in (data / "Normal").glob("*.png"))[:3]
    table = pd.DataFrame({"path": paths, "label": [1, 1, 1, 0, 0, 0], "slide": ["s1", "s1", "s2", "s2", None, "s1"],
                          "domain": ["A", "A", "A", "B", "B", "B"]})
    table.to_csv(tmp_path / "m.csv", index=False)
    read = read_dataset(tmp_path / "m.csv")
    assert read.manifest["group"].tolist() == ["A/s1", "A/s1", "A/s2", "B/s2", f"<no slide>/{paths[4]}", "B/s1"]
    assert read.problems == [f"{tmp_path / 'm.csv'}: 1 patch(es) have an empty group/slide cell, e.g. {Path(paths[4]).name}; each is its own group"]


def test_a_bad_expert_vote_names_its_row_and_column(monkeypatch, capsys, tmp_path, trained) -> None:
    data, run = trained
    meta = pd.read_csv(data / "metadata.csv")
    bad = tmp_path / "d"
    bad.mkdir()
    for folder in ("Atypical", "Normal"):
        (bad / folder).symlink_to(data / folder)
    meta["expert2_atypical"] = meta["expert2_atypical"].astype(object)
    meta.loc[6, "expert2_atypical"] = "perhaps"
    meta.to_csv(bad / "metadata.csv", index=False)
    assert_one_line_error(cli(monkeypatch, capsys, "evaluate", "--model", run, "--data", bad, "--out", tmp_path / "ev"),
                   f"{bad / 'metadata.csv'} row 8 column expert2_atypical: label 'perhaps'")
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [str(p) for p in sorted((data / "Normal").glob("*.png"))[:2]], "label": [0, 0], "expert_1": ["normal", "??"]}
                 ).to_csv(manifest, index=False)
    with pytest.raises(MitotypeError, match=r"m.csv row 3 column expert_1: label '\?\?'"):
        read_dataset(manifest)


def test_a_run_that_fails_before_training_does_not_block_its_rerun(monkeypatch, capsys, tmp_path) -> None:
    data = write_class_folders(tmp_path / "d")

    def broken(*args, **kwargs):
        raise MitotypeError("model: broken on purpose")

    out, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    with monkeypatch.context() as mp:
        mp.setattr("mitotype.training.loop.create_model", broken)
        assert_one_line_error(cli(monkeypatch, capsys, "train", "--data", data, "--out", out, *SETS), "broken on purpose")
        assert not out.exists()  # config.yaml and manifest.csv had been written, then removed
        assert_one_line_error(cli(monkeypatch, capsys, "cv", "--data", data, "--folds", "2", "--out", empty, *SETS), "broken on purpose")
        assert empty.is_dir() and list(empty.iterdir()) == []
    code, _, err = cli(monkeypatch, capsys, "train", "--data", data, "--out", out, *SETS)
    assert code == 0, err
    assert (out / "model.json").is_file()


def test_temporaries_left_by_a_killed_writer_are_removed_by_the_next_write(tmp_path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    target = tmp_path / "predictions.csv"
    stale = tmp_path / f".predictions.csv{TMP_MARK}{dead}-0a1b2c3d.csv"
    live = tmp_path / f".predictions.csv{TMP_MARK}{os.getpid()}-00000000.csv"
    other = tmp_path / f".other.csv{TMP_MARK}{dead}-0a1b2c3d.csv"
    for path in (stale, live, other):
        path.write_text("half")
    with atomic_path(target) as tmp:
        assert tmp.name.startswith(f".predictions.csv{TMP_MARK}{os.getpid()}-") and tmp.suffix == ".csv"
        tmp.write_text("new")
    write_csv(target, pd.DataFrame({"a": [1]}))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])
    assert target.read_text() == "a\n1\n"


def test_importing_mitotype_changes_no_process_state(monkeypatch) -> None:
    code = ("import os; os.umask(0o027); import mitotype.cli, mitotype._io as io, mitotype.data.images as im; "
            "assert os.umask(0o027) == 0o027; assert io.process_umask() == 0o027; "
            "assert not hasattr(im, '_THREADS') and not hasattr(im, '_STREAM_THREADS'); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.stdout.strip() == "ok", result.stderr
    mask = os.umask(0)
    os.umask(mask)
    assert process_umask() == mask
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("MITOTYPE_DECODE_THREADS", raising=False)
    assert (decode_threads(), decode_threads(streaming=True)) == (8, 4)
    monkeypatch.setenv("MITOTYPE_DECODE_THREADS", "3")
    assert (decode_threads(), decode_threads(streaming=True)) == (3, 3)
    monkeypatch.setenv("MITOTYPE_DECODE_THREADS", "many")
    with pytest.raises(MitotypeError, match="MITOTYPE_DECODE_THREADS='many': expected a positive integer"):
        images.decode_all([], 32)


def test_library_errors_name_parameters_and_the_cli_names_flags(monkeypatch, capsys, tmp_path) -> None:
    data = write_class_folders(tmp_path / "d")
    df = read_dataset(data).manifest
    with pytest.raises(MitotypeError) as info:
        grouped_folds(df, 1)
    assert str(info.value) == "folds 1: need at least 2 folds"
    assert_one_line_error(cli(monkeypatch, capsys, "cv", "--data", data, "--folds", "1", "--out", tmp_path / "cv", *SETS),
                          "error: --folds 1: need at least 2 folds")
    (data / "Normal" / "N_004.png").unlink()
    with pytest.raises(MitotypeError, match="use skip_missing to drop them$") as info:
        read_dataset(data)
    assert "--" not in str(info.value)
    assert_one_line_error(cli(monkeypatch, capsys, "train", "--data", data, "--out", tmp_path / "r", *SETS), "use --skip-missing to drop them")
