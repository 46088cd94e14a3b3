"""int8 export: static QDQ quantization of the exported graph, written only when its balanced
accuracy on labelled patches the model did not train on is at most :data:`INT8_MAX_DROP` below the
fp32 graph's (out of fold, member by member, when the check data is a cv run's ``splits.csv``)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mitotype.errors import MitotypeError
from mitotype.inference.backends import OnnxBackend
from mitotype.inference.graph import INPUT_NAME, inference_graph, write_onnx
from mitotype.models.ensemble import INFERENCE_BATCH, Backend, Ensemble

INT8_MAX_DROP = 0.01


def quantize_int8(fp32: Path, int8: Path, calibration: Sequence[np.ndarray]) -> None:
    """Static QDQ quantization (u8 activations, per-channel s8 weights: the VNNI kernels' layout),
    activation ranges calibrated on ``calibration`` batches of uint8 patches at the 99.999th
    percentile (min/max lets a few extreme activations stretch every range). The preprocessing
    (crop, resize, normalise, padding arithmetic) before the first convolution, that convolution (it
    sees the raw image), the residual additions and the linear heads stay fp32: on the bundled
    crop80 fold model these choices cut the int8 loss in balanced accuracy from 0.043 to 0.012
    (benchmarks/RESULTS.md, "int8 choices")."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    patches = np.concatenate(list(calibration)) if len(calibration) else np.zeros((0,), np.uint8)
    size = max(len(b) for b in calibration) if len(calibration) else 0
    wrap = np.resize(np.arange(len(patches)), -(-len(patches) // max(size, 1)) * size)  # equal batches: the percentile
    batches = [patches[wrap[i : i + size]] for i in range(0, len(wrap), max(size, 1))]  # histograms need one shape

    class Reader(CalibrationDataReader):
        """Batch by batch: ORT's histogram calibrators keep every activation of what one ``collect_data``
        call reads, so a fold ensemble on 256 patches at once needs > 20 GB; one batch per call
        (``CalibStridedMinMax``, which strides any calibrator) keeps it to one batch's activations."""

        def __init__(self) -> None:
            self.set_range(0, len(batches))

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.items = iter(batches[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.items, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepared = int8.with_name("prepared.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # symbolic shape inference fails on this graph (and leaves a temp file in the cwd): ONNX's own suffices
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        nodes = list(onnx.load(str(prepared)).graph.node)
        first_conv = next((i for i, n in enumerate(nodes) if n.op_type == "Conv"), 0)
        keep = [n.name for n in nodes[: first_conv + 1]] + [n.name for n in nodes if n.op_type in ("Gemm", "MatMul", "Add")]
        with contextlib.redirect_stdout(io.StringIO()):  # ORT's calibrators print a line per batch
            quantize_static(str(prepared), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                            calibrate_method=CalibrationMethod.Percentile, extra_options={"CalibStridedMinMax": 1})


def calibration_batches(
    data: Path, ensemble: Ensemble, n: int, *, batch_size: int = 32, seed: int = 0
) -> list[np.ndarray]:
    """``n`` patches drawn (seeded) from ``data`` (labels not needed), decoded, in batches."""
    from mitotype.data.images import decode_all
    from mitotype.data.readers import read_dataset

    manifest = read_dataset(data, require_labels=False).manifest
    if manifest.empty:
        raise MitotypeError(f"{{calib_data}} {data}: no images found", options=("calib_data",))
    rows = np.sort(np.random.default_rng(seed).permutation(len(manifest))[:n])
    store, _ = decode_all(manifest["path"].iloc[rows].tolist(), ensemble.patch_size, ensemble.size_policy)
    return [store.batch(np.arange(s, min(s + batch_size, len(store)))).numpy() for s in range(0, len(store), batch_size)]


def labelled_check_data(data: Path) -> Any:
    """The manifest of ``--check-data``: labelled patches of both classes, else one line naming it."""
    from mitotype.data.manifest import UNLABELLED
    from mitotype.data.readers import read_dataset

    manifest = read_dataset(data, require_labels=True).manifest
    if manifest.empty or (manifest["label"] == UNLABELLED).any() or manifest["label"].nunique() < 2:
        raise MitotypeError(f"{{check_data}} {data}: needs labelled patches of both classes", options=("check_data",))
    return manifest


def score_backends(
    backends: dict[str, Backend], paths: Sequence[str], ensemble: Ensemble, *, batch_size: int = INFERENCE_BATCH,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Each backend's p_atypical on the patches at ``paths``, every batch decoded once for all backends."""
    from mitotype.data.images import iter_batches

    p = {name: np.full(len(paths), np.nan) for name in backends}
    for index, batch in iter_batches(list(paths), batch_size, ensemble.patch_size, ensemble.size_policy):
        for name, backend in backends.items():
            p[name][index] = backend.p_atypical(batch)
        if progress:
            progress(len(index))
    return p


def out_of_fold(manifest: Any, members: int, data: Path) -> bool:
    """Whether ``--check-data`` is a cv run's ``splits.csv`` for this fold ensemble: a ``fold`` column
    naming exactly its members 0..K-1. Then each member is scored on its own held-out rows only, so
    the gate measures out-of-fold accuracy (every other row trained some member of the ensemble)."""
    if "fold" not in manifest.columns or members < 2:
        return False
    folds = set(manifest["fold"].dropna().astype(int))
    if manifest["fold"].isna().any() or folds != set(range(members)):
        raise MitotypeError(f"{{check_data}} {data}: column fold holds {sorted(folds)}, not the ensemble's {members} folds "
                            f"0..{members - 1} (pass the splits.csv of the cv run this ensemble came from)", options=("check_data",))
    return True


def int8_gate(fp32_bacc: float, int8_bacc: float, out: Path | None = None) -> dict[str, Any]:
    """Accept int8 when its balanced accuracy is at most :data:`INT8_MAX_DROP` below fp32's; else one line with both."""
    drop = fp32_bacc - int8_bacc
    figures = f"balanced accuracy fp32 {fp32_bacc:.4f}, int8 {int8_bacc:.4f} (drop {drop:+.4f}, limit {INT8_MAX_DROP})"
    if not drop <= INT8_MAX_DROP + 1e-9:  # balanced accuracies are ratios: 0.80 - 0.79 is 0.010000000000000009
        raise MitotypeError(f"{out or 'int8'}: int8 refused, {figures}; nothing written (export fp32 instead)")
    return {"balanced_accuracy_fp32": fp32_bacc, "balanced_accuracy_int8": int8_bacc, "drop": drop, "max_drop": INT8_MAX_DROP,
            "summary": figures}


def int8_export(
    fp32: Path, ensemble: Ensemble, tmp: Path, *, check_data: Path, calib_data: Path, calib_n: int, batch_size: int,
    progress: Callable[[int], None] | None, out: Path,
) -> tuple[Path, dict[str, Any]]:
    """Quantize, then score fp32 and int8 on the check data at the stored threshold(s) and apply the gate.

    With a cv run's ``splits.csv`` as check data each member is exported and quantized alone, with
    the same calibration patches as the ensemble (per-tensor ranges, so its part of the int8 ensemble
    is the same graph), and scored on its own fold at its own threshold: out-of-fold accuracy, pooled.
    """
    from mitotype.evaluation.metrics import binary_metrics

    made = tmp / "model.int8.onnx"
    calibration = calibration_batches(calib_data, ensemble, calib_n)
    quantize_int8(fp32, made, calibration)
    manifest = labelled_check_data(check_data)
    y, oof = manifest["label"].to_numpy().astype(int), out_of_fold(manifest, len(ensemble), check_data)
    p = {name: np.full(len(y), np.nan) for name in ("fp32", "int8")}
    calls = {name: np.zeros(len(y), bool) for name in p}
    parts = [(np.flatnonzero(manifest["fold"].to_numpy() == k), m, tmp / f"fold_{k}") for k, m in enumerate(ensemble.each())] if oof \
        else [(np.arange(len(y)), ensemble, None)]
    for rows, members, stem in parts:
        files = {"fp32": fp32, "int8": made}
        if stem is not None:
            files = {"fp32": stem.with_suffix(".onnx"), "int8": stem.with_suffix(".int8.onnx")}
            graph, size = inference_graph(members), members.patch_size
            write_onnx(graph, size, files["fp32"])
            quantize_int8(files["fp32"], files["int8"], calibration)
        got = _run_int8(files, manifest["path"].iloc[rows].tolist(), members, batch_size=batch_size, progress=progress, out=out)
        for name in p:
            p[name][rows] = got[name]
            calls[name][rows] = members.labels(got[name])
    fp, q = (binary_metrics(y, calls[k].astype(float), 0.5)["balanced_accuracy"] for k in ("fp32", "int8"))
    verdict = int8_gate(fp, q, out)
    verdict.update(check_data=str(check_data), n=int(len(y)), threshold=ensemble.threshold, out_of_fold=oof,
                   calib_data=str(calib_data), calib_n=sum(len(b) for b in calibration),
                   max_abs_diff_vs_fp32=float(np.nanmax(np.abs(p["fp32"] - p["int8"]))))
    return made, verdict


def _run_int8(files: dict[str, Path], paths: list[str], ensemble: Ensemble, *, batch_size: int,
              progress: Callable[[int], None] | None, out: Path) -> dict[str, np.ndarray]:
    try:
        return score_backends({name: OnnxBackend(f) for name, f in files.items()}, paths, ensemble, batch_size=batch_size,
                              progress=progress)
    except MitotypeError:
        raise
    except Exception as err:
        reason = str(err).splitlines()[0][:160]
        raise MitotypeError(f"{out}: the int8 graph does not run in ONNX Runtime ({reason}); export fp32") from None
