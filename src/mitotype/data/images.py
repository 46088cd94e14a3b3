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
from typing import TYPE_CHECKING, Iterator, NoReturn, Protocol, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mitotype._io import atomic_path, write_json
from mitotype.errors import MitotypeError

if TYPE_CHECKING:
    import pandas as pd

MAX_AREA_FACTOR = 64  # images over 64x the patch area (8x its side) are refused before decoding
_SKIP_HINT = " (use {skip_bad} to skip unusable images)"


class BadImage(MitotypeError):
    """An image that cannot be used as an 8-bit RGB patch; the message names the file."""


def decode_threads(streaming: bool = False) -> int:
    """Threads that decode images: ``MITOTYPE_DECODE_THREADS`` if set, else from the CPU count now.

    Decoding alone uses up to 8 cores; while streaming, the model's own threads use the cores, and
    decoding (under a millisecond a patch) needs few beside them (at most 4, half the cores).
    """
    text = os.environ.get("MITOTYPE_DECODE_THREADS", "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise MitotypeError(f"MITOTYPE_DECODE_THREADS='{text}': expected a positive integer")
        return int(text)
    cores = os.cpu_count() or 2
    return max(1, min(4, cores // 2)) if streaming else max(1, min(8, cores))


def _bad_image_error(err: MitotypeError) -> BadImage:
    """A bad image met with ``on_bad_image="error"``: its message plus how to skip such images."""
    return BadImage(err.message + _SKIP_HINT, options=(*err.options, "skip_bad"))


def _warn_skipped(bad: Sequence[str], note: str = "") -> None:
    where = f"; full list in {note}" if note else ""
    warnings.warn(f"skipped {len(bad)} unusable image(s): " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") + where, stacklevel=3)


def skipped_table(problems: Sequence[str], paths: Sequence[str]) -> "pd.DataFrame":
    """(path, reason) of skipped images, from their problems (each starts with its path) in order."""
    import pandas as pd

    reasons = [text[len(str(p)) + 2:] if text.startswith(f"{p}: ") else text for p, text in zip(paths, problems)]
    return pd.DataFrame({"path": [str(p) for p in paths], "reason": reasons})


def decode_patch(path: str | Path, patch_size: int, size_policy: str = "error") -> np.ndarray:
    """Read one image as (patch_size, patch_size, 3) uint8 RGB, or raise :class:`BadImage`.

    The size is checked from the header before any pixel is decoded: an image ``size_policy`` cannot
    use, or one over :data:`MAX_AREA_FACTOR` times the patch area (a whole tile or slide region given
    as a patch: 2 GB decoded for one 12000 px PNG), is refused without decoding it.
    """
    try:
        with Image.open(path) as im:
            _check_header_size(im.size, patch_size, size_policy, path)
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


def _check_header_size(wh: tuple[int, int], size: int, policy: str, path: str | Path) -> None:
    w, h = wh
    if (w, h) == (size, size):
        return
    if w * h > MAX_AREA_FACTOR * size * size:
        raise BadImage(f"{path}: image is {w}x{h} px, over {MAX_AREA_FACTOR}x the {size}x{size} patch area; crop patches from it first")
    if policy == "resize" or (policy == "center-crop" and w >= size and h >= size):
        return
    _size_error(w, h, size, path)


def _size_error(w: int, h: int, size: int, path: str | Path) -> NoReturn:
    hint = "set data.patch_size or data.size_policy=center-crop|resize, or {size_policy} for predict/evaluate"
    raise BadImage(f"{path}: image is {w}x{h} px, expected {size}x{size} ({hint})", options=("size_policy",))


def _fit(im: Image.Image, size: int, policy: str, path: str | Path) -> Image.Image:
    w, h = im.size
    if policy == "resize":
        return im.resize((size, size), Image.Resampling.BILINEAR)
    if policy == "center-crop" and w >= size and h >= size:
        left, top = (w - size) // 2, (h - size) // 2
        return im.crop((left, top, left + size, top + size))
    _size_error(w, h, size, path)


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


class BatchSource(Protocol):
    """What training and scoring gather manifest rows from: an :class:`ImageStore`, or the loop's
    cached features (training/features.py ``FeatureStore``)."""

    def __len__(self) -> int: ...

    def batch(self, index: np.ndarray | Sequence[int]) -> torch.Tensor: ...


def find_bad_images(paths: Sequence[str], patch_size: int, size_policy: str = "error", *, threads: int | None = None) -> list[str]:
    """Try every image, keep only the problems: memory stays flat however many there are."""

    def check(path: str) -> str | None:
        try:
            decode_patch(path, patch_size, size_policy)
            return None
        except BadImage as err:
            return str(err)

    with ThreadPoolExecutor(threads or decode_threads()) as pool:
        return [problem for problem in pool.map(check, paths) if problem]


def decode_all(
    paths: Sequence[str],
    patch_size: int,
    size_policy: str = "error",
    *,
    on_bad_image: str = "error",
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    skipped_note: str = "",
) -> tuple[ImageStore, list[str]]:
    """Decode ``paths`` once (threads overlap PNG decoding), optionally into a memory-mapped cache.

    Returns the store (rows of skipped images point at nothing usable and are reported) and the
    list of problems, in the order of ``paths``; with ``on_bad_image="error"`` the first bad image
    raises instead. ``skipped_note`` tells the warning where the caller writes the full list.
    """
    threads = threads or decode_threads()
    paths = [str(p) for p in paths]
    if cache_dir is None:
        array = np.empty((len(paths), patch_size, patch_size, 3), dtype=np.uint8)
        ok, bad = _decode_into(array, paths, patch_size, size_policy, on_bad_image, threads)
    else:
        out_path = _cache_path(paths, patch_size, size_policy, Path(cache_dir))
        if not (out_path.is_file() and out_path.with_suffix(".json").is_file()):
            with atomic_path(out_path) as tmp:  # a crash never leaves a half-written cache behind
                target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), patch_size, patch_size, 3))
                ok, bad = _decode_into(target, paths, patch_size, size_policy, on_bad_image, threads)
                target.flush()
                del target
            write_json(out_path.with_suffix(".json"), {"paths": len(paths), "bad": bad, "ok": ok.tolist()})
        meta = json.loads(out_path.with_suffix(".json").read_text())
        array, ok, bad = np.load(out_path, mmap_mode="r"), np.asarray(meta["ok"], dtype=bool), list(meta["bad"])
        if bad and on_bad_image == "error":  # a cache made while skipping must not hide them now
            raise BadImage(bad[0] + _SKIP_HINT, options=("skip_bad",))
    if bad:
        _warn_skipped(bad, skipped_note)
    return ImageStore(array, np.flatnonzero(ok)), bad


def _decode_into(
    array: np.ndarray, paths: Sequence[str], patch_size: int, size_policy: str, on_bad_image: str, threads: int
) -> tuple[np.ndarray, list[str]]:
    ok = np.ones(len(paths), dtype=bool)
    bad: list[str] = []

    def work(i: int) -> BadImage | None:
        try:
            array[i] = decode_patch(paths[i], patch_size, size_policy)
            return None
        except BadImage as err:
            return err

    with ThreadPoolExecutor(threads) as pool:
        for i, problem in enumerate(pool.map(work, range(len(paths)))):
            if problem:
                if on_bad_image == "error":
                    raise _bad_image_error(problem)
                bad.append(str(problem))
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
    paths: Sequence[str], batch_size: int, patch_size: int, size_policy: str = "error", *, prefetch: int = 2, on_bad_image: str = "error",
    threads: int | None = None, skipped: list[tuple[str, str]] | None = None, skipped_note: str = "",
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Stream (positions, uint8 batch) over any number of images with flat memory: a thread pool
    decodes the next ``prefetch`` batches while the caller runs the model on this one. With
    ``on_bad_image="skip"`` unusable images are left out of their batch, warned about (the warning
    says ``skipped_note``: where the caller keeps the full list) and appended to ``skipped`` as
    (path, reason)."""
    chunks = (np.arange(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size))
    bad: list[tuple[int, str]] = []

    def decode(i: int) -> np.ndarray | None:
        try:
            return decode_patch(paths[i], patch_size, size_policy)
        except BadImage as err:
            if on_bad_image == "error":
                raise _bad_image_error(err) from None
            bad.append((i, str(err)))
            return None

    with ThreadPoolExecutor(threads or decode_threads(streaming=True)) as pool:

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
        bad.sort()
        if skipped is not None:
            table = skipped_table([text for _, text in bad], [paths[i] for i, _ in bad])
            skipped.extend(zip(table["path"], table["reason"]))
        _warn_skipped([text for _, text in bad], skipped_note)
