"""Which backend scores the patches: ``auto`` (the default) or one named by the user.

``auto`` takes a fixed order: PyTorch when a GPU is present; else OpenVINO fp32, then ONNX Runtime
fp32 (each running the model's graph, exported once into the cache and checked against PyTorch when
it is built), then PyTorch. Reduced precision (``openvino-bf16``) is never chosen for the user: it
changed 30 of 2,894 labels of the bundled model on the training split.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch

from mitotype.config import BackendName
from mitotype.errors import MitotypeError
from mitotype.inference.backends import OnnxBackend, OpenVinoBackend, openvino_available
from mitotype.inference.onnx_cache import cached_onnx, check_export_matches
from mitotype.models.ensemble import Backend, Ensemble


BACKENDS = tuple(b.value for b in BackendName)
GRAPH_BACKENDS = ("onnxruntime", "openvino", "openvino-bf16")  # run an exported ONNX graph on the CPU


def check_backend(name: str, onnx_path: Path | None = None) -> None:
    """Refuse an unknown backend, or an ONNX file given to the torch backend, before any work."""
    if name not in BACKENDS:
        raise MitotypeError(f"{{backend}} '{name}': must be one of {', '.join(BACKENDS)}", options=("backend",))
    if name == "torch" and onnx_path is not None:
        raise MitotypeError("{onnx} is read by the onnxruntime and openvino backends only; add {backend} onnxruntime",
                            options=("onnx", "backend"))


def auto_backend(device: torch.device) -> str:
    """The concrete backend ``auto`` stands for on ``device`` with the packages installed here."""
    if device.type != "cpu":
        return "torch"
    if openvino_available():
        return "openvino"
    return "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "torch"


def make_backend(name: str, ensemble: Ensemble, *, onnx_path: Path | None = None, cache_dir: Path | None = None) -> Backend:
    """The backend ``name`` for ``ensemble``: torch is the ensemble itself; the graph backends run
    ``onnx_path`` (checked to come from these weights) or an export made once into ``cache_dir``
    (default: the user cache). ``auto`` falls back to torch, with a warning, for a model whose graph
    cannot be exported (e.g. an adapter-wrapped foundation model)."""
    check_backend(name, onnx_path)
    chosen = auto_backend(ensemble.device) if name == "auto" else name
    if chosen == "torch" and onnx_path is not None:  # auto without a graph runtime installed
        raise MitotypeError("{onnx} needs onnxruntime or openvino installed (pip install 'mitotype[onnx]')", options=("onnx",))
    if chosen == "torch":
        return ensemble
    if ensemble.device.type != "cpu":
        raise MitotypeError(f"{{backend}} {chosen} runs on the CPU; device '{ensemble.device}' was asked (use cpu or auto)",
                            options=("backend",))
    try:
        return _graph_backend(chosen, ensemble, onnx_path, cache_dir)
    except Exception as err:
        if name != "auto" or onnx_path is not None:  # a file the user gave is never swapped for torch
            raise
        warnings.warn(f"backend auto: {chosen} unavailable for this model ({str(err).splitlines()[0][:160]}); using torch", stacklevel=2)
        return ensemble


def _graph_backend(name: str, ensemble: Ensemble, onnx_path: Path | None, cache_dir: Path | None) -> Backend:
    if onnx_path is not None:
        check_export_matches(Path(onnx_path), ensemble)
    path = Path(onnx_path) if onnx_path is not None else cached_onnx(ensemble, cache_dir)
    if name == "onnxruntime":
        return OnnxBackend(path)
    return OpenVinoBackend(path, precision="bf16" if name == "openvino-bf16" else "f32")


def adapt_backend(backend: str, adapt_bn: bool, onnx: Path | None = None) -> str:
    """The backend to run: BatchNorm adaptation needs PyTorch (exported graphs fold BatchNorm), so
    ``auto`` becomes ``torch`` with it and a graph backend the user named is refused."""
    check_backend(backend, onnx)
    if not adapt_bn:
        return backend
    if backend not in ("auto", "torch") or onnx is not None:
        raise MitotypeError(f"{{adapt_bn}} needs the torch backend (exported graphs fold BatchNorm); got {{backend}} {backend}",
                            options=("adapt_bn", "backend"))
    return "torch"


def load_scorer(
    model_path: Path, *, device: str = "auto", threshold: float | None = None, backend: str = "auto", onnx: Path | None = None,
    adapt_bn: bool = False, task: str = "classify", option: str = "model",
) -> tuple[Ensemble, Backend]:
    """The ensemble at ``model_path`` and what scores with it, the one way predict, points and
    evaluate load a model: options are checked before any weights load, and a graph backend runs
    on the CPU (``auto`` device). A model of another ``task`` is refused naming ``option``."""
    backend = adapt_backend(backend, adapt_bn, onnx)
    if backend in GRAPH_BACKENDS and device == "auto":
        device = "cpu"
    ensemble = Ensemble.load(model_path, device=device, threshold=threshold).require_task(task, option)
    return ensemble, make_backend(backend, ensemble, onnx_path=onnx)
