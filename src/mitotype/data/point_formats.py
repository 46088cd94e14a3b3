"""Detection writers: a table of points with scores, out in the format another tool reads.

A detection is a point ``(image, x, y)`` in level-0 pixels from the top left, with the detector's
``score`` and, when a classifier ran after the detector, ``p_atypical`` and ``label`` (a class name,
"atypical" or "normal"; 1/0 are read as those, -1 or empty as no label). Other columns pass
through where the format has room for them (csv, geojson).

Formats (:class:`~mitotype.config.PointFormat`)

- ``csv``: the table, columns ``image, x, y, score[, p_atypical, label]`` first, then the rest.
- ``geojson``: one GeoJSON FeatureCollection with a ``Point`` feature per detection and the
  properties QuPath reads (as its own GeoJSON export writes them): ``objectType`` "annotation",
  ``classification`` {name: the label or "mitosis", color: [r, g, b]}, ``name`` (the image) and
  ``measurements`` {score, p_atypical, every other numeric column}, which QuPath lists in its
  measurement table. The same values are plain properties too (``image``, ``score``,
  ``p_atypical``, ``label``, every other column) for other GeoJSON readers. QuPath imports objects
  into the image that is open and never looks at an image name, so a table over several images
  gives one file whose features each name their image: for QuPath, write one file per image with
  :func:`split_by_image`.
- ``asap``: ASAP XML as ASAP's own ``XmlRepository`` writes it: a ``Dot`` annotation per detection
  in the group of its label ("mitosis" when there is none) and those groups listed under
  ``AnnotationGroups`` (ASAP rejects a file whose annotation names an unlisted group). ASAP opens
  one XML per slide, so when the table (with ``images``) covers more than one image, or ``path``
  is an existing folder, ``path`` is a folder and one ``<image stem>.xml`` is written per image;
  otherwise ``path`` is the file.
- ``midog``: a MIDOG-style COCO JSON: ``images`` [{id, file_name}], ``categories`` [{1, "mitotic
  figure"}] and ``annotations`` [{id, image_id, category_id 1, bbox, score[, p_atypical, label]}],
  the bbox MIDOG's ``[x1, y1, x2, y2]`` square centred on the point and not clipped at the border.
  The category stays "mitotic figure" whatever the label, so MIDOG tools count every detection;
  label and p_atypical are extra fields. :func:`mitotype.data.points.read_points` reads the file
  back to the same points. The box is ``2 * radius_px`` pixels across at MIDOG's 0.25 µm/px (50 px,
  12.5 µm); ``mpp`` gives the images' µm per pixel when it differs, and the box keeps its size in
  microns (``mpp`` is used by this format only).

Every file is written atomically (a reader never sees half of one); a folder of ASAP files is
written file by file.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from mitotype._io import atomic_path, write_csv, write_json
from mitotype.config import PointFormat
from mitotype.errors import MitotypeError

CORE = ("image", "x", "y", "score")
OPTIONAL = ("p_atypical", "label")
WHAT = "detection table"
NO_LABEL = "mitosis"  # the class of a detection no classifier labelled
MIDOG_MPP = 0.25  # µm per pixel of MIDOG's images, where radius_px is counted
MIDOG_CATEGORY = "mitotic figure"
COLORS = {"mitosis": (255, 200, 0), "atypical": (220, 50, 47), "normal": (38, 139, 210)}
OTHER_COLOR = (128, 128, 128)
GEOJSON_KEYS = ("objectType", "classification", "name", "measurements", "metadata", "color", "isLocked", "isMissing", "image")


def write_points(table: pd.DataFrame, path: str | Path, fmt: PointFormat | str, *, mpp: float | None = None,
                 radius_px: float = 25.0, images: Iterable[str] = ()) -> None:
    """Write the detections of ``table`` to ``path`` in ``fmt`` (see the module's text for each format).

    ``images`` names images to list although they have no detection (an image entry in midog, an
    empty ASAP file); the table's own images always come in. Bad input raises :class:`MitotypeError`
    naming the column, the row (``detections[i]``, counting rows of the table from 0) or the option.
    """
    form = point_format(fmt)
    half = _half_side(mpp, radius_px)
    df = check_detections(table)
    names = list(dict.fromkeys([*(str(n) for n in images), *df["image"]]))
    path = Path(path)
    if form is PointFormat.csv:
        write_csv(path, df)
    elif form is PointFormat.geojson:
        write_json(path, geojson_collection(df))
    elif form is PointFormat.asap:
        _write_asap(df, path, names)
    else:
        write_json(path, midog_json(df, half=half, images=names, mpp=mpp))


def point_format(fmt: PointFormat | str) -> PointFormat:
    if isinstance(fmt, PointFormat):
        return fmt
    try:
        return PointFormat(str(fmt).strip().lower())
    except ValueError:
        choices = ", ".join(f.value for f in PointFormat)
        raise MitotypeError(f"{{fmt}} '{fmt}': must be one of {choices}", options=("fmt",)) from None


def split_by_image(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The rows of each image, in the order images first appear (for one GeoJSON per image: QuPath)."""
    if "image" not in table.columns:
        raise MitotypeError(f"{WHAT}: missing column image")
    return {str(name): rows.reset_index(drop=True) for name, rows in table.groupby("image", sort=False)}


def check_detections(table: pd.DataFrame) -> pd.DataFrame:
    """A checked copy: core columns first, numbers as floats, labels as class names (None: no label)."""
    missing = [c for c in CORE if c not in table.columns]
    if missing:
        found = ", ".join(map(str, table.columns)) or "none"
        raise MitotypeError(f"{WHAT}: missing column(s) {', '.join(missing)}; expected image, x, y, score[, p_atypical, label] (found {found})")
    df = table.reset_index(drop=True)
    images = []
    for i, name in enumerate(df["image"]):
        if _missing(name) or not str(name).strip():
            raise MitotypeError(f"{WHAT} detections[{i}]: empty image name")
        images.append(str(name).strip())
    out = pd.DataFrame({"image": images}, dtype=object)
    for col in ("x", "y", "score"):
        values = _numbers(df[col], col, images)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise MitotypeError(f"{_row(bad[0], images)}: {col} {_show(df[col].iloc[bad[0]])} is not a finite number")
        if col != "score" and (values < 0).any():
            i = int(np.flatnonzero(values < 0)[0])
            raise MitotypeError(f"{_row(i, images)}: {col} {values[i]:g} is negative; expected pixels from the top left")
        out[col] = values
    if "p_atypical" in df.columns:
        p = _numbers(df["p_atypical"], "p_atypical", images)
        bad = np.flatnonzero(np.isinf(p) | (p < 0) | (p > 1))
        if len(bad):
            raise MitotypeError(f"{_row(bad[0], images)}: p_atypical {_show(df['p_atypical'].iloc[bad[0]])} is not a probability in [0, 1]")
        out["p_atypical"] = p
    if "label" in df.columns:
        out["label"] = pd.Series([_label_name(v) for v in df["label"]], dtype=object)
    for col in df.columns:
        if col not in out.columns:
            out[col] = df[col].to_numpy()
    return out


def _numbers(column: pd.Series, col: str, images: list[str]) -> np.ndarray:
    """Floats; NaN where empty. A value that is not a number is named with its row."""
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float)
    wrong = np.flatnonzero(np.isnan(values) & ~column.isna().to_numpy())
    if len(wrong):
        raise MitotypeError(f"{_row(wrong[0], images)}: {col} {_show(column.iloc[wrong[0]])} is not a number")
    return values


def _row(i: int | np.integer, images: list[str]) -> str:
    return f"{WHAT} detections[{int(i)}] (image {images[int(i)]})"


def _show(value: object) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return repr(value) if isinstance(value, str) else str(value)


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _label_name(value: object) -> str | None:
    """A class name for a label cell: names as given, 1/0 (or True/False) as atypical/normal, -1 or empty as none."""
    if _missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return "atypical" if value else "normal"
    if isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
        if number in (0.0, 1.0):
            return "atypical" if number == 1.0 else "normal"
        if number == -1.0:
            return None
    text = str(value).strip()
    return None if text in ("", "-1") else text


def _half_side(mpp: float | None, radius_px: float) -> float:
    if not _positive(radius_px):
        raise MitotypeError(f"{{radius_px}} {radius_px!r}: must be a positive number of pixels", options=("radius_px",))
    if mpp is not None and not _positive(mpp):
        raise MitotypeError(f"{{mpp}} {mpp!r}: must be a positive number of µm per pixel", options=("mpp",))
    return float(radius_px) * (MIDOG_MPP / float(mpp) if mpp is not None else 1.0)


def _positive(value: object) -> bool:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(value)) and float(value) > 0


def _plain(value: Any) -> Any:
    """A JSON value: numpy scalars as Python, NaN / inf / NA as null, other objects as text."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _class_of(label: str | None) -> str:
    return label if label is not None else NO_LABEL


def _rgb(name: str) -> tuple[int, int, int]:
    return COLORS.get(name.lower(), OTHER_COLOR)


def _extras(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in CORE and c not in OPTIONAL]


def _records(df: pd.DataFrame) -> list[tuple[str, float, float, float, float | None, str | None]]:
    """(image, x, y, score, p_atypical or None, label or None) of each checked detection."""
    n = len(df)
    p = [v if math.isfinite(v) else None for v in df["p_atypical"].to_numpy(dtype=float).tolist()] if "p_atypical" in df.columns else [None] * n
    labels = list(df["label"]) if "label" in df.columns else [None] * n
    x, y, score = (df[c].to_numpy(dtype=float).tolist() for c in ("x", "y", "score"))  # Python floats: repr(x) is the number
    return list(zip(map(str, df["image"]), x, y, score, p, labels))


def geojson_collection(df: pd.DataFrame) -> dict:
    """A FeatureCollection of the checked detections (see the module's text)."""
    extras = _extras(df)
    clash = [c for c in extras if c in GEOJSON_KEYS]
    if clash:
        raise MitotypeError(f"{WHAT}: column '{clash[0]}' is a property QuPath reads in GeoJSON; rename it")
    rest = df[extras].to_dict("records") if extras else [{}] * len(df)
    features = []
    for (image, x, y, score, p, label), more in zip(_records(df), rest):
        name = _class_of(label)
        measurements: dict[str, float] = {"score": score}
        props: dict[str, Any] = {"objectType": "annotation", "name": image, "classification": {"name": name, "color": list(_rgb(name))},
                                 "image": image, "score": score}
        if p is not None:
            measurements["p_atypical"] = props["p_atypical"] = p
        if label is not None:
            props["label"] = label
        for col, raw in more.items():
            value = _plain(raw)
            props[str(col)] = value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                measurements[str(col)] = float(value)
        props["measurements"] = measurements
        features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]}, "properties": props})
    return {"type": "FeatureCollection", "features": features}


def asap_xml(df: pd.DataFrame) -> bytes:
    """The ASAP XML of the checked detections of one image."""
    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations")
    groups: list[str] = []
    for i, (_, x, y, score, p, label) in enumerate(_records(df)):
        group = _class_of(label)
        if group not in groups:
            groups.append(group)
        text = f"score {score:.3f}" + (f", p_atypical {p:.3f}" if p is not None else "")
        node = ET.SubElement(annotations, "Annotation", Name=f"{group} {i + 1} ({text})", Type="Dot", PartOfGroup=group, Color=_hex(group))
        coordinates = ET.SubElement(node, "Coordinates")
        ET.SubElement(coordinates, "Coordinate", Order="0", X=repr(x), Y=repr(y))
    listed = ET.SubElement(root, "AnnotationGroups")
    known = list(COLORS)
    for group in sorted(groups, key=lambda g: (known.index(g) if g in known else len(known), g)):
        node = ET.SubElement(listed, "Group", Name=group, PartOfGroup="None", Color=_hex(group))
        ET.SubElement(node, "Attributes")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def _hex(group: str) -> str:
    return "#{:02X}{:02X}{:02X}".format(*_rgb(group))


def _write_asap(df: pd.DataFrame, path: Path, names: list[str]) -> None:
    if len(names) <= 1 and not path.is_dir():
        _write_bytes(path, asap_xml(df))
        return
    if path.suffix.lower() == ".xml" and not path.is_dir():
        raise MitotypeError(f"{path}: ASAP opens one XML per image and the detections cover {len(names)} images; "
                            "give a folder to hold one <image stem>.xml each")
    stems: dict[str, str] = {}
    for name in names:
        stem = Path(name).stem
        if stem in stems:
            raise MitotypeError(f"{path}: images {stems[stem]} and {name} would both be written as {stem}.xml")
        stems[stem] = name
    rows = df.groupby("image", sort=False).indices
    for stem, name in stems.items():
        part = df.iloc[rows[name]] if name in rows else df.iloc[:0]
        _write_bytes(path / f"{stem}.xml", asap_xml(part.reset_index(drop=True)))


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def midog_json(df: pd.DataFrame, *, half: float, images: Iterable[str] = (), mpp: float | None = None) -> dict:
    """MIDOG-style COCO JSON of the checked detections: boxes of side ``2 * half`` px centred on the points."""
    names = list(dict.fromkeys([*images, *df["image"]]))
    ids = {name: k + 1 for k, name in enumerate(names)}
    annotations = []
    for i, (image, x, y, score, p, label) in enumerate(_records(df)):
        ann: dict[str, Any] = {"id": i + 1, "image_id": ids[image], "category_id": 1, "bbox": [x - half, y - half, x + half, y + half],
                               "score": score}
        if p is not None:
            ann["p_atypical"] = p
        if label is not None:
            ann["label"] = label
        annotations.append(ann)
    info = {"description": "mitotype detections", "bbox_format": "xyxy (MIDOG corners), a square centred on each point",
            "box_side_px": 2 * half, "mpp": mpp}
    return {"info": info, "images": [{"id": ids[n], "file_name": n} for n in names],
            "categories": [{"id": 1, "name": MIDOG_CATEGORY}], "annotations": annotations}
