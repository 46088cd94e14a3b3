"""The command line as a user meets it: each command end to end, and bad input as one line."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import TINY, run_cli, write_class_folders
from helpers import assert_one_line_error


def mitotype(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "mitotype", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def sets(*extra: str) -> list[str]:
    return [arg for item in (*TINY, *extra) for arg in ("--set", item)]


@pytest.fixture
def cv_run(shared_cv_run: tuple[Path, Path]) -> tuple[Path, Path]:
    return shared_cv_run


def test_cv_prints_the_summary(cv_run: tuple[Path, Path]) -> None:
    _, run = cv_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["folds"] == 3 and summary["n"] == 40 and summary["n_atypical"] == 12
    per_fold = [f["balanced_accuracy"] for f in summary["per_fold"]]
    assert summary["mean"]["balanced_accuracy"] == pytest.approx(sum(per_fold) / 3)
    assert sum(f["n"] for f in summary["per_fold"]) == 40  # every patch held out exactly once
    refit = summary["cross_fitted_threshold"]["mean"]["balanced_accuracy"]
    printed = (run.parent / "cv.stdout").read_text()
    assert "threshold from the other folds" in printed and f"{refit:.3f} ±" in printed


def test_evaluate_a_fold_ensemble(cv_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = cv_run
    result = mitotype("evaluate", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "ev"), "--n-boot", "100")
    assert result.returncode == 0, result.stderr
    assert "3 model(s)" in result.stdout
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key in ("balanced_accuracy", "roc_auc", "average_precision", "sensitivity", "specificity", "precision", "f1", "accuracy",
                "n", "n_atypical", "threshold", "ci95", "per_domain"):
        assert key in metrics, key
    assert set(metrics["per_domain"]) == {"DOM_A", "DOM_B"} and metrics["n"] == 40
    assert (tmp_path / "ev" / "roc.png").is_file() and (tmp_path / "ev" / "confusion.png").is_file()


def test_predict_folder_with_tta_and_unlabelled_folder(cv_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = cv_run
    result = mitotype("predict", str(data), "--model", str(run / "fold_0"), "--out", str(tmp_path / "p.csv"), "--tta")
    assert result.returncode == 0, result.stderr
    preds = pd.read_csv(tmp_path / "p.csv")
    assert list(preds.columns[:3]) == ["path", "p_atypical", "label"] and len(preds) == 40
    assert set(preds["label"]) <= {"atypical", "normal"} and "true_label" in preds and "x" in preds
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in list((data / "Normal").glob("*.png"))[:5]:
        (flat / p.name).write_bytes(p.read_bytes())
    Image.open(next(flat.glob("*.png"))).resize((40, 40)).save(flat / "big.png")
    assert_one_line_error(mitotype("predict", str(flat), "--model", str(run), "--out", str(tmp_path / "q.csv")), "big.png", "40x40", "--size-policy")
    (flat / "broken.png").write_bytes(b"nope")
    result = mitotype("predict", str(flat), "--model", str(run), "--out", str(tmp_path / "q.csv"), "--threshold", "0.3",
                      "--size-policy", "center-crop", "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unusable image(s)" in result.stderr
    preds = pd.read_csv(tmp_path / "q.csv", keep_default_na=False)
    assert len(preds) == 7 and preds.loc[preds["path"].str.endswith("broken.png"), "label"].tolist() == [""]


def test_benchmark_writes_a_markdown_table(cv_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = cv_run
    other = write_class_folders(tmp_path / "other", n_atypical=6, n_normal=10, seed=3, metadata=False)
    result = mitotype("benchmark", "--train", str(data), "--test", f"OTHER={other}", "--test", f"SELF={data}", "--folds", "3",
                      "--out", str(run), "--resume", *sets("train.epochs=1"))
    assert result.returncode == 0, result.stderr
    table = (run / "benchmark.md").read_text()
    assert "| OTHER | ensemble |" in table and "| SELF | folds (mean ± sd) |" in table and "±" in table


def test_train_and_inspect(tmp_path: Path) -> None:
    data = write_class_folders(tmp_path / "d")
    result = mitotype("data", "inspect", str(data), "--patch-size", "32", "--per-group")
    assert result.returncode == 0 and "DOM_A" in result.stdout and "no problems found" in result.stdout
    assert "DOM_A/000.tiff" in result.stdout  # the per-group table
    result = mitotype("train", "--data", str(data), "--out", str(tmp_path / "run"), *sets("train.epochs=1", "data.val_fraction=0.3"))
    assert result.returncode == 0, result.stderr
    assert "validation: balanced accuracy" in result.stdout and (tmp_path / "run" / "model.json").is_file()
    (data / "Normal" / "N_005.png").write_bytes(b"broken")
    result = mitotype("data", "inspect", str(data), "--patch-size", "32")
    assert result.returncode == 0 and "1 problem(s)" in result.stdout and "N_005.png" in result.stdout


def test_bad_input_gives_one_line_errors(tmp_path: Path) -> None:
    data = write_class_folders(tmp_path / "d")
    (data / "Normal" / "N_003.png").write_bytes(b"\x89PNG broken")
    args = ["cv", "--data", str(data), "--folds", "2", "--out", str(tmp_path / "cv"), *sets()]
    assert_one_line_error(mitotype(*args), "N_003.png", "cannot decode", "--skip-bad")
    assert_one_line_error(mitotype("train", "--data", str(data), "--out", str(tmp_path / "r"), "--set", "train.lrr=1"), "unknown config key 'lrr'")
    assert_one_line_error(mitotype("train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "r")), "absent", "no such file")
    assert_one_line_error(mitotype("cv", "--data", str(data), "--recipe", "nope", "--out", str(tmp_path / "r")), "recipe 'nope' not found")
    one_class = tmp_path / "one"
    (one_class / "Normal").mkdir(parents=True)
    Image.open(data / "Normal" / "N_001.png").save(one_class / "Normal" / "a.png")
    assert_one_line_error(mitotype("train", "--data", str(one_class), "--out", str(tmp_path / "r"), *sets()), "only one class")
    assert_one_line_error(mitotype("predict", str(data), "--model", str(tmp_path)), "no model here")
    assert_one_line_error(mitotype("data", "download", "nope", str(tmp_path)), "unknown dataset 'nope'")


def test_skip_bad_trains_on_the_rest_and_existing_runs_are_kept(tmp_path: Path) -> None:
    data = write_class_folders(tmp_path / "d")
    Image.open(data / "Normal" / "N_001.png").convert("L").save(data / "Normal" / "N_002.png")
    out = tmp_path / "run"
    result = mitotype("train", "--data", str(data), "--out", str(out), "--skip-bad", *sets("train.epochs=1"))
    assert result.returncode == 0, result.stderr
    assert "warning: skipped 1 unusable image(s)" in result.stderr and "greyscale" in result.stderr
    assert len(pd.read_csv(out / "manifest.csv")) == 39
    before = (out / "model.safetensors").read_bytes()
    assert_one_line_error(mitotype("train", "--data", str(data), "--out", str(out), "--skip-bad", *sets()), "exists and is not empty", "--resume")
    assert (out / "model.safetensors").read_bytes() == before


def test_a_trained_model_scores_atypical_above_normal_and_predict_flags_act(tmp_path: Path) -> None:
    """End to end through the CLI on separable synthetic patches (atypical: off-centre blob). Unseen
    patches go in one flat folder beside mirrored / rotated copies (``turned_*``), which TTA, and
    only TTA, scores exactly like the originals."""
    import numpy as np
    from PIL import ImageOps

    data = write_class_folders(tmp_path / "data", n_atypical=20, n_normal=20)
    unseen = write_class_folders(tmp_path / "unseen", n_atypical=10, n_normal=10, seed=5)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted(unseen.rglob("*.png"))):
        with Image.open(path) as im:
            im.save(flat / path.name)
            (ImageOps.mirror(im) if i % 2 else im.rotate(90)).save(flat / f"turned_{path.name}")
    result = mitotype("train", "--data", str(data), "--out", str(tmp_path / "run"),
                      *sets("train.epochs=6", "train.lr=3e-3", "augment.rotate_degrees=0"))
    assert result.returncode == 0, result.stderr

    def predict(*flags: str) -> pd.Series:
        out = tmp_path / f"p{len(list(tmp_path.glob('p*.csv')))}.csv"
        result = mitotype("predict", str(flat), "--model", str(tmp_path / "run"), "--out", str(out), *flags)
        assert result.returncode == 0, result.stderr
        table = pd.read_csv(out)
        return table.set_index(table["path"].map(lambda s: Path(s).name)).sort_index()

    plain = predict()
    p = plain["p_atypical"]
    original = p[~p.index.str.startswith("turned_")]
    atypical, normal = original[original.index.str.startswith("A_")], original[original.index.str.startswith("N_")]
    assert len(atypical) == len(normal) == 10
    assert atypical.mean() - normal.mean() > 0.08, (atypical.mean(), normal.mean())
    assert atypical.min() > normal.max()  # every atypical ranked above every normal
    assert (plain["label"] == np.where(p >= 0.5, "atypical", "normal")).all()  # the model's threshold (0.5)

    cut = float(np.median(p))
    moved = predict("--threshold", str(cut))
    assert np.allclose(moved["p_atypical"], p, atol=1e-6)  # the threshold changes labels, not scores
    assert (moved["label"] == np.where(p >= cut, "atypical", "normal")).all() and (moved["label"] != plain["label"]).any()

    tta = predict("--tta")["p_atypical"]
    turned = lambda s: s[s.index.str.startswith("turned_")].set_axis(original.index)  # noqa: E731
    assert np.allclose(turned(tta), tta[original.index], atol=1e-5)
    assert np.abs(turned(p) - original).max() > 1e-3  # without TTA orientation matters
    assert np.abs(tta - p).max() > 1e-3  # --tta is applied


def _in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """``mitotype ARGS`` run in this process (no interpreter start-up), as a CompletedProcess."""
    return subprocess.CompletedProcess(args, *run_cli(monkeypatch, capsys, *args))


def test_a_manifest_row_without_its_image_stops_or_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    data = write_class_folders(tmp_path / "d")
    (data / "Normal" / "N_004.png").unlink()  # metadata.csv line 18 (12 atypical rows, then N_000..N_004)
    run = lambda *a: _in_process(monkeypatch, capsys, *a)  # noqa: E731
    assert_one_line_error(run("train", "--data", data, "--out", tmp_path / "r", *sets("train.epochs=1")),
                    "metadata.csv", "row 18", "N_004.png", "--skip-missing")
    assert not (tmp_path / "r").exists()
    with pytest.warns(UserWarning, match=r"row 18 \(N_004.png\).*dropped"):  # in this process warnings reach pytest, not stderr
        result = run("train", "--data", data, "--out", tmp_path / "r", "--skip-missing", *sets("train.epochs=1"))
    assert result.returncode == 0, result.stderr
    manifest = pd.read_csv(tmp_path / "r" / "manifest.csv")
    assert len(manifest) == 39 and not manifest["path"].str.endswith("N_004.png").any()
    assert_one_line_error(run("predict", data, "--model", tmp_path / "r", "--out", tmp_path / "p.csv"), "row 18", "N_004.png", "--skip-missing")
    with pytest.warns(UserWarning, match="N_004.png"):
        result = run("predict", data, "--model", tmp_path / "r", "--out", tmp_path / "p.csv", "--skip-missing")
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(tmp_path / "p.csv")) == 39


def _palette(im: Image.Image, transparent: bool) -> Image.Image:
    out = im.convert("P", palette=Image.ADAPTIVE)
    if transparent:
        out.info["transparency"] = 0
    return out


@pytest.mark.parametrize("kind, make, message", [
    ("palette+alpha", lambda im: _palette(im, True), "palette image with transparency"),
    ("LA", lambda im: im.convert("LA"), "greyscale image (LA)"),
    ("L", lambda im: im.convert("L"), "greyscale image (L)"),
    ("RGBA", lambda im: Image.merge("RGBA", (*im.split(), Image.new("L", im.size, 128))), "RGBA image with transparent pixels"),
    ("16-bit", lambda im: im.convert("I;16"), "16/32-bit"),
    ("CMYK", lambda im: im.convert("CMYK"), "CMYK image"),
])
def test_unusable_image_modes_stop_train_and_are_skipped_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture, kind: str, make, message: str) -> None:
    data = write_class_folders(tmp_path / "d")
    target = data / "Normal" / "N_006.png"
    with Image.open(data / "Normal" / "N_001.png") as im:
        bad = make(im.convert("RGB"))
    bad.save(target.with_suffix(".tif") if kind == "CMYK" else target, **({"transparency": 0} if kind == "palette+alpha" else {}))
    if kind == "CMYK":  # PNG cannot hold CMYK: the same row points at a TIFF
        target.unlink()
        target = target.with_suffix(".tif")
        meta = pd.read_csv(data / "metadata.csv")
        meta.loc[meta["filename"] == "N_006.png", "filename"] = "N_006.tif"
        meta.to_csv(data / "metadata.csv", index=False)
    run = lambda *a: _in_process(monkeypatch, capsys, *a)  # noqa: E731
    assert_one_line_error(run("train", "--data", data, "--out", tmp_path / "r", *sets("train.epochs=1")), target.name, message, "--skip-bad")
    with pytest.warns(UserWarning, match=re.escape(f"skipped 1 unusable image(s): {target}: ") + ".*" + re.escape(message)):
        result = run("train", "--data", data, "--out", tmp_path / "r", "--skip-bad", *sets("train.epochs=1"))
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(tmp_path / "r" / "manifest.csv")) == 39


def test_an_opaque_palette_image_is_used_as_rgb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import numpy as np

    from mitotype.data.images import decode_patch

    data = write_class_folders(tmp_path / "d")
    with Image.open(data / "Normal" / "N_001.png") as im:
        palette = _palette(im.convert("RGB"), False)
    palette.save(data / "Normal" / "N_006.png")
    assert np.array_equal(decode_patch(data / "Normal" / "N_006.png", 32), np.asarray(palette.convert("RGB")))
    result = _in_process(monkeypatch, capsys, "train", "--data", data, "--out", tmp_path / "r", *sets("train.epochs=1"))
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(tmp_path / "r" / "manifest.csv")) == 40


def test_an_interrupted_command_exits_130_not_0(monkeypatch, capsys) -> None:
    import mitotype.workflows.recipes as recipes

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(recipes, "list_recipes", interrupted)
    code, _, err = run_cli(monkeypatch, capsys, "recipes")
    assert code == 130 and "aborted" in err


@pytest.mark.parametrize("columns", [60, 200])
def test_recipes_piped_or_narrow_never_cuts_a_name_or_weight_source(columns: int) -> None:
    """Squeezed into a narrow terminal or a pipe, rich cut names to 'amibr-prot…': every name and
    weight source word must be there whole, as the table (wide) or one block per recipe (narrow)."""
    listing = mitotype("recipes", "--format", "csv")
    assert listing.returncode == 0, listing.stderr
    rows = pd.read_csv(io.StringIO(listing.stdout), keep_default_na=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": str(columns)}
    result = subprocess.run([sys.executable, "-m", "mitotype", "recipes"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    assert ("┃ recipe" in result.stdout) == (columns == 200)  # wide: the table; narrow: blocks
    for name in rows["name"]:  # whole, not the front of a longer name (resnet50-experts / resnet50-experts-4class)
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", result.stdout), name
    for word in {w for source in rows["source"] for w in source.split()}:
        assert re.search(rf"(?<![\w-]){re.escape(word)}", result.stdout), word
