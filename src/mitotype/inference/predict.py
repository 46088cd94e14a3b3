"""Predict p_atypical for every row of a manifest, streaming: decoding overlaps the model and
memory stays flat however many patches there are."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from mitotype.data.images import iter_batches
from mitotype.data.manifest import LABEL_NAMES, UNLABELLED
from mitotype.errors import MitotypeError
from mitotype.inference.backends import GRAPH_BACKENDS, Backend, TorchBackend, check_backend, make_backend
from mitotype.inference.engine import predict_batch, resolve_device  # noqa: F401 (predict_batch: re-exported)
from mitotype.models.artifact import LoadedModel, load_ensemble


def predict_manifest(
    models: list[LoadedModel],
    manifest: pd.DataFrame,
    batch_size: int = 128,
    tta: bool = False,
    device: torch.device | None = None,
    progress: Callable[[int], None] | None = None,
    size_policy: str | None = None,
    skip_bad: bool = False,
    *,
    skipped: list[tuple[str, str]] | None = None,
    skipped_note: str = "",
    backend: "Backend | None" = None,
) -> np.ndarray:
    """Mean p_atypical of ``models`` (one, or the fold ensemble) for each manifest row; NaN for
    images skipped with ``skip_bad`` (appended to ``skipped`` as (path, reason); ``skipped_note``
    tells the warning where the caller keeps that list). ``size_policy`` (error | center-crop |
    resize) overrides the models' for other-sized patches. ``backend`` (default: PyTorch on
    ``device``) runs the batches (see :mod:`mitotype.inference.backends`)."""
    if not models:
        raise MitotypeError("no model to predict with")
    device = device or torch.device("cpu")
    sizes = {(m.patch_size, m.size_policy) for m in models}
    if len(sizes) > 1:
        raise MitotypeError(f"ensemble members expect different patch sizes: {sorted(sizes)}")
    patch_size, policy = sizes.pop()
    policy = size_policy or policy
    p = np.full(len(manifest), np.nan)
    backend = backend or TorchBackend([m.model for m in models], device)
    batches = iter_batches(manifest["path"].tolist(), batch_size, patch_size, policy, on_bad_image="skip" if skip_bad else "error",
                           skipped=skipped, skipped_note=skipped_note)
    for index, batch in batches:
        p[index] = backend.p_atypical(batch, tta)
        if progress:
            progress(len(index))
    return p


def prediction_table(manifest: pd.DataFrame, p: np.ndarray, threshold: float) -> pd.DataFrame:
    """``path, p_atypical, label`` (the predicted class name) first, then every input column; a
    known true label is kept as ``true_label``."""
    label = np.where(np.isnan(p), "", np.where(p >= threshold, LABEL_NAMES[1], LABEL_NAMES[0]))  # "": skipped image
    out = pd.DataFrame({"path": manifest["path"].to_numpy(), "p_atypical": p, "label": label})
    rest = manifest.drop(columns=["path"]).rename(columns={"label": "true_label"})
    if (rest["true_label"] == UNLABELLED).all():
        rest = rest.drop(columns=["true_label"])
    return pd.concat([out, rest.reset_index(drop=True)], axis=1)


def load_models(model_path: Path, device: str = "auto") -> tuple[list[LoadedModel], torch.device]:
    dev = resolve_device(device)
    return load_ensemble(model_path, dev), dev


def ensemble_threshold(models: list[LoadedModel], override: float | None = None) -> float:
    """The user's threshold, else the mean of the models' stored (validation-chosen) thresholds."""
    if override is not None:
        if not 0 < override < 1:
            raise MitotypeError(f"{{threshold}} {override}: must be in (0, 1)", options=("threshold",))
        return float(override)
    return float(np.mean([m.threshold for m in models]))


def predict_path(
    model_path: Path, inputs: Path, out_csv: Path, tta: bool = False, threshold: float | None = None,
    skip_missing: bool = False, device: str = "auto", progress: Callable[[int], None] | None = None, size_policy: str | None = None,
    skip_bad: bool = False, *, backend: str = "torch", onnx: Path | None = None,
) -> pd.DataFrame:
    """Read INPUT (folder or manifest, labels optional), predict with the model or fold ensemble,
    write the prediction table and its HTML report (:func:`report_html_path`) atomically and return
    the table. ``out_csv`` is checked before any work;
    images skipped with ``skip_bad`` are listed in :func:`skipped_csv_path` beside it. ``backend``
    torch, onnxruntime or openvino (``onnx``: an exported file of this model, else one exported into the cache)."""
    from mitotype._io import check_output_file, write_csv
    from mitotype.data.readers import read_dataset

    check_output_file(out_csv, "out_csv")
    check_output_file(skipped_csv_path(out_csv), "out_csv")
    check_output_file(report_html_path(out_csv), "out_csv")
    if threshold is not None:
        ensemble_threshold([], threshold)  # a bad threshold is refused before the models load
    if backend in GRAPH_BACKENDS and device == "auto":
        device = "cpu"
    check_backend(backend, onnx)  # bad options are refused before the models load
    models, dev = load_models(model_path, device)
    t = ensemble_threshold(models, threshold)
    runner = make_backend(backend, models, dev, onnx_path=onnx)
    df = read_dataset(inputs, require_labels=False, skip_missing=skip_missing).manifest
    if df.empty:
        raise MitotypeError(f"{inputs}: no images found")
    skipped: list[tuple[str, str]] = []
    p = predict_manifest(models, df, tta=tta, device=dev, progress=progress, size_policy=size_policy, skip_bad=skip_bad,
                         skipped=skipped, skipped_note=str(skipped_csv_path(out_csv)), backend=runner)
    table = prediction_table(df, p, t)
    if skipped:
        write_csv(skipped_csv_path(out_csv), pd.DataFrame(skipped, columns=["path", "reason"]))
    else:  # a list from an earlier run must not describe this one
        Path(skipped_csv_path(out_csv)).unlink(missing_ok=True)
    write_csv(out_csv, table)
    from mitotype.evaluation.html_report import write_report

    write_report(report_html_path(out_csv), table, threshold=t, cards=[m.card for m in models],
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
