"""A slide's calls and verdict from its tile scores: the one function infer and cohort call per slide.

Verdict: ``no tissue`` when no tissue tile was scored, else ``anomalous`` when the rule in force calls at
least one tile, else ``normal``. Under ``fdr`` that is exactly "Simes' combined p-value <= alpha", so a
normal slide like the calibration set is called anomalous with probability <= alpha. Under ``mad`` the
verdict only repeats the per-slide rule, which calls tiles on almost every slide (docs/scores.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .calibration import Calibration
from .pvalues import benjamini_hochberg, simes_pvalue
from .regions import connected_regions
from .rules import DEFAULT_ALPHA, RULES, robust_threshold

VERDICTS = ("normal", "anomalous", "no tissue")
#: The verdict's figures a slide's one-row summary shows (store attribute ``summary``, cohort.csv columns).
SUMMARY_KEYS = ("verdict", "anomalous_tiles", "anomalous_fraction", "anomalous_area_mm2", "largest_region_mm2",
                "simes_pvalue", "rule", "alpha")


@dataclass(frozen=True)
class SlideVerdict:
    """One slide's calls (per tile, in the order of the scores given) and its summary figures."""

    verdict: str
    rule: str
    alpha: float | None  # the FDR level (fdr rule); None under mad
    tissue_tiles: int  # tissue tiles with a score
    unscored_tiles: int  # tissue tiles without one (unreadable): not tested
    anomalous_tiles: int
    anomalous_fraction: float | None  # of the scored tissue tiles
    anomalous_area_mm2: float | None  # None when the cell area is unknown
    largest_region_mm2: float | None
    largest_region_tiles: int
    regions: int
    simes_pvalue: float | None  # None without a calibration or without tissue
    score_threshold: float | None  # mad: the score above which tiles are called
    pvalue_cutoff: float | None  # fdr: the largest p-value called (None when nothing is)
    cell_area_mm2: float | None
    calibration_n: int | None
    pvalues: np.ndarray | None  # per tile (float64, NaN where unscored); None without a calibration
    anomalous: np.ndarray  # per tile, bool

    def to_dict(self) -> dict[str, Any]:
        """The flat, JSON-able figures (no per-tile arrays): store attributes, cohort rows."""
        return {
            "verdict": self.verdict,
            "rule": self.rule,
            "alpha": self.alpha,
            "tissue_tiles": self.tissue_tiles,
            "unscored_tiles": self.unscored_tiles,
            "anomalous_tiles": self.anomalous_tiles,
            "anomalous_fraction": self.anomalous_fraction,
            "anomalous_area_mm2": self.anomalous_area_mm2,
            "largest_region_mm2": self.largest_region_mm2,
            "largest_region_tiles": self.largest_region_tiles,
            "regions": self.regions,
            "simes_pvalue": self.simes_pvalue,
            "score_threshold": self.score_threshold,
            "pvalue_cutoff": self.pvalue_cutoff,
            "cell_area_mm2": self.cell_area_mm2,
            "calibration_n": self.calibration_n,
        }

    def summary(self) -> dict[str, Any]:
        """The figures of ``SUMMARY_KEYS``: what a cohort row shows."""
        d = self.to_dict()
        return {k: d[k] for k in SUMMARY_KEYS}

    def line(self) -> str:
        """One line for a pathologist: the verdict and what it rests on."""
        if self.verdict == "no tissue":
            return "verdict: no tissue (no tissue tile was scored)"
        how = f"FDR {self.alpha:g}" if self.rule == "fdr" else "per-slide median + 3 MAD, uncalibrated"
        area = "" if self.anomalous_area_mm2 is None else (
            f", {self.anomalous_area_mm2:.3g} mm², largest region {self.largest_region_mm2:.3g} mm²")
        simes = "" if self.simes_pvalue is None else f"; slide p-value {self.simes_pvalue:.3g}"
        return (f"verdict: {self.verdict} ({self.anomalous_tiles} of {self.tissue_tiles} tissue tiles anomalous, "
                f"{100 * (self.anomalous_fraction or 0.0):.1f} %{area}; {how}{simes})")


def slide_verdict(scores, rows, cols, grid_shape: tuple[int, int], cell_area_mm2: float | None,
                  calibration: Calibration | None, alpha: float = DEFAULT_ALPHA, rule: str = "fdr") -> SlideVerdict:
    """Call a slide's tissue tiles and summarise them.

    ``scores``: one tile score per tissue tile (NaN = unscored), ``rows``/``cols`` its grid cell on a
    ``grid_shape`` = (n_rows, n_cols) grid; ``cell_area_mm2``: the area of one grid cell
    (``regions.cell_area_mm2``), None when the slide has no physical size. ``rule`` ``fdr`` needs a
    ``calibration`` (``rules.resolve_rule`` picks ``mad`` with a warning when there is none).
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r} (known: {', '.join(RULES)})")
    if rule == "fdr" and calibration is None:
        raise ValueError("rule 'fdr' needs a calibration (see rules.resolve_rule)")
    s = np.asarray(scores, dtype=np.float64)
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    if not (s.shape == rows.shape == cols.shape) or s.ndim != 1:
        raise ValueError("slide_verdict: scores, rows and cols must be 1-D, one entry per tile")
    ok = np.isfinite(s)
    m = int(ok.sum())
    pvals = calibration.pvalues(s) if calibration is not None else None
    threshold = cutoff = None
    if rule == "fdr":
        called = benjamini_hochberg(pvals, alpha)
        if called.any():
            cutoff = float(pvals[called].max())
    else:
        thr = robust_threshold(s)["value"]
        threshold = thr
        called = ok & (s > thr) if thr is not None else np.zeros(s.shape, bool)
    k = int(called.sum())
    reg = connected_regions(rows, cols, called, grid_shape)
    area = None if cell_area_mm2 is None else k * float(cell_area_mm2)
    largest = None if cell_area_mm2 is None else reg.largest * float(cell_area_mm2)
    verdict = "no tissue" if m == 0 else ("anomalous" if k else "normal")
    return SlideVerdict(
        verdict=verdict,
        rule=rule,
        alpha=float(alpha) if rule == "fdr" else None,
        tissue_tiles=m,
        unscored_tiles=int(s.size - m),
        anomalous_tiles=k,
        anomalous_fraction=(k / m) if m else None,
        anomalous_area_mm2=area,
        largest_region_mm2=largest,
        largest_region_tiles=reg.largest,
        regions=reg.count,
        simes_pvalue=simes_pvalue(pvals) if pvals is not None else None,
        score_threshold=threshold,
        pvalue_cutoff=cutoff,
        cell_area_mm2=None if cell_area_mm2 is None else float(cell_area_mm2),
        calibration_n=None if calibration is None else calibration.n,
        pvalues=pvals,
        anomalous=called,
    )
