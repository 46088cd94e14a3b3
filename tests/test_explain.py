"""mitotype explain: Grad-CAM overlays beside each patch, where the evidence is, and the contact sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import PATCH, write_class_folders
from conftest import run_cli as cli
from helpers import assert_one_line_error
from mitotype.config import HeadConfig
from mitotype.inference.explain import CAPTION, HEADER, PAD, TILE, find_target_layer, grad_cams
from mitotype.models.pretrained import Normalization
from mitotype.models.registry import MitotypeModel

pytest.importorskip("pytorch_grad_cam", reason="pytorch-grad-cam not installed (pip install 'mitotype[explain]')")
SIZE = 64
RED, BLUE = (slice(4, 12), slice(48, 56)), (slice(48, 56), slice(4, 12))  # top-right / bottom-left boxes (rows, cols)


class ColourBackbone(nn.Module):
    """A timm-like backbone: channel 0 fires on red (R - B), channel 1 on blue (B - R), per 4x4 cell."""

    num_features = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=4, stride=4, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0], self.conv.weight[0, 2] = 1 / 16, -1 / 16
            self.conv.weight[1, 2], self.conv.weight[1, 0] = 1 / 16, -1 / 16
        self.act = nn.ReLU()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


def colour_model(atypical_is_red: bool = True) -> MitotypeModel:
    """logit(atypical) = mean red evidence, logit(normal) = mean blue evidence (or swapped)."""
    net = MitotypeModel(ColourBackbone(), [HeadConfig()], Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), SIZE)
    with torch.no_grad():
        head = net.heads["label"]
        head.bias.zero_()
        head.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]] if atypical_is_red else [[1.0, 0.0], [0.0, 1.0]]))
    return net.eval()


def two_blobs() -> torch.Tensor:
    img = torch.full((1, 3, SIZE, SIZE), 0.5)
    img[0, :, RED[0], RED[1]] = torch.tensor([0.9, 0.2, 0.1]).view(3, 1, 1)
    img[0, :, BLUE[0], BLUE[1]] = torch.tensor([0.1, 0.2, 0.9]).view(3, 1, 1)
    return img


def test_the_map_is_highest_where_the_evidence_for_the_target_class_lies() -> None:
    net, img = colour_model(), two_blobs()
    assert find_target_layer(net.backbone, SIZE) is net.backbone.act
    atypical = grad_cams([net], img, [1])[0]
    assert atypical.shape == (SIZE, SIZE)
    row, col = np.unravel_index(np.argmax(atypical), atypical.shape)
    assert RED[0].start <= row < RED[0].stop and RED[1].start <= col < RED[1].stop
    assert atypical[RED].mean() > 0.6 and atypical[BLUE].max() == 0.0 and atypical[28:36, 28:36].max() == 0.0
    normal = grad_cams([net], img, [0])[0]  # the evidence for "normal" is the blue blob
    row, col = np.unravel_index(np.argmax(normal), normal.shape)
    assert BLUE[0].start <= row < BLUE[0].stop and BLUE[1].start <= col < BLUE[1].stop
    assert normal[BLUE].mean() > 0.6 and normal[RED].max() == 0.0
    # a fold ensemble averages its members' maps: one finds red, the other blue
    mean = grad_cams([net, colour_model(atypical_is_red=False)], img, [1])[0]
    np.testing.assert_allclose(mean, (atypical + normal) / 2, atol=1e-6)


def test_a_centre_cropping_model_is_explained_inside_its_crop() -> None:
    net = colour_model()
    net.center_crop = 48  # the model sees rows and columns 8..56 only
    img = torch.full((1, 3, SIZE, SIZE), 0.5)
    img[0, :, 0:6, 0:6] = torch.tensor([0.9, 0.2, 0.1]).view(3, 1, 1)  # red outside the crop: unseen
    img[0, :, 20:28, 36:44] = torch.tensor([0.9, 0.2, 0.1]).view(3, 1, 1)  # red inside it
    cam = grad_cams([net], img, [1])[0]
    assert cam.shape == (SIZE, SIZE)
    assert cam[:8].max() == 0.0 and cam[:, :8].max() == 0.0 and cam[56:].max() == 0.0 and cam[:, 56:].max() == 0.0
    row, col = np.unravel_index(np.argmax(cam), cam.shape)
    assert 20 <= row < 28 and 36 <= col < 44


def test_overlays_beside_each_patch_and_a_contact_sheet_of_the_expected_grid(monkeypatch, capsys, tmp_path, untrained) -> None:
    data = write_class_folders(tmp_path / "data", n_atypical=5, n_normal=7, n_slides=4)
    code, stdout, err = cli(monkeypatch, capsys, "explain", untrained, data, tmp_path / "ex", "--n", "3")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "ex" / "explanations.csv")
    patches = sorted(p.relative_to(data) for p in data.rglob("*.png"))
    overlays = sorted(p.relative_to(tmp_path / "ex") for p in (tmp_path / "ex").rglob("*.png") if p.name != "contact_sheet.png")
    assert overlays == patches and len(table) == 12
    for rel in patches:
        patch = np.asarray(Image.open(data / rel).convert("RGB"), dtype=np.float64)
        over = np.asarray(Image.open(tmp_path / "ex" / rel), dtype=np.float64)
        assert over.shape == (PATCH, PATCH, 3)
        # at 32 px the tiny backbone's map is 1x1, so Grad-CAM is 0 everywhere: jet(0) = dark blue, 45% over the patch
        np.testing.assert_allclose(over, np.floor(0.55 * patch + 0.45 * np.array([0, 0, 127.5])), atol=1)

    sheet = np.asarray(Image.open(tmp_path / "ex" / "contact_sheet.png").convert("RGB"))
    assert sheet.shape == (PAD + 4 * (HEADER + TILE + CAPTION + PAD), PAD + 3 * (TILE + PAD), 3) == (750, 408, 3)
    t = 0.5
    for section, (cls, kind) in enumerate((("atypical", "c"), ("atypical", "u"), ("normal", "c"), ("normal", "u"))):
        rows = table[table["label"] == cls].assign(margin=lambda d: (d["p_atypical"] - t).abs())
        k = len(rows)
        confident = min(3, (k + 1) // 2)
        expected = rows.nlargest(confident, "margin") if kind == "c" else rows.nsmallest(min(3, k - confident), "margin")
        top = PAD + section * (HEADER + TILE + CAPTION + PAD) + HEADER
        for col in range(3):
            tile = sheet[top : top + TILE, PAD + col * (TILE + PAD) : PAD + col * (TILE + PAD) + TILE]
            if col < len(expected):
                path = tmp_path / "ex" / Path(expected.iloc[col]["path"]).relative_to(data)
                want = np.asarray(Image.open(path).convert("RGB").resize((TILE, TILE), Image.BILINEAR))
                np.testing.assert_array_equal(tile, want)
            else:
                assert (tile == 255).all()


def test_bad_explain_input_is_one_line_with_exit_2(monkeypatch, capsys, tmp_path, untrained) -> None:
    data = write_class_folders(tmp_path / "data", n_atypical=2, n_normal=2, n_slides=2)
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    run = lambda *args: cli(monkeypatch, capsys, "explain", *args)  # noqa: E731
    assert_one_line_error(run(untrained, tmp_path / "nowhere", tmp_path / "ex"), "input", "nowhere", "no such file")
    assert_one_line_error(run(untrained, data, tmp_path / "ex", "--target", "both"), "--target 'both'", "atypical, predicted")
    assert_one_line_error(run(untrained, data, tmp_path / "ex", "--n", "0"), "--n 0", "at least 1")
    assert_one_line_error(run(untrained, data, a_file), "OUT_DIR", "is a file")
    assert_one_line_error(run(tmp_path / "data", data, tmp_path / "ex"), "no model here")
    assert_one_line_error(run(untrained, data, data), "OUT_DIR", "would replace an input patch")
    assert not (tmp_path / "ex").exists()
