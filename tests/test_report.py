"""The self-contained HTML report of evaluate and predict: its numbers, its escaping, and how it renders."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import make_patch, write_class_folders
from mitotype.evaluation.html_report import N_THUMBS, esc, in_sample_note, write_report
from mitotype.evaluation.metrics import METRIC_NAMES
from mitotype.inference.predict import predict_path
from mitotype.workflows.evaluate import evaluate_model

EVIL = "<script>alert(1)<.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Tables(HTMLParser):
    """Text of every cell of every table with an id, and the captions of every gallery."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.galleries: dict[str, list[str]] = {}
        self.images: list[str] = []
        self._table = self._gallery = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "table" and "id" in a:
            self._table = self.tables.setdefault(a["id"], [])
        elif tag == "div" and a.get("class") == "gallery":
            self._gallery = self.galleries.setdefault(a["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None or tag == "figcaption":
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append("\n")
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table is not None and self._cell is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "figcaption" and self._gallery is not None:
            self._gallery.append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "div" and self._gallery is not None and self._cell is None:
            self._gallery = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> Tables:
    parser = Tables()
    parser.feed(path.read_text())
    return parser


def fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def fmt_ci(ci) -> str:
    return "–" if ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def evil_dataset(root: Path) -> Path:
    """The AMi-Br layout with one normal patch renamed to a file name that is HTML."""
    data = write_class_folders(root, n_atypical=8, n_normal=12, n_slides=4)
    (data / "Normal" / "N_000.png").rename(data / "Normal" / EVIL)
    meta = pd.read_csv(data / "metadata.csv")
    meta["filename"] = meta["filename"].replace("N_000.png", EVIL)
    meta.to_csv(data / "metadata.csv", index=False)
    return data


def assert_self_contained(text: str) -> None:
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    assert not re.search(r"""\b(src|href)\s*=\s*(?!['"]?data:)""", text), "every image is inlined"


def test_evaluate_report_shows_metrics_json_and_the_card_escaped(tmp_path: Path, untrained: Path) -> None:
    data = evil_dataset(tmp_path / "data")
    evaluate_model(untrained, data, tmp_path / "ev", n_boot=200, threshold=0.99)  # every patch called normal
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    pred = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    text = (tmp_path / "ev" / "report.html").read_text()
    report = parse(tmp_path / "ev" / "report.html")

    assert report.tables["metrics"] == [["metric", "value", "95% interval"]] + [
        [m, fmt(metrics[m]), fmt_ci(metrics["ci95"][m])] for m in METRIC_NAMES]
    y, called = pred["true_label"].to_numpy(), (pred["label"] == "atypical").to_numpy()
    assert report.tables["confusion"][1:] == [
        ["normal", str(int(((y == 0) & ~called).sum())), str(int(((y == 0) & called).sum()))],
        ["atypical", str(int(((y == 1) & ~called).sum())), str(int(((y == 1) & called).sum()))]]
    assert [row[:3] for row in report.tables["per-domain"][1:]] == [
        [d, str(m["n"]), str(m["n_atypical"])] for d, m in metrics["per_domain"].items()] and len(metrics["per_domain"]) == 2
    assert report.tables["per-domain"][1][3] == f"{fmt(metrics['per_domain']['DOM_A']['balanced_accuracy'])} " + \
        fmt_ci(metrics["per_domain"]["DOM_A"]["ci95"]["balanced_accuracy"])
    fn = pred[(y == 1) & ~called].sort_values("p_atypical").head(N_THUMBS)  # most confident misses first
    assert [c.split("\n")[1] for c in report.galleries["gallery-fn"]] == fn["path"].tolist() and len(fn) == 8
    assert "synthetic <b>" not in text and "synthetic &lt;b&gt;" in text  # card fields are data too
    assert EVIL not in text
    assert_self_contained(text)


def test_report_escapes_file_names_and_shows_the_worst_errors_first(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names = ["a.png", "b.png", EVIL, "d.png", "e.png", "f.png"]
    patches = {}
    for name in names:
        patches[name] = make_patch(rng, atypical=False)
        Image.fromarray(patches[name]).save(tmp_path / name)
    table = pd.DataFrame({"path": [str(tmp_path / n) for n in names], "p_atypical": [0.9, 0.6, 0.97, 0.1, 0.45, 0.2],
                          "true_label": [0, 0, 0, 1, 1, 0]})
    table["label"] = np.where(table["p_atypical"] >= 0.5, "atypical", "normal")
    write_report(tmp_path / "r.html", table, threshold=0.5, cards=[], title="<i>title</i>", n_boot=50)
    text = (tmp_path / "r.html").read_text()
    report = parse(tmp_path / "r.html")
    assert [c.split("\n")[1] for c in report.galleries["gallery-fp"]] == [str(tmp_path / n) for n in (EVIL, "a.png", "b.png")]
    assert [c.split("\n")[1] for c in report.galleries["gallery-fn"]] == [str(tmp_path / n) for n in ("d.png", "e.png")]
    assert report.galleries["gallery-fp"][0] == f"p_atypical 0.970 · called atypical · true normal\n{tmp_path / EVIL}"
    assert EVIL not in text and "&lt;script&gt;alert(1)&lt;.png" in text and "<i>title</i>" not in text
    assert_self_contained(text)
    fp_html = text[text.index("id='gallery-fp'"):]
    thumb = re.search(r"src='data:image/png;base64,([^']+)'", fp_html).group(1)  # the most confident false positive, lossless
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(thumb)))), patches[EVIL])


def _trained_on(source, n: int = 40) -> dict:
    """A card as far as the in-sample check reads it: where the training images were."""
    return {"provenance": {"trained_on": {"source": str(source), "n": n}}, "threshold": 0.5, "build": {}}


def test_in_sample_note_names_the_patches_under_the_training_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, other = tmp_path / "train", tmp_path / "train-other"  # a sibling whose name starts with the source's
    inside = [str(train / "Atypical" / "a.png"), str(train / "Normal" / "n.png"), str(train / "Normal" / "m.png")]
    outside = [str(other / "a.png"), str(tmp_path / "b.png")]
    note = in_sample_note(inside + outside, [_trained_on(train)])
    assert note is not None and note.startswith(f"3 of these 5 patches lie under {train.resolve()}, where the model was trained (40 ")
    assert "own training data" in note and "not a measure of accuracy" in note and "cross-validated" in note
    assert in_sample_note(outside, [_trained_on(train)]) is None  # out of sample: no warning
    folds = [_trained_on(train), _trained_on(train, 41)]  # a fold ensemble: one source, counted once per patch
    note = in_sample_note(inside, folds)
    assert note.startswith(f"3 of these 3 patches lie under {train.resolve()}, where the model was trained (40 training patches per model)")
    monkeypatch.chdir(tmp_path)  # relative paths and a link to the folder are the same files
    (tmp_path / "link").symlink_to(train, target_is_directory=True)
    assert in_sample_note(["train/Normal/n.png", str(tmp_path / "link" / "x.png")], [_trained_on(train)]).startswith("2 of these 2")
    assert in_sample_note(inside, [_trained_on("train")]).startswith("3 of these 3")  # a relative source, from here
    for card in ({"provenance": {"trained_on": {}}}, {"provenance": {}}, {}, _trained_on(""), _trained_on(Path(tmp_path.anchor))):
        assert in_sample_note(inside, [card]) is None  # nothing recorded, or a source (a root) that would match anything


def test_report_header_warns_when_the_patches_are_the_models_training_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    paths = []
    for i in range(6):
        Image.fromarray(make_patch(rng, bool(i % 2))).save(data / f"p{i}.png")
        paths.append(str(data / f"p{i}.png"))
    table = pd.DataFrame({"path": paths, "p_atypical": np.linspace(0.1, 0.9, 6), "true_label": [0, 1] * 3})
    table["label"] = np.where(table["p_atypical"] >= 0.5, "atypical", "normal")
    write_report(tmp_path / "in.html", table, threshold=0.5, cards=[_trained_on(data, 6)], title="t", n_boot=20)
    text = (tmp_path / "in.html").read_text()
    warning = re.search(r"<div class='warn' id='in-sample'>(.*?)</div>", text)
    assert warning and text.index("id='in-sample'") < text.index("<h2>Counts</h2>")  # in the header, before any figure
    assert f"6 of these 6 patches lie under {esc(data.resolve())}" in warning.group(1)
    assert "not a measure of accuracy" in warning.group(1)
    write_report(tmp_path / "out.html", table, threshold=0.5, cards=[_trained_on(tmp_path / "elsewhere", 6)], title="t", n_boot=20)
    assert "in-sample" not in (tmp_path / "out.html").read_text()


def test_predict_report_without_labels_shows_counts_histogram_and_calls(tmp_path: Path, untrained: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(make_patch(rng, atypical=i % 3 == 0)).save(flat / f"p{i:02d}.png")
    p = np.sort(predict_path(untrained, flat, tmp_path / "first.csv")["p_atypical"].to_numpy())
    t = float((p[5] + p[6]) / 2)  # half the patches called atypical, whatever the untrained weights give
    table = predict_path(untrained, flat, tmp_path / "out" / "p.csv", threshold=t)
    html_path = tmp_path / "out" / "p.html"
    report = parse(html_path)
    called = int((table["label"] == "atypical").sum())
    assert report.tables["counts"][:4] == [["patches", "12"], ["scored", "12"], ["skipped (unreadable)", "0"],
                                           ["called atypical", f"{called} ({called / 12:.1%})"]]
    assert called == 6
    assert "metrics" not in report.tables and "confusion" not in report.tables  # no labels, no labelled parts
    margin = (table["p_atypical"] - t).abs()
    uncertain, confident = margin.nsmallest(N_THUMBS).index, margin.nlargest(N_THUMBS).index
    assert [c.split("\n")[1] for c in report.galleries["gallery-uncertain"]] == table.loc[uncertain, "path"].tolist()
    assert [c.split("\n")[1] for c in report.galleries["gallery-confident"]] == table.loc[confident, "path"].tolist()
    assert "histogram" in html_path.read_text()
    assert_self_contained(html_path.read_text())


GEOMETRY = """<script>
const r = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
const c = document.getElementById('curves');
document.body.insertAdjacentHTML('beforeend', '<pre id="geometry">' + JSON.stringify({
  metrics: r(document.getElementById('metrics')), curves: r(c), decoded: c.complete && c.naturalWidth > 0}) + '</pre>');
</script></body>"""


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--window-size=1200,2000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium browser installed (Debian: apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium_with_the_table_and_the_curves(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        y = int(i % 3 == 0)
        Image.fromarray(make_patch(rng, bool(y))).save(tmp_path / f"x{i}.png")
        p = float(np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2), 0, 1))
        rows.append({"path": str(tmp_path / f"x{i}.png"), "p_atypical": p, "label": "atypical" if p >= 0.5 else "normal",
                     "true_label": y})
    card = {"build": {"arch": "timm", "backbone": "x"}, "threshold": 0.5, "class_names": ["normal", "atypical"], "provenance": {}}
    report = tmp_path / "report.html"
    write_report(report, pd.DataFrame(rows), threshold=0.5, cards=[card], title="render test", n_boot=100)

    probe = tmp_path / "probe.html"  # the same page without its CSP, plus a script that reports where things are
    page = re.sub(r"<meta http-equiv=\"Content-Security-Policy\"[^>]*>", "", report.read_text())
    probe.write_text(page.replace("</body>", GEOMETRY))
    dom = _chromium("--dump-dom", probe.as_uri(), profile=tmp_path / "profile1")
    found = re.search(r'<pre id="geometry">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    geometry = json.loads(found.group(1))
    assert geometry["decoded"], "the inlined curve image did not decode"

    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", report.as_uri(), profile=tmp_path / "profile2")
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (2000, 1200, 3)
    ink = (img < 200).any(axis=2)  # anything not (near) white
    assert ink.mean() > 0.02, "blank page"

    def region(name: str) -> tuple[slice, slice]:
        left, top, right, bottom = (int(round(v)) for v in geometry[name])
        assert 0 <= left < right <= 1200 and 0 <= top < bottom <= 2000, (name, geometry[name])
        return slice(top, bottom), slice(left, right)

    table = region("metrics")
    assert ink[table].mean() > 0.05  # text and borders of the metrics table
    curves = region("curves")
    assert (curves[1].stop - curves[1].start) > 600 and ink[curves].mean() > 0.015
    blue = np.abs(img[curves] - (31, 119, 180)).max(axis=2) < 40  # matplotlib's C0: the ROC (left) and PR (right) lines
    half = blue.shape[1] // 2
    assert blue[:, :half].sum() > 300 and blue[:, half:].sum() > 300, (blue[:, :half].sum(), blue[:, half:].sum())
