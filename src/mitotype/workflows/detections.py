"""Evaluate point detections against true figures, as the MIDOG challenges do, and draw overlays.

Detections are a CSV ``image, x, y, score`` in level-0 pixels (what a detector writes); the truth is
any point format :func:`mitotype.data.points.read_points` understands (CSV, MitDet folder, MIDOG /
COCO JSON). Points match one-to-one within 7.5 µm (``radius_um / mpp`` pixels), greedy by score
(:mod:`mitotype.evaluation.detection`). Written atomically to ``out_dir``: ``metrics.json`` (pooled
counts at ``threshold`` and at the F1-maximising threshold), ``per_image.csv``, ``matched.csv``
(each detection and the truth row it matched) and ``overlays/IMAGE.png`` for plain images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageDraw

from mitotype._io import atomic_path, check_output_dir, write_csv, write_json
from mitotype.data.manifest import read_csv_checked
from mitotype.data.points import read_points
from mitotype.data.slides import is_slide
from mitotype.errors import MitotypeError
from mitotype.evaluation.detection import MATCH_RADIUS_UM, best_f1_threshold, check_point_table, detection_counts, match_detections

OVERLAY_MAX_SIDE = 2048  # px: larger images are drawn downscaled
COLOURS = {"tp": (40, 110, 255), "fp": (230, 30, 30), "fn": (255, 200, 0)}


def read_detections(path: Path) -> pd.DataFrame:
    """``image, x, y, score`` (other columns kept); each value checked, the row named when bad."""
    table = read_csv_checked(Path(path))
    check_point_table(table, str(path), ("image", "x", "y", "score"))
    table[["x", "y", "score"]] = table[["x", "y", "score"]].astype(float)
    table["image"] = table["image"].astype(str).map(lambda name: Path(name).name)
    return table


def evaluate_detections(
    detections: Path, truth: Path, out_dir: Path, *, images: Path | None = None, mpp: float = 0.25, radius_um: float = MATCH_RADIUS_UM,
    threshold: float = 0.0, overlays: bool = True,
) -> dict[str, Any]:
    """Match, count and write the evaluation (see the module docstring); returns ``metrics.json``'s content."""
    for name, value in (("mpp", mpp), ("radius_um", radius_um)):
        if not (math.isfinite(value) and value > 0):
            raise MitotypeError(f"{{{name}}} {value}: must be a positive number", options=(name,))
    check_output_dir(out_dir, "out_dir")
    det = read_detections(detections)
    points = read_points(truth, images)
    true = points.table.assign(image=points.table["image"].astype(str).map(lambda name: Path(name).name))
    unknown = sorted(set(det["image"]) - set(true["image"]) - {Path(name).name for name, _ in points.images})
    if unknown:
        raise MitotypeError(f"{detections}: image {unknown[0]!r} is not among the truth's images ({truth})")
    radius_px = radius_um / mpp
    at = detection_counts(det, true, radius_px=radius_px, threshold=threshold)
    best_t, best = best_f1_threshold(det, true, radius_px=radius_px)
    metrics = {"n_images": len(points.images), "n_true": int(len(true)), "n_detections": int(len(det)), "mpp": mpp, "radius_um": radius_um,
               "radius_px": radius_px, "at_threshold": {"threshold": threshold, **at["pooled"]},
               "best_f1": {"threshold": best_t, **best["pooled"]}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    matched = match_detections(det[det["score"] >= threshold], true, radius_px=radius_px)
    write_csv(out_dir / "matched.csv", matched)
    write_csv(out_dir / "per_image.csv", pd.DataFrame([{"image": k, **v} for k, v in at["per_image"].items()]))
    if overlays:
        _overlays(matched, true, dict(points.images), out_dir / "overlays", radius_px)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _overlays(matched: pd.DataFrame, truth: pd.DataFrame, paths: dict[str, str], folder: Path, radius_px: float) -> None:
    """One PNG per plain image: true positives blue, false positives red, missed figures yellow."""
    hit = set(matched.loc[matched["match"] >= 0, "match"].astype(int))
    for name, path in paths.items():
        if is_slide(path):
            continue  # a whole slide is too large to draw whole
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        scale = min(1.0, OVERLAY_MAX_SIDE / max(rgb.size))
        if scale < 1:
            rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)))
        draw, r = ImageDraw.Draw(rgb), max(3.0, radius_px * scale)
        image = Path(name).name
        marks = [(row.x, row.y, "tp" if row.match >= 0 else "fp") for row in matched[matched["image"] == image].itertuples()]
        marks += [(row.x, row.y, "fn") for i, row in truth[truth["image"] == image].iterrows() if i not in hit]
        for x, y, kind in marks:
            draw.ellipse([x * scale - r, y * scale - r, x * scale + r, y * scale + r], outline=COLOURS[kind], width=2)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"{Path(image).stem}.png") as tmp:
            rgb.save(tmp, format="PNG")
