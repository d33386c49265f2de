"""From a raw tile score to a call a pathologist can act on (DESIGN §8): numpy and scipy only, no torch.

- ``Calibration``: a model's scores on normal tiles it never trained on (stored in the model file).
- ``conformal_pvalues``, ``benjamini_hochberg``, ``simes_pvalue``: tile p-values, FDR calls, slide p-value.
- ``slide_verdict`` → ``SlideVerdict``: calls, areas, largest region and the verdict of one slide.
- ``robust_threshold``: the old per-slide rule (``mad``); ``resolve_rule`` falls back to it without calibration.
- ``resolution_warning``: when the calibration is too small for a slide's tile count.
"""

from __future__ import annotations

from .calibration import (DISPLAY_QUANTILES, FORMAT, MAX_STORED, MIN_TILES, PIXEL_QUANTILES, STATISTIC, Calibration,
                          check_block, mean_map_sha256)
from .pvalues import (benjamini_hochberg, calibration_size_needed, conformal_pvalues, min_callable_tiles,
                      resolution_warning, simes_pvalue)
from .regions import Regions, cell_area_mm2, connected_regions
from .rules import DEFAULT_ALPHA, DEFAULT_RULE, MAD_K, RULES, resolve_rule, robust_threshold
from .verdict import SUMMARY_KEYS, VERDICTS, SlideVerdict, slide_verdict

__all__ = [
    "Calibration", "DEFAULT_ALPHA", "DEFAULT_RULE", "DISPLAY_QUANTILES", "FORMAT", "MAD_K", "MAX_STORED", "MIN_TILES",
    "PIXEL_QUANTILES", "RULES", "Regions", "STATISTIC", "SUMMARY_KEYS", "SlideVerdict", "VERDICTS", "benjamini_hochberg",
    "calibration_size_needed", "cell_area_mm2", "check_block", "conformal_pvalues", "connected_regions",
    "mean_map_sha256", "min_callable_tiles", "resolution_warning", "resolve_rule", "robust_threshold",
    "simes_pvalue", "slide_verdict",
]
