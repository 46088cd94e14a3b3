"""Point readers: mitotic-figure coordinates over images or slides, in, one point table out.

Understood formats (detected from the path)
- a CSV file ``image, x, y[, label]`` (any other column passes through); image names resolve
  against ``images`` (a folder) or else the CSV's folder; ``filename``/``file_name``/``slide`` name
  the image column too;
- the MitDet layout: a folder with ``png/NAME.png`` and ``csv/NAME.csv`` (x, y rows, header optional);
- the ICPR 2012 (MITOS) layout: a folder of images with same-stem CSVs (``A00_01.bmp`` and
  ``A00_01.csv``), no header, each line one mitosis as the flat list ``x1,y1,x2,y2,...`` of the
  pixels it covers; the point is their centroid (see :func:`_read_icpr` for the x, y order);
- a MIDOG-style COCO JSON (``.json``): ``images[]`` (id, file_name, width, height),
  ``annotations[]`` (image_id, bbox, category_id) and ``categories[]``; the point is the box centre.
  MIDOG writes boxes as ``[x1, y1, x2, y2]`` although COCO's convention is ``[x, y, w, h]``:
  ``bbox_format="auto"`` takes corners when every box has x2 > x1 and y2 > y1, else (x, y, w, h).
  A category named atypical/normal gives the label; non-mitotic ones (hard negative, imposter,
  non-mitotic) are not mitoses and are left out with a warning; any other is unknown.

The table has ``image, x, y, label`` (1 atypical, 0 normal, -1 unknown) first, then every other
input column, then ``image_path`` (the resolved file). Coordinates are level-0 pixels.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mitotype.data.manifest import UNLABELLED, parse_label, read_csv_checked
from mitotype.data.slides import is_slide, image_size
from mitotype.errors import MitotypeError

FORMATS = ("a CSV (image, x, y[, label]), a MitDet folder (png/ + csv/), an ICPR 2012 folder (images with same-stem "
           "pixel-list CSVs) or a MIDOG/COCO JSON")
ICPR_IMAGE_SUFFIXES = (".bmp", ".png", ".tif", ".tiff", ".jpg", ".jpeg")  # preferred first when one stem has several
IMAGE_NAMES = ("image", "filename", "file_name", "file", "slide")
RESERVED = ("p_atypical", "true_label", "image_path")  # columns the output adds
NON_MITOTIC = ("hard negative", "imposter", "non-mitotic", "nonmitotic", "non mitotic", "mimic")


@dataclass
class PointTable:
    """The points, where each came from (``where[i]``: "FILE row N", for messages) and every image
    the input names, with or without points (so a summary can say 0)."""

    table: pd.DataFrame
    where: list[str]
    images: list[tuple[str, str]]  # (image, image_path), in input order
    layout: str


def read_points(path: str | Path, images: str | Path | None = None, *, skip_missing: bool = False,
                bbox_format: str = "auto", negatives: bool = False) -> PointTable:
    """Read any understood point format, check every row and image, and return the point table.

    MIDOG's hard-negative (look-alike) annotations are left out, with a warning, unless
    ``negatives``: then they are kept, and a ``mitotic`` column says 1 for figures, 0 for them
    (what a detector's training set wants: look-alikes a pathologist marked)."""
    path = Path(path)
    if images is not None and not Path(images).is_dir():
        raise MitotypeError(f"{{images}} {images}: not a folder", options=("images",))
    if path.is_dir() and (path / "png").is_dir() and (path / "csv").is_dir():
        points = _read_mitdet(path)
    elif path.is_dir() and _icpr_pairs(path):
        points = _read_icpr(path)
    elif path.is_file() and path.suffix.lower() == ".json":
        points = _read_coco(path, Path(images) if images else path.parent, bbox_format, negatives)
    elif path.is_file() and path.suffix.lower() == ".csv":
        points = _read_csv(path, Path(images) if images else path.parent)
    elif not path.exists():
        raise MitotypeError(f"{path}: no such file or folder")
    else:
        raise MitotypeError(f"{path}: point format not understood; expected {FORMATS}")
    return _check_images(points, skip_missing)


def _read_csv(path: Path, folder: Path) -> PointTable:
    df = read_csv_checked(path, dtype=object, keep_default_na=False)
    lower = {str(c).strip().lower(): c for c in df.columns}
    image_col = next((lower[n] for n in IMAGE_NAMES if n in lower), None)
    missing = [name for name, col in (("image", image_col), ("x", lower.get("x")), ("y", lower.get("y"))) if col is None]
    if missing:
        found = ", ".join(map(str, df.columns))
        raise MitotypeError(f"{path}: missing column(s) {', '.join(missing)}; expected image, x, y[, label] (found {found})")
    renames = {image_col: "image", lower["x"]: "x", lower["y"]: "y"}
    if "label" in lower:
        renames[lower["label"]] = "label"
    df = df.rename(columns=renames)
    where = [f"{path} row {i + 2}" for i in range(len(df))]
    df["image"] = df["image"].astype(str).str.strip()
    empty = np.flatnonzero(df["image"].to_numpy() == "")
    if len(empty):
        raise MitotypeError(f"{where[empty[0]]}: empty image name")
    paths = [_resolve(folder, name) for name in df["image"]]
    names = list(dict.fromkeys(df["image"]))
    return _finish(df, where, paths, [(n, _resolve(folder, n)) for n in names], f"point CSV {path.name}")


def _resolve(folder: Path, name: str) -> str:
    p = Path(name)
    return str(p if p.is_absolute() else folder / p)


def _read_mitdet(root: Path) -> PointTable:
    pngs = {p.stem: p for p in sorted((root / "png").glob("*.png"))}
    csvs = {p.stem: p for p in sorted((root / "csv").glob("*.csv"))}
    frames, where, paths = [], [], []
    for stem in sorted(set(pngs) | set(csvs)):
        image_path = pngs.get(stem, root / "png" / f"{stem}.png")
        if stem not in csvs:
            continue  # an image without a csv has no points; it is still listed in the summary
        df, first_row = _xy_rows(csvs[stem])
        df.insert(0, "image", f"{stem}.png")
        frames.append(df)
        where += [f"{csvs[stem]} row {first_row + i}" for i in range(len(df))]
        paths += [str(image_path)] * len(df)
    if not pngs and not csvs:
        raise MitotypeError(f"{root}: MitDet folder with no png/*.png and no csv/*.csv")
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["image", "x", "y"])
    images = [(f"{s}.png", str(pngs.get(s, root / "png" / f"{s}.png"))) for s in sorted(set(pngs) | set(csvs))]
    return _finish(df, where, paths, images, "MitDet folder (png/ + csv/)")


def _xy_rows(csv_path: Path) -> tuple[pd.DataFrame, int]:
    """A MitDet csv: ``x,y`` rows with or without a header; returns the rows and the first data line."""
    if not csv_path.stat().st_size:
        return pd.DataFrame(columns=["x", "y"]), 1
    raw = read_csv_checked(csv_path, header=None, dtype=object, keep_default_na=False)
    if raw.empty:
        return pd.DataFrame(columns=["x", "y"]), 1
    first = [str(v).strip().lower() for v in raw.iloc[0]]
    if "x" in first and "y" in first:
        df = raw.iloc[1:].reset_index(drop=True)
        df.columns = [c if c in ("x", "y", "label") else str(raw.iloc[0, i]) for i, c in enumerate(first)]
        return df, 2
    if raw.shape[1] < 2:
        raise MitotypeError(f"{csv_path}: expected x, y columns (found {raw.shape[1]} column)")
    raw.columns = ["x", "y", *[f"col{i}" for i in range(2, raw.shape[1])]]
    return raw, 1


def _icpr_pairs(folder: Path) -> dict[str, tuple[Path, Path]]:
    """stem -> (image, csv) for each CSV of ``folder`` with a same-stem image beside it."""
    pairs = {}
    for csv_path in sorted(folder.glob("*.csv")):
        images = {p.suffix.lower(): p for p in folder.glob(f"{_glob_literal(csv_path.stem)}.*") if p.is_file()}
        image = next((images[s] for s in ICPR_IMAGE_SUFFIXES if s in images), None)
        if image is not None and csv_path.is_file():
            pairs[csv_path.stem] = (image, csv_path)
    return pairs


def _glob_literal(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _read_icpr(folder: Path) -> PointTable:
    """The ICPR 2012 mitosis layout: ``NAME.csv`` beside ``NAME.bmp`` (or .png/.tif/.jpg), no header,
    one line per mitosis listing the pixels it covers as ``x1,y1,x2,y2,...``; the point is the mean
    of those pixels. An empty CSV (or one of blank lines) is an image without mitoses. Only images
    with a CSV are listed.

    The order x (column) then y (row) is an assumption: the organisers' own description of the
    files was not found; readers of the dataset in public code take the pairs as (x, y) and draw
    them so (e.g. ``cv2.fillPoly``). MITOS 2012 frames are square or nearly so, so the bounds check
    cannot tell a swapped order.
    """
    frames, where, paths, images = [], [], [], []
    for image, csv_path in _icpr_pairs(folder).values():
        rows, lines = [], []
        try:
            text = csv_path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise MitotypeError(f"{csv_path}: not a readable CSV ({type(err).__name__})") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            rows.append(_icpr_line(line, csv_path, n))
            lines.append(n)
        if rows:
            frames.append(pd.DataFrame({"image": image.name, "x": [r[0] for r in rows], "y": [r[1] for r in rows],
                                        "n_pixels": [r[2] for r in rows]}))
        where += [f"{csv_path} line {n}" for n in lines]
        paths += [str(image)] * len(rows)
        images.append((image.name, str(image)))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["image", "x", "y", "n_pixels"])
    return _finish(df, where, paths, images, "ICPR 2012 folder (images + pixel-list CSVs)")


def _icpr_line(line: str, csv_path: Path, n: int) -> tuple[float, float, int]:
    """The centroid (x, y) and pixel count of one ICPR line ``x1,y1,x2,y2,...`` (a trailing comma is allowed)."""
    fields = [f.strip() for f in line.split(",")]
    if fields and fields[-1] == "":
        fields = fields[:-1]
    values = []
    for f in fields:
        try:
            values.append(int(f))
        except ValueError:
            raise MitotypeError(f"{csv_path} line {n}: '{f[:40]}' is not an integer pixel coordinate; "
                                "expected x1,y1,x2,y2,... (ICPR 2012 pixel list)") from None
    if any(v < 0 for v in values):
        raise MitotypeError(f"{csv_path} line {n}: pixel coordinate {min(values)} is negative; expected pixels from the top left")
    if not values or len(values) % 2:
        raise MitotypeError(f"{csv_path} line {n}: {len(values)} value(s); expected an even number, x1,y1,x2,y2,... (ICPR 2012 pixel list)")
    xy = np.asarray(values, dtype=np.float64).reshape(-1, 2)
    return float(xy[:, 0].mean()), float(xy[:, 1].mean()), len(xy)


def _read_coco(path: Path, folder: Path, bbox_format: str, negatives: bool = False) -> PointTable:
    if bbox_format not in ("auto", "xyxy", "xywh"):
        raise MitotypeError(f"{{bbox_format}} '{bbox_format}': must be auto, xyxy or xywh", options=("bbox_format",))
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MitotypeError(f"{path}: not a readable JSON file ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise MitotypeError(f"{path}: expected a COCO JSON object with images[] and annotations[]")
    cats = {c.get("id"): str(c.get("name", "")) for c in data.get("categories", []) if isinstance(c, dict)}
    images = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise MitotypeError(f"{path} images[{i}]: expected id and file_name")
        images[im["id"]] = im
    rows, where, dropped = [], [], 0
    boxes: list[list[float]] = []
    for i, ann in enumerate(data["annotations"]):
        box = ann.get("bbox") if isinstance(ann, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and all(_finite(v) for v in box)):
            raise MitotypeError(f"{path} annotations[{i}]: bbox {box!r} is not 4 numbers")
        boxes.append(box)
    corners = bbox_format == "xyxy" or (bbox_format == "auto" and all(b[2] > b[0] and b[3] > b[1] for b in boxes))
    for i, ann in enumerate(data["annotations"]):
        im = images.get(ann.get("image_id"))
        if im is None:
            raise MitotypeError(f"{path} annotations[{i}]: image_id {ann.get('image_id')!r} is not in images[]")
        name = cats.get(ann.get("category_id"), "")
        mitotic = not any(word in name.lower() for word in NON_MITOTIC)
        if not mitotic and not negatives:
            dropped += 1
            continue
        x0, y0, a, b = (float(v) for v in ann["bbox"])
        x, y = ((x0 + a) / 2, (y0 + b) / 2) if corners else (x0 + a / 2, y0 + b / 2)
        rows.append({"image": im["file_name"], "x": x, "y": y, "label": _category_label(name) if mitotic else UNLABELLED,
                     "mitotic": int(mitotic),
                     "annotation_id": ann.get("id", i), "image_id": ann.get("image_id"), "category": name,
                     "_w": im.get("width"), "_h": im.get("height")})
        where.append(f"{path} annotations[{i}]")
    if dropped:
        warnings.warn(f"{path}: left out {dropped} non-mitotic annotation(s) (hard negatives / imposters)", stacklevel=3)
    columns = ["image", "x", "y", "label", "mitotic", "annotation_id", "image_id", "category", "_w", "_h"]
    df = pd.DataFrame(rows, columns=columns)
    if not negatives:
        df = df.drop(columns="mitotic")
    for i, (w, h, x, y) in enumerate(zip(df["_w"], df["_h"], df["x"], df["y"])):
        if _finite(w) and _finite(h) and not (x < w and y < h):
            raise MitotypeError(f"{where[i]}: point ({x:g}, {y:g}) lies outside the {w}x{h} image")
    df = df.drop(columns=["_w", "_h"])
    paths = [_resolve(folder, n) for n in df["image"]]
    listed = [(im["file_name"], _resolve(folder, im["file_name"])) for im in images.values()]
    return _finish(df, where, paths, listed, f"COCO JSON {path.name}")


def _category_label(name: str) -> int:
    text = name.lower()
    if "atypical" in text:
        return 1
    if "normal" in text and "abnormal" not in text:
        return 0
    return UNLABELLED


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _finish(df: pd.DataFrame, where: list[str], paths: list[str], images: list[tuple[str, str]], layout: str) -> PointTable:
    """Coordinates as numbers >= 0, labels parsed, columns in order; each bad value named by row."""
    clash = [c for c in RESERVED if c in df.columns]
    if clash:
        source = where[0].rsplit(" ", 2)[0] if where else layout
        raise MitotypeError(f"{source}: column '{clash[0]}' is one predict writes; rename it")
    df = df.reset_index(drop=True)
    for axis in ("x", "y"):
        values = pd.to_numeric(df[axis], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise MitotypeError(f"{where[bad[0]]}: {axis} '{df[axis].iloc[bad[0]]}' is not a number")
        neg = np.flatnonzero(values < 0)
        if len(neg):
            raise MitotypeError(f"{where[neg[0]]}: {axis} {values[neg[0]]:g} is negative; expected pixels from the top left")
        df[axis] = values
    labels = [parse_label(v, where[i]) for i, v in enumerate(df["label"])] if "label" in df else [UNLABELLED] * len(df)
    df["label"] = np.asarray(labels, dtype=np.int64)
    rest = [c for c in df.columns if c not in ("image", "x", "y", "label")]
    df = df[["image", "x", "y", "label", *rest]].copy()
    df["image_path"] = paths
    return PointTable(df, list(where), images, layout)


def _check_images(points: PointTable, skip_missing: bool) -> PointTable:
    """Images must exist (or their rows are dropped with ``skip_missing``); points on a plain image
    must lie inside it (read from its header; a slide's are checked when it is opened)."""
    df = points.table
    exists = {p: Path(p).is_file() for p in dict.fromkeys(path for _, path in points.images)}
    exists.update({p: Path(p).is_file() for p in dict.fromkeys(df["image_path"]) if p not in exists})
    ok = df["image_path"].map(exists).to_numpy(dtype=bool)
    if not ok.all():
        first = int(np.flatnonzero(~ok)[0])
        n_missing = int((~ok).sum())
        msg = f"{points.where[first]}: image {df['image_path'].iloc[first]} does not exist ({n_missing} point(s) on missing images)"
        if not skip_missing:
            raise MitotypeError(msg + " (use {skip_missing} to drop them)", options=("skip_missing",))
        warnings.warn(msg + "; dropped", stacklevel=3)
        keep = np.flatnonzero(ok)
        points = PointTable(df.iloc[keep].reset_index(drop=True), [points.where[i] for i in keep], points.images, points.layout)
    points.images = [(name, path) for name, path in points.images if exists.get(path, False)]
    for path, rows in points.table.groupby("image_path", sort=False).indices.items():
        if not is_slide(path):
            check_bounds(points, rows, image_size(path))
    return points


def check_bounds(points: PointTable, rows: np.ndarray, size: tuple[int, int]) -> None:
    """Every point of ``rows`` lies inside an image of ``size`` (width, height) at level 0."""
    w, h = size
    x, y = points.table["x"].to_numpy()[rows], points.table["y"].to_numpy()[rows]
    outside = np.flatnonzero((x >= w) | (y >= h))
    if len(outside):
        i = rows[outside[0]]
        raise MitotypeError(f"{points.where[i]}: point ({x[outside[0]]:g}, {y[outside[0]]:g}) lies outside the {w}x{h} image "
                            f"{points.table['image_path'].iloc[i]}")
