"""Splits, exactly: which rows go where, and the whole message of every refusal (mutation testing
found these paths asserted only by fragments)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mitotype.data.splits as splits
from mitotype.data.readers import read_dataset
from mitotype.data.splits import assert_disjoint, evaluation_rows, grouped_folds, read_split_file, train_val_split, training_rows
from mitotype.errors import MitotypeError

# mutmut (scripts/mutation.sh) routes each function through a trampoline: one frame more, so a
# warning's stacklevel points into the trampoline there; the attribution is checked in plain runs only
UNDER_MUTMUT = any("__mutmut_" in name for name in dir(splits))


def _refused(call, *args) -> MitotypeError:
    with pytest.raises(MitotypeError) as info:
        call(*args)
    return info.value


def _table(groups: list[str], labels: list[int], split: list[str] | None = None) -> pd.DataFrame:
    df = pd.DataFrame({"path": [f"/d/{i}.png" for i in range(len(groups))], "group": groups, "label": labels})
    if split is not None:
        df["split"] = split
    return df


@pytest.fixture
def df(amibr: Path) -> pd.DataFrame:
    return read_dataset(amibr).manifest  # 40 rows, 10 slides, both classes on every slide


def test_grouped_folds_refusals_name_the_folds_option(df: pd.DataFrame) -> None:
    err = _refused(grouped_folds, df, 1)
    assert str(err) == "folds 1: need at least 2 folds" and err.options == ("folds",)
    assert err.render(lambda o: f"--{o}") == "--folds 1: need at least 2 folds"
    err = _refused(grouped_folds, df, 11)
    assert str(err) == "folds 11: only 10 group(s) (slides) in the data; use at most 10 folds" and err.options == ("folds",)
    folds = grouped_folds(df, 10)  # as many folds as slides: one slide each
    assert folds.dtype.kind == "i" and sorted(pd.Series(folds).groupby(df["group"].to_numpy()).first()) == list(range(10))
    one_class = _table(["a", "a", "b", "b", "c", "d"], [0, 1, 0, 1, 0, 0])  # slides c and d hold normals only
    err = _refused(grouped_folds, one_class, 4)
    assert err.options == ("folds",) and str(err).startswith("folds 4: fold ")
    assert str(err).endswith(" would hold only one class; use fewer folds")


def test_default_seeds_are_42(df: pd.DataFrame) -> None:
    assert np.array_equal(grouped_folds(df, 4), grouped_folds(df, 4, 42))
    assert all(np.array_equal(a, b) for a, b in zip(train_val_split(df, 0.25), train_val_split(df, 0.25, 42)))


@pytest.mark.parametrize("fraction, k", [(0.5, 2), (0.34, 3), (0.25, 4), (0.2, 5), (0.9, 2)])
def test_validation_is_fold_0_of_round_1_over_fraction_folds(df: pd.DataFrame, fraction: float, k: int) -> None:
    train, val = train_val_split(df, fraction, seed=3)
    folds = grouped_folds(df, k, 3)
    assert np.array_equal(val, np.flatnonzero(folds == 0)) and np.array_equal(train, np.flatnonzero(folds != 0))


def test_a_group_in_two_folds_is_named() -> None:
    df = _table(["a", "a", "b", "b", "c"], [0, 1, 0, 1, 1])
    err = _refused(assert_disjoint, df, np.array([0, 1, 1, 1, 0]))
    assert str(err) == "split puts group 'a' on both sides (1 group(s) in total)"
    err = _refused(assert_disjoint, df, np.array([0, 0, 1, 0, 1]))
    assert str(err) == "split puts group 'b' on both sides (1 group(s) in total)"
    assert_disjoint(df, np.array([0, 0, 1, 1, 0]))


def _write(tmp_path: Path, name: str, **columns) -> Path:
    pd.DataFrame(columns).to_csv(tmp_path / name, index=False)
    return tmp_path / name


def test_split_file_columns_and_coverage_are_checked(tmp_path: Path) -> None:
    df = _table(["a", "a", "b", "b", "c", "c"], [0, 1, 0, 1, 0, 1])
    assert str(_refused(read_split_file, tmp_path / "absent.csv", df)) == f"{tmp_path / 'absent.csv'}: split file not found"
    need = "a split file needs a 'path' or 'group' column and a 'fold' or 'split' column"
    for name, columns in (("s.csv", {"slide": ["a"], "fold": [0]}), ("f.csv", {"group": ["a"], "part": [0]}),
                          ("n.csv", {"slide": ["a"], "part": [0]})):
        path = _write(tmp_path, name, **columns)
        assert str(_refused(read_split_file, path, df)) == f"{path}: {need}", name
    path = _write(tmp_path, "two.csv", group=["a", "a", "b", "c"], fold=[0, 1, 1, 0])
    assert str(_refused(read_split_file, path, df)) == f"{path}: group 'a' is given two different folds"
    path = _write(tmp_path, "two_b.csv", group=["a", "b", "b", "c"], fold=[0, 1, 0, 0])
    assert str(_refused(read_split_file, path, df)) == f"{path}: group 'b' is given two different folds"
    path = _write(tmp_path, "dup.csv", group=["a", "a", "b", "c"], fold=[0, 0, 1, 1])  # repeated but consistent: fine
    assert read_split_file(path, df).tolist() == [0, 0, 1, 1, 1, 1]
    path = _write(tmp_path, "short.csv", group=["a", "b"], fold=[0, 1])
    assert str(_refused(read_split_file, path, df)) == f"{path}: 2 group(s) of the data have no fold, e.g. c"
    path = _write(tmp_path, "short_paths.csv", path=list(df["path"][:4]), fold=[0, 0, 1, 1])
    assert str(_refused(read_split_file, path, df)) == f"{path}: 2 path(s) of the data have no fold, e.g. /d/4.png"
    path = _write(tmp_path, "frac.csv", group=["a", "b", "c"], fold=["0", "x", "1"])
    assert str(_refused(read_split_file, path, df)) == f"{path}: fold values must be integers 0..K-1"
    path = _write(tmp_path, "mono.csv", group=["a", "b", "c"], fold=[0, 0, 1])
    mono = _table(["a", "a", "b", "b", "c", "c"], [0, 1, 0, 1, 0, 0])
    assert str(_refused(read_split_file, path, mono)) == f"{path}: held-out fold 1 has only one class"


def test_split_values_and_paths(tmp_path: Path) -> None:
    df = _table(["a", "a", "b", "b", "c", "c"], [0, 1, 0, 1, 0, 1])
    path = _write(tmp_path, "s.csv", group=["a", "b", "c"], split=["Train", " val ", "TEST"])
    assert read_split_file(path, df).tolist() == [-1, -1, -1, -1, 0, 0]  # test rows: fold 0; the rest never held out
    for values, found in ((["train", "validation", "test"], "test, train, validation"), (["train", "val", "val"], "train, val")):
        path = _write(tmp_path, "bad.csv", group=["a", "b", "c"], split=values)
        assert str(_refused(read_split_file, path, df)) == \
            f"{path}: split values must be train, val or test, with some test rows (found {found})"
    path = _write(tmp_path, "hole.csv", group=["a", "b", "c"], split=["test", None, "train"])
    assert str(_refused(read_split_file, path, df)) == f"{path}: row 3 has no split"
    files = tmp_path / "d"
    files.mkdir()
    absolute = _table(["a", "a", "b", "b", "c", "c"], [0, 1, 0, 1, 0, 1]).assign(path=[str(files / f"{i}.png") for i in range(6)])
    elsewhere = tmp_path / "splits"
    elsewhere.mkdir()
    path = _write(elsewhere, "abs.csv", path=list(absolute["path"]), fold=[0, 0, 1, 1, 0, 0])  # absolute: kept as given
    assert read_split_file(path, absolute).tolist() == [0, 0, 1, 1, 0, 0]
    path = _write(files, "rel.csv", path=[f"{i}.png" for i in range(6)], fold=[1, 1, 0, 0, 1, 1])  # relative to the split file
    assert read_split_file(path, absolute).tolist() == [1, 1, 0, 0, 1, 1]


def test_test_split_rows_are_set_aside_with_warnings_pointing_at_the_caller() -> None:
    df = _table(["a", "a", "b", "b", "c", "c"], [0, 1, 0, 1, 0, 1], ["train", "train", "val", "val", "test", "test"])
    with pytest.warns(UserWarning) as caught:
        rows = training_rows(df)
    assert rows.tolist() == [0, 1, 2, 3] and evaluation_rows(df).tolist() == [4, 5]
    assert [str(w.message) for w in caught] == ["2 patch(es) of the data's test split set aside: not trained on, not cross-validated"]
    assert UNDER_MUTMUT or all(w.filename == __file__ for w in caught)  # stacklevel 2: the caller's line, not splits.py
    shared = df.assign(group=["a", "b", "a", "c", "b", "c"])
    with pytest.warns(UserWarning) as caught:
        training_rows(shared)
    assert [str(w.message) for w in caught] == [
        "2 patch(es) of the data's test split set aside: not trained on, not cross-validated",
        "2 group(s) appear in both the test split and the rest, e.g. 'b'",
    ]
    assert UNDER_MUTMUT or all(w.filename == __file__ for w in caught)
    plain = df.assign(split="")
    assert training_rows(plain).tolist() == list(range(6)) and evaluation_rows(plain).tolist() == list(range(6))
