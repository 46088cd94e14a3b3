"""Patches for the benchmarks: the real AMi-Br training split when present, else synthetic ones.

Speed does not depend on what the pixels show, but decoding real PNGs does (their compression),
so the scripts prefer real files and say loudly when they fall back to noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mitotype.config import Config
from mitotype.data.images import ImageStore
from mitotype.data.readers import read_dataset

# Same convention as tests/test_realdata.py: MITOTYPE_DATA is the folder holding ami-br-train/.
DEFAULT_DATA = Path(os.environ.get("MITOTYPE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "ami-br-train"
SYNTHETIC_NOTE = "NOTE: {path} not found, using synthetic noise patches (set MITOTYPE_DATA or --data for real ones)"


def decoded_rows(data: Path, cfg: Config, n: int, seed: int = 0) -> tuple[pd.DataFrame, ImageStore, str]:
    """``n`` labelled rows decoded at the recipe's patch size: a seeded sample of ``data``, or noise."""
    if data.is_dir():
        from mitotype.workflows.runs import load_dataset

        ds = load_dataset(data, cfg)
        rows = np.sort(np.random.default_rng(seed).choice(len(ds.manifest), min(n, len(ds.manifest)), replace=False))
        return ds.manifest.iloc[rows].reset_index(drop=True), ds.store.subset(rows), f"{len(rows)} real patches from {data}"
    print(SYNTHETIC_NOTE.format(path=data))
    size = cfg.data.patch_size
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 4 == 0).astype(int)  # about the real split's 22% atypical
    manifest = pd.DataFrame({"path": [f"synthetic/{i}.png" for i in range(n)], "label": labels, "group": [str(i % 20) for i in range(n)],
                             "domain": ""})
    store = ImageStore(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n))
    return manifest, store, f"{n} synthetic patches"


def png_paths(data: Path, n: int, size: int, tmp: Path, seed: int = 0) -> tuple[list[str], str]:
    """``n`` PNG files: a seeded sample of ``data``, or noise written to ``tmp``."""
    if data.is_dir():
        manifest = read_dataset(data).manifest.sample(frac=1, random_state=seed).head(n)
        return manifest["path"].tolist(), f"{len(manifest)} real PNG patches from {data}"
    print(SYNTHETIC_NOTE.format(path=data))
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(tmp / f"{i}.png")
        paths.append(str(tmp / f"{i}.png"))
    return paths, f"{n} synthetic PNG patches"
