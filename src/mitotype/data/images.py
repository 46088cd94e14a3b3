"""Decode every patch once into a uint8 array (N, H, W, 3); epochs then gather batches from it.

Decoding PNGs dominates a small CNN's epoch on CPU if done per epoch, so the training loop never
touches image files. With a cache folder, the array is a memory-mapped ``.npy`` keyed by the
files' paths, sizes and modification times, so a second run (or the next fold) starts at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mitotype._io import atomic_path, write_json
from mitotype.errors import MitotypeError

_THREADS = max(1, min(8, os.cpu_count() or 1))
# While streaming, the model's own threads use the cores; decoding (under a millisecond a patch)
# needs few threads beside them, and more only fight the model for the same cores.
_STREAM_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))


class BadImage(MitotypeError):
    """An image that cannot be used as an 8-bit RGB patch; the message names the file."""


def decode_patch(path: str | Path, patch_size: int, size_policy: str = "error") -> np.ndarray:
    """Read one image as (patch_size, patch_size, 3) uint8 RGB, or raise :class:`BadImage`."""
    try:
        with Image.open(path) as im:
            rawmodes = [str(tile.args) for tile in im.tile]  # before load(): PIL reads 16-bit RGB as 8-bit
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F") or any(";16" in r for r in rawmodes):
                raise BadImage(f"{path}: {mode} image (16/32-bit); expected 8-bit RGB")
            if mode in ("L", "LA", "1"):
                raise BadImage(f"{path}: greyscale image ({mode}); expected 8-bit RGB H&E")
            if mode == "RGBA":
                alpha = np.asarray(im.getchannel("A"))
                if alpha.min() < 255:
                    raise BadImage(f"{path}: RGBA image with transparent pixels; expected 8-bit RGB")
            if mode == "P" and "transparency" in im.info:
                raise BadImage(f"{path}: palette image with transparency; expected 8-bit RGB")
            if mode not in ("RGB", "RGBA", "P"):
                raise BadImage(f"{path}: {mode} image; expected 8-bit RGB")
            rgb = im.convert("RGB")
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(f"{path}: cannot decode image ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if rgb.size != (patch_size, patch_size):
        rgb = _fit(rgb, patch_size, size_policy, path)
    return np.asarray(rgb, dtype=np.uint8)


def _fit(im: Image.Image, size: int, policy: str, path: str | Path) -> Image.Image:
    w, h = im.size
    if policy == "resize":
        return im.resize((size, size), Image.BILINEAR)
    if policy == "center-crop" and w >= size and h >= size:
        left, top = (w - size) // 2, (h - size) // 2
        return im.crop((left, top, left + size, top + size))
    hint = "set data.patch_size or data.size_policy=center-crop|resize; for predict/evaluate --size-policy"
    raise BadImage(f"{path}: image is {w}x{h} px, expected {size}x{size} ({hint})")


@dataclass
class ImageStore:
    """Decoded patches; ``rows[i]`` is where manifest row i lives in ``array``."""

    array: np.ndarray  # (M, H, W, 3) uint8, in memory or memory-mapped
    rows: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: np.ndarray | Sequence[int]) -> torch.Tensor:
        """Gather manifest rows as a (B, H, W, 3) uint8 tensor (a copy, safe to pin or move)."""
        return torch.from_numpy(np.ascontiguousarray(self.array[self.rows[np.asarray(index)]]))

    def subset(self, index: np.ndarray) -> "ImageStore":
        return ImageStore(self.array, self.rows[np.asarray(index)])


def find_bad_images(paths: Sequence[str], patch_size: int, size_policy: str = "error") -> list[str]:
    """Try every image, keep only the problems: memory stays flat however many there are."""

    def check(path: str) -> str | None:
        try:
            decode_patch(path, patch_size, size_policy)
            return None
        except BadImage as err:
            return str(err)

    with ThreadPoolExecutor(_THREADS) as pool:
        return [problem for problem in pool.map(check, paths) if problem]


def decode_all(
    paths: Sequence[str],
    patch_size: int,
    size_policy: str = "error",
    on_bad_image: str = "error",
    cache_dir: str | Path | None = None,
) -> tuple[ImageStore, list[str]]:
    """Decode ``paths`` once (threads overlap PNG decoding), optionally into a memory-mapped cache.

    Returns the store (rows of skipped images point at nothing usable and are reported) and the
    list of problems; with ``on_bad_image="error"`` the first bad image raises instead.
    """
    paths = [str(p) for p in paths]
    if cache_dir is None:
        array = np.empty((len(paths), patch_size, patch_size, 3), dtype=np.uint8)
        ok, bad = _decode_into(array, paths, patch_size, size_policy, on_bad_image)
    else:
        out_path = _cache_path(paths, patch_size, size_policy, Path(cache_dir))
        if not (out_path.is_file() and out_path.with_suffix(".json").is_file()):
            with atomic_path(out_path) as tmp:  # a crash never leaves a half-written cache behind
                target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), patch_size, patch_size, 3))
                ok, bad = _decode_into(target, paths, patch_size, size_policy, on_bad_image)
                target.flush()
                del target
            write_json(out_path.with_suffix(".json"), {"paths": len(paths), "bad": bad, "ok": ok.tolist()})
        meta = json.loads(out_path.with_suffix(".json").read_text())
        array, ok, bad = np.load(out_path, mmap_mode="r"), np.asarray(meta["ok"], dtype=bool), list(meta["bad"])
        if bad and on_bad_image == "error":  # a cache made with --skip-bad must not hide them now
            raise BadImage(bad[0] + " (pass --skip-bad to skip unusable images)")
    if bad:
        warnings.warn(f"skipped {len(bad)} unusable image(s): " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""), stacklevel=2)
    return ImageStore(array, np.flatnonzero(ok)), bad


def _decode_into(
    array: np.ndarray, paths: Sequence[str], patch_size: int, size_policy: str, on_bad_image: str
) -> tuple[np.ndarray, list[str]]:
    ok = np.ones(len(paths), dtype=bool)
    bad: list[str] = []

    def work(i: int) -> str | None:
        try:
            array[i] = decode_patch(paths[i], patch_size, size_policy)
            return None
        except BadImage as err:
            return str(err)

    with ThreadPoolExecutor(_THREADS) as pool:
        for i, problem in enumerate(pool.map(work, range(len(paths)))):
            if problem:
                if on_bad_image == "error":
                    raise BadImage(problem + " (pass --skip-bad to skip unusable images)")
                bad.append(problem)
                ok[i] = False
    return ok, bad


def _cache_key(paths: Sequence[str], patch_size: int, size_policy: str) -> str:
    digest = hashlib.sha1(f"{patch_size}|{size_policy}".encode())
    for p in paths:
        st = os.stat(p) if os.path.exists(p) else None
        digest.update(f"{p}|{st.st_size if st else -1}|{st.st_mtime_ns if st else -1}\n".encode())
    return digest.hexdigest()[:20]


def _cache_path(paths: Sequence[str], patch_size: int, size_policy: str, cache_dir: Path) -> Path:
    return cache_dir / f"patches-{_cache_key(paths, patch_size, size_policy)}.npy"


def iter_batches(
    paths: Sequence[str], batch_size: int, patch_size: int, size_policy: str = "error", prefetch: int = 2, on_bad_image: str = "error"
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Stream (positions, uint8 batch) over any number of images with flat memory: a thread pool
    decodes the next ``prefetch`` batches while the caller runs the model on this one. With
    ``on_bad_image="skip"`` unusable images are left out of their batch (and warned about)."""
    chunks = (np.arange(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size))
    bad: list[str] = []

    def decode(i: int) -> np.ndarray | None:
        try:
            return decode_patch(paths[i], patch_size, size_policy)
        except BadImage as err:
            if on_bad_image == "error":
                raise BadImage(f"{err} (pass --skip-bad to skip unusable images)") from None
            bad.append(str(err))
            return None

    with ThreadPoolExecutor(int(os.environ.get("MITOTYPE_DECODE_THREADS", _STREAM_THREADS))) as pool:

        def submit(index: np.ndarray) -> tuple[np.ndarray, list]:
            return index, [pool.submit(decode, i) for i in index]

        pending = deque(submit(c) for c in islice(chunks, prefetch))
        while pending:
            index, futures = pending.popleft()
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append(submit(nxt))
            arrays = [f.result() for f in futures]
            keep = np.array([a is not None for a in arrays], dtype=bool)
            if keep.any():
                yield index[keep], torch.from_numpy(np.stack([a for a in arrays if a is not None]))
    if bad:
        warnings.warn(f"skipped {len(bad)} unusable image(s): " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""), stacklevel=2)
