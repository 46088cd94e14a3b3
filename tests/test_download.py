"""``mitotype.data.download`` against a tiny HTTP server on 127.0.0.1; nothing else is contacted.

The server serves archives built here in the published shapes (a GitHub ``Repo-main/`` zip, a
Zenodo CSV + zip) and stops itself after a few seconds even if a test forgets to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import threading
import time
import urllib.parse
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mitotype.data import download as dl
from mitotype.data.readers import read_dataset
from mitotype.errors import MitotypeError

CLOSED = "http://127.0.0.1:9"  # the discard port on loopback: nothing listens, so connecting is refused
BENCH_PATH = "/DeepMicroscopy/AMi-Br_Benchmark/archive/refs/heads/main.zip"
MIDOG_CSV_PATH = "/records/16044804/files/MIDOG25_Atypical_Classification_Train_Set.csv"
MIDOG_ZIP_PATH = "/records/16044804/files/MIDOG25_Binary_Classification_Train_Set.zip"


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def benchmark_zip(image: bytes | None = None) -> bytes:
    """The AMi-Br_Benchmark archive as GitHub serves it: one top folder, the datasets inside."""
    top = "AMi-Br_Benchmark-main"
    meta = "slide,dataset,uid,label,filename,expert1_atypical,expert2_atypical,expert3_atypical,majority_atypical\n"
    files = {f"{top}/README.md": b"benchmark\n", f"{top}/End-to-End_DL_Baselines/train.py": b"print()\n"}
    for split, offset in (("Train", 0), ("Test", 10)):
        rows = meta
        for k, (cls, vote) in enumerate((("Atypical", "True"), ("Atypical", "True"), ("Normal", "False"), ("Normal", "False"))):
            name = f"MIDOG21_{offset + k}.png"
            files[f"{top}/AMi-Br/{split}/{cls}/{name}"] = image if image is not None else png(offset + k)
            rows += f"{k:03d}.tiff,MIDOG21,{offset + k},{cls},{name},{vote},{vote},{vote},{vote}\n"
        files[f"{top}/AMi-Br/{split}/metadata.csv"] = rows.encode()
    for k, cls in enumerate(("Atypical", "Normal", "Normal")):
        files[f"{top}/AtNorM-MD/{cls}/md_{k}.png"] = png(100 + k)
        files[f"{top}/AtNorM-Br/{cls}/br_{k}.png"] = png(200 + k)
    return zip_bytes(files)


def midog_files() -> dict[str, bytes]:
    csv = (
        "image_id,filename,coordinateX,coordinateY,Tumor,Scanner,Species,expert1,expert2,expert3,majority\n"
        "1.png,a.tiff,10,20,human breast cancer,Hamamatsu XR,human,AMF,AMF,NMF,AMF\n"
        "2.png,a.tiff,30,40,human breast cancer,Hamamatsu XR,human,NMF,NMF,NMF,NMF\n"
        "3.png,b.tiff,50,60,canine lymphoma,Aperio CS2,canine,NMF,AMF,NMF,NMF\n"
        "3.png,b.tiff,50,60,canine lymphoma,Aperio CS2,canine,NMF,AMF,NMF,NMF\n"
    ).encode()
    images = zip_bytes({f"MIDOG25_Binary_Classification_Train_Set/{k}.png": png(300 + k) for k in (1, 2, 3)})
    return {MIDOG_CSV_PATH: csv, MIDOG_ZIP_PATH: images}


class Server:
    """Serves ``routes`` (path -> bytes) on 127.0.0.1; 404 for anything else; stops itself after ``life_s``."""

    def __init__(self, routes: dict[str, bytes], life_s: float = 20.0) -> None:
        self.routes = routes
        self.hits: list[str] = []
        self.short: set[str] = set()  # paths whose Content-Length overstates the body
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's method name
                path = urllib.parse.urlsplit(self.path).path
                outer.hits.append(self.path)
                body = outer.routes.get(path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body) + (100 if path in outer.short else 0)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.timer = threading.Timer(life_s, self.httpd.shutdown)
        self.timer.daemon = True

    def __enter__(self) -> Server:
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def server() -> Iterator[Server]:
    with Server({BENCH_PATH: benchmark_zip(), **midog_files()}) as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_env_base(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dl.ENV_BASE, raising=False)


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_registry_names_and_honest_checksums() -> None:
    assert set(dl.DATASETS) == {"ami-br", "atnorm-br", "atnorm-md", "midog25-atypical"}
    for name, source in dl.DATASETS.items():
        assert source.name == name and source.files and source.citation and source.licence
        for remote in source.files:
            assert remote.url.startswith("https://") and remote.kind in ("zip", "tar", "file") and remote.note
            assert remote.sha256 is None  # none is published; none may be invented


def test_resolve_url_replaces_host_keeps_path_and_query(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "https://zenodo.org/records/16044804/files/x.csv?download=1"
    assert dl.resolve_url(url) == url
    assert dl.resolve_url(url, "http://127.0.0.1:8000") == "http://127.0.0.1:8000/records/16044804/files/x.csv?download=1"
    assert dl.resolve_url(url, "http://mirror.test/data/") == "http://mirror.test/data/records/16044804/files/x.csv?download=1"
    monkeypatch.setenv(dl.ENV_BASE, "http://127.0.0.1:1")
    assert dl.resolve_url(url).startswith("http://127.0.0.1:1/records/")


def test_download_extracts_readable_layout_and_second_call_is_instant(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "data"
    out = dl.download("ami-br", dest, base_url=server.url, progress=True)
    assert out == dest / "ami-br"
    assert sorted(p.name for p in out.iterdir()) == [".mitotype-download.json", "Test", "Train"]
    assert not (out / "README.md").exists()  # only the dataset's folder is kept
    result = read_dataset(out)
    df = result.manifest
    assert len(df) == 8 and int(df["label"].sum()) == 4
    assert set(df["split"]) == {"train", "test"} and (df["n_votes"] == 3).all()
    assert leftovers(dest) == ["ami-br"]  # no temporary files beside it
    assert server.hits == [BENCH_PATH]

    start = time.perf_counter()
    again = dl.download("ami-br", dest, base_url=CLOSED, progress=False)  # would fail if it touched the network
    assert again == out and time.perf_counter() - start < 0.5
    assert server.hits == [BENCH_PATH]


def test_other_benchmark_folders_and_verified_checksum(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = hashlib.sha256(server.routes[BENCH_PATH]).hexdigest()
    source = dl.DATASETS["atnorm-md"]
    fixed = dataclasses.replace(source, files=(dataclasses.replace(source.files[0], sha256=good.upper()),))
    monkeypatch.setitem(dl.DATASETS, "atnorm-md", fixed)
    md = dl.download("atnorm-md", tmp_path, base_url=server.url, progress=False)
    br = dl.download("atnorm-br", tmp_path, base_url=server.url, progress=False)
    assert len(read_dataset(md).manifest) == 3 and len(read_dataset(br).manifest) == 3
    assert '"sha256": "%s"' % good in (md / dl.MARKER).read_text()


def test_midog25_csv_and_zip_become_a_manifest(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dl.ENV_BASE, server.url)  # the environment variable stands in for base_url
    out = dl.download("midog25-atypical", tmp_path, progress=False)
    assert sorted(server.hits) == sorted([MIDOG_CSV_PATH + "?download=1", MIDOG_ZIP_PATH + "?download=1"])
    assert (out / "source" / "MIDOG25_Atypical_Classification_Train_Set.csv").is_file()
    df = read_dataset(out).manifest.sort_values("path").reset_index(drop=True)
    assert [Path(p).name for p in df["path"]] == ["1.png", "2.png", "3.png"]  # the repeated row dropped
    assert df["label"].tolist() == [1, 0, 0]
    assert df["group"].tolist() == ["a.tiff", "a.tiff", "b.tiff"]
    assert df["domain"].tolist() == ["human breast cancer", "human breast cancer", "canine lymphoma"]
    assert df["votes_atypical"].tolist() == [2, 0, 1] and df["hard"].tolist() == [True, False, True]
    assert set(df["Scanner"]) == {"Hamamatsu XR", "Aperio CS2"}


def test_checksum_mismatch_deletes_everything(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = dl.DATASETS["ami-br"]
    bad = dataclasses.replace(source, files=(dataclasses.replace(source.files[0], sha256="0" * 64),))
    monkeypatch.setitem(dl.DATASETS, "ami-br", bad)
    with pytest.raises(MitotypeError, match=r"checksum mismatch \(expected sha256 0{64}, got [0-9a-f]{64}\)") as err:
        dl.download("ami-br", tmp_path, base_url=server.url, progress=False)
    assert "\n" not in str(err.value) and "deleted" in str(err.value)
    assert leftovers(tmp_path) == []


def test_http_404_is_one_line(tmp_path: Path) -> None:
    with Server({}) as srv:
        with pytest.raises(MitotypeError, match=r"not found \(HTTP 404\)") as err:
            dl.download("atnorm-br", tmp_path, base_url=srv.url, progress=False)
    assert "\n" not in str(err.value) and BENCH_PATH in str(err.value)
    assert leftovers(tmp_path) == []


def test_unreachable_host_says_offline(tmp_path: Path) -> None:
    with pytest.raises(MitotypeError,
                       match=r"could not reach http://127\.0\.0\.1:9/.*offline\? download it elsewhere and point mitotype at that folder") as err:
        dl.download("midog25-atypical", tmp_path, base_url=CLOSED, progress=False)
    assert "\n" not in str(err.value)
    assert leftovers(tmp_path) == []


def test_unknown_name_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(MitotypeError, match="unknown dataset 'tupac'; known datasets: ami-br, atnorm-br, atnorm-md, midog25-atypical"):
        dl.download("tupac", tmp_path)
    assert leftovers(tmp_path) == []


def test_corrupt_truncated_and_lfs_archives_leave_nothing(tmp_path: Path) -> None:
    with Server({BENCH_PATH: b"PK\x03\x04 this is not a zip"}) as srv:
        with pytest.raises(MitotypeError, match="corrupt or truncated zip archive"):
            dl.download("ami-br", tmp_path, base_url=srv.url, progress=False)
    with Server({BENCH_PATH: benchmark_zip()}) as srv:
        srv.short.add(BENCH_PATH)
        with pytest.raises(MitotypeError, match=r"download (cut short|broke off)"):
            dl.download("ami-br", tmp_path, base_url=srv.url, progress=False)
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
    with Server({BENCH_PATH: benchmark_zip(image=pointer)}) as srv:
        with pytest.raises(MitotypeError, match="Git LFS pointer"):
            dl.download("ami-br", tmp_path, base_url=srv.url, progress=False)
    assert leftovers(tmp_path) == []


def test_interrupted_download_leaves_nothing(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dl, "_extract", interrupt)
    with pytest.raises(KeyboardInterrupt):
        dl.download("ami-br", tmp_path, base_url=server.url, progress=False)
    assert leftovers(tmp_path) == []


def test_existing_folder_that_is_not_a_dataset_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ami-br").mkdir()
    (tmp_path / "ami-br" / "notes.txt").write_text("mine\n")
    with pytest.raises(MitotypeError, match=r"exists but is not a ami-br dataset") as err:
        dl.download("ami-br", tmp_path, base_url=CLOSED, progress=False)
    assert "\n" not in str(err.value)
    assert (tmp_path / "ami-br" / "notes.txt").read_text() == "mine\n"  # untouched


def test_archive_paths_outside_the_destination_are_refused() -> None:
    assert dl._members(["Repo-main/AMi-Br/Train/Atypical/a.png", "Repo-main/x.md"], "AMi-Br") == {
        "Repo-main/AMi-Br/Train/Atypical/a.png": "Train/Atypical/a.png"
    }
    with pytest.raises(MitotypeError, match="outside the destination"):
        dl._members(["top/AMi-Br/../../evil.png", "top/ok.png"], "")


def test_tar_archives_extract_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        members = {"set-1.0/Atypical/a.png": png(1), "set-1.0/Normal/n.png": png(2), "set-1.0/labels.csv": b"filename,label\na.png,1\nn.png,0\n"}
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    source = dl.DATASETS["atnorm-br"]
    tar_source = dataclasses.replace(source, files=(dl.RemoteFile("https://example.org/set.tar.gz", "tar", None, note="test"),))
    monkeypatch.setitem(dl.DATASETS, "atnorm-br", tar_source)
    with Server({"/set.tar.gz": buf.getvalue()}) as srv:
        out = dl.download("atnorm-br", tmp_path, base_url=srv.url, progress=False)
    assert read_dataset(out).manifest["label"].sort_values().tolist() == [0, 1]
