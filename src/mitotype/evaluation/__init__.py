"""Evaluation stage: metrics with bootstrap CIs, ROC / confusion figures, metrics.json, tables."""

from mitotype.evaluation.metrics import (
    METRIC_NAMES,
    best_threshold,
    binary_metrics,
    bootstrap_intervals,
    cross_fitted_thresholds,
    summarize_folds,
)
from mitotype.evaluation.plots import plot_confusion, plot_roc
from mitotype.evaluation.report import evaluate_predictions, markdown_table, write_evaluation

__all__ = [
    "METRIC_NAMES",
    "best_threshold",
    "binary_metrics",
    "bootstrap_intervals",
    "cross_fitted_thresholds",
    "evaluate_predictions",
    "markdown_table",
    "plot_confusion",
    "plot_roc",
    "summarize_folds",
    "write_evaluation",
]
