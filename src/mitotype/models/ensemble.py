"""One ``Ensemble`` scores patches: every path that turns uint8 patches into ``p_atypical`` (predict
over folders, points and slides, evaluate, explain, cv's held-out folds, benchmark, export) goes
through it, so there is one place to make fast and one place to test.

An ensemble is one or more models (the fold models of a cv run, the bundle, or a network in
training) whose build specs agree (patch size, size policy, microns per pixel, views), the decision
threshold, and the PyTorch way of running them. It is also the reference implementation of the
small :class:`Backend` protocol that the exported-graph backends (ONNX Runtime, OpenVINO) of
:mod:`mitotype.inference.backends` implement: ``p_atypical(uint8 (B, H, W, 3) batch, tta) -> (B,)``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import torch

from mitotype.config import resolve_device
from mitotype.data.images import BatchSource
from mitotype.errors import MitotypeError
from mitotype.models.artifact import LoadedModel, load_ensemble
from mitotype.models.registry import MitotypeModel
from mitotype.transforms.augment import dihedral_view
from mitotype.transforms.batch import Transform, build_batch

INFERENCE_BATCH = 32  # patches per forward: activations stay in cache; 4x this was 2.0x slower (benchmarks/RESULTS.md)
TTA_VIEWS = 8  # the dihedral group: 4 rotations x (identity, horizontal flip)


class Backend(Protocol):
    """What scores a batch: an :class:`Ensemble` itself (PyTorch), or an exported graph of one."""

    name: str

    def p_atypical(self, batch_u8: torch.Tensor | np.ndarray, tta: bool = False) -> np.ndarray:
        """Mean p_atypical (float32, (B,)) over the members and, with ``tta``, the 8 dihedral views."""
        ...


@dataclass(frozen=True)
class Spec:
    """What every member of an ensemble must agree on to score the same batches."""

    patch_size: int
    size_policy: str
    mpp: float | None
    views: tuple[str, ...]
    task: str = "classify"

    @classmethod
    def of(cls, member: LoadedModel) -> "Spec":
        build = member.card["build"]
        return cls(member.patch_size, member.size_policy, member.mpp, tuple(sorted(build.get("views", {"image": {}}))),
                   build.get("task", "classify"))


def check_threshold(value: float, option: str = "threshold") -> float:
    """A decision threshold given by a user: a number strictly inside (0, 1), else one line naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value < 1:
        raise MitotypeError(f"{{{option}}} {value}: must be in (0, 1)", options=(option,))
    return float(value)


_ALLOCATOR_TUNED = False


def tune_allocator() -> bool:
    """Keep freed activation buffers in the process instead of handing them back to the kernel.

    glibc serves every block above its mmap threshold (at most 32 MiB by default) with a fresh
    ``mmap`` and unmaps it on ``free``; a 192 px lite0 batch makes such activations in every layer, so
    each forward re-faulted them page by page: the README's first command spent more time in the
    kernel than in the model (233 s sys vs 222 s user, 140 M minor faults). Raising the mmap and trim
    thresholds to 1 GiB lets the heap reuse those blocks (benchmarks/RESULTS.md, "Fast by default").
    A no-op outside glibc; returns whether the thresholds were set."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux"):
        return _ALLOCATOR_TUNED
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        _ALLOCATOR_TUNED = False
    return _ALLOCATOR_TUNED


@torch.no_grad()
def _mean_p(nets: Sequence[MitotypeModel], batch_u8: torch.Tensor, device: torch.device, *, tta: bool, amp: bool) -> torch.Tensor:
    """Mean p_atypical over ``nets`` and (with ``tta``) the 8 dihedral views, as float32 on the CPU."""
    views: list[Transform | None] = [partial(dihedral_view, k=k) for k in range(TTA_VIEWS)] if tta else [None]
    total = torch.zeros(batch_u8.shape[0], device=device)
    for view in views:
        batch = build_batch(batch_u8, device, transform=view, channels_last=True)
        for net in nets:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
                outputs = net(batch)
            total += net.p_atypical(outputs).float()
    return (total / (len(nets) * len(views))).cpu()


class Ensemble:
    """One or more models that score patches together: the mean of their ``p_atypical``.

    Build it with :meth:`load` (a model folder, a cv run's fold models, the bundle) or directly from
    networks (``Ensemble([net], device=...)``, as training does for its held-out rows). The threshold
    is the user's, else the mean of the members' stored (validation-chosen) thresholds, else 0.5.
    """

    name = "torch"

    def __init__(
        self, nets: Sequence[MitotypeModel], *, device: torch.device | str = "cpu", members: Sequence[LoadedModel] = (),
        threshold: float | None = None, amp: bool = False,
    ) -> None:
        if not nets:
            raise MitotypeError("no model to predict with")
        self.nets, self.members, self.amp = list(nets), list(members), amp
        self.device = _as_device(device)
        self.spec = _agreed_spec(self.members) if self.members else None
        stored = [m.threshold for m in self.members]
        self.threshold = check_threshold(threshold) if threshold is not None else float(np.mean(stored)) if stored else 0.5
        tune_allocator()

    @classmethod
    def load(cls, path: Path, *, device: torch.device | str = "cpu", threshold: float | None = None) -> "Ensemble":
        """The model or fold ensemble at ``path``; a bad threshold is refused before any weights load."""
        if threshold is not None:
            check_threshold(threshold)
        dev = _as_device(device)
        members = load_ensemble(Path(path), dev)
        return cls([m.model for m in members], device=dev, members=members, threshold=threshold)

    def __len__(self) -> int:
        return len(self.nets)

    @property
    def patch_size(self) -> int:
        return self._spec().patch_size

    @property
    def size_policy(self) -> str:
        return self._spec().size_policy

    @property
    def mpp(self) -> float | None:
        return self._spec().mpp

    @property
    def task(self) -> str:
        """classify (p_atypical of a figure) or detect (p of a mitosis at a candidate)."""
        return self._spec().task

    def require_task(self, task: str, where: str) -> "Ensemble":
        """Refuse, in one line naming the option, a detector where a classifier is wanted or the reverse."""
        if self.spec is not None and self.task != task:
            what = {"detect": "a detector (mitosis vs look-alike)", "classify": "a classifier (atypical vs normal)"}
            raise MitotypeError(f"{{{where}}} {self.paths[0]}: is {what[self.task]}; "
                                f"{what[task]} is needed here", options=(where,))
        return self

    @property
    def cards(self) -> list[dict[str, Any]]:
        return [m.card for m in self.members]

    @property
    def paths(self) -> list[Path]:
        return [m.path for m in self.members]

    def _spec(self) -> Spec:
        if self.spec is None:
            raise MitotypeError("this ensemble was built from networks without model cards: it has no patch size or resolution")
        return self.spec

    def p_atypical(self, batch_u8: torch.Tensor | np.ndarray, tta: bool = False) -> np.ndarray:
        """Mean p_atypical of the members for uint8 (B, H, W, 3) patches (float32, (B,))."""
        x = torch.from_numpy(np.ascontiguousarray(batch_u8)) if isinstance(batch_u8, np.ndarray) else batch_u8
        for net in self.nets:
            net.eval()
        return _mean_p(self.nets, x, self.device, tta=tta, amp=self.amp).numpy()

    def score_store(self, store: BatchSource, index: np.ndarray, *, batch_size: int = INFERENCE_BATCH, tta: bool = False) -> np.ndarray:
        """p_atypical for positions ``index`` of a decoded store (cv's held-out rows, validation)."""
        parts = [self.p_atypical(store.batch(index[s : s + batch_size]), tta) for s in range(0, len(index), batch_size)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    @torch.no_grad()
    def adapt_batchnorm(self, batches: Iterable[torch.Tensor | np.ndarray]) -> int:
        """Test-time adaptation without labels: re-estimate every BatchNorm layer's running mean and
        variance on ``batches`` of the user's own uint8 patches (a cumulative average over all of
        them), then score with those. Changes the members in place; returns the patches seen.

        It needs the PyTorch backend (exported graphs fold BatchNorm into the convolutions) and a
        pass over the patches before the scoring pass. Known to suffer from small batches and from
        a class prior far from the training one (benchmarks/shift_levers.py measures it)."""
        layers = [m for net in self.nets for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not layers:
            raise MitotypeError("adapt BatchNorm: the model has no BatchNorm layers")
        saved = [(m.momentum, m.training) for m in layers]
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts alike
            m.train()
        seen = 0
        try:
            for batch in batches:
                x = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
                inputs = build_batch(x, self.device, channels_last=True)
                for net in self.nets:
                    net(inputs)
                seen += len(x)
        finally:
            for m, (momentum, training) in zip(layers, saved):
                m.momentum = momentum
                m.train(training)
        if not seen:
            raise MitotypeError("adapt BatchNorm: no patches to adapt on")
        return seen

    def each(self) -> list["Ensemble"]:
        """Each member as an ensemble of one, at its own threshold (a fold model scored alone)."""
        if not self.members:
            return [Ensemble([net], device=self.device, amp=self.amp, threshold=self.threshold) for net in self.nets]
        return [Ensemble([m.model], device=self.device, members=[m], amp=self.amp) for m in self.members]

    def labels(self, p: np.ndarray) -> np.ndarray:
        """Boolean atypical calls at the ensemble's threshold."""
        return np.asarray(p) >= self.threshold


def _as_device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


def _agreed_spec(members: Sequence[LoadedModel]) -> Spec:
    """The one spec all members share, else one line naming the first field they disagree on."""
    specs = [Spec.of(m) for m in members]
    for field in ("task", "patch_size", "size_policy", "mpp", "views"):
        values = {getattr(s, field) for s in specs}
        if len(values) > 1:
            named = ", ".join(f"{m.path.name} {getattr(s, field)}" for m, s in zip(members, specs))
            raise MitotypeError(f"ensemble members disagree on {field.replace('_', ' ')}: {named}")
    return specs[0]
