"""Tiles whose cores partition the region, the Otsu tissue mask, and the hotspot window."""

from __future__ import annotations

import numpy as np
import pytest

from mitotype.data.tiles import otsu_threshold, tile_grid, tissue_mask
from mitotype.errors import MitotypeError
from mitotype.evaluation.hotspot import HPF10_MM2, hotspot


@pytest.mark.parametrize("region, tile, overlap", [((3, 5, 23, 17), 10, 4), ((0, 0, 64, 64), 32, 8), ((0, 0, 7, 40), 16, 5)])
def test_tile_cores_own_every_pixel_once_and_each_tile_sees_past_its_core(region, tile, overlap) -> None:
    x, y, w, h = region
    tiles = tile_grid(region, tile=tile, overlap=overlap)
    owners = np.zeros((h, w), int)
    for t in tiles:
        cx0, cy0, cx1, cy1 = t.core
        assert t.x0 <= cx0 < cx1 <= t.x1 and t.y0 <= cy0 < cy1 <= t.y1 and t.x1 - t.x0 <= tile
        owners[cy0 - y : cy1 - y, cx0 - x : cx1 - x] += 1
        for inner, margin in ((cx0 > x, cx0 - t.x0), (cy0 > y, cy0 - t.y0), (cx1 < x + w, t.x1 - cx1), (cy1 < y + h, t.y1 - cy1)):
            if inner:  # a figure on the core's inner edge is seen with half the overlap around it
                assert margin >= overlap // 2
    assert (owners == 1).all()
    point = (x + w - 0.5, y + h - 0.5)
    assert sum(t.owns(*point) for t in tiles) == 1


def test_bad_tiling_is_refused() -> None:
    with pytest.raises(MitotypeError, match="need 0 <= overlap < tile"):
        tile_grid((0, 0, 10, 10), tile=8, overlap=8)
    with pytest.raises(MitotypeError, match="width and height must be positive"):
        tile_grid((0, 0, 0, 10), tile=8, overlap=2)


def test_tissue_is_the_coloured_part_of_the_thumbnail() -> None:
    rng = np.random.default_rng(0)
    thumb = np.full((40, 60, 3), 245, np.uint8) + rng.integers(0, 6, (40, 60, 3)).astype(np.uint8)  # glass
    thumb[10:30, 5:35] = (200, 120, 170)  # H&E pink
    mask = tissue_mask(thumb)
    assert mask[10:30, 5:35].all() and mask.sum() == 20 * 30
    assert not tissue_mask(np.full((8, 8, 3), 240, np.uint8)).any()  # all glass
    stained = np.zeros((40, 60, 3), np.uint8) + (200, 120, 170)
    stained[:, 30:] = (225, 175, 205)  # a crop that is all tissue, some of it pale: no glass for Otsu to find
    assert tissue_mask(stained).all()
    stained[:10] = 245  # with glass, the pale tissue stays tissue and the glass does not
    assert not tissue_mask(stained)[:10].any() and tissue_mask(stained)[10:].all()
    low, high = rng.normal(0.1, 0.02, 500), rng.normal(0.6, 0.05, 500)
    assert low.max() < otsu_threshold(np.r_[low, high]) <= high.min()  # separates the two modes


def test_the_hotspot_is_the_densest_window_on_tissue() -> None:
    rng = np.random.default_rng(1)
    extent = (5000.0, 4000.0)  # µm
    spread = rng.uniform(0, 1, (30, 2)) * extent
    cluster = np.array([3000.0, 1000.0]) + rng.uniform(0, 1000, (12, 2))  # 12 figures inside a 1 mm square
    spot = hotspot(np.r_[spread, cluster], extent_um=extent, area_mm2=2.0)
    assert spot.count >= 12 and spot.x_um <= 3000 and spot.x_um + spot.width_um >= 4000 and spot.y_um <= 1000
    assert spot.width_um == spot.height_um == 1400 and spot.area_mm2 == pytest.approx(1.96)  # 28 cells of 50 µm
    rows, cols = 80, 100
    tissue = np.ones((rows, cols), bool)
    tissue[:, 50:] = False  # the cluster's half of the slide is not tissue: its windows cannot centre there
    off = hotspot(np.r_[spread, cluster], extent_um=extent, area_mm2=2.0, tissue=tissue)
    assert off.x_um + off.width_um / 2 < 2550 and off.count < spot.count
    assert hotspot(np.zeros((0, 2)), extent_um=extent, area_mm2=HPF10_MM2).count == 0
    with pytest.raises(MitotypeError, match="does not match the cell grid"):
        hotspot(cluster, extent_um=extent, area_mm2=2.0, tissue=np.ones((3, 3), bool))


def test_tissue_mask_keeps_pale_gaps_inside_tissue() -> None:
    from mitotype.data.tiles import tissue_mask

    thumb = np.full((40, 40, 3), 245, np.uint8)  # glass
    thumb[5:35, 5:35] = (200, 120, 170)  # tissue
    thumb[18:21, 18:21] = 240  # a pale gap inside it (lumen, fat, or a pale cell beside a figure)
    mask = tissue_mask(thumb)
    assert mask[19, 19] and mask[5:35, 5:35].all() and not mask[0:3].any() and not mask[:, 37:].any()
    assert not tissue_mask(thumb, closing=0)[19, 19]


def test_pale_tissue_is_tissue_when_glass_is_a_small_share() -> None:
    from mitotype.data.tiles import tissue_mask

    thumb = np.full((50, 50, 3), 243, np.uint8)  # a glass margin, 19% of the thumbnail
    thumb[3:47, 3:47] = (150, 60, 120)  # dark, saturated tissue
    thumb[5:45, 25:45] = (205, 170, 195)  # a pale region: saturation ~0.17, brightness ~0.75
    mask = tissue_mask(thumb)
    assert mask[5:45, 25:45].all() and mask[3:47, 3:47].all() and not mask[0:2].any()
