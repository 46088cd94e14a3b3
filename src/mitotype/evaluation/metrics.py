"""Binary metrics for atypical (1, positive) vs normal (0) mitotic figures.

Point estimates come from scikit-learn. The bootstrap recomputes the same metrics on 1000
resamples at once with numpy (calling sklearn 2000 times takes seconds per dataset); the tests
check that the vectorised versions agree with sklearn on the full data.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from mitotype.errors import MitotypeError

METRIC_NAMES = (
    "balanced_accuracy",
    "roc_auc",
    "average_precision",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "accuracy",
)


# ---------------------------------------------------------------------------------------------
# input checks: every public function goes through these, so errors read the same everywhere


def check_labels(y: Any, name: str = "y_true") -> np.ndarray:
    """Return ``y`` as a 1-D int array of 0/1, or raise MitotypeError naming what is wrong."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise MitotypeError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise MitotypeError(f"{name} is empty: nothing to evaluate")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        raise MitotypeError(f"{name} must hold 0/1 labels, got values of type {arr.dtype}")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        found = np.unique(arr[bad])[:5].tolist()
        raise MitotypeError(
            f"{name} must contain only 0 (normal) and 1 (atypical); found {found} "
            f"(first at index {int(np.argmax(bad))})"
        )
    return arr.astype(np.int64)


def check_probabilities(p: Any, name: str = "p_atypical") -> np.ndarray:
    """Return ``p`` as a 1-D float array in [0, 1], or raise MitotypeError."""
    try:
        arr = np.asarray(p, dtype=np.float64)
    except (TypeError, ValueError):
        raise MitotypeError(f"{name} must hold numbers (probabilities in [0, 1])") from None
    if arr.ndim != 1:
        raise MitotypeError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise MitotypeError(f"{name} is empty: nothing to evaluate")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise MitotypeError(
            f"{name} has {int(bad.sum())} NaN/infinite value(s) (first at index {int(np.argmax(bad))})"
        )
    bad = (arr < 0) | (arr > 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise MitotypeError(f"{name} must be probabilities in [0, 1]; index {i} is {arr[i]:g}")
    return arr


def check_inputs(
    y_true: Any, p_atypical: Any, y_name: str = "y_true", p_name: str = "p_atypical"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (labels, probabilities) pair, including that their lengths match."""
    y = check_labels(y_true, y_name)
    p = check_probabilities(p_atypical, p_name)
    if len(y) != len(p):
        raise MitotypeError(f"{y_name} has {len(y)} values but {p_name} has {len(p)}")
    return y, p


def check_threshold(threshold: Any) -> float:
    """A decision threshold is a finite number in [0, 1]."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise MitotypeError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not 0.0 <= t <= 1.0:  # also rejects NaN
        raise MitotypeError(f"threshold must be in [0, 1], got {threshold!r}")
    return t


# ---------------------------------------------------------------------------------------------
# point estimates


def binary_metrics(y_true: np.ndarray, p_atypical: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """All METRIC_NAMES plus n, n_atypical and threshold; a patch is called atypical iff p >= threshold.

    Undefined metrics are None rather than an exception, because a small fold or one scanner's
    subset may hold a single class: roc_auc / average_precision need both classes, sensitivity
    needs an atypical, specificity needs a normal. Precision and F1 with no positive prediction
    are 0.0 (sklearn's zero_division=0).
    """
    y, p = check_inputs(y_true, p_atypical)
    threshold = check_threshold(threshold)
    y_pred = (p >= threshold).astype(np.int64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    both = n_pos > 0 and n_neg > 0

    with warnings.catch_warnings():
        # one-class input: sklearn warns that y_pred has a class y_true lacks; we report it as is
        warnings.simplefilter("ignore", UserWarning)
        bal_acc = balanced_accuracy_score(y, y_pred)

    out: dict[str, Any] = {
        "balanced_accuracy": float(bal_acc),
        "roc_auc": float(roc_auc_score(y, p)) if both else None,
        "average_precision": float(average_precision_score(y, p, pos_label=1)) if both else None,
        "sensitivity": float(recall_score(y, y_pred, pos_label=1)) if n_pos else None,
        "specificity": float(recall_score(y, y_pred, pos_label=0)) if n_neg else None,
        "precision": float(precision_score(y, y_pred, pos_label=1, zero_division=0)),
        "f1": float(f1_score(y, y_pred, pos_label=1, zero_division=0)),
        "accuracy": float(accuracy_score(y, y_pred)),
        "n": int(len(y)),
        "n_atypical": n_pos,
        "threshold": threshold,
    }
    return out


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, int]:
    """tn/fp/fn/tp with atypical as positive; handy for reports and for checking metrics by hand."""
    y = check_labels(y_true, "y_true")
    yp = check_labels(y_pred, "y_pred")
    if len(y) != len(yp):
        raise MitotypeError(f"y_true has {len(y)} values but y_pred has {len(yp)}")
    tn, fp, fn, tp = confusion_matrix(y, yp, labels=[0, 1]).ravel()
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}


def best_threshold(y_true: np.ndarray, p_atypical: np.ndarray) -> float:
    """Threshold maximising balanced accuracy (= Youden's J = TPR - FPR) on the ROC curve.

    Pick it on validation / out-of-fold predictions, never on the test set. The returned value is
    one of the scores, so ``p >= threshold`` reproduces that ROC point exactly; ties go to the
    highest threshold. Returns 0.5 when only one class is present (no curve to optimise).
    """
    y, p = check_inputs(y_true, p_atypical)
    if y.min() == y.max():
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p, pos_label=1, drop_intermediate=False)
    # thresholds[0] is +inf (nothing predicted atypical): never a useful operating point
    k = 1 + int(np.argmax((tpr - fpr)[1:]))
    return float(thresholds[k])


# ---------------------------------------------------------------------------------------------
# bootstrap


def _resampled_metrics(y: np.ndarray, p: np.ndarray, threshold: float, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every METRIC_NAME for each row of resample indices ``idx`` (B, n); NaN where undefined.

    Mirrors binary_metrics (sklearn definitions, zero_division=0) so the bootstrap and the point
    estimate measure the same thing; tests check that on the identity resample.
    """
    yb = y[idx]
    pb = p[idx]
    n = idx.shape[1]
    pos = yb.sum(axis=1).astype(np.float64)
    neg = n - pos
    pred = pb >= threshold
    tp = (pred & (yb == 1)).sum(axis=1).astype(np.float64)
    fp = (pred & (yb == 0)).sum(axis=1).astype(np.float64)
    fn = pos - tp
    tn = neg - fp

    with np.errstate(divide="ignore", invalid="ignore"):
        sens = np.where(pos > 0, tp / pos, np.nan)
        spec = np.where(neg > 0, tn / neg, np.nan)
        prec = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        # sklearn's balanced accuracy averages recall over the classes present in y_true
        bal = np.where(pos > 0, np.where(neg > 0, (sens + spec) / 2, sens), spec)

        # ranking metrics: sort each resample by score, walk the distinct thresholds
        order = np.argsort(-pb, axis=1, kind="stable")
        ys = np.take_along_axis(yb, order, axis=1)
        ps = np.take_along_axis(pb, order, axis=1)
        ctp = np.cumsum(ys, axis=1, dtype=np.float64)
        cfp = np.cumsum(1 - ys, axis=1, dtype=np.float64)
        last = np.ones(ps.shape, dtype=bool)  # last element of each group of tied scores
        last[:, :-1] = ps[:, :-1] != ps[:, 1:]
        prev_tp = _previous_at(last, ctp)
        prev_fp = _previous_at(last, cfp)
        # trapezoid area under ROC, and AP = sum_k (R_k - R_{k-1}) * P_k as in sklearn
        auc = np.sum(last * (cfp - prev_fp) * (ctp + prev_tp), axis=1) / (2 * pos * neg)
        ap = np.sum(last * (ctp - prev_tp) * (ctp / (ctp + cfp)), axis=1) / pos
    one_class = (pos == 0) | (neg == 0)
    auc[one_class] = np.nan
    ap[one_class] = np.nan

    return {
        "balanced_accuracy": bal,
        "roc_auc": auc,
        "average_precision": ap,
        "sensitivity": sens,
        "specificity": spec,
        "precision": prec,
        "f1": f1,
        "accuracy": (tp + tn) / n,
    }


def _previous_at(mask: np.ndarray, cum: np.ndarray) -> np.ndarray:
    """For each position, the value of non-decreasing ``cum`` at the previous True of ``mask`` (else 0)."""
    at = np.maximum.accumulate(np.where(mask, cum, 0.0), axis=1)
    prev = np.zeros_like(cum)
    prev[:, 1:] = at[:, :-1]
    return prev


def bootstrap_intervals(
    y_true: np.ndarray,
    p_atypical: np.ndarray,
    threshold: float = 0.5,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float | None]]:
    """Percentile bootstrap interval [lo, hi] for every METRIC_NAME, resampling patches.

    Resamples where a metric is undefined (one class, for AUC-type metrics; no atypical, for
    sensitivity) are skipped for that metric; [None, None] if no resample defines it.
    Deterministic for a given seed.
    """
    y, p = check_inputs(y_true, p_atypical)
    threshold = check_threshold(threshold)
    if int(n_boot) < 1:
        raise MitotypeError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < float(level) < 1.0:
        raise MitotypeError(f"level must be in (0, 1), got {level}")
    n_boot = int(n_boot)
    n = len(y)
    rng = np.random.default_rng(seed)

    chunk = max(1, 4_000_000 // n)  # bound memory at a few hundred MB for large test sets
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        parts.append(_resampled_metrics(y, p, threshold, idx))

    alpha = (1.0 - float(level)) / 2
    out: dict[str, list[float | None]] = {}
    for name in METRIC_NAMES:
        values = np.concatenate([part[name] for part in parts])
        values = values[~np.isnan(values)]
        if values.size == 0:
            out[name] = [None, None]
        else:
            lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
            out[name] = [float(lo), float(hi)]
    return out


# ---------------------------------------------------------------------------------------------
# cross-validation


CROSS_FITTED_RULE = "best balanced accuracy on the other folds' out-of-fold predictions"


def cross_fitted_thresholds(y_true: np.ndarray, p_atypical: np.ndarray, fold: np.ndarray) -> dict[int, float]:
    """For each fold, the ``best_threshold`` of the out-of-fold predictions of the *other* folds.

    Scoring a fold at a threshold chosen on the other folds measures honestly what choosing the
    threshold on out-of-fold predictions is worth on unseen slides; the threshold picked on all of
    them (``out_of_fold_best_threshold``) is optimistic, since it has seen the rows it is scored on.
    """
    y, p = check_inputs(y_true, p_atypical)
    fold = np.asarray(fold)
    if fold.shape != y.shape:
        raise MitotypeError(f"fold has {fold.size} values for {y.size} predictions")
    return {int(k): best_threshold(y[fold != k], p[fold != k]) for k in np.unique(fold)}


def cross_fitted_metrics(y_true: np.ndarray, p_atypical: np.ndarray, fold: np.ndarray) -> dict[int, tuple[float, dict[str, Any]]]:
    """{fold: (threshold from the other folds, that fold's metrics at it)}: what cv, the bundle and the
    results log report as "threshold from the other folds"."""
    y, p, fold = np.asarray(y_true), np.asarray(p_atypical), np.asarray(fold)
    return {k: (t, binary_metrics(y[fold == k], p[fold == k], t)) for k, t in cross_fitted_thresholds(y, p, fold).items()}


def summarize_folds(fold_metrics: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{metric: {"mean", "sd", "values"}} across folds, so CV results read as mean ± sd.

    sd uses ddof=1 (sample sd over folds), 0.0 for a single value. None/NaN values (e.g. AUC
    of a one-class fold) are left out; mean and sd are None if no fold defines the metric.
    """
    if len(fold_metrics) == 0:
        raise MitotypeError("no fold metrics to summarise")
    out: dict[str, dict[str, Any]] = {}
    for name in METRIC_NAMES:
        values = [float(m[name]) for m in fold_metrics if m.get(name) is not None]
        values = [v for v in values if not math.isnan(v)]
        if not values:
            out[name] = {"mean": None, "sd": None, "values": []}
            continue
        arr = np.asarray(values)
        sd = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
        out[name] = {"mean": float(arr.mean()), "sd": sd, "values": values}
    return out
