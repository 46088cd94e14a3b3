"""MIDOG-style point matching: one-to-one within the radius, greedy by descending score, nearest
unmatched truth; F1 pooled over images; the F1-maximising threshold."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from mitotype.errors import MitotypeError
from mitotype.evaluation.detection import best_f1_threshold, detection_counts, match_detections


def _det(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["image", "x", "y", "score"])


def _truth(*rows: tuple) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["image", "x", "y"])


def test_a_truth_is_matched_once_by_the_best_scoring_detection_within_the_radius() -> None:
    truth = _truth(("a", 100, 100))
    det = _det(("a", 105, 100, 0.6), ("a", 101, 100, 0.9), ("a", 140, 100, 0.99))  # 40 px away: outside 30
    got = match_detections(det, truth, radius_px=30)
    assert got["match"].tolist() == [-1, 0, -1]  # the nearer one would lose to the higher score
    counts = detection_counts(det, truth, radius_px=30)["pooled"]
    assert (counts["tp"], counts["fp"], counts["fn"]) == (1, 2, 0)
    assert counts["f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 0))


def test_a_detection_takes_the_nearest_unmatched_truth_and_images_never_mix() -> None:
    truth = _truth(("a", 0, 0), ("a", 20, 0), ("b", 10, 0))
    det = _det(("a", 12, 0, 0.9), ("a", 1, 0, 0.8))  # first takes (20, 0) (8 px) over (0, 0) (12 px)
    assert match_detections(det, truth, radius_px=30)["match"].tolist() == [1, 0]
    got = detection_counts(det, truth, radius_px=30)
    assert got["per_image"]["a"]["tp"] == 2 and got["per_image"]["b"] == {"tp": 0, "fp": 0, "fn": 1, "precision": got["per_image"]["b"]["precision"],
                                                                            "recall": 0.0, "f1": 0.0}
    assert math.isnan(got["per_image"]["b"]["precision"])
    assert got["pooled"]["recall"] == pytest.approx(2 / 3) and got["pooled"]["precision"] == 1.0


def test_the_radius_is_inclusive_and_the_threshold_redoes_the_matching() -> None:
    truth = _truth(("a", 0, 0))
    assert detection_counts(_det(("a", 30, 0, 0.5)), truth, radius_px=30)["pooled"]["tp"] == 1
    assert detection_counts(_det(("a", 30.01, 0, 0.5)), truth, radius_px=30)["pooled"]["tp"] == 0
    det = _det(("a", 2, 0, 0.9), ("a", 3, 0, 0.4), ("a", 300, 0, 0.3))
    t, at = best_f1_threshold(det, truth, radius_px=30)
    assert t == 0.9 and at["pooled"] == {"tp": 1, "fp": 0, "fn": 0, "precision": 1.0, "recall": 1.0, "f1": 1.0}
    two = _truth(("a", 0, 0), ("a", 500, 0))  # F1 2/3 at 0.9 (1 TP) and again at 0.6 (2 TP, 2 FP): the lower wins
    det = _det(("a", 0, 0, 0.9), ("a", 900, 0, 0.8), ("a", 1300, 0, 0.7), ("a", 500, 0, 0.6))
    t, at = best_f1_threshold(det, two, radius_px=30)
    assert t == 0.6 and at["pooled"]["f1"] == pytest.approx(2 / 3) and at["pooled"]["tp"] == 2


def test_bad_tables_are_one_line_errors() -> None:
    with pytest.raises(MitotypeError, match="^detections: column\\(s\\) score missing"):
        match_detections(_truth(("a", 0, 0)), _truth(("a", 0, 0)), radius_px=30)
    with pytest.raises(MitotypeError, match="^truth row 3: y 'x' is not a finite number"):
        match_detections(_det(("a", 0, 0, 1.0)), _truth(("a", 0, 0), ("a", 1, "x")), radius_px=30)
    with pytest.raises(MitotypeError, match="radius 0 px"):
        match_detections(_det(("a", 0, 0, 1.0)), _truth(("a", 0, 0)), radius_px=0)
