"""The tile grid of a slide at a target resolution, with a tissue fraction per tile.

The grid covers the slide's non-empty region (``openslide.bounds-*``) with whole tiles only: a strip
narrower than one tile at the right/bottom edge is not tiled. Coordinates are level-0 pixels (bounds offset
included), so ``reader.read_tile(x, y, tile_size, mpp)`` reads a grid tile directly. Memory is O(tiles) plus
the low-resolution mask (bounded, see ``tissue``), never O(slide area).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInputError, BadSlideError
from .reader import SlideReader
from .tissue import tile_fractions, tissue_mask


def resolve_mpp(reader: SlideReader, mpp: float | None) -> float:
    """The target microns per pixel: ``mpp`` when given, else the slide's level 0.

    A slide without mpp and no ``mpp`` given is refused. A slide without mpp read *with* an ``mpp`` is taken
    to be at that mpp at level 0 (no resampling): the user is telling us the scan resolution.
    """
    if mpp is not None:
        if not (mpp > 0 and math.isfinite(mpp)):
            raise BadInputError(f"--mpp must be a positive number, got {mpp}")
        return float(mpp)
    if reader.mpp is None:
        raise BadSlideError(
            f"slide {reader.path} does not record its resolution (no openslide.mpp-x/-y); "
            f"give the microns per pixel with --mpp"
        )
    return float(reader.mpp)


@dataclass
class TileGrid:
    """Kept tiles (arrays, one entry per tile) and the full grid's geometry."""

    xs: np.ndarray  # int64 level-0 x of each kept tile's top-left
    ys: np.ndarray  # int64 level-0 y
    rows: np.ndarray  # int32 grid row of each kept tile
    cols: np.ndarray  # int32 grid column
    tissue: np.ndarray  # float32 tissue fraction of each kept tile
    n_rows: int
    n_cols: int
    tile_size: int  # target px
    stride: int  # target px
    mpp: float  # target µm per px
    scale: float  # level-0 px per target px (snapped to a pyramid level within 2 %)
    level0_tile: float  # level-0 px covered by one tile side (= tile_size * scale)
    level0_stride: float  # level-0 px between grid columns/rows (= stride * scale)
    origin: tuple[int, int]  # level-0 (x, y) of grid cell (0, 0): the bounds' top-left
    fractions: np.ndarray  # float32 (n_rows, n_cols) tissue fraction of every grid cell
    mask: np.ndarray  # bool tissue mask of the whole slide (level-0 (0, 0) at mask (0, 0))
    mask_downsample: float  # level-0 px per mask px
    lowres: np.ndarray  # RGB uint8 image the mask was computed from (same geometry as ``mask``)

    @property
    def n_grid(self) -> int:
        return self.n_rows * self.n_cols

    def __len__(self) -> int:
        return int(self.xs.size)

    def subset(self, idx: np.ndarray) -> "TileGrid":
        """The same grid keeping only tiles ``idx`` (e.g. a random sample)."""
        from dataclasses import replace

        return replace(self, xs=self.xs[idx], ys=self.ys[idx], rows=self.rows[idx], cols=self.cols[idx],
                       tissue=self.tissue[idx])


def build_grid(
    reader: SlideReader,
    mpp: float | None,
    tile_size: int = 256,
    stride: int | None = None,
    min_tissue: float = 0.5,
    annotations: str | Path | object | None = None,
    class_name: str | None = None,
) -> TileGrid:
    """Tiles of ``tile_size`` target px every ``stride`` px whose tissue fraction is ≥ ``min_tissue``.

    ``annotations`` (a QuPath GeoJSON path, or a shapely geometry in level-0 px) further keeps only tiles
    whose centre lies inside a polygon (holes excluded); ``class_name`` filters the GeoJSON by class.
    """
    if tile_size < 1:
        raise BadInputError(f"tile size must be positive, got {tile_size}")
    stride = tile_size if stride is None else stride
    if stride < 1:
        raise BadInputError(f"stride must be positive, got {stride}")
    if not 0 <= min_tissue <= 1:
        raise BadInputError(f"--min-tissue must be in [0, 1], got {min_tissue}")
    target = resolve_mpp(reader, mpp)
    scale = reader.scale_for(target)
    t0, s0 = tile_size * scale, stride * scale
    bx, by, bw, bh = reader.bounds
    n_cols = int(math.floor((bw - t0) / s0 + 1e-9)) + 1 if bw >= t0 - 1e-6 else 0
    n_rows = int(math.floor((bh - t0) / s0 + 1e-9)) + 1 if bh >= t0 - 1e-6 else 0

    tm = tissue_mask(reader, t0, level0_mpp=reader.mpp or target)  # no slide mpp: level 0 is at the target
    rr, cc = np.meshgrid(np.arange(n_rows, dtype=np.int32), np.arange(n_cols, dtype=np.int32), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    xs = bx + np.round(cc * s0).astype(np.int64)
    ys = by + np.round(rr * s0).astype(np.int64)
    frac = tile_fractions(tm.mask, tm.downsample, xs, ys, t0)
    keep = frac >= min_tissue
    if annotations is not None:
        from .annotations import centres_inside, load_annotations

        geom = annotations
        if isinstance(annotations, (str, Path)):
            geom = load_annotations(annotations, class_name, offset=(bx, by))
        keep &= centres_inside(geom, xs, ys, t0 / 2)
    return TileGrid(
        xs=xs[keep], ys=ys[keep], rows=rr[keep], cols=cc[keep], tissue=frac[keep],
        n_rows=n_rows, n_cols=n_cols, tile_size=int(tile_size), stride=int(stride), mpp=target, scale=scale,
        level0_tile=float(t0), level0_stride=float(s0), origin=(bx, by),
        fractions=frac.reshape(n_rows, n_cols), mask=tm.mask, mask_downsample=tm.downsample, lowres=tm.image,
    )
