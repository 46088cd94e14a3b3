"""Points over images and slides: readers, centred crops at the model's mpp, streaming, resume, summary."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import tiffslide
from PIL import Image

import mitotype.inference.points as points_mod
from conftest import TINY
from mitotype.data.points import read_points
from mitotype.data.slides import PlainSource, TiffSlideSource, choose_level, region_side
from mitotype.errors import MitotypeError
from mitotype.models.ensemble import Ensemble
from mitotype.inference.points import iter_point_batches, predict_points, summary_table, point_table, wilson_interval

P = 32  # the tiny model's patch size


def noise_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 250, (h, w, 3), dtype=np.uint8)  # never 255: padding stays visible


def write_slide(path: Path, level0: np.ndarray, mpp: float | None, levels: int = 2) -> list[np.ndarray]:
    """A tiled pyramidal TIFF: each level the 2x2 block mean of the one above, with resolution tags
    (pixels per centimetre) so tiffslide reports ``mpp`` (none when ``mpp`` is None)."""
    pyramid = [level0]
    for _ in range(levels - 1):
        a = pyramid[-1].astype(np.float64)
        pyramid.append(a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, 3).mean((1, 3)).round().astype(np.uint8))

    def res(i: int) -> dict:
        return {} if mpp is None else {"resolution": (1e4 / (mpp * 2**i),) * 2, "resolutionunit": "CENTIMETER"}

    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        tw.write(pyramid[0], subifds=levels - 1, tile=(64, 64), photometric="rgb", **res(0))
        for i, level in enumerate(pyramid[1:], 1):
            tw.write(level, subfiletype=1, tile=(64, 64), photometric="rgb", **res(i))
    return pyramid


def crops(points, positions=None, **kw) -> np.ndarray:
    positions = np.arange(len(points.table)) if positions is None else positions
    return np.concatenate([b.numpy() for _, b in iter_point_batches(points, positions, 4, P, **kw)])


def test_crop_is_centred_exactly_and_padded_white_at_borders(tmp_path: Path) -> None:
    img = noise_image(90, 110)
    Image.fromarray(img).save(tmp_path / "a.png")
    pd.DataFrame({"image": ["a.png"] * 3, "x": [37, 0, 109], "y": [50, 0, 89]}).to_csv(tmp_path / "p.csv", index=False)
    out = crops(read_points(tmp_path / "p.csv"), model_mpp=0.25)
    h = P // 2
    assert np.array_equal(out[0], img[50 - h:50 + h, 37 - h:37 + h])  # the point sits on pixel (P//2, P//2)
    assert np.array_equal(out[1][h:, h:], img[:h, :h]) and (out[1][:h] == 255).all() and (out[1][:, :h] == 255).all()
    assert np.array_equal(out[2][:h + 1, :h + 1], img[89 - h:, 109 - h:]) and (out[2][h + 1:] == 255).all()


def test_plain_image_rescaled_when_its_mpp_is_given(tmp_path: Path) -> None:
    img = noise_image(128, 128)
    Image.fromarray(img).save(tmp_path / "a.png")
    pd.DataFrame({"image": ["a.png"], "x": [64], "y": [64]}).to_csv(tmp_path / "p.csv", index=False)
    out = crops(read_points(tmp_path / "p.csv"), model_mpp=0.5, image_mpp=0.25)[0]  # 64 px of 0.25 um -> 32 px of 0.5 um
    expected = np.asarray(Image.fromarray(img[32:96, 32:96]).resize((P, P), Image.BOX))
    assert np.array_equal(out, expected)


def test_level_choice_by_mpp() -> None:
    mpps = [0.25, 0.5, 1.0]
    assert [choose_level(mpps, t) for t in (0.25, 0.4, 0.5, 0.9, 1.0, 4.0)] == [0, 0, 1, 1, 2, 2]
    assert choose_level([0.2502, 0.5004], 0.25) == 0 and choose_level([0.2502, 0.5004], 0.5) == 1  # scanner rounding tolerated
    assert choose_level([0.5, 1.0], 0.25) == 0  # all coarser: the finest, enlarged
    assert region_side(32, 0.5, 0.25) == 64 and region_side(32, 0.25, 0.25) == 32 and region_side(32, 0.3, 0.25) == 38


def test_slide_level_and_microns_match_between_levels(tmp_path: Path) -> None:
    level0 = noise_image(256, 320)
    pyramid = write_slide(tmp_path / "pyr.tif", level0, mpp=0.25)
    write_slide(tmp_path / "flat.tif", level0, mpp=0.25, levels=1)
    slide = tiffslide.TiffSlide(str(tmp_path / "pyr.tif"))
    assert slide.properties["tiffslide.mpp-x"] == pytest.approx(0.25) and slide.level_dimensions == ((320, 256), (160, 128))
    slide.close()
    pyr, flat = TiffSlideSource(tmp_path / "pyr.tif"), TiffSlideSource(tmp_path / "flat.tif")
    assert pyr.level_mpps == pytest.approx([0.25, 0.5]) and flat.level_mpps == pytest.approx([0.25])
    x, y = 120, 100
    via_level1 = pyr.crop(x, y, P, 0.5)  # level 1 at 0.5 um/px: read as is
    assert np.array_equal(via_level1, pyramid[1][y // 2 - 16:y // 2 + 16, x // 2 - 16:x // 2 + 16])
    via_level0 = flat.crop(x, y, P, 0.5)  # 64 px at 0.25 um/px, shrunk: the same 16 um
    assert np.abs(via_level0.astype(int) - via_level1.astype(int)).max() <= 1
    assert np.array_equal(pyr.crop(x, y, P, 0.25), level0[y - 16:y + 16, x - 16:x + 16])  # model at 0.25: level 0
    pyr.close(), flat.close()


def test_slide_without_mpp_needs_slide_mpp(tmp_path: Path) -> None:
    write_slide(tmp_path / "bare.tif", noise_image(128, 128), mpp=None)
    with pytest.raises(MitotypeError, match=r"bare\.tif: the slide does not say its microns per pixel \(give slide_mpp\)"):
        TiffSlideSource(tmp_path / "bare.tif")
    assert TiffSlideSource(tmp_path / "bare.tif", slide_mpp=0.5).level_mpps == pytest.approx([0.5, 1.0])


def test_each_slide_is_opened_once_and_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("s1.tif", "s2.tif"):
        write_slide(tmp_path / name, noise_image(128, 128, seed=len(name)), mpp=0.25)
    rng = np.random.default_rng(0)
    xy = rng.integers(0, 128, (30, 2))
    pd.DataFrame({"image": rng.choice(["s1.tif", "s2.tif"], 30), "x": xy[:, 0], "y": xy[:, 1]}).to_csv(tmp_path / "p.csv", index=False)
    opened, closed, most_open = [], [], [0]
    real_init, real_close = TiffSlideSource.__init__, TiffSlideSource.close

    def counting_init(self, path, *a):
        opened.append(Path(path).name)
        most_open[0] = max(most_open[0], len(opened) - len(closed))
        real_init(self, path, *a)

    monkeypatch.setattr(TiffSlideSource, "__init__", counting_init)
    monkeypatch.setattr(TiffSlideSource, "close", lambda self: (closed.append(self.path.name), real_close(self))[1])
    points = read_points(tmp_path / "p.csv")
    out = crops(points, points_mod.grouped_order(points), model_mpp=0.25, threads=3)
    assert sorted(opened) == ["s1.tif", "s2.tif"] and sorted(closed) == ["s1.tif", "s2.tif"] and len(out) == 30
    opened.clear(), closed.clear(), most_open.__setitem__(0, 0)
    crops(points, points_mod.grouped_order(points), model_mpp=0.25, threads=1)
    assert most_open[0] == 1  # points grouped by slide: one closes before the next opens


def write_three_formats(root: Path) -> tuple[Path, Path, Path]:
    """The same 5 points on two images as a point CSV, a MitDet folder and a MIDOG JSON (xyxy boxes)."""
    pts = {"a": [(10, 20), (30, 40), (5, 5)], "b": [(60, 10), (0, 79)]}
    (root / "mitdet" / "png").mkdir(parents=True)
    (root / "mitdet" / "csv").mkdir()
    for stem, xy in pts.items():
        Image.fromarray(noise_image(80, 70)).save(root / "mitdet" / "png" / f"{stem}.png")
        pd.DataFrame(xy, columns=["x", "y"]).to_csv(root / "mitdet" / "csv" / f"{stem}.csv", index=False)
    rows = [{"image": f"{s}.png", "x": x, "y": y, "note": f"{s}{i}"} for s, xy in pts.items() for i, (x, y) in enumerate(xy)]
    pd.DataFrame(rows).to_csv(root / "points.csv", index=False)
    coco = {"images": [{"id": i, "file_name": f"{s}.png", "width": 70, "height": 80} for i, s in enumerate(pts)],
            "categories": [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "hard negative"}],
            "annotations": [{"id": k, "image_id": 0 if r["image"] == "a.png" else 1, "category_id": 1,
                             "bbox": [r["x"] - 25, r["y"] - 25, r["x"] + 25, r["y"] + 25]} for k, r in enumerate(rows)]}
    coco["annotations"].append({"id": 99, "image_id": 0, "category_id": 2, "bbox": [0, 0, 50, 50]})
    (root / "midog.json").write_text(json.dumps(coco))
    return root / "points.csv", root / "mitdet", root / "midog.json"


def test_three_point_formats_give_the_same_table(tmp_path: Path) -> None:
    csv, mitdet, coco = write_three_formats(tmp_path)
    images = tmp_path / "mitdet" / "png"
    with pytest.warns(UserWarning, match="left out 1 non-mitotic"):
        tables = [read_points(csv, images).table, read_points(mitdet).table, read_points(coco, images).table]
    core = ["image", "x", "y", "label", "image_path"]
    for t in tables[1:]:
        pd.testing.assert_frame_equal(t[core], tables[0][core])
    assert tables[0]["x"].tolist() == [10, 30, 5, 60, 0] and (tables[0]["label"] == -1).all()
    assert tables[0]["note"].tolist() == ["a0", "a1", "a2", "b0", "b1"]  # other input columns pass through
    assert tables[2]["annotation_id"].tolist() == [0, 1, 2, 3, 4]


def test_coco_xywh_boxes_and_category_labels(tmp_path: Path) -> None:
    Image.fromarray(noise_image(80, 70)).save(tmp_path / "a.png")
    coco = {"images": [{"id": 7, "file_name": "a.png", "width": 70, "height": 80}],
            "categories": [{"id": 1, "name": "atypical mitotic figure"}, {"id": 2, "name": "normal mitotic figure"}],
            "annotations": [{"image_id": 7, "category_id": 1, "bbox": [10, 30, 20, 10]},  # x2 < x1 read as corners: so xywh
                            {"image_id": 7, "category_id": 2, "bbox": [40, 50, 10, 10]}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    t = read_points(tmp_path / "c.json").table
    assert t[["x", "y", "label"]].values.tolist() == [[20, 35, 1], [45, 55, 0]]


@pytest.mark.parametrize("rows, message", [
    ({"image": ["a.png", "a.png"], "x": [1, "abc"], "y": [1, 2]}, r"p\.csv row 3: x 'abc' is not a number"),
    ({"image": ["a.png"], "x": [1], "y": [-4]}, r"p\.csv row 2: y -4 is negative"),
    ({"image": ["a.png", "a.png"], "x": [1, 70], "y": [1, 2]}, r"p\.csv row 3: point \(70, 2\) lies outside the 70x80 image"),
    ({"image": ["a.png", "gone.png"], "x": [1, 1], "y": [1, 1]}, r"row 3: image .*gone\.png does not exist .*skip_missing"),
    ({"image": ["a.png"], "x": [1], "z": [1]}, r"p\.csv: missing column\(s\) y"),
    ({"image": ["a.png"], "x": [1], "y": [1], "label": ["maybe"]}, r"p\.csv row 2: label 'maybe'"),
])
def test_bad_rows_are_named(tmp_path: Path, rows: dict, message: str) -> None:
    Image.fromarray(noise_image(80, 70)).save(tmp_path / "a.png")
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(MitotypeError, match=message):
        read_points(tmp_path / "p.csv")


def test_skip_missing_drops_rows_of_missing_images(tmp_path: Path) -> None:
    Image.fromarray(noise_image(80, 70)).save(tmp_path / "a.png")
    rows = {"image": ["a.png", "gone.png", "a.png"], "x": [1, 2, 3], "y": [1, 1, 1]}
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    with pytest.warns(UserWarning, match="1 point"):
        t = read_points(tmp_path / "p.csv", skip_missing=True).table
    assert t["x"].tolist() == [1, 3]


def test_slide_points_outside_are_named_when_the_slide_opens(tmp_path: Path) -> None:
    write_slide(tmp_path / "s.tif", noise_image(128, 128), mpp=0.25)
    pd.DataFrame({"image": ["s.tif", "s.tif"], "x": [3, 300], "y": [3, 3]}).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(MitotypeError, match=r"p\.csv row 3: point \(300, 3\) lies outside the 128x128 image"):
        crops(read_points(tmp_path / "p.csv"), model_mpp=0.25)


def test_wilson_interval_matches_the_hand_computed_value() -> None:
    # 3 of 10, z = 1.96: centre (0.3 + z^2/20) / (1 + z^2/10), half z*sqrt(0.021 + z^2/400) / (1 + z^2/10)
    low, high = wilson_interval(3, 10)
    assert (low, high) == pytest.approx((0.10779126, 0.60322185), abs=1e-7)
    assert wilson_interval(0, 5) == (0.0, pytest.approx(0.43448246, abs=1e-7))
    assert wilson_interval(5, 5)[1] == 1.0 and all(math.isnan(v) for v in wilson_interval(0, 0))


def test_summary_counts_per_image(tmp_path: Path) -> None:
    csv, mitdet, _ = write_three_formats(tmp_path)
    Image.fromarray(noise_image(80, 70)).save(mitdet / "png" / "c.png")  # an image without points counts 0
    points = read_points(mitdet)
    table = point_table(points, np.array([0.9, 0.1, 0.7, 0.2, 0.3]), threshold=0.5)
    assert table["label"].tolist() == ["atypical", "normal", "atypical", "normal", "normal"]
    s = summary_table(points, table)
    assert s[["image", "mitotic_count", "atypical_count"]].values.tolist() == [["a.png", 3, 2], ["b.png", 2, 0], ["c.png", 0, 0]]
    assert s["atypical_fraction"].iloc[0] == pytest.approx(2 / 3) and math.isnan(s["atypical_fraction"].iloc[2])
    assert (s["ci95_low"].iloc[0], s["ci95_high"].iloc[0]) == pytest.approx(wilson_interval(2, 3))


def save_tiny_model(folder: Path, mpp: float) -> Path:
    """An untrained tiny model whose card says it was trained at ``mpp`` um/px."""
    from mitotype.config import load_config
    from mitotype.models.artifact import save_model
    from mitotype.models.registry import create_model

    cfg = load_config(None, [*TINY, f"data.mpp={mpp}"])
    save_model(create_model(cfg.model), cfg, folder, threshold=0.5, trained_on={}, metrics={})
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny", 0.25)


def test_the_card_mpp_picks_the_slide_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pyramid = write_slide(tmp_path / "s.tif", noise_image(256, 256), mpp=0.25)
    pd.DataFrame({"image": ["s.tif"], "x": [100], "y": [60]}).to_csv(tmp_path / "p.csv", index=False)
    model = save_tiny_model(tmp_path / "m", 0.5)
    seen, real = [], Ensemble.p_atypical
    monkeypatch.setattr(Ensemble, "p_atypical", lambda self, b, tta=False: (seen.append(b.numpy().copy()), real(self, b, tta))[1])
    predict_points(model, tmp_path / "p.csv", tmp_path / "o.csv", device="cpu", backend="torch")
    assert np.array_equal(seen[0][0], pyramid[1][30 - 16:30 + 16, 50 - 16:50 + 16])  # level 1 (0.5 um/px) around (50, 30)


def test_model_mpp_from_the_cards() -> None:
    from mitotype.data.slides import model_mpp

    assert model_mpp([0.5, 0.5]) == 0.5
    with pytest.warns(UserWarning, match="assuming 0.25 um/px"):
        assert model_mpp([None]) == 0.25
    with pytest.raises(MitotypeError, match="different microns per pixel"):
        model_mpp([0.25, 0.5])


def test_resume_after_interruption_gives_the_uninterrupted_file(tmp_path: Path, tiny_model: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    csv, mitdet, _ = write_three_formats(tmp_path)
    write_slide(tmp_path / "mitdet" / "png" / "s.tif", noise_image(128, 128), mpp=0.25)
    rows = pd.read_csv(csv)
    rows = pd.concat([rows, pd.DataFrame({"image": ["s.tif"] * 6, "x": range(10, 70, 10), "y": 64, "note": "s"})])
    rows.sample(frac=1, random_state=0).to_csv(csv, index=False)  # images interleaved: still each opened once
    images = tmp_path / "mitdet" / "png"
    predict_points(tiny_model, csv, tmp_path / "full.csv", images=images, device="cpu", backend="torch", batch_size=3)

    real, seen, limit = Ensemble.p_atypical, [], [2]

    def interrupted(self, batch, tta=False):
        if len(seen) == limit[0]:
            raise KeyboardInterrupt
        seen.append(len(batch))
        return real(self, batch, tta)

    monkeypatch.setattr(Ensemble, "p_atypical", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_points(tiny_model, csv, tmp_path / "run.csv", images=images, device="cpu", backend="torch", batch_size=3)
    partial = tmp_path / "run.partial.csv"
    assert len(partial.read_text().splitlines()) == 2 + 6 and not (tmp_path / "run.csv").exists()
    with open(partial, "a") as fh:
        fh.write("7,0.12")  # a line cut mid-write by the kill: ignored
    with pytest.raises(MitotypeError, match="written for other points, model or options"):
        predict_points(tiny_model, csv, tmp_path / "run.csv", images=images, device="cpu", backend="torch", batch_size=3, tta=True, resume=True)
    text = partial.read_text()
    partial.write_text(text.replace("point,p_atypical\n", "point,p_atypical\nbroken\n"))
    with pytest.raises(MitotypeError, match=r"run\.partial\.csv line 3: 'broken' is not a finished point"):
        predict_points(tiny_model, csv, tmp_path / "run.csv", images=images, device="cpu", backend="torch", batch_size=3, resume=True)
    partial.write_text(text)

    seen.clear(), limit.__setitem__(0, 1)  # resumed, and interrupted again after one batch
    with pytest.raises(KeyboardInterrupt):
        predict_points(tiny_model, csv, tmp_path / "run.csv", images=images, device="cpu", backend="torch", batch_size=3, resume=True)
    assert seen == [3] and len(partial.read_text().splitlines()) == 2 + 6 + 3  # the cut line was dropped
    seen.clear()
    monkeypatch.setattr(Ensemble, "p_atypical", lambda self, b, tta=False: (seen.append(len(b)), real(self, b, tta))[1])
    predict_points(tiny_model, csv, tmp_path / "run.csv", images=images, device="cpu", backend="torch", batch_size=3, resume=True)
    assert seen == [2]  # only the unfinished points were classified
    assert (tmp_path / "run.csv").read_bytes() == (tmp_path / "full.csv").read_bytes()
    assert (tmp_path / "run.summary.csv").read_bytes() == (tmp_path / "full.summary.csv").read_bytes()
    assert not partial.exists()
    out = pd.read_csv(tmp_path / "run.csv")
    assert out.columns.tolist() == ["image", "x", "y", "p_atypical", "label", "note", "image_path"]
    assert out["note"].tolist() == rows.sample(frac=1, random_state=0)["note"].tolist()  # input order kept


def test_predict_points_still_runs_and_names_the_points_command(tmp_path: Path, tiny_model: Path) -> None:
    csv, mitdet, _ = write_three_formats(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    common = ["--model", str(tiny_model), "--threshold", "0.01", "--device", "cpu", "--backend", "torch"]
    old = subprocess.run([sys.executable, "-m", "mitotype", "predict", "--points", str(csv), "--images", str(mitdet / "png"), *common,
                          "--out", str(tmp_path / "old.csv")], capture_output=True, text=True, env=env, timeout=300)
    new = subprocess.run([sys.executable, "-m", "mitotype", "points", str(csv), "--images", str(mitdet / "png"), *common,
                          "--out", str(tmp_path / "new.csv")], capture_output=True, text=True, env=env, timeout=300)
    assert old.returncode == 0 and new.returncode == 0, old.stderr + new.stderr
    assert "warning: predict --points is now its own command: mitotype points" in old.stderr
    assert (tmp_path / "old.csv").read_bytes() == (tmp_path / "new.csv").read_bytes()


def test_cli_predict_points_end_to_end(tmp_path: Path, tiny_model: Path) -> None:
    csv, mitdet, coco = write_three_formats(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "mitotype", "points", str(coco), "--images", str(mitdet / "png"),
                          "--model", str(tiny_model), "--out", str(tmp_path / "o.csv"), "--threshold", "0.01", "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "5 points on 2 image(s)" in run.stdout and "5 atypical" in run.stdout
    out, summary = pd.read_csv(tmp_path / "o.csv"), pd.read_csv(tmp_path / "o.summary.csv")
    assert out[["x", "y"]].values.tolist() == [[10, 20], [30, 40], [5, 5], [60, 10], [0, 79]]
    assert {"annotation_id", "image_id", "category", "p_atypical", "label"} <= set(out.columns)
    assert summary[["image", "mitotic_count", "atypical_count"]].values.tolist() == [["a.png", 3, 3], ["b.png", 2, 2]]


@pytest.mark.parametrize("args, message", [
    (["points", "{bad}"], "bad.csv row 2: y 'oops' is not a number"),
    (["points", "{bad}", "--slide-mpp", "0"], "--slide-mpp 0.0: expected microns per pixel in (0, 100)"),
    (["predict", "--points", "{bad}"], "bad.csv row 2: y 'oops' is not a number"),  # the old form still runs
    (["predict", "{bad}", "--points", "{bad}"], "give INPUT"),
    (["predict", "--points", "{bad}", "--skip-bad"], "--skip-bad: not used with --points"),
    (["predict"], "predict: give INPUT (a folder or manifest of patches); for points use `mitotype points`"),
    (["points", "{bad}", "--skip-bad"], "No such option: --skip-bad"),
    (["predict", "{bad}", "--resume"], "No such option: --resume"),
    (["points", "{bad}", "--backend", "tensorrt"], "'tensorrt' is not one of 'auto', 'torch'"),
])
def test_cli_predict_points_bad_input_is_one_line(tmp_path: Path, tiny_model: Path, args: list[str], message: str,
                                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from mitotype.cli import main

    pd.DataFrame({"image": ["a.png"], "x": [1], "y": ["oops"]}).to_csv(tmp_path / "bad.csv", index=False)
    argv = [a.format(bad=tmp_path / "bad.csv") for a in args]
    monkeypatch.setattr(sys, "argv", ["mitotype", *argv, "--model", str(tiny_model), "--out", str(tmp_path / "o.csv")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "o.partial.csv").exists()


def test_crops_stream_a_few_batches_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(noise_image(64, 64)).save(tmp_path / "a.png")
    pd.DataFrame({"image": "a.png", "x": np.arange(64), "y": 10}).to_csv(tmp_path / "p.csv", index=False)
    made, real = [], PlainSource.crop
    monkeypatch.setattr(PlainSource, "crop", lambda self, *a: (made.append(1), real(self, *a))[1])
    points = read_points(tmp_path / "p.csv")
    batches = iter_point_batches(points, np.arange(64), 4, P, model_mpp=0.25, prefetch=2, threads=2)
    first_index, first = next(batches)
    assert first_index.tolist() == [0, 1, 2, 3] and len(made) <= 3 * 4  # this batch and two ahead, never all 64
    assert sum(len(b) for _, b in batches) == 60 and len(made) == 64


def write_svs(path: Path, level0: np.ndarray, mpp: float, compression: str | None = None) -> np.ndarray:
    """An Aperio-style SVS as scanners write it: level 0 tiled with the Aperio ImageDescription that
    carries ``MPP``, a stripped thumbnail page, then the 2x-reduced level as its own page (not a SubIFD)."""
    a = level0.astype(np.float64)
    level1 = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, 3).mean((1, 3)).round().astype(np.uint8)
    h, w = level0.shape[:2]
    head = f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] (64x64) RGB"
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        tw.write(level0, tile=(64, 64), photometric="rgb", compression=compression, metadata=None,
                 description=f"{head}|AppMag = 40|MPP = {mpp}|ScanScope ID = SS1234")
        tw.write(level0[::8, ::8], photometric="rgb", metadata=None, description=f"{head} -> {w // 8}x{h // 8} - |AppMag = 40")  # the stripped thumbnail
        tw.write(level1, tile=(64, 64), photometric="rgb", compression=compression, metadata=None,
                 description=f"{head} -> {w // 2}x{h // 2} - |AppMag = 40|MPP = {mpp}")
    return level1


def test_an_aperio_svs_gives_its_mpp_and_levels_and_exact_crops(tmp_path: Path) -> None:
    level0 = noise_image(256, 320, seed=5)
    level1 = write_svs(tmp_path / "scan.svs", level0, mpp=0.2527)
    slide = tiffslide.TiffSlide(str(tmp_path / "scan.svs"))
    assert slide.properties["tiffslide.vendor"] == "aperio" and slide.properties["tiffslide.mpp-x"] == pytest.approx(0.2527)
    slide.close()
    source = TiffSlideSource(tmp_path / "scan.svs")
    assert source.level_mpps == pytest.approx([0.2527, 0.5054])
    x, y = 150, 90
    assert np.array_equal(source.crop(x, y, P, 0.2527), level0[y - 16:y + 16, x - 16:x + 16])
    assert np.array_equal(source.crop(x, y, P, 0.5054), level1[y // 2 - 16:y // 2 + 16, x // 2 - 16:x // 2 + 16])
    source.close()
    yy, xx = np.mgrid[:256, :320]
    smooth = np.stack([xx * 0.7, yy * 0.9, 200 - xx * 0.3], axis=-1).astype(np.uint8)  # JPEG tiles, as scanners store them
    write_svs(tmp_path / "jpeg.svs", smooth, mpp=0.2527, compression="jpeg")
    jpeg = TiffSlideSource(tmp_path / "jpeg.svs")
    crop = jpeg.crop(x, y, P, 0.2527).astype(int)
    jpeg.close()
    assert np.abs(crop - smooth[y - 16:y + 16, x - 16:x + 16]).max() <= 4  # lossy: close, not equal


def test_openslide_reads_the_same_levels_mpp_and_crops_as_tiffslide_and_is_the_fallback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The OpenSlide path (formats tiffslide cannot open, e.g. .mrxs) on an Aperio SVS both libraries
    read: same microns per pixel, level sizes and crops (exact, raw tiles; white padding at the
    border); and ``open_slide`` hands a slide to OpenSlide when tiffslide refuses it."""
    pytest.importorskip("openslide", reason="openslide-python not installed (pip install 'mitotype[openslide]')")
    import mitotype.data.slides as slides_mod
    from mitotype.data.slides import OpenSlideSource, open_slide

    level0 = noise_image(256, 320, seed=7)
    write_svs(tmp_path / "scan.svs", level0, mpp=0.2527)
    ours, theirs = OpenSlideSource(tmp_path / "scan.svs"), TiffSlideSource(tmp_path / "scan.svs")
    assert ours.level_mpps == pytest.approx(theirs.level_mpps) and ours.level_mpps == pytest.approx([0.2527, 0.5054])
    assert [ours.level_dimensions(i) for i in range(2)] == [theirs.level_dimensions(i) for i in range(2)] == [(320, 256), (160, 128)]
    for x, y, mpp in ((150, 90, 0.2527), (150, 90, 0.5054), (5, 250, 0.2527), (318, 3, 0.5054)):
        got = ours.crop(x, y, P, mpp)
        assert np.array_equal(got, theirs.crop(x, y, P, mpp)), (x, y, mpp)
    assert np.array_equal(ours.crop(150, 90, P, 0.2527), level0[74:106, 134:166])
    assert (ours.crop(5, 250, P, 0.2527)[-1] == 255).all()  # below the slide: white padding
    ours.close(), theirs.close()

    def refuse(*a: object, **k: object) -> None:
        raise ValueError("not a format tiffslide reads")

    monkeypatch.setattr(slides_mod, "TiffSlideSource", refuse)
    fallback = open_slide(tmp_path / "scan.svs")
    assert isinstance(fallback, OpenSlideSource) and np.array_equal(fallback.crop(150, 90, P, 0.2527), level0[74:106, 134:166])
    fallback.close()


def test_a_slide_tiffslide_refuses_without_openslide_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from mitotype.data.slides import BadImage, open_slide

    (tmp_path / "scan.mrxs").write_bytes(b"not a slide")
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "openslide" else real_import(name, *a, **k))
    with pytest.raises(BadImage, match=r"scan\.mrxs: tiffslide cannot read this slide \(.+\); pip install 'mitotype\[openslide\]'"):
        open_slide(tmp_path / "scan.mrxs")
