"""Synthetic datasets in each published layout, made fresh per test; no real images are committed.

Atypical patches carry a dark off-centre blob, normal ones a centred one, so a tiny model can
learn something in a few steps; slides (groups) and domains are assigned so grouped splits matter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download weights

PATCH = 32
TINY = [
    "model.backbone=test_efficientnet",
    "model.pretrained=none",
    f"model.input_size={PATCH}",
    "model.center_crop=0",  # the default recipe crops 80 px: more than a tiny patch
    f"data.patch_size={PATCH}",
    "train.epochs=2",
    "train.batch_size=16",
    "train.eval_batch_size=32",
    "augment.rotate_degrees=5",
    "augment.hed_sigma=0.05",
]


@pytest.fixture(autouse=True, scope="session")
def _private_onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The auto backend exports models into the ONNX cache: tests use their own, never the user's."""
    os.environ.setdefault("MITOTYPE_CACHE_DIR", str(tmp_path_factory.mktemp("mitotype-cache")))


@pytest.fixture(scope="session")
def shared_cv_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One tiny 3-fold cv run per test session, made through the command line (its stdout kept as
    ``cv.stdout`` beside it), for the tests that read a finished run: (data folder, run folder).
    A test that changes the run puts it back as it found it."""
    import subprocess

    root = tmp_path_factory.mktemp("shared-cv")
    data = write_class_folders(root / "data")
    sets = [arg for item in (*TINY, "train.epochs=1") for arg in ("--set", item)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "mitotype", "cv", "--data", str(data), "--folds", "3", "--out", str(root / "cv"), *sets],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    (root / "cv.stdout").write_text(result.stdout)
    return data, root / "cv"


def make_patch(rng: np.random.Generator, atypical: bool, size: int = PATCH) -> np.ndarray:
    img = np.full((size, size, 3), (235, 200, 220), dtype=np.float64)
    img += rng.normal(0, 12, img.shape)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = (size * 0.35, size * 0.6) if atypical else (size / 2, size / 2)
    blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < (size * 0.15) ** 2
    img[blob] = (70, 40, 110) + rng.normal(0, 8, (int(blob.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_class_folders(root: Path, n_atypical: int = 12, n_normal: int = 28, n_slides: int = 10, seed: int = 0,
                        metadata: bool = True, folder_names: tuple[str, str] = ("Atypical", "Normal")) -> Path:
    """AMi-Br layout: Atypical/ + Normal/ + metadata.csv with slide, dataset and three experts' votes."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, n, folder in ((1, n_atypical, folder_names[0]), (0, n_normal, folder_names[1])):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"{'A' if label else 'N'}_{i:03d}.png"
            Image.fromarray(make_patch(rng, bool(label))).save(root / folder / name)
            slide = f"{i % n_slides:03d}.tiff"
            votes = [bool(label)] * 3
            if i % 4 == 0:
                votes[2] = not votes[2]  # a hard case: one expert disagrees
            rows.append({
                "slide": slide, "dataset": "DOM_A" if i % n_slides < n_slides // 2 else "DOM_B", "uid": len(rows),
                "label": "Atypical" if label else "Normal", "filename": name, "x": 100 + i, "y": 200 + i,
                "expert1_label": ("AMF other" if label else "NMF metaphase"), "expert2_label": "",
                "expert1_atypical": votes[0], "expert2_atypical": votes[1], "expert3_atypical": votes[2],
                "majority_atypical": bool(label),
            })
    if metadata:
        pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


@pytest.fixture
def amibr(tmp_path: Path) -> Path:
    return write_class_folders(tmp_path / "amibr")


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture
def untrained(tmp_path: Path) -> Path:
    """A saved tiny model with random weights: enough for commands that load a model, explain and
    report on it. Its card's trained_on holds HTML, so the report tests see card fields escaped."""
    import torch

    from mitotype.config import load_config
    from mitotype.models.artifact import save_model
    from mitotype.models.registry import create_model

    torch.manual_seed(0)
    cfg = load_config("lite0-quick", TINY)
    save_model(create_model(cfg.model), cfg, tmp_path / "model", threshold=0.5, trained_on={"data": "synthetic <b>"}, metrics={})
    return tmp_path / "model"


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args) -> tuple[int, str, str]:
    """Run ``mitotype ARGS`` in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    from mitotype.cli import main

    monkeypatch.setattr(sys, "argv", ["mitotype", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "200")  # one-line errors stay one line
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """timm's pretrained loading reads a local file instead of the hub: returns the model whose
    random weights that file holds (test_efficientnet), so a test can compare tensors."""
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model("test_efficientnet", num_classes=0)
    save_file(reference.state_dict(), str(tmp_path / "hub.safetensors"))
    real = timm.create_model

    def create(name, pretrained=False, **kw):
        if pretrained:
            kw["pretrained_cfg_overlay"] = {"file": str(tmp_path / "hub.safetensors"), "num_classes": 0}
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", create)
    return reference
