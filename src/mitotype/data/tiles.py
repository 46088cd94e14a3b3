"""Tiling a slide or image for detection, and the tissue mask that decides which tiles to read.

Tiles overlap so that a figure near a border is seen whole by some tile; each tile owns only its
*core* (the tile less half the overlap on each inner side), and a detection is kept only from the
tile whose core holds it, so borders neither lose nor double figures. The cores of a grid partition
the region exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from mitotype.errors import MitotypeError


@dataclass(frozen=True)
class Tile:
    """A read window (x0, y0, x1, y1) and the core it owns, in level-0 pixels; ends exclusive."""

    x0: int
    y0: int
    x1: int
    y1: int
    core: tuple[int, int, int, int]

    def owns(self, x: float, y: float) -> bool:
        cx0, cy0, cx1, cy1 = self.core
        return cx0 <= x < cx1 and cy0 <= y < cy1


def tile_grid(region: tuple[int, int, int, int], *, tile: int, overlap: int) -> list[Tile]:
    """Tiles of side ``tile`` (smaller at the far edges) stepping by ``tile - overlap`` over
    ``region`` (x, y, w, h); the cores split each overlap in half and together cover the region once."""
    x, y, w, h = region
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise MitotypeError(f"tiles of {tile} px with {overlap} px overlap: need 0 <= overlap < tile")
    if w <= 0 or h <= 0:
        raise MitotypeError(f"region {region}: width and height must be positive")
    step = tile - overlap

    def starts(length: int) -> list[int]:
        return [i * step for i in range(max(1, math.ceil((length - overlap) / step)))]

    def cores(origins: list[int], length: int) -> list[tuple[int, int]]:
        bounds = [0] + [o + overlap // 2 for o in origins[1:]] + [length]
        return list(zip(bounds[:-1], bounds[1:]))

    xs, ys = starts(w), starts(h)
    out = []
    for (ty, (cy0, cy1)) in zip(ys, cores(ys, h)):
        for (tx, (cx0, cx1)) in zip(xs, cores(xs, w)):
            out.append(Tile(x + tx, y + ty, x + min(tx + tile, w), y + min(ty + tile, h), (x + cx0, y + cy0, x + cx1, y + cy1)))
    return out


def otsu_threshold(values: np.ndarray) -> float:
    """The threshold that maximises the between-class variance of ``values`` (256-bin histogram)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(values, bins=256, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(thumbnail: np.ndarray, *, min_saturation: float = 0.05, closing: int = 2, glass_brightness: float = 0.85) -> np.ndarray:
    """Tissue (True) vs glass on an RGB uint8 thumbnail. Glass is bright and grey, H&E tissue darker
    and coloured: Otsu on the brightness splits them (on the saturation it split pale tissue from
    dark where glass was a small share of the slide), and a pixel must also have some colour
    (``min_saturation``). When the brighter Otsu class is not glass-bright (its median under
    ``glass_brightness``) there is no glass to find: everything coloured is tissue (a crop, a mosaic).
    The mask is then closed and its holes filled (:func:`_close`)."""
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3:
        raise MitotypeError(f"tissue mask: expected an RGB thumbnail (H, W, 3), got shape {thumbnail.shape}")
    rgb = thumbnail.astype(np.float64) / 255
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    saturation = np.divide(mx - mn, mx, out=np.zeros_like(mx), where=mx > 0)
    coloured = saturation > min_saturation
    if not coloured.any():
        return np.zeros(saturation.shape, bool)
    brightness = rgb.mean(axis=2)
    threshold = otsu_threshold(brightness)
    above = brightness[brightness > threshold]
    if not above.size or np.median(above) < glass_brightness:  # no glass: Otsu would split the tissue in two
        return coloured
    return _close(coloured & (brightness <= threshold), closing)


def _close(mask: np.ndarray, iterations: int) -> np.ndarray:
    """The mask closed (gaps of up to 2 x ``iterations`` pixels bridged) and its holes filled: pale
    gaps inside tissue (lumen, fat, a pale cell beside a figure) belong to the tissue around them,
    so no figure is lost because the thumbnail pixel it falls in averaged to pale."""
    if iterations <= 0 or not mask.any():
        return mask
    closed = ndimage.binary_closing(np.pad(mask, iterations), iterations=iterations)[iterations:-iterations, iterations:-iterations]
    return ndimage.binary_fill_holes(closed)
