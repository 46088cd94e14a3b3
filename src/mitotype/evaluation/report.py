"""Turn a predictions table into metrics.json + figures, and metric rows into Markdown tables."""

from __future__ import annotations

import math
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mitotype._io import write_json
from mitotype.errors import MitotypeError
from mitotype.evaluation.metrics import binary_metrics, bootstrap_intervals, check_inputs, check_threshold
from mitotype.evaluation.plots import plot_confusion, plot_roc

REQUIRED_COLUMNS = ("label", "p_atypical")


def _checked_arrays(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities from ``df``, with errors that name the column and row."""
    if not isinstance(df, pd.DataFrame):
        raise MitotypeError(f"predictions must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise MitotypeError(f"predictions table lacks column(s) {missing}; has {list(df.columns)}")
    if len(df) == 0:
        raise MitotypeError("predictions table is empty: nothing to evaluate")
    for col in REQUIRED_COLUMNS:
        na = df[col].isna()
        if na.any():
            raise MitotypeError(
                f"column '{col}' has {int(na.sum())} missing value(s) (first at row {na.idxmax()!r})"
            )
    return check_inputs(
        df["label"].to_numpy(), df["p_atypical"].to_numpy(), "column 'label'", "column 'p_atypical'"
    )


def evaluate_predictions(df: pd.DataFrame, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0) -> dict:
    """The metrics.json structure: binary_metrics, their "ci95", and "per_domain" when known.

    Per-domain results (scanner / tumour type) show whether the model transfers; they appear only
    when a 'domain' column has at least one value, and rows without a domain count only overall.
    """
    y, p = _checked_arrays(df)
    threshold = check_threshold(threshold)
    out: dict[str, Any] = binary_metrics(y, p, threshold)
    out["ci95"] = bootstrap_intervals(y, p, threshold, n_boot=n_boot, seed=seed)
    known = (df["domain"].notna() & (df["domain"].astype(str) != "")).to_numpy() if "domain" in df.columns else None
    if known is not None and known.any():  # the manifest spells an unknown domain ""
        per_domain: dict[str, Any] = {}
        names = np.array([str(d) for d in df["domain"]], dtype=object)
        for name in sorted(set(names[known])):
            mask = known & (names == name)
            entry: dict[str, Any] = binary_metrics(y[mask], p[mask], threshold)
            entry["ci95"] = bootstrap_intervals(y[mask], p[mask], threshold, n_boot=n_boot, seed=seed)
            per_domain[name] = entry
        out["per_domain"] = per_domain
    return out


def write_evaluation(
    df: pd.DataFrame,
    out_dir: Path,
    *,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    title: str = "",
) -> dict:
    """Write out_dir/roc.png, confusion.png and metrics.json (last, so it marks a finished run).

    Every file is written atomically; returns the metrics dict that went into metrics.json.
    """
    out_dir = Path(out_dir)
    metrics = evaluate_predictions(df, threshold=threshold, n_boot=n_boot, seed=seed)
    y, p = _checked_arrays(df)
    y_pred = (p >= metrics["threshold"]).astype(np.int64)
    suffix = f" (threshold {metrics['threshold']:.3g})"
    plot_roc(y, p, out_dir / "roc.png", title=title)
    plot_confusion(y, y_pred, out_dir / "confusion.png", title=(title + suffix).strip())
    write_json(out_dir / "metrics.json", metrics)
    return metrics


def _fmt(value: Any, float_fmt: str) -> str:
    """One table cell: None/NaN -> '–', (mean, sd) -> 'm ± s', floats via float_fmt."""
    if value is None:
        return "–"
    if isinstance(value, dict) and "mean" in value and "sd" in value:
        value = (value["mean"], value["sd"])
    if isinstance(value, tuple) and len(value) == 2:
        mean, sd = value
        if mean is None or (isinstance(mean, Real) and math.isnan(mean)):
            return "–"
        if sd is None or (isinstance(sd, Real) and math.isnan(sd)):
            return _fmt(mean, float_fmt)
        return f"{_fmt(mean, float_fmt)} ± {_fmt(sd, float_fmt)}"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        return "–" if math.isnan(value) else float_fmt.format(float(value))
    if isinstance(value, (list, np.ndarray)):
        return "[" + ", ".join(_fmt(v, float_fmt) for v in value) + "]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str], float_fmt: str = "{:.3f}") -> str:
    """GitHub Markdown table of ``rows`` restricted to ``columns``, for READMEs and run summaries.

    (mean, sd) tuples and {"mean", "sd"} dicts render as '0.812 ± 0.031'; None, NaN and missing
    keys render as '–'.
    """
    if not columns:
        raise MitotypeError("markdown_table needs at least one column")
    header = [_fmt(c, float_fmt) if not isinstance(c, str) else c.replace("|", "\\|") for c in columns]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c), float_fmt) for c in columns) + " |")
    return "\n".join(lines) + "\n"
