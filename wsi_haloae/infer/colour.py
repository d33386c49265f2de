"""Colour QC of every slide ``infer`` scores (issue 11): what it records and how it is reported.

The check itself is ``slide.colour`` (numpy, on the low-resolution image and tissue mask the grid already
read, so no extra slide reading). Here it meets the model: the slide's stain vectors are compared with the
model's stain reference (``model.stain.qc_reference()``, fitted on the training tiles); a model without one
(a file older than stain normalisation, or one trained on tiles that did not look stained) gets the
brightfield checks only, and its attribute says so.

A flagged slide is still scored, fluorescence and dark slides included: the flag travels with the scores
(store attribute ``colour_qc``, the ``summary`` that ``cohort`` reads, ``InferResult``, the summary line, a
warning), so nothing unusual is scored silently, and a user who knows the slide is fine keeps its map.
Refusing would also lose the maps of slides flagged by a threshold that is a measured heuristic, not a rule
(docs/stain.md). Kept apart from the engine so that other per-slide verdicts can sit beside it.
"""

from __future__ import annotations

import logging
from typing import Any

from ..slide.colour import ColourQC, grid_colour_qc

log = logging.getLogger(__name__)


def check_slide_colours(grid: Any, bounds: tuple[int, int, int, int], model: Any) -> ColourQC:
    """The colour QC of one slide's ``TileGrid`` against ``model``'s stain reference (brightfield checks only
    when it has none)."""
    stain = getattr(model, "stain", None)
    reference = stain.qc_reference() if stain is not None else None
    return grid_colour_qc(grid, bounds, reference, compare=reference is not None)


def colour_attrs(qc: ColourQC) -> dict[str, Any]:
    """The store attribute ``colour_qc``: status, reason, stain distance and angles (degrees), what they were
    compared with, and the estimate's inputs and thresholds."""
    return qc.to_dict()


def colour_summary(qc: ColourQC) -> dict[str, Any]:
    """The colour keys of the store's ``summary`` (one row of ``cohort``): ``colour_qc`` ok|unusual,
    ``stain_distance`` (degrees, the larger of the hematoxylin and eosin angles; None when not compared) and
    ``colour_reason`` (why unusual)."""
    d = qc.to_dict()
    return {"colour_qc": d["status"], "stain_distance": d["stain_distance"], "colour_reason": d["reason"]}


def colour_clause(summary: dict[str, Any]) -> str:
    """The colour part of the one-line summary, from a ``summary`` (empty for stores made before colour QC)."""
    status = summary.get("colour_qc")
    if status is None:
        return ""
    if status != "ok":
        return f"; COLOURS UNUSUAL: {summary.get('colour_reason')}"
    dist = summary.get("stain_distance")
    return f"; colours ok (stain distance {dist:.0f}°)" if dist is not None else "; colours ok (brightfield checks only)"


def warn_if_unusual(slide: Any, qc: ColourQC) -> None:
    """ONE warning line for a slide whose colours are unusual (the scores are still written)."""
    if not qc.ok:
        log.warning("%s: %s", slide, qc.warning())
