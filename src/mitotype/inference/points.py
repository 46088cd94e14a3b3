"""Classify points over images and slides, streaming and resumable.

Points are taken image by image (each image or slide opened once, closed after its last point); a
small thread pool crops the next batches while the model runs on this one, so memory stays flat
for any number of points or slides. Each batch's probabilities are appended to ``NAME.partial.csv``
and flushed, so an interrupted run resumes from what it wrote (``resume=True``); the finished table
is then written atomically to ``NAME.csv`` with a per-image summary ``NAME.summary.csv``, and the
partial file removed. Labels come from the threshold at the end, so a resumed run can change it.
"""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from mitotype.data.images import decode_threads
from mitotype.data.manifest import LABEL_NAMES, UNLABELLED
from mitotype.data.points import PointTable, check_bounds, read_points
from mitotype.data.slides import MPP_TOLERANCE, Source, is_slide, model_mpp, open_source
from mitotype.errors import MitotypeError
from mitotype.inference.runtime import check_backend, load_scorer
from mitotype.models.ensemble import INFERENCE_BATCH, check_threshold

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
PARTIAL_HEADER = "point,p_atypical"


def partial_csv_path(out_csv: str | Path) -> Path:
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}.partial.csv")


def summary_csv_path(out_csv: str | Path) -> Path:
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}.summary.csv")


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n: stays inside [0, 1] and is sound for small n or
    k near 0 or n, where the normal (Wald) interval is not. (nan, nan) when n is 0."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else low), (1.0 if k == n else high)  # exact at the ends, not 1e-17 off


class _OpenSources:
    """Each image opened on its first point and closed after its last: points come grouped by image,
    so only the few images in flight are open."""

    def __init__(self, points: PointTable, positions: np.ndarray, opener: Callable[[str], Source]) -> None:
        paths = points.table["image_path"].to_numpy()[positions]
        names, counts = np.unique(paths, return_counts=True)
        self.remaining = dict(zip(names.tolist(), counts.tolist()))
        self.points, self.opener = points, opener
        self.rows = points.table.groupby("image_path", sort=False).indices
        self.lock = threading.Lock()
        self.entries: dict[str, tuple[threading.Lock, list]] = {}

    def crop(self, path: str, x: float, y: float, patch_size: int, mpp: float) -> np.ndarray:
        with self.lock:
            lock, slot = self.entries.setdefault(path, (threading.Lock(), [None]))
        with lock:
            if slot[0] is None:
                slot[0] = self._open(path, mpp)
            source = slot[0]
        try:
            return source.crop(x, y, patch_size, mpp)  # reads run in parallel: tiffslide keeps a zarr view per thread
        finally:
            with lock:
                self.remaining[path] -= 1
                last = self.remaining[path] == 0
            if last:  # every crop of this image has finished
                source.close()
                with self.lock:
                    del self.entries[path]

    def _open(self, path: str, mpp: float) -> Source:
        source = self.opener(path)
        if min(source.level_mpps) > mpp * (1 + MPP_TOLERANCE):
            warnings.warn(f"{path}: {min(source.level_mpps):g} um/px is coarser than the model's {mpp:g}; its patches are enlarged",
                          stacklevel=3)
        if is_slide(path):  # a plain image's points were checked from its header before the run
            try:
                check_bounds(self.points, self.rows[path], source.dimensions)
            except MitotypeError:
                source.close()
                raise
        return source

    def close(self) -> None:
        with self.lock:
            for _, slot in self.entries.values():
                if slot[0] is not None:
                    slot[0].close()
            self.entries.clear()


def iter_point_batches(
    points: PointTable, positions: np.ndarray, batch_size: int, patch_size: int, *, model_mpp: float,
    image_mpp: float | None = None, slide_mpp: float | None = None, prefetch: int = 2, threads: int | None = None,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Stream (point positions, uint8 batch) for ``positions`` in the order given (group them by image
    so each is opened once): a thread pool crops the next ``prefetch`` batches while the caller runs
    the model. Plain images are taken to be at ``image_mpp`` (default: the model's)."""
    table = points.table
    paths, xs, ys = table["image_path"].to_numpy(), table["x"].to_numpy(), table["y"].to_numpy()
    sources = _OpenSources(points, positions, lambda p: open_source(p, image_mpp=image_mpp or model_mpp, slide_mpp=slide_mpp))
    chunks = (positions[s:s + batch_size] for s in range(0, len(positions), batch_size))

    def crop(i: int) -> np.ndarray:
        return sources.crop(paths[i], xs[i], ys[i], patch_size, model_mpp)

    try:
        with ThreadPoolExecutor(threads or decode_threads(streaming=True)) as pool:
            pending = deque((c, [pool.submit(crop, i) for i in c]) for c in islice(chunks, prefetch))
            while pending:
                index, futures = pending.popleft()
                nxt = next(chunks, None)
                if nxt is not None:
                    pending.append((nxt, [pool.submit(crop, i) for i in nxt]))
                yield index, torch.from_numpy(np.stack([f.result() for f in futures]))
    finally:
        sources.close()


def grouped_order(points: PointTable) -> np.ndarray:
    """Point positions grouped by image (images in order of first appearance, points in input order)."""
    codes = pd.factorize(points.table["image_path"])[0]
    return np.argsort(codes, kind="stable")


def _run_key(points: PointTable, model_path: Path, tta: bool, patch_size: int, mpps: tuple) -> str:
    """What a partial file's probabilities depend on; a resumed run must match it."""
    digest = hashlib.sha1(f"{Path(model_path).resolve()}|{tta}|{patch_size}|{mpps}\n".encode())
    t = points.table
    for path, x, y in zip(t["image_path"], t["x"], t["y"]):
        digest.update(f"{path}|{x!r}|{y!r}\n".encode())
    return digest.hexdigest()[:20]


def _read_partial(path: Path, key: str, n: int) -> dict[int, float]:
    """Finished points of an interrupted run; a last line cut mid-write is dropped (and truncated away)."""
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    lines = complete.decode().splitlines()
    if len(lines) < 2 or lines[0] != f"#key={key}" or lines[1] != PARTIAL_HEADER:
        raise MitotypeError(f"{path}: written for other points, model or options; delete it or run without {{resume}}",
                            options=("resume",))
    done = {}
    for number, line in enumerate(lines[2:], 3):
        try:
            point, p = line.split(",")
            done[int(point)] = float(p)
        except ValueError:
            point = None
        if point is None or not 0 <= int(point) < n:
            raise MitotypeError(f"{path} line {number}: '{line}' is not a finished point; delete the file or run without {{resume}}",
                                options=("resume",))
    if len(complete) < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(len(complete))
    return done


def point_table(points: PointTable, p: np.ndarray, threshold: float) -> pd.DataFrame:
    """``image, x, y, p_atypical, label`` (predicted class name), then every other input column; a
    known true label is kept as ``true_label``."""
    df = points.table.rename(columns={"label": "true_label"})
    if (df["true_label"] == UNLABELLED).all():
        df = df.drop(columns=["true_label"])
    out = df[["image", "x", "y"]].copy()
    out["p_atypical"] = p
    out["label"] = np.where(p >= threshold, LABEL_NAMES[1], LABEL_NAMES[0])
    return pd.concat([out, df.drop(columns=["image", "x", "y"])], axis=1)


def summary_table(points: PointTable, table: pd.DataFrame) -> pd.DataFrame:
    """Per image or slide: mitotic count (points classified), atypical count, atypical fraction
    with its 95% Wilson interval. Images the input lists without points count 0."""
    counts = table.groupby("image_path", sort=False)["label"].agg(n="size", k=lambda s: int((s == LABEL_NAMES[1]).sum()))
    rows = []
    listed = dict.fromkeys(points.images) | dict.fromkeys(zip(table["image"], table["image_path"]))
    for name, path in listed:
        n, k = (int(counts.at[path, "n"]), int(counts.at[path, "k"])) if path in counts.index else (0, 0)
        low, high = wilson_interval(k, n)
        rows.append({"image": name, "image_path": path, "mitotic_count": n, "atypical_count": k,
                     "atypical_fraction": k / n if n else math.nan, "ci95_low": low, "ci95_high": high})
    columns = ["image", "image_path", "mitotic_count", "atypical_count", "atypical_fraction", "ci95_low", "ci95_high"]
    return pd.DataFrame(rows, columns=columns)


def predict_points(
    model_path: Path, points_path: Path, out_csv: Path, *, images: Path | None = None, tta: bool = False,
    threshold: float | None = None, resume: bool = False, mpp: float | None = None, slide_mpp: float | None = None,
    summary_csv: Path | None = None, skip_missing: bool = False, bbox_format: str = "auto", device: str = "auto",
    backend: str = "auto", batch_size: int = INFERENCE_BATCH, progress: Callable[[int], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the points, classify a patch centred on each at the model's resolution, and write the
    point table and the per-image summary atomically (returned too). Outputs and options are checked
    before any work; probabilities go to :func:`partial_csv_path` as they come, for ``resume``."""
    from mitotype._io import check_output_file, write_csv

    summary_given = summary_csv is not None
    summary_csv = Path(summary_csv) if summary_csv is not None else summary_csv_path(out_csv)
    partial = partial_csv_path(out_csv)
    check_output_file(out_csv, "out_csv")
    check_output_file(summary_csv, "summary_csv" if summary_given else "out_csv")
    check_output_file(partial, "out_csv")
    for name, value in (("mpp", mpp), ("slide_mpp", slide_mpp)):
        if value is not None and not (math.isfinite(value) and 0 < value < 100):
            raise MitotypeError(f"{{{name}}} {value}: expected microns per pixel in (0, 100)", options=(name,))
    if threshold is not None:
        check_threshold(threshold)
    check_backend(backend)  # before the points are read
    points = read_points(points_path, images, skip_missing=skip_missing, bbox_format=bbox_format)
    if points.table.empty:
        raise MitotypeError(f"{points_path}: no points found")
    ensemble, scorer = load_scorer(model_path, device=device, threshold=threshold, backend=backend)
    t = ensemble.threshold
    patch_size, target = ensemble.patch_size, model_mpp([ensemble.mpp])

    n = len(points.table)
    key = _run_key(points, model_path, tta, patch_size, (target, mpp, slide_mpp))
    done: dict[int, float] = {}
    if resume and partial.is_file():
        done = _read_partial(partial, key, n)
    else:
        if partial.is_file():
            warnings.warn(f"{partial}: discarded what an unfinished run wrote (the resume option continues such a run)", stacklevel=2)
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(f"#key={key}\n{PARTIAL_HEADER}\n")
    order = grouped_order(points)
    todo = order[~np.isin(order, np.fromiter(done, dtype=np.int64, count=len(done)))]
    with open(partial, "a") as fh:
        batches = iter_point_batches(points, todo, batch_size, patch_size, model_mpp=target, image_mpp=mpp, slide_mpp=slide_mpp)
        for index, batch in batches:
            p = scorer.p_atypical(batch, tta)
            fh.write("".join(f"{i},{float(v)!r}\n" for i, v in zip(index.tolist(), p)))
            fh.flush()
            done.update(zip(index.tolist(), p.tolist()))
            if progress:
                progress(len(index))
    p = np.array([done[i] for i in range(n)], dtype=np.float64)
    table = point_table(points, p, t)
    summary = summary_table(points, table)
    write_csv(summary_csv, summary)
    write_csv(out_csv, table)
    partial.unlink(missing_ok=True)
    return table, summary
