from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import PATCH, make_patch, write_class_folders
from mitotype.data.images import BadImage, decode_all, decode_patch
from mitotype.data.manifest import CORE_COLUMNS, parse_label, require_labels
from mitotype.data.readers import read_dataset
from mitotype.data.splits import assert_disjoint, grouped_folds, read_split_file, train_val_split
from mitotype.errors import MitotypeError


def test_amibr_layout_joins_votes_slides_domains(amibr: Path) -> None:
    result = read_dataset(amibr)
    df = result.manifest
    assert list(df.columns[: len(CORE_COLUMNS)]) == CORE_COLUMNS
    assert len(df) == 40 and (df["label"] == 1).sum() == 12
    assert set(df["domain"]) == {"DOM_A", "DOM_B"}
    assert df["group"].str.contains("/").all()  # dataset/slide: slide names repeat across datasets
    assert {"expert_1", "expert_2", "expert_3"} <= set(df.columns)
    assert (df["n_votes"] == 3).all()
    hard = df["votes_atypical"].between(1, 2)
    assert (df["hard"] == hard).all() and df["hard"].sum() > 0
    assert df["subtype"].isin(["AMF other", "NMF metaphase"]).all()
    assert {"x", "y", "uid"} <= set(df.columns)  # extra columns pass through
    assert result.problems == []


def test_class_folders_case_insensitive_and_amf_nmf_without_csv(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "d", metadata=False, folder_names=("amf", "NMF"))
    result = read_dataset(root)
    assert (result.manifest["label"] == 1).sum() == 12
    assert any("no slide information" in p for p in result.problems)
    assert result.manifest["group"].nunique() == len(result.manifest)


def test_atnorm_md_votes_csv(tmp_path: Path) -> None:
    root = write_class_folders(tmp_path / "md", metadata=False)
    names = sorted(p.name for p in root.rglob("*.png"))
    rows = [{"Filename": n, **{f"Expert_{k}": ("Atypical" if n.startswith("A") != (k == 5 and i % 3 == 0) else "Normal") for k in range(1, 6)},
             "Majority": "Atypical" if n.startswith("A") else "Normal"} for i, n in enumerate(names)]
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    df = read_dataset(root).manifest
    assert [f"expert_{k}" for k in range(1, 6)] == [c for c in df.columns if c.startswith("expert_")]
    assert (df["n_votes"] == 5).all() and df["hard"].sum() > 0
    assert (df["label"] == df["path"].str.contains("/Atypical/").astype(int)).all()


def test_votes_csv_with_images_beside_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "flat"
    root.mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(make_patch(rng, i % 2 == 0)).save(root / f"p{i}.png")
        rows.append({"Filename": f"p{i}.png", "Expert_1": "Atypical" if i % 2 == 0 else "Normal", "Majority": "Atypical" if i % 2 == 0 else "Normal"})
    pd.DataFrame(rows).to_csv(root / "votes.csv", index=False)
    df = read_dataset(root / "votes.csv").manifest
    assert sorted(df["label"]) == [0, 0, 0, 1, 1, 1]


def test_split_folders(tmp_path: Path) -> None:
    for split, seed in (("train", 0), ("val", 1), ("Test", 2)):
        write_class_folders(tmp_path / "s" / split, n_atypical=3, n_normal=5, seed=seed, metadata=False)
    df = read_dataset(tmp_path / "s").manifest
    assert df["split"].value_counts().to_dict() == {"train": 8, "val": 8, "test": 8}


def test_manifest_csv_roundtrip(amibr: Path, tmp_path: Path) -> None:
    df = read_dataset(amibr).manifest
    df.to_csv(tmp_path / "m.csv", index=False)
    again = read_dataset(tmp_path / "m.csv").manifest
    pd.testing.assert_frame_equal(df[CORE_COLUMNS], again[CORE_COLUMNS], check_dtype=False)


def test_unknown_layout_names_the_understood_ones(tmp_path: Path) -> None:
    (tmp_path / "empty" / "stuff").mkdir(parents=True)
    with pytest.raises(MitotypeError, match="understood layouts: class folders"):
        read_dataset(tmp_path / "empty")
    with pytest.raises(MitotypeError, match="no such file"):
        read_dataset(tmp_path / "nope")


def test_csv_row_without_image_errors_or_skips(amibr: Path) -> None:
    (amibr / "Atypical" / "A_000.png").unlink()
    with pytest.raises(MitotypeError, match=r"metadata.csv: 1 row\(s\) have no matching image, e.g. row \d+ \(A_000.png\)"):
        read_dataset(amibr)
    with pytest.warns(UserWarning, match="dropped"):
        df = read_dataset(amibr, skip_missing=True).manifest
    assert len(df) == 39


def test_csv_without_filename_column(amibr: Path) -> None:
    meta = pd.read_csv(amibr / "metadata.csv").drop(columns=["filename"])
    meta.to_csv(amibr / "metadata.csv", index=False)
    with pytest.raises(MitotypeError, match="file-name column"):
        read_dataset(amibr)


def test_manifest_missing_columns(tmp_path: Path) -> None:
    pd.DataFrame({"image_path": ["a.png"], "label": [1]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(MitotypeError, match="missing column 'path'"):
        read_dataset(tmp_path / "m.csv")
    Image.fromarray(make_patch(np.random.default_rng(0), True)).save(tmp_path / "a.png")
    pd.DataFrame({"path": ["a.png"]}).to_csv(tmp_path / "unlabelled.csv", index=False)
    df = read_dataset(tmp_path / "unlabelled.csv").manifest
    with pytest.raises(MitotypeError, match="have no label"):
        require_labels(df, "unlabelled.csv")


def test_labels_parse_every_spelling() -> None:
    for text in ("Atypical", "AMF", "true", 1, True, "1"):
        assert parse_label(text, "x") == 1
    for text in ("Normal", "nmf", "False", 0, False):
        assert parse_label(text, "x") == 0
    with pytest.raises(MitotypeError, match="row 7: label 'maybe'"):
        parse_label("maybe", "row 7")


def test_empty_and_one_class_datasets(amibr: Path) -> None:
    df = read_dataset(amibr).manifest
    with pytest.raises(MitotypeError, match="only one class"):
        require_labels(df[df["label"] == 0], "d")
    with pytest.raises(MitotypeError, match="empty"):
        require_labels(df.iloc[:0], "d")


@pytest.mark.parametrize(
    "kind, message",
    [("corrupt", "cannot decode"), ("truncated", "cannot decode"), ("rgba", "RGBA"), ("grey", "greyscale"),
     ("16bit", "16/32-bit"), ("size", "expected 32x32")],
)
def test_bad_images_get_one_line_errors(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / f"{kind}.png"
    rgb = make_patch(np.random.default_rng(0), True)
    if kind == "corrupt":
        path.write_bytes(b"not a png at all")
    elif kind == "truncated":
        Image.fromarray(rgb).save(path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "rgba":
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 10, np.uint8)])).save(path)
    elif kind == "grey":
        Image.fromarray(rgb[..., 0]).save(path)
    elif kind == "16bit":
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 256).save(path)
    else:
        Image.fromarray(make_patch(np.random.default_rng(0), True, size=40)).save(path)
    with pytest.raises(BadImage, match=message) as info:
        decode_patch(path, PATCH)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_opaque_rgba_is_accepted_and_size_policies(tmp_path: Path) -> None:
    rgb = make_patch(np.random.default_rng(0), True, size=40)
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(tmp_path / "a.png")
    assert decode_patch(tmp_path / "a.png", 40).shape == (40, 40, 3)
    assert np.array_equal(decode_patch(tmp_path / "a.png", 32, "center-crop"), rgb[4:36, 4:36])
    assert decode_patch(tmp_path / "a.png", 32, "resize").shape == (32, 32, 3)


def test_decode_all_skips_bad_images_when_asked(amibr: Path) -> None:
    (amibr / "Normal" / "N_000.png").write_bytes(b"broken")
    paths = read_dataset(amibr).manifest["path"].tolist()
    with pytest.raises(BadImage, match="N_000.png"):
        decode_all(paths, PATCH)
    with pytest.warns(UserWarning, match="skipped 1 unusable"):
        store, bad = decode_all(paths, PATCH, on_bad_image="skip")
    assert len(store) == len(paths) - 1 and len(bad) == 1


def test_decoded_cache_is_memory_mapped_and_reused(amibr: Path, tmp_path: Path) -> None:
    paths = read_dataset(amibr).manifest["path"].tolist()
    memory, _ = decode_all(paths, PATCH)
    cached, _ = decode_all(paths, PATCH, cache_dir=tmp_path / "cache")
    assert isinstance(cached.array, np.memmap)
    files = sorted((tmp_path / "cache").iterdir())
    again, _ = decode_all(paths, PATCH, cache_dir=tmp_path / "cache")
    assert sorted((tmp_path / "cache").iterdir()) == files
    assert np.array_equal(memory.batch([0, 5, 39]).numpy(), again.batch([0, 5, 39]).numpy())
    assert np.array_equal(memory.batch([3]).numpy()[0], np.asarray(Image.open(paths[3]).convert("RGB")))


def test_decoded_cache_decodes_each_image_once(amibr: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Count the decodes: a reused cache decodes nothing; a changed file invalidates it."""
    import mitotype.data.images as images

    paths = read_dataset(amibr).manifest["path"].tolist()
    decoded: list[str] = []
    real = images.decode_patch
    monkeypatch.setattr(images, "decode_patch", lambda path, *a, **k: decoded.append(str(path)) or real(path, *a, **k))
    first, _ = decode_all(paths, PATCH, cache_dir=tmp_path / "cache")
    assert sorted(decoded) == sorted(paths)
    decoded.clear()
    again, _ = decode_all(paths, PATCH, cache_dir=tmp_path / "cache")
    assert decoded == [] and np.array_equal(np.asarray(first.array), np.asarray(again.array))
    Image.fromarray(make_patch(np.random.default_rng(9), True)).save(paths[3])  # new content, new size/mtime
    other, _ = decode_all(paths, PATCH, cache_dir=tmp_path / "cache")
    assert len(decoded) == len(paths) and len(list((tmp_path / "cache").glob("*.npy"))) == 2
    assert np.array_equal(other.batch([3]).numpy()[0], np.asarray(Image.open(paths[3]).convert("RGB")))
    decoded.clear()
    decode_all(paths, PATCH, cache_dir=tmp_path / "cache", size_policy="resize")  # another policy: another cache
    assert len(decoded) == len(paths)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_grouped_folds_never_share_a_slide(amibr: Path, seed: int) -> None:
    df = read_dataset(amibr).manifest
    folds = grouped_folds(df, 5, seed)
    assert set(folds) == set(range(5))
    for group, fold_ids in pd.Series(folds).groupby(df["group"].to_numpy()):
        assert fold_ids.nunique() == 1, group
    for k in range(5):
        assert set(df["label"][folds == k]) == {0, 1}


def test_splits_are_seeded(amibr: Path) -> None:
    """Same seed, same folds; another seed, other folds (a seed that is ignored fails here)."""
    df = read_dataset(amibr).manifest
    assert np.array_equal(grouped_folds(df, 4, 3), grouped_folds(df, 4, 3))
    by_seed = {seed: grouped_folds(df, 4, seed) for seed in range(6)}
    assert len({f.tobytes() for f in by_seed.values()}) >= 5
    assert not np.array_equal(grouped_folds(df, 4), by_seed[0])  # the default (42) is a seed too
    train, val = train_val_split(df, 0.25, seed=3)
    assert np.array_equal(val, np.flatnonzero(grouped_folds(df, 4, 3) == 0))
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(df)))
    assert not set(df["group"].iloc[train]) & set(df["group"].iloc[val])
    assert not np.array_equal(train_val_split(df, 0.25, seed=4)[1], val)
    assert len(train_val_split(df, 0.5, seed=3)[1]) > len(val)  # about half the rows, not a quarter


def test_too_many_folds_and_leaky_split_files(amibr: Path, tmp_path: Path) -> None:
    df = read_dataset(amibr).manifest
    with pytest.raises(MitotypeError, match="use at most"):
        grouped_folds(df, 50)
    leaky = np.arange(len(df)) % 3
    with pytest.raises(MitotypeError, match="on both sides"):
        assert_disjoint(df, leaky)
    pd.DataFrame({"path": df["path"], "fold": leaky}).to_csv(tmp_path / "split.csv", index=False)
    with pytest.raises(MitotypeError, match="on both sides"):
        read_split_file(tmp_path / "split.csv", df)
    groups = sorted(df["group"].unique())
    pd.DataFrame({"group": groups, "split": ["train" if i % 3 else "test" for i in range(len(groups))]}).to_csv(tmp_path / "g.csv", index=False)
    folds = read_split_file(tmp_path / "g.csv", df)
    assert set(folds) == {0, -1}  # test rows held out; train rows never


def test_streaming_batches_match_the_cache(amibr: Path) -> None:
    from mitotype.data.images import iter_batches

    paths = read_dataset(amibr).manifest["path"].tolist()
    store, _ = decode_all(paths, PATCH)
    seen = []
    for index, batch in iter_batches(paths, 16, PATCH, prefetch=2):
        assert batch.dtype == torch.uint8 and np.array_equal(batch.numpy(), store.batch(index).numpy())
        seen.extend(index.tolist())
    assert seen == list(range(len(paths)))


def test_sixteen_bit_rgb_and_hidden_files(tmp_path: Path) -> None:
    import struct
    import zlib

    raw = b"".join(b"\x00" + np.full((PATCH, 3), 40000, ">u2").tobytes() for _ in range(PATCH))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)  # noqa: E731
    ihdr = struct.pack(">IIBBBBB", PATCH, PATCH, 16, 2, 0, 0, 0)
    (tmp_path / "rgb16.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    with pytest.raises(BadImage, match="16/32-bit"):
        decode_patch(tmp_path / "rgb16.png", PATCH)
    root = write_class_folders(tmp_path / "d", metadata=False)
    (root / "Normal" / "._N_000.png").write_bytes(b"resource fork")
    assert not read_dataset(root).manifest["path"].str.contains("/._", regex=False).any()


def test_split_files_are_validated(amibr: Path, tmp_path: Path) -> None:
    df = read_dataset(amibr).manifest
    groups = sorted(df["group"].unique())
    bad = pd.DataFrame({"group": groups, "fold": [1 + i % 2 for i in range(len(groups))]})
    bad.to_csv(tmp_path / "gap.csv", index=False)
    with pytest.raises(MitotypeError, match="0..K-1 without gaps"):
        read_split_file(tmp_path / "gap.csv", df)
    holes = pd.DataFrame({"group": groups, "split": ["test", None] + ["train"] * (len(groups) - 2)})
    holes.to_csv(tmp_path / "holes.csv", index=False)
    with pytest.raises(MitotypeError, match="row 3 has no split"):
        read_split_file(tmp_path / "holes.csv", df)
    rel = pd.DataFrame({"path": [str(Path(p).relative_to(tmp_path)) for p in df["path"]], "fold": df["group"].rank(method="dense").astype(int) % 2})
    rel.to_csv(tmp_path / "rel.csv", index=False)  # paths relative to the split file's folder
    assert set(read_split_file(tmp_path / "rel.csv", df)) == {0, 1}


def test_test_split_is_never_trained_on_and_is_what_evaluate_scores(tmp_path: Path) -> None:
    from mitotype.data.splits import evaluation_rows, training_rows

    for split, seed in (("Train", 0), ("Test", 1)):
        write_class_folders(tmp_path / "s" / split, n_atypical=3, n_normal=5, seed=seed, metadata=False)
    df = read_dataset(tmp_path / "s").manifest
    with pytest.warns(UserWarning, match="8 patch\\(es\\) of the data's test split set aside"):
        rows = training_rows(df)
    assert set(df["split"].iloc[rows]) == {"train"}
    assert set(df["split"].iloc[evaluation_rows(df)]) == {"test"}


def test_several_csvs_prefer_metadata_or_stop(amibr: Path) -> None:
    pd.DataFrame({"x": [1]}).to_csv(amibr / "predictions.csv", index=False)
    assert read_dataset(amibr).manifest["n_votes"].eq(3).all()  # metadata.csv still joined
    (amibr / "metadata.csv").rename(amibr / "votes.csv")
    with pytest.raises(MitotypeError, match="several CSVs"):
        read_dataset(amibr)


def test_unreadable_csv_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(MitotypeError, match="not a readable CSV"):
        read_dataset(tmp_path / "empty.csv")


def test_predictions_read_back_keep_the_true_label(amibr: Path, tmp_path: Path) -> None:
    from mitotype.inference.predict import prediction_table

    df = read_dataset(amibr).manifest
    table = prediction_table(df.iloc[5:], np.zeros(len(df) - 5), 0.5)  # non-default index, all "normal"
    assert table["path"].notna().all()
    table.to_csv(tmp_path / "preds.csv", index=False)
    again = read_dataset(tmp_path / "preds.csv").manifest
    assert (again["label"].to_numpy() == df["label"].iloc[5:].to_numpy()).all()
