"""ROC curve and confusion-matrix figures, written atomically.

Agg is forced so plotting works on headless training machines; figures are always closed so a
long cross-validation run does not accumulate them.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, roc_auc_score, roc_curve

from mitotype import CLASS_NAMES
from mitotype._io import atomic_path
from mitotype.errors import MitotypeError
from mitotype.evaluation.metrics import check_inputs, check_labels


def _save(fig: plt.Figure, path: str | os.PathLike) -> None:
    """Save ``fig`` atomically in the format named by the suffix (png if none), then close it."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        if fmt not in fig.canvas.get_supported_filetypes():
            raise MitotypeError(f"{path}: unsupported image format '.{fmt}' (use .png, .pdf or .svg)")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150)
    finally:
        plt.close(fig)


def plot_roc(y_true: np.ndarray, p_atypical: np.ndarray, path: Path, title: str = "") -> None:
    """ROC curve for atypical-vs-normal with the AUC in the legend and the chance diagonal."""
    y, p = check_inputs(y_true, p_atypical)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if y.min() != y.max():
        fpr, tpr, _ = roc_curve(y, p, pos_label=1)
        ax.plot(fpr, tpr, lw=2, label=f"AUC = {roc_auc_score(y, p):.3f} (n = {len(y)})")
    else:  # a curve needs both classes; say so instead of drawing nothing silently
        ax.text(0.5, 0.6, f"ROC undefined:\nonly '{CLASS_NAMES[int(y[0])]}' present", ha="center", va="center")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("False positive rate (1 − specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(y_true: np.ndarray, y_pred: np.ndarray, path: Path, title: str = "") -> None:
    """2x2 confusion matrix with counts; rows are true classes, columns predicted (normal, atypical)."""
    y = check_labels(y_true, "y_true")
    yp = check_labels(y_pred, "y_pred")
    if len(y) != len(yp):
        raise MitotypeError(f"y_true has {len(y)} values but y_pred has {len(yp)}")
    cm = confusion_matrix(y, yp, labels=[0, 1])
    fig, ax = plt.subplots(figsize=(4.0, 3.6))
    ConfusionMatrixDisplay(cm, display_labels=list(CLASS_NAMES)).plot(
        ax=ax, cmap="Blues", values_format="d", colorbar=False
    )
    if title:
        ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def plot_metric_bars(names: list[str], metrics: dict[str, tuple[list, list]], path: Path, title: str = "") -> None:
    """Grouped bars, one group per name (recipe), one bar per metric, with ± sd error bars; undefined values are left out."""
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(names) * max(len(metrics), 1) + 1.5), 4.0))
    width = 0.8 / max(len(metrics), 1)
    x = np.arange(len(names))
    for i, (label, (means, sds)) in enumerate(metrics.items()):
        m = np.array([np.nan if v is None else v for v in means], dtype=float)
        s = np.array([np.nan if v is None else v for v in sds], dtype=float)
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, np.nan_to_num(m), width, yerr=np.where(np.isnan(s), 0, s),
                      capsize=3, label=label)
        ax.bar_label(bars, labels=["–" if np.isnan(v) else f"{v:.2f}" for v in m], fontsize=7, padding=2)
    ax.set_xticks(x, names, rotation=20 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
    ax.set_ylim(0, 1.18)  # room for the legend above the bars
    ax.axhline(0.5, ls="--", color="grey", lw=1)
    ax.legend(loc="upper center", ncol=max(len(metrics), 1), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
