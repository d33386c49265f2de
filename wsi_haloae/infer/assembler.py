"""Level 0 of the heatmap from (overlapping) window maps: a weighted blend, written chunk by chunk.

Why blend: each window is scored alone, so without overlap the map can step at every tile border (the
model sees different context on each side of it). With windows every ``tile / k`` px, each map pixel is
the weighted mean of the k² windows over it, Σ w·map / Σ w, with a separable weight w(x)·w(y) that fades
towards a window's border, where the model sees the least context.

The weight is a pixel-centred Hann window, w(i) = sin²(π (i + ½) / b) for i = 0 … b−1 (``blend_window``):

- it is never zero at a pixel centre (its smallest value is sin²(π / 2b) ≈ 6·10⁻⁴ for b = 64), so a pixel
  that only one window covers (the outer band of the slide) keeps that window's value, and no pixel a window
  covered is left NaN;
- for the overlaps we allow (1 − 1/k: 0.5, 0.75 …) the shifted windows sum to a constant (sin² + cos² = 1
  for k = 2), so inside the slide the blend is a plain cross-fade with no ripple from the weights;
- unlike a Gaussian it needs no width to choose.

With k = 1 (no overlap) the weight is 1 everywhere and the result is exactly the pasted tiles.

Memory: windows arrive in any order; each is added into float32 Σ w·map and Σ w buffers of the 512² chunks
it touches, and a chunk is divided, passed to ``finalize`` (e.g. NaN off tissue) and written once, as soon
as every window that touches it has arrived. For windows in row-major order only the chunks under the
current window rows are held: one row of chunks, two while the window rows straddle a chunk border (512 map
px, 8-32 window rows). Memory follows the slide's width, not its area.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: ``finalize(chunk, y0, x0) -> chunk``: last change to a finished chunk (map-pixel top-left y0, x0) before it is written.
Finalize = Callable[[np.ndarray, int, int], np.ndarray]


def blend_window(block: int, per_tile: int) -> np.ndarray:
    """The (block, block) float32 weight of one window for ``per_tile`` windows per tile side (see module doc)."""
    if per_tile <= 1:
        return np.ones((block, block), dtype=np.float32)
    i = np.arange(block, dtype=np.float64)
    w = np.sin(np.pi * (i + 0.5) / block) ** 2
    return np.outer(w, w).astype(np.float32)


class MapAssembler:
    """Blends window maps into the level-0 array and writes each chunk once, when all its windows are in.

    ``px, py``: map-pixel top-left of each window (``MapGeometry.window_origins``); ``block``: map px per
    window side; ``weight``: (block, block) from ``blend_window`` (None: 1, i.e. no overlap). ``add(i, map)``
    with ``map=None`` marks window ``i`` as done without data (a tile that failed to read): it contributes
    nothing. A pixel that is NaN in a window's map counts as not covered by that window. A pixel no window
    covered stays NaN.
    """

    def __init__(self, array, px: np.ndarray, py: np.ndarray, block: int, weight: np.ndarray | None = None,
                 finalize: Finalize | None = None):
        self.array = array
        self.h, self.w = array.shape
        self.ch, self.cw = array.chunks
        self.px, self.py, self.b = np.asarray(px, np.int64), np.asarray(py, np.int64), int(block)
        self.weight = np.ones((self.b, self.b), np.float32) if weight is None else np.asarray(weight, np.float32)
        if self.weight.shape != (self.b, self.b):
            raise ValueError(f"weight shape {self.weight.shape} is not ({block}, {block})")
        self.finalize = finalize
        self.pending: dict[tuple[int, int], int] = {}
        #: chunk -> (Σ w·map, Σ w), allocated when the chunk's first data arrives
        self.buffers: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.done = np.zeros(len(self.px), dtype=bool)
        #: chunks that hold data (all others are absent = NaN): lets the pyramid skip empty regions unread
        self.written: set[tuple[int, int]] = set()
        #: the most chunks buffered at once (for tests and benchmarks of the memory bound)
        self.peak_buffered = 0
        for i in range(len(self.px)):
            for key in self._chunks_of(i):
                self.pending[key] = self.pending.get(key, 0) + 1

    def _rect(self, i: int) -> tuple[int, int, int, int]:
        x0, y0 = int(self.px[i]), int(self.py[i])
        return max(0, x0), max(0, y0), min(self.w, x0 + self.b), min(self.h, y0 + self.b)

    def _chunks_of(self, i: int):
        x0, y0, x1, y1 = self._rect(i)
        if x1 <= x0 or y1 <= y0:
            return
        for cy in range(y0 // self.ch, (y1 - 1) // self.ch + 1):
            for cx in range(x0 // self.cw, (x1 - 1) // self.cw + 1):
                yield cy, cx

    def add(self, i: int, block: np.ndarray | None) -> None:
        if self.done[i]:
            return
        self.done[i] = True
        x0, y0, x1, y1 = self._rect(i)
        tx, ty = int(self.px[i]), int(self.py[i])
        finite = block is None or bool(np.isfinite(block).all())
        for key in list(self._chunks_of(i)):
            cy, cx = key
            if block is not None:
                buf = self.buffers.get(key)
                if buf is None:
                    buf = self.buffers[key] = (np.zeros((self.ch, self.cw), np.float32),
                                               np.zeros((self.ch, self.cw), np.float32))
                    self.peak_buffered = max(self.peak_buffered, len(self.buffers))
                acc, wsum = buf
                ys0, xs0 = cy * self.ch, cx * self.cw
                ax0, ay0 = max(x0, xs0), max(y0, ys0)  # intersection of the window with this chunk
                ax1, ay1 = min(x1, xs0 + self.cw), min(y1, ys0 + self.ch)
                src = (slice(ay0 - ty, ay1 - ty), slice(ax0 - tx, ax1 - tx))
                dst = (slice(ay0 - ys0, ay1 - ys0), slice(ax0 - xs0, ax1 - xs0))
                v, w = block[src], self.weight[src]
                if finite:
                    acc[dst] += v * w
                    wsum[dst] += w
                else:
                    ok = np.isfinite(v)
                    acc[dst] += np.where(ok, v, 0) * w
                    wsum[dst] += np.where(ok, w, 0)
            self.pending[key] -= 1
            if self.pending[key] == 0:
                self._flush(key)

    def _flush(self, key: tuple[int, int]) -> None:
        del self.pending[key]
        buf = self.buffers.pop(key, None)
        if buf is None:  # every window here failed: the chunk stays absent (= fill value NaN)
            return
        acc, wsum = buf
        cy, cx = key
        y0, x0 = cy * self.ch, cx * self.cw
        y1, x1 = min(self.h, y0 + self.ch), min(self.w, x0 + self.cw)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(wsum > 0, acc / wsum, np.float32(np.nan)).astype(np.float32)[: y1 - y0, : x1 - x0]
        if self.finalize is not None:
            out = self.finalize(out, y0, x0)
        if np.isnan(out).all():
            return  # nothing left to write (e.g. all glass): absent = NaN
        self.written.add(key)
        self.array[y0:y1, x0:x1] = out

    def finish(self) -> None:
        """Write whatever is still buffered (only when some windows were never delivered)."""
        for key in list(self.pending):
            self._flush(key)

    @property
    def buffered_chunks(self) -> int:
        return len(self.buffers)


def tile_scores_from_windows(tile_window: np.ndarray, window_mean: np.ndarray,
                             window_max: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per grid tile (mean, max) scores: those of the tile's own window (``Windows.tile_window``).

    Why its own window and not the blended map's mean over the tile: it is the statistic the model's
    calibration is measured on (held-out normal tiles, each scored as one window), so p-values and FDR calls
    stay valid; it does not change with ``--overlap``, so tile tables and calls agree between runs with and
    without it; and a tile's score does not depend on whether its neighbours could be read. The blended map
    is for looking at; the tile score is for deciding. Unreadable windows give NaN.
    """
    tile_window = np.asarray(tile_window, dtype=np.int64)
    return np.asarray(window_mean)[tile_window], np.asarray(window_max)[tile_window]
