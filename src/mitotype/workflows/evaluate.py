"""Score a saved model (or a fold ensemble) on a labelled dataset: predictions, metrics, plots."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from mitotype._io import check_output_dir, write_csv
from mitotype.data.manifest import require_labels
from mitotype.data.readers import read_dataset
from mitotype.data.splits import evaluation_rows
from mitotype.evaluation.html_report import write_report
from mitotype.evaluation.report import write_evaluation
from mitotype.inference.predict import adapt_to, predict_manifest, prediction_table
from mitotype.inference.runtime import load_scorer


def evaluate_model(
    model_path: Path, data: Path, out_dir: Path, *, tta: bool = False, threshold: float | None = None,
    skip_missing: bool = False, device: str = "auto", n_boot: int = 1000, progress: Callable[[int], None] | None = None,
    size_policy: str | None = None, skip_bad: bool = False, backend: str = "auto", adapt_bn: bool = False,
) -> tuple[dict, int]:
    """Writes predictions.csv, metrics.json, roc.png, confusion.png, report.html (and skipped.csv,
    the images left out with ``skip_bad``); returns (metrics, n_models). ``out_dir`` is checked before any work."""
    check_output_dir(out_dir, "out_dir")
    ensemble, scorer = load_scorer(model_path, device=device, threshold=threshold, backend=backend, adapt_bn=adapt_bn)
    t = ensemble.threshold
    df = read_dataset(data, skip_missing=skip_missing).manifest
    df = df.iloc[evaluation_rows(df)].reset_index(drop=True)
    require_labels(df, str(data))
    if adapt_bn:  # labels are never read here: the adaptation sees the patches only
        adapt_to(ensemble, df["path"].tolist(), size_policy=size_policy or ensemble.size_policy, skip_bad=skip_bad)
    skipped: list[tuple[str, str]] = []
    p = predict_manifest(scorer, df, patch_size=ensemble.patch_size, size_policy=size_policy or ensemble.size_policy, tta=tta,
                         progress=progress, skip_bad=skip_bad, skipped=skipped, skipped_note=str(out_dir / "skipped.csv"))
    if skipped:
        write_csv(out_dir / "skipped.csv", pd.DataFrame(skipped, columns=["path", "reason"]))
    else:  # a list from an earlier run must not describe this one
        Path(out_dir / "skipped.csv").unlink(missing_ok=True)
    table = prediction_table(df, p, t)
    write_csv(out_dir / "predictions.csv", table)
    scored = df.assign(p_atypical=p)[["label", "p_atypical", "domain"]].dropna(subset=["p_atypical"])  # skipped images
    require_labels(scored, f"{data} (after skipping unusable images)")
    title = f"{Path(model_path).name} on {Path(data).name}"
    metrics = write_evaluation(scored, out_dir, threshold=t, n_boot=n_boot, title=title)
    write_report(out_dir / "report.html", table, threshold=t, cards=ensemble.cards, title=title, metrics=metrics)
    return metrics, len(ensemble)
