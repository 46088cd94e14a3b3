"""Frozen-backbone features, computed once per image and cached on disk (the ``fm-probe`` recipe).

A linear probe on a 1 GB foundation model spends nearly all its time in the backbone; with the
backbone frozen and nothing augmenting the images, each image's features are the same in every
epoch and every fold. :func:`feature_view` computes them once into ``features-KEY.npy`` and hands
the loop a store whose batches are those features: ``build_batch`` turns them into
``{"features": ...}`` and the model skips its backbone. The key hashes the backbone, its weight
source, pooling and preprocessing (``model.feature_identity()``) and every image's pixels, so a
changed image, dataset or backbone never reuses stale features. Prediction on new images still
runs the whole model on pixels.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mitotype._io import atomic_path
from mitotype.config import Config
from mitotype.data.images import ImageStore
from mitotype.errors import MitotypeError
from mitotype.models.registry import MitotypeModel
from mitotype.progress import console
from mitotype.transforms.batch import build_batch

_HASH_ROWS = 1024  # images hashed per read: flat memory over a memory-mapped store


@dataclass
class FeatureStore:
    """Cached features with :class:`ImageStore`'s interface; ``rows[i]`` is manifest row i's row in ``array``."""

    array: np.ndarray  # (N, D) float32, memory-mapped
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: np.ndarray | Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array[self.rows[np.asarray(index)]], dtype=np.float32))

    def subset(self, index: np.ndarray) -> FeatureStore:
        return FeatureStore(self.array, self.rows[np.asarray(index)])


def feature_view(cfg: Config, model: MitotypeModel, store: ImageStore, *, cache_dir: Path, device: torch.device) -> ImageStore | FeatureStore:
    """The store the loop reads: cached features where the model's backbone is frozen and augmentation is
    off, else ``store`` itself. The cache lives in ``data.cache_dir`` when set, else in ``cache_dir``."""
    if not model.frozen_backbone:
        return store
    if not cfg.augment.is_identity:
        warnings.warn("a frozen backbone with augmentation on: features are recomputed every step; turn augment off to cache them", stacklevel=2)
        return store
    amp = cfg.train.amp and device.type == "cuda"
    directory = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cache_dir)
    path = directory / f"features-{cache_key(model, store, amp=amp)}.npy"
    if not path.is_file():
        features = compute_features(model, store, device, batch_size=cfg.train.eval_batch_size, amp=amp)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a crash never leaves half a cache
            np.save(fh, features, allow_pickle=False)
        console.log(f"cached features of {len(features)} patches in {path}")
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.ndim != 2 or len(array) != len(store):
        raise MitotypeError(f"{path}: feature cache holds {array.shape}, expected {len(store)} rows; delete it")
    return FeatureStore(array, np.arange(len(store)))


def cache_key(model: nn.Module, store: ImageStore, *, amp: bool) -> str:
    """Hash of the model's feature identity and of every image's pixels, in manifest order."""
    # feature_identity: a method of frozen-backbone models (FoundationModel); torch types module attributes Tensor | Module
    identity = model.feature_identity()  # type: ignore[operator]
    digest = hashlib.sha256(json.dumps({**identity, "amp": amp}, sort_keys=True, default=str).encode())
    digest.update(f"{len(store)}|{store.array.shape[1:]}".encode())
    for start in range(0, len(store), _HASH_ROWS):
        digest.update(np.ascontiguousarray(store.array[store.rows[start : start + _HASH_ROWS]]).tobytes())
    return digest.hexdigest()[:24]


@torch.no_grad()
def compute_features(model: MitotypeModel, store: ImageStore, device: torch.device, *, batch_size: int, amp: bool) -> np.ndarray:
    """(N, D) float32 features (``model.embed``) of every row of ``store``, in order."""
    was_training = model.training
    model.eval()
    out: np.ndarray | None = None
    for start in range(0, len(store), batch_size):
        rows = np.arange(start, min(start + batch_size, len(store)))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            f = model.embed(build_batch(store.batch(rows), device, channels_last=True)).float().cpu().numpy()
        if out is None:
            out = np.empty((len(store), f.shape[1]), dtype=np.float32)
        out[rows] = f
    model.train(was_training)
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)
