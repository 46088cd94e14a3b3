"""The AMi-Br benchmark's cross-dataset protocol: 5 grouped folds on the training set; each test
set scored by every fold model and by their ensemble; one Markdown table like the paper's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mitotype._io import write_json, write_text
from mitotype.evaluation.metrics import binary_metrics, summarize_folds
from mitotype.evaluation.report import markdown_table

TABLE_METRICS = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity", "precision", "f1")


def score_test_set(name: str, y: np.ndarray, p_per_fold: list[np.ndarray], thresholds: list[float]) -> dict:
    """Per-fold metrics, their mean ± sd, and the ensemble (mean probability, mean threshold)."""
    per_fold = [binary_metrics(y, p, t) for p, t in zip(p_per_fold, thresholds)]
    ensemble = binary_metrics(y, np.mean(p_per_fold, axis=0), float(np.mean(thresholds)))
    return {"name": name, "n": int(len(y)), "n_atypical": int((y == 1).sum()), "per_fold": per_fold,
            "folds": summarize_folds(per_fold), "ensemble": ensemble}


def benchmark_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        rows.append({"test set": r["name"], "model": "folds (mean ± sd)", "n": r["n"], **{m: r["folds"][m] for m in TABLE_METRICS}})
        rows.append({"test set": r["name"], "model": "ensemble", "n": r["n"], **{m: r["ensemble"][m] for m in TABLE_METRICS}})
    return markdown_table(rows, ["test set", "model", "n", *TABLE_METRICS])


def write_benchmark(out: Path, recipe: str, results: list[dict], cv_summary: dict) -> str:
    table = benchmark_table(results)
    text = f"# Benchmark: {recipe}\n\nTraining set: {cv_summary['n']} patches ({cv_summary['n_atypical']} atypical), " \
           f"{cv_summary['folds']} folds grouped by slide (seed {cv_summary['split_seed']}).\n\n{table}\n"
    write_text(out / "benchmark.md", text)
    write_json(out / "benchmark.json", {"recipe": recipe, "cv": cv_summary, "test_sets": results})
    return text
