"""Write an RGB image as a tiled pyramidal TIFF that tiffslide, OpenSlide and QuPath open as a slide.

Level 0 is the image; each further level is the 2x2 block mean of the one above, stored as a SubIFD
of level 0, until a level fits in one tile. Every level carries its microns per pixel in the TIFF
resolution tags (pixels per centimetre), which tiffslide reports as ``tiffslide.mpp-x``. Tiles are
JPEG (quality 90, as scanners store them) unless ``compression`` says otherwise. The file is written
atomically. Used to make synthetic slides for tests, benchmarks and the README's example.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mitotype._io import atomic_path
from mitotype.errors import MitotypeError


def pyramid_levels(level0: np.ndarray, *, tile: int = 256) -> list[np.ndarray]:
    """Level 0 and its 2x2 block means (odd last rows/columns dropped) until a level fits in a tile."""
    levels = [level0]
    while max(levels[-1].shape[:2]) > tile and min(levels[-1].shape[:2]) >= 2:
        a = levels[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        block = a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.float32).mean((1, 3))
        levels.append(np.round(block).astype(np.uint8))
    return levels


def write_pyramid(path: str | Path, level0: np.ndarray, *, mpp: float | None, tile: int = 256, compression: str | None = "jpeg",
                  quality: int = 90) -> list[np.ndarray]:
    """Write ``level0`` ((H, W, 3) uint8) and its pyramid to ``path``; returns the levels written.
    ``mpp`` None writes no resolution (a slide that does not say its microns per pixel)."""
    import tifffile

    if level0.ndim != 3 or level0.shape[2] != 3 or level0.dtype != np.uint8:
        raise MitotypeError(f"write_pyramid: expected an (H, W, 3) uint8 image, got {level0.shape} {level0.dtype}")
    if tile % 16 or tile <= 0:
        raise MitotypeError(f"write_pyramid: tile {tile} must be a positive multiple of 16 (TIFF tiles)")
    levels = pyramid_levels(level0, tile=tile)
    options: dict = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
    if compression == "jpeg":
        options["compressionargs"] = {"level": quality}

    def resolution(i: int) -> dict:
        if mpp is None:
            return {}
        return {"resolution": (1e4 / (mpp * 2**i), 1e4 / (mpp * 2**i)), "resolutionunit": "CENTIMETER"}

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=level0.nbytes > 2**31) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, **options, **resolution(0))
        for i, level in enumerate(levels[1:], 1):
            tw.write(level, subfiletype=1, **options, **resolution(i))
    return levels
