"""Detection metrics as the MIDOG challenges define them: a detection is a point, matched to the
truth one-to-one within 7.5 µm; F1 = 2 TP / (2 TP + FP + FN), pooled over images.

Matching is greedy by descending score: each detection, best first, takes the nearest true figure
of its image that is still unmatched and lies within the radius; a detection that finds none is a
false positive, a true figure left unmatched a false negative. Pure functions of tables, so the
detector's evaluation command, the benchmarks and the tests share them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from mitotype.errors import MitotypeError

MATCH_RADIUS_UM = 7.5  # MIDOG 2021/2022: 30 px at 0.25 µm/px


@dataclass(frozen=True)
class Counts:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp + self.fp + self.fn else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision, "recall": self.recall, "f1": self.f1}


def check_point_table(table: pd.DataFrame, name: str, columns: tuple[str, ...]) -> None:
    """``columns`` present and every one after the first (the image) a finite number, else one line
    naming ``name``, the row (as a CSV's line number) and the value."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise MitotypeError(f"{name}: column(s) {', '.join(missing)} missing (expected {', '.join(columns)})")
    for c in columns[1:]:
        bad = ~np.isfinite(pd.to_numeric(table[c], errors="coerce").to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            value = table[c].iloc[row]
            shown = repr(value) if isinstance(value, str) else str(value)  # 'x' for text, nan / inf for numbers
            raise MitotypeError(f"{name} row {row + 2}: {c} {shown} is not a finite number")


def match_image(det_xy: np.ndarray, scores: np.ndarray, true_xy: np.ndarray, radius_px: float) -> np.ndarray:
    """For one image: the index of the true figure each detection matched, or -1 (greedy, best score first)."""
    matched = np.full(len(det_xy), -1)
    if not len(det_xy) or not len(true_xy):
        return matched
    tree, taken = cKDTree(true_xy), np.zeros(len(true_xy), bool)
    for i in np.argsort(-scores, kind="stable"):
        near = tree.query_ball_point(det_xy[i], radius_px)
        free = [j for j in near if not taken[j]]
        if free:
            j = min(free, key=lambda k: float(np.hypot(*(true_xy[k] - det_xy[i]))))
            taken[j], matched[i] = True, j
    return matched


def match_detections(detections: pd.DataFrame, truth: pd.DataFrame, *, radius_px: float) -> pd.DataFrame:
    """``detections`` (image, x, y, score) with a ``match`` column: the matched truth row, or -1."""
    check_point_table(detections, "detections", ("image", "x", "y", "score"))
    check_point_table(truth, "truth", ("image", "x", "y"))
    if not (np.isfinite(radius_px) and radius_px > 0):
        raise MitotypeError(f"radius {radius_px} px: must be a positive number")
    out = detections.reset_index(drop=True).assign(match=-1)
    truth = truth.reset_index(drop=True)
    for image, rows in out.groupby("image", sort=False).indices.items():
        true_rows = np.flatnonzero(truth["image"].to_numpy() == image)
        local = match_image(out.loc[rows, ["x", "y"]].to_numpy(float), out.loc[rows, "score"].to_numpy(float),
                            truth.loc[true_rows, ["x", "y"]].to_numpy(float), radius_px)
        out.loc[rows, "match"] = np.where(local >= 0, true_rows[np.maximum(local, 0)], -1)
    return out


def detection_counts(detections: pd.DataFrame, truth: pd.DataFrame, *, radius_px: float, threshold: float = 0.0) -> dict:
    """Pooled and per-image TP / FP / FN, precision, recall and F1 of the detections scoring at
    least ``threshold`` (matching is redone at that threshold, as a detector run there would)."""
    kept = detections[pd.to_numeric(detections["score"]) >= threshold] if len(detections) else detections
    matched = match_detections(kept, truth, radius_px=radius_px)
    images = list(dict.fromkeys([*truth["image"].tolist(), *detections["image"].tolist()]))
    per_image = {}
    for image in images:
        mine = matched[matched["image"] == image]
        tp = int((mine["match"] >= 0).sum())
        per_image[str(image)] = Counts(tp, len(mine) - tp, int((truth["image"] == image).sum()) - tp)
    pooled = Counts(*(sum(getattr(c, k) for c in per_image.values()) for k in ("tp", "fp", "fn")))
    return {"threshold": threshold, "pooled": pooled.as_dict(), "per_image": {k: v.as_dict() for k, v in per_image.items()}}


def best_f1_threshold(detections: pd.DataFrame, truth: pd.DataFrame, *, radius_px: float) -> tuple[float, dict]:
    """The score threshold that maximises pooled F1 (ties: the lowest), and the counts there.

    One matching pass serves every threshold: matching is greedy by descending score within each
    image, so the detections kept at a threshold are a prefix of that order and match exactly as
    they do in the full pass; true positives are then a running sum down the sorted scores."""
    if not len(detections):
        return 0.0, detection_counts(detections, truth, radius_px=radius_px, threshold=0.0)
    matched = match_detections(detections, truth, radius_px=radius_px)
    scores = pd.to_numeric(matched["score"]).to_numpy(float)
    order = np.argsort(-scores, kind="stable")
    ranked = scores[order]
    tp = np.cumsum(matched["match"].to_numpy()[order] >= 0)
    ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # the last detection of each distinct score
    denominator = (ends + 1) + len(truth)  # 2TP + FP + FN = detections kept + true figures
    f1 = np.where(denominator > 0, 2 * tp[ends] / np.maximum(denominator, 1), np.nan)
    if not np.isfinite(f1).any():
        return float(ranked[-1]), detection_counts(detections, truth, radius_px=radius_px, threshold=float(ranked[-1]))
    top = np.nanmax(f1)
    pick = ends[np.flatnonzero(f1 == top)[-1]]  # the lowest threshold among the best
    t = float(ranked[pick])
    return t, detection_counts(detections, truth, radius_px=radius_px, threshold=t)
