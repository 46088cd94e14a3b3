"""`mitotype data mosaic`: figures pasted into figure-free tissue, truth where they went, folds as cv makes them.

Synthetic patches only: light textured tissue with lighter "nuclei", and one dark blob (the figure) at
each patch's centre, so a dark blob in a mosaic is a pasted figure and nothing else is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import assert_one_line_error
from PIL import Image
from scipy import ndimage

from mitotype.data import mosaic as mosaic_mod
from mitotype.data.mosaic import BORDER, MIN_DISTANCE, build_mosaics, iter_mosaics, select_fold, write_mosaics
from mitotype.data.points import read_points
from mitotype.data.readers import read_dataset
from mitotype.data.splits import grouped_folds
from mitotype.errors import MitotypeError

P = 128
DARK = 90  # min channel below this: figure
SIZE = 320


def synthetic_patch(rng: np.random.Generator, tint: np.ndarray, figure: bool = True) -> np.ndarray:
    img = np.full((P, P, 3), 215.0) + tint
    img += ndimage.gaussian_filter(rng.normal(0, 40, (P, P, 3)), (2, 2, 0))
    yy, xx = np.mgrid[:P, :P]
    for _ in range(4):  # nuclei: darker than tissue, far lighter than a figure
        cy, cx = rng.uniform(8, P - 8, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 7 ** 2] = (160, 125, 175)
    if figure:
        blob = ((yy - 64) / 9.0) ** 2 + ((xx - 64) / 6.0) ** 2 < 1
        img[blob] = (40, 20, 70)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_patches(root: Path, n: int = 40, n_slides: int = 4, seed: int = 0, xy: bool = False) -> Path:
    """AMi-Br layout: Atypical/, Normal/, metadata.csv (slide, dataset, label)."""
    rng = np.random.default_rng(seed)
    tints = rng.uniform(-20, 20, (n_slides, 3))
    rows = []
    for i in range(n):
        label = "Atypical" if i % 3 == 0 else "Normal"
        (root / label).mkdir(parents=True, exist_ok=True)
        name = f"p{i:03d}.png"
        Image.fromarray(synthetic_patch(rng, tints[i % n_slides])).save(root / label / name)
        row = {"filename": name, "slide": f"s{i % n_slides}.tiff", "dataset": "A" if i % n_slides < 2 else "B", "label": label}
        if xy:
            row.update(x=1000 * i, y=500)
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def dark_pixels(image: np.ndarray) -> np.ndarray:
    """(x, y) of every figure-dark pixel."""
    ys, xs = np.nonzero(image.min(axis=2) < DARK)
    return np.column_stack([xs, ys]).astype(float)


def far_from(points: np.ndarray, truth: np.ndarray, radius: float = 30) -> np.ndarray:
    """The points farther than ``radius`` px from every truth point."""
    if not len(points):
        return points
    d = np.hypot(points[:, None, 0] - truth[None, :, 0], points[:, None, 1] - truth[None, :, 1])
    return points[d.min(axis=1) > radius]


def dark_centroids(image: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(image.min(axis=2) < DARK)
    if not n:
        return np.zeros((0, 2))
    sizes = ndimage.sum(np.ones_like(labels), labels, range(1, n + 1))
    centres = np.array(ndimage.center_of_mass(np.ones_like(labels), labels, range(1, n + 1)))[:, ::-1]  # (x, y)
    return centres[sizes >= 15]


@pytest.fixture(scope="module")
def patches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_patches(tmp_path_factory.mktemp("mosaic") / "patches")


@pytest.fixture(scope="module")
def manifest(patches: Path) -> pd.DataFrame:
    return read_dataset(patches).manifest


@pytest.fixture(scope="module")
def built(manifest: pd.DataFrame) -> list:
    return list(iter_mosaics(manifest, n_images=5, size=SIZE, figures_per_image=4, seed=3))


def test_the_same_seed_builds_the_same_images_another_seed_others(manifest: pd.DataFrame, built: list) -> None:
    again = build_mosaics(manifest, n_images=2, size=SIZE, figures_per_image=4, seed=3)
    for (image, truth), first in zip(again, built):
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
        assert np.array_equal(image, first.image)
        pd.testing.assert_frame_equal(truth, first.truth)
    other = build_mosaics(manifest, n_images=1, size=SIZE, figures_per_image=4, seed=4)
    assert not np.array_equal(other[0][0], built[0].image)


def test_each_truth_point_is_a_pasted_figure_and_the_background_holds_none(built: list) -> None:
    n_figures = 0
    for m in built:
        truth = m.truth[["x", "y"]].to_numpy(float)
        found = dark_centroids(m.image)
        assert len(truth) >= 1
        # every truth point has a dark blob's centroid within 2 px
        for point in truth:
            assert np.hypot(*(found - point).T).min() <= 2.0, (m.info["image"], point, found)
        # no figure-dark pixel farther than 30 px from every truth point: the background is figure-free
        assert not len(far_from(dark_pixels(m.image), truth)), (m.info["image"], far_from(dark_pixels(m.image), truth)[:5])
        n_figures += len(truth)
    assert n_figures >= 10


def test_background_blocks_hold_no_figure_pixel(manifest: pd.DataFrame) -> None:
    cache = mosaic_mod._Patches(manifest)
    blocks = [b for row in range(len(manifest)) for b in cache.blocks(row)]
    assert len(blocks) == 4 * len(manifest)
    assert all((b.min(axis=2) >= DARK).all() for b in blocks)


def test_figures_keep_their_distances_from_each_other_and_the_border(built: list) -> None:
    for m in built:
        xy = m.truth[["x", "y"]].to_numpy(float)
        assert (xy >= BORDER).all() and (xy <= SIZE - 1 - BORDER).all()
        d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
        assert d[~np.eye(len(xy), dtype=bool)].min() >= MIN_DISTANCE
        # one slide per image, its rows' provenance named
        assert m.truth["group"].nunique() == 1 and m.truth["source"].map(lambda p: Path(p).is_file()).all()


def test_every_patch_is_pasted_once_by_default(manifest: pd.DataFrame) -> None:
    mosaics = list(iter_mosaics(manifest, size=SIZE, figures_per_image=4, seed=0))
    sources = pd.concat([m.truth for m in mosaics])["source"]
    assert sorted(sources) == sorted(manifest["path"])  # 40 patches, 4 slides of 10: 3 images of 4, 3, 3 per slide
    assert len(mosaics) == 12 and max(len(m.truth) for m in mosaics) == 4


def test_blocks_near_another_annotated_figure_and_padding_stay_out_of_the_background(tmp_path: Path) -> None:
    root = write_patches(tmp_path / "p", n=8, n_slides=1, xy=True)
    meta = pd.read_csv(root / "metadata.csv")
    # patch 1's figure lies 44 px left and 44 px above patch 0's: at (20, 20) in patch 0, in its top-left block
    meta.loc[1, ["x", "y"]] = (meta.loc[0, "x"] - 44, meta.loc[0, "y"] - 44)
    pd.DataFrame(meta).to_csv(root / "metadata.csv", index=False)
    first = root / ("Atypical" if meta.loc[0, "label"] == "Atypical" else "Normal") / meta.loc[0, "filename"]
    img = np.asarray(Image.open(first)).copy()
    yy, xx = np.mgrid[:P, :P]
    img[((yy - 20) / 6.0) ** 2 + ((xx - 20) / 6.0) ** 2 < 1] = (40, 20, 70)  # that neighbour, visible
    img[:, 84:] = 0  # and black padding on the right, into the disc
    Image.fromarray(img).save(first)
    m = read_dataset(root).manifest
    cache = mosaic_mod._Patches(m)
    row = int(np.flatnonzero(m["path"] == str(first.resolve()))[0])
    assert len(cache.blocks(row)) == 1  # top-left: near the neighbour; both right: padded
    used = []
    for mosaic in iter_mosaics(m, n_images=3, size=SIZE, figures_per_image=3, seed=1):
        assert not (mosaic.image.max(axis=2) < 30).any()  # no padding pasted with the figure
        assert not len(far_from(dark_pixels(mosaic.image), mosaic.truth[["x", "y"]].to_numpy(float)))  # nor the neighbour
        used += list(mosaic.truth["source"])
    assert str(first.resolve()) in used


def test_write_mosaics_files_read_back_as_points_and_score_perfectly(manifest: pd.DataFrame, tmp_path: Path) -> None:
    from mitotype.workflows.detections import evaluate_detections

    out = tmp_path / "m"
    summary = write_mosaics(manifest, out, n_images=3, size=SIZE, figures_per_image=4, seed=2, mpp=0.25)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["mosaic_0000.png", "mosaic_0001.png", "mosaic_0002.png", "mosaics.json", "truth.csv"]
    truth = pd.read_csv(out / "truth.csv")
    assert list(truth.columns[:4]) == ["image", "x", "y", "label"] and set(truth["label"]) <= {"atypical", "normal"}
    assert {"source", "group", "domain"} <= set(truth.columns)
    points = read_points(out / "truth.csv")
    assert len(points.table) == summary["n_figures"] == len(truth)
    assert (points.table["label"] == (truth["label"] == "atypical").astype(int)).all()
    area = (SIZE * 0.25 / 1000) ** 2
    for entry, (_, rows) in zip(summary["per_image"], truth.groupby("image", sort=True)):
        assert entry["area_mm2"] == pytest.approx(area, abs=1e-6)
        assert entry["figure_free_area_mm2"] == pytest.approx(area - len(rows) * np.pi * 0.0075 ** 2, abs=1e-6)
    assert summary["seed"] == 2 and summary["mpp"] == 0.25 and summary["n_images"] == 3 and summary["format_version"] == 1
    det = truth[["image", "x", "y"]].assign(score=1.0)
    det.to_csv(tmp_path / "det.csv", index=False)
    metrics = evaluate_detections(tmp_path / "det.csv", out / "truth.csv", tmp_path / "eval", overlays=False)
    assert metrics["best_f1"]["f1"] == 1.0 and metrics["n_true"] == len(truth)
    with pytest.raises(MitotypeError, match="not empty"):
        write_mosaics(manifest, out, n_images=1, size=SIZE, figures_per_image=2, seed=2)
    (out / "keep.txt").write_text("mine")
    write_mosaics(manifest, out, n_images=1, size=SIZE, figures_per_image=2, seed=2, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "mosaic_0000.png", "mosaics.json", "truth.csv"]


def test_fold_selection_is_the_cv_split(manifest: pd.DataFrame) -> None:
    from mitotype import DEFAULT_RECIPE
    from mitotype.config import load_config
    from mitotype.workflows.runs import _assign_folds

    fold_of, _ = _assign_folds(load_config(DEFAULT_RECIPE), manifest, folds=3, split_file=None, group_by=None)
    assert np.array_equal(fold_of, grouped_folds(manifest, 3, 42, ["label"]))
    for i in range(3):
        held = select_fold(manifest, folds=3, fold=i)
        rest = select_fold(manifest, folds=3, exclude_fold=i)
        assert sorted(held["path"]) == sorted(manifest["path"][fold_of == i])
        assert sorted(rest["path"]) == sorted(manifest["path"][fold_of != i])
    with pytest.raises(MitotypeError, match="fold 3"):
        select_fold(manifest, folds=3, fold=3)


def test_cli_writes_the_held_out_folds_mosaics(patches: Path, manifest: pd.DataFrame, tmp_path: Path, monkeypatch, capsys) -> None:
    from conftest import run_cli

    code, stdout, stderr = run_cli(monkeypatch, capsys, "data", "mosaic", patches, tmp_path / "val", "--seed", "5", "--folds", "2", "--fold",
                                   "1", "--size", str(SIZE), "--figures", "4")
    assert code == 0, stderr
    assert "truth.csv" in stdout
    truth = pd.read_csv(tmp_path / "val" / "truth.csv")
    fold_of = grouped_folds(manifest, 2, 42, ["label"])
    assert sorted(truth["source"]) == sorted(manifest["path"][fold_of == 1])
    code, _, stderr = run_cli(monkeypatch, capsys, "data", "mosaic", patches, tmp_path / "train", "--seed", "5", "--exclude-fold", "1",
                              "--folds", "2", "--images", "2", "--size", str(SIZE), "--figures", "4")
    assert code == 0, stderr
    assert set(pd.read_csv(tmp_path / "train" / "truth.csv")["source"]) <= set(manifest["path"][fold_of != 1])


@pytest.mark.parametrize("args, needles", [
    (["--figures", "0"], ["--figures 0"]),
    (["--size", "50"], ["--size 50"]),
    (["--images", "0"], ["--images 0"]),
    (["--seed", "-1"], ["--seed -1"]),
    (["--figures", "9"], ["--figures 9", "--size"]),
    (["--fold", "3", "--folds", "3"], ["--fold 3", "--folds 3"]),
    (["--fold", "0", "--exclude-fold", "1"], ["--fold", "--exclude-fold"]),
    (["--folds", "3"], ["--folds 3", "--fold"]),
    (["--fold", "0", "--folds", "1"], ["--folds 1"]),
])
def test_cli_bad_options_are_one_line_errors(patches: Path, tmp_path: Path, monkeypatch, capsys, args: list[str], needles: list[str]) -> None:
    from conftest import run_cli

    argv = ["data", "mosaic", patches, tmp_path / "out", "--size", str(SIZE), *(["--seed", "1"] if "--seed" not in args else []), *args]
    assert_one_line_error(run_cli(monkeypatch, capsys, *argv), *needles)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_non_empty_out_and_a_missing_input(patches: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from conftest import run_cli

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.txt").write_text("")
    assert_one_line_error(run_cli(monkeypatch, capsys, "data", "mosaic", patches, tmp_path / "out", "--seed", "1"), "not empty", "--overwrite")
    assert_one_line_error(run_cli(monkeypatch, capsys, "data", "mosaic", tmp_path / "nope", tmp_path / "o2", "--seed", "1"), "nope")


def test_baseline_script_scores_every_baseline(patches: Path, tmp_path: Path) -> None:
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mosaic_baselines

    report = mosaic_baselines.main(["--patches", str(patches), "--fold", "0", "--folds", "2", "--seed", "1", "--images", "2", "--size", str(SIZE),
                                    "--figures", "4", "--mosaics", str(tmp_path / "m"), "--out", str(tmp_path / "r")])
    saved = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert saved["baselines"] == json.loads(json.dumps(report["baselines"]))
    names = {r["baseline"] for r in saved["baselines"]}
    assert {"grid", "random", "tile_centres", "tile_junctions", "paste_ring_gradient", "paste_ring_colour", *mosaic_baselines.REFERENCE} == names
    assert saved["seed"] == 1 and saved["cpu"] and "mosaic_baselines.py" in saved["command"]
    blobs = next(r for r in saved["baselines"] if r["baseline"] == "dark_blobs")
    assert blobs["f1"] > 0.8  # the synthetic figures are the darkest things there
