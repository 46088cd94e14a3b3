"""Training crops for a heat-map detector: square windows of point-annotated images, with their points.

Where :func:`mitotype.data.candidates.write_candidate_set` cuts a patch per candidate for a
classifier, a dense detector learns from whole windows: every pixel is a negative unless a figure's
centre is near it. :func:`write_crop_set` cuts, from each image, ``per_figure`` windows around each
figure (placed at random so the figure can sit anywhere but the outermost eighth) and ``background``
windows anywhere (the tissue with no figure that makes most of a slide), and writes the manifest
``crops.csv``: ``path, label`` (1 when the window holds a figure: what ``train.sampler=balanced``
balances), ``group, image, x0, y0`` and ``points``, the JSON list of the window's figure centres in
its own pixels, which the loop turns into targets (:mod:`mitotype.training.dense`). Every figure of
an image must be annotated: an unannotated one would be learnt as background.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mitotype._io import check_output_dir, write_csv, write_json
from mitotype.data.points import PointTable
from mitotype.errors import MitotypeError

SET_NAME = "crops.csv"


def crop_origins(size_wh: tuple[int, int], figures: np.ndarray, *, crop: int, per_figure: int, background: int,
                 rng: np.random.Generator) -> np.ndarray:
    """(M, 2) top-left corners of the windows of one image (``figures``: (F, 2) x, y in pixels)."""
    w, h = size_wh
    keep = crop // 8  # a figure is never in the outer eighth of its own window: it is seen whole
    out = []
    for x, y in np.repeat(figures, per_figure, axis=0):
        lo = np.maximum(0, np.floor([x, y]).astype(int) - crop + 1 + keep)
        hi = np.minimum([w - crop, h - crop], np.floor([x, y]).astype(int) - keep)
        out.append(rng.integers(lo, np.maximum(lo, hi) + 1))
    for _ in range(background):
        out.append(rng.integers(0, [w - crop + 1, h - crop + 1]))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


def write_crop_set(points: PointTable, out: Path, *, crop: int = 256, per_figure: int = 1, background: int = 2,
                   seed: int = 0) -> pd.DataFrame:
    """Windows of ``crop`` px of every image of ``points`` into ``out/crops/`` and their manifest
    ``out/crops.csv`` (see the module's note); counts in ``out/summary.json``. Look-alikes a
    pathologist marked (a ``mitotic`` column of 0) are not figures and never become points."""
    out = check_output_dir(Path(out), "out_folder")  # a file there is one line naming OUT
    if out.is_dir() and any(out.iterdir()):
        raise MitotypeError(f"{out}: the output folder is not empty; choose a new one")
    if not isinstance(crop, int) or not 32 <= crop <= 4096 or crop % 32:
        raise MitotypeError(f"{{size}} {crop}: expected a multiple of 32 in 32..4096 (the network's coarsest stride)", options=("size",))
    for name, value in (("per_figure", per_figure), ("background", background)):
        if not isinstance(value, int) or not 0 <= value <= 1000:
            raise MitotypeError(f"{{{name}}} {value}: expected a whole number in 0..1000", options=(name,))
    table = points.table
    rng = np.random.default_rng(seed)
    figures = table[table["mitotic"].to_numpy() != 0] if "mitotic" in table.columns else table
    group_col = next((c for c in ("slide", "group") if c in table.columns), None)
    (out / "crops").mkdir(parents=True)
    rows = []
    for name, path in points.images:
        mine = figures[figures["image_path"] == path]
        xy = mine[["x", "y"]].to_numpy(np.float64)
        rgb = np.asarray(Image.open(path).convert("RGB"))
        h, w = rgb.shape[:2]
        if min(h, w) < crop:
            raise MitotypeError(f"{path}: {w}x{h} px is smaller than a {crop} px crop; use a smaller {{size}}", options=("size",))
        group = str(mine[group_col].mode().iloc[0]) if group_col and len(mine) else name
        for k, (x0, y0) in enumerate(crop_origins((w, h), xy, crop=crop, per_figure=per_figure, background=background, rng=rng)):
            inside = (xy[:, 0] >= x0) & (xy[:, 0] < x0 + crop) & (xy[:, 1] >= y0) & (xy[:, 1] < y0 + crop)
            local = (xy[inside] - [x0, y0]).round(2).tolist()
            file = out / "crops" / f"{Path(name).stem}_{k:03d}.png"
            Image.fromarray(rgb[y0:y0 + crop, x0:x0 + crop]).save(file)
            rows.append({"path": str(file.relative_to(out)), "label": int(bool(local)), "group": group, "image": name,
                         "x0": int(x0), "y0": int(y0), "points": json.dumps(local)})
    manifest = pd.DataFrame(rows, columns=["path", "label", "group", "image", "x0", "y0", "points"])
    if manifest.empty or not (manifest["label"] == 1).any():
        raise MitotypeError(f"{out}: no crop holds a figure; check the points (and that the images are the annotated ones)")
    write_csv(out / SET_NAME, manifest)
    write_json(out / "summary.json", {"images": len(points.images), "figures": len(figures), "crops": len(manifest),
                                      "with_figures": int(manifest["label"].sum()), "crop": crop, "per_figure": per_figure,
                                      "background": background, "seed": seed})
    return manifest
