"""One slide from pixels to counts: tissue, detection tile by tile, classification, hotspots, report.

The slide (or a plain image at a given µm/px) is read at a coarse thumbnail for its tissue mask
(:mod:`mitotype.data.tissue`); detection tiles (cores of ``tile`` detector pixels, each read with the
detector's margin: half its patch plus the 7.5 µm suppression radius) are read only where their core
touches tissue, and a detection is kept only from the tile whose core holds it and only on tissue;
each figure is then classified through the points path (a patch centred on it, read from the slide
at the classifier's resolution, so the classifier's patch never depends on a tile border). Memory
is one tile and the thumbnail, whatever the slide's size.

The slide's folder gets ``figures.csv`` (x, y in level-0 pixels, score, p_atypical, label), the same
as QuPath GeoJSON (``figures.geojson``), the mask (``tissue.png``, on the thumbnail's pixels over the
analysed region), ``report.html``, and last ``result.json`` (the summary row and the key that says
what made it), each written atomically.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from PIL import Image

from mitotype._io import atomic_path, write_csv, write_json
from mitotype.data.slides import MPP_TOLERANCE, Source, is_slide, model_mpp, open_source
from mitotype.data.tiles import Tile
from mitotype.data.tissue import THUMB_MPP, TissueMap, read_thumbnail, slide_mask
from mitotype.errors import MitotypeError
from mitotype.evaluation.hotspot import HPF10_MM2, MM2_WINDOW, Hotspot, hotspot
from mitotype.evaluation.slide_report import Box, write_slide_report
from mitotype.inference.detect import TILE, Detector, classify_detections, detect_source, detection_tiles
from mitotype.inference.points import wilson_interval
from mitotype.inference.runtime import load_scorer
from mitotype.models.ensemble import Backend, Ensemble

CELL_UM = 50.0  # hotspot count-map cells
VIEW_SIDE = 1024  # the report's view of the analysed region: pixels on its long side at most
HEAT_UM = 250.0  # the report's heat-map: Gaussian sigma in µm
WINDOWS = (("2mm2", MM2_WINDOW, (0, 170, 0)), ("10hpf", HPF10_MM2, (255, 140, 0)))
RESULT_FILE, ERROR_FILE = "result.json", "error.txt"
SUMMARY_COLUMNS = [
    "slide", "path", "mpp", "coarser_than_model", "tissue_mm2", "mitotic_count", "atypical_count", "atypical_fraction",
    "atypical_ci95_low", "atypical_ci95_high", "mitoses_per_mm2",
    *(f"hotspot_{w}_{k}" for w, _, _ in WINDOWS for k in ("count", "area_mm2", "x", "y", "width", "height")),
    "tiles", "seconds", "warning", "error",
]

INT_COLUMNS = ["mitotic_count", "atypical_count", *(f"hotspot_{w}_{k}" for w, _, _ in WINDOWS for k in ("count", "x", "y", "width", "height"))]


def summary_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The summary table of ``rows``: SUMMARY_COLUMNS, counts as integers that may be missing (a failed slide)."""
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    table[INT_COLUMNS] = table[INT_COLUMNS].astype("Int64")
    table["coarser_than_model"] = table["coarser_than_model"].astype("boolean")
    return table


@dataclass(frozen=True)
class AnalyzeOptions:
    """What an analysis does besides its models: ``tissue`` is ``otsu``, ``none`` or a mask image's
    path; ``roi`` (x, y, w, h) in level-0 pixels; ``mpp`` the µm/px of inputs that do not say theirs
    (plain images, slides without it); ``tile`` the detection tile side in detector pixels;
    ``gallery`` the atypical figures shown in the report."""

    tissue: str = "otsu"
    roi: tuple[int, int, int, int] | None = None
    mpp: float | None = None
    tile: int = TILE
    gallery: int = 24

    def check(self) -> "AnalyzeOptions":
        if self.tissue not in ("otsu", "none") and not Path(self.tissue).is_file():
            raise MitotypeError(f"{{tissue_mask}} {self.tissue}: expected otsu, none or a mask image file", options=("tissue_mask",))
        if self.roi is not None and (len(self.roi) != 4 or self.roi[0] < 0 or self.roi[1] < 0 or self.roi[2] <= 0 or self.roi[3] <= 0):
            raise MitotypeError(f"{{roi}} {self.roi}: expected x,y,w,h with x, y >= 0 and w, h > 0 (level-0 pixels)", options=("roi",))
        if self.mpp is not None and not (math.isfinite(self.mpp) and 0 < self.mpp < 100):
            raise MitotypeError(f"{{mpp}} {self.mpp}: expected microns per pixel in (0, 100)", options=("mpp",))
        if self.tile < 64:
            raise MitotypeError(f"{{tile}} {self.tile}: tiles must be at least 64 px", options=("tile",))
        if self.gallery < 0:
            raise MitotypeError(f"{{gallery}} {self.gallery}: must be >= 0", options=("gallery",))
        return self


@dataclass(frozen=True)
class ModelSpec:
    """Where the models are and how to run them (what a worker needs to load them itself)."""

    detector: Path
    classifier: Path | None
    device: str = "auto"
    backend: str = "auto"
    threshold: float | None = None  # the detector's; None: its card's


@dataclass
class Models:
    """The loaded detector and (optionally) the classifier chained on its figures."""

    detector: Detector
    classifier: tuple[Ensemble, Backend] | None
    spec: ModelSpec = field(repr=False)

    @classmethod
    def load(cls, spec: ModelSpec) -> "Models":
        detector = Detector.load(spec.detector, device=spec.device, threshold=spec.threshold, backend=spec.backend)
        chained = None
        if spec.classifier is not None:
            chained = load_scorer(spec.classifier, device=spec.device, backend=spec.backend, option="classifier")
        return cls(detector, chained, spec)

    def mpps(self) -> list[float]:
        return [self.detector.mpp] + ([model_mpp([self.classifier[0].mpp])] if self.classifier else [])


def analyze_slide(path: str | Path, out_dir: str | Path, *, models: Models, options: AnalyzeOptions, name: str | None = None,
                  key: str = "", on_tile: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Analyse one slide or image into ``out_dir`` (see the module's note); returns its summary row."""
    path, out_dir = Path(path), Path(out_dir)
    name = name or path.name
    start = time.perf_counter()
    if not is_slide(path) and options.mpp is None:
        raise MitotypeError(f"{path}: a plain image does not say its microns per pixel; give {{mpp}} (counts per mm² would "
                            "be silently wrong)", options=("mpp",))
    (out_dir / RESULT_FILE).unlink(missing_ok=True)  # from here on the folder is not a finished result
    try:
        source = open_source(path, image_mpp=options.mpp or 0.0, slide_mpp=options.mpp)
    except MitotypeError as err:
        if "slide_mpp" in err.options:
            raise MitotypeError(f"{path}: the slide does not say its microns per pixel; give {{mpp}}", options=("mpp",)) from None
        raise
    try:
        row = _analyze(source, path, out_dir, name, models, options, on_tile)
    finally:
        source.close()
    row["seconds"] = round(time.perf_counter() - start, 3)
    write_json(out_dir / RESULT_FILE, {"key": key, "row": row})
    return row


@dataclass(frozen=True)
class TilePlan:
    """Where a slide is analysed: the region (level-0 pixels and microns), its tissue, the detection
    grid over it (detector pixels) and the tiles of that grid whose core touches tissue."""

    region: tuple[int, int, int, int]
    region_um: tuple[float, float, float, float]
    tissue: TissueMap
    grid: list[Tile]
    kept: list[Tile]


def plan_tiles(source: Source, detector: Detector, options: AnalyzeOptions, name: str) -> TilePlan:
    """The tissue mask of the region and the detection tiles to read (see the module's note)."""
    l0 = source.level_mpps[0]
    region = _region(options.roi, source.dimensions, name)
    region_um = (region[0] * l0, region[1] * l0, region[2] * l0, region[3] * l0)
    tissue = TissueMap.crop(slide_mask(read_thumbnail(source, THUMB_MPP), options.tissue), THUMB_MPP, region_um)
    f = l0 / detector.mpp  # detector pixels per level-0 pixel
    size = source.size_at(detector.mpp)
    dx0, dy0 = min(size[0] - 1, int(region[0] * f)), min(size[1] - 1, int(region[1] * f))
    dx1, dy1 = max(dx0 + 1, min(size[0], math.ceil(region[2] * f))), max(dy0 + 1, min(size[1], math.ceil(region[3] * f)))
    grid = detection_tiles(size, tile=options.tile, roi=(dx0, dy0, dx1 - dx0, dy1 - dy0))
    m = detector.mpp
    kept = [t for t in grid if tissue.any_tissue((t.core[0] * m, t.core[1] * m, t.core[2] * m, t.core[3] * m))]
    return TilePlan(region, region_um, tissue, grid, kept)


def _analyze(source: Source, path: Path, out_dir: Path, name: str, models: Models, options: AnalyzeOptions,
             on_tile: Callable[[int, int], None] | None) -> dict[str, Any]:
    det, l0 = models.detector, source.level_mpps[0]
    notes: list[str] = []  # warned, and shown in the report
    coarser = l0 > min(models.mpps()) * (1 + MPP_TOLERANCE)
    if coarser:
        notes.append(f"{name}: {l0:g} um/px is coarser than the models' {min(models.mpps()):g}; its figures are enlarged and "
                     "its counts less reliable")
    plan = plan_tiles(source, det, options, name)
    region, region_um, tissue, grid, kept = plan.region, plan.region_um, plan.tissue, plan.grid, plan.kept
    area = tissue.area_mm2()
    if not kept or area <= 0:
        notes.append(f"{name}: no tissue found (tissue mask {options.tissue}); its counts are zero")
        kept, area = [], 0.0
    for note in notes:
        warnings.warn(note, stacklevel=3)
    found = detect_source(det, source, tiles=kept, on_tile=on_tile) if kept else pd.DataFrame({"x": [], "y": [], "score": []})
    x, y = found["x"].to_numpy(float), found["y"].to_numpy(float)
    inside = (x >= region[0]) & (x < region[2]) & (y >= region[1]) & (y < region[3]) & tissue.on_tissue(x * l0, y * l0)
    found = found[inside].reset_index(drop=True)
    found.insert(0, "image", name)
    if models.classifier is not None:
        found = classify_detections(found, {name: str(path)}, *models.classifier, image_mpp=options.mpp, slide_mpp=options.mpp)
    _write_figures(out_dir, found)
    with atomic_path(out_dir / "tissue.png") as tmp:
        Image.fromarray((tissue.mask * 255).astype(np.uint8)).save(tmp, format="PNG")

    xy_um = np.c_[found["x"].to_numpy(float) * l0 - region_um[0], found["y"].to_numpy(float) * l0 - region_um[1]]
    extent = (region_um[2] - region_um[0], region_um[3] - region_um[1])
    cells = tissue.cells(CELL_UM)
    spots = {w: hotspot(xy_um, extent_um=extent, area_mm2=a, cell_um=CELL_UM, tissue=cells) for w, a, _ in WINDOWS}
    row = _row(name, path, l0, coarser, area, found, spots, region, len(kept), len(grid))
    view, view_mpp, (vx, vy) = _view(source, region_um, l0)
    vh, vw = view.shape[:2]
    boxes = [Box(f"densest {a:g} mm² ({spots[w].count} figures)", _view_box(spots[w], region_um, view_mpp, (vx, vy)), colour)
             for w, a, colour in WINDOWS if spots[w].count > 0]
    points = np.c_[found["x"].to_numpy(float) * l0 / view_mpp - vx, found["y"].to_numpy(float) * l0 / view_mpp - vy]
    labels = found["label"].tolist() if "label" in found else ["mitosis"] * len(found)
    view_mask = tissue.grid((vx + np.arange(vw) + 0.5) * view_mpp, (vy + np.arange(vh) + 0.5) * view_mpp)
    write_slide_report(out_dir / "report.html", title=f"mitotype analyze: {name}", summary=_shown(row), thumbnail=view,
                       mask=view_mask, points=points, labels=labels, boxes=boxes,
                       gallery=_gallery(source, found, models, options), models=_model_rows(models), notes=notes,
                       heat_sigma_px=min(HEAT_UM / view_mpp, min(vh, vw) / 16))
    return row


def _region(roi: tuple[int, int, int, int] | None, dims: tuple[int, int], name: str) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in level-0 pixels: the ROI (checked to lie inside the slide) or the whole slide."""
    w, h = dims
    if roi is None:
        return 0, 0, w, h
    x, y, rw, rh = roi
    if x + rw > w or y + rh > h:
        raise MitotypeError(f"{name}: {{roi}} {x},{y},{rw},{rh} reaches past the slide's {w} x {h} level-0 pixels", options=("roi",))
    return x, y, x + rw, y + rh


def _write_figures(out_dir: Path, found: pd.DataFrame) -> None:
    from mitotype.data.point_formats import write_points

    write_csv(out_dir / "figures.csv", found.drop(columns=["image"]))
    write_points(found, out_dir / "figures.geojson", "geojson")


def _row(name: str, path: Path, l0: float, coarser: bool, area: float, found: pd.DataFrame, spots: dict[str, Hotspot],
         region: tuple[int, int, int, int], n_tiles: int, n_grid: int) -> dict[str, Any]:
    n = len(found)
    classified = "label" in found
    k = int((found["label"] == "atypical").sum()) if classified else None
    low, high = wilson_interval(k, n) if k is not None else (math.nan, math.nan)
    row: dict[str, Any] = {
        "slide": name, "path": str(path), "mpp": l0, "coarser_than_model": coarser, "tissue_mm2": round(area, 6), "mitotic_count": n,
        "atypical_count": k, "atypical_fraction": (k / n if n and k is not None else math.nan), "atypical_ci95_low": low,
        "atypical_ci95_high": high, "mitoses_per_mm2": n / area if area > 0 else 0.0,
    }
    for w, spot in spots.items():
        at = spot.count > 0  # a window with no figure has no place worth giving
        row.update({f"hotspot_{w}_count": spot.count, f"hotspot_{w}_area_mm2": round(spot.area_mm2, 6),
                    f"hotspot_{w}_x": round(region[0] + spot.x_um / l0) if at else None,
                    f"hotspot_{w}_y": round(region[1] + spot.y_um / l0) if at else None,
                    f"hotspot_{w}_width": round(spot.width_um / l0) if at else None,
                    f"hotspot_{w}_height": round(spot.height_um / l0) if at else None})
    row.update({"tiles": f"{n_tiles}/{n_grid}", "seconds": None, "warning": "", "error": ""})
    return row


def _view(source: Source, region_um: tuple[float, float, float, float], l0: float) -> tuple[np.ndarray, float, tuple[int, int]]:
    """The region as the report shows it: at most VIEW_SIDE pixels a side (never finer than level 0),
    its µm per pixel and its first pixel (in whole-image pixels of that resolution)."""
    mpp = max(l0, max(region_um[2] - region_um[0], region_um[3] - region_um[1]) / VIEW_SIDE)
    w, h = source.size_at(mpp)
    x0, y0 = min(w - 1, int(region_um[0] // mpp)), min(h - 1, int(region_um[1] // mpp))
    x1, y1 = max(x0 + 1, min(w, math.ceil(region_um[2] / mpp))), max(y0 + 1, min(h, math.ceil(region_um[3] / mpp)))
    return read_thumbnail(source, mpp, (x0, y0, x1, y1)), mpp, (x0, y0)


def _view_box(spot: Hotspot, region_um: tuple[float, ...], mpp: float, origin: tuple[int, int]) -> tuple[float, float, float, float]:
    x0 = (region_um[0] + spot.x_um) / mpp - origin[0]
    y0 = (region_um[1] + spot.y_um) / mpp - origin[1]
    return x0, y0, x0 + spot.width_um / mpp, y0 + spot.height_um / mpp


def _shown(row: dict[str, Any]) -> list[tuple[str, Any]]:
    def num(v: Any, fmt: str) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    rows = [("slide", row["slide"]), ("µm per pixel (level 0)", num(row["mpp"], ".4g") + (" (coarser than the models)" if
            row["coarser_than_model"] else "")), ("tissue area", f"{num(row['tissue_mm2'], '.3f')} mm²"),
            ("mitotic count", row["mitotic_count"]), ("mitoses per mm²", num(row["mitoses_per_mm2"], ".3f"))]
    if row["atypical_count"] is not None:
        rows += [("atypical count", row["atypical_count"]),
                 ("atypical fraction (95% Wilson interval)", f"{num(row['atypical_fraction'], '.3f')} "
                  f"[{num(row['atypical_ci95_low'], '.3f')}, {num(row['atypical_ci95_high'], '.3f')}]")]
    for w, a, _ in WINDOWS:
        where = "" if row[f"hotspot_{w}_x"] is None else f" at x {row[f'hotspot_{w}_x']}, y {row[f'hotspot_{w}_y']} (level-0 px)"
        rows.append((f"hotspot: densest {a:g} mm² window", f"{row[f'hotspot_{w}_count']} figures in "
                     f"{row[f'hotspot_{w}_area_mm2']:.3f} mm²{where}"))
    return rows + [("tiles read (of the grid)", row["tiles"])]


def _gallery(source: Source, found: pd.DataFrame, models: Models, options: AnalyzeOptions) -> list[tuple[np.ndarray, str]]:
    """The figures called atypical, most confident first, as the classifier saw them."""
    if models.classifier is None or options.gallery == 0 or found.empty:
        return []
    ensemble = models.classifier[0]
    shown = found[found["label"] == "atypical"].sort_values("p_atypical", ascending=False, kind="stable").head(options.gallery)
    mpp = model_mpp([ensemble.mpp])
    return [(source.crop(r.x, r.y, ensemble.patch_size, mpp), f"p_atypical {r.p_atypical:.3f} · x {r.x:.0f}, y {r.y:.0f}")
            for r in shown.itertuples()]


def _model_rows(models: Models) -> list[tuple[str, Any]]:
    det = models.detector
    rows: list[tuple[str, Any]] = [("detector", models.spec.detector), ("detector threshold", f"{det.threshold:.4g}"),
                                   ("detector µm/px", det.mpp), ("detector backend", det.scorer.name)]
    if models.classifier is not None:
        ens, scorer = models.classifier
        rows += [("classifier", models.spec.classifier), ("classifier threshold", f"{ens.threshold:.4g}"),
                 ("classifier µm/px", model_mpp([ens.mpp])), ("classifier backend", scorer.name)]
    return rows
