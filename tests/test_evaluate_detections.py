"""`mitotype evaluate-detections`: detections against true figures on images written here, with
counts known by construction, overlays, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import run_cli
from helpers import assert_one_line_error


def _scene(tmp_path: Path) -> tuple[Path, Path]:
    """Two 200 x 160 images; truth: 3 figures on a.png, 1 on b.png; detections: 2 hits (one 10 px
    off), one duplicate of a hit at a lower score, one far false positive, and b's figure missed."""
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((160, 200, 3), 230, np.uint8)).save(tmp_path / name)
    pd.DataFrame({"image": ["a.png", "a.png", "a.png", "b.png"], "x": [20, 100, 180, 50], "y": [20, 80, 140, 50]}).to_csv(
        tmp_path / "truth.csv", index=False)
    pd.DataFrame({"image": ["a.png", "a.png", "a.png", "a.png"], "x": [20, 110, 112, 150], "y": [20, 80, 80, 20],
                  "score": [0.9, 0.8, 0.3, 0.6]}).to_csv(tmp_path / "det.csv", index=False)
    return tmp_path / "det.csv", tmp_path / "truth.csv"


def test_counts_f1_best_threshold_and_overlays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    det, truth = _scene(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "evaluate-detections", det, "--truth", truth, "--out", tmp_path / "ev")
    assert code == 0, err
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["radius_px"] == 30 and (m["n_true"], m["n_detections"], m["n_images"]) == (4, 4, 2)
    at = m["at_threshold"]
    assert (at["tp"], at["fp"], at["fn"]) == (2, 2, 2) and at["f1"] == pytest.approx(4 / 8)
    best = m["best_f1"]  # dropping the 0.3 duplicate and the 0.6 stray: 2 TP, 0 FP, 2 FN at 0.8
    assert best["threshold"] == 0.8 and best["f1"] == pytest.approx(4 / 6)
    per_image = pd.read_csv(tmp_path / "ev" / "per_image.csv").set_index("image")
    assert per_image.loc["b.png", ["tp", "fp", "fn"]].tolist() == [0, 0, 1]
    overlay = np.asarray(Image.open(tmp_path / "ev" / "overlays" / "a.png"))
    assert (overlay == (230, 30, 30)).all(axis=2).any() and (overlay == (40, 110, 255)).all(axis=2).any()  # FP red, TP blue
    assert (np.asarray(Image.open(tmp_path / "ev" / "overlays" / "b.png")) == (255, 200, 0)).all(axis=2).any()  # missed: yellow
    assert "best F1 0.667 at 0.8" in out


def test_the_radius_follows_the_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    det, truth = _scene(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "evaluate-detections", det, "--truth", truth, "--out", tmp_path / "ev", "--mpp", "1.0",
                           "--no-overlays")
    assert code == 0, err  # at 1 um/px: 7.5 px, so the detection 10 px off no longer matches
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["radius_px"] == 7.5 and m["at_threshold"]["tp"] == 1 and not (tmp_path / "ev" / "overlays").exists()


@pytest.mark.parametrize("edit, needles", [
    (lambda d: d.assign(score=["a", 0.8, 0.3, 0.6]), ("det.csv row 2: score 'a' is not a finite number",)),
    (lambda d: d.drop(columns="score"), ("det.csv: column(s) score missing",)),
    (lambda d: d.assign(x=[20, float("nan"), 112, 150]), ("det.csv row 3: x nan is not a finite number",)),
    (lambda d: d.assign(image=["c.png"] * 4), ("det.csv: image 'c.png' is not among the truth's images",)),
])
def test_bad_detections_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                            edit, needles: tuple[str, ...]) -> None:
    det, truth = _scene(tmp_path)
    edit(pd.read_csv(det)).to_csv(det, index=False)
    assert_one_line_error(run_cli(monkeypatch, capsys, "evaluate-detections", det, "--truth", truth, "--out", tmp_path / "ev"), *needles)
    assert not (tmp_path / "ev" / "metrics.json").exists()
