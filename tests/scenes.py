"""Synthetic H&E-like scenes with figures placed where the test says: pink stroma, many small
pale nuclei (look-alikes) and a few large dark irregular blobs (the 'mitoses'), at 0.25 um/px."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

STROMA = np.array([232, 190, 214], dtype=np.float32)
NUCLEUS = np.array([105, 65, 150], dtype=np.float32)
FIGURE = np.array([70, 35, 100], dtype=np.float32)


def _blob(img: np.ndarray, x: float, y: float, r: float, colour: np.ndarray, rng: np.random.Generator, lobes: int = 0) -> None:
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    angle = np.arctan2(yy - y, xx - x)
    radius = r * (1 + (0.25 * np.sin(lobes * angle + rng.uniform(0, 6.28)) if lobes else 0))
    inside = np.hypot(xx - x, yy - y) <= radius
    img[inside] = colour


def scene(size: tuple[int, int], figures: list[tuple[float, float]], *, seed: int = 0, nuclei: int = 40) -> np.ndarray:
    """(H, W, 3) uint8: ``nuclei`` pale nuclei at random and a dark lobed figure at each (x, y)."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.broadcast_to(STROMA, (h, w, 3)).copy()
    for _ in range(nuclei):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        if all(np.hypot(x - fx, y - fy) > 40 for fx, fy in figures):
            _blob(img, x, y, rng.uniform(4, 6), NUCLEUS, rng)
    for fx, fy in figures:
        _blob(img, fx, fy, rng.uniform(9, 11), FIGURE, rng, lobes=3)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_scenes(folder, n: int = 4, size: tuple[int, int] = (256, 256), per_image: int = 3, seed: int = 0) -> pd.DataFrame:
    """PNG scenes in ``folder`` and their truth (image, x, y, slide); also written as truth.csv."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pts: list[tuple[float, float]] = []
        while len(pts) < per_image:
            x, y = float(rng.integers(24, size[0] - 24)), float(rng.integers(24, size[1] - 24))
            if all(np.hypot(x - a, y - b) > 60 for a, b in pts):
                pts.append((x, y))
        name = f"scene_{i}.png"
        Image.fromarray(scene(size, pts, seed=seed * 100 + i)).save(folder / name)
        rows += [{"image": name, "x": x, "y": y, "slide": f"slide_{i % 2}"} for x, y in pts]
    truth = pd.DataFrame(rows)
    truth.to_csv(folder / "truth.csv", index=False)
    return truth
