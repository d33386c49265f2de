"""The cohort summary: DIR/cohort.csv, DIR/cohort.json and DIR/index.html (written atomically).

The HTML page is one self-contained file next to the previews: a thumbnail + heatmap per slide and the table,
sortable by clicking a column (highest scores first by default), so a pathologist can scan a cohort by eye.
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Any

from ..fileio import write_text_atomic
from ..scoring.verdict import SUMMARY_KEYS as VERDICT_COLUMNS

#: Each slide's colour QC (infer/colour.py): ok|unusual, the stain distance in degrees, why unusual.
COLOUR_COLUMNS = ["colour_qc", "stain_distance", "colour_reason"]
COLUMNS = ["id", "path", "status", "error", "tiles", "tissue_fraction", "score_mean", "score_p95", "score_max",
           "anomalous_tiles", *COLOUR_COLUMNS, "seconds", "host", "worker"]
#: the calibrated verdict's columns (issue 10), after the status and error: verdict, area, Simes p-value ...
COLUMNS[4:4] = [c for c in VERDICT_COLUMNS if c not in COLUMNS]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    return buf.getvalue()


_JS = """
function sortBy(th){const t=th.closest('table'),b=t.tBodies[0],i=[...th.parentNode.children].indexOf(th);
const num=th.dataset.num==='1',dir=th.dataset.dir==='desc'?'asc':'desc';
[...th.parentNode.children].forEach(h=>{h.dataset.dir='';h.classList.remove('asc','desc')});th.dataset.dir=dir;th.classList.add(dir);
const key=r=>{const c=r.children[i],v=c.dataset.v!==undefined?c.dataset.v:c.textContent;
if(!num)return v.toLowerCase();const f=parseFloat(v);return isNaN(f)?-Infinity:f};
const rs=[...b.rows].sort((a,c)=>{const x=key(a),y=key(c);return (x<y?-1:x>y?1:0)*(dir==='asc'?1:-1)});
rs.forEach(r=>b.appendChild(r));}
document.querySelectorAll('th[data-sort]').forEach(th=>th.addEventListener('click',()=>sortBy(th)));
"""

_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:middle}
th[data-sort]{cursor:pointer;user-select:none;background:#f4f4f4}th.asc:after{content:' \\25B2'}th.desc:after{content:' \\25BC'}
td.num{text-align:right;font-variant-numeric:tabular-nums}img{max-width:220px;max-height:160px;display:block}
td.verdict.anomalous{color:#b00020;font-weight:600}td.verdict.normal{color:#1b5e20}
tr.failed{background:#fde8e8}tr.no-tissue{background:#fff6dd}tr.skipped td.status{color:#666}.err{max-width:30em;font-size:12px;color:#a00}
td.colour-unusual{background:#ffe0b3;color:#8a3b00;font-weight:bold;max-width:22em;font-size:12px}
p.colour-unusual{background:#ffe0b3;color:#8a3b00;padding:4px 8px;display:inline-block}
"""


def _colour_cell(r: dict[str, Any]) -> str:
    """The page's colour cell: a visible flag with its reason for an unusual slide, the stain distance for an ok
    one, empty before colour QC existed (or for a failed slide)."""
    status = r.get("colour_qc")
    if status == "unusual":
        reason = html.escape(_fmt(r.get("colour_reason")))
        return f'<td class="colour-unusual" data-v="unusual" title="{reason}">&#9888; unusual colours: {reason}</td>'
    if status == "ok":
        dist = r.get("stain_distance")
        text = "ok" + (f" ({dist:.0f}°)" if isinstance(dist, (int, float)) else "")
        return f'<td class="colour" data-v="ok">{html.escape(text)}</td>'
    return '<td class="colour" data-v=""></td>'


def _colour_note(rows: list[dict[str, Any]]) -> str:
    """A line above the table when any slide's colours are unusual."""
    n = sum(r.get("colour_qc") == "unusual" for r in rows)
    if not n:
        return ""
    return (f'<p class="colour-unusual">&#9888; {n} slide(s) with colours unlike the training slides: their scores '
            "may not be comparable (column colour).</p>\n")


#: Page order of the verdicts: the slides a pathologist should look at first come first.
VERDICT_RANK = {"anomalous": 0, "normal": 1, "no tissue": 2}


def page_order(r: dict[str, Any]) -> tuple:
    """Anomalous slides first, by their combined (Simes) p-value, smallest first, then by anomalous area,
    largest first; then normal slides the same way; then no tissue; slides without a verdict (failed,
    pending) last. Within equal figures (an uncalibrated model has no p-value) the highest raw score first."""
    rank = VERDICT_RANK.get(r.get("verdict"), len(VERDICT_RANK))
    p = r.get("simes_pvalue")
    area = r.get("anomalous_area_mm2")
    return (rank, p is None, p or 0.0, -(area or 0.0), r.get("score_max") is None, -(r.get("score_max") or 0.0), r["id"])


def _pvalue_text(p: float) -> str:
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def _cell(r: dict[str, Any], c: str) -> tuple[str, str, str]:
    """(text shown, sort value, css class) of one cell: the verdict, areas and p-values in words and units,
    every other figure as it is stored."""
    v = r.get(c)
    if c == "verdict":
        return (v or ""), str(VERDICT_RANK.get(v, len(VERDICT_RANK))), "verdict " + (v or "").replace(" ", "-")
    if c in ("anomalous_area_mm2", "largest_region_mm2"):
        return ("" if v is None else f"{v:.3g} mm²"), _fmt(v), "num"
    if c == "simes_pvalue":
        return ("" if v is None else _pvalue_text(v)), _fmt(v), "num"
    if c == "anomalous_fraction":
        return ("" if v is None else f"{100 * v:.1f} %"), _fmt(v), "num"
    return _fmt(v), _fmt(v), ""


def _kept_calls_line(meta: dict[str, Any]) -> str:
    """Slides skipped as complete whose calls were made under another rule or FDR than the page states."""
    kept = meta.get("kept_calls") or {}
    if not kept:
        return ""
    return (f" Not so for {len(kept)} slide(s) complete from an earlier run, which keep the calls they were made "
            "with (rerun with --overwrite to redo them): " + "; ".join(f"{i}: {kept[i]}" for i in sorted(kept)) + ".")


def _scale_line(meta: dict[str, Any] | None) -> str:
    """What the previews' colours mean: one scale fixed by the model's calibration, or per slide without one."""
    meta = meta or {}
    cal = meta.get("calibration")
    if cal:
        lo, hi = cal["display_range"]
        calls = ("the per-slide median + 3 MAD rule (--threshold mad)" if meta.get("threshold") == "mad" else
                 f"Benjamini-Hochberg at FDR {meta.get('fdr', 0.05):g} on p-values against that calibration")
        return (f"Colours: one scale for every slide ({lo:.3g} to {hi:.3g}, fixed by the model's calibration on "
                f"{cal['n']:,} normal tiles), so the same colour is the same score on every slide. Anomalous tiles: "
                f"{calls}." + _kept_calls_line(meta))
    if "calibration" in meta:
        return ("The model has no calibration: each preview has its own colour scale and Anomalous tiles are the "
                "per-slide median + 3 MAD rule (not comparable across slides; see wsi-haloae calibrate)."
                + _kept_calls_line(meta))
    return ""


def to_html(rows: list[dict[str, Any]], out_dir: Path, title: str, meta: dict[str, Any] | None = None) -> str:
    """The cohort page; previews are linked relative to the page (DIR/<id>.png)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    verdicts: dict[str, int] = {}
    for r in rows:
        if r.get("verdict"):
            verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
    if verdicts:
        summary += "; verdicts: " + ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items(), key=lambda x: VERDICT_RANK.get(x[0], 9)))
    cols = [("preview", False, "preview"), ("id", False, "id"), ("status", False, "status"),
            ("verdict", True, "verdict"), ("anomalous_area_mm2", True, "anomalous area"),
            ("largest_region_mm2", True, "largest region"), ("simes_pvalue", True, "slide p-value (Simes)"),
            ("anomalous_tiles", True, "anomalous tiles"), ("anomalous_fraction", True, "anomalous share"),
            ("tiles", True, "tissue tiles"), ("colour", False, "colour"), ("score_max", True, "score max (raw)"), ("score_p95", True, "score p95 (raw)"),
            ("score_mean", True, "score mean (raw)"), ("tissue_fraction", True, "tissue fraction"), ("seconds", True, "seconds"),
            ("host", False, "host"), ("error", False, "error")]

    def th(c: str, num: bool, label: str) -> str:
        if c == "preview":
            return "<th>preview</th>"
        first = ' class="asc" data-dir="asc"' if c == "verdict" else ""  # the initial order, shown
        return f'<th data-sort data-num="{int(num)}"{first}>{html.escape(label)}</th>'

    head = "".join(th(*c) for c in cols)
    body = []
    for r in sorted(rows, key=page_order):
        cells = []
        for c, num, _ in cols:
            if c == "preview":
                png = out_dir / f"{r['id']}.png"
                if png.is_file():
                    src = html.escape(png.name, quote=True)
                    cells.append(f'<td><a href="{src}"><img loading="lazy" src="{src}" alt="{html.escape(r["id"])}"></a></td>')
                else:
                    cells.append("<td></td>")
                continue
            if c == "colour":
                cells.append(_colour_cell(r))
                continue
            text, key, css = _cell(r, c)
            css = css or ("num" if num else ("err" if c == "error" else c))
            cells.append(f'<td class="{html.escape(css, quote=True)}" data-v="{html.escape(key)}">{html.escape(text)}</td>')
        body.append(f'<tr class="{html.escape(r["status"].replace(" ", "-"))}">{"".join(cells)}</tr>')
    scale = _scale_line(meta)
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1><p>{len(rows)} slides: {html.escape(summary)}. "
        "Sorted by verdict (anomalous first), then slide p-value and anomalous area; click a column to sort; "
        "click a preview for the full image. Tables: "
        '<a href="cohort.csv">cohort.csv</a>, <a href="cohort.json">cohort.json</a>.</p>\n'
        + (f"<p class=\"scale\">{html.escape(scale)}</p>\n" if scale else "")
        + _colour_note(rows)
        + f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>\n"
        f"<script>{_JS}</script></body></html>\n"
    )


def write_reports(out_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """cohort.csv, cohort.json (rows + run metadata) and index.html, each replaced atomically."""
    write_text_atomic(out_dir / "cohort.csv", to_csv(rows))
    write_text_atomic(out_dir / "cohort.json", json.dumps({"cohort": meta, "slides": rows}, indent=1, default=str))
    write_text_atomic(out_dir / "index.html", to_html(rows, out_dir, f"wsi-haloae cohort: {out_dir.name}", meta))
