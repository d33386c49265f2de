"""A slide's calibrated calls: tile p-values, the Anomalous tiles, the verdict and the colour scale (issue 10).

The one place ``infer`` (and so ``cohort``) turns tile scores into what a pathologist reads. The statistics
live in ``scoring/`` (numpy only); this module applies them to one slide's grid with the user's options and
says, in the store's attributes, which rule was used, at what level and on which calibration, so that every
output (tables, GeoJSON, preview, OME-TIFF colours, cohort rows) shows the same calls.

Kept apart from ``engine``'s other per-slide figures on purpose: other per-slide summaries (colour QC) add
their own keys beside these, not inside them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..scoring import Calibration, SlideVerdict, cell_area_mm2, resolution_warning, resolve_rule, slide_verdict
from ..scoring.calibration import DISPLAY_QUANTILES

log = logging.getLogger(__name__)

#: Models whose missing calibration this process has already warned about: one warning per model, not per slide.
_WARNED: set[str] = set()

#: Tiles with less tissue than this are scored and mapped but not tested under ``fdr``: a calibration is made
#: of ``wsi-haloae tiles`` tiles, which keep >= 0.5 tissue by default (``TilesConfig.min_tissue``), so a tile
#: at the tissue's edge, mostly glass, has no like in it and its p-value would not be valid (measured: all 8 such
#: tiles of a normal synthetic slide had p <= 0.05 against a hold-out calibration, and made every false call
#: on the planted slide; tests/test_calibration_quality.py).
CALL_MIN_TISSUE = 0.5

#: Without a calibration the colour scale is per slide (as before round 2): 0 to this quantile of its tile maxima.
SLIDE_DISPLAY_QUANTILE = 0.99


@dataclass(frozen=True)
class SlideCalls:
    """The calls of one slide and where they came from."""

    verdict: SlideVerdict
    calibration: Calibration | None
    requested: str  # the rule the user asked for (``--threshold``); ``verdict.rule`` is the one applied
    low_tissue: int  # tissue tiles below ``CALL_MIN_TISSUE``, not tested (fdr) and without a p-value
    fdr: float  # ``--fdr`` as asked (``verdict.alpha`` is None when the rule applied is mad)
    area_basis: str | None  # how the tile area was worked out, None when it is unknown

    @property
    def pvalues(self) -> np.ndarray | None:
        """Per tile (float32, NaN where unscored); None without a calibration."""
        p = self.verdict.pvalues
        return None if p is None else p.astype(np.float32)

    @property
    def anomalous(self) -> np.ndarray:
        return self.verdict.anomalous

    def display_range(self, score_max: np.ndarray) -> tuple[list[float], str]:
        """The colour scale of the maps and where it comes from: the calibration's (the same on every slide of
        the model), else this slide's own 0 .. 99th percentile of its tile maxima (not comparable across slides)."""
        if self.calibration is not None:
            lo, hi = self.calibration.display_range
            q0, q1 = DISPLAY_QUANTILES
            return [float(lo), float(hi)], (f"calibration: normal-tissue pixel quantiles {q0:g} .. {q1:g} "
                                            f"({self.calibration.n:,} tiles)")
        finite = np.asarray(score_max, np.float64)
        finite = finite[np.isfinite(finite)]
        vmax = float(np.quantile(finite, SLIDE_DISPLAY_QUANTILE)) if finite.size else 1.0
        return [0.0, vmax], (f"this slide: 0 .. the {SLIDE_DISPLAY_QUANTILE:g} quantile of its tile maxima "
                             "(no calibration: not comparable across slides)")

    def attrs(self) -> dict[str, Any]:
        """The store attributes ``calls``, ``calibration`` and ``verdict``."""
        v = self.verdict
        if v.rule == "fdr":
            method = (f"Benjamini-Hochberg at FDR {v.alpha:g} over the slide's tissue tiles, on conformal p-values "
                      f"against {self.calibration.n:,} normal calibration tiles")
        else:
            method = "tile anomaly_score > median + 3 * 1.4826 * MAD of the slide's own tiles (uncalibrated)"
        calls = {"rule": v.rule, "requested": self.requested, "fdr": self.fdr, "alpha": v.alpha, "method": method,
                 "anomalous_tiles": v.anomalous_tiles, "pvalue_cutoff": v.pvalue_cutoff,
                 "score_threshold": v.score_threshold, "fallback": v.rule != self.requested}
        cal = None
        if self.calibration is not None:
            s = self.calibration.summary()
            p = s["provenance"]
            cal = {"n": s["n"], "source": p.get("source"), "date": p.get("date"), "tiles": p.get("tiles"),
                   "n_slides": p.get("n_slides"), "min_pvalue": s["min_pvalue"],
                   "score_quantiles": s["score_quantiles"], "display_range": s["display_range"],
                   "mean_map_sha256": s["mean_map_sha256"]}
        verdict = {**v.to_dict(), "area_basis": self.area_basis, "untested_low_tissue": self.low_tissue,
                   "min_tissue_tested": CALL_MIN_TISSUE if v.rule == "fdr" else None}
        return {"calls": calls, "calibration": cal, "verdict": verdict}

    def summary(self) -> dict[str, Any]:
        """The verdict's figures for the store's ``summary`` (the cohort row: ``scoring.SUMMARY_KEYS``)."""
        return self.verdict.summary()


def call_slide(score_mean: np.ndarray, grid, slide_mpp: float | None, metadata: dict[str, Any], model_id: str,
               model_label: str, options) -> SlideCalls:
    """Classify ``grid``'s tissue tiles (``score_mean`` in grid order) under ``options.threshold`` / ``fdr``.

    ``metadata``: the loaded model's (its ``calibration`` block, checked when the model was loaded);
    ``model_id``: identifies the model for the one-per-process missing-calibration warning.
    """
    cal = Calibration.from_metadata(metadata, model_label)
    rule, warning = resolve_rule(options.threshold, cal is not None, model_label)
    if warning and len(score_mean) and model_id not in _WARNED:  # nothing to classify on a slide without tissue
        _WARNED.add(model_id)
        log.warning("%s", warning)
    if slide_mpp is not None and slide_mpp > 0:
        area = cell_area_mm2(grid.level0_tile, slide_mpp)
        basis = (f"{grid.level0_tile:g} level-0 px per tile side at {slide_mpp:g} µm/px: {area:.4g} mm² per tile "
                 "(edge tiles count whole)")
    else:
        area, basis = None, None
    scores = np.asarray(score_mean, np.float64)
    low = np.asarray(grid.tissue, np.float64) < CALL_MIN_TISSUE
    # fdr tests only tiles the calibration has like ones of; the per-slide rule takes every scored tile, as before
    tested = np.where(low, np.nan, scores) if rule == "fdr" else scores
    v = slide_verdict(tested, grid.rows, grid.cols, (grid.n_rows, grid.n_cols), area, cal, options.fdr, rule)
    if rule == "mad" and cal is not None:  # p-values still written, and still only where they are valid
        v = replace(v, pvalues=np.where(low, np.nan, v.pvalues))
    if cal is not None and rule == "fdr":
        line = resolution_warning(cal.n, v.tissue_tiles, options.fdr)
        if line:
            log.warning("%s", line)
    return SlideCalls(verdict=v, calibration=cal, requested=options.threshold, fdr=options.fdr, area_basis=basis,
                      low_tissue=int(low.sum()) if cal is not None else 0)


def _rule_text(threshold: str | None, fdr: float | None) -> str:
    return f"--threshold {threshold}" + (f" --fdr {fdr:g}" if threshold == "fdr" and fdr is not None else "")


def other_calls(calls: dict[str, Any] | None, threshold: str, fdr: float) -> str | None:
    """How a complete store's calls (its ``calls`` attribute) differ from the ones asked for now, in words
    ("made at --threshold fdr --fdr 0.01, asked --threshold fdr --fdr 0.05"), or None when they agree or the
    store predates calls. A complete store keeps its calls; ``infer`` and ``cohort`` say so with this line."""
    if not calls:
        return None
    asked = (threshold, fdr if threshold == "fdr" else None)
    made_rule = calls.get("requested")
    made = (made_rule, calls.get("fdr") if made_rule == "fdr" else None)
    if asked == made:
        return None
    return f"made at {_rule_text(*made)}, asked {_rule_text(*asked)}"


def verdict_line(v: dict[str, Any] | None) -> str:
    """The verdict part of infer's one-line summary, from the store's ``verdict`` attribute ("" when absent)."""
    if not v:
        return ""
    if v.get("verdict") == "no tissue":
        low = v.get("untested_low_tissue") or 0
        return (f"verdict: no tissue to test ({low} edge tiles below {v.get('min_tissue_tested'):g} tissue)"
                if low and v.get("min_tissue_tested") else "verdict: no tissue")
    rule = f"FDR {v['alpha']:g}" if v.get("rule") == "fdr" else "per-slide MAD rule, uncalibrated"
    area = v.get("anomalous_area_mm2")
    where = (f", {area:.3g} mm², largest region {v['largest_region_mm2']:.3g} mm²" if area is not None
             else ", area unknown (no slide mpp)")
    simes = f", slide p-value {v['simes_pvalue']:.3g}" if v.get("simes_pvalue") is not None else ""
    return (f"verdict: {v['verdict']} ({v['anomalous_tiles']} of {v['tissue_tiles']} tissue tiles anomalous"
            f"{where}{simes}; {rule})")
