"""Layout-only baselines on mosaics: how well can points be placed knowing only how the mosaics are made?

A mosaic (:mod:`mitotype.data.mosaic`) pastes figures into quilted figure-free tissue. If a method that
never looks at a mitotic figure found the pasted figures (the disc edges, the tile grid, the border rule,
the density), a detector could score on the mosaics without detecting mitoses. Each baseline here knows
the recipe, not the figures:

(a) ``grid``: a square grid of points at the true figure density, inside the 48 px border;
(b) ``paste_ring_gradient`` / ``paste_ring_colour``: paste finders: a ring-shaped matched filter at the
    disc-edge radii (29-43 px) on the gradient magnitude, and one on the jump of local colour statistics
    (mean and spread inside vs outside the ring), peaks kept 90 px apart (the figures' spacing);
(c) ``tile_centres`` / ``tile_junctions``: the background tiles' centres and seam corners, where quilting
    leaves its traces (from the builder's own layout);
(d) ``random``: uniform random points at the true density, inside the border.

The paste finders flatten the darkest 20% of each channel first (``figure_blind``): a ring filter peaking
next to a dark figure (the match radius is 30 px) would otherwise find figures, not pastes.
Reference, not layout-only: ``dark_blobs``, the darkest blobs (a figure detector of one line), to show the
figures are findable at all, and the two ring filters on the unflattened image (``*_seeing_figures``).

Each is scored with :mod:`mitotype.evaluation.detection` (one-to-one matching within 7.5 µm = 30 px;
pooled precision, recall and F1 at the F1-maximising score threshold) and false positives per mm² of
figure-free tissue. The goal: every layout-only baseline F1 < 0.3.

    .venv/bin/python benchmarks/mosaic_baselines.py --patches ../shared/data/ami-br-train --fold 0 --folds 5 --seed 1 \\
        --out benchmarks/results/mosaic-baselines

Mosaics go to ``--mosaics`` (default ``runs/mosaic-baselines/fold<F>-seed<S>``, never committed);
``summary.json`` (atomic) to ``--out``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage, signal

from mitotype._io import write_json
from mitotype.config import load_config
from mitotype.data.mosaic import BORDER, CUT_RADII, DISC_FEATHER, MIN_DISTANCE, Mosaic, select_fold, write_mosaics
from mitotype.data.readers import read_dataset
from mitotype.evaluation.detection import MATCH_RADIUS_UM, best_f1_threshold
from _timing import cpu_line  # benchmarks/ is on the path when run as a script

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ("dark_blobs", "ring_gradient_seeing_figures", "ring_colour_seeing_figures")  # they look at the figures: not layout-only
LEVELS = 256  # scores are replaced by their rank level (monotone) so the threshold search stays short


def grid_points(size: int, n: float) -> np.ndarray:
    """A square grid of about ``n`` points over the area inside the border."""
    side = size - 2 * BORDER
    step = side / max(1.0, np.sqrt(n))
    ticks = np.arange(BORDER + step / 2, size - BORDER, step)
    return np.array([(x, y) for y in ticks for x in ticks], dtype=float)


def random_points(size: int, n: float, rng: np.random.Generator) -> np.ndarray:
    k = int(rng.poisson(n))
    return rng.uniform(BORDER, size - BORDER, size=(k, 2))


def _ring(radius: float, width: float) -> np.ndarray:
    r = int(np.ceil(radius + width + 1))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    d = np.hypot(xx, yy)
    k = ((d >= radius - width / 2) & (d <= radius + width / 2)).astype(float)
    return k / k.sum()


def _peaks(response: np.ndarray, size: int, distance: int = MIN_DISTANCE // 2, top: int = 60) -> np.ndarray:
    """(x, y, score) of local maxima at least ``distance`` px apart, inside the border, best ``top`` first."""
    local = response == ndimage.maximum_filter(response, size=2 * distance + 1, mode="nearest")
    inside = np.zeros_like(local)
    inside[BORDER:size - BORDER, BORDER:size - BORDER] = True
    ys, xs = np.nonzero(local & inside)
    order = np.argsort(-response[ys, xs])[:top]
    return np.column_stack([xs[order], ys[order], response[ys, xs][order]])


def figure_blind(image: np.ndarray, percentile: float = 20) -> np.ndarray:
    """The image with every channel raised to its ``percentile``: the dark figures (and the darkest
    nuclei) flattened, so a paste finder sees the tissue around them, not the figures."""
    img = image.astype(float)
    return np.maximum(img, np.percentile(img, percentile, axis=(0, 1)))


def ring_gradient(image: np.ndarray, blind: bool = True) -> np.ndarray:
    """Gradient magnitude on a ring at the disc-edge radii against rings just inside and outside it: the
    strongest over radii 29-43 px (where the pasted disc meets the background), figures flattened
    unless not ``blind``."""
    grey = ndimage.gaussian_filter((figure_blind(image) if blind else image.astype(float)).mean(axis=2), 1.0)
    grad = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1))
    best = None
    for radius in range(CUT_RADII[0], CUT_RADII[1] + DISC_FEATHER + 1, 2):
        on = signal.fftconvolve(grad, _ring(radius, 3), mode="same")
        off = 0.5 * (signal.fftconvolve(grad, _ring(radius - 6, 3), mode="same") + signal.fftconvolve(grad, _ring(radius + 6, 3), mode="same"))
        best = on - off if best is None else np.maximum(best, on - off)
    assert best is not None
    return best


def ring_colour(image: np.ndarray, blind: bool = True) -> np.ndarray:
    """Jump of local colour statistics across a circle: |mean inside - mean outside| + |sd inside - sd
    outside| over an 8 px band on each side, strongest over the disc-edge radii, figures flattened
    unless not ``blind``."""
    img = figure_blind(image) if blind else image.astype(float)
    best = None
    for radius in range(CUT_RADII[0], CUT_RADII[1] + DISC_FEATHER + 1, 3):
        k_in, k_out = _ring(radius - 4, 8), _ring(radius + 4, 8)
        jump = np.zeros(img.shape[:2])
        for c in range(3):
            x, x2 = img[..., c], img[..., c] ** 2
            m_in, m_out = signal.fftconvolve(x, k_in, mode="same"), signal.fftconvolve(x, k_out, mode="same")
            s_in = np.sqrt(np.maximum(signal.fftconvolve(x2, k_in, mode="same") - m_in ** 2, 0))
            s_out = np.sqrt(np.maximum(signal.fftconvolve(x2, k_out, mode="same") - m_out ** 2, 0))
            jump += np.abs(m_in - m_out) + np.abs(s_in - s_out)
        best = jump if best is None else np.maximum(best, jump)
    assert best is not None
    return best


def dark_blobs(image: np.ndarray) -> np.ndarray:
    """Reference (it looks at figures): darkness smoothed at a figure's scale."""
    return -ndimage.gaussian_filter(image.astype(float).min(axis=2), 6.0)


def rank_levels(scores: np.ndarray) -> np.ndarray:
    if not len(scores):
        return scores
    ranks = pd.Series(scores).rank(method="average", pct=True).to_numpy()
    return np.ceil(ranks * LEVELS) / LEVELS


def score(name: str, detections: pd.DataFrame, truth: pd.DataFrame, free_mm2: float, radius_px: float) -> dict:
    det = detections.assign(score=rank_levels(detections["score"].to_numpy(float)))
    threshold, got = best_f1_threshold(det, truth, radius_px=radius_px)
    pooled = got["pooled"]
    return {"baseline": name, "n_detections": int(len(det)), "n_kept": int((det["score"] >= threshold).sum()), "rank_threshold": threshold,
            **{k: pooled[k] for k in ("tp", "fp", "fn", "precision", "recall", "f1")},
            "fp_per_mm2_figure_free": pooled["fp"] / free_mm2}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=Path, required=True)
    ap.add_argument("--fold", type=int, default=None, help="held-out fold of --folds (default: all patches)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--figures", type=int, default=8)
    ap.add_argument("--mosaics", type=Path, default=None, help="where the mosaics go (default runs/mosaic-baselines/fold<F>-seed<S>)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    manifest = read_dataset(args.patches).manifest
    selection: dict = {"patches": str(args.patches)}
    if args.fold is not None:
        cfg = load_config("lite0-crop64-192")
        manifest = select_fold(manifest, folds=args.folds, fold=args.fold, split_seed=cfg.data.split_seed, stratify=cfg.data.stratify)
        selection.update(folds=args.folds, fold=args.fold, split_seed=cfg.data.split_seed, stratify=list(cfg.data.stratify))
    mosaics_dir = args.mosaics or ROOT / "runs" / "mosaic-baselines" / f"fold{args.fold if args.fold is not None else 'all'}-seed{args.seed}"
    layouts: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def keep_layout(m: Mosaic) -> None:
        layouts[m.info["image"]] = (m.tiles, m.junctions)

    built = time.perf_counter()
    summary = write_mosaics(manifest, mosaics_dir, n_images=args.images, size=args.size, figures_per_image=args.figures, seed=args.seed,
                            overwrite=True, selection=selection, on_mosaic=keep_layout)
    build_seconds = time.perf_counter() - built
    truth = pd.read_csv(mosaics_dir / "truth.csv")
    size, mpp = summary["size"], summary["mpp"]
    radius_px = MATCH_RADIUS_UM / mpp
    n_per_image = summary["n_figures"] / summary["n_images"]
    rng = np.random.default_rng(args.seed)
    rows: dict[str, list] = {k: [] for k in ("grid", "paste_ring_gradient", "paste_ring_colour", "tile_centres", "tile_junctions", "random",
                                              *REFERENCE)}
    for entry in summary["per_image"]:
        name = entry["image"]
        image = np.asarray(Image.open(mosaics_dir / name).convert("RGB"))
        for x, y in grid_points(size, n_per_image):
            rows["grid"].append((name, x, y, 1.0))
        for x, y in random_points(size, n_per_image, rng):
            rows["random"].append((name, x, y, 1.0))
        tiles, junctions = layouts[name]
        rows["tile_centres"] += [(name, x, y, 1.0) for x, y in tiles]
        rows["tile_junctions"] += [(name, x, y, 1.0) for x, y in junctions]
        for key, response in (("paste_ring_gradient", ring_gradient(image)), ("paste_ring_colour", ring_colour(image)),
                              ("dark_blobs", dark_blobs(image)), ("ring_gradient_seeing_figures", ring_gradient(image, blind=False)),
                              ("ring_colour_seeing_figures", ring_colour(image, blind=False))):
            rows[key] += [(name, x, y, s) for x, y, s in _peaks(response, size)]
    free = summary["figure_free_area_mm2"]
    results = [score(k, pd.DataFrame(v, columns=["image", "x", "y", "score"]), truth, free, radius_px) for k, v in rows.items()]
    layout_only = [r for r in results if r["baseline"] not in REFERENCE]
    report = {
        "command": " ".join(["python", "benchmarks/mosaic_baselines.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
        "cpu": cpu_line(), "seed": args.seed, "mosaics": {k: summary[k] for k in ("n_images", "n_figures", "n_atypical", "n_normal", "n_slides",
                                                                                    "size", "mpp", "area_mm2", "figure_free_area_mm2", "selection",
                                                                                    "version")},
        "match_radius_px": radius_px, "threshold": "each baseline at its F1-maximising score threshold (scores as rank levels)",
        "reference_not_layout_only": list(REFERENCE), "baselines": results, "max_layout_only_f1": max(r["f1"] for r in layout_only),
        "all_layout_only_below_0.3": bool(all(r["f1"] < 0.3 for r in layout_only)),
        "build_seconds": round(build_seconds, 1), "wall_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(args.out / "summary.json", report)
    for r in results:
        print(f"{r['baseline']:22s} P {r['precision']:.3f} R {r['recall']:.3f} F1 {r['f1']:.3f}  FP/mm² {r['fp_per_mm2_figure_free']:.1f}")
    return report


if __name__ == "__main__":
    main()
