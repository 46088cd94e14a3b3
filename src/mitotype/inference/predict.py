"""Predict p_atypical for every row of a manifest, streaming: decoding overlaps the model and
memory stays flat however many patches there are."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from mitotype.data.images import iter_batches
from mitotype.data.manifest import LABEL_NAMES, UNLABELLED
from mitotype.errors import MitotypeError
from mitotype.inference.runtime import load_scorer
from mitotype.models.ensemble import INFERENCE_BATCH, Backend, Ensemble, check_threshold


def predict_manifest(
    scorer: Backend, manifest: pd.DataFrame, *, patch_size: int, size_policy: str, tta: bool = False,
    batch_size: int = INFERENCE_BATCH, progress: Callable[[int], None] | None = None, skip_bad: bool = False,
    skipped: list[tuple[str, str]] | None = None, skipped_note: str = "",
) -> np.ndarray:
    """p_atypical of ``scorer`` (an :class:`Ensemble` or a backend running its graph) for each
    manifest row, streaming; NaN for images skipped with ``skip_bad`` (appended to ``skipped`` as
    (path, reason); ``skipped_note`` tells the warning where the caller keeps that list)."""
    p = np.full(len(manifest), np.nan)
    batches = iter_batches(manifest["path"].tolist(), batch_size, patch_size, size_policy, on_bad_image="skip" if skip_bad else "error",
                           skipped=skipped, skipped_note=skipped_note)
    for index, batch in batches:
        p[index] = scorer.p_atypical(batch, tta)
        if progress:
            progress(len(index))
    return p


def adapt_to(ensemble: Ensemble, paths: list[str], *, size_policy: str, skip_bad: bool = False, batch_size: int = INFERENCE_BATCH) -> int:
    """The first of two passes: BatchNorm statistics re-estimated on ``paths`` (unreadable images
    skipped with ``skip_bad``, as the scoring pass skips them)."""
    batches = iter_batches(paths, batch_size, ensemble.patch_size, size_policy, on_bad_image="skip" if skip_bad else "error")
    return ensemble.adapt_batchnorm(batch for _, batch in batches)


def prediction_table(manifest: pd.DataFrame, p: np.ndarray, threshold: float) -> pd.DataFrame:
    """``path, p_atypical, label`` (the predicted class name) first, then every input column; a
    known true label is kept as ``true_label``."""
    label = np.where(np.isnan(p), "", np.where(p >= threshold, LABEL_NAMES[1], LABEL_NAMES[0]))  # "": skipped image
    out = pd.DataFrame({"path": manifest["path"].to_numpy(), "p_atypical": p, "label": label})
    rest = manifest.drop(columns=["path"]).rename(columns={"label": "true_label"})
    if (rest["true_label"] == UNLABELLED).all():
        rest = rest.drop(columns=["true_label"])
    return pd.concat([out, rest.reset_index(drop=True)], axis=1)


def predict_path(
    model_path: Path, inputs: Path, out_csv: Path, *, tta: bool = False, threshold: float | None = None,
    skip_missing: bool = False, device: str = "auto", progress: Callable[[int], None] | None = None, size_policy: str | None = None,
    skip_bad: bool = False, backend: str = "auto", onnx: Path | None = None, adapt_bn: bool = False,
) -> pd.DataFrame:
    """Read INPUT (folder or manifest, labels optional), predict with the model or fold ensemble,
    write the prediction table and its HTML report (:func:`report_html_path`) atomically and return
    the table. Outputs and options are checked before any model loads; images skipped with
    ``skip_bad`` are listed in :func:`skipped_csv_path` beside it. ``backend``: see
    :mod:`mitotype.inference.runtime` (``onnx``: an exported file of this model for a graph backend);
    ``adapt_bn`` re-estimates BatchNorm statistics on INPUT first (:func:`adapt_to`)."""
    from mitotype._io import check_output_file, write_csv
    from mitotype.data.readers import read_dataset

    for path in (out_csv, skipped_csv_path(out_csv), report_html_path(out_csv)):
        check_output_file(path, "out_csv")
    if threshold is not None:
        check_threshold(threshold)
    ensemble, scorer = load_scorer(model_path, device=device, threshold=threshold, backend=backend, onnx=onnx, adapt_bn=adapt_bn)
    df = read_dataset(inputs, require_labels=False, skip_missing=skip_missing).manifest
    if df.empty:
        raise MitotypeError(f"{inputs}: no images found")
    if adapt_bn:
        adapt_to(ensemble, df["path"].tolist(), size_policy=size_policy or ensemble.size_policy, skip_bad=skip_bad)
    skipped: list[tuple[str, str]] = []
    p = predict_manifest(scorer, df, patch_size=ensemble.patch_size, size_policy=size_policy or ensemble.size_policy, tta=tta,
                         progress=progress, skip_bad=skip_bad, skipped=skipped, skipped_note=str(skipped_csv_path(out_csv)))
    table = prediction_table(df, p, ensemble.threshold)
    if skipped:
        write_csv(skipped_csv_path(out_csv), pd.DataFrame(skipped, columns=["path", "reason"]))
    else:  # a list from an earlier run must not describe this one
        Path(skipped_csv_path(out_csv)).unlink(missing_ok=True)
    write_csv(out_csv, table)
    from mitotype.evaluation.html_report import write_report

    write_report(report_html_path(out_csv), table, threshold=ensemble.threshold, cards=ensemble.cards,
                 title=f"{Path(model_path).name} on {Path(inputs).name}")
    return table


def report_html_path(out_csv: Path) -> Path:
    """Where predict writes its self-contained HTML report: ``NAME.html`` beside ``NAME.csv``."""
    out_csv = Path(out_csv)
    return out_csv.with_suffix(".html") if out_csv.suffix.lower() != ".html" else out_csv.with_name(f"{out_csv.name}.report.html")


def skipped_csv_path(out_csv: Path) -> Path:
    """Where predict lists the images it skipped: ``NAME.skipped.csv`` beside ``NAME.csv``."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}.skipped.csv")
