"""One self-contained HTML report for ``evaluate`` and ``predict``.

Everything a reader needs travels in the one file: figures and patch thumbnails are inlined as
base64 PNG, the CSS is inline, and a Content-Security-Policy forbids any script or network request,
so the report opens the same on an air-gapped workstation, in a mail attachment or a browser sandbox.
Every string that comes from data (file names, card fields, domains) is HTML-escaped: file names are
input, and a patch called ``<script>.png`` must show as text.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_curve

import mitotype
from mitotype._io import write_text
from mitotype.evaluation.metrics import METRIC_NAMES

N_THUMBS = 8  # patches per gallery (worst errors, most confident, most uncertain)
THUMB_PX = 128
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px 32px;color:#222;max-width:1120px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 6px}
.sub{color:#666;font-size:13px} table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #ccc;padding:3px 9px;text-align:right} th{background:#f1f3f6} td.k,th.k{text-align:left}
.figs img{max-width:100%;border:1px solid #eee} .gallery{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:130px;font-size:11px} figure img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #bbb}
figcaption{overflow-wrap:anywhere} #card td{text-align:left} .note{color:#666;font-size:12px}
details pre{font-size:11px;background:#f7f7f7;padding:8px}
.warn{background:#fff3cd;border:1px solid #e0b800;padding:8px 12px;margin:12px 0;font-size:14px}
"""


def esc(value: Any) -> str:
    """Any value from data as safe HTML text (quotes included, for attributes)."""
    return html.escape(str(value), quote=True)


def write_report(
    path: Path, table: pd.DataFrame, *, threshold: float, cards: Sequence[dict], title: str,
    metrics: dict | None = None, n_boot: int = 1000,
) -> None:
    """Write the report for a prediction table (``path, p_atypical, label`` + input columns; a known
    truth is ``true_label`` 0/1, -1 unknown). Labelled parts (metrics with 95% intervals, ROC/PR
    curves, confusion matrix, per-domain table, worst errors) appear when some rows have a truth;
    ``metrics`` (metrics.json) is shown as is, else computed on the labelled rows."""
    from mitotype.evaluation.report import evaluate_predictions

    scored = table[table["p_atypical"].notna()]
    p = scored["p_atypical"].to_numpy(dtype=float)
    truth = _truth(scored)
    known = truth >= 0
    body = [_header(table, scored, threshold, cards, title)]
    if known.any():
        lab = scored[known]
        y = truth[known]
        if metrics is None:
            frame = pd.DataFrame({"label": y, "p_atypical": p[known], "domain": lab["domain"] if "domain" in lab else ""})
            metrics = evaluate_predictions(frame, threshold=threshold, n_boot=n_boot)
        note = "" if known.all() else f" ({int(known.sum())} labelled of {len(scored)} scored patches)"
        body += [f"<h2>Metrics{esc(note)}</h2>", _metrics_table(metrics), '<div class="figs">',
                 _img(_curves_png(y, p[known], threshold), "curves", "ROC and precision-recall curves"), "</div>",
                 "<h2>Confusion matrix</h2>", _confusion(y, p[known] >= threshold)]
        if metrics.get("per_domain"):
            body += ["<h2>Per domain</h2>", _per_domain(metrics["per_domain"])]
        wrong_fp = lab[(y == 0) & (p[known] >= threshold)].sort_values("p_atypical", ascending=False)
        wrong_fn = lab[(y == 1) & (p[known] < threshold)].sort_values("p_atypical", ascending=True)
        body += ["<h2>Worst errors</h2>", "<h3>Most confident false positives (normal called atypical)</h3>",
                 _gallery(wrong_fp.head(N_THUMBS), "gallery-fp"),
                 "<h3>Most confident false negatives (atypical called normal)</h3>", _gallery(wrong_fn.head(N_THUMBS), "gallery-fn")]
    if len(scored):
        margin = (scored["p_atypical"] - threshold).abs()
        body += ["<h2>Distribution of p_atypical</h2>", '<div class="figs">',
                 _img(_histogram_png(p, truth, threshold), "histogram", "histogram of p_atypical"), "</div>",
                 "<h2>Most confident calls</h2>", _gallery(scored.loc[margin.nlargest(N_THUMBS).index], "gallery-confident"),
                 "<h2>Most uncertain calls</h2>", _gallery(scored.loc[margin.nsmallest(N_THUMBS).index], "gallery-uncertain")]
    body += ["<h2>Model card</h2>", _cards(cards)]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    write_text(path, page)


def _truth(scored: pd.DataFrame) -> np.ndarray:
    """True labels 0/1 of the scored rows, -1 where unknown (no ``true_label`` column: all unknown)."""
    if "true_label" not in scored.columns:
        return np.full(len(scored), -1, dtype=np.int64)
    t = pd.to_numeric(scored["true_label"], errors="coerce").fillna(-1).to_numpy()
    return np.where(np.isin(t, (0, 1)), t, -1).astype(np.int64)


def _header(table: pd.DataFrame, scored: pd.DataFrame, threshold: float, cards: Sequence[dict], title: str) -> str:
    n_atyp = int((scored["p_atypical"] >= threshold).sum())
    rows = [("patches", len(table)), ("scored", len(scored)), ("skipped (unreadable)", len(table) - len(scored)),
            ("called atypical", f"{n_atyp} ({n_atyp / max(len(scored), 1):.1%})"), ("called normal", len(scored) - n_atyp),
            ("threshold", f"{threshold:.4g}"), ("models", f"{len(cards)}" + (" (fold ensemble, mean p)" if len(cards) > 1 else ""))]
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    note = in_sample_note(table["path"].astype(str).tolist() if "path" in table else [], cards)
    warning = f"<div class='warn' id='in-sample'><b>Training data:</b> {esc(note)}</div>" if note else ""
    return (f"<h1>{esc(title)}</h1><div class='sub'>mitotype {esc(mitotype.__version__)} · {esc(when)}</div>{warning}"
            "<h2>Counts</h2>" + _kv_table(rows, "counts"))


def in_sample_note(paths: Sequence[str], cards: Sequence[dict]) -> str | None:
    """A warning when some ``paths`` lie under a card's ``trained_on.source`` (the common folder of the
    model's training images), else None. Scores on a model's own training patches look far better
    than on new ones, and a report that does not say so reads as a measure of accuracy. A source
    that is a filesystem root (training images from several disks) would match anything: ignored."""
    sources: dict[Path, int | None] = {}
    for card in cards:
        trained_on = (card.get("provenance") or {}).get("trained_on") or {}
        if trained_on.get("source"):
            source = Path(trained_on["source"]).resolve()
            if source != Path(source.anchor):
                sources.setdefault(source, trained_on.get("n"))
    if not sources or not len(paths):
        return None
    hits = {source: 0 for source in sources}
    for path in paths:
        resolved = Path(path).resolve()
        for source in sources:
            if resolved == source or source in resolved.parents:
                hits[source] += 1
                break
    found = [source for source, k in hits.items() if k]
    if not found:
        return None
    n_train = sources[found[0]] if len(found) == 1 else None
    size = f" ({n_train} training patches{' per model' if len(cards) > 1 else ''})" if n_train else ""
    return (f"{sum(hits.values())} of these {len(paths)} patches lie under {', '.join(map(str, found))}, where the model was "
            f"trained{size}: they include the model's own training data, so scores here are not a measure of accuracy; "
            "see the cross-validated figures in the model card.")


def _kv_table(rows: Sequence[tuple[Any, Any]], ident: str = "") -> str:
    cells = "".join(f"<tr><td class='k'>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows)
    return f"<table{f' id={ident!r}' if ident else ''}>{cells}</table>"


def _num(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _ci(ci: Any) -> str:
    return "–" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _metrics_table(metrics: dict) -> str:
    ci = metrics.get("ci95", {})
    rows = "".join(f"<tr><td class='k'>{esc(m)}</td><td>{_num(metrics.get(m))}</td><td>{_ci(ci.get(m))}</td></tr>"
                   for m in METRIC_NAMES)
    return (f"<table id='metrics'><tr><th class='k'>metric</th><th>value</th><th>95% interval</th></tr>{rows}</table>"
            f"<div class='note'>n = {int(metrics['n'])} patches, {int(metrics['n_atypical'])} atypical; threshold "
            f"{metrics['threshold']:.4g}; percentile bootstrap over patches.</div>")


def _confusion(y: np.ndarray, called: np.ndarray) -> str:
    c = [[int(((y == t) & (called == bool(k))).sum()) for k in (0, 1)] for t in (0, 1)]
    return ("<table id='confusion'><tr><th class='k'>true \\ called</th><th>normal</th><th>atypical</th></tr>"
            f"<tr><th class='k'>normal</th><td>{c[0][0]}</td><td>{c[0][1]}</td></tr>"
            f"<tr><th class='k'>atypical</th><td>{c[1][0]}</td><td>{c[1][1]}</td></tr></table>")


def _per_domain(per_domain: dict) -> str:
    head = ("<tr><th class='k'>domain</th><th>n</th><th>atypical</th><th>balanced accuracy</th><th>AUROC</th><th>sensitivity</th>"
            "<th>specificity</th></tr>")
    rows = []
    for name, m in per_domain.items():
        ci = m.get("ci95", {})
        shown = ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")
        cells = "".join(f"<td>{_num(m.get(k))} {_ci(ci.get(k))}</td>" for k in shown)
        rows.append(f"<tr><td class='k'>{esc(name)}</td><td>{int(m['n'])}</td><td>{int(m['n_atypical'])}</td>{cells}</tr>")
    return f"<table id='per-domain'>{head}{''.join(rows)}</table>"


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    return buf.getvalue()


def _img(png: bytes, ident: str, alt: str) -> str:
    return f"<img id='{ident}' alt='{esc(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _curves_png(y: np.ndarray, p: np.ndarray, threshold: float) -> bytes:
    """ROC and precision-recall side by side, each with the operating point at ``threshold``."""
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.6))
    called = p >= threshold
    if y.min() != y.max():
        fpr, tpr, _ = roc_curve(y, p, pos_label=1)
        roc_ax.plot(fpr, tpr, lw=2, color="C0", label="ROC")
        roc_ax.plot([called[y == 0].mean()], [called[y == 1].mean()], "o", color="C3", label=f"threshold {threshold:.3g}")
        prec, rec, _ = precision_recall_curve(y, p, pos_label=1)
        pr_ax.plot(rec, prec, lw=2, color="C0", label="precision-recall")
        pr_ax.axhline(y.mean(), ls="--", color="grey", lw=1, label=f"prevalence {y.mean():.2f}")
        if called.any():
            pr_ax.plot([called[y == 1].mean()], [y[called].mean()], "o", color="C3", label=f"threshold {threshold:.3g}")
    else:
        for ax in (roc_ax, pr_ax):
            ax.text(0.5, 0.5, "undefined: one class only", ha="center", va="center")
    roc_ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    for ax, (xl, yl, t) in ((roc_ax, ("False positive rate", "True positive rate", "ROC")),
                            (pr_ax, ("Recall (sensitivity)", "Precision", "Precision-recall"))):
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xl, ylabel=yl, title=t)
        ax.legend(loc="lower right" if ax is roc_ax else "lower left", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _histogram_png(p: np.ndarray, truth: np.ndarray, threshold: float) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bins: list[float] = np.linspace(0, 1, 26).tolist()
    if (truth >= 0).any():
        kinds = ((0, "true normal"), (1, "true atypical"), (-1, "unlabelled"))
        parts = [(p[truth == k], name) for k, name in kinds if (truth == k).any()]
        ax.hist([v for v, _ in parts], bins=bins, stacked=True, label=[n for _, n in parts])
        ax.legend(fontsize=8)
    else:
        ax.hist(p, bins=bins, color="C0")
    ax.axvline(threshold, color="C3", ls="--", lw=1)
    ax.set(xlabel="p_atypical", ylabel="patches", xlim=(0, 1))
    fig.tight_layout()
    return _png(fig)


def _thumbnail(path: str) -> str:
    """The patch as an inline PNG, or a note when it cannot be read."""
    try:
        with Image.open(path) as src:
            im = src.convert("RGB")
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except (OSError, ValueError):
        return "<div class='note'>(image unreadable)</div>"
    return f"<img alt='patch' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _gallery(rows: pd.DataFrame, ident: str) -> str:
    if rows.empty:
        return f"<div class='note' id='{ident}'>none</div>"
    truth = _truth(rows)
    figs = []
    for (_, row), t in zip(rows.iterrows(), truth):
        known = f" · true {mitotype.CLASS_NAMES[t]}" if t >= 0 else ""
        figs.append(f"<figure>{_thumbnail(str(row['path']))}<figcaption>p_atypical {row['p_atypical']:.3f} · "
                    f"called {esc(row['label'])}{esc(known)}<br>{esc(row['path'])}</figcaption></figure>")
    return f"<div class='gallery' id='{ident}'>{''.join(figs)}</div>"


def _cards(cards: Sequence[dict]) -> str:
    """The first model's card (build, threshold, provenance) in tables; ensemble members' thresholds."""
    if not cards:
        return "<div class='note'>no card</div>"
    card = cards[0]
    b, prov = card.get("build", {}), card.get("provenance", {})
    image = b.get("views", {}).get("image", {})
    build = [(k, b.get(k)) for k in ("arch", "backbone", "input_size", "patch_size", "size_policy", "center_crop", "mpp", "reduce")]
    build += [("normalisation mean / std", f"{_floats(image.get('mean'))} / {_floats(image.get('std'))}"),
              ("heads", ", ".join(f"{h.get('name')} ({h.get('num_classes')} classes)" for h in b.get("heads", [])))]
    general = [("class names", ", ".join(map(str, card.get("class_names", [])))), ("stored threshold", card.get("threshold")),
               ("created", card.get("created")), ("mitotype version", card.get("mitotype_version"))]
    if len(cards) > 1:
        general.append(("fold thresholds", ", ".join(f"{c.get('threshold'):.4g}" for c in cards)))
    provenance = [(k, prov.get(k)) for k in ("recipe", "description", "command") if prov.get(k)]
    provenance += [(f"trained on: {k}", _short(v)) for k, v in (prov.get("trained_on") or {}).items()]
    provenance += _metric_rows(prov.get("metrics") or {})
    config = json.dumps(prov.get("config", {}), indent=1, default=str)
    return (f"<div id='card'><h3>Model</h3>{_kv_table(general)}<h3>Build</h3>{_kv_table(build)}"
            f"<h3>Provenance</h3>{_kv_table(provenance) if provenance else '<div class=note>none recorded</div>'}"
            f"<details><summary>training configuration</summary><pre>{esc(config)}</pre></details></div>")


def _floats(values: Any) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]" if isinstance(values, list) else str(values)


def _metric_rows(metrics: dict) -> list[tuple[str, str]]:
    """One row per recorded measurement: its headline numbers, not the whole nested dict."""
    rows = []
    for name, m in metrics.items():
        if isinstance(m, dict):
            shown = [f"{k} {_num(m[k])}" for k in ("balanced_accuracy", "roc_auc", "sensitivity", "specificity")
                     if isinstance(m.get(k), (int, float))]
            rows.append((f"metrics: {name}", ", ".join(shown) + (f" (n = {m['n']})" if "n" in m else "") if shown else _short(m)))
        else:
            rows.append((f"metrics: {name}", _short(m)))
    return rows


def _short(value: Any, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"
