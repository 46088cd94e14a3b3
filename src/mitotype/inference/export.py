"""Export the whole inference graph to ONNX or TorchScript, self-described by a JSON card.

The exported graph takes what the streaming readers produce, uint8 RGB patches (B, H, W, 3) at the
model's patch size with any batch size, and returns ``p_atypical`` (B,): the /255, centre crop,
resize and normalisation live inside it, so a user of the file needs nothing else. A fold-ensemble
run directory exports as ONE graph that averages its folds (one file to ship and one session to
run; the fold mean is exact, as in ``predict_batch``). TTA stays outside the graph (the backend
runs the 8 dihedral views), so one file serves both.

An export is checked before it is written: the ONNX file's probabilities must equal PyTorch's to
:data:`TOLERANCE` on random patches, or nothing is written. An int8 ONNX file (static QDQ
quantization, calibrated on unlabelled patches) is written only when its balanced accuracy on a
labelled set the model did not train on is at most :data:`INT8_MAX_DROP` below the fp32 graph's.
The card beside the file (``OUT.json``) holds the model card's build, the threshold, the format,
the input contract and these checks.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

import mitotype
from mitotype._io import atomic_path, check_output_file, write_json
from mitotype.errors import MitotypeError
from mitotype.models.artifact import WEIGHTS_NAME, LoadedModel, load_ensemble

FORMATS = ("onnx", "torchscript")
EXPORT_CARD_FORMAT = "mitotype-export/1"
EXPORT_VERSION = 1  # part of the cache key: a change to the graph layout re-exports cached files
OPSET = 17
TOLERANCE = 1e-4
INT8_MAX_DROP = 0.01
INPUT_NAME, OUTPUT_NAME = "image", "p_atypical"


class InferenceGraph(nn.Module):
    """uint8 (B, H, W, 3) RGB -> p_atypical (B,): the fold mean of the members, each with its own
    preprocessing (inside the member's forward), exactly as ``predict_batch`` computes it."""

    def __init__(self, nets: Sequence[nn.Module]):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float().div(255).contiguous(memory_format=torch.channels_last)
        total = torch.zeros(image.shape[0], dtype=torch.float32, device=image.device)
        for net in self.nets:
            total = total + net.p_atypical(net({"image": x}))
        return total / len(self.nets)


def export_card_path(out: Path) -> Path:
    """Where the card of an exported file lives: ``OUT.json`` beside ``OUT``."""
    return Path(out).with_name(Path(out).name + ".json")


def weights_hash(models: Sequence[LoadedModel]) -> str:
    """sha256 over each member's weights file and build section: the identity of what is exported."""
    digest = hashlib.sha256(f"export-v{EXPORT_VERSION}".encode())
    for m in models:
        with open(m.path / WEIGHTS_NAME, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(json.dumps(m.card["build"], sort_keys=True).encode())
    return digest.hexdigest()


def _graph(models: Sequence[LoadedModel]) -> tuple[InferenceGraph, int]:
    sizes = {m.patch_size for m in models}
    if len(sizes) > 1:
        raise MitotypeError(f"ensemble members expect different patch sizes: {sorted(sizes)}")
    nets = [m.model.to("cpu").eval() for m in models]
    return InferenceGraph(nets).eval(), sizes.pop()


def random_patches(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _torch_p(graph: nn.Module, patches: torch.Tensor) -> np.ndarray:
    return graph(patches).numpy()


def write_onnx(graph: InferenceGraph, patch_size: int, path: Path) -> None:
    """torch.onnx.export of ``graph`` with a dynamic batch axis (TorchScript-based exporter)."""
    example = random_patches(2, patch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: the shape branches are constant per model, as intended
        torch.onnx.export(graph, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)


def onnx_difference(path: Path, graph: nn.Module, patch_size: int, *, n: int = 8, seed: int = 0) -> float:
    """Largest |p_onnx - p_torch| on ``n`` random patches (and on a batch of 1: the batch axis is dynamic)."""
    from mitotype.inference.backends import OnnxBackend

    backend = OnnxBackend(path)
    worst = 0.0
    for patches in (random_patches(n, patch_size, seed), random_patches(1, patch_size, seed + 1)):
        worst = max(worst, float(np.abs(backend.p_atypical(patches) - _torch_p(graph, patches)).max()))
    return worst


def check_difference(diff: float, out: Path, what: str = "ONNX") -> None:
    if not np.isfinite(diff) or diff > TOLERANCE:
        raise MitotypeError(f"{out}: the {what} graph's p_atypical differs from PyTorch's by {diff:.2e} (> {TOLERANCE:g}); "
                            "nothing written")


def export_model(
    model_path: Path, out: Path, fmt: str = "onnx", *, int8: bool = False, check_data: Path | None = None,
    calib_data: Path | None = None, calib_n: int = 256, batch_size: int = 64, progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Export MODEL (a model folder or a cv run's fold ensemble) to ``out`` in ``fmt``; write the
    card beside it; return the card. Options are checked before any model is loaded."""
    out = Path(out)
    if fmt not in FORMATS:
        raise MitotypeError(f"{{fmt}} '{fmt}': must be one of {', '.join(FORMATS)}", options=("fmt",))
    if int8 and fmt != "onnx":
        raise MitotypeError("{int8} quantizes ONNX graphs only; use {fmt} onnx", options=("int8", "fmt"))
    if int8 and check_data is None:
        raise MitotypeError("{int8} needs {check_data}: a labelled set the model did not train on, to measure the int8 loss",
                            options=("int8", "check_data"))
    if not int8 and (check_data is not None or calib_data is not None):
        raise MitotypeError("{check_data} and {calib_data} only apply with {int8}", options=("check_data", "calib_data", "int8"))
    if calib_n < 1:
        raise MitotypeError(f"{{calib_n}} {calib_n}: must be at least 1", options=("calib_n",))
    check_output_file(out, "out_file")
    check_output_file(export_card_path(out), "out_file")
    models = load_ensemble(model_path, "cpu")
    graph, size = _graph(models)
    card = _card(models, fmt, "int8" if int8 else "fp32", size)
    with tempfile.TemporaryDirectory(prefix="mitotype-export-") as tmp_name:
        tmp = Path(tmp_name)
        if fmt == "torchscript":
            made, card["check"] = _torchscript(graph, size, tmp / "model.pt", out)
        else:
            made = tmp / "model.onnx"
            write_onnx(graph, size, made)
            diff = onnx_difference(made, graph, size)
            check_difference(diff, out)
            card["check"] = {"max_abs_diff_vs_torch": diff, "tolerance": TOLERANCE, "inputs": "8 + 1 random uint8 patches"}
            if int8:
                made, card["int8"] = _int8(made, models, tmp, Path(check_data), Path(calib_data or check_data), calib_n=calib_n,
                                           batch_size=batch_size, progress=progress, out=out)
        card["sha256"] = _file_hash(made)
        with atomic_path(out) as target:
            shutil.copyfile(made, target)
    write_json(export_card_path(out), card)
    return card


def _card(models: Sequence[LoadedModel], fmt: str, precision: str, size: int) -> dict[str, Any]:
    from mitotype.inference.predict import ensemble_threshold

    first = models[0].card
    return {
        "format": EXPORT_CARD_FORMAT,
        "export_format": fmt,
        "precision": precision,
        "mitotype_version": mitotype.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "opset": OPSET if fmt == "onnx" else None,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", size, size, 3], "layout": "NHWC, RGB, 0-255",
                  "note": "/255, centre crop, resize and normalisation are inside the graph; TTA is not"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch"], "meaning": "mean p(atypical) over the members"},
        "members": [str(m.path) for m in models],
        "weights_sha256": weights_hash(models),
        "build": first["build"],
        "class_names": first["class_names"],
        "positive_class": first.get("positive_class", "atypical"),
        "threshold": ensemble_threshold(list(models)),
        "provenance": [m.card.get("provenance", {}) for m in models],
    }


def _torchscript(graph: InferenceGraph, size: int, path: Path, out: Path) -> tuple[Path, dict[str, Any]]:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch marks TorchScript deprecated; it is still what C++ / mobile runtimes load
        traced = torch.jit.trace(graph, (random_patches(2, size),), check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path))
    diff = max(float(np.abs(_torch_p(loaded, p) - _torch_p(graph, p)).max())
               for p in (random_patches(8, size), random_patches(1, size, seed=1)))
    check_difference(diff, out, "TorchScript")
    return path, {"max_abs_diff_vs_torch": diff, "tolerance": TOLERANCE, "inputs": "8 + 1 random uint8 patches"}


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# int8


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
    data: Path, models: Sequence[LoadedModel], n: int, *, batch_size: int = 32, seed: int = 0
) -> list[np.ndarray]:
    """``n`` patches drawn (seeded) from ``data`` (labels not needed), decoded, in batches."""
    from mitotype.data.images import decode_all
    from mitotype.data.readers import read_dataset

    manifest = read_dataset(data, require_labels=False).manifest
    if manifest.empty:
        raise MitotypeError(f"{{calib_data}} {data}: no images found", options=("calib_data",))
    rows = np.sort(np.random.default_rng(seed).permutation(len(manifest))[:n])
    store, _ = decode_all(manifest["path"].iloc[rows].tolist(), models[0].patch_size, models[0].size_policy)
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
    backends: dict[str, Any], paths: Sequence[str], models: Sequence[LoadedModel], *, batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Each backend's p_atypical on the patches at ``paths``, every batch decoded once for all backends."""
    from mitotype.data.images import iter_batches

    p = {name: np.full(len(paths), np.nan) for name in backends}
    for index, batch in iter_batches(list(paths), batch_size, models[0].patch_size, models[0].size_policy):
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


def _int8(
    fp32: Path, models: Sequence[LoadedModel], tmp: Path, check_data: Path, calib_data: Path, *, calib_n: int, batch_size: int,
    progress: Callable[[int], None] | None, out: Path,
) -> tuple[Path, dict[str, Any]]:
    """Quantize, then score fp32 and int8 on the check data at the stored threshold(s) and apply the gate.

    With a cv run's ``splits.csv`` as check data each member is exported and quantized alone, with
    the same calibration patches as the ensemble (per-tensor ranges, so its part of the int8 ensemble
    is the same graph), and scored on its own fold at its own threshold: out-of-fold accuracy, pooled.
    """
    from mitotype.evaluation.metrics import binary_metrics
    from mitotype.inference.predict import ensemble_threshold

    made = tmp / "model.int8.onnx"
    calibration = calibration_batches(calib_data, models, calib_n)
    quantize_int8(fp32, made, calibration)
    manifest = labelled_check_data(check_data)
    y, oof = manifest["label"].to_numpy().astype(int), out_of_fold(manifest, len(models), check_data)
    p = {name: np.full(len(y), np.nan) for name in ("fp32", "int8")}
    calls = {name: np.zeros(len(y), bool) for name in p}
    parts = [(np.flatnonzero(manifest["fold"].to_numpy() == k), [m], tmp / f"fold_{k}") for k, m in enumerate(models)] if oof \
        else [(np.arange(len(y)), list(models), None)]
    for rows, members, stem in parts:
        files = {"fp32": fp32, "int8": made}
        if stem is not None:
            files = {"fp32": stem.with_suffix(".onnx"), "int8": stem.with_suffix(".int8.onnx")}
            graph, size = _graph(members)
            write_onnx(graph, size, files["fp32"])
            quantize_int8(files["fp32"], files["int8"], calibration)
        got = _run_int8(files, manifest["path"].iloc[rows].tolist(), members, batch_size=batch_size, progress=progress, out=out)
        for name in p:
            p[name][rows] = got[name]
            calls[name][rows] = got[name] >= ensemble_threshold(members)
    fp, q = (binary_metrics(y, calls[k].astype(float), 0.5)["balanced_accuracy"] for k in ("fp32", "int8"))
    verdict = int8_gate(fp, q, out)
    verdict.update(check_data=str(check_data), n=int(len(y)), threshold=ensemble_threshold(list(models)), out_of_fold=oof,
                   calib_data=str(calib_data), calib_n=sum(len(b) for b in calibration),
                   max_abs_diff_vs_fp32=float(np.nanmax(np.abs(p["fp32"] - p["int8"]))))
    return made, verdict


def _run_int8(files: dict[str, Path], paths: list[str], models: Sequence[LoadedModel], *, batch_size: int,
              progress: Callable[[int], None] | None, out: Path) -> dict[str, np.ndarray]:
    from mitotype.inference.backends import OnnxBackend

    try:
        return score_backends({name: OnnxBackend(f) for name, f in files.items()}, paths, models, batch_size=batch_size,
                              progress=progress)
    except MitotypeError:
        raise
    except Exception as err:  # noqa: BLE001 (ONNX Runtime's int8 kernels refuse some tiny feature maps, e.g. lite0 at 32 px)
        reason = str(err).splitlines()[0][:160]
        raise MitotypeError(f"{out}: the int8 graph does not run in ONNX Runtime ({reason}); export fp32") from None


# ---------------------------------------------------------------------------------------------
# reading exports back


def read_export_card(path: Path) -> dict[str, Any]:
    card_path = export_card_path(path)
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise MitotypeError(f"{path}: no export card {card_path.name} beside it (export with `mitotype export`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MitotypeError(f"{card_path}: unreadable export card ({type(err).__name__})") from None
    if not isinstance(card, dict) or card.get("format") != EXPORT_CARD_FORMAT:
        raise MitotypeError(f"{card_path}: not a mitotype export card (expected format {EXPORT_CARD_FORMAT})")
    if card.get("export_format") != "onnx" or not isinstance(card.get("weights_sha256"), str):
        raise MitotypeError(f"{card_path}: field export_format/weights_sha256: expected an ONNX export's card")
    return card


def check_export_matches(path: Path, models: Sequence[LoadedModel]) -> dict[str, Any]:
    """Refuse an ONNX file exported from other weights than ``models`` (its card keeps their hash)."""
    if not Path(path).is_file():
        raise MitotypeError(f"{{onnx}} {path}: no such file", options=("onnx",))
    card = read_export_card(Path(path))
    if card["weights_sha256"] != weights_hash(models):
        members = ", ".join(str(m.path) for m in models)
        raise MitotypeError(f"{path}: exported from other weights than {members} (card weights_sha256 differs)")
    return card


def cache_dir() -> Path:
    """``MITOTYPE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/mitotype`` (``~/.cache/mitotype``)."""
    text = os.environ.get("MITOTYPE_CACHE_DIR", "").strip()
    if text:
        return Path(text)
    return Path(os.environ.get("XDG_CACHE_HOME", "") or Path.home() / ".cache") / "mitotype"


def cached_onnx(models: Sequence[LoadedModel], folder: Path | None = None) -> Path:
    """The fp32 ONNX export of ``models`` in the cache, made (and checked) on first use; keyed by
    the weights' hash, so retrained weights get a new file and a file never goes stale."""
    key = weights_hash(models)
    path = Path(folder or cache_dir() / "onnx") / f"{key[:32]}.onnx"
    if path.is_file() and export_card_path(path).is_file():
        return path
    graph, size = _graph(models)
    card = _card(models, "onnx", "fp32", size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write_onnx(graph, size, tmp)
        diff = onnx_difference(tmp, graph, size)
        check_difference(diff, path)
        card["check"] = {"max_abs_diff_vs_torch": diff, "tolerance": TOLERANCE, "inputs": "8 + 1 random uint8 patches"}
        card["sha256"] = _file_hash(tmp)
    write_json(export_card_path(path), card)
    return path

