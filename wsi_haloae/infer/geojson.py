"""Tile objects for QuPath: a GeoJSON FeatureCollection QuPath imports by drag-and-drop.

Each scored tile becomes a ``"tile"`` object with its scores as measurements, so that QuPath's
Measure -> Show measurement maps colours the slide by ``anomaly_score``. Tiles above the slide's threshold
also get the class ``Anomalous`` (a class needs a colour, or QuPath's import fails).

Coordinates: QuPath shows an OpenSlide image cropped to ``openslide.bounds-*`` when the slide has them, so
its pixel (0, 0) is level-0 pixel (bounds-x, bounds-y). We subtract that offset (recorded in the store's
attributes as ``geojson.offset``). Features are streamed to disk one at a time (no list of 40k dicts).
"""

from __future__ import annotations

import gzip
import io
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_output
from ..scoring.rules import MAD_K, robust_threshold  # noqa: F401  (the per-slide rule's home is scoring/)

CLASS_NAME = "Anomalous"
CLASS_COLOR = (220, 20, 60)
_NS = uuid.UUID("6b1d3c1e-4f0c-4a7e-9b52-2f1a9f0c7d11")


def _num(v: float) -> float | int:
    r = round(float(v), 3)
    return int(r) if r.is_integer() else r


def write_geojson(path: str | Path, xs: np.ndarray, ys: np.ndarray, tile_w: float | np.ndarray,
                  tile_h: float | np.ndarray,
                  score_mean: np.ndarray, score_max: np.ndarray, *, threshold: float | None,
                  offset: tuple[float, float] = (0.0, 0.0), rows: np.ndarray | None = None,
                  cols: np.ndarray | None = None, seed: str = "", pvalues: np.ndarray | None = None,
                  anomalous: np.ndarray | None = None, collection: dict[str, Any] | None = None) -> int:
    """Write a FeatureCollection of the tiles with finite scores. ``.gz`` -> gzip. Returns the feature count.

    ``xs, ys``: level-0 top-left of each tile; ``tile_w, tile_h``: its size, one for all or one per tile
    (edge tiles clipped to the slide); ``offset``: subtracted (the OpenSlide bounds origin).
    Feature ids are UUIDs derived from ``seed`` and the tile's row/column, so reruns give the same ids.
    ``anomalous`` (per tile) classifies tiles, else ``threshold`` on the mean score; ``pvalues`` adds the
    measurement ``anomaly_pvalue``; ``collection`` adds the collection's own members (``description`` and
    ``properties``: the rule, its level and the calibration), which GeoJSON allows and QuPath ignores.
    Atomic (``fileio.atomic_output``): a failed write leaves nothing at ``path``.
    An OSError (a full disk) propagates; infer turns it into one line naming the output.
    """
    path = Path(path)
    gz = path.name.lower().endswith(".gz")
    n = 0
    tws, ths = np.broadcast_to(tile_w, len(xs)), np.broadcast_to(tile_h, len(xs))
    with atomic_output(path) as tmp, open(tmp, "wb") as raw:
        f = io.TextIOWrapper(gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if gz else raw, encoding="utf-8")
        head = json.dumps({"type": "FeatureCollection", **(collection or {})}, separators=(",", ":"))
        f.write(head[:-1] + ',"features": [')
        for i in range(len(xs)):
            m, mx = float(score_mean[i]), float(score_max[i])
            if not (np.isfinite(m) and np.isfinite(mx)):
                continue  # failed tile: no score, no object (JSON has no NaN)
            x0, y0 = float(xs[i]) - offset[0], float(ys[i]) - offset[1]
            x1, y1 = x0 + float(tws[i]), y0 + float(ths[i])
            ring = [[_num(x0), _num(y0)], [_num(x1), _num(y0)], [_num(x1), _num(y1)], [_num(x0), _num(y1)],
                    [_num(x0), _num(y0)]]
            r = int(rows[i]) if rows is not None else i
            c = int(cols[i]) if cols is not None else 0
            props: dict[str, Any] = {
                "objectType": "tile",
                "name": f"tile r{r} c{c}",
                "measurements": {"anomaly_score": m, "anomaly_score_max": mx},
            }
            if pvalues is not None and np.isfinite(pvalues[i]):
                props["measurements"]["anomaly_pvalue"] = float(pvalues[i])
            called = bool(anomalous[i]) if anomalous is not None else (threshold is not None and m > threshold)
            if called:
                props["classification"] = {"name": CLASS_NAME, "color": list(CLASS_COLOR)}
            feat = {
                "type": "Feature",
                "id": str(uuid.uuid5(_NS, f"{seed}:{r}:{c}")),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": props,
            }
            f.write(("\n" if n == 0 else ",\n") + json.dumps(feat, separators=(",", ":")))
            n += 1
        f.write("\n]}\n")
        f.close()
    return n


def calls_description(attrs: dict[str, Any]) -> dict[str, Any]:
    """The collection members that say how the tiles were classified (from the store's attributes)."""
    calls, cal, verdict = attrs.get("calls") or {}, attrs.get("calibration"), attrs.get("verdict") or {}
    if not calls:  # a store from before the calibrated calls
        return {}
    text = f"{CLASS_NAME} tiles: {calls.get('method')}"
    if cal:
        text += f"; calibration {cal.get('n')} normal tiles ({cal.get('source')}, {cal.get('date')})"
    if verdict:
        text += f"; slide verdict {verdict.get('verdict')}"
    return {"description": text,
            "properties": {"calls": calls, "calibration": cal, "verdict": verdict,
                           "display_range": attrs.get("display_range")}}
