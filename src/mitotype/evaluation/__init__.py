"""Evaluation stage: metrics with bootstrap CIs, ROC / confusion figures, metrics.json, tables.

Names are re-exported lazily: importing ``mitotype.evaluation.metrics`` (as training does) must not
load matplotlib, which only the plots and reports need.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "METRIC_NAMES": "metrics", "best_threshold": "metrics", "binary_metrics": "metrics", "bootstrap_intervals": "metrics",
    "cross_fitted_thresholds": "metrics", "summarize_folds": "metrics", "plot_confusion": "plots", "plot_roc": "plots",
    "evaluate_predictions": "report", "markdown_table": "report", "write_evaluation": "report",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'mitotype.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mitotype.evaluation.{_HOMES[name]}"), name)
