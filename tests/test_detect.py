"""The detector: candidates, labels, suppression, tiles that neither lose nor double a figure,
resolution, cards that say what they are, and the `data candidates` / `detect` commands."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import TINY, run_cli
from helpers import untrained_model
from scenes import scene, write_scenes

from mitotype.config import CandidateConfig, load_config
from mitotype.data.candidates import find_candidates, label_candidates, padded_crop
from mitotype.data.slides import PlainSource
from mitotype.errors import MitotypeError
from mitotype.inference.detect import Detector, detect_source, suppress


class DarknessScorer:
    """A stand-in network: p = how dark the centre of the patch is (the figures are the darkest
    blobs of a scene), so what the detection code does around the network can be checked exactly."""

    name = "darkness"

    def p_atypical(self, batch_u8, tta: bool = False) -> np.ndarray:
        batch = np.asarray(batch_u8, dtype=np.float32)
        c = batch.shape[1] // 2
        centre = batch[:, c - 3:c + 4, c - 3:c + 4].mean(axis=(1, 2, 3))
        return np.clip((140.0 - centre) / 80.0, 0.0, 1.0).astype(np.float32)  # pale nuclei ~0.4, figures ~0.9


@pytest.fixture
def tiny_detector(tmp_path: Path) -> Path:
    return untrained_model("detector-lite0", TINY, tmp_path / "detector")


def darkness_detector(path: Path) -> Detector:
    det = Detector.load(path, backend="torch", device="cpu")
    det.scorer = DarknessScorer()
    return det


def test_candidates_reach_every_figure_darkest_first() -> None:
    figures = [(60.0, 60.0), (190.0, 80.0), (120.0, 200.0)]
    found = find_candidates(scene((256, 256), figures, seed=3), mpp=0.25, cfg=CandidateConfig())
    for fx, fy in figures:
        assert np.hypot(found["x"] - fx, found["y"] - fy).min() <= 3
    assert list(found["od"]) == sorted(found["od"], reverse=True)
    top3 = found.head(3)  # the figures are the darkest blobs
    assert all(np.hypot(top3["x"] - fx, top3["y"] - fy).min() <= 3 for fx, fy in figures)


def test_a_coarser_density_grid_finds_the_same_figures_on_the_grid() -> None:
    figures = [(60.0, 60.0), (190.0, 80.0), (120.0, 200.0)]
    img = scene((256, 256), figures, seed=3)
    fine = find_candidates(img, mpp=0.25, cfg=CandidateConfig())
    coarse = find_candidates(img, mpp=0.25, cfg=CandidateConfig(grid_um=0.5))
    assert (coarse[["x", "y"]].to_numpy() % 2 == 0.5).all()  # the centres of the 2 x 2 blocks of the grid
    assert len(coarse) < len(fine) * 1.2
    for fx, fy in figures:  # the darkest three are still the figures, within a grid step of the fine peak
        assert np.hypot(coarse.head(3)["x"] - fx, coarse.head(3)["y"] - fy).min() <= 4


def test_label_candidates_one_positive_per_figure_and_ambiguous_ones_left_out() -> None:
    cands = pd.DataFrame({"x": [10.0, 14.0, 100.0, 40.0], "y": [10.0, 10.0, 100.0, 10.0]})
    labels = label_candidates(cands, np.array([[12.5, 10.0]]), radius_px=30)
    assert labels.tolist() == [-1, 1, 0, -1]  # nearest within 30 px is the mitosis; 40,10 is 27.5 px away


def test_suppress_keeps_the_best_of_each_cluster() -> None:
    xy = np.array([[0, 0], [10, 0], [50, 0], [55, 0], [200, 0]], dtype=float)
    kept = suppress(xy, np.array([0.5, 0.9, 0.7, 0.8, 0.1]), radius_px=30)
    assert kept.tolist() == [1, 3, 4]


def test_padded_crop_is_centred_and_mirrors_outside() -> None:
    img = np.arange(20 * 20 * 3, dtype=np.uint8).reshape(20, 20, 3)
    crop = padded_crop(img, 10, 10, 8)
    assert np.array_equal(crop, img[6:14, 6:14])
    edge = padded_crop(img, 0, 0, 8)
    assert np.array_equal(edge[4:, 4:], img[:4, :4]) and np.array_equal(edge[3, 4:], img[1, :4])  # reflected


@pytest.mark.parametrize("grid_um", [0.0, 0.5])
def test_tiles_give_the_same_detections_as_the_whole_image(tiny_detector: Path, tmp_path: Path, grid_um: float) -> None:
    figures = [(40.0, 40.0), (150.0, 70.0), (100.0, 230.0), (250.0, 250.0), (63.0, 150.0)]
    img = scene((300, 280), figures, seed=5)
    Image.fromarray(img).save(tmp_path / "scene.png")
    det = darkness_detector(tiny_detector)
    det.candidates = dataclasses.replace(det.candidates, grid_um=grid_um)
    whole = det.detect_array(img)
    source = PlainSource(tmp_path / "scene.png", 0.25)
    tiled = detect_source(det, source, tile=63 if grid_um else 64)  # 63: reads that start off the density's grid
    key = ["x", "y"]
    assert len(whole) >= len(figures)
    pd.testing.assert_frame_equal(tiled.sort_values(key).reset_index(drop=True), whole.sort_values(key).reset_index(drop=True))
    for fx, fy in figures:
        assert np.hypot(tiled["x"] - fx, tiled["y"] - fy).min() <= 3


def test_detections_come_back_in_level0_pixels_of_a_finer_image(tiny_detector: Path, tmp_path: Path) -> None:
    figures = [(60.0, 60.0), (180.0, 150.0)]
    img = scene((240, 200), figures, seed=2)
    big = np.asarray(Image.fromarray(img).resize((480, 400), Image.Resampling.BILINEAR))
    Image.fromarray(big).save(tmp_path / "fine.png")
    det = darkness_detector(tiny_detector)
    found = detect_source(det, PlainSource(tmp_path / "fine.png", 0.125), tile=128)
    for fx, fy in figures:
        assert np.hypot(found["x"] - 2 * fx, found["y"] - 2 * fy).min() <= 6


def test_a_detector_card_says_so_and_bad_candidate_settings_are_named(tiny_detector: Path) -> None:
    card = json.loads((tiny_detector / "model.json").read_text())
    assert card["build"]["task"] == "detect" and card["class_names"] == ["look-alike", "mitosis"]
    assert card["build"]["candidates"]["min_od"] == CandidateConfig().min_od
    from mitotype.models.card import read_card

    for change, message in [({"min_od": -1}, "build.candidates.min_od"), ({"evil": 1}, "build.candidates.evil")]:
        bad = json.loads(json.dumps(card))
        bad["build"]["candidates"].update(change)
        with pytest.raises(MitotypeError, match=message.replace(".", r"\.")):
            read_card(bad, tiny_detector / "model.json")


def test_classifier_and_detector_are_not_mixed_up(tiny_detector: Path, untrained: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    write_scenes(tmp_path / "scenes", n=1)
    code, _, err = run_cli(monkeypatch, capsys, "detect", tmp_path / "scenes", "--model", untrained, "--out", tmp_path / "d.csv")
    assert code == 2 and "--model" in err and "a classifier" in err
    code, _, err = run_cli(monkeypatch, capsys, "detect", tmp_path / "scenes", "--model", tiny_detector, "--classifier",
                           tiny_detector, "--out", tmp_path / "d.csv")
    assert code == 2 and "--classifier" in err and "a detector" in err
    code, _, err = run_cli(monkeypatch, capsys, "predict", tmp_path / "scenes", "--model", tiny_detector, "--out", tmp_path / "p.csv")
    assert code == 2 and "a detector" in err


def test_data_candidates_labels_against_the_truth(tmp_path: Path, monkeypatch, capsys) -> None:
    truth = write_scenes(tmp_path / "scenes", n=3, per_image=3)
    sets = [a for item in TINY for a in ("--set", item)]
    code, out, err = run_cli(monkeypatch, capsys, "data", "candidates", tmp_path / "scenes" / "truth.csv", tmp_path / "set", *sets)
    assert code == 0, err
    m = pd.read_csv(tmp_path / "set" / "candidates.csv")
    assert int(m["label"].sum()) == len(truth)  # one mitosis patch per figure
    assert (m["label"] == 0).sum() <= 4 * len(truth) and (m["label"] == 0).sum() > 0
    assert set(m["group"]) == {"slide_0", "slide_1"}
    pos = m[m["label"] == 1]
    for row in truth.itertuples():
        near = pos[(pos["image"] == row.image)]
        assert np.hypot(near["x"] - row.x, near["y"] - row.y).min() <= 3
    assert Image.open(tmp_path / "set" / m["path"].iloc[0]).size == (32, 32)
    summary = json.loads((tmp_path / "set" / "summary.json").read_text())
    assert summary["candidate_recall"] == 1.0
    code, _, err = run_cli(monkeypatch, capsys, "data", "candidates", tmp_path / "scenes" / "truth.csv", tmp_path / "set2",
                           "--recipe", "lite0-quick")
    assert code == 2 and "--recipe" in err and "not a detector recipe" in err
    code, _, err = run_cli(monkeypatch, capsys, "data", "candidates", tmp_path / "scenes" / "truth.csv", tmp_path / "set", *sets)
    assert code == 2 and "not empty" in err


def test_detect_command_finds_the_figures_and_resumes(tiny_detector: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import mitotype.inference.detect as detect_module

    truth = write_scenes(tmp_path / "scenes", n=3, per_image=3)
    real_load = detect_module.Detector.load
    monkeypatch.setattr(detect_module.Detector, "load", classmethod(lambda cls, *a, **k: _dark(real_load(*a, **k))))
    out = tmp_path / "det.csv"
    code, stdout, err = run_cli(monkeypatch, capsys, "detect", tmp_path / "scenes", "--model", tiny_detector, "--classifier", "none",
                                "--out", out, "--backend", "torch", "--tile", "128")
    assert code == 0, err
    det = pd.read_csv(out)
    assert list(det.columns) == ["image", "x", "y", "score"]
    from mitotype.evaluation.detection import detection_counts

    counts = detection_counts(det, truth, radius_px=30)["pooled"]
    assert counts["tp"] == len(truth) and counts["fp"] == 0
    # resume: a finished input's partial result is reused, not recomputed
    assert not Path(str(out) + ".partial").exists()
    import mitotype.workflows.detect as wf

    again = tmp_path / "again.csv"
    monkeypatch.setattr(wf, "detect_many", _stop_after_images(detect_module.detect_many, 1))
    with pytest.raises(KeyboardInterrupt):
        wf.detect(tiny_detector, tmp_path / "scenes", again, backend="torch", tile=128)
    saved = json.loads((tmp_path / "again.csv.partial" / "run.json").read_text())
    assert list(saved["done"]) == ["scene_0.png"] and not again.exists()
    marker = tmp_path / "again.csv.partial" / saved["done"]["scene_0.png"]
    pd.read_csv(marker).assign(score=0.99).to_csv(marker, index=False)
    monkeypatch.setattr(wf, "detect_many", detect_module.detect_many)
    with pytest.raises(MitotypeError, match="resume"):  # other options than the interrupted run
        wf.detect(tiny_detector, tmp_path / "scenes", again, backend="torch", tile=256, resume=True)
    table = wf.detect(tiny_detector, tmp_path / "scenes", again, backend="torch", tile=128, resume=True)
    assert (table[table["image"] == "scene_0.png"]["score"] == 0.99).all() and len(table) == len(det)
    assert pd.read_csv(again).equals(table.reset_index(drop=True)) or len(pd.read_csv(again)) == len(table)
    code, _, err = run_cli(monkeypatch, capsys, "detect", tmp_path / "scenes", "--model", tiny_detector, "--classifier", "none",
                           "--out", tmp_path / "x.csv", "--mpp", "-1")
    assert code == 2 and "--mpp" in err


def _dark(det: Detector) -> Detector:
    det.scorer = DarknessScorer()
    return det


def _stop_after_images(fn, n: int):
    """detect_many that is interrupted (as by Ctrl-C) once ``n`` images have come out."""

    def wrapped(*a, **k):
        for i, item in enumerate(fn(*a, **k)):
            if i >= n:
                raise KeyboardInterrupt
            yield item

    return wrapped


def test_old_runs_without_the_detection_sections_still_resume(tmp_path: Path) -> None:
    import yaml

    from mitotype.config import Config, config_change, dump_config

    saved = yaml.safe_load(dump_config(Config()))
    del saved["task"], saved["candidates"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_change(tmp_path / "config.yaml", Config()) == ""
    assert config_change(tmp_path / "config.yaml", load_config("detector-lite0")).startswith("candidates") or \
        config_change(tmp_path / "config.yaml", load_config("detector-lite0")) != ""


def test_old_runs_without_a_newer_field_still_resume(tmp_path: Path) -> None:
    """A field added to a section since the run was made counts only when it is set off its default."""
    import yaml

    from mitotype.config import Config, config_change, dump_config

    saved = yaml.safe_load(dump_config(Config()))
    del saved["augment"]["stain_mix_max"], saved["train"]["diverse_clusters"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_change(tmp_path / "config.yaml", Config()) == ""
    changed = load_config(None, ["augment.stain_mix_max=0.5"])
    assert config_change(tmp_path / "config.yaml", changed).startswith("augment.stain_mix_max")
    saved["augment"]["hue"] = 0.3  # a field the run had, changed: still refused
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert config_change(tmp_path / "config.yaml", Config()).startswith("augment.hue")


def test_bad_candidate_config_is_one_line() -> None:
    with pytest.raises(MitotypeError, match=r"candidates\.nms_um"):
        load_config("detector-lite0", ["candidates.nms_um=-3"])
    with pytest.raises(MitotypeError, match="config task"):
        load_config(None, ["task=segment"])


def test_marked_lookalikes_from_midog_json_are_always_in_the_training_set(tmp_path: Path) -> None:
    from mitotype.data.candidates import write_candidate_set
    from mitotype.data.points import read_points

    figures = [(60.0, 60.0)]
    img = scene((256, 256), figures, seed=4, nuclei=60)
    Image.fromarray(img).save(tmp_path / "a.png")
    cands = find_candidates(img, mpp=0.25, cfg=CandidateConfig())
    far = cands[np.hypot(cands["x"] - 60, cands["y"] - 60) > 60]
    faint = far.iloc[-1]  # the palest candidate: never among the darkest look-alikes drawn first
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 256, "height": 256}],
            "categories": [{"id": 1, "name": "mitotic figure"}, {"id": 2, "name": "hard negative"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [35, 35, 85, 85]},
                            {"id": 2, "image_id": 1, "category_id": 2,
                             "bbox": [faint.x - 25, faint.y - 25, faint.x + 25, faint.y + 25]}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    with pytest.warns(UserWarning, match="left out 1 non-mitotic"):
        assert len(read_points(tmp_path / "a.json").table) == 1
    points = read_points(tmp_path / "a.json", negatives=True)
    assert points.table["mitotic"].tolist() == [1, 0]
    cfg = CandidateConfig(negatives_per_figure=0)
    m = write_candidate_set(points, tmp_path / "set", cfg=cfg, mpp=0.25, patch_size=32, seed=0)
    assert m["label"].tolist() == [1, 0]
    assert (m.iloc[1]["x"], m.iloc[1]["y"]) == (faint.x, faint.y)


def test_best_f1_threshold_equals_rematching_at_every_threshold() -> None:
    from mitotype.evaluation.detection import best_f1_threshold, detection_counts

    rng = np.random.default_rng(7)
    truth = pd.DataFrame({"image": rng.choice(["a", "b"], 30), "x": rng.uniform(0, 400, 30), "y": rng.uniform(0, 400, 30)})
    near = truth.sample(20, random_state=1)
    det = pd.concat([near.assign(x=near["x"] + rng.normal(0, 12, 20), y=near["y"] + rng.normal(0, 12, 20)),
                     pd.DataFrame({"image": rng.choice(["a", "b"], 40), "x": rng.uniform(0, 400, 40), "y": rng.uniform(0, 400, 40)})])
    det = det.assign(score=np.round(rng.uniform(0, 1, len(det)), 1))  # ties on purpose
    brute = max(((detection_counts(det, truth, radius_px=30, threshold=t)["pooled"]["f1"], -t) for t in np.unique(det["score"])))
    t, counts = best_f1_threshold(det, truth, radius_px=30)
    assert (counts["pooled"]["f1"], -t) == brute


def test_crop_all_equals_padded_crop_everywhere() -> None:
    from mitotype.data.candidates import crop_all

    img = np.random.default_rng(0).integers(0, 255, (90, 70, 3), dtype=np.uint8)
    xs, ys = np.array([0.0, 3.4, 35.0, 69.0, 50.6]), np.array([0.0, 88.0, 45.0, 2.0, 60.5])
    got = crop_all(img, xs, ys, 32)
    for k, (x, y) in enumerate(zip(xs, ys)):
        assert np.array_equal(got[k], padded_crop(img, x, y, 32))


def test_detections_move_to_the_blob_centre() -> None:
    from mitotype.data.candidates import blob_centres

    density = np.zeros((60, 60), np.float32)
    density[20:31, 20:41] = 1.0  # a flat blob centred at (30, 25)
    density[22, 22] = 2.0  # its darkest point, off centre
    xy = blob_centres(density, np.array([22.0]), np.array([22.0]), fraction=0.4, window=30)
    assert np.abs(xy[0] - [30.0, 25.0]).max() < 0.2
    kept = blob_centres(density, np.array([5.0]), np.array([5.0]), fraction=0.5, window=10)
    assert kept[0].tolist() == [5.0, 5.0]  # nothing there: the point stays


@pytest.mark.skipif(not hasattr(threading, "get_native_id") or sys.platform != "linux", reason="per-thread priority is Linux's")
def test_the_reading_thread_yields_to_the_network() -> None:
    from mitotype.inference.detect import _yield_to_the_network

    seen: list[int] = []

    def reader() -> None:
        _yield_to_the_network()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    t = threading.Thread(target=reader)
    t.start()
    t.join()
    assert seen[0] > os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # the caller's own thread is untouched
