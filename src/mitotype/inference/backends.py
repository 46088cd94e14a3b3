"""The exported-graph backends of the :class:`~mitotype.models.ensemble.Backend` protocol.

The streaming readers (folders, manifests, points, slides) hand every backend the same uint8
(B, H, W, 3) batches, so the choice of PyTorch, ONNX Runtime or OpenVINO changes nothing but speed.
The :class:`~mitotype.models.ensemble.Ensemble` is the PyTorch backend; the ONNX Runtime and
OpenVINO backends here run an exported graph (:mod:`mitotype.inference.graph`) that holds the same
preprocessing and fold mean, and do test-time augmentation outside the graph with the same 8
dihedral views. Which backend runs is chosen in :mod:`mitotype.inference.runtime`.
"""

from __future__ import annotations

from pathlib import Path
import importlib.util

import numpy as np
import torch

from mitotype.errors import MitotypeError
from mitotype.models.ensemble import TTA_VIEWS
from mitotype.transforms.augment import dihedral_view


def dihedral_view_nhwc(batch: np.ndarray, k: int) -> np.ndarray:
    """View ``k`` of (B, H, W, C) patches, the same as ``dihedral_view`` makes of (B, C, H, W)
    ones: rotation by ``k % 4`` x 90 degrees of the horizontally flipped batch when ``k >= 4``."""
    channels_first = torch.from_numpy(np.ascontiguousarray(batch)).movedim(-1, 1)
    return dihedral_view(channels_first, k).movedim(1, -1).contiguous().numpy()


class _GraphBackend:
    """Test-time augmentation around a graph that maps uint8 (B, H, W, 3) to p_atypical (B,)."""

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def p_atypical(self, batch_u8: torch.Tensor | np.ndarray, tta: bool = False) -> np.ndarray:
        x = batch_u8.numpy() if isinstance(batch_u8, torch.Tensor) else np.asarray(batch_u8)
        views = range(TTA_VIEWS) if tta else (0,)
        total = np.zeros(x.shape[0], dtype=np.float64)
        for k in views:
            view = dihedral_view_nhwc(x, k) if k else np.ascontiguousarray(x)
            total += np.asarray(self._run(view), dtype=np.float64).reshape(-1)
        return (total / len(views)).astype(np.float32)


class OnnxBackend(_GraphBackend):
    """An exported graph (uint8 (B, H, W, 3) -> p_atypical (B,)) in an ONNX Runtime session on the
    CPU, with as many intra-op threads as torch uses, so both backends compete for the same cores."""

    name = "onnxruntime"

    def __init__(self, path: Path, *, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle intra-op workers would spin and take the core the decoding threads need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise MitotypeError(f"{path}: not a usable ONNX file ({str(err).splitlines()[0][:160]})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)":
            raise MitotypeError(f"{path}: expected one uint8 image input (a mitotype export), got {[i.type for i in inputs]}")
        self.input_name, self.path = inputs[0].name, Path(path)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]


class OpenVinoBackend(_GraphBackend):
    """The same exported ONNX graph compiled by OpenVINO for the CPU. Its CPU kernels ran this lite0
    graph faster than ONNX Runtime's (benchmarks/RESULTS.md). ``precision`` f32 is asked for
    explicitly (on CPUs with AMX OpenVINO would otherwise pick bf16); ``bf16`` (backend
    ``openvino-bf16``) runs natively on CPUs with AVX-512 BF16 or AMX, where it changed the crop64
    fold models' out-of-fold balanced accuracy by +0.001 (benchmarks/precision_oof.py); elsewhere
    OpenVINO runs f32."""

    def __init__(self, path: Path, *, threads: int | None = None, precision: str = "f32"):
        self.name = "openvino" if precision == "f32" else f"openvino-{precision}"
        try:
            import openvino as ov
        except ImportError:
            raise MitotypeError(f"{{backend}} {self.name} needs the openvino package: pip install 'mitotype[openvino]'",
                                options=("backend",)) from None
        config = {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "INFERENCE_PRECISION_HINT": precision,
                  "PERFORMANCE_HINT": "LATENCY"}
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as err:
            raise MitotypeError(f"{path}: not a usable ONNX file for OpenVINO ({str(err).strip().splitlines()[0][:160]})") from None
        inputs = self.compiled.inputs
        if len(inputs) != 1 or inputs[0].get_element_type().get_type_name() != "u8":
            raise MitotypeError(f"{path}: expected one uint8 image input (a mitotype export)")
        self.request, self.path = self.compiled.create_infer_request(), Path(path)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.request.infer([x])[0]


def openvino_available() -> bool:
    """Whether the optional openvino package is installed (the ``auto`` backend's first choice)."""
    return importlib.util.find_spec("openvino") is not None
