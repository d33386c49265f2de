"""The rules that call a tile anomalous: ``fdr`` (calibrated, the default) and ``mad`` (per slide, the old one).

``fdr``: the tile's conformal p-value against the model's calibration, Benjamini–Hochberg over the slide's
tissue tiles at alpha. Needs a calibration; says how sure we are.
``mad``: score > median + 3·1.4826·MAD of the slide's own tiles. Needs nothing, but is relative to each slide:
it flags the most unusual tiles of any slide, normal or not, and its threshold is not comparable across slides.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import THRESHOLD_RULES

RULES = THRESHOLD_RULES  # ("fdr", "mad"): declared once, in config, for ``--threshold``
DEFAULT_RULE = "fdr"
DEFAULT_ALPHA = 0.05
#: Robust threshold: median + K * 1.4826 * MAD of the slide's scored tile means (see docs/output-format.md).
MAD_K = 3.0


def robust_threshold(scores: np.ndarray, k: float = MAD_K) -> dict[str, Any]:
    """median + k·1.4826·MAD of the finite tile scores: ~k standard deviations above typical tissue.

    Robust to the anomalies themselves (they move the median and MAD little), needs no labels and no
    training-set statistics, and adapts to each slide's staining. With no scored tile it is NaN.
    """
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return {"method": f"median + {k:g} * 1.4826 * MAD of tile anomaly_score", "value": None,
                "median": None, "mad": None, "k": k}
    med = float(np.median(s))
    mad = float(np.median(np.abs(s - med)))
    return {"method": f"median + {k:g} * 1.4826 * MAD of tile anomaly_score", "value": med + k * 1.4826 * mad,
            "median": med, "mad": mad, "k": k}


def resolve_rule(requested: str, calibrated: bool, model: str = "the model") -> tuple[str, str | None]:
    """The rule to apply and a one-line warning when the requested one cannot be: ``fdr`` needs a calibration."""
    if requested not in RULES:
        raise ValueError(f"unknown rule {requested!r} (known: {', '.join(RULES)})")
    if requested == "fdr" and not calibrated:
        return "mad", (f"{model} has no calibration: tiles are classified by the per-slide rule (median + 3 MAD), "
                       "which has no known false-alarm rate; calibrate it with `wsi-haloae calibrate` (docs/scores.md)")
    return requested, None
