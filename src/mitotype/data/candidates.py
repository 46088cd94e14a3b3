"""Candidates for a detector: where in an image a mitotic figure could be, and training sets built there.

A mitotic figure is a dark, compact haematoxylin blob, so the candidate finder separates the stains
(colour deconvolution, Ruifrok & Johnston's H&E-DAB vectors as scikit-image gives them), smooths
the haematoxylin optical density and keeps its local maxima above a floor. It is cheap (about 10 ms
per 0.1 mm² here) and permissive: the classifier behind it decides. :func:`write_candidate_set`
turns point-annotated images (any reader in :mod:`mitotype.data.points`, or the mosaics of
:mod:`mitotype.data.mosaic`) into a manifest of patches centred on candidates, labelled mitosis
(1: within ``radius_um`` of a true figure) or look-alike (0), that ``train`` / ``cv`` read like any
other dataset: one training loop for the classifier and the detector.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from skimage.feature import peak_local_max

from mitotype._io import check_output_dir, write_csv, write_json
from mitotype.config import CandidateConfig
from mitotype.data.points import PointTable
from mitotype.errors import MitotypeError

# Ruifrok & Johnston's haematoxylin stain vector (as skimage.color.rgb2hed uses), the row of the
# inverse of the stain matrix that gives the haematoxylin density from the optical densities.
_H_FROM_OD = np.linalg.inv(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
                           / np.linalg.norm([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], axis=1, keepdims=True))[:, 0]
_OD_TABLE = (-np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0))[:, None].astype(np.float32)  # per 8-bit value
CANDIDATE_COLUMNS = ("x", "y", "od")
SET_NAME = "candidates.csv"


def hematoxylin_density(rgb: np.ndarray) -> np.ndarray:
    """(H, W) float32 haematoxylin optical density of an 8-bit RGB image (0 = no stain)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise MitotypeError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype} {rgb.shape}")
    weighted = _OD_TABLE * _H_FROM_OD.astype(np.float32)  # (256, 3): each channel's value's share of the density
    return np.maximum(weighted[rgb[..., 0], 0] + weighted[rgb[..., 1], 1] + weighted[rgb[..., 2], 2], 0.0)


def grid_step(cfg: CandidateConfig, mpp: float) -> int:
    """Pixels between the density's samples (``cfg.grid_um``; 1: every pixel). A figure is 5-10 um
    across and the smoothing 0.75 um, so a 0.5 um grid finds the same blobs for a quarter of the work."""
    return max(1, int(round(cfg.grid_um / mpp))) if cfg.grid_um > 0 else 1


def smoothed_density(rgb: np.ndarray, *, mpp: float, cfg: CandidateConfig) -> np.ndarray:
    """The haematoxylin density the candidates are the peaks of (Gaussian, ``cfg.sigma_um``), on the
    grid of :func:`grid_step` pixels: sample (i, j) is the mean colour of the step x step block whose
    first pixel is (i * step, j * step) (averaged, not picked: JPEG-tiled slides are noisy per pixel)."""
    step = grid_step(cfg, mpp)
    if step > 1:  # Pillow's box reduction (C): the whole blocks' means
        h, w = rgb.shape[0] // step * step, rgb.shape[1] // step * step
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[:h, :w])).reduce(step))
    density = hematoxylin_density(rgb)
    return ndimage.gaussian_filter(density, cfg.sigma_um / (mpp * step), mode="reflect") if cfg.sigma_um > 0 else density


def find_candidates(rgb: np.ndarray, *, mpp: float, cfg: CandidateConfig, density: np.ndarray | None = None) -> pd.DataFrame:
    """``x, y, od``: the haematoxylin peaks of ``rgb`` (pixels at ``mpp`` um/px), darkest first;
    ``density`` (:func:`smoothed_density`'s) when already computed."""
    step = grid_step(cfg, mpp)
    density = smoothed_density(rgb, mpp=mpp, cfg=cfg) if density is None else density
    distance = max(1, int(round(cfg.min_distance_um / (mpp * step))))
    peaks = peak_local_max(density, min_distance=distance, threshold_abs=cfg.min_od, exclude_border=False)
    od = density[peaks[:, 0], peaks[:, 1]] if len(peaks) else np.empty(0, np.float32)
    order = np.argsort(-od, kind="stable")
    xy = peaks[order].astype(np.float64) * step + (step - 1) / 2  # a block's centre
    return pd.DataFrame({"x": xy[:, 1], "y": xy[:, 0], "od": od[order].astype(np.float64)})


def blob_centres(density: np.ndarray, xs: np.ndarray, ys: np.ndarray, *, fraction: float, window: int) -> np.ndarray:
    """(N, 2) centre of each peak's blob: the density-weighted centroid of the connected pixels
    around the peak at (x, y) whose smoothed density reaches ``fraction`` of the peak's, within
    ``window`` px. A peak sits on the darkest chromatin, a median 7.6 px from the annotated centre on
    the mosaics; the blob's centre is 2.7 px from it, which the chained classifier's 64 px view needs."""
    h, w = density.shape
    out = np.column_stack([xs, ys]).astype(np.float64)
    for k, (x, y) in enumerate(zip(np.round(xs).astype(int), np.round(ys).astype(int))):
        x0, y0, x1, y1 = max(0, x - window), max(0, y - window), min(w, x + window + 1), min(h, y + window + 1)
        box = density[y0:y1, x0:x1]
        labels, _ = ndimage.label(box >= fraction * density[y, x])
        rows, cols = np.nonzero(labels == labels[y - y0, x - x0])
        weight = box[rows, cols]
        if weight.sum() > 0:
            out[k] = (x0 + (cols * weight).sum() / weight.sum(), y0 + (rows * weight).sum() / weight.sum())
    return out


def padded_crop(image: np.ndarray, x: float, y: float, size: int) -> np.ndarray:
    """(size, size, 3) centred on pixel (x, y); outside the image mirrored, as a detector's tiles are."""
    half = size // 2
    x0, y0 = int(round(x)) - half, int(round(y)) - half
    h, w = image.shape[:2]
    pad = max(0, -x0, -y0, x0 + size - w, y0 + size - h)
    if pad:
        image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect" if pad < min(h, w) else "edge")
        x0, y0 = x0 + pad, y0 + pad
    return image[y0:y0 + size, x0:x0 + size]


def crop_all(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, size: int) -> np.ndarray:
    """(N, size, size, 3): :func:`padded_crop` at each (x, y), with the image mirrored once for all."""
    if len(xs) == 0:
        return np.empty((0, size, size, 3), np.uint8)
    half = size // 2
    h, w = image.shape[:2]
    x0, y0 = np.round(xs).astype(np.int64) - half, np.round(ys).astype(np.int64) - half
    if x0.min() >= 0 and y0.min() >= 0 and x0.max() + size <= w and y0.max() + size <= h:  # a tile read with its margin
        return np.stack([image[b:b + size, a:a + size] for a, b in zip(x0, y0)])
    pad = half + size
    big = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect" if pad < min(h, w) else "edge")
    return np.stack([big[b:b + size, a:a + size] for a, b in zip(x0 + pad, y0 + pad)])


def label_candidates(candidates: pd.DataFrame, truth_xy: np.ndarray, radius_px: float) -> np.ndarray:
    """1 for the candidate nearest each true figure within ``radius_px`` (one per figure, matched
    greedily by distance), 0 for candidates farther than ``radius_px`` from every figure, -1 for the
    rest (a second peak on the same figure: neither a mitosis to find again nor a look-alike)."""
    labels = np.zeros(len(candidates), dtype=np.int64)
    if len(candidates) == 0 or len(truth_xy) == 0:
        return labels
    xy = candidates[["x", "y"]].to_numpy()
    d = np.hypot(xy[:, None, 0] - truth_xy[None, :, 0], xy[:, None, 1] - truth_xy[None, :, 1])
    labels[(d <= radius_px).any(axis=1)] = -1
    pairs = sorted((d[i, j], i, j) for i, j in zip(*np.nonzero(d <= radius_px)))
    used_c, used_t = set(), set()
    for _, i, j in pairs:
        if i not in used_c and j not in used_t:
            labels[i] = 1
            used_c.add(i)
            used_t.add(j)
    return labels


def write_candidate_set(points: PointTable, out: Path, *, cfg: CandidateConfig, mpp: float, patch_size: int = 128,
                        seed: int = 0) -> pd.DataFrame:
    """Patches of ``patch_size`` px centred on each image's candidates, labelled against its points
    (every figure must be annotated: an unannotated figure would be learnt as a look-alike), into
    ``out/patches/`` with the manifest ``out/candidates.csv`` (path, label, group, image, x, y, od,
    figure_found). Look-alikes are subsampled to ``cfg.negatives_per_figure`` per figure, half the
    darkest (the hard ones) and half at random; look-alikes a pathologist marked (a ``mitotic`` column
    of 0, e.g. MIDOG's hard negatives read with ``negatives=True``) are always kept, at the candidate
    nearest each. Figures no candidate reached are counted in ``out/summary.json`` (the finder's
    recall), not added: the detector could not find them either."""
    out = check_output_dir(Path(out), "out_folder")  # a file there is one line naming OUT
    if out.is_dir() and any(out.iterdir()):
        raise MitotypeError(f"{out}: the output folder is not empty; choose a new one")
    table = points.table
    rng = np.random.default_rng(seed)
    radius = cfg.radius_um / mpp
    rows, found, n_truth = [], 0, 0
    (out / "patches").mkdir(parents=True)
    group_col = next((c for c in ("slide", "group") if c in table.columns), None)
    marked = table["mitotic"].to_numpy() == 0 if "mitotic" in table.columns else np.zeros(len(table), dtype=bool)
    for name, path in points.images:
        here = (table["image_path"] == path).to_numpy()
        truth, lookalikes = table[here & ~marked], table[here & marked]
        rgb = np.asarray(Image.open(path).convert("RGB"))
        cands = find_candidates(rgb, mpp=mpp, cfg=cfg)
        cands["label"] = label_candidates(cands, truth[["x", "y"]].to_numpy(np.float64), radius)
        cands["marked"] = (label_candidates(cands, lookalikes[["x", "y"]].to_numpy(np.float64), radius) == 1) & (cands["label"] == 0)
        n_truth += len(truth)
        found += int((cands["label"] == 1).sum())
        pos, neg = cands[cands["label"] == 1], cands[(cands["label"] == 0) & ~cands["marked"]]
        keep = min(len(neg), cfg.negatives_per_figure * max(1, len(truth)))
        hard = neg.iloc[: keep // 2]  # darkest first
        rest = neg.iloc[keep // 2:]
        easy = rest.iloc[rng.choice(len(rest), size=keep - len(hard), replace=False)] if keep > len(hard) else rest.iloc[:0]
        hard = pd.concat([cands[cands["marked"]], hard])
        group = str(truth[group_col].mode().iloc[0]) if group_col and len(truth) else name
        for kind, part in (("mitosis", pos), ("lookalike", pd.concat([hard, easy]))):
            patches = crop_all(rgb, part["x"].to_numpy(), part["y"].to_numpy(), patch_size)  # the image mirrored once
            for (x, y, od), patch in zip(part[["x", "y", "od"]].itertuples(index=False), patches):
                file = out / "patches" / f"{Path(name).stem}_{int(x)}_{int(y)}.png"
                Image.fromarray(patch).save(file)
                rows.append({"path": str(file.relative_to(out)), "label": int(kind == "mitosis"), "group": group,
                             "image": name, "x": x, "y": y, "od": od})
    manifest = pd.DataFrame(rows, columns=["path", "label", "group", "image", "x", "y", "od"])
    if manifest.empty or not (manifest["label"] == 1).any():
        raise MitotypeError(f"{out}: no candidate lies within {cfg.radius_um} um of a true figure; check the points and {{mpp}}",
                            options=("mpp",))
    write_csv(out / SET_NAME, manifest)
    write_json(out / "summary.json", {"images": len(points.images), "figures": n_truth, "figures_with_a_candidate": found,
                                      "candidate_recall": found / max(1, n_truth), "patches": len(manifest),
                                      "mitosis": int(manifest["label"].sum()), "lookalike": int((manifest["label"] == 0).sum()),
                                      "mpp": mpp, "patch_size": patch_size, "candidates": vars(cfg), "seed": seed})
    return manifest


__all__ = ["CANDIDATE_COLUMNS", "find_candidates", "hematoxylin_density", "label_candidates", "padded_crop",
           "write_candidate_set"]
