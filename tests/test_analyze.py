"""`mitotype analyze`: a slide to counts (tissue, tiles, figures, classification, hotspots, report) and
many slides on Dask, on synthetic pyramidal JPEG TIFFs with figures where the test puts them."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiffslide
from PIL import Image

from conftest import TINY, run_cli
from scenes import FIGURE, NUCLEUS, STROMA

from mitotype.config import load_config
from mitotype.data.pyramid import write_pyramid
from mitotype.data.slides import TiffSlideSource
from mitotype.data.tissue import TissueMap, read_thumbnail
from mitotype.errors import MitotypeError
from mitotype.inference.points import wilson_interval
from mitotype.models.artifact import save_model
from mitotype.models.registry import create_model
from mitotype.workflows import analyze as wf
from mitotype.workflows.slide import AnalyzeOptions, Models, analyze_slide

MPP = 0.25
GLASS = 243
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# ---------------------------------------------------------------- synthetic slides and stand-in networks

def _blob(img: np.ndarray, x: float, y: float, r: float, colour: np.ndarray, rng: np.random.Generator, lobes: int = 0) -> None:
    """A (lobed) disc drawn in a window around (x, y) only, so big slides stay cheap to draw."""
    h, w = img.shape[:2]
    reach = int(math.ceil(r * 1.3)) + 1
    x0, y0, x1, y1 = max(0, int(x) - reach), max(0, int(y) - reach), min(w, int(x) + reach + 1), min(h, int(y) + reach + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    angle = np.arctan2(yy - y, xx - x)
    radius = r * (1 + (0.25 * np.sin(lobes * angle + rng.uniform(0, 6.28)) if lobes else 0))
    img[y0:y1, x0:x1][np.hypot(xx - x, yy - y) <= radius] = colour


def draw_slide(size: tuple[int, int], figures: list[tuple[float, float]], *, atypical: tuple[int, ...] = (),
               tissue: list[tuple[int, int, int, int]] | None = None, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: glass, pink tissue boxes (x0, y0, x1, y1; default all) with pale nuclei every
    ~60 px, and a dark lobed figure at each point (radius 9 px; 14 px for the indices in ``atypical``)."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.full((h, w, 3), GLASS, np.uint8)
    for x0, y0, x1, y1 in tissue if tissue is not None else [(0, 0, w, h)]:
        noise = rng.integers(-5, 6, (y1 - y0, x1 - x0, 3), dtype=np.int16)
        img[y0:y1, x0:x1] = np.clip(STROMA.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        for _ in range((x1 - x0) * (y1 - y0) // 3600):
            x, y = rng.uniform(x0 + 6, x1 - 6), rng.uniform(y0 + 6, y1 - 6)
            if all(math.hypot(x - fx, y - fy) > 40 for fx, fy in figures):
                _blob(img, x, y, rng.uniform(4, 6), NUCLEUS, rng)
    for i, (fx, fy) in enumerate(figures):
        _blob(img, fx, fy, 14 if i in atypical else 9, FIGURE, rng, lobes=3)
    return img


class DarknessScorer:
    """The detector's stand-in: p = how dark the patch's centre is (figures ~0.9, pale nuclei ~0.4)."""

    name = "darkness"

    def p_atypical(self, batch_u8, tta: bool = False) -> np.ndarray:
        batch = np.asarray(batch_u8, dtype=np.float32)
        c = batch.shape[1] // 2
        return np.clip((140.0 - batch[:, c - 3:c + 4, c - 3:c + 4].mean(axis=(1, 2, 3))) / 80.0, 0, 1).astype(np.float32)


class SizeScorer:
    """The classifier's stand-in: p_atypical = how much of the patch is dark (big figures are 'atypical')."""

    name = "size"

    def p_atypical(self, batch_u8, tta: bool = False) -> np.ndarray:
        dark = np.asarray(batch_u8, dtype=np.float32).mean(axis=3) < 120
        return np.clip((dark.mean(axis=(1, 2)) - 0.2) / 0.3, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random detector and classifier (32 px patches at 0.25 um/px), saved as artifacts."""
    import torch

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cfg = load_config("detector-lite0", TINY)
    save_model(create_model(cfg.model), cfg, root / "detector", threshold=0.5, trained_on={}, metrics={})
    cfg = load_config("lite0-quick", TINY)
    save_model(create_model(cfg.model), cfg, root / "classifier", threshold=0.5, trained_on={}, metrics={})
    return root / "detector", root / "classifier"


@pytest.fixture
def standins(monkeypatch: pytest.MonkeyPatch):
    """Models load as usual, then score with the stand-ins, so what analyze does around the networks is checked exactly."""
    real = Models.load.__func__  # type: ignore[attr-defined]
    loads: list[str] = []

    def load(cls, spec):
        loads.append(wf._worker_id())
        loaded = real(cls, spec)
        loaded.detector.scorer = DarknessScorer()
        if loaded.classifier is not None:
            loaded.classifier = (loaded.classifier[0], SizeScorer())
        return loaded

    monkeypatch.setattr(Models, "load", classmethod(load))
    wf.clear_model_cache()
    yield loads
    wf.clear_model_cache()


def matched(found: pd.DataFrame, truth: list[tuple[float, float]], radius: float = 10.0) -> bool:
    """Every true figure has a detection within ``radius`` px and there is no other detection."""
    if len(found) != len(truth):
        return False
    return all(np.hypot(found["x"] - x, found["y"] - y).min() <= radius for x, y in truth)


# ---------------------------------------------------------------- one slide

# 9 figures on a 1536 x 1024 slide with a glass margin; several sit on 256 px tile borders
FIGS = [(256.0, 300.0), (511.0, 512.0), (512.5, 700.0), (768.0, 768.0), (900.0, 200.0), (1200.0, 256.0),
        (300.0, 800.0), (1100.0, 600.0), (1300.0, 850.0)]
ATYPICAL = (1, 4, 7)
TISSUE_BOX = (128, 128, 1408, 896)


@pytest.fixture
def slide(tmp_path: Path) -> Path:
    path = tmp_path / "slides" / "case 1.tif"
    write_pyramid(path, draw_slide((1536, 1024), FIGS, atypical=ATYPICAL, tissue=[TISSUE_BOX]), mpp=MPP)
    return path


def test_a_slide_gives_its_figures_counts_hotspot_and_files(slide: Path, models, standins, tmp_path: Path, monkeypatch, capsys) -> None:
    det, cls = models
    out = tmp_path / "out"
    code, stdout, err = run_cli(monkeypatch, capsys, "analyze", slide, "--out", out, "--model", det, "--classifier", cls,
                                "--backend", "torch", "--tile", "256")
    assert code == 0, err
    folder = out / "case 1"
    assert sorted(p.name for p in folder.iterdir()) == ["figures.csv", "figures.geojson", "report.html", "result.json", "tissue.png"]
    figures = pd.read_csv(folder / "figures.csv")
    assert list(figures.columns) == ["x", "y", "score", "p_atypical", "label"]
    assert matched(figures, FIGS), figures
    for i, (x, y) in enumerate(FIGS):
        nearest = figures.iloc[int(np.argmin(np.hypot(figures["x"] - x, figures["y"] - y)))]
        assert nearest["label"] == ("atypical" if i in ATYPICAL else "normal")
    geo = json.loads((folder / "figures.geojson").read_text())
    assert len(geo["features"]) == 9
    assert sorted(f["properties"]["classification"]["name"] for f in geo["features"]) == ["atypical"] * 3 + ["normal"] * 6

    row = pd.read_csv(out / "summary.csv").iloc[0]
    assert row["slide"] == "case 1.tif" and row["mpp"] == MPP and not row["coarser_than_model"] and pd.isna(row["error"])
    assert (row["mitotic_count"], row["atypical_count"]) == (9, 3)
    assert row["atypical_fraction"] == pytest.approx(1 / 3)
    assert (row["atypical_ci95_low"], row["atypical_ci95_high"]) == pytest.approx(wilson_interval(3, 9))
    box_mm2 = (TISSUE_BOX[2] - TISSUE_BOX[0]) * (TISSUE_BOX[3] - TISSUE_BOX[1]) * MPP**2 / 1e6
    assert row["tissue_mm2"] == pytest.approx(box_mm2, rel=0.06)  # Otsu on an 8 um/px thumbnail
    assert row["mitoses_per_mm2"] == pytest.approx(9 / row["tissue_mm2"])
    assert row["hotspot_2mm2_count"] == row["hotspot_10hpf_count"] == 9  # the slide is smaller than either window
    assert (row["hotspot_2mm2_x"], row["hotspot_2mm2_y"]) == (0, 0)
    read, grid = map(int, row["tiles"].split("/"))
    assert grid == 6 * 4 and read == grid  # every 256 px core touches the tissue box
    saved = json.loads((folder / "result.json").read_text())
    assert saved["key"] and saved["row"]["mitotic_count"] == 9
    assert "case 1.tif" in stdout and "1 of 1 slide(s) analysed" in stdout

    # borders neither lose nor double a figure: other tiles, the same figures
    code, _, err = run_cli(monkeypatch, capsys, "analyze", slide, "--out", tmp_path / "out2", "--model", det, "--classifier", cls,
                           "--backend", "torch", "--tile", "384")
    assert code == 0, err
    again = pd.read_csv(tmp_path / "out2" / "case 1" / "figures.csv")
    key = ["x", "y"]
    pd.testing.assert_frame_equal(again.sort_values(key).reset_index(drop=True), figures.sort_values(key).reset_index(drop=True))


def test_the_hotspot_is_the_densest_window_and_says_where_it_is(tmp_path: Path, models, standins) -> None:
    # 8000 x 2000 px at 0.25 um/px (2 x 0.5 mm): two tissue strips, 2 figures on the left one, 5 on the right one
    left = [(400.0, 1000.0), (600.0, 1100.0)]
    right = [(6300.0, 900.0), (6400.0, 1000.0), (6500.0, 1100.0), (6600.0, 1000.0), (6450.0, 1150.0)]
    img = draw_slide((8000, 2000), left + right, tissue=[(200, 800, 2400, 1200), (4000, 800, 7800, 1200)])
    write_pyramid(tmp_path / "wide.tif", img, mpp=MPP)
    det, cls = models
    row = analyze_slide(tmp_path / "wide.tif", tmp_path / "out", models=Models.load(wf.ModelSpec(det, cls, backend="torch")),
                        options=AnalyzeOptions(tile=512))
    assert row["mitotic_count"] == 7
    side = round(math.sqrt(2.0) * 1000 / 50) * 50 / MPP  # 28 cells of 50 um: 1.4 mm = 5600 px
    assert (row["hotspot_2mm2_count"], row["hotspot_2mm2_width"], row["hotspot_2mm2_height"]) == (5, side, 2000)
    assert row["hotspot_2mm2_area_mm2"] == pytest.approx(1.4 * 0.5)  # cut to the slide's height
    x0 = row["hotspot_2mm2_x"]
    assert x0 <= min(x for x, _ in right) and x0 + side >= max(x for x, _ in right) and x0 > max(x for x, _ in left)
    assert row["hotspot_10hpf_count"] == 5 and row["hotspot_10hpf_width"] == 31 * 50 / MPP
    read, grid = map(int, row["tiles"].split("/"))
    assert grid == 16 * 4 and read <= 28  # glass tiles are never read


def analyze_and_detect(slide: Path, det: Path, cls: Path, out: Path, *, threshold: float, backend: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(analyze's summary table, its figures.csv) after checking the figures equal detect's on the same pixels."""
    from mitotype.workflows.detect import detect

    wf.clear_model_cache()
    table = wf.analyze(slide, out / "analyze", model=det, classifier=cls, options=AnalyzeOptions(tissue="none", tile=256),
                       backend=backend, threshold=threshold, workers=1)
    ours = pd.read_csv(out / "analyze" / "case 1" / "figures.csv")
    theirs = detect(det, slide, out / "detect.csv", classifier=cls, backend=backend, threshold=threshold, tile=256)
    pd.testing.assert_frame_equal(ours, theirs.drop(columns=["image"]).reset_index(drop=True), check_dtype=False)
    return table, ours


def test_analyze_equals_detect_on_the_same_pixels(slide: Path, models, tmp_path: Path) -> None:
    """Real (tiny, random) networks: analyze's figures are detect's, classified the same, when the mask is all tissue."""
    table, ours = analyze_and_detect(slide, *models, tmp_path, threshold=0.05, backend="torch")
    assert len(ours) > 20 and table.loc[0, "mitotic_count"] == len(ours)


def test_the_tissue_mask_otsu_none_a_file_and_a_slide_without_tissue(tmp_path: Path, models, standins, monkeypatch, capsys) -> None:
    figs = [(300.0, 300.0), (700.0, 600.0), (990.0, 500.0), (1500.0, 500.0)]  # the last on a small island of its own
    img = draw_slide((2048, 1024), figs[:3], tissue=[(64, 64, 1100, 960)])
    img[400:600, 1400:1600] = draw_slide((200, 200), [(100.0, 100.0)])
    write_pyramid(tmp_path / "s.tif", img, mpp=MPP)
    det, cls = models
    spec = wf.ModelSpec(det, cls, backend="torch")
    otsu = analyze_slide(tmp_path / "s.tif", tmp_path / "otsu", models=Models.load(spec), options=AnalyzeOptions(tile=256))
    tissue_mm2 = (1036 * 896 + 200 * 200) * MPP**2 / 1e6
    assert otsu["mitotic_count"] == 4 and otsu["tissue_mm2"] == pytest.approx(tissue_mm2, rel=0.08)
    read, grid = map(int, otsu["tiles"].split("/"))
    assert grid == 32 and read <= 24  # 20 under the big box, 4 under the island: glass tiles are not read
    mask = np.asarray(Image.open(tmp_path / "otsu" / "tissue.png"))
    assert mask.shape == (1024 // 32, 2048 // 32) and mask[300 // 32, 300 // 32] == 255 and mask[900 // 32, 1900 // 32] == 0

    everything = analyze_slide(tmp_path / "s.tif", tmp_path / "none", models=Models.load(spec), options=AnalyzeOptions(tissue="none", tile=256))
    assert everything["tissue_mm2"] == pytest.approx(2048 * 1024 * MPP**2 / 1e6) and everything["tiles"] == "32/32"
    assert everything["mitotic_count"] == 4

    user = np.zeros((32, 64), np.uint8)
    user[:, :30] = 255  # x < 960 px; the tile whose core spans 768-1024 reads the figure at x 990, which is off the mask
    Image.fromarray(user).save(tmp_path / "mask.png")
    part = analyze_slide(tmp_path / "s.tif", tmp_path / "file", models=Models.load(spec),
                         options=AnalyzeOptions(tissue=str(tmp_path / "mask.png"), tile=256))
    assert part["mitotic_count"] == 2 and part["tissue_mm2"] == pytest.approx(960 * 1024 * MPP**2 / 1e6)
    assert pd.read_csv(tmp_path / "file" / "figures.csv")["x"].max() < 960

    write_pyramid(tmp_path / "empty" / "glass.tif", np.full((512, 768, 3), GLASS, np.uint8), mpp=MPP)
    with pytest.warns(UserWarning, match="glass.tif: no tissue found"):
        code, stdout, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "empty", "--out", tmp_path / "glass", "--model", det,
                                    "--classifier", cls, "--backend", "torch")
    assert code == 0, err
    row = pd.read_csv(tmp_path / "glass" / "summary.csv").iloc[0]
    assert (row["mitotic_count"], row["atypical_count"], row["tissue_mm2"], row["mitoses_per_mm2"], row["hotspot_10hpf_count"]) == (0, 0, 0, 0, 0)
    assert "no tissue found" in row["warning"] and pd.isna(row["error"])
    assert pd.read_csv(tmp_path / "glass" / "glass" / "figures.csv").empty
    assert "<div class='warn'>glass.tif: no tissue found" in (tmp_path / "glass" / "glass" / "report.html").read_text()
    code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "empty", "--out", tmp_path / "x", "--model", det, "--tissue-mask",
                           tmp_path / "nothing.png")
    assert code == 2 and "--tissue-mask" in err


def test_plain_images_need_their_mpp_and_a_roi_limits_the_analysis(tmp_path: Path, models, standins, monkeypatch, capsys) -> None:
    figs = [(100.0, 100.0), (300.0, 120.0), (420.0, 400.0), (150.0, 420.0)]
    Image.fromarray(draw_slide((512, 512), figs)).save(tmp_path / "crop.png")
    det, cls = models
    args = ["--model", det, "--classifier", cls, "--backend", "torch", "--tissue-mask", "none"]
    code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "crop.png", "--out", tmp_path / "out", *args)
    assert code == 2 and "--mpp" in err and "per mm²" in err and not (tmp_path / "out").exists()
    code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "crop.png", "--out", tmp_path / "out", "--mpp", "0.25",
                           "--roi", "50,50,300,200", *args)
    assert code == 0, err
    row = pd.read_csv(tmp_path / "out" / "summary.csv").iloc[0]
    assert row["mitotic_count"] == 2 and row["tissue_mm2"] == pytest.approx(300 * 200 * MPP**2 / 1e6)
    found = pd.read_csv(tmp_path / "out" / "crop" / "figures.csv")
    assert matched(found, figs[:2])  # level-0 pixels of the image, not of the ROI
    assert (row["hotspot_2mm2_x"], row["hotspot_2mm2_y"]) == (50, 50)
    code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "crop.png", "--out", tmp_path / "counts", "--mpp", "0.25",
                           "--model", det, "--classifier", "none", "--backend", "torch", "--tissue-mask", "none")
    assert code == 0, err  # counts only: no classifier, no atypical columns
    row = pd.read_csv(tmp_path / "counts" / "summary.csv").iloc[0]
    assert row["mitotic_count"] == 4 and pd.isna(row["atypical_count"]) and pd.isna(row["atypical_fraction"])
    assert list(pd.read_csv(tmp_path / "counts" / "crop" / "figures.csv").columns) == ["x", "y", "score"]
    code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "crop.png", "--out", tmp_path / "x", "--mpp", "0.25",
                           "--model", det, "--classifier", tmp_path / "absent")
    assert code == 2 and "--classifier" in err and "no such file" in err
    code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "crop.png", "--out", tmp_path / "out2", "--mpp", "0.25",
                           "--roi", "400,0,300,200", *args)
    assert code == 1 and "--roi" in err and "reaches past" in err
    code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "crop.png", "--out", tmp_path / "out3", "--mpp", "0.25",
                           "--roi", "1,2,3", *args)
    assert code == 2 and "--roi" in err


def test_resolution_comes_from_the_slide_or_mpp_and_a_coarse_scan_is_flagged(tmp_path: Path, models, standins, monkeypatch, capsys) -> None:
    img = draw_slide((512, 512), [(200.0, 200.0), (350.0, 380.0)])
    write_pyramid(tmp_path / "bare" / "nompp.tif", img, mpp=None)
    det, cls = models
    args = ["--model", det, "--classifier", cls, "--backend", "torch", "--tissue-mask", "none"]
    code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "bare", "--out", tmp_path / "a", *args)
    assert code == 1 and "nompp.tif" in err and "microns per pixel" in err and "--mpp" in err
    assert "microns per pixel" in pd.read_csv(tmp_path / "a" / "summary.csv").loc[0, "error"]
    assert (tmp_path / "a" / "nompp" / "error.txt").is_file()
    code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "bare", "--out", tmp_path / "a", "--mpp", "0.25", *args)
    assert code == 0, err
    assert pd.read_csv(tmp_path / "a" / "summary.csv").loc[0, "mitotic_count"] == 2
    assert not (tmp_path / "a" / "nompp" / "error.txt").exists()  # a success clears the earlier failure

    write_pyramid(tmp_path / "coarse" / "half.tif", img, mpp=0.5)
    with pytest.warns(UserWarning, match="coarser than the model"):
        code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "coarse", "--out", tmp_path / "b", *args)
    assert code == 0, err
    row = pd.read_csv(tmp_path / "b" / "summary.csv").iloc[0]
    assert row["mpp"] == 0.5 and row["coarser_than_model"] and "coarser than the models" in row["warning"]
    assert row["tissue_mm2"] == pytest.approx(512 * 512 * 0.25 / 1e6)  # 0.5 um/px: area counts in its own microns


# ---------------------------------------------------------------- many slides

def _batch(folder: Path) -> dict[str, list[tuple[float, float]]]:
    truth = {"a.tif": [(200.0, 200.0), (600.0, 300.0)], "b.tif": [(300.0, 300.0)], "sub/c.tif": [(150.0, 400.0), (500.0, 150.0), (520.0, 420.0)]}
    for i, (name, figs) in enumerate(truth.items()):
        write_pyramid(folder / name, draw_slide((768, 512), figs, seed=i), mpp=MPP)
    (folder / "broken.tif").write_bytes(b"II*\x00 this is not a slide")
    return truth


def test_many_slides_on_a_two_worker_cluster_fail_alone_resume_and_match_one_worker(tmp_path: Path, models, standins, monkeypatch) -> None:
    pytest.importorskip("distributed")
    truth = _batch(tmp_path / "slides")
    det, cls = models
    kw = dict(model=det, classifier=cls, options=AnalyzeOptions(tile=256), backend="torch")
    one = wf.analyze(tmp_path / "slides", tmp_path / "one", workers=1, **kw)
    seen: list[tuple] = []

    def progress(kind: str, name: str, done: int, total: int) -> None:
        seen.append((kind, name, done, total))
        if kind == "slides" and done:  # each slide's row is on disk when its result arrives
            assert len(pd.read_csv(tmp_path / "two" / "summary.csv")) == done

    standins.clear()
    two = wf.analyze(tmp_path / "slides", tmp_path / "two", workers=2, threads_per_worker=1, processes=False, progress=progress, **kw)
    assert "local" not in standins and len(standins) == len(set(standins)) <= 2  # once per worker (this process had them)
    assert two["slide"].tolist() == one["slide"].tolist() == ["a.tif", "b.tif", "broken.tif", "sub/c.tif"]
    for name, figs in truth.items():
        folder = name.replace(".tif", "").replace("/", "__")
        first, second = (tmp_path / "one" / folder / "figures.csv").read_bytes(), (tmp_path / "two" / folder / "figures.csv").read_bytes()
        assert first == second
        assert matched(pd.read_csv(tmp_path / "two" / folder / "figures.csv"), figs)
    broken = two.set_index("slide").loc["broken.tif"]
    assert "read this slide" in broken["error"] and pd.isna(broken["mitotic_count"])
    assert "Traceback" in (tmp_path / "two" / "broken" / "error.txt").read_text()
    assert not (tmp_path / "two" / "broken" / "result.json").exists()
    assert (two.drop(index=2)["error"] == "").all() and two.drop(index=2)["mitotic_count"].tolist() == [2, 1, 3]
    assert ("slides", "", 0, 4) in seen and sum(1 for s in seen if s[0] == "slides") == 5
    assert {s[1] for s in seen if s[0] == "tiles"} == {"a.tif", "b.tif", "sub/c.tif"}  # tile progress from the workers

    calls: list[str] = []
    real = wf.analyze_slide
    monkeypatch.setattr(wf, "analyze_slide", lambda path, *a, **k: calls.append(Path(path).name) or real(path, *a, **k))
    again = wf.analyze(tmp_path / "slides", tmp_path / "two", workers=2, processes=False, **kw)
    assert calls == ["broken.tif"]  # finished slides are skipped; the failed one is tried again
    pd.testing.assert_frame_equal(again.drop(columns=["seconds", "warning"]), two.drop(columns=["seconds", "warning"]))
    os.utime(tmp_path / "slides" / "b.tif", ns=(1, 1))  # a changed file is analysed again
    wf.analyze(tmp_path / "slides", tmp_path / "two", workers=1, **kw)
    assert calls == ["broken.tif", "b.tif", "broken.tif"]
    wf.analyze(tmp_path / "slides", tmp_path / "two", workers=1, **{**kw, "options": AnalyzeOptions(tile=512)})
    assert len(calls) == 3 + 4  # other options: every slide again


def test_an_existing_cluster_by_its_address_is_used_and_left_running(tmp_path: Path, models, standins) -> None:
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    truth = _batch(tmp_path / "slides")
    (tmp_path / "slides" / "broken.tif").unlink()
    det, cls = models
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        table = wf.analyze(tmp_path / "slides", tmp_path / "out", model=det, classifier=cls, options=AnalyzeOptions(tile=256),
                           backend="torch", scheduler=cluster.scheduler_address)
        assert table["mitotic_count"].tolist() == [len(f) for f in truth.values()] and (table["error"] == "").all()
        with Client(cluster) as client:  # still there for its owner, its workers alive
            assert len(client.scheduler_info()["workers"]) == 2
    assert standins[0] == "local" and any(w.startswith("Worker") for w in standins[1:])  # checked here, run on the workers


def test_worker_processes_give_the_same_figures_as_this_process(tmp_path: Path, models) -> None:
    """The embedded LocalCluster with real worker processes (each loads the real tiny models once)."""
    pytest.importorskip("distributed")
    _batch(tmp_path / "slides")
    (tmp_path / "slides" / "broken.tif").unlink()
    det, cls = models
    kw = dict(model=det, classifier=cls, options=AnalyzeOptions(tile=256), backend="torch", threshold=0.05)
    wf.clear_model_cache()
    wf.analyze(tmp_path / "slides", tmp_path / "here", workers=1, **kw)
    table = wf.analyze(tmp_path / "slides", tmp_path / "procs", workers=2, threads_per_worker=1, processes=True, **kw)
    assert (table["error"] == "").all()
    for folder in ("a", "b", "sub__c"):
        here = (tmp_path / "here" / folder / "figures.csv").read_bytes()
        assert here == (tmp_path / "procs" / folder / "figures.csv").read_bytes() and here.count(b"\n") > 3


def test_where_the_work_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("distributed")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert wf.plan(10, scheduler=None, workers=None, threads_per_worker=None) == (4, 4)  # one worker per 4 cores
    assert wf.plan(2, scheduler=None, workers=None, threads_per_worker=None) == (2, 8)  # at most one per slide
    assert wf.plan(10, scheduler=None, workers=3, threads_per_worker=2) == (3, 2)
    assert wf.plan(1, scheduler=None, workers=8, threads_per_worker=None) == (1, 16)  # one slide: this process
    assert wf.plan(5, scheduler="tcp://h:8786", workers=None, threads_per_worker=None) == (0, None)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "distributed" else real(name, *a))
    assert wf.plan(10, scheduler=None, workers=None, threads_per_worker=None)[0] == 1  # without dask: in this process
    with pytest.raises(MitotypeError, match="workers needs dask"):
        wf.plan(10, scheduler=None, workers=2, threads_per_worker=None)
    with pytest.raises(MitotypeError, match="scheduler needs dask"):
        wf.plan(10, scheduler="tcp://h:8786", workers=None, threads_per_worker=None)


def test_a_worker_caps_its_model_threads() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        wf._cap_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_slide_folders_are_distinct_and_keys_follow_what_the_result_depends_on(tmp_path: Path) -> None:
    assert wf.slide_dirs(["a.tif", "b.svs", "sub/c.tif"]) == {"a.tif": "a", "b.svs": "b", "sub/c.tif": "sub__c"}
    assert wf.slide_dirs(["a.tif", "a.svs"]) == {"a.tif": "a_tif", "a.svs": "a_svs"}
    (tmp_path / "s.tif").write_bytes(b"x")
    key = wf.slide_key(tmp_path / "s.tif", "models", AnalyzeOptions())
    assert key == wf.slide_key(tmp_path / "s.tif", "models", AnalyzeOptions())
    assert key != wf.slide_key(tmp_path / "s.tif", "other models", AnalyzeOptions())
    assert key != wf.slide_key(tmp_path / "s.tif", "models", AnalyzeOptions(roi=(0, 0, 5, 5)))
    (tmp_path / "s.tif").write_bytes(b"xy")
    assert key != wf.slide_key(tmp_path / "s.tif", "models", AnalyzeOptions())


def test_the_models_identity_is_their_weights(tmp_path: Path, models) -> None:
    det, cls = models
    shutil.copytree(det, tmp_path / "copy")
    assert wf.models_identity(wf.ModelSpec(det, cls)) == wf.models_identity(wf.ModelSpec(tmp_path / "copy", cls))
    assert wf.models_identity(wf.ModelSpec(det, cls)) != wf.models_identity(wf.ModelSpec(det, None))
    assert wf.models_identity(wf.ModelSpec(det, cls)) != wf.models_identity(wf.ModelSpec(det, cls, backend="onnxruntime"))
    weights = tmp_path / "copy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    assert wf.models_identity(wf.ModelSpec(det, cls)) != wf.models_identity(wf.ModelSpec(tmp_path / "copy", cls))


# ---------------------------------------------------------------- memory, tissue geometry, pyramids

def test_peak_memory_is_the_same_for_a_slide_nine_times_larger(tmp_path: Path, models, standins, monkeypatch) -> None:
    det, cls = models
    loaded = Models.load(wf.ModelSpec(det, cls, backend="torch"))
    largest: list[int] = []
    real = TiffSlideSource.read_box

    def read_box(self, level, x0, y0, x1, y1):
        largest.append((x1 - x0) * (y1 - y0))
        return real(self, level, x0, y0, x1, y1)

    monkeypatch.setattr(TiffSlideSource, "read_box", read_box)
    peaks, biggest = [], []
    for side in (1024, 3072):
        write_pyramid(tmp_path / f"{side}.tif", draw_slide((side, side), [(side / 2, side / 2)], seed=side), mpp=MPP)
        if side == 1024:  # warm-up: first-use allocations (torch, codecs) are not the slide's
            analyze_slide(tmp_path / f"{side}.tif", tmp_path / "warm", models=loaded, options=AnalyzeOptions(tile=512))
        largest.clear()
        tracemalloc.start()
        row = analyze_slide(tmp_path / f"{side}.tif", tmp_path / str(side), models=loaded, options=AnalyzeOptions(tile=512))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        biggest.append(max(largest))
        assert row["mitotic_count"] == 1
    assert max(biggest) <= 1024 * 1024  # no read is larger than one chunk, whatever the slide
    assert peaks[1] - peaks[0] < 2.5e6, peaks  # 9x the pixels; one level-1 read of the big slide alone would add 7 MB


def test_tissue_map_geometry() -> None:
    whole = np.zeros((10, 20), bool)
    whole[2:6, 4:12] = True  # 8 um pixels: tissue over x 32..96 um, y 16..48 um
    region = (20.0, 10.0, 100.0, 60.0)
    tissue = TissueMap.crop(whole, 8.0, region)
    assert tissue.origin == (2, 1) and tissue.mask.shape == (7, 11)  # pixels 2..12 x 1..7 cover the region
    assert tissue.area_mm2() == pytest.approx(64 * 32 / 1e6)
    assert tissue.on_tissue(np.array([40.0, 31.9, 95.9]), np.array([20.0, 20.0, 47.9])).tolist() == [True, False, True]
    assert tissue.any_tissue((90.0, 40.0, 120.0, 80.0)) and not tissue.any_tissue((0.0, 0.0, 32.0, 16.0))
    cells = tissue.cells(16.0)  # 5 x 4 cells of 16 um from (20, 10): centres at x 28, 44, ..., y 18, 34, ...
    assert cells.shape == (4, 5) and cells[0].tolist() == [False, True, True, True, True] and not cells[3].any()
    part = TissueMap.crop(whole, 8.0, (40.0, 20.0, 60.0, 40.0))
    assert part.area_mm2() == pytest.approx(20 * 20 / 1e6)  # partial pixels count by the share the region covers


def test_a_pyramid_reads_back_with_its_mpp_and_the_chunked_thumbnail_matches_one_read(tmp_path: Path) -> None:
    img = draw_slide((1100, 700), [(300.0, 300.0)], tissue=[(100, 100, 900, 600)])
    levels = write_pyramid(tmp_path / "p.tif", img, mpp=0.25)
    assert [lv.shape[:2] for lv in levels] == [(700, 1100), (350, 550), (175, 275), (87, 137)]
    slide = tiffslide.TiffSlide(str(tmp_path / "p.tif"))
    assert slide.properties["tiffslide.mpp-x"] == pytest.approx(0.25) and slide.level_count == 4
    slide.close()
    source = TiffSlideSource(tmp_path / "p.tif")
    import mitotype.data.tissue as tissue_module

    whole = read_thumbnail(source, 1.0)
    tissue_module.CHUNK, saved = 64, tissue_module.CHUNK
    try:
        chunked = read_thumbnail(source, 1.0)
    finally:
        tissue_module.CHUNK = saved
    assert chunked.shape == whole.shape == (175, 275, 3) and np.array_equal(chunked, whole)  # level 2 read at its own mpp
    assert np.abs(read_thumbnail(source, 8.0).astype(int).mean() - img[:696, :1096].mean()) < 2
    source.close()


# ---------------------------------------------------------------- the report

GEOMETRY = """<script>
const r = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
const imgs = ['overview', 'heatmap'].map(i => document.getElementById(i));
document.body.insertAdjacentHTML('beforeend', '<pre id="geometry">' + JSON.stringify({
  overview: r(imgs[0]), heatmap: r(imgs[1]), decoded: imgs.every(i => i.complete && i.naturalWidth > 0),
  gallery: document.querySelectorAll('#gallery-atypical img').length,
  galleryDecoded: [...document.querySelectorAll('#gallery-atypical img')].every(i => i.complete && i.naturalWidth > 0)}) + '</pre>');
</script></body>"""


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--window-size=1200,2400"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


def test_the_report_holds_counts_views_and_the_atypical_gallery_escaped(tmp_path: Path, models, standins) -> None:
    det, cls = models
    path = tmp_path / "<b>evil.tif"
    write_pyramid(path, draw_slide((1536, 1024), FIGS, atypical=ATYPICAL, tissue=[TISSUE_BOX]), mpp=MPP)
    wf.analyze(path, tmp_path / "out", model=det, classifier=cls, options=AnalyzeOptions(tile=512), backend="torch")
    page = (tmp_path / "out" / "<b>evil" / "report.html").read_text()
    assert "<b>evil" not in page and "&lt;b&gt;evil.tif" in page
    assert "Content-Security-Policy" in page and "<script" not in page and "http" not in page.replace("http-equiv", "")
    cells = dict(re.findall(r"<tr><td class='k'>([^<]*)</td><td>([^<]*)</td></tr>", page))
    assert cells["mitotic count"] == "9" and cells["atypical count"] == "3"
    assert cells["atypical fraction (95% Wilson interval)"].startswith("0.333 [")
    assert "9 figures" in cells["hotspot: densest 2 mm² window"]
    gallery = page[page.index("id='gallery-atypical'"):]
    assert gallery.count("<figure>") == 3 and gallery.count("data:image/png;base64,") == 3
    if CHROMIUM is None:
        pytest.skip("no chromium browser installed (Debian: apt-get install chromium; .ci/run does)")

    probe = tmp_path / "probe.html"
    probe.write_text(re.sub(r"<meta http-equiv=\"Content-Security-Policy\"[^>]*>", "", page).replace("</body>", GEOMETRY))
    dom = _chromium("--dump-dom", probe.as_uri(), profile=tmp_path / "p1")
    found = re.search(r'<pre id="geometry">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    geometry = json.loads(found.group(1))
    assert geometry["decoded"] and geometry["gallery"] == 3 and geometry["galleryDecoded"]
    shot = tmp_path / "shot.png"
    report = tmp_path / "out" / "<b>evil" / "report.html"
    _chromium(f"--screenshot={shot}", report.as_uri(), profile=tmp_path / "p2")
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    left, top, right, bottom = (int(round(v)) for v in geometry["overview"])
    assert right - left > 400 and 0 <= top < bottom <= img.shape[0]
    view = img[top:bottom, left:right]
    pink = (np.abs(view - STROMA.astype(int)).max(axis=2) < 30).mean()
    red = ((view[..., 0] > 180) & (view[..., 1] < 90) & (view[..., 2] < 90)).sum()  # the atypical figures' rings
    assert pink > 0.3 and red > 20, (pink, red)
    left, top, right, bottom = (int(round(v)) for v in geometry["heatmap"])
    heat = img[top:min(bottom, img.shape[0]), left:right]
    assert ((heat[..., 0] > 200) & (heat[..., 2] < 120)).mean() > 0.01  # warm colours where the figures are


def test_bad_options_are_one_line_before_any_work(tmp_path: Path, models, monkeypatch, capsys) -> None:
    det, cls = models
    write_pyramid(tmp_path / "s.tif", draw_slide((256, 256), []), mpp=MPP)
    for args, flag in ((["--tile", "16"], "--tile"), (["--mpp", "0"], "--mpp"), (["--workers", "0"], "--workers"),
                       (["--threshold", "1.5"], "--threshold"), (["--backend", "nope"], "--backend")):
        code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "s.tif", "--out", tmp_path / "o", "--model", det, *args)
        assert code == 2 and flag in err and len(err.strip().splitlines()) == 1, (args, err)
    code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "s.tif", "--out", tmp_path / "o", "--model", cls)
    assert code == 2 and "--model" in err and "a classifier" in err
    code, _, err = run_cli(monkeypatch, capsys, "analyze", tmp_path / "s.tif", "--out", tmp_path / "o", "--model", det, "--classifier", det)
    assert code == 2 and "--classifier" in err and "a detector" in err
    assert not (tmp_path / "o" / "s").exists()


# ---------------------------------------------------------------- the benchmark scripts, on tiny settings

def test_the_analyze_benchmarks_run_on_tiny_slides(tmp_path: Path, models, capsys) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import analyze_accuracy
    import analyze_throughput
    import synthetic_slides

    from conftest import write_class_folders

    slides = tmp_path / "slides"
    truth = synthetic_slides.main(["--out", str(slides), "--n", "2", "--size", "1024x768", "--figures", "6", "--margin", "128"])
    assert len(truth) == 12 and sorted(p.name for p in slides.iterdir()) == ["slide_00.tif", "slide_01.tif", "truth.csv"]
    assert tiffslide.TiffSlide(str(slides / "slide_00.tif")).properties["tiffslide.mpp-x"] == pytest.approx(0.25)
    det, cls = models
    common = ["--slides", str(slides), "--model", str(det), "--classifier", str(cls), "--backend", "torch", "--tile", "256",
              "--threshold", "0.01"]
    wf.clear_model_cache()
    acc = analyze_accuracy.main([*common, "--out", str(tmp_path / "acc")])
    assert acc["true_figures"] == 12 and acc["analyze"]["tp"] + acc["analyze"]["fn"] == 12 and acc["recall_difference"] <= 0.01
    assert json.loads((tmp_path / "acc" / "summary.json").read_text())["detect"]["detections"] == acc["detect"]["detections"]
    speed = analyze_throughput.main([*common, "--rounds", "1", "--workers", "1", "--out", str(tmp_path / "speed")])
    assert speed["candidates"] > 12 and [s["name"] for s in speed["sides"]] == ["detector bare forward", "analyze end to end"]
    assert speed["slides_per_hour"]["1"]["slides"] == 2 and speed["tissue_mm2"] > 0
    assert "analyze end to end / bare forward" in capsys.readouterr().out

    patches = write_class_folders(tmp_path / "patches", n_atypical=3, n_normal=6)
    table = synthetic_slides.main(["--out", str(tmp_path / "mosaic"), "--patches", str(patches), "--n", "1", "--per-slide", "9",
                                   "--margin", "64"])
    assert len(table) == 9 and (table["label"] == "atypical").sum() == 3
    level0 = np.asarray(Image.open(tmp_path / "mosaic" / "slide_00.tif"))
    assert level0.shape == (3 * 32 + 128, 3 * 32 + 128, 3) and sorted(set(table["x"])) == [64 + 16, 64 + 48, 64 + 80]


def test_analyze_with_a_heat_map_detector_equals_detect(slide: Path, models, tmp_path: Path) -> None:
    """The bundled detector's shape (a tiny, random heat map): analyze reads its tiles with the heat
    map's context, and its figures are detect's on the same pixels."""
    from helpers import untrained_model
    from safetensors.torch import load_file, save_file

    heat = untrained_model("detector-heatmap-lite0", ["model.backbone=test_efficientnet", "model.pretrained=none",
                                                      "data.patch_size=64", "model.input_size=64"], tmp_path / "heat")
    weights = load_file(str(heat / "model.safetensors"))
    weights["heads.heatmap.bias"] = weights["heads.heatmap.bias"] * 0  # from the focal loss's prior (p 0.01) to p 0.5: peaks to find
    save_file(weights, str(heat / "model.safetensors"))
    table, ours = analyze_and_detect(slide, heat, models[1], tmp_path, threshold=0.5, backend="auto")
    assert len(ours) > 5 and table.loc[0, "mitotic_count"] == len(ours) and table.loc[0, "error"] == ""
