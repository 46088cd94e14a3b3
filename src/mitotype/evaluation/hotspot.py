"""The mitotic hotspot: the most figures in one window of a given area (2 mm², or 2.37 mm² = 10
high-power fields), found as the maximum of a box filter over the count map.

Figures are binned into square cells of ``cell_um``; the window is the square of whole cells
nearest the asked area (its true area is reported); an integral image gives every window's count
at once. Where a tissue mask is given, only windows whose centre cell lies on tissue count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mitotype.errors import MitotypeError

HPF10_MM2 = 2.37  # ten high-power fields
MM2_WINDOW = 2.0


@dataclass(frozen=True)
class Hotspot:
    count: int
    x_um: float  # the window's top-left corner, µm from the region's origin
    y_um: float
    width_um: float  # the window's size: whole cells, cut to the region when it is smaller
    height_um: float

    @property
    def area_mm2(self) -> float:
        return self.width_um * self.height_um / 1e6


def hotspot(xy_um: np.ndarray, *, extent_um: tuple[float, float], area_mm2: float, cell_um: float = 50.0,
            tissue: np.ndarray | None = None) -> Hotspot:
    """The window of about ``area_mm2`` holding the most of the points ``xy_um`` ((N, 2), µm) within a
    region of ``extent_um`` (width, height). ``tissue``: a boolean mask of the cell grid's shape
    (rows, cols) whose False cells cannot centre a window."""
    if area_mm2 <= 0 or cell_um <= 0:
        raise MitotypeError(f"hotspot: area {area_mm2} mm² and cell {cell_um} µm must be positive")
    cols, rows = (max(1, math.ceil(e / cell_um)) for e in extent_um)
    side = max(1, round(math.sqrt(area_mm2) * 1000 / cell_um))
    counts = np.zeros((rows, cols), dtype=np.int64)
    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    if len(xy):
        c = np.clip((xy[:, 0] // cell_um).astype(int), 0, cols - 1)
        r = np.clip((xy[:, 1] // cell_um).astype(int), 0, rows - 1)
        np.add.at(counts, (r, c), 1)
    win_r, win_c = min(side, rows), min(side, cols)
    integral = np.zeros((rows + 1, cols + 1), dtype=np.int64)
    integral[1:, 1:] = counts.cumsum(0).cumsum(1)
    sums = integral[win_r:, win_c:] - integral[:-win_r, win_c:] - integral[win_r:, :-win_c] + integral[:-win_r, :-win_c]
    if tissue is not None:
        if tissue.shape != counts.shape:
            raise MitotypeError(f"hotspot: tissue mask {tissue.shape} does not match the cell grid {counts.shape}")
        centres = tissue[win_r // 2 : win_r // 2 + sums.shape[0], win_c // 2 : win_c // 2 + sums.shape[1]]
        sums = np.where(centres, sums, -1)
    r0, c0 = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return Hotspot(max(0, int(sums[r0, c0])), float(c0 * cell_um), float(r0 * cell_um), float(win_c * cell_um), float(win_r * cell_um))
