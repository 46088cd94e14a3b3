"""The self-contained HTML report of one analysed slide (``mitotype analyze``).

One file holds it all, as the other reports do (:mod:`mitotype.evaluation.html_report`): the
counts, the thumbnail with the tissue mask, the figures and the hotspot windows, the detection
heat-map, and a gallery of the figures called atypical, every image inlined as base64 PNG under a
Content-Security-Policy that forbids scripts and requests; every string from data is escaped.
Pure drawing: the caller gives the thumbnail, the mask and positions in thumbnail pixels.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

import mitotype
from mitotype._io import write_text
from mitotype.evaluation.html_report import CSP, CSS, esc

MAX_SIDE = 1024  # thumbnail pixels shown at most per side (larger ones are shrunk)
MIN_SIDE = 480  # small thumbnails are enlarged to this (nearest neighbour)
HEAT_GRID = 256  # the heat-map's density grid: pixels on its long side at most
GLASS_TINT = np.array([70, 110, 160], dtype=np.float32)  # blue-grey over what the mask calls glass
COLOURS = {"atypical": (220, 50, 47), "normal": (38, 139, 210), "mitosis": (255, 200, 0)}
EXTRA_CSS = (".views{display:flex;flex-wrap:wrap;gap:16px}.views figure{width:auto;max-width:100%;font-size:12px}"
             ".views figure img{width:auto;height:auto;max-width:100%;image-rendering:auto;border:1px solid #bbb}")


@dataclass(frozen=True)
class Box:
    """A hotspot window in thumbnail pixels (x0, y0, x1, y1), its name and colour."""

    name: str
    box: tuple[float, float, float, float]
    colour: tuple[int, int, int]


def write_slide_report(
    path: Path, *, title: str, summary: Sequence[tuple[str, Any]], thumbnail: np.ndarray, mask: np.ndarray,
    points: np.ndarray, labels: Sequence[str], boxes: Sequence[Box], gallery: Sequence[tuple[np.ndarray, str]],
    models: Sequence[tuple[str, Any]], notes: Sequence[str] = (), heat_sigma_px: float = 8.0,
) -> None:
    """Write the report: ``summary`` and ``models`` as key/value tables; ``points`` ((N, 2), thumbnail
    pixels) with their ``labels`` drawn on the thumbnail and summed into the heat-map; ``gallery``
    the patches shown with their captions; ``notes`` (warnings) above the counts."""
    scale = _scale(thumbnail.shape[:2])
    overview = _overview(thumbnail, mask, points, labels, boxes, scale)
    heat = _heatmap(thumbnail, mask, points, boxes, scale, heat_sigma_px)
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    legend = " · ".join(f"<span style='color:rgb{b.colour}'>■</span> {esc(b.name)}" for b in boxes)
    body = [f"<h1>{esc(title)}</h1><div class='sub'>mitotype {esc(mitotype.__version__)} · {esc(when)}</div>",
            *(f"<div class='warn'>{esc(n)}</div>" for n in notes),
            "<h2>Counts</h2>", _kv_table(summary, "summary"),
            "<h2>Slide</h2><div class='views'>",
            f"<figure>{_img(overview, 'overview', 'thumbnail with tissue mask, figures and hotspots')}<figcaption>tissue "
            "(glass tinted blue-grey), figures (red atypical, blue normal), hotspot windows: " + legend + "</figcaption></figure>",
            f"<figure>{_img(heat, 'heatmap', 'detection heat-map')}<figcaption>detection density (figures per area, "
            "smoothed) over the thumbnail; hotspot windows: " + legend + "</figcaption></figure></div>",
            f"<h2>Figures called atypical ({len(gallery)} shown)</h2>", _gallery(gallery),
            "<h2>Models</h2>", _kv_table(models, "models")]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>{esc(title)}</title>'
            f"<style>{CSS}{EXTRA_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    write_text(path, page)


def _scale(shape: tuple[int, ...]) -> float:
    longest, shortest = max(shape[:2]), min(shape[:2])
    if longest > MAX_SIDE:
        return MAX_SIDE / longest
    return max(1.0, min(MIN_SIDE / max(shortest, 1), MAX_SIDE / longest))


def _resized(rgb: np.ndarray, scale: float) -> Image.Image:
    im = Image.fromarray(rgb)
    if scale == 1:
        return im
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BOX)


def _overview(thumbnail: np.ndarray, mask: np.ndarray, points: np.ndarray, labels: Sequence[str], boxes: Sequence[Box],
              scale: float) -> bytes:
    rgb = thumbnail.copy()
    for i in range(3):  # glass tinted, one plane at a time (float32 planes of the view, not float64 copies)
        tinted = (thumbnail[..., i].astype(np.float32) * 0.45 + 0.55 * GLASS_TINT[i]).round().astype(np.uint8)
        rgb[..., i] = np.where(mask, thumbnail[..., i], tinted)
    im = _resized(rgb, scale)
    draw = ImageDraw.Draw(im)
    r = 4.0  # display pixels
    for (x, y), label in zip(np.asarray(points, dtype=float).reshape(-1, 2), labels):
        cx, cy = x * scale, y * scale
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=COLOURS.get(label, COLOURS["mitosis"]), width=2)
    _draw_boxes(draw, boxes, scale)
    return _jpeg(im)


def _heatmap(thumbnail: np.ndarray, mask: np.ndarray, points: np.ndarray, boxes: Sequence[Box], scale: float, sigma: float) -> bytes:
    """Figures per area, smoothed, in warm colours over a pale grey copy of the slide. The density is
    smooth, so it is computed on a grid of at most HEAT_GRID pixels a side and enlarged."""
    from scipy.ndimage import gaussian_filter

    h, w = mask.shape
    k = max(1, math.ceil(max(h, w) / HEAT_GRID))
    counts = np.zeros((math.ceil(h / k), math.ceil(w / k)), dtype=np.float32)
    xy = np.asarray(points, dtype=float).reshape(-1, 2)
    if len(xy):
        c = np.clip(xy[:, 0].astype(int), 0, w - 1) // k
        r = np.clip(xy[:, 1].astype(int), 0, h - 1) // k
        np.add.at(counts, (r, c), 1.0)
    level = gaussian_filter(counts, sigma / k, mode="constant")
    if level.max() > 0:
        level /= level.max()
    lv = Image.fromarray((level * 255).round().astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    heat = Image.merge("RGB", (lv.point(lambda v: min(255, 2 * v)), lv.point(lambda v: max(0, 2 * v - 255)),
                               lv.point(lambda v: 40 * (255 - v) // 255)))
    grey = Image.fromarray(thumbnail).convert("L").point(lambda v: v // 2 + 110).convert("RGB")
    im = _resized(np.asarray(Image.composite(heat, grey, lv.point(lambda v: min(217, v * 3 // 2)))), scale)
    _draw_boxes(ImageDraw.Draw(im), boxes, scale)
    return _jpeg(im)


def _draw_boxes(draw: ImageDraw.ImageDraw, boxes: Sequence[Box], scale: float) -> None:
    for b in boxes:
        x0, y0, x1, y1 = (v * scale for v in b.box)
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=b.colour, width=max(2, round(scale)))


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(im: Image.Image) -> bytes:
    """The slide views: photographs, so JPEG (4:4:4, quality 90: the rings stay sharp) encodes them in
    a tenth of PNG's time, which on a small slide is a tenth of the analysis."""
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, subsampling=0)
    return buf.getvalue()


def _img(data: bytes, ident: str, alt: str) -> str:
    where = f" id='{ident}'" if ident else ""
    mime = "jpeg" if data[:2] == b"\xff\xd8" else "png"
    return f"<img{where} alt='{esc(alt)}' src='data:image/{mime};base64,{base64.b64encode(data).decode()}'>"


def _kv_table(rows: Sequence[tuple[Any, Any]], ident: str) -> str:
    cells = "".join(f"<tr><td class='k'>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows)
    return f"<table id='{ident}'>{cells}</table>"


def _gallery(items: Sequence[tuple[np.ndarray, str]]) -> str:
    if not items:
        return "<div class='note' id='gallery-atypical'>none</div>"
    figs = [f"<figure>{_img(_png(Image.fromarray(patch)), '', 'figure')}<figcaption>{esc(caption)}</figcaption></figure>"
            for patch, caption in items]
    return f"<div class='gallery' id='gallery-atypical'>{''.join(figs)}</div>"
