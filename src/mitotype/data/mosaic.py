"""Mosaics: validation (or training) images for a mitosis detector, made from labelled patches.

There are no point-annotated slides here, only patches with a mitotic figure at their centre. A
mosaic is an image (1024 x 1024 px by default, at the patches' 0.25 µm/px) of figure-free tissue into
which figures are pasted at random positions, with a truth table of where each one went.

How an image is made (all geometry in pixels at 0.25 µm/px)
- One slide per image. Its figures are that slide's patches; its background is quilted from the
  same slide's patches (with the closest-in-colour patches of the same domain added when the slide
  has fewer than :data:`MIN_POOL`), so colours match.
- Figure-free tissue: the four corner blocks of a patch, pixels at least :data:`BLOCK_MARGIN` px
  from the centre in x and in y (more than 7.5 µm = 30 px from the figure). A block is left out when
  another annotated figure of the slide (from the manifest's ``x``/``y``) lies within 30 px of it, or
  when it holds the black padding of a patch cut at a slide's edge.
- Background: image quilting (Efros & Freeman 2001). Tiles of random size (28-40 px) are cropped from
  randomly rotated (k x 90°) and flipped blocks and laid row by row with random overlaps, so the tile
  grid is irregular; each tile is the best match to what is already there among
  :data:`CANDIDATES` drawn tiles, and joins it along a minimum-error path through the overlap with a
  cosine alpha ramp across that path (so no straight seam exists). The quilt is then rotated by a
  uniform random angle (cubic spline), which takes the tile grid off the image axes.
- Figures: the disc around a patch's centre is sampled at the background's angle plus a random
  multiple of 90° (and a random flip), so figure and background share one resampling lattice (the same
  interpolation blur) and the figure's orientation is still uniform. The disc's colours are shifted so
  that its rim has the local background's mean colour; it is opaque inside :data:`CORE_RADIUS` px and
  joins the background along a minimum-error closed path in the annulus :data:`CUT_RADII` (so its edge
  is no circle), with a cosine ramp across that path: nothing of the patch lies beyond
  :data:`DISC_RADIUS` px. That path switches the fine detail only; the coarse band (colour and shading,
  Gaussian sigma :data:`LOW_SIGMA`) fades from the disc to the background over :data:`LOW_RAMP` px, so
  no step of local mean marks the edge. A patch's black padding is left transparent.
- Positions: uniform, at least :data:`BORDER` px from the image border and :data:`MIN_DISTANCE` px
  from each other. A truth point is the pasted patch centre (pixel ``P // 2, P // 2`` of a P x P patch,
  64, 64 for 128 px), which rotation leaves at the disc's centre.

Everything is drawn from ``numpy.random.default_rng(seed)`` (the plan) and ``default_rng([seed, i])``
(image ``i``): the same seed and patches give identical images. :func:`write_mosaics` writes
``mosaic_0000.png``..., ``truth.csv`` (``image, x, y, label`` + provenance; read by
:func:`mitotype.data.points.read_points` and ``mitotype evaluate-detections``) and ``mosaics.json``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from mitotype._io import atomic_path, check_output_dir, code_revision, write_csv, write_json
from mitotype.config import DataConfig
from mitotype.data.manifest import UNLABELLED
from mitotype.data.splits import grouped_folds, training_rows
from mitotype.errors import MitotypeError

FORMAT_VERSION = 1
FIGURE_FREE_RADIUS_UM = 7.5  # MIDOG's match radius: the area a detection there would match a figure
BLOCK_MARGIN = 24  # background blocks: at least this far from the patch centre in x and in y
NEIGHBOUR_CLEARANCE = 30  # px: a block this close to another annotated figure of the slide is not used
CORE_RADIUS = 26  # px: the disc is the patch's own inside this radius
CUT_RADII = (29, 40)  # px: the disc's edge (a closed minimum-error path) runs in this annulus
DISC_FEATHER = 3  # px: cosine ramp half-width across the disc's edge
DISC_RADIUS = CUT_RADII[1] + DISC_FEATHER  # 43 px: nothing of the figure's patch lies farther out
LOW_SIGMA = 4.0  # px: the coarse band of the two-band blend
LOW_RAMP = (24, DISC_RADIUS)  # px: the coarse band fades from the disc to the background over these radii
BORDER = 48  # px: figures at least this far from the image border
MIN_DISTANCE = 90  # px: figures at least this far from each other (their discs never touch)
TILE_SIZES = (28, 40)  # px: quilting tile side range (the corner blocks are 40 px for 128 px patches)
TILE_OVERLAPS = (9, 13)  # px: overlap range between neighbouring tiles
SEAM_FEATHER = 2  # px: cosine ramp half-width across a tile seam
CANDIDATES = 32  # tiles drawn for each place; the best matching (within MATCH_TOLERANCE) is taken
MATCH_TOLERANCE = 0.1
MIN_POOL = 8  # patches: a smaller slide borrows its domain's closest in colour
MAX_POOL = 96  # patches: background blocks of one image come from at most this many
ANGLES = 256  # steps of the disc-edge path around the circle
PLACE_TRIES = 20_000
PNG_NAME = "mosaic_{:04d}.png"
OWN_FILES = re.compile(r"^(mosaic_\d{4,}\.png|truth\.csv|mosaics\.json)$")
LABEL_NAMES = {1: "atypical", 0: "normal"}


@dataclass
class Mosaic:
    """One image, its truth rows (``image, x, y, label`` + provenance) and how it was laid out:
    ``tiles`` (n, 2) and ``junctions`` (n, 2) are the background tiles' centres and top-left seam
    corners in image coordinates (x, y), for layout-only baselines; ``info`` its per-image facts."""

    image: np.ndarray
    truth: pd.DataFrame
    tiles: np.ndarray
    junctions: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- selection
def select_fold(manifest: pd.DataFrame, *, folds: int, fold: int | None = None, exclude_fold: int | None = None,
                split_seed: int = DataConfig.split_seed, stratify: Sequence[str] = ("label",)) -> pd.DataFrame:
    """The rows of held-out fold ``fold`` (or all but fold ``exclude_fold``) of the grouped K-fold split
    that ``mitotype cv --folds K`` makes of the same data: the layout's test split set aside first, then
    :func:`grouped_folds` with the recipe's ``split_seed`` and ``stratify`` (defaults: 42, label)."""
    if (fold is None) == (exclude_fold is None):
        raise MitotypeError("give one of {fold} or {exclude_fold}", options=("fold", "exclude_fold"))
    name, which = ("fold", fold) if fold is not None else ("exclude_fold", exclude_fold)
    assert which is not None
    if not isinstance(folds, (int, np.integer)) or isinstance(folds, bool) or folds < 2:
        raise MitotypeError(f"{{folds}} {folds}: need at least 2 folds", options=("folds",))
    if not isinstance(which, (int, np.integer)) or isinstance(which, bool) or not 0 <= which < folds:
        raise MitotypeError(f"{{{name}}} {which}: must be a fold number 0..{folds - 1} (of {{folds}} {folds})", options=(name, "folds"))
    rows = training_rows(manifest)
    learnable = manifest.iloc[rows].reset_index(drop=True)
    fold_of = grouped_folds(learnable, folds, split_seed, list(stratify))
    keep = fold_of == which if fold is not None else fold_of != which
    return learnable[keep].reset_index(drop=True)


# -------------------------------------------------------------------------------------------- building
def build_mosaics(manifest: pd.DataFrame, *, n_images: int | None = None, size: int = 1024, figures_per_image: int = 8,
                  seed: int = 0) -> list[tuple[np.ndarray, pd.DataFrame]]:
    """The mosaics of :func:`iter_mosaics` as (uint8 H x W x 3 image, truth rows) pairs."""
    return [(m.image, m.truth) for m in iter_mosaics(manifest, n_images=n_images, size=size, figures_per_image=figures_per_image, seed=seed)]


def iter_mosaics(manifest: pd.DataFrame, *, n_images: int | None = None, size: int = 1024, figures_per_image: int = 8,
                 seed: int = 0) -> Iterator[Mosaic]:
    """Yield ``n_images`` mosaics (default: as many as it takes to paste every patch once) of ``size`` px,
    each with up to ``figures_per_image`` figures of one slide (a slide's patches are split evenly over
    ceil(n / figures_per_image) images). Deterministic for a seed; names run mosaic_0000.png..."""
    _check_options(n_images=n_images, size=size, figures_per_image=figures_per_image, seed=seed)
    df = _checked_manifest(manifest)
    plan = _plan(df, figures_per_image, n_images, np.random.default_rng(seed))
    patches = _Patches(df)
    for i, rows in enumerate(plan):
        yield _make_mosaic(df, patches, rows, size, np.random.default_rng([seed, i]), PNG_NAME.format(i))


def write_mosaics(manifest: pd.DataFrame, out_folder: str | Path, *, n_images: int | None = None, size: int = 1024,
                  figures_per_image: int = 8, seed: int = 0, mpp: float = 0.25, overwrite: bool = False,
                  selection: dict[str, Any] | None = None, progress: Callable[[int], None] | None = None,
                  on_mosaic: Callable[[Mosaic], None] | None = None) -> dict[str, Any]:
    """Write the mosaics of :func:`iter_mosaics` to ``out_folder``: ``mosaic_NNNN.png``, ``truth.csv``
    (image, x, y, label, then source, group, domain, angle, flip, label_code) and ``mosaics.json``
    (returned): seed, mpp, size, counts, each image's area and figure-free area in mm² (the image less
    the discs of 7.5 µm around its truth points) and the code's version. ``selection`` (e.g. the fold)
    is recorded as given. ``out_folder`` must be absent or empty unless ``overwrite``, which replaces
    the files a previous run wrote there (and no others). ``on_mosaic`` sees each :class:`Mosaic` once
    written (its layout, for layout-only baselines)."""
    if not (isinstance(mpp, (int, float)) and not isinstance(mpp, bool) and math.isfinite(mpp) and mpp > 0):
        raise MitotypeError(f"{{mpp}} {mpp}: must be a positive number", options=("mpp",))
    _check_options(n_images=n_images, size=size, figures_per_image=figures_per_image, seed=seed)
    out = check_mosaic_folder(out_folder, overwrite=overwrite)
    df = _checked_manifest(manifest)
    for old in out.iterdir() if out.is_dir() else ():
        if old.is_file() and OWN_FILES.match(old.name):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    truths, per_image = [], []
    area = (size * mpp / 1000) ** 2
    disc = math.pi * (FIGURE_FREE_RADIUS_UM / 1000) ** 2
    for mosaic in iter_mosaics(df, n_images=n_images, size=size, figures_per_image=figures_per_image, seed=seed):
        name = mosaic.info["image"]
        with atomic_path(out / name) as tmp:
            Image.fromarray(mosaic.image).save(tmp, format="PNG")
        truths.append(mosaic.truth)
        n = len(mosaic.truth)
        per_image.append({**mosaic.info, "area_mm2": round(area, 6), "figure_free_area_mm2": round(area - n * disc, 6)})
        if on_mosaic is not None:
            on_mosaic(mosaic)
        if progress is not None:
            progress(1)
    truth = pd.concat(truths, ignore_index=True)
    write_csv(out / "truth.csv", truth)
    n_atypical = int((truth["label"] == "atypical").sum())
    summary = {
        "format_version": FORMAT_VERSION, "seed": seed, "mpp": mpp, "size": size, "figures_per_image": figures_per_image,
        "n_images": len(per_image), "n_figures": len(truth), "n_atypical": n_atypical, "n_normal": len(truth) - n_atypical,
        "n_input_patches": len(df), "n_patches_used": int(truth["source"].nunique()), "n_slides": int(truth["group"].nunique()),
        "area_mm2": round(area * len(per_image), 6), "figure_free_area_mm2": round(sum(p["figure_free_area_mm2"] for p in per_image), 6),
        "figure_free_radius_um": FIGURE_FREE_RADIUS_UM, "selection": selection or {"patches": "all"},
        "geometry_px": {"block_margin": BLOCK_MARGIN, "core_radius": CORE_RADIUS, "cut_radii": list(CUT_RADII), "disc_radius": DISC_RADIUS,
                        "border": BORDER, "min_distance": MIN_DISTANCE, "tile_sizes": list(TILE_SIZES), "tile_overlaps": list(TILE_OVERLAPS)},
        "version": code_revision(), "per_image": per_image,
    }
    write_json(out / "mosaics.json", summary)
    return summary


def check_mosaic_folder(out_folder: str | Path, *, overwrite: bool = False) -> Path:
    """``out_folder`` can take mosaics: absent, empty, or (with ``overwrite``) any folder; checked before any work."""
    out = check_output_dir(Path(out_folder), "out_folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MitotypeError(f"{out}: output folder is not empty; choose another folder or pass {{overwrite}} to replace the mosaics there",
                            options=("overwrite",))
    return out


def _check_options(*, n_images: int | None, size: int, figures_per_image: int, seed: int) -> None:
    def whole(value: object) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not whole(seed) or seed < 0:
        raise MitotypeError(f"{{seed}} {seed}: must be a non-negative integer", options=("seed",))
    if n_images is not None and (not whole(n_images) or n_images < 1):
        raise MitotypeError(f"{{n_images}} {n_images}: must be a positive integer", options=("n_images",))
    if not whole(size) or size < 2 * BORDER + 1:
        raise MitotypeError(f"{{size}} {size}: must be an integer of at least {2 * BORDER + 1} px", options=("size",))
    if not whole(figures_per_image) or figures_per_image < 1:
        raise MitotypeError(f"{{figures_per_image}} {figures_per_image}: must be a positive integer", options=("figures_per_image",))
    side = size - 2 * BORDER  # a square lattice at the minimum distance is about what random placement reaches at most
    capacity = (side // MIN_DISTANCE + 1) ** 2
    if figures_per_image > max(1, capacity // 2):
        raise MitotypeError(f"{{figures_per_image}} {figures_per_image}: too many for {size} px images with figures {MIN_DISTANCE} px apart "
                            f"and {BORDER} px from the border (at most {max(1, capacity // 2)}); use fewer or a larger {{size}}",
                            options=("figures_per_image", "size"))


def _checked_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("path", "label", "group") if c not in manifest.columns]
    if missing:
        raise MitotypeError(f"the patches need column(s) {', '.join(missing)}")
    if len(manifest) == 0:
        raise MitotypeError("no patches to make mosaics of")
    unlabelled = (manifest["label"] == UNLABELLED).to_numpy()
    if unlabelled.any():
        raise MitotypeError(f"{int(unlabelled.sum())} patch(es) have no label, e.g. {manifest['path'].iloc[int(np.flatnonzero(unlabelled)[0])]}")
    df = manifest.reset_index(drop=True).copy()
    if "domain" not in df:
        df["domain"] = ""
    df["group"], df["domain"] = df["group"].astype(str), df["domain"].fillna("").astype(str)
    return df


def _plan(df: pd.DataFrame, per_image: int, n_images: int | None, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of each image's figures: every slide's shuffled patches split evenly into
    ceil(n / per_image) images, images in random order; passes repeat (fresh draws) until ``n_images``."""
    groups = list(df.groupby("group", sort=True).indices.values())

    def one_pass() -> list[np.ndarray]:
        chunks: list[np.ndarray] = []
        for rows in groups:
            rows = rng.permutation(rows)
            chunks += np.array_split(rows, math.ceil(len(rows) / per_image))
        return [chunks[i] for i in rng.permutation(len(chunks))]

    plan = one_pass()
    if n_images is None:
        return plan
    while len(plan) < n_images:
        plan += one_pass()
    return plan[:n_images]


# ---------------------------------------------------------------------------------------------- patches
class _Patches:
    """Decoded patches (uint8 RGB, cached), their padding masks, valid corner blocks and mean colours."""

    def __init__(self, df: pd.DataFrame) -> None:
        self.df = df
        self._images: dict[int, np.ndarray] = {}
        self._blocks: dict[int, list[np.ndarray]] = {}
        self._colour: dict[int, np.ndarray] = {}
        self.size: int | None = None
        xy = df[["x", "y"]].apply(pd.to_numeric, errors="coerce").to_numpy(float) if {"x", "y"} <= set(df.columns) else None
        self._xy = xy if xy is not None and np.isfinite(xy).all() else None
        self._by_group = df.groupby("group", sort=False).indices

    def image(self, row: int) -> np.ndarray:
        if row not in self._images:
            path = str(self.df["path"].iloc[row])
            try:
                with Image.open(path) as im:
                    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except FileNotFoundError:
                raise MitotypeError(f"{path}: no such image") from None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise MitotypeError(f"{path}: cannot decode image ({reason})") from None
            h, w = rgb.shape[:2]
            if h != w or h < 2 * (DISC_RADIUS + 5):
                raise MitotypeError(f"{path}: a {w}x{h} patch; mosaics need square patches of at least {2 * (DISC_RADIUS + 5)} px "
                                    f"with the figure at the centre")
            if self.size is None:
                self.size = h
            elif h != self.size:
                raise MitotypeError(f"{path}: a {w}x{h} patch among {self.size}x{self.size} ones; mosaics need one patch size")
            self._images[row] = rgb
        return self._images[row]

    def padding(self, row: int) -> np.ndarray:
        """Pure black pixels (a patch cut at the slide's edge), grown by 2 px."""
        black = self.image(row).max(axis=2) == 0
        return ndimage.binary_dilation(black, iterations=2) if black.any() else black

    def neighbours(self, row: int) -> np.ndarray:
        """Other annotated figures of the slide, in this patch's pixel coordinates (x, y); empty without x, y."""
        if self._xy is None:
            return np.zeros((0, 2))
        others = np.array([r for r in self._by_group[self.df["group"].iloc[row]] if r != row], dtype=int)
        if not len(others):
            return np.zeros((0, 2))
        c = self.image(row).shape[0] // 2
        local = self._xy[others] - self._xy[row] + c
        return local[np.all(np.abs(local - c) < c + NEIGHBOUR_CLEARANCE + DISC_RADIUS, axis=1)]

    def blocks(self, row: int) -> list[np.ndarray]:
        """The corner blocks (B x B, B = P/2 - BLOCK_MARGIN) free of padding and of other figures."""
        if row not in self._blocks:
            img = self.image(row)
            p = img.shape[0]
            b = p // 2 - BLOCK_MARGIN
            pad, near = self.padding(row), self.neighbours(row)
            kept = []
            for y0 in (0, p - b):
                for x0 in (0, p - b):
                    if pad[y0:y0 + b, x0:x0 + b].any():
                        continue
                    if len(near):  # distance from each neighbour to the block rectangle
                        dx = np.maximum(0, np.maximum(x0 - near[:, 0], near[:, 0] - (x0 + b - 1)))
                        dy = np.maximum(0, np.maximum(y0 - near[:, 1], near[:, 1] - (y0 + b - 1)))
                        if (np.hypot(dx, dy) < NEIGHBOUR_CLEARANCE).any():
                            continue
                    kept.append(img[y0:y0 + b, x0:x0 + b])
            self._blocks[row] = kept
        return self._blocks[row]

    def colour(self, row: int) -> np.ndarray:
        if row not in self._colour:
            blocks = self.blocks(row)
            self._colour[row] = np.mean([b.mean(axis=(0, 1)) for b in blocks], axis=0) if blocks else np.full(3, np.nan)
        return self._colour[row]

    def pool(self, rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
        """All 8 rotations / flips of the blocks of the image's slide (at most MAX_POOL patches), plus the
        closest-in-colour patches of its domain when the slide has fewer than MIN_POOL with blocks:
        (n x B x B x 3 uint8, patches of the slide used, patches borrowed)."""
        group = self.df["group"].iloc[rows[0]]
        own = [int(r) for r in rng.permutation(self._by_group[group]) if self.blocks(int(r))][:MAX_POOL]
        borrowed: list[int] = []
        if len(own) < MIN_POOL:
            domain = self.df["domain"].iloc[rows[0]]
            target = np.mean([self.colour(r) for r in own], axis=0) if own else self.image(int(rows[0])).mean(axis=(0, 1))
            others = [int(r) for r in np.flatnonzero((self.df["domain"] == domain).to_numpy() & (self.df["group"] != group).to_numpy())
                      if self.blocks(int(r))]
            if others:
                dist = [float(np.linalg.norm(self.colour(r) - target)) for r in others]
                borrowed = [others[i] for i in np.argsort(dist, kind="stable")[:MIN_POOL - len(own)]]
        blocks = [b for r in own + borrowed for b in self.blocks(r)]
        if not blocks:
            raise MitotypeError(f"slide {group}: no figure-free corner block in its patches or its domain's (all padded or crowded)")
        variants = [np.rot90(v, k) for b in blocks for v in (b, b[:, ::-1]) for k in range(4)]
        return np.ascontiguousarray(np.stack(variants)), len(own), len(borrowed)


# ---------------------------------------------------------------------------------------------- one image
def _rotation(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def _sample(src: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``src`` (H x W x 3) at the points (xs, ys), by cubic spline, mirrored at the borders."""
    return np.stack([ndimage.map_coordinates(src[..., c], [ys, xs], order=3, mode="mirror") for c in range(3)], axis=-1)


def _make_mosaic(df: pd.DataFrame, patches: _Patches, rows: np.ndarray, size: int, rng: np.random.Generator, name: str) -> Mosaic:
    pool, n_own, n_borrowed = patches.pool(rows, rng)
    theta = float(rng.uniform(0, 360))
    a = math.radians(theta)
    side = int(math.ceil(size * (abs(math.cos(a)) + abs(math.sin(a))))) + 8
    canvas, tile_centres, tile_corners = _quilt(pool, side, rng)
    # the quilt rotated by theta about its centre, the image cut from its middle
    rot, back = _rotation(theta), _rotation(-theta)
    c_img, c_q = (size - 1) / 2, (side - 1) / 2
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    qx = c_q + back[0, 0] * (xs - c_img) + back[0, 1] * (ys - c_img)
    qy = c_q + back[1, 0] * (xs - c_img) + back[1, 1] * (ys - c_img)
    image = _sample(np.ascontiguousarray(canvas[:side, :side]), qx, qy)

    def to_image(q: np.ndarray) -> np.ndarray:
        xy = (q - c_q) @ rot.T + c_img
        return xy[np.all((xy >= 0) & (xy <= size - 1), axis=1)]

    centres = _positions(len(rows), size, rng)
    truth = []
    for row, (cx, cy) in zip(rows, centres):
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        angle = (theta + 90 * k) % 360
        _paste(image, patches, int(row), cx, cy, angle, flip, rng)
        label = int(df["label"].iloc[row])
        truth.append({"image": name, "x": int(cx), "y": int(cy), "label": LABEL_NAMES[label], "source": df["path"].iloc[row],
                      "group": df["group"].iloc[row], "domain": df["domain"].iloc[row], "angle": round(angle, 4), "flip": flip,
                      "label_code": label})
    info = {"image": name, "slide": df["group"].iloc[rows[0]], "domain": df["domain"].iloc[rows[0]], "figures": len(rows),
            "atypical": int(df["label"].iloc[rows].sum()), "angle": round(theta, 4), "pool_patches": n_own, "pool_borrowed": n_borrowed}
    return Mosaic(np.clip(np.rint(image), 0, 255).astype(np.uint8), pd.DataFrame(truth), to_image(tile_centres), to_image(tile_corners), info)


def _positions(n: int, size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n`` integer points uniform in the image, BORDER px from its border and MIN_DISTANCE px apart."""
    placed: list[tuple[int, int]] = []
    for _ in range(PLACE_TRIES):
        if len(placed) == n:
            return placed
        x, y = (int(v) for v in rng.integers(BORDER, size - BORDER, size=2))
        if all((x - u) ** 2 + (y - v) ** 2 >= MIN_DISTANCE ** 2 for u, v in placed):
            placed.append((x, y))
    if len(placed) == n:
        return placed
    raise MitotypeError(f"{{figures_per_image}} {n}: could not place that many figures {MIN_DISTANCE} px apart in a {size} px image; "
                        f"use fewer or a larger {{size}}", options=("figures_per_image", "size"))


# ---------------------------------------------------------------------------------------------- quilting
def _spans(length: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(start, size, overlap with the previous) of tiles along one axis until ``length`` is covered."""
    spans, pos, overlap = [], 0, 0
    while True:
        n = int(rng.integers(TILE_SIZES[0], TILE_SIZES[1] + 1))
        spans.append((pos, n, overlap))
        if pos + n >= length:
            return spans
        overlap = int(rng.integers(TILE_OVERLAPS[0], TILE_OVERLAPS[1] + 1))
        pos += n - overlap


def _quilt(pool: np.ndarray, side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``side`` x ``side`` (or slightly larger) quilt of tiles cropped from ``pool``; tile centres and
    top-left corners in quilt coordinates (x, y)."""
    b = pool.shape[1]
    canvas = np.zeros((side + b, side + b, 3), np.float32)
    centres, corners = [], []
    for y0, h, ov_top in _spans(side, rng):
        for x0, w, ov_left in _spans(side, rng):
            ids = rng.integers(len(pool), size=CANDIDATES)
            oy, ox = rng.integers(0, b - h + 1, size=CANDIDATES), rng.integers(0, b - w + 1, size=CANDIDATES)
            err = np.zeros(CANDIDATES)
            if ov_left:
                strip = pool[ids[:, None, None], oy[:, None, None] + np.arange(h)[None, :, None],
                             ox[:, None, None] + np.arange(ov_left)[None, None, :]].astype(np.float32)
                err += ((strip - canvas[y0:y0 + h, x0:x0 + ov_left]) ** 2).sum(axis=(1, 2, 3))
            if ov_top:
                strip = pool[ids[:, None, None], oy[:, None, None] + np.arange(ov_top)[None, :, None],
                             ox[:, None, None] + np.arange(w)[None, None, :]].astype(np.float32)
                err += ((strip - canvas[y0:y0 + ov_top, x0:x0 + w]) ** 2).sum(axis=(1, 2, 3))
            good = np.flatnonzero(err <= err.min() * (1 + MATCH_TOLERANCE) + 1e-6)
            pick = int(good[rng.integers(len(good))])
            tile = pool[ids[pick], oy[pick]:oy[pick] + h, ox[pick]:ox[pick] + w].astype(np.float32)
            old = canvas[y0:y0 + h, x0:x0 + w]
            alpha = np.ones((h, w), np.float32)
            if ov_left:
                e = ((tile[:, :ov_left] - old[:, :ov_left]) ** 2).sum(axis=2)
                alpha *= _seam_alpha(e, w, rng)
            if ov_top:
                e = ((tile[:ov_top] - old[:ov_top]) ** 2).sum(axis=2)
                alpha *= _seam_alpha(e.T, h, rng).T
            canvas[y0:y0 + h, x0:x0 + w] = alpha[..., None] * tile + (1 - alpha[..., None]) * old
            centres.append((x0 + w / 2 - 0.5, y0 + h / 2 - 0.5))
            corners.append((x0 + ov_left / 2, y0 + ov_top / 2))
    return canvas, np.array(centres), np.array(corners)


def _min_path(cost: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Per row of ``cost`` (rows x cols), the column of the cheapest top-to-bottom path moving at most one
    column per row and staying in [lo, hi]."""
    rows, cols = cost.shape
    total = np.full(cost.shape, np.inf)
    total[0, lo:hi + 1] = cost[0, lo:hi + 1]
    for i in range(1, rows):
        prev = total[i - 1]
        best = np.minimum(prev, np.minimum(np.r_[np.inf, prev[:-1]], np.r_[prev[1:], np.inf]))
        total[i, lo:hi + 1] = best[lo:hi + 1] + cost[i, lo:hi + 1]
    path = np.empty(rows, dtype=int)
    path[-1] = int(np.argmin(total[-1]))
    for i in range(rows - 2, -1, -1):
        j = path[i + 1]
        window = range(max(lo, j - 1), min(hi, j + 1) + 1)
        path[i] = min(window, key=lambda k: total[i, k])
    return path


def _ramp(t: np.ndarray) -> np.ndarray:
    """Cosine ramp: 0 at t <= -1, 1 at t >= 1."""
    return (0.5 - 0.5 * np.cos(np.pi * (np.clip(t, -1, 1) + 1) / 2)).astype(np.float32)


def _seam_alpha(err: np.ndarray, width: int, rng: np.random.Generator) -> np.ndarray:
    """The new tile's weight over its left overlap (``err``: rows x overlap) and beyond (to ``width``):
    0 left of the minimum-error path, 1 right of it, a cosine ramp of SEAM_FEATHER px across it."""
    rows, ov = err.shape
    noisy = err / (err.mean() + 1e-6) + rng.uniform(0, 0.2, size=err.shape)  # no straight path through flat tissue
    path = _min_path(noisy, SEAM_FEATHER, ov - 1 - SEAM_FEATHER)
    cols = np.arange(width)[None, :]
    return _ramp((cols - path[:, None]) / SEAM_FEATHER)


# ---------------------------------------------------------------------------------------------- figures
def _paste(image: np.ndarray, patches: _Patches, row: int, cx: int, cy: int, angle: float, flip: bool, rng: np.random.Generator) -> None:
    """Blend the disc of patch ``row``, rotated by ``angle`` (and mirrored first if ``flip``), into
    ``image`` (float, in place) centred on (cx, cy)."""
    src = patches.image(row).astype(np.float32)
    c = src.shape[0] // 2
    r = DISC_RADIUS + 1
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    # image offset d -> patch offset: un-rotate, then un-mirror (x -> -x)
    back = _rotation(-angle)
    px = back[0, 0] * dx + back[0, 1] * dy
    py = back[1, 0] * dx + back[1, 1] * dy
    if flip:
        px = -px
    disc = _sample(src, c + px, c + py)
    pad = ndimage.map_coordinates(patches.padding(row).astype(np.float32), [c + py, c + px], order=1, mode="nearest")
    bg = image[cy - r:cy + r + 1, cx - r:cx + r + 1]
    dist = np.hypot(dx, dy)
    rim = (dist >= CORE_RADIUS) & (dist <= DISC_RADIUS) & (pad < 0.5)
    if rim.sum() > 10:  # the rim takes the local background's mean colour
        disc = disc + np.clip(bg[rim].mean(axis=0) - disc[rim].mean(axis=0), -40, 40)
    err = ndimage.uniform_filter(((disc - bg) ** 2).sum(axis=2), size=3)
    near = patches.neighbours(row)
    if len(near):  # keep other annotated figures of the slide out of the disc where the annulus allows
        rel = near - c
        if flip:
            rel = rel * np.array([-1.0, 1.0])
        fwd = _rotation(angle)
        for nx, ny in rel @ fwd.T:
            err = err + 1e3 * (err.mean() + 1) * (np.hypot(dx - nx, dy - ny) < 20)
    alpha = _disc_alpha(err, dx, dy, rng)
    image[cy - r:cy + r + 1, cx - r:cx + r + 1] = _blend(disc, bg, alpha, dist, np.clip(pad, 0, 1))


def _blend(disc: np.ndarray, bg: np.ndarray, alpha: np.ndarray, dist: np.ndarray, pad: np.ndarray) -> np.ndarray:
    """Two-band blend: fine detail switches along the cut (``alpha``), while the coarse band (colour and
    shading, Gaussian sigma LOW_SIGMA) fades from the disc to the background over [LOW_RAMP] px, so no
    step of local mean or a dip of contrast marks the disc's edge. Padding is background in both bands."""
    keep = (1 - pad)[..., None]
    disc = keep * disc + (1 - keep) * bg
    low_d, low_b = (ndimage.gaussian_filter(x, (LOW_SIGMA, LOW_SIGMA, 0), mode="nearest") for x in (disc, bg))
    a_low = (_ramp((2 * dist - LOW_RAMP[0] - LOW_RAMP[1]) / (LOW_RAMP[0] - LOW_RAMP[1])) * keep[..., 0])[..., None]
    a_high = (alpha * keep[..., 0])[..., None]
    return a_low * low_d + (1 - a_low) * low_b + a_high * (disc - low_d) + (1 - a_high) * (bg - low_b)


def _disc_alpha(err: np.ndarray, dx: np.ndarray, dy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1 inside a closed minimum-error path around the centre (radius within CUT_RADII, changing by at
    most 1 px per step of 360°/ANGLES), 0 outside, with a cosine ramp of DISC_FEATHER px across it."""
    r = (err.shape[0] - 1) // 2
    t = np.arange(ANGLES) * 2 * np.pi / ANGLES
    radii = np.arange(CUT_RADII[0], CUT_RADII[1] + 1)
    rows = r + np.sin(t)[:, None] * radii[None, :]
    cols = r + np.cos(t)[:, None] * radii[None, :]
    polar = ndimage.map_coordinates(err, [rows, cols], order=1)
    polar = polar / (polar.mean() + 1e-6) + rng.uniform(0, 0.3, size=polar.shape)
    path = radii[_closed_path(polar)].astype(np.float64)
    theta = np.mod(np.arctan2(dy, dx), 2 * np.pi) / (2 * np.pi) * ANGLES
    i0 = np.floor(theta).astype(int) % ANGLES
    frac = theta - np.floor(theta)
    edge = path[i0] * (1 - frac) + path[(i0 + 1) % ANGLES] * frac
    return _ramp((edge - np.hypot(dx, dy)) / DISC_FEATHER)


def _closed_path(cost: np.ndarray) -> np.ndarray:
    """Index per row of the cheapest closed path through ``cost`` (steps x states): consecutive rows,
    and the last and first, differ by at most 1. Every start state is tried at once."""
    steps, n = cost.shape
    total = np.full((n, n), np.inf)  # [start, current]
    total[np.arange(n), np.arange(n)] = cost[0]
    moves = np.zeros((steps, n, n), dtype=np.int8)
    inf = np.full((n, 1), np.inf)
    for s in range(1, steps):
        options = np.stack([np.hstack([inf, total[:, :-1]]), total, np.hstack([total[:, 1:], inf])])  # from j-1, j, j+1
        moves[s] = options.argmin(axis=0)
        total = options.min(axis=0) + cost[s][None, :]
    closing = np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) <= 1
    start, j = np.unravel_index(int(np.argmin(np.where(closing, total, np.inf))), total.shape)
    path = np.empty(steps, dtype=int)
    path[-1] = j
    for s in range(steps - 1, 0, -1):
        j = j + int(moves[s, start, j]) - 1
        path[s - 1] = j
    return path
