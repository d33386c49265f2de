"""How much a heatmap steps at tile borders: the seam measure for comparing overlaps (issue 12).

For every pair of horizontally or vertically adjacent map pixels that are both scored, the absolute
difference; averaged separately over pairs that straddle a tile border and pairs inside a tile. On tissue
that is uniform at the scale of a tile the two means agree for a seamless map; a map pasted from
independently scored tiles steps at the borders, so its ratio is above 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SeamSteps:
    border: float  # mean |step| across tile borders
    inner: float  # mean |step| between neighbours inside a tile
    n_border: int
    n_inner: int

    @property
    def ratio(self) -> float:
        """border / inner: 1 = no seam."""
        return self.border / self.inner if self.inner > 0 else float("inf") if self.border > 0 else 1.0


def seam_steps(level0, period: int, origin: tuple[int, int] = (0, 0), rows: int = 512) -> SeamSteps:
    """Seam measure of a map (a numpy or zarr 2-D array) whose tiles are ``period`` map px wide.

    ``origin``: the (y, x) map pixel where a tile starts (0, 0 for our maps: tiles start at the bounds).
    Read ``rows`` rows at a time (plus one), so a zarr level 0 of any size is measured in bounded memory.
    """
    h, w = level0.shape
    oy, ox = origin
    sums = np.zeros(2)
    counts = np.zeros(2, dtype=np.int64)

    def add(diff: np.ndarray, border: np.ndarray) -> None:
        ok = np.isfinite(diff)
        for k, sel in ((0, border), (1, ~border)):
            m = ok & sel
            sums[k] += float(np.abs(diff[m]).sum(dtype=np.float64))
            counts[k] += int(m.sum())

    xb = ((np.arange(1, w) - ox) % period) == 0  # step from column x-1 to x crosses a border at x
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows + 1)
        a = np.asarray(level0[y0:y1], dtype=np.float64)
        core = a[: min(rows, h - y0)]
        add(np.diff(core, axis=1), np.broadcast_to(xb, (core.shape[0], w - 1)))
        if a.shape[0] > 1:
            yb = ((np.arange(y0 + 1, y0 + a.shape[0]) - oy) % period) == 0
            add(np.diff(a, axis=0), np.broadcast_to(yb[:, None], (a.shape[0] - 1, w)))
    with np.errstate(invalid="ignore", divide="ignore"):
        border, inner = sums / np.maximum(counts, 1)
    return SeamSteps(float(border) if counts[0] else float("nan"), float(inner) if counts[1] else float("nan"),
                     int(counts[0]), int(counts[1]))
