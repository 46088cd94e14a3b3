"""Detection writers (csv, QuPath GeoJSON, ASAP XML, MIDOG JSON) and the ICPR 2012 point reader."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mitotype.config import PointFormat
from mitotype.data.point_formats import split_by_image, write_points
from mitotype.data.points import read_points
from mitotype.errors import MitotypeError


def detections() -> pd.DataFrame:
    """Four detections on two images; a chained classifier labelled three (one p_atypical missing)."""
    return pd.DataFrame({
        "image": ["a.png", "a.png", "b.png", "a.png"],
        "x": [10.5, 40.0, 3.25, 0.0],
        "y": [20.0, 7.75, 60.5, 79.0],
        "score": [0.9, 0.75, 0.5, 0.625],
        "p_atypical": [0.8, 0.125, math.nan, 0.25],
        "label": ["atypical", "normal", None, "normal"],
        "tile": ["t0", "t1", "t2", "t3"],
    })


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_the_format_names_are_the_enum() -> None:
    assert [f.value for f in PointFormat] == ["csv", "geojson", "asap", "midog"]


def test_csv_is_the_table_with_the_core_columns_first(tmp_path: Path) -> None:
    table = detections()[["tile", "label", "score", "y", "x", "image", "p_atypical"]]  # any column order in
    write_points(table, tmp_path / "d.csv", "csv")
    back = pd.read_csv(tmp_path / "d.csv")
    assert list(back.columns) == ["image", "x", "y", "score", "p_atypical", "label", "tile"]
    assert back["image"].tolist() == ["a.png", "a.png", "b.png", "a.png"]
    assert back[["x", "y", "score"]].values.tolist() == [[10.5, 20.0, 0.9], [40.0, 7.75, 0.75], [3.25, 60.5, 0.5], [0.0, 79.0, 0.625]]
    assert back["p_atypical"].fillna(-1).tolist() == [0.8, 0.125, -1, 0.25]
    assert back["label"].fillna("").tolist() == ["atypical", "normal", "", "normal"] and back["tile"].tolist() == ["t0", "t1", "t2", "t3"]
    assert files_in(tmp_path) == ["d.csv"]  # the write went through a temporary that is gone


def test_geojson_points_classes_and_properties_for_qupath(tmp_path: Path) -> None:
    write_points(detections(), tmp_path / "d.geojson", PointFormat.geojson)
    data = json.loads((tmp_path / "d.geojson").read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 4
    feats = data["features"]
    assert [f["type"] for f in feats] == ["Feature"] * 4
    assert [f["geometry"] for f in feats] == [{"type": "Point", "coordinates": [10.5, 20.0]}, {"type": "Point", "coordinates": [40.0, 7.75]},
                                              {"type": "Point", "coordinates": [3.25, 60.5]}, {"type": "Point", "coordinates": [0.0, 79.0]}]
    props = [f["properties"] for f in feats]
    assert [p["objectType"] for p in props] == ["annotation"] * 4
    assert [p["classification"]["name"] for p in props] == ["atypical", "normal", "mitosis", "normal"]
    assert props[0]["classification"]["color"] == [220, 50, 47] and props[2]["classification"]["color"] == [255, 200, 0]
    assert [p["name"] for p in props] == [p["image"] for p in props] == ["a.png", "a.png", "b.png", "a.png"]
    assert [p["score"] for p in props] == [0.9, 0.75, 0.5, 0.625]
    assert [p.get("p_atypical") for p in props] == [0.8, 0.125, None, 0.25] and "p_atypical" not in props[2]
    assert props[0]["measurements"] == {"score": 0.9, "p_atypical": 0.8}  # what QuPath lists in its measurement table
    assert props[2]["measurements"] == {"score": 0.5}
    assert [p["tile"] for p in props] == ["t0", "t1", "t2", "t3"] and [p.get("label") for p in props] == ["atypical", "normal", None, "normal"]


def test_geojson_without_a_classifier_names_every_point_mitosis_and_numbers_become_measurements(tmp_path: Path) -> None:
    table = detections()[["image", "x", "y", "score"]].assign(area=[12, 13, 14, 15])
    write_points(table, tmp_path / "d.geojson", "GeoJSON")
    props = [f["properties"] for f in json.loads((tmp_path / "d.geojson").read_text())["features"]]
    assert {p["classification"]["name"] for p in props} == {"mitosis"} and not any("p_atypical" in p for p in props)
    assert props[1]["measurements"] == {"score": 0.75, "area": 13.0} and props[1]["area"] == 13


def test_split_by_image_gives_each_image_its_rows_for_one_file_each(tmp_path: Path) -> None:
    parts = split_by_image(detections())
    assert list(parts) == ["a.png", "b.png"]
    assert parts["a.png"]["x"].tolist() == [10.5, 40.0, 0.0] and parts["b.png"]["x"].tolist() == [3.25]
    for name, rows in parts.items():
        write_points(rows, tmp_path / f"{Path(name).stem}.geojson", "geojson")
    assert len(json.loads((tmp_path / "a.geojson").read_text())["features"]) == 3


def parse_asap(path: Path) -> tuple[list[tuple[str, str, float, float]], dict[str, str]]:
    """(Type, PartOfGroup, X, Y) of each annotation, and group name -> colour, read as ASAP reads them."""
    root = ET.parse(path).getroot()
    assert root.tag == "ASAP_Annotations"
    dots = []
    for ann in root.find("Annotations"):
        coords = ann.find("Coordinates").findall("Coordinate")
        assert [c.get("Order") for c in coords] == ["0"]
        dots.append((ann.get("Type"), ann.get("PartOfGroup"), float(coords[0].get("X")), float(coords[0].get("Y"))))
    groups = {g.get("Name"): g.get("Color") for g in root.find("AnnotationGroups")}
    assert all(g.get("PartOfGroup") == "None" for g in root.find("AnnotationGroups"))
    return dots, groups


def test_asap_one_image_is_one_file_with_dots_and_their_groups(tmp_path: Path) -> None:
    table = detections()
    write_points(table[table["image"] == "a.png"], tmp_path / "a.xml", "asap")
    dots, groups = parse_asap(tmp_path / "a.xml")
    assert dots == [("Dot", "atypical", 10.5, 20.0), ("Dot", "normal", 40.0, 7.75), ("Dot", "normal", 0.0, 79.0)]
    assert groups == {"atypical": "#DC322F", "normal": "#268BD2"}  # every group an annotation names is listed
    assert files_in(tmp_path) == ["a.xml"]


def test_asap_several_images_write_a_folder_of_one_xml_per_image(tmp_path: Path) -> None:
    write_points(detections(), tmp_path / "out", "asap", images=["c.png"])
    assert files_in(tmp_path / "out") == ["a.xml", "b.xml", "c.xml"]
    assert parse_asap(tmp_path / "out" / "b.xml") == ([("Dot", "mitosis", 3.25, 60.5)], {"mitosis": "#FFC800"})
    assert [d[2:] for d in parse_asap(tmp_path / "out" / "a.xml")[0]] == [(10.5, 20.0), (40.0, 7.75), (0.0, 79.0)]
    assert parse_asap(tmp_path / "out" / "c.xml") == ([], {})  # an image without detections: an empty file
    with pytest.raises(MitotypeError, match=r"d\.xml: ASAP opens one XML per image .* 2 images; give a folder"):
        write_points(detections(), tmp_path / "d.xml", "asap")
    with pytest.raises(MitotypeError, match=r"images x/a\.png and y/a\.tif would both be written as a\.xml"):
        write_points(detections().assign(image=["x/a.png", "x/a.png", "y/a.tif", "x/a.png"]), tmp_path / "clash", "asap")


def write_images(folder: Path, names: list[str], size: tuple[int, int] = (70, 80)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_midog_json_reads_back_to_the_same_points(tmp_path: Path) -> None:
    images = write_images(tmp_path / "img", ["a.png", "b.png"])
    table = detections()
    write_points(table, tmp_path / "d.json", "midog")
    back = read_points(tmp_path / "d.json", images).table
    assert back["image"].tolist() == table["image"].tolist()
    assert back["x"].tolist() == table["x"].tolist() and back["y"].tolist() == table["y"].tolist()  # exactly
    assert back["category"].tolist() == ["mitotic figure"] * 4 and (back["label"] == -1).all()
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["categories"] == [{"id": 1, "name": "mitotic figure"}]
    assert data["images"] == [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}]
    first = data["annotations"][0]
    assert first == {"id": 1, "image_id": 1, "category_id": 1, "bbox": [-14.5, -5.0, 35.5, 45.0], "score": 0.9,
                     "p_atypical": 0.8, "label": "atypical"}  # a 50 px box at MIDOG's 0.25 µm/px, not clipped
    assert "p_atypical" not in data["annotations"][2] and "label" not in data["annotations"][2]


def test_midog_box_keeps_its_microns_at_another_resolution_and_lists_images_without_points(tmp_path: Path) -> None:
    write_points(detections(), tmp_path / "d.json", "midog", mpp=0.5, images=["c.png"])
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["annotations"][0]["bbox"] == [-2.0, 7.5, 23.0, 32.5]  # 12.5 µm = 25 px at 0.5 µm/px
    assert [im["file_name"] for im in data["images"]] == ["c.png", "a.png", "b.png"]
    assert data["annotations"][2]["image_id"] == 3
    write_points(detections(), tmp_path / "e.json", "midog", radius_px=10)
    assert json.loads((tmp_path / "e.json").read_text())["annotations"][1]["bbox"] == [30.0, -2.25, 50.0, 17.75]


@pytest.mark.parametrize("change, fmt, message", [
    (lambda t: t.drop(columns=["score"]), "csv", r"^detection table: missing column\(s\) score; expected image, x, y, score"),
    (lambda t: t.assign(x=[1.0, math.nan, 2.0, 3.0]), "geojson", r"^detection table detections\[1\] \(image a\.png\): x nan is not a finite number$"),
    (lambda t: t.assign(y=[1.0, 2.0, math.inf, 3.0]), "midog", r"^detection table detections\[2\] \(image b\.png\): y inf is not a finite number$"),
    (lambda t: t.assign(y=["1", "2", "3", "abc"]), "asap", r"^detection table detections\[3\] \(image a\.png\): y 'abc' is not a number$"),
    (lambda t: t.assign(x=[1.0, -2.0, 2.0, 3.0]), "csv", r"detections\[1\] \(image a\.png\): x -2 is negative"),
    (lambda t: t.assign(score=[0.5, 0.5, math.nan, 0.5]), "csv", r"detections\[2\] \(image b\.png\): score nan is not a finite number"),
    (lambda t: t.assign(p_atypical=[0.5, 1.5, 0.5, 0.5]), "geojson", r"detections\[1\] \(image a\.png\): p_atypical 1\.5 is not a probability"),
    (lambda t: t.assign(image=["a.png", "", "b.png", "a.png"]), "midog", r"^detection table detections\[1\]: empty image name$"),
    (lambda t: t.assign(objectType=1), "geojson", r"column 'objectType' is a property QuPath reads"),
    (lambda t: t, "shapefile", r"^fmt 'shapefile': must be one of csv, geojson, asap, midog$"),
])
def test_bad_input_is_one_line_naming_the_column_row_or_option(tmp_path: Path, change, fmt: str, message: str) -> None:
    with pytest.raises(MitotypeError, match=message) as err:
        write_points(change(detections()), tmp_path / "out", fmt)
    assert "\n" not in str(err.value)
    assert files_in(tmp_path) == []  # nothing written


@pytest.mark.parametrize("kwargs, message", [
    ({"radius_px": 0}, r"^radius_px 0: must be a positive number of pixels$"),
    ({"radius_px": math.nan}, r"^radius_px nan: must be a positive"),
    ({"mpp": -0.25}, r"^mpp -0\.25: must be a positive number of µm per pixel$"),
])
def test_bad_options_are_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(MitotypeError, match=message) as err:
        write_points(detections(), tmp_path / "d.json", "midog", **kwargs)
    assert err.value.options == (next(iter(kwargs)),)


# ICPR 2012: a folder of images with same-stem CSVs, each line the pixels of one mitosis as x1,y1,x2,y2,...

def icpr_folder(root: Path) -> Path:
    write_images(root, ["A00_01.bmp", "A00_02.bmp", "A00_03.bmp"], size=(60, 50))
    (root / "A00_01.csv").write_text("10,20,11,20,12,21,11,22\n\n40,5,41,6,\n")  # a blank line; a trailing comma
    (root / "A00_02.csv").write_text("")  # an image without mitoses
    (root / "A00_03.csv").write_text("0,49,2,47\n")
    (root / "notes.txt").write_text("not part of the layout")
    return root


def test_icpr_points_are_the_centroids_of_the_pixel_lists(tmp_path: Path) -> None:
    points = read_points(icpr_folder(tmp_path / "icpr"))
    t = points.table
    assert t["image"].tolist() == ["A00_01.bmp", "A00_01.bmp", "A00_03.bmp"]
    assert t["x"].tolist() == [11.0, 40.5, 1.0] and t["y"].tolist() == [20.75, 5.5, 48.0]
    assert t["n_pixels"].tolist() == [4, 2, 2] and (t["label"] == -1).all()
    assert t["image_path"].tolist() == [str(tmp_path / "icpr" / n) for n in ["A00_01.bmp", "A00_01.bmp", "A00_03.bmp"]]
    assert [name for name, _ in points.images] == ["A00_01.bmp", "A00_02.bmp", "A00_03.bmp"]  # the empty one counts 0
    assert points.where == [f"{tmp_path / 'icpr' / 'A00_01.csv'} line {n}" for n in (1, 3)] + [f"{tmp_path / 'icpr' / 'A00_03.csv'} line 1"]
    assert points.layout.startswith("ICPR 2012")


@pytest.mark.parametrize("line, message", [
    ("10,20,11", r"A00_01\.csv line 2: 3 value\(s\); expected an even number, x1,y1,x2,y2,\.\.\."),
    ("10,20,1.5,3", r"A00_01\.csv line 2: '1\.5' is not an integer pixel coordinate"),
    ("10,20,x,3", r"A00_01\.csv line 2: 'x' is not an integer pixel coordinate"),
    ("10,-20,11,20", r"A00_01\.csv line 2: pixel coordinate -20 is negative"),
    ("10,20,130,20", r"A00_01\.csv line 2: point \(70, 20\) lies outside the 60x50 image"),
])
def test_icpr_bad_line_is_one_line_naming_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    root = icpr_folder(tmp_path / "icpr")
    (root / "A00_01.csv").write_text(f"1,2,3,4\n{line}\n")
    with pytest.raises(MitotypeError, match=message) as err:
        read_points(root)
    assert "\n" not in str(err.value)


def test_a_folder_of_csvs_without_same_stem_images_is_not_icpr(tmp_path: Path) -> None:
    (tmp_path / "A00_01.csv").write_text("1,2,3,4\n")
    write_images(tmp_path, ["other.png"])
    with pytest.raises(MitotypeError, match="point format not understood; expected .*ICPR 2012 folder"):
        read_points(tmp_path)
