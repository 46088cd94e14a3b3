"""The ICPR 2012 point reader (detection writers come next)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mitotype.data.points import read_points
from mitotype.errors import MitotypeError


def write_images(folder: Path, names: list[str], size: tuple[int, int] = (70, 80)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
    return folder


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
