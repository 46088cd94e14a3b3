"""Evaluation stage: metrics against hand-computed values, bootstrap, figures, metrics.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from mitotype.errors import MitotypeError
from mitotype.evaluation import (
    METRIC_NAMES,
    best_threshold,
    cross_fitted_thresholds,
    binary_metrics,
    bootstrap_intervals,
    evaluate_predictions,
    markdown_table,
    plot_confusion,
    plot_roc,
    summarize_folds,
    write_evaluation,
)
from mitotype.evaluation.metrics import _resampled_metrics, confusion_counts

# 4 atypical, 6 normal. At threshold 0.5: tp=3 (0.9, 0.8, 0.6), fn=1 (0.3),
# fp=2 (0.7, 0.55), tn=4 (0.1, 0.2, 0.4, 0.45).
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.55, 0.1, 0.2, 0.4, 0.45])


def _random(n: int = 300, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1).round(2)  # rounding creates ties
    return y, p


def test_binary_metrics_match_hand_computed_values():
    assert confusion_counts(Y, (P >= 0.5).astype(int)) == {"tn": 4, "fp": 2, "fn": 1, "tp": 3}
    m = binary_metrics(Y, P)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    # AUC = P(score_atypical > score_normal): pairs won out of 4 * 6
    won = sum(pa > pn for pa in P[Y == 1] for pn in P[Y == 0])
    assert m["roc_auc"] == pytest.approx(won / 24)
    assert (m["n"], m["n_atypical"], m["threshold"]) == (10, 4, 0.5)
    assert list(m)[: len(METRIC_NAMES)] == list(METRIC_NAMES)
    json.dumps(m)  # plain Python types


def test_atypical_is_the_positive_class():
    m = binary_metrics(Y, P)
    swapped = binary_metrics(1 - Y, 1 - P, threshold=0.5 + 1e-9)  # same decisions, classes swapped
    assert m["sensitivity"] == pytest.approx(swapped["specificity"])
    assert m["specificity"] == pytest.approx(swapped["sensitivity"])
    assert m["precision"] != pytest.approx(swapped["precision"])  # precision is about class 1 only
    assert m["n_atypical"] == 4 and swapped["n_atypical"] == 6
    # a model that scores atypicals high has AUC > 0.5, not < 0.5
    assert binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])["roc_auc"] == 1.0


def test_threshold_changes_decisions():
    low = binary_metrics(Y, P, threshold=0.0)  # everything atypical
    high = binary_metrics(Y, P, threshold=1.0)  # nothing atypical (no p == 1)
    assert (low["sensitivity"], low["specificity"]) == (1.0, 0.0)
    assert (high["sensitivity"], high["specificity"]) == (0.0, 1.0)
    assert high["precision"] == 0.0 and high["f1"] == 0.0  # zero_division=0
    assert low["roc_auc"] == high["roc_auc"]  # threshold-free
    assert binary_metrics(Y, P, threshold=0.6)["sensitivity"] == pytest.approx(3 / 4)  # p >= t
    assert binary_metrics(Y, P, threshold=0.61)["sensitivity"] == pytest.approx(2 / 4)


def test_one_class_gives_none_without_raising():
    m = binary_metrics([0, 0, 0], [0.2, 0.7, 0.1])
    assert m["roc_auc"] is None and m["average_precision"] is None
    assert m["sensitivity"] is None and m["specificity"] == pytest.approx(2 / 3)
    assert m["precision"] == 0.0
    ci = bootstrap_intervals([0, 0, 0], [0.2, 0.7, 0.1], n_boot=50)
    assert ci["roc_auc"] == [None, None] and ci["sensitivity"] == [None, None]
    assert best_threshold([1, 1], [0.3, 0.9]) == 0.5


def test_vectorised_bootstrap_metrics_agree_with_sklearn():
    y, p = _random()
    for t in (0.3, 0.5, 0.77):
        got = _resampled_metrics(y, p, t, np.arange(len(y))[None, :])
        want = binary_metrics(y, p, t)
        for name in METRIC_NAMES:
            assert got[name][0] == pytest.approx(want[name], abs=1e-12), name
    idx = np.random.default_rng(3).integers(0, len(y), size=(5, len(y)))
    got = _resampled_metrics(y, p, 0.5, idx)
    for i, row in enumerate(idx):
        assert got["roc_auc"][i] == pytest.approx(roc_auc_score(y[row], p[row]), abs=1e-12)
        assert got["average_precision"][i] == pytest.approx(average_precision_score(y[row], p[row]), abs=1e-12)


def test_bootstrap_contains_estimate_and_is_deterministic():
    y, p = _random()
    m = binary_metrics(y, p)
    ci = bootstrap_intervals(y, p, n_boot=300, seed=7)
    assert set(ci) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        lo, hi = ci[name]
        assert lo <= m[name] <= hi, name
        assert hi - lo > 0, name
    assert bootstrap_intervals(y, p, n_boot=300, seed=7) == ci
    assert bootstrap_intervals(y, p, n_boot=300, seed=8) != ci
    narrow = bootstrap_intervals(y, p, n_boot=300, seed=7, level=0.5)
    assert narrow["roc_auc"][1] - narrow["roc_auc"][0] < ci["roc_auc"][1] - ci["roc_auc"][0]


def test_best_threshold_separates_separable_data():
    y = np.array([0, 0, 0, 1, 1, 0, 1])
    p = np.array([0.1, 0.35, 0.4, 0.62, 0.7, 0.2, 0.95])
    t = best_threshold(y, p)
    assert 0.4 < t <= 0.62
    assert binary_metrics(y, p, t)["balanced_accuracy"] == 1.0
    y2, p2 = _random()
    t2 = best_threshold(y2, p2)
    assert binary_metrics(y2, p2, t2)["balanced_accuracy"] >= binary_metrics(y2, p2, 0.5)["balanced_accuracy"]


def test_cross_fitted_thresholds_come_from_the_other_folds_only():
    # fold 0 separates at 0.8, fold 1 at 0.3: each fold's threshold is the other fold's optimum
    y = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    p = np.array([0.6, 0.7, 0.85, 0.9, 0.1, 0.2, 0.35, 0.4])
    fold = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    t = cross_fitted_thresholds(y, p, fold)
    assert t == {0: best_threshold(y[4:], p[4:]), 1: best_threshold(y[:4], p[:4])}
    assert t[0] == 0.35 and t[1] == 0.85
    assert binary_metrics(y[:4], p[:4], t[0])["balanced_accuracy"] == 0.5  # honest: fold 0 is not scored at its own optimum
    with pytest.raises(MitotypeError, match="fold has 3 values for 8"):
        cross_fitted_thresholds(y, p, fold[:3])


def test_summarize_folds_mean_sd():
    folds = [
        {"roc_auc": 0.8, "accuracy": 0.7},
        {"roc_auc": 0.9, "accuracy": 0.9},
        {"roc_auc": None, "accuracy": 0.8},
    ]
    s = summarize_folds(folds)
    assert s["roc_auc"]["mean"] == pytest.approx(0.85)
    assert s["roc_auc"]["sd"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert s["roc_auc"]["values"] == [0.8, 0.9]
    assert s["accuracy"]["sd"] == pytest.approx(0.1)
    assert s["f1"] == {"mean": None, "sd": None, "values": []}
    assert summarize_folds([{"accuracy": 0.5}])["accuracy"] == {"mean": 0.5, "sd": 0.0, "values": [0.5]}
    with pytest.raises(MitotypeError):
        summarize_folds([])


def _frame(with_domain: bool) -> pd.DataFrame:
    y, p = _random(120)
    df = pd.DataFrame({"label": y, "p_atypical": p})
    if with_domain:
        df["domain"] = np.where(np.arange(len(df)) % 3 == 0, "scanner_b", "scanner_a")
        df.loc[5, "domain"] = None  # unknown domain: counts overall only
    return df


def assert_figure(path, size: tuple[int, int]) -> None:
    """The file decodes as a PNG of ``size`` (figsize x 150 dpi) with something drawn on it:
    a figure saved blank, or cut by a changed layout, would still have bytes."""
    with Image.open(path) as im:
        assert (im.format, im.size) == ("PNG", size)
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # lines, text and their anti-aliasing, not one colour
    assert (pixels != pixels[0]).any(axis=1).mean() > 0.02  # more than a speck differs from the background


@pytest.mark.parametrize("with_domain", [False, True])
def test_write_evaluation_files(tmp_path, with_domain):
    df = _frame(with_domain)
    out = tmp_path / "eval"
    m = write_evaluation(df, out, threshold=0.4, n_boot=50, title="test")
    assert sorted(f.name for f in out.iterdir()) == ["confusion.png", "metrics.json", "roc.png"]
    assert_figure(out / "roc.png", (675, 675))
    assert_figure(out / "confusion.png", (600, 540))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    assert saved["threshold"] == 0.4 and saved["n"] == len(df)
    assert set(saved["ci95"]) == set(METRIC_NAMES)
    assert ("per_domain" in saved) == with_domain
    if with_domain:
        assert sorted(saved["per_domain"]) == ["scanner_a", "scanner_b"]
        assert sum(d["n"] for d in saved["per_domain"].values()) == len(df) - 1
        assert "ci95" in saved["per_domain"]["scanner_a"]


def test_per_domain_needs_a_value_and_tolerates_one_class(tmp_path):
    df = _frame(False)
    df["domain"] = None
    assert "per_domain" not in evaluate_predictions(df, n_boot=20)
    df["domain"] = "all"
    df.loc[:2, "domain"] = "tiny"
    df.loc[:2, "label"] = 0
    m = evaluate_predictions(df, n_boot=20)
    assert m["per_domain"]["tiny"]["roc_auc"] is None
    assert m["per_domain"]["tiny"]["ci95"]["roc_auc"] == [None, None]


def test_plots_handle_one_class_and_formats(tmp_path):
    plot_roc([1, 1, 1], [0.2, 0.5, 0.9], tmp_path / "roc.png")
    plot_confusion([0, 1, 1], [0, 0, 1], tmp_path / "cm.svg", title="svg")
    assert_figure(tmp_path / "roc.png", (675, 675))  # the diagonal and the 'ROC undefined' note
    assert (tmp_path / "cm.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(MitotypeError, match="unsupported image format"):
        plot_roc(Y, P, tmp_path / "roc.xyz")
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_markdown_table():
    rows = [
        {"model": "resnet|18", "auc": (0.8123, 0.0311), "ba": {"mean": 0.7, "sd": 0.05, "values": []}, "n": 12},
        {"model": "vit", "auc": None, "ba": 0.75, "n": np.int64(3), "extra": 1},
        {"model": "x", "auc": float("nan"), "ba": np.float32(0.5)},
    ]
    table = markdown_table(rows, ["model", "auc", "ba", "n"])
    assert table.splitlines() == [
        "| model | auc | ba | n |",
        "|---|---|---|---|",
        "| resnet\\|18 | 0.812 ± 0.031 | 0.700 ± 0.050 | 12 |",
        "| vit | – | 0.750 | 3 |",
        "| x | – | 0.500 | – |",
    ]
    assert "0.81 ± 0.03" in markdown_table(rows[:1], ["auc"], float_fmt="{:.2f}")


@pytest.mark.parametrize(
    "y, p, match",
    [
        ([], [], "empty"),
        ([0, 2, 1], [0.1, 0.2, 0.3], r"only 0 \(normal\) and 1 \(atypical\); found \[2\]"),
        ([0, 1, 1], [0.1, float("nan"), 0.3], "NaN"),
        ([0, 1, 1], [0.1, 0.2], "3 values but p_atypical has 2"),
        ([0, 1], [0.1, 1.5], r"\[0, 1\]"),
        (["a", "b"], [0.1, 0.2], "0/1 labels"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_bad_inputs_raise_one_line_errors(y, p, match):
    for fn in (binary_metrics, bootstrap_intervals, best_threshold, lambda a, b: plot_roc(a, b, "unused.png")):
        with pytest.raises(MitotypeError, match=match) as exc:
            fn(y, p)
        assert "\n" not in str(exc.value)


def test_bad_frames_and_options_raise():
    with pytest.raises(MitotypeError, match="threshold"):
        binary_metrics(Y, P, threshold=float("nan"))
    with pytest.raises(MitotypeError, match="n_boot"):
        bootstrap_intervals(Y, P, n_boot=0)
    with pytest.raises(MitotypeError, match=r"lacks column\(s\) \['p_atypical'\]"):
        evaluate_predictions(pd.DataFrame({"label": [0, 1]}))
    with pytest.raises(MitotypeError, match="empty"):
        evaluate_predictions(pd.DataFrame({"label": [], "p_atypical": []}))
    with pytest.raises(MitotypeError, match="column 'p_atypical' has 1 missing"):
        evaluate_predictions(pd.DataFrame({"label": [0, 1], "p_atypical": [0.2, None]}))
    with pytest.raises(MitotypeError, match="column 'label' must contain only"):
        evaluate_predictions(pd.DataFrame({"label": [0, 3], "p_atypical": [0.2, 0.4]}))
    with pytest.raises(MitotypeError, match="y_pred"):
        plot_confusion([0, 1], [0, 5], "unused.png")
    assert math.isfinite(binary_metrics(Y, P, threshold=np.float64(0.3))["threshold"])


def test_bootstrap_interval_is_the_percentile_interval_at_the_asked_level():
    """Recompute the resamples by hand (same generator, same draws) and take the percentiles."""
    y, p = _random(200)
    for level in (0.95, 0.8):
        ci = bootstrap_intervals(y, p, threshold=0.5, n_boot=400, seed=11, level=level)
        idx = np.random.default_rng(11).integers(0, len(y), size=(400, len(y)))
        acc = ((p[idx] >= 0.5) == (y[idx] == 1)).mean(axis=1)
        sens = np.array([((p[r] >= 0.5) & (y[r] == 1)).sum() / (y[r] == 1).sum() for r in idx])
        tail = (1 - level) / 2
        assert ci["accuracy"] == pytest.approx(np.quantile(acc, [tail, 1 - tail]).tolist(), abs=1e-12), level
        assert ci["sensitivity"] == pytest.approx(np.quantile(sens, [tail, 1 - tail]).tolist(), abs=1e-12), level
        auc = [roc_auc_score(y[r], p[r]) for r in idx]
        assert ci["roc_auc"] == pytest.approx(np.quantile(auc, [tail, 1 - tail]).tolist(), abs=1e-12), level


def test_bootstrap_interval_covers_the_true_accuracy_at_its_level():
    """Simulated classifier right with probability 0.8: the 95% interval should hold 0.8 about 95%
    of the time, the 50% interval about half the time (a wrong level lands far from either)."""
    rng = np.random.default_rng(0)
    n, reps = 120, 300
    hits = {0.95: 0, 0.5: 0}
    for r in range(reps):
        y = rng.integers(0, 2, n)
        right = rng.random(n) < 0.8
        p = np.where(right == (y == 1), 0.9, 0.1)
        for level in hits:
            lo, hi = bootstrap_intervals(y, p, n_boot=200, seed=r, level=level)["accuracy"]
            hits[level] += lo <= 0.8 <= hi
    assert 0.93 <= hits[0.95] / reps <= 0.98, hits  # 0.963 here; a 90% interval gives 0.91, a 99% one 0.983
    assert 0.45 <= hits[0.5] / reps <= 0.65, hits  # 0.573 here


def _refused(call, *args, **kwargs) -> str:
    with pytest.raises(MitotypeError) as info:
        call(*args, **kwargs)
    return str(info.value)


def test_input_checks_say_exactly_what_is_wrong():
    from mitotype.evaluation.metrics import check_inputs, check_labels, check_probabilities, check_threshold

    assert check_labels([True, False]).dtype == np.int64 and check_labels([1.0, 0.0]).dtype == np.int64
    assert check_probabilities([1, 0]).dtype == np.float64
    assert binary_metrics([1], [0.7])["sensitivity"] == 1.0  # one patch is enough
    assert _refused(check_labels, []) == "y_true is empty: nothing to evaluate"
    assert _refused(check_labels, [0, 1, 7, 3, 4, 5, 6, 8, 2]) == (
        "y_true must contain only 0 (normal) and 1 (atypical); found [2, 3, 4, 5, 6] (first at index 2)")
    assert _refused(check_probabilities, []) == "p_atypical is empty: nothing to evaluate"
    assert _refused(check_probabilities, ["x"]) == "p_atypical must hold numbers (probabilities in [0, 1])"
    assert _refused(check_probabilities, [[0.1]]) == "p_atypical must be 1-D, got shape (1, 1)"
    assert _refused(check_probabilities, [0.1, 0.2, np.inf, np.nan]) == "p_atypical has 2 NaN/infinite value(s) (first at index 2)"
    assert _refused(check_probabilities, [0.1, 0.2, -0.5]) == "p_atypical must be probabilities in [0, 1]; index 2 is -0.5"
    assert _refused(check_inputs, [0, 1, 1], [0.1, 0.2]) == "y_true has 3 values but p_atypical has 2"
    assert _refused(check_inputs, [0, 1], [0.1, np.nan]) == "p_atypical has 1 NaN/infinite value(s) (first at index 1)"
    assert _refused(check_threshold, "abc") == "threshold must be a number in [0, 1], got 'abc'"
    assert _refused(check_threshold, 1.5) == "threshold must be in [0, 1], got 1.5"
    assert check_threshold(1) == 1.0 and check_threshold(0) == 0.0
    assert _refused(confusion_counts, [0, 1], [0, 1, 1]) == "y_true has 2 values but y_pred has 3"
    assert _refused(confusion_counts, [0, 5], [0, 1]).startswith("y_true must contain only")
    assert _refused(confusion_counts, [0, 1], [0, 5]).startswith("y_pred must contain only")
    assert confusion_counts([0, 0], [0, 0]) == {"tn": 2, "fp": 0, "fn": 0, "tp": 0}  # both classes counted, even absent
    assert confusion_counts([1, 1], [1, 0]) == {"tn": 0, "fp": 0, "fn": 1, "tp": 1}
    assert _refused(summarize_folds, []) == "no fold metrics to summarise"


def test_metrics_with_one_patch_of_a_class_or_none():
    only_atypical = binary_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert only_atypical["specificity"] is None and only_atypical["roc_auc"] is None and only_atypical["average_precision"] is None
    assert only_atypical["sensitivity"] == pytest.approx(2 / 3) and only_atypical["balanced_accuracy"] == pytest.approx(2 / 3)
    one_each = binary_metrics([1, 0], [0.7, 0.3])
    assert one_each["roc_auc"] == 1.0 and one_each["average_precision"] == 1.0 and one_each["specificity"] == 1.0
    one_normal = binary_metrics([1, 1, 0], [0.7, 0.2, 0.3])
    assert one_normal["roc_auc"] == 0.5 and one_normal["specificity"] == 1.0
    nothing = binary_metrics([0, 0], [0.1, 0.2])  # no atypical, none called: F1 and precision are 0 (zero_division=0)
    assert nothing["f1"] == 0.0 and nothing["precision"] == 0.0 and nothing["balanced_accuracy"] == 1.0


# Hand-picked resamples where the vectorised bootstrap must still agree with binary_metrics: no
# atypical, no normal, exactly one of either, one call that is right, one right and one wrong, ...
EDGE_Y = np.array([0, 0, 0, 1, 1, 1])
EDGE_P = np.array([0.1, 0.6, 0.2, 0.9, 0.3, 0.3])
EDGE_ROWS = [[0, 2, 0, 2], [3, 3, 5, 4], [3, 0, 2, 0], [0, 3, 4, 5], [3, 0, 0, 2], [3, 1, 0, 2], [1, 1, 1, 3],
             [4, 5, 0, 1], [1, 0, 0, 0], [4, 0, 2, 5], [3, 3, 3, 3], [0, 0, 0, 0], [1, 1, 1, 1], [4, 4, 1, 2]]


@pytest.mark.parametrize("row", EDGE_ROWS)
def test_vectorised_bootstrap_metrics_agree_with_sklearn_on_edge_resamples(row):
    got = _resampled_metrics(EDGE_Y, EDGE_P, 0.5, np.array([row]))
    want = binary_metrics(EDGE_Y[row], EDGE_P[row], 0.5)
    for name in METRIC_NAMES:
        if want[name] is None:
            assert np.isnan(got[name][0]), name
        else:
            assert got[name][0] == pytest.approx(want[name], abs=1e-12), name


def test_bootstrap_defaults_and_option_checks():
    y, p = _random(60)
    assert bootstrap_intervals(y, p) == bootstrap_intervals(y, p, threshold=0.5, n_boot=1000, seed=0, level=0.95)
    one = bootstrap_intervals(y, p, n_boot=1)
    assert all(lo == hi for lo, hi in one.values())  # one resample: a point, not an error
    assert _refused(bootstrap_intervals, y, p, n_boot=0) == "n_boot must be at least 1, got 0"
    for level in (0, 1, 1.5, -0.2):
        assert _refused(bootstrap_intervals, y, p, level=level) == f"level must be in (0, 1), got {level}"


def test_bootstrap_in_chunks_draws_exactly_n_boot_resamples():
    """Large sets are resampled in chunks (memory); the draws must be the same n_boot resamples."""
    rng = np.random.default_rng(5)
    n = 40_001  # chunk = 4_000_000 // n = 99 resamples: 250 come as 99 + 99 + 52
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    ci = bootstrap_intervals(y, p, n_boot=250, seed=3, level=0.9)
    draws = np.random.default_rng(3)
    acc = np.concatenate([((p[i] >= 0.5) == (y[i] == 1)).mean(axis=1) for i in (draws.integers(0, n, size=(m, n)) for m in (99, 99, 52))])
    assert ci["accuracy"] == pytest.approx(np.quantile(acc, [0.05, 0.95]).tolist(), abs=1e-12)
