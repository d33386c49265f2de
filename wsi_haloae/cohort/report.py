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

COLUMNS = ["id", "path", "status", "error", "tiles", "tissue_fraction", "score_mean", "score_p95", "score_max",
           "anomalous_tiles", "seconds", "host", "worker"]


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
tr.failed{background:#fde8e8}tr.no-tissue{background:#fff6dd}tr.skipped td.status{color:#666}.err{max-width:30em;font-size:12px;color:#a00}
"""


def to_html(rows: list[dict[str, Any]], out_dir: Path, title: str) -> str:
    """The cohort page; previews are linked relative to the page (DIR/<id>.png)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    cols = [("preview", False), ("id", False), ("status", False), ("score_max", True), ("score_p95", True),
            ("score_mean", True), ("anomalous_tiles", True), ("tiles", True), ("tissue_fraction", True), ("seconds", True), ("host", False),
            ("error", False)]
    def th(c: str, num: bool) -> str:
        if c == "preview":
            return "<th>preview</th>"
        first = ' class="desc" data-dir="desc"' if c == "score_max" else ""  # the initial order, shown
        return f'<th data-sort data-num="{int(num)}"{first}>{html.escape(c.replace("_", " "))}</th>'

    head = "".join(th(c, num) for c, num in cols)
    body = []
    # highest maximum tile score first: the slides most worth a look come first
    order = sorted(rows, key=lambda r: (r.get("score_max") is None, -(r.get("score_max") or 0.0), r["id"]))
    for r in order:
        cells = []
        for c, num in cols:
            if c == "preview":
                png = out_dir / f"{r['id']}.png"
                if png.is_file():
                    src = html.escape(png.name, quote=True)
                    cells.append(f'<td><a href="{src}"><img loading="lazy" src="{src}" alt="{html.escape(r["id"])}"></a></td>')
                else:
                    cells.append("<td></td>")
                continue
            v = r.get(c)
            text = html.escape(_fmt(v))
            cls = ' class="num"' if num else (' class="err"' if c == "error" else f' class="{c}"')
            cells.append(f'<td{cls} data-v="{text}">{text}</td>')
        body.append(f'<tr class="{html.escape(r["status"].replace(" ", "-"))}">{"".join(cells)}</tr>')
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1><p>{len(rows)} slides: {html.escape(summary)}. "
        "Click a column to sort; click a preview for the full image. Tables: "
        '<a href="cohort.csv">cohort.csv</a>, <a href="cohort.json">cohort.json</a>.</p>\n'
        f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>\n"
        f"<script>{_JS}</script></body></html>\n"
    )


def write_reports(out_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """cohort.csv, cohort.json (rows + run metadata) and index.html, each replaced atomically."""
    write_text_atomic(out_dir / "cohort.csv", to_csv(rows))
    write_text_atomic(out_dir / "cohort.json", json.dumps({"cohort": meta, "slides": rows}, indent=1, default=str))
    write_text_atomic(out_dir / "index.html", to_html(rows, out_dir, f"wsi-haloae cohort: {out_dir.name}"))
