"""QuPath GeoJSON annotations → one shapely geometry in level-0 slide pixels.

Coordinates: QuPath exports annotation vertices in the pixel space of the image *as QuPath shows it*. For
slides opened through OpenSlide, QuPath crops to the ``openslide.bounds-*`` rectangle by default (its
OpenSlide server applies the bounds unless the image was added with ``--no-crop``), so QuPath's (0, 0) is
level-0 (bounds-x, bounds-y). We therefore add the bounds offset (``offset``) to every vertex. For the many
formats without bounds (SVS, NDPI, generic TIFF, DICOM) the offset is (0, 0) and nothing changes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import BadInputError

log = logging.getLogger(__name__)


def _features(doc: Any) -> list[dict]:
    if isinstance(doc, dict):
        if doc.get("type") == "FeatureCollection":
            return list(doc.get("features") or [])
        if doc.get("type") == "Feature":
            return [doc]
        if doc.get("type") in ("Polygon", "MultiPolygon", "GeometryCollection"):
            return [{"type": "Feature", "geometry": doc, "properties": {}}]
    if isinstance(doc, list):
        return [f for f in doc if isinstance(f, dict)]
    raise BadInputError("not a GeoJSON FeatureCollection, Feature or list of features")


def _class_of(feature: dict) -> str | None:
    props = feature.get("properties") or {}
    c = props.get("classification")
    if isinstance(c, dict):
        return c.get("name")
    if isinstance(c, str):
        return c
    return None


def load_annotations(path: str | Path, class_name: str | None = None, offset: tuple[float, float] = (0.0, 0.0)):
    """Union of the (Multi)Polygon annotations in ``path`` (holes kept), shifted by ``offset``.

    ``class_name`` keeps only features whose ``properties.classification.name`` equals it. Points, lines and
    detections without area are ignored. Invalid outlines (hand-drawn self-intersections, a hole crossing its
    shell) are repaired by ``make_valid`` and named in one warning. Raises ``BadInputError`` naming the file
    when nothing usable is left.
    """
    from shapely import affinity
    from shapely.errors import ShapelyError
    from shapely.geometry import shape
    from shapely.ops import unary_union

    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"annotations {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"annotations {path}: not readable JSON ({exc})") from None
    try:
        feats = _features(doc)
    except BadInputError as exc:
        raise BadInputError(f"annotations {path}: {exc}") from None
    classes: set[str] = set()
    geoms = []
    repaired: list[str] = []
    for i, f in enumerate(feats):
        g = f.get("geometry")
        if not isinstance(g, dict) or g.get("type") not in ("Polygon", "MultiPolygon", "GeometryCollection"):
            continue
        c = _class_of(f)
        if c:
            classes.add(c)
        if class_name is not None and c != class_name:
            continue
        try:
            geom = shape(g)
        except (ShapelyError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise BadInputError(f"annotations {path}: malformed geometry ({exc})") from None
        if not geom.is_valid:
            geom, why = repair(geom)
            repaired.append(f"feature {i}{f' ({c})' if c else ''}: {why}, {geom.area:.0f} px² kept")
        if geom.area > 0:
            geoms.append(geom)
    if not geoms:
        if class_name is not None:
            known = ", ".join(sorted(classes)) or "none"
            raise BadInputError(f"annotations {path}: no polygon of class {class_name!r} (classes present: {known})")
        raise BadInputError(f"annotations {path}: no Polygon or MultiPolygon annotation")
    if repaired:
        log.warning("annotations %s: %d invalid polygon(s) repaired with shapely.make_valid, no area dropped "
                    "(first: %s)", path, len(repaired), repaired[0])
    u = unary_union(geoms)
    if offset != (0, 0):
        u = affinity.translate(u, xoff=offset[0], yoff=offset[1])
    return u


def repair(geom) -> tuple[Any, str]:
    """A valid (Multi)Polygon covering what an invalid outline encloses, and the reason it was invalid.

    ``make_valid(method="structure")`` unions the shells and subtracts the holes: a bow-tie keeps both lobes,
    a loop drawn over itself keeps the area it encloses, a hole stays a hole. (``buffer(0)``, used before,
    dropped one lobe of a bow-tie; the default "linework" method turns area drawn over twice into a hole.)
    Lines and points left by collapsed parts are dropped: they have no area.
    """
    import shapely
    from shapely.ops import unary_union

    why = shapely.is_valid_reason(geom)
    fixed = shapely.make_valid(geom, method="structure")
    parts = [g for g in shapely.get_parts(fixed) if g.geom_type in ("Polygon", "MultiPolygon")]
    return (unary_union(parts) if parts else shapely.Polygon()), why


def centres_inside(geom, xs, ys, half: float):
    """Boolean array: is the centre (x + half, y + half) of each tile inside ``geom`` (holes excluded)."""
    import numpy as np
    import shapely

    xs = np.asarray(xs, dtype=np.float64) + half
    ys = np.asarray(ys, dtype=np.float64) + half
    if xs.size == 0:
        return np.zeros(0, dtype=bool)
    shapely.prepare(geom)
    return np.asarray(shapely.contains_xy(geom, xs, ys), dtype=bool)
