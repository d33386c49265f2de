"""The tissue mask at the heatmap's resolution, chunk by chunk: glass inside a scored tile becomes NaN.

A window is scored whole, glass included, and the model's map is often brightest on glass (it is furthest
from the tissue it learnt). Colouring that glass would point a pathologist at nothing, so after blending
every map pixel whose centre falls on a non-tissue pixel of the tissue mask (``TileGrid.mask``, ≈ 8 µm/px)
is set to NaN. Nearest-neighbour on purpose: the mask's own pixels decide, the map invents no tissue border
finer than the mask resolved. Works on one chunk at a time (``MapAssembler``'s ``finalize`` hook), so
memory never holds more than a chunk of it.
"""

from __future__ import annotations

import math

import numpy as np

from .writers import MapGeometry


class MapTissue:
    """``mask`` (bool, mask (0, 0) = level-0 (0, 0), ``downsample`` level-0 px per mask px) seen on ``geom``'s map."""

    def __init__(self, mask: np.ndarray, downsample: float, geom: MapGeometry):
        self.mask = np.asarray(mask, dtype=bool)
        self.downsample = float(downsample)
        self.geom = geom
        #: scored map pixels (finite after NaN-ing glass) in the chunks passed through ``__call__`` so far
        self.scored = 0

    def _index(self, start: int, n: int, origin: float, size: int) -> tuple[np.ndarray, np.ndarray]:
        centres = origin + (start + np.arange(n, dtype=np.float64) + 0.5) * self.geom.slide_px
        idx = np.floor(centres / self.downsample).astype(np.int64)
        inside = (idx >= 0) & (idx < size)
        return idx.clip(0, max(size - 1, 0)), inside

    def block(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """bool (h, w): tissue under the map pixels [y0, y0+h) x [x0, x0+w) (False beyond the mask)."""
        mh, mw = self.mask.shape
        iy, in_y = self._index(y0, h, self.geom.origin_y, mh)
        ix, in_x = self._index(x0, w, self.geom.origin_x, mw)
        if mh == 0 or mw == 0:
            return np.zeros((h, w), dtype=bool)
        return self.mask[iy[:, None], ix[None, :]] & in_y[:, None] & in_x[None, :]

    def __call__(self, chunk: np.ndarray, y0: int, x0: int) -> np.ndarray:
        """``chunk`` (map pixels from (y0, x0)) with every pixel off tissue set to NaN (in place; returned)."""
        h, w = chunk.shape
        chunk[~self.block(y0, x0, h, w)] = np.nan
        self.scored += int(np.isfinite(chunk).sum())
        return chunk

    def pixels(self) -> int:
        """Tissue pixels on the whole map (what a fully scored map would hold), counted one band of rows at a
        time and only over the mask's tissue rows and columns, so a mostly-glass slide costs little."""
        rows, cols = np.flatnonzero(self.mask.any(axis=1)), np.flatnonzero(self.mask.any(axis=0))
        if rows.size == 0:
            return 0
        g, ds = self.geom, self.downsample

        def span(lo: int, hi: int, origin: float, size: int) -> tuple[int, int]:
            # map pixels whose centre falls on mask pixels lo..hi (inclusive), clipped to the map
            a = math.floor((lo * ds - origin) / g.slide_px - 0.5)
            b = math.ceil(((hi + 1) * ds - origin) / g.slide_px - 0.5)
            return max(0, a), min(size, b + 1)

        y_lo, y_hi = span(int(rows[0]), int(rows[-1]), g.origin_y, g.height)
        x_lo, x_hi = span(int(cols[0]), int(cols[-1]), g.origin_x, g.width)
        n = 0
        step = 512
        for y0 in range(y_lo, y_hi, step):
            n += int(self.block(y0, x_lo, min(step, y_hi - y0), max(0, x_hi - x_lo)).sum())
        return n
