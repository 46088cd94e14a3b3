"""The heat-map detector: targets that stay on their figures through the augmentation, a loss that
learns, crops with their points, tiles that give the whole image's peaks, suppression at 7.5 um,
cards that say what they are, and one-line errors for what cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import run_cli
from helpers import untrained_model
from scenes import scene, write_scenes

from mitotype.config import AugmentConfig, load_config
from mitotype.data.slides import PlainSource
from mitotype.errors import MitotypeError
from mitotype.inference.detect import Detector, HeatmapDetector, detect_source
from mitotype.models.registry import create_model
from mitotype.training.dense import HeatmapLoss, point_targets, render_heatmap
from mitotype.transforms.augment import BatchAugment

TINY_HEATMAP = ["model.backbone=test_efficientnet", "model.pretrained=none", "data.patch_size=64", "model.input_size=64",
                "train.batch_size=8", "train.eval_batch_size=8", "augment.rotate_degrees=0"]


@pytest.fixture
def tiny_heatmap(tmp_path: Path) -> Path:
    return untrained_model("detector-heatmap-lite0", TINY_HEATMAP, tmp_path / "heatmap")


class DarknessMap(torch.nn.Module):
    """A stand-in network with a small receptive field: the log-odds of each 4 x 4 cell are how dark
    its 9 x 9-cell neighbourhood is (the scenes' figures are the darkest blobs), so what the detection
    code does around the network can be checked exactly, tile by tile."""

    head_name = "heatmap"
    output_stride = 4

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dark = 1.0 - batch["image"].mean(dim=1, keepdim=True)
        cells = torch.nn.functional.avg_pool2d(dark, 4)
        smooth = torch.nn.functional.avg_pool2d(cells, 5, stride=1, padding=2, count_include_pad=False)
        return {"heatmap": (smooth - 0.45) * 40.0}


def darkness_heatmap(path: Path) -> HeatmapDetector:
    det = Detector.load(path, device="cpu")
    assert isinstance(det, HeatmapDetector)
    det.ensemble.nets = [DarknessMap()]
    return det


def test_targets_peak_on_the_point_also_after_flips_and_turns() -> None:
    points = torch.tensor([[[21.0, 45.0], [50.0, 9.0]]]).repeat(16, 1, 1)
    x = torch.zeros(16, 3, 64, 64)
    x[:, :, 45, 21] = 1.0  # a marked pixel under the first point
    moved_x, moved = BatchAugment(AugmentConfig(flip=True, rot90=True)).with_points(x, torch.Generator().manual_seed(3), points)
    assert moved is not None and not torch.equal(moved, points)  # some samples were turned
    for i in range(16):
        row, col = np.unravel_index(int(moved_x[i, 0].argmax()), (64, 64))
        assert (col, row) == tuple(moved[i, 0].round().int().tolist())  # the point sits on its pixel after the turn
    target = render_heatmap(moved, (16, 16), stride=4, sigma=1.0)
    for i in range(16):
        for k in range(2):
            cx, cy = (moved[i, k] // 4).int().tolist()
            assert target[i, 0, cy, cx] == 1.0
    padded = torch.tensor([[[8.0, 8.0], [float("nan"), float("nan")]]])
    assert render_heatmap(padded, (4, 4), stride=4, sigma=1.0).max() == 1.0  # NaN padding draws nothing, breaks nothing


def test_point_targets_read_each_crop_and_name_a_bad_cell() -> None:
    m = pd.DataFrame({"path": ["a.png", "b.png"], "points": ["[[1.5, 2.0], [3, 4]]", "[]"]})
    t = point_targets(m)["points"]
    assert t.shape == (2, 2, 2) and t[0, 1].tolist() == [3.0, 4.0] and torch.isnan(t[1]).all()
    with pytest.raises(MitotypeError, match=r"column 'points'.*b\.png"):
        point_targets(m.assign(points=["[]", "[[1, nan]]"]))
    with pytest.raises(MitotypeError, match="data crops"):
        point_targets(m.drop(columns="points"))


def test_crops_hold_their_figures_and_training_through_the_one_loop_learns(tmp_path: Path, monkeypatch, capsys) -> None:
    truth = write_scenes(tmp_path / "scenes", n=4, size=(192, 192), per_image=2)
    code, _, err = run_cli(monkeypatch, capsys, "data", "crops", tmp_path / "scenes" / "truth.csv", tmp_path / "crops", "--size", "64",
                           "--background", "1")
    assert code == 0, err
    m = pd.read_csv(tmp_path / "crops" / "crops.csv")
    assert len(m) == len(truth) + 4 and set(m["group"]) == {"slide_0", "slide_1"}
    for row in m.itertuples():
        crop = np.asarray(Image.open(tmp_path / "crops" / row.path))
        for x, y in json.loads(row.points):  # each point is on a dark figure of its crop
            assert crop[int(y), int(x)].mean() < 120
    assert (m[m["label"] == 1]["points"] != "[]").all()
    code, _, err = run_cli(monkeypatch, capsys, "data", "crops", tmp_path / "scenes" / "truth.csv", tmp_path / "c2", "--size", "60")
    assert code == 2 and "--size" in err

    sets = [a for item in TINY_HEATMAP for a in ("--set", item)]
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", tmp_path / "crops" / "crops.csv", "--recipe", "detector-heatmap-lite0",
                           "--out", tmp_path / "bad", *sets, "--set", "loss.name=ce")
    assert code == 2 and "loss.name" in err and len(err.strip().splitlines()) == 1

    from mitotype.workflows.runs import load_dataset, train

    cfg = load_config("detector-heatmap-lite0", [*TINY_HEATMAP, "train.epochs=6", "train.lr=3e-3", "augment.hed_sigma=0",
                                                 "augment.brightness=0", "augment.contrast=0", "augment.saturation=0", "augment.hue=0"])
    train(cfg, load_dataset(tmp_path / "crops" / "crops.csv", cfg), tmp_path / "run", show_progress=False)
    losses = pd.read_csv(tmp_path / "run" / "history.csv")["train_loss"].tolist()
    assert losses[-1] < 0.5 * losses[0], losses
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["build"]["detector"] == "heatmap" and card["build"]["task"] == "detect"


def test_heatmap_tiles_give_the_whole_images_detections(tiny_heatmap: Path, tmp_path: Path) -> None:
    figures = [(40.0, 40.0), (330.0, 70.0), (100.0, 460.0), (500.0, 500.0), (255.0, 258.0), (383.0, 200.0)]
    img = scene((560, 530), figures, seed=5, nuclei=120)
    Image.fromarray(img).save(tmp_path / "scene.png")
    det = darkness_heatmap(tiny_heatmap)
    whole = det.detect_array(img)
    tiled = detect_source(det, PlainSource(tmp_path / "scene.png", 0.25), tile=128)
    key = ["x", "y"]
    assert len(whole) == len(figures)
    pd.testing.assert_frame_equal(tiled.sort_values(key).reset_index(drop=True), whole.sort_values(key).reset_index(drop=True))
    for fx, fy in figures:  # positions come back in image pixels, on the figures
        assert np.hypot(tiled["x"] - fx, tiled["y"] - fy).min() <= 3


def test_peaks_closer_than_7_5_um_keep_only_the_best(tiny_heatmap: Path) -> None:
    det = darkness_heatmap(tiny_heatmap)
    near = det.detect_array(scene((200, 120), [(70.0, 60.0), (96.0, 60.0)], nuclei=0))  # 26 px = 6.5 um apart
    far = det.detect_array(scene((200, 120), [(60.0, 60.0), (100.0, 60.0)], nuclei=0))  # 40 px = 10 um apart
    assert len(near) == 1 and len(far) == 2
    assert (det.peaks(scene((200, 120), [(70.0, 60.0), (96.0, 60.0)], nuclei=0), floor=0.5)["score"] >= 0.5).sum() >= 2


def test_a_heatmap_card_round_trips_and_bad_settings_are_one_line(tiny_heatmap: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from mitotype.models.artifact import load_model
    from mitotype.models.card import read_card

    card = json.loads((tiny_heatmap / "model.json").read_text())
    assert card["build"]["detector"] == "heatmap" and card["build"]["arch"] == "heatmap"
    det = Detector.load(tiny_heatmap, device="cpu")
    assert isinstance(det, HeatmapDetector) and det.stride == 4 and det.margin % 32 == 0
    x = {"image": torch.rand(1, 3, 96, 64)}
    reloaded = load_model(tiny_heatmap).model
    assert torch.equal(det.ensemble.nets[0](x)["heatmap"], reloaded(x)["heatmap"])
    assert reloaded(x)["heatmap"].shape == (1, 1, 24, 16)
    bad = json.loads(json.dumps(card))
    bad["build"]["detector"] = "magic"
    with pytest.raises(MitotypeError, match=r"build\.detector"):
        read_card(bad, tiny_heatmap / "model.json")
    for override, field in [("loss.name=ce", "loss.name"), ("model.options.decoder_width=3", "model.options.decoder_width"),
                            ("model.options.depth=3", "model.options.depth"), ("model.heads.0.num_classes=2", "model.heads")]:
        with pytest.raises(MitotypeError, match=field.replace(".", r"\.")):
            cfg = load_config("detector-heatmap-lite0", [*TINY_HEATMAP] + ([override] if "heads" not in override else []))
            if "heads" in override:
                cfg.model.heads[0].num_classes = 2
            HeatmapLoss(cfg, "heatmap", stride=4) if override.startswith("loss") else create_model(cfg.model)
    from mitotype.training.objectives import objective_for

    cfg = load_config("detector-heatmap-lite0", [*TINY_HEATMAP, "task=classify"])
    with pytest.raises(MitotypeError, match="config task"):
        objective_for(cfg, create_model(cfg.model), pd.DataFrame({"path": ["a.png"], "points": ["[]"]}), np.arange(1))
    Image.fromarray(scene((128, 128), [(64.0, 64.0)])).save(tmp_path / "one.png")
    code, _, err = run_cli(monkeypatch, capsys, "detect", tmp_path / "one.png", "--model", tiny_heatmap, "--classifier", "none",
                           "--out", tmp_path / "d.csv", "--backend", "onnxruntime")
    assert code == 2 and "--backend" in err and "torch" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(monkeypatch, capsys, "detect", tmp_path / "one.png", "--model", tiny_heatmap, "--classifier", "none",
                           "--out", tmp_path / "d.csv", "--min-score", "0.01")
    assert code == 0, err
    assert list(pd.read_csv(tmp_path / "d.csv").columns) == ["image", "x", "y", "score"]


@pytest.mark.parametrize("command", ["crops", "candidates"])
def test_data_sets_refuse_an_out_that_is_a_file(command: str, tmp_path: Path, monkeypatch, capsys) -> None:
    img = tmp_path / "a.png"
    Image.fromarray(scene((128, 128), [(64.0, 64.0)], seed=1)).save(img)
    (tmp_path / "pts.csv").write_text(f"image,x,y\n{img},64,64\n")
    (tmp_path / "taken").write_text("not a folder")
    code, _, err = run_cli(monkeypatch, capsys, "data", command, tmp_path / "pts.csv", tmp_path / "taken")
    assert code == 2 and "is a file; expected a folder" in err and "Traceback" not in err
    assert (tmp_path / "taken").read_text() == "not a folder"
