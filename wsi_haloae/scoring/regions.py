"""Connected regions of called tiles on the slide's tile grid, and their areas in mm².

A region is a set of called tiles joined through edges or corners (8-neighbour connectivity, what a
pathologist sees as one lesion on a grid of square tiles); labelling is scipy.ndimage's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)


def cell_area_mm2(level0_stride: float, mpp_level0: float) -> float:
    """Area one grid cell stands for: (stride in level-0 px × µm per level-0 px)², in mm².

    On a grid without overlap the stride is the tile's level-0 size; with overlapping tiles the stride is the
    right unit, because each cell then owns stride × stride of tissue and areas are not counted twice.
    """
    if not (level0_stride > 0 and mpp_level0 > 0):
        raise ValueError(f"cell_area_mm2: stride {level0_stride} and mpp {mpp_level0} must be > 0")
    side_mm = float(level0_stride) * float(mpp_level0) / 1000.0
    return side_mm * side_mm


@dataclass(frozen=True)
class Regions:
    """8-connected regions of called tiles: ``labels`` (n_rows, n_cols) int32, 0 = not called; ``sizes[i]`` =
    tiles in region i + 1."""

    labels: np.ndarray
    sizes: np.ndarray

    @property
    def count(self) -> int:
        return int(self.sizes.size)

    @property
    def largest(self) -> int:
        """Tiles in the largest region (0 when there is none)."""
        return int(self.sizes.max()) if self.sizes.size else 0


def connected_regions(rows, cols, called, shape: tuple[int, int]) -> Regions:
    """Label the called tiles (``called[i]`` for the tile at ``rows[i], cols[i]``) on an (n_rows, n_cols) grid."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    called = np.asarray(called, dtype=bool)
    if not (rows.shape == cols.shape == called.shape):
        raise ValueError("connected_regions: rows, cols and called must have one entry per tile")
    grid = np.zeros(shape, dtype=bool)
    grid[rows[called], cols[called]] = True
    labels, count = ndimage.label(grid, structure=EIGHT_NEIGHBOURS)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:] if count else np.zeros(0, np.int64)
    return Regions(labels=labels.astype(np.int32, copy=False), sizes=sizes.astype(np.int64))
