"""Find mitotic figures in images and slides: candidates, a mitosis-vs-look-alike score, suppression.

A detector is a model artifact like the classifier (``task: detect`` in its card, with the
candidate finder it was trained behind and its microns per pixel), scored through the same
:class:`~mitotype.models.ensemble.Ensemble` and backends. An image or slide is read in tiles at the
detector's resolution (:func:`mitotype.data.tiles.tile_grid`): each tile is read with a margin wide
enough for a candidate's patch and for suppression across the border, and keeps only detections
its core owns, so memory stays that of one tile and borders neither lose nor double a figure. A
heat-map detector (card ``build.detector: heatmap``, :class:`HeatmapDetector`) has no candidates: each
tile's figure-centre map is computed whole and its peaks take the candidates' place. With
a classifier chained, each detection is classified through the points path (a patch centred on it
at the classifier's resolution), as ``mitotype points`` would.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mitotype.config import CandidateConfig
from mitotype.data.candidates import blob_centres, crop_all, find_candidates, grid_step, smoothed_density
from mitotype.data.points import PointTable
from mitotype.data.slides import Source, model_mpp
from mitotype.data.tiles import Tile, tile_grid
from mitotype.errors import MitotypeError
from mitotype.inference.points import iter_point_batches
from mitotype.inference.runtime import load_scorer
from mitotype.models.ensemble import INFERENCE_BATCH, Backend, Ensemble
from mitotype.transforms.batch import build_batch

DETECTION_COLUMNS = ("image", "x", "y", "score")
HEATMAP_CONTEXT_UM = 32.0  # a heat-map detector's tiles see this much beyond the suppression reach (128 px at 0.25 um/px)
ALIGN = 32  # a heat-map network's coarsest stride: tiles start and sizes pad to multiples of it
PEAK_FLOOR = 0.01  # peaks below this probability are never detections (below any threshold or curve of use)
TILE = 1024  # detector pixels per tile side: ~0.07 mm² at 0.25 um/px; a few MB whatever the slide


def suppress(xy: np.ndarray, scores: np.ndarray, radius_px: float) -> np.ndarray:
    """Indices kept by greedy distance suppression: best score first, dropping any point within
    ``radius_px`` of one already kept (one detection per figure, as the 7.5 um matching expects)."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    for i in order:
        if not kept or np.min(np.hypot(*(xy[kept] - xy[i]).T)) > radius_px:
            kept.append(int(i))
    return np.asarray(kept, dtype=np.int64)


@dataclass
class Detector:
    """A loaded detector: candidates from :attr:`candidates`, scores from :attr:`scorer`, threshold."""

    ensemble: Ensemble
    scorer: Backend
    candidates: CandidateConfig

    @classmethod
    def load(cls, path: Path, *, device: str = "auto", threshold: float | None = None, backend: str = "auto") -> "Detector":
        """The detector at ``path``, of the kind its card names (``build.detector``): candidates + a
        patch classifier, or a heat map (:class:`HeatmapDetector`)."""
        if detector_kind(Path(path)) == "heatmap":
            return HeatmapDetector.load(path, device=device, threshold=threshold, backend=backend)
        ensemble, scorer = load_scorer(Path(path), device=device, threshold=threshold, backend=backend, task="detect", option="model")
        return cls(ensemble, scorer, CandidateConfig(**ensemble.cards[0]["build"]["candidates"]))

    @property
    def mpp(self) -> float:
        return model_mpp([self.ensemble.mpp])

    @property
    def threshold(self) -> float:
        return self.ensemble.threshold

    @property
    def margin(self) -> int:
        """Pixels a tile is read beyond its core: a candidate's half patch beyond the candidates that can
        sway suppression in the core (two suppression radii), so every patch scored holds real pixels."""
        return self.ensemble.patch_size // 2 + int(math.ceil(2 * self.candidates.nms_um / self.mpp))

    def candidate_patches(self, rgb: np.ndarray, within: tuple[float, float, float, float] | None = None
                          ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        """``x, y, od`` of the candidates of ``rgb`` (pixels at the detector's mpp; only those inside
        the box ``within`` = x0, y0, x1, y1 when given), their patches and the smoothed density."""
        density = smoothed_density(rgb, mpp=self.mpp, cfg=self.candidates)
        cands = find_candidates(rgb, mpp=self.mpp, cfg=self.candidates, density=density)
        if within is not None:
            x0, y0, x1, y1 = within
            cands = cands[(cands["x"] >= x0) & (cands["x"] < x1) & (cands["y"] >= y0) & (cands["y"] < y1)].reset_index(drop=True)
        size = self.ensemble.patch_size
        return cands, crop_all(rgb, cands["x"].to_numpy(), cands["y"].to_numpy(), size), density

    def recentre(self, kept: pd.DataFrame, density: np.ndarray, offset: tuple[int, int] = (0, 0)) -> pd.DataFrame:
        """Detections moved from their peak to their blob's centre (:func:`blob_centres`; the
        candidates' ``recentre_fraction``, 0 = off); ``offset`` is where ``density`` starts."""
        c = self.candidates
        if c.recentre_fraction <= 0 or kept.empty:
            return kept
        step = grid_step(c, self.mpp)  # density samples are every step-th pixel from offset
        window = max(1, int(round(c.recentre_um / (self.mpp * step))))
        half = (step - 1) / 2  # sample i is the block centred on pixel i * step + half
        xy = blob_centres(density, (kept["x"].to_numpy() - offset[0] - half) / step, (kept["y"].to_numpy() - offset[1] - half) / step,
                          fraction=c.recentre_fraction, window=window) * step + half
        return kept.assign(x=xy[:, 0] + offset[0], y=xy[:, 1] + offset[1])

    def score(self, patches: np.ndarray, *, batch_size: int = INFERENCE_BATCH) -> np.ndarray:
        return np.concatenate([self.scorer.p_atypical(b) for b in _batches(patches, batch_size)]).astype(np.float64) \
            if len(patches) else np.empty(0, dtype=np.float64)

    def score_candidates(self, rgb: np.ndarray) -> pd.DataFrame:
        """``x, y, od, score`` for every candidate of ``rgb`` (pixels at the detector's mpp)."""
        cands, patches, _ = self.candidate_patches(rgb)
        return cands.assign(score=self.score(patches))

    def read_tile(self, source: Source, t: Tile, size: tuple[int, int]) -> tuple:
        """What the network needs for tile ``t`` (read with :attr:`margin`): run in the reading thread."""
        return _prepare_tile(self, source, t, size)

    def network_inputs(self, prepared: tuple) -> list[np.ndarray]:
        """The batches the network runs on for a read tile (:meth:`read_tile`'s result): what a
        benchmark times alone as the detector's bare forward."""
        return _batches(prepared[1], INFERENCE_BATCH)

    def bare_forward(self, batch: np.ndarray) -> None:
        """The network alone on one of :meth:`network_inputs`' batches."""
        self.scorer.p_atypical(batch)

    def finish_tile(self, t: Tile, prepared: tuple, floor: float) -> pd.DataFrame:
        """``x, y, score`` (detector pixels of the whole image) of the figures tile ``t``'s core owns."""
        cands, patches, density, origin = prepared
        owned = _finish_tile(t, cands.assign(score=self.score(patches)), floor, self.candidates.nms_um / self.mpp)
        return self.recentre(owned, density, origin)

    def detect_array(self, rgb: np.ndarray, *, min_score: float | None = None) -> pd.DataFrame:
        """``x, y, score`` of the figures in a whole image held in memory (pixels at the detector's mpp)."""
        floor = self.threshold if min_score is None else min_score
        cands, patches, density = self.candidate_patches(rgb)
        scored = cands.assign(score=self.score(patches))
        scored = scored[scored["score"] >= floor].reset_index(drop=True)
        keep = suppress(scored[["x", "y"]].to_numpy(), scored["score"].to_numpy(), self.candidates.nms_um / self.mpp)
        kept = scored.iloc[np.sort(keep)][["x", "y", "score"]].reset_index(drop=True)
        return self.recentre(kept, density)


def detector_kind(path: Path) -> str:
    """``build.detector`` of the (checked) card of the first model at ``path``: candidates or heatmap."""
    from mitotype.models.artifact import CARD_NAME, model_dirs, read_card_json
    from mitotype.models.card import read_card

    card_path = model_dirs(Path(path))[0] / CARD_NAME
    build = read_card(read_card_json(card_path), card_path)["build"]
    return str(build.get("detector", "candidates"))


@dataclass
class HeatmapDetector(Detector):
    """A dense detector: the network's map of figure centres (:mod:`mitotype.models.heatmap`), its peaks
    above the threshold, greedy suppression within ``candidates.nms_um``. No candidate finder.

    A tile is read with :attr:`margin` of context (what the network sees around the core, rounded to
    its coarsest stride so every tile's grid lines up with the whole image's) and padded to a
    multiple of that stride; the peaks near the core are suppressed together and the core keeps its
    own, as for candidates. Only the PyTorch backend runs it: the exported-graph path scores
    fixed-size patches."""

    stride: int = 4

    @classmethod
    def load(cls, path: Path, *, device: str = "auto", threshold: float | None = None, backend: str = "auto") -> "HeatmapDetector":
        if backend not in ("auto", "torch"):
            raise MitotypeError(f"{{backend}} {backend}: a heat-map detector runs on torch only; use {{backend}} torch or auto",
                                options=("backend",))
        ensemble, scorer = load_scorer(Path(path), device=device, threshold=threshold, backend="torch", task="detect", option="model")
        stride = int(getattr(ensemble.nets[0], "output_stride", 4))
        return cls(ensemble, scorer, CandidateConfig(**ensemble.cards[0]["build"]["candidates"]), stride)

    @property
    def margin(self) -> int:
        """Context for the network (:data:`HEATMAP_CONTEXT_UM`) plus two suppression radii, in whole
        multiples of the network's coarsest stride (32 px)."""
        px = HEATMAP_CONTEXT_UM / self.mpp + 2 * self.candidates.nms_um / self.mpp
        return int(math.ceil(px / ALIGN) * ALIGN)

    def peaks(self, rgb: np.ndarray, *, floor: float = PEAK_FLOOR) -> pd.DataFrame:
        """``x, y, score``: the local maxima (3 x 3 cells) of the figure probability map of ``rgb`` at or
        above ``floor`` (never below :data:`PEAK_FLOOR`), best first, each moved to the probability-weighted centre of
        its 3 x 3 cells and given in ``rgb``'s pixels."""
        h, w = rgb.shape[:2]
        with torch.no_grad():
            prob = torch.sigmoid(self._logits(self._padded(rgb)))[0, 0]
            ys, xs, score, dx, dy = map(lambda a: a.cpu().numpy(), map_peaks(prob, floor=max(floor, PEAK_FLOOR)))
        x = self.stride * (xs + dx) + (self.stride - 1) / 2
        y = self.stride * (ys + dy) + (self.stride - 1) / 2
        keep = (x < w) & (y < h)  # not on the padding
        order = np.argsort(-score[keep], kind="stable")
        return pd.DataFrame({"x": x[keep][order].astype(np.float64), "y": y[keep][order].astype(np.float64),
                             "score": score[keep][order].astype(np.float64)})

    @staticmethod
    def _padded(rgb: np.ndarray) -> np.ndarray:
        """(1, H, W, 3): ``rgb`` mirrored out to a multiple of the network's coarsest stride."""
        h, w = rgb.shape[:2]
        return np.ascontiguousarray(np.pad(rgb, ((0, -h % ALIGN), (0, -w % ALIGN), (0, 0)), mode="symmetric")[None])

    def _logits(self, padded: np.ndarray) -> torch.Tensor:
        net = self.ensemble.nets[0]
        batch = build_batch(torch.from_numpy(padded), self.ensemble.device, channels_last=True)
        return net(batch)[net.head_name].float()

    def network_inputs(self, prepared: tuple) -> list[np.ndarray]:
        return [self._padded(prepared[0])]

    def bare_forward(self, batch: np.ndarray) -> None:
        with torch.no_grad():
            self._logits(batch)

    def read_tile(self, source: Source, t: Tile, size: tuple[int, int]) -> tuple:
        box = read_box(t, size, margin=self.margin, align=ALIGN)
        return source.region(box, self.mpp), box

    def finish_tile(self, t: Tile, prepared: tuple, floor: float) -> pd.DataFrame:
        rgb, box = prepared
        found = self.peaks(rgb, floor=floor)
        return _finish_tile(t, found.assign(x=found["x"] + box[0], y=found["y"] + box[1]), floor, self.candidates.nms_um / self.mpp)

    def detect_array(self, rgb: np.ndarray, *, min_score: float | None = None) -> pd.DataFrame:
        floor = self.threshold if min_score is None else min_score
        found = self.peaks(rgb, floor=floor)
        found = found[found["score"] >= floor].reset_index(drop=True)
        keep = suppress(found[["x", "y"]].to_numpy(), found["score"].to_numpy(), self.candidates.nms_um / self.mpp)
        return found.iloc[np.sort(keep)].reset_index(drop=True)


def map_peaks(prob: torch.Tensor, *, floor: float) -> tuple[torch.Tensor, ...]:
    """Rows, columns and values of the 3 x 3 local maxima of an (h, w) map at or above ``floor``, and
    each one's sub-cell offset (dx, dy in cells): the centroid of its 3 x 3 neighbourhood's values."""
    p = prob[None, None]
    is_peak = (p == F.max_pool2d(p, 3, stride=1, padding=1)) & (p >= floor)
    ys, xs = torch.nonzero(is_peak[0, 0], as_tuple=True)
    padded = F.pad(p, (1, 1, 1, 1))[0, 0]
    hood = torch.stack([padded[ys + 1 + j, xs + 1 + i] for j in (-1, 0, 1) for i in (-1, 0, 1)], dim=1)  # (n, 9)
    offsets = torch.tensor([-1.0, 0.0, 1.0], device=prob.device)
    weight = hood / hood.sum(dim=1, keepdim=True).clamp(min=1e-12)
    dx = (weight * offsets.repeat(3)).sum(dim=1)
    dy = (weight * offsets.repeat_interleave(3)).sum(dim=1)
    return ys, xs, prob[ys, xs], dx, dy


def detection_tiles(size: tuple[int, int], *, tile: int, roi: tuple[int, int, int, int] | None = None) -> list[Tile]:
    """Cores of ``tile`` px partitioning ``roi`` (x, y, w, h; default the whole ``size``) in detector
    pixels; each is read with the detector's margin around it, so neighbouring reads overlap by
    twice the margin (a candidate's patch plus the suppression radius, on each side)."""
    region = roi or (0, 0, size[0], size[1])
    return tile_grid(region, tile=tile, overlap=0)


def detect_source(
    detector: Detector, source: Source, *, min_score: float | None = None, tile: int = TILE,
    roi: tuple[int, int, int, int] | None = None, on_tile: Callable[[int, int], None] | None = None,
    tiles: list[Tile] | None = None,
) -> pd.DataFrame:
    """``x, y, score`` in level-0 pixels of ``source``, tile by tile (see the module's note). ``roi``
    and ``tiles`` are in detector pixels; ``on_tile(done, total)`` hears each tile."""
    progress = (lambda _name, done, total: on_tile(done, total)) if on_tile else None
    jobs = [("", lambda: source, False)]
    return next(detect_many(detector, jobs, min_score=min_score, tile=tile, roi=roi, tiles=tiles, on_tile=progress))[1]


Opener = Callable[[], Source]


def detect_many(
    detector: Detector, jobs: Iterable[tuple[str, Opener, bool]], *, min_score: float | None = None, tile: int = TILE,
    roi: tuple[int, int, int, int] | None = None, tiles: list[Tile] | None = None,
    on_tile: Callable[[str, int, int], None] | None = None,
) -> Iterator[tuple[str, pd.DataFrame]]:
    """(name, detections in level-0 pixels) for each ``(name, open, close_after)`` job, in order.

    One pipeline over every image and tile: a thread opens the images, reads the tiles and cuts
    the candidates' patches (:meth:`Detector.read_tile`) one tile ahead while the network scores the
    current one (:meth:`Detector.finish_tile`), so an image
    of a single tile overlaps with the next image's reading too. ``close_after``: close the source
    when its last tile is read."""
    floor = detector.threshold if min_score is None else min_score
    ahead: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        _yield_to_the_network()
        try:
            for name, open_source, close_after in jobs:
                if stop.is_set():
                    return
                source = open_source()
                try:
                    size = source.size_at(detector.mpp)
                    grid = tiles if tiles is not None else detection_tiles(size, tile=tile, roi=roi)
                    scale = detector.mpp / source.level_mpps[0]
                    if not grid:
                        _put(ahead, stop, (name, None, 0, 0, scale, None))
                    for k, t in enumerate(grid, 1):
                        if stop.is_set():
                            return
                        _put(ahead, stop, (name, t, k, len(grid), scale, detector.read_tile(source, t, size)))
                finally:
                    if close_after:
                        source.close()
        except BaseException as err:  # handed to the consumer, which raises it
            _put(ahead, stop, err)
        _put(ahead, stop, None)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    found: list[pd.DataFrame] = []
    try:
        while (item := ahead.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            name, t, k, n, scale, prepared = item
            if prepared is not None:
                found.append(detector.finish_tile(t, prepared, floor))
                if on_tile:
                    on_tile(name, k, n)
            if k == n:
                table = pd.concat(found, ignore_index=True) if found else pd.DataFrame({"x": [], "y": [], "score": []})
                found = []
                yield name, table.assign(x=table["x"].astype(float) * scale, y=table["y"].astype(float) * scale)
    finally:
        stop.set()
        while worker.is_alive():  # let the producer see the stop and end
            try:
                ahead.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)


def _yield_to_the_network() -> None:
    """Lower this (reading) thread's scheduling priority where the OS allows it (Linux: per thread).
    The network's threads meet at a barrier after each layer, so a reading thread that pre-empts one
    of them stalls all; at a lower priority it runs in their gaps, and still whenever the network
    waits for its next tile."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10))
        except OSError:  # not permitted here: run at the process's priority
            pass


def _put(q: queue.Queue, stop: threading.Event, item: object) -> None:
    """Put unless the consumer has stopped (then drop it, so the producer can end)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _batches(items: np.ndarray, size: int) -> list[np.ndarray]:
    return [items[s:s + size] for s in range(0, len(items), size)]


def read_box(t: Tile, size: tuple[int, int], *, margin: int, align: int = 1) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): tile ``t`` with ``margin`` px around it, clipped to the image of ``size``,
    its start rounded down to a multiple of ``align`` (the grid a detector computes on: candidates'
    density samples, a heat map's coarsest stride), so a tile's grid lines up with the whole image's."""
    x0, y0 = max(0, t.x0 - margin), max(0, t.y0 - margin)
    return x0 - x0 % align, y0 - y0 % align, min(size[0], t.x1 + margin), min(size[1], t.y1 + margin)


def _prepare_tile(detector: Detector, source: Source, t: Tile, size: tuple[int, int]
                  ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, tuple[int, int]]:
    """One tile read with ``detector.margin`` more on each side (clipped to the image): its
    candidates (in detector pixels of the whole image), their patches, the smoothed density and
    where the read starts."""
    reach = 2 * detector.candidates.nms_um / detector.mpp  # a suppression chain of two links
    # reads start on the density's grid, so every tile sees the whole image's samples
    box = read_box(t, size, margin=detector.margin, align=grid_step(detector.candidates, detector.mpp))
    cx0, cy0, cx1, cy1 = t.core
    within = (cx0 - reach - box[0], cy0 - reach - box[1], cx1 + reach - box[0], cy1 + reach - box[1])
    cands, patches, density = detector.candidate_patches(source.region(box, detector.mpp), within)
    return cands.assign(x=cands["x"] + box[0], y=cands["y"] + box[1]), patches, density, (box[0], box[1])


def _finish_tile(t: Tile, scored: pd.DataFrame, floor: float, radius: float) -> pd.DataFrame:
    """Candidates near the core are suppressed together; those whose peak the core owns are kept."""
    cx0, cy0, cx1, cy1 = t.core
    near = (scored["x"] >= cx0 - radius) & (scored["x"] < cx1 + radius) & (scored["y"] >= cy0 - radius) & (scored["y"] < cy1 + radius)
    scored = scored[near & (scored["score"] >= floor)].reset_index(drop=True)
    keep = suppress(scored[["x", "y"]].to_numpy(), scored["score"].to_numpy(), radius)
    kept = scored.iloc[np.sort(keep)]
    owned = [t.owns(x, y) for x, y in zip(kept["x"], kept["y"])]
    return kept[np.asarray(owned, dtype=bool)][["x", "y", "score"]].reset_index(drop=True)


def classify_detections(
    table: pd.DataFrame, paths: dict[str, str], classifier: Ensemble, scorer: Backend, *, image_mpp: float | None = None,
    slide_mpp: float | None = None, tta: bool = False,
) -> pd.DataFrame:
    """Add ``p_atypical, label`` to detections (``image, x, y, score``; ``paths`` maps each image to its
    file) through the points path: a patch centred on each at the classifier's resolution."""
    if table.empty:
        return table.assign(p_atypical=pd.Series(dtype=float), label=pd.Series(dtype=str))
    points_table = table.assign(image_path=table["image"].map(paths), label=-1)
    points = PointTable(points_table, [f"detection {i}" for i in range(len(table))], list(paths.items()), "detections")
    p = np.empty(len(table), dtype=np.float64)
    order = np.argsort(pd.factorize(points_table["image_path"])[0], kind="stable")
    target = model_mpp([classifier.mpp])
    for index, batch in iter_point_batches(points, order, INFERENCE_BATCH, classifier.patch_size, model_mpp=target,
                                           image_mpp=image_mpp, slide_mpp=slide_mpp):
        p[index] = scorer.p_atypical(batch, tta)
    names = np.where(p >= classifier.threshold, "atypical", "normal")
    return table.assign(p_atypical=p, label=names)


def iter_inputs(path: Path) -> Iterator[tuple[str, Path]]:
    """(name, file) for an image or slide, or for each one in a folder (sorted, recursively)."""
    from mitotype.data.readers import IMAGE_SUFFIXES
    from mitotype.data.slides import SLIDE_SUFFIXES

    path = Path(path)
    if not path.exists():
        raise MitotypeError(f"{path}: no such file or folder")
    if path.is_file():
        yield path.name, path
        return
    suffixes = IMAGE_SUFFIXES | SLIDE_SUFFIXES
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise MitotypeError(f"{path}: no images or slides in this folder")
    for f in files:
        yield str(f.relative_to(path)), f
