"""Where the tissue is: a slide's thumbnail, its tissue mask, and the geometry that maps both to the
slide's level-0 pixels and microns.

The thumbnail is read at a coarse resolution (:data:`THUMB_MPP`) in chunks of at most
:data:`CHUNK` pixels of the level it is read from, so reading it costs one chunk beside the
thumbnail itself whatever the slide's size (the report's view of a region is read the same way). The mask is Otsu on the thumbnail
(:func:`mitotype.data.tiles.tissue_mask`), all tissue (``none``, for crops that are all tissue), or a
user's mask image (any size; white or non-zero is tissue) stretched over the whole slide.
A :class:`TissueMap` is the mask over the analysed region (the whole slide or a region of interest),
with what an analysis asks of it: tissue area, whether a tile or a point is on tissue, and the
hotspot's cell grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mitotype.data.slides import Source, choose_level
from mitotype.data.tiles import tissue_mask
from mitotype.errors import MitotypeError

THUMB_MPP = 8.0  # µm per thumbnail pixel: a 20 x 15 mm slide is 2,500 x 1,875 px
CHUNK = 1024  # pixels of the read level per chunk side


def read_thumbnail(source: Source, mpp: float = THUMB_MPP, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The image at ``mpp`` ((H, W, 3) uint8; ``box`` (x0, y0, x1, y1) in pixels of ``mpp``, default the
    whole image, ``source.size_at(mpp)``), read chunk by chunk so memory is the result and one chunk."""
    x0, y0, x1, y1 = box or (0, 0, *source.size_at(mpp))
    level = choose_level(source.level_mpps, mpp)
    step = max(1, int(CHUNK * source.level_mpps[level] / mpp))  # result pixels per chunk side
    out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    for cy in range(y0, y1, step):
        for cx in range(x0, x1, step):
            ex, ey = min(x1, cx + step), min(y1, cy + step)
            out[cy - y0:ey - y0, cx - x0:ex - x0] = source.region((cx, cy, ex, ey), mpp)
    return out


def read_mask_image(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A user's tissue mask (any image; non-zero / white is tissue) stretched to ``size`` (w, h)."""
    try:
        with Image.open(path) as im:
            grey = im.convert("L").resize(size, Image.Resampling.NEAREST)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise MitotypeError(f"{{tissue_mask}} {path}: cannot read the mask image ({str(err).splitlines()[0][:120]})",
                            options=("tissue_mask",)) from None
    return np.asarray(grey) > 127


def slide_mask(thumbnail: np.ndarray, tissue: str | Path) -> np.ndarray:
    """The whole slide's mask on its thumbnail's pixels: ``otsu``, ``none`` (all tissue) or a mask image's path."""
    h, w = thumbnail.shape[:2]
    if str(tissue) == "otsu":
        return tissue_mask(thumbnail)
    if str(tissue) == "none":
        return np.ones((h, w), dtype=bool)
    return read_mask_image(tissue, (w, h))


@dataclass(frozen=True)
class TissueMap:
    """A boolean mask over a region of a slide: pixel (r, c) covers level-0 microns
    [(origin_x + c) * mpp, (origin_x + c + 1) * mpp) and likewise in y; ``region_um`` (x0, y0, x1, y1)
    is the analysed region in level-0 microns, inside the mask's pixels."""

    mask: np.ndarray
    mpp: float
    origin: tuple[int, int]  # the mask's first pixel, in whole-slide thumbnail pixels
    region_um: tuple[float, float, float, float]

    @classmethod
    def crop(cls, whole: np.ndarray, mpp: float, region_um: tuple[float, float, float, float]) -> "TissueMap":
        """The part of a whole-slide mask (at ``mpp``) that covers ``region_um``."""
        x0, y0, x1, y1 = region_um
        h, w = whole.shape
        c0, r0 = min(w - 1, int(x0 // mpp)), min(h - 1, int(y0 // mpp))
        c1, r1 = max(c0 + 1, min(w, math.ceil(x1 / mpp))), max(r0 + 1, min(h, math.ceil(y1 / mpp)))
        return cls(whole[r0:r1, c0:c1].copy(), mpp, (c0, r0), region_um)

    def _pixel(self, x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.mask.shape
        c = np.clip(np.floor(np.asarray(x_um, dtype=float) / self.mpp).astype(int) - self.origin[0], 0, w - 1)
        r = np.clip(np.floor(np.asarray(y_um, dtype=float) / self.mpp).astype(int) - self.origin[1], 0, h - 1)
        return r, c

    def on_tissue(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Whether each point (level-0 microns) lies on a tissue pixel."""
        r, c = self._pixel(x_um, y_um)
        return self.mask[r, c]

    def any_tissue(self, box_um: tuple[float, float, float, float]) -> bool:
        """Whether any tissue pixel touches the box (x0, y0, x1, y1) in level-0 microns."""
        x0, y0, x1, y1 = box_um
        r0, c0 = self._pixel(np.array(x0), np.array(y0))
        r1, c1 = self._pixel(np.array(np.nextafter(x1, -np.inf)), np.array(np.nextafter(y1, -np.inf)))
        return bool(self.mask[int(r0):int(r1) + 1, int(c0):int(c1) + 1].any())

    def area_mm2(self) -> float:
        """Tissue area inside the region: each pixel weighted by the share of it the region covers."""
        x0, y0, x1, y1 = self.region_um
        h, w = self.mask.shape
        edges_x = (self.origin[0] + np.arange(w + 1)) * self.mpp
        edges_y = (self.origin[1] + np.arange(h + 1)) * self.mpp
        wx = np.clip(np.minimum(edges_x[1:], x1) - np.maximum(edges_x[:-1], x0), 0, None)
        wy = np.clip(np.minimum(edges_y[1:], y1) - np.maximum(edges_y[:-1], y0), 0, None)
        return float(wy @ self.mask.astype(np.float64) @ wx) / 1e6

    def grid(self, xs_um: np.ndarray, ys_um: np.ndarray) -> np.ndarray:
        """The mask sampled on a grid: (len(ys_um), len(xs_um)), True where (x, y) lies on tissue."""
        r, _ = self._pixel(np.zeros(len(ys_um)), ys_um)
        _, c = self._pixel(xs_um, np.zeros(len(xs_um)))
        return self.mask[np.ix_(r, c)]

    def cells(self, cell_um: float) -> np.ndarray:
        """The hotspot's cell grid over the region (rows, cols of ``cell_um``): True where the cell's
        centre lies on tissue."""
        x0, y0, x1, y1 = self.region_um
        cols, rows = max(1, math.ceil((x1 - x0) / cell_um)), max(1, math.ceil((y1 - y0) / cell_um))
        return self.grid(x0 + (np.arange(cols) + 0.5) * cell_um, y0 + (np.arange(rows) + 0.5) * cell_um)
