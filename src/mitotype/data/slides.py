"""Crop a patch centred on a point, at the model's microns per pixel, from a plain image or a slide.

A point is (x, y) in level-0 pixels of its image. The patch covers ``patch_size * model_mpp``
microns: a slide is read at the pyramid level whose mpp is the largest not above the model's (the
finest detail is never thrown away before the final resize, and no level finer than needed is
decoded), over the region that spans those microns at that level, then resized to the patch size
(area averaging when shrinking, as a pyramid is built; bilinear when enlarging). Pixels outside the
image are white (255): empty glass, what a scanner shows beyond the tissue, rather than a reflection
that would invent tissue next to the border.

Centre convention: the point lands on pixel ``(patch_size // 2, patch_size // 2)`` of the patch
(coordinates rounded half up), so even and odd patch sizes put it where a reader expects.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from mitotype.data.images import BadImage
from mitotype.errors import MitotypeError

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".svslide"}
PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
DEFAULT_MODEL_MPP = 0.25  # the AMi-Br patches: MIDOG 2021 / TUPAC16 slides scanned at 0.25 um/px
BACKGROUND = 255
MPP_TOLERANCE = 1e-3  # relative: a level at 0.2502 um/px counts as 0.25


def is_slide(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SLIDE_SUFFIXES


def choose_level(level_mpps: Sequence[float], target_mpp: float) -> int:
    """The level whose mpp is the largest not above ``target_mpp``; level 0 when all are coarser."""
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= target_mpp * (1 + MPP_TOLERANCE)]
    return max(fine_enough, key=lambda i: level_mpps[i]) if fine_enough else int(np.argmin(level_mpps))


def region_side(patch_size: int, target_mpp: float, level_mpp: float) -> int:
    """Pixels at ``level_mpp`` that span the microns of ``patch_size`` pixels at ``target_mpp``."""
    ratio = target_mpp / level_mpp
    if abs(ratio - 1) <= MPP_TOLERANCE:
        return patch_size
    return max(1, int(math.floor(patch_size * ratio + 0.5)))


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


class Source:
    """An image at one or more resolutions; subclasses read an in-bounds box of a level."""

    path: Path
    dimensions: tuple[int, int]  # level-0 (width, height)
    level_mpps: list[float]
    downsamples: list[float]

    def read_box(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def level_dimensions(self, level: int) -> tuple[int, int]:
        w, h = self.dimensions
        ds = self.downsamples[level]
        return int(math.ceil(w / ds - 1e-9)), int(math.ceil(h / ds - 1e-9))

    def close(self) -> None:
        pass

    def crop(self, x: float, y: float, patch_size: int, target_mpp: float) -> np.ndarray:
        """(patch_size, patch_size, 3) uint8 centred on level-0 point (x, y), covering the model's microns."""
        level = choose_level(self.level_mpps, target_mpp)
        side = region_side(patch_size, target_mpp, self.level_mpps[level])
        ds = self.downsamples[level]
        x0, y0 = _round_half_up(x / ds) - side // 2, _round_half_up(y / ds) - side // 2
        region = self.padded(level, x0, y0, side)
        if side == patch_size:
            return region
        resample = Image.Resampling.BOX if side > patch_size else Image.Resampling.BILINEAR
        return np.asarray(Image.fromarray(region).resize((patch_size, patch_size), resample), dtype=np.uint8)

    def size_at(self, target_mpp: float) -> tuple[int, int]:
        """(width, height) of the whole image in pixels of ``target_mpp``."""
        scale = self.level_mpps[0] / target_mpp
        w, h = self.dimensions
        return max(1, int(math.floor(w * scale + 1e-6))), max(1, int(math.floor(h * scale + 1e-6)))

    def region(self, box: tuple[int, int, int, int], target_mpp: float) -> np.ndarray:
        """The in-bounds box (x0, y0, x1, y1) of the image as it would be at ``target_mpp`` (pixels of
        that resolution): read at the level :func:`choose_level` picks, resized like :meth:`crop`.
        Detection tiles come from here, so a tile costs its own pixels whatever the slide's size."""
        x0, y0, x1, y1 = box
        level = choose_level(self.level_mpps, target_mpp)
        f = target_mpp / self.level_mpps[level]  # level pixels per target pixel
        lw, lh = self.level_dimensions(level)
        if abs(f - 1) <= MPP_TOLERANCE:
            return self.read_box(level, max(0, x0), max(0, y0), min(x1, lw), min(y1, lh))
        bx0, by0 = max(0, int(math.floor(x0 * f))), max(0, int(math.floor(y0 * f)))
        bx1, by1 = min(lw, max(bx0 + 1, int(math.ceil(x1 * f)))), min(lh, max(by0 + 1, int(math.ceil(y1 * f))))
        resample = Image.Resampling.BOX if f > 1 else Image.Resampling.BILINEAR
        return np.asarray(Image.fromarray(self.read_box(level, bx0, by0, bx1, by1)).resize((x1 - x0, y1 - y0), resample), dtype=np.uint8)

    def padded(self, level: int, x0: int, y0: int, side: int) -> np.ndarray:
        """The (side, side) box at (x0, y0) of ``level``; what lies outside the image is BACKGROUND."""
        w, h = self.level_dimensions(level)
        out = np.full((side, side, 3), BACKGROUND, dtype=np.uint8)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
        if cx0 < cx1 and cy0 < cy1:
            out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = self.read_box(level, cx0, cy0, cx1, cy1)
        return out


class PlainSource(Source):
    """A PNG/JPEG decoded once into memory, at ``mpp`` (the model's unless the user says otherwise)."""

    def __init__(self, path: str | Path, mpp: float) -> None:
        self.path = Path(path)
        self.array = _decode_rgb(self.path)
        self.dimensions = (self.array.shape[1], self.array.shape[0])
        self.level_mpps, self.downsamples = [float(mpp)], [1.0]

    def read_box(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self.array[y0:y1, x0:x1]

    def close(self) -> None:
        self.array = np.empty((0, 0, 3), dtype=np.uint8)


def _decode_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA", "P"):
                raise BadImage(f"{path}: {im.mode} image; expected 8-bit RGB H&E")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(f"{path}: cannot decode image ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    return str(err).splitlines()[0][:120] if str(err) else type(err).__name__


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of a plain image from its header, without decoding pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"{path}: cannot read image header ({_reason(err)})") from None


class _SlideSource(Source):
    """What tiffslide and OpenSlide slides share: an opened ``slide`` with levels, downsamples, mpp."""

    slide: Any

    def _levels(self, mpp: Any) -> None:
        """Level geometry from the slide and its level-0 microns per pixel (closes it if there is none)."""
        if not mpp or not math.isfinite(float(mpp)) or float(mpp) <= 0:
            self.slide.close()
            raise _no_mpp(self.path)
        self.dimensions = tuple(self.slide.dimensions)
        self.downsamples = [float(d) for d in self.slide.level_downsamples]
        self.level_mpps = [float(mpp) * d for d in self.downsamples]

    def level_dimensions(self, level: int) -> tuple[int, int]:
        return tuple(self.slide.level_dimensions[level])

    def close(self) -> None:
        self.slide.close()


class TiffSlideSource(_SlideSource):
    """A slide read with tiffslide; each level is read through its zarr array (no whole-level decode)."""

    def __init__(self, path: str | Path, slide_mpp: float | None = None) -> None:
        import tiffslide

        self.path = Path(path)
        self.slide = tiffslide.TiffSlide(str(path))
        self.axes = self.slide.properties.get("tiffslide.series-axes", "YXS")
        self._levels(self.slide.properties.get("tiffslide.mpp-x") or slide_mpp)

    def read_box(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        array = self.slide.zarr_group[str(level)]  # one view per thread (tiffslide's), so threads read in parallel
        if self.axes == "CYX":
            box = np.moveaxis(np.asarray(array[:, y0:y1, x0:x1]), 0, -1)
        elif self.axes == "YX":
            box = np.asarray(array[y0:y1, x0:x1])[..., None]
        else:
            box = np.asarray(array[y0:y1, x0:x1])
        return _as_rgb8(box, self.path)


class OpenSlideSource(_SlideSource):
    """A slide tiffslide cannot open (e.g. .mrxs), read with OpenSlide where it is installed."""

    def __init__(self, path: str | Path, slide_mpp: float | None = None) -> None:
        import openslide

        self.path = Path(path)
        self.slide = openslide.OpenSlide(str(path))
        self._levels(self.slide.properties.get("openslide.mpp-x") or slide_mpp)

    def read_box(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        ds = self.downsamples[level]
        rgba = self.slide.read_region((_round_half_up(x0 * ds), _round_half_up(y0 * ds)), level, (x1 - x0, y1 - y0))
        white = Image.new("RGBA", rgba.size, (BACKGROUND,) * 4)
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)


def _no_mpp(path: str | Path) -> MitotypeError:
    return MitotypeError(f"{path}: the slide does not say its microns per pixel (give {{slide_mpp}})", options=("slide_mpp",))


def _as_rgb8(box: np.ndarray, path: Path) -> np.ndarray:
    if box.dtype != np.uint8:
        raise BadImage(f"{path}: {box.dtype} pixels; expected 8-bit RGB")
    if box.shape[-1] == 1:
        raise BadImage(f"{path}: greyscale slide; expected 8-bit RGB H&E")
    return np.ascontiguousarray(box[..., :3])


def open_slide(path: str | Path, slide_mpp: float | None = None) -> Source:
    """tiffslide first; OpenSlide for what it cannot open, where OpenSlide is installed."""
    try:
        return TiffSlideSource(path, slide_mpp)
    except MitotypeError:
        raise
    except Exception as err:
        reason = _reason(err)
    try:
        import openslide  # noqa: F401
    except ImportError:
        raise BadImage(f"{path}: tiffslide cannot read this slide ({reason}); pip install 'mitotype[openslide]' for this format") from None
    try:
        return OpenSlideSource(path, slide_mpp)
    except MitotypeError:
        raise
    except Exception as err:
        raise BadImage(f"{path}: neither tiffslide nor OpenSlide can read this slide ({_reason(err)})") from None


def open_source(path: str | Path, *, image_mpp: float, slide_mpp: float | None = None) -> Source:
    """A slide (by suffix) through :func:`open_slide`; any other image decoded whole at ``image_mpp``."""
    return open_slide(path, slide_mpp) if is_slide(path) else PlainSource(path, image_mpp)


def model_mpp(mpps: Sequence[float | None]) -> float:
    """The mpp the models were trained at (their cards'); DEFAULT_MODEL_MPP with a warning when unknown."""
    known = {round(float(m), 6) for m in mpps if m is not None}
    if len(known) > 1:
        raise MitotypeError(f"ensemble members were trained at different microns per pixel: {sorted(known)}")
    if not known:
        warnings.warn(f"the model card does not say its microns per pixel (build.mpp); assuming {DEFAULT_MODEL_MPP} um/px",
                      stacklevel=2)
        return DEFAULT_MODEL_MPP
    return known.pop()
