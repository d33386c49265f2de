"""The tile grid of a slide at a target resolution, with a tissue fraction per tile, and the overlapping
windows a map is blended from.

The grid covers the slide's non-empty region (``openslide.bounds-*``). By default with whole tiles only (a
strip narrower than one tile at the right/bottom edge is not tiled: what a training set wants); with
``cover_edges`` the last column and row run past the edge so every pixel of the region is in a tile, and
those tiles are read padded with the slide's glass colour (``TileGrid.background``). Coordinates are level-0
pixels (bounds offset included), so ``reader.read_scaled(x, y, tile_size, tile_size, grid.scale, fill)``
reads a grid tile directly. Memory is O(tiles) plus the low-resolution mask (bounded, see ``tissue``), never
O(slide area).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInputError, BadSlideError
from .reader import SlideReader
from .resolution import Resolution
from .tissue import colour_exclusions, tile_fractions, tissue_coverage, tissue_mask

#: Padding colour when a slide shows too little glass to measure its own (white, what OpenSlide shows there).
WHITE = (255, 255, 255)
#: Glass pixels needed (in the low-resolution image) to trust their median colour.
MIN_GLASS_PIXELS = 64


@dataclass
class TileGrid:
    """Kept tiles (arrays, one entry per tile) and the full grid's geometry.

    A grid may keep no tile at all (a slide without tissue): the arrays are then empty and the geometry
    (``n_rows``, ``n_cols``, ``mask`` ...) is still valid.
    """

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
    mask: np.ndarray  # bool tissue mask of the whole slide (level-0 (0, 0) at mask (0, 0)); False outside bounds
    mask_downsample: float  # level-0 px per mask px
    lowres: np.ndarray  # RGB uint8 image the mask was computed from (same geometry as ``mask``)
    min_tissue: float = 0.5  # the threshold the kept tiles passed
    cover_edges: bool = False  # the last column/row may run past the bounds (read them padded)
    background: tuple[int, int, int] = WHITE  # the slide's glass colour: the padding of edge tiles
    slide_mpp: float | None = None  # level-0 µm/px the scale was computed from (the file's or --slide-mpp)

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


def _cells(extent: int, t0: float, s0: float, cover_edges: bool) -> int:
    """Grid cells along one side of the bounds: whole tiles only, or (``cover_edges``) up to past the edge."""
    if cover_edges:
        return max(0, math.ceil((extent - t0) / s0 - 1e-9)) + 1 if extent > 0 else 0
    return int(math.floor((extent - t0) / s0 + 1e-9)) + 1 if extent >= t0 - 1e-6 else 0


def _bounds_box(shape: tuple[int, ...], downsample: float, bounds: tuple[int, int, int, int]) -> tuple[slice, slice]:
    """The mask rows/columns that are not wholly outside the bounds."""
    bx, by, bw, bh = bounds
    h, w = shape[:2]
    c0, c1 = max(0, math.floor(bx / downsample)), min(w, math.ceil((bx + bw) / downsample))
    r0, r1 = max(0, math.floor(by / downsample)), min(h, math.ceil((by + bh) / downsample))
    return slice(r0, r1), slice(c0, c1)


def _inside_bounds(mask: np.ndarray, downsample: float, bounds: tuple[int, int, int, int]) -> np.ndarray:
    """``mask`` with the pixels lying wholly outside the bounds set to False (nothing is scanned there)."""
    box = _bounds_box(mask.shape, downsample, bounds)
    if box == (slice(0, mask.shape[0]), slice(0, mask.shape[1])):
        return mask
    out = np.zeros_like(mask)
    out[box] = mask[box]
    return out


def glass_colour(lowres: np.ndarray, mask: np.ndarray) -> tuple[int, int, int]:
    """The slide's background: median RGB of the low-resolution pixels that are neither tissue nor ink/dark.

    Edge tiles are padded with it so the model sees the glass it saw around tissue in training, not a
    pure white it may never have seen, and no straight white-vs-glass edge appears in the tile. White when
    the image shows less than ``MIN_GLASS_PIXELS`` such pixels (tissue from edge to edge). Pass the part of
    the image inside the bounds (outside them a scanner shows nothing, not glass).
    """
    bad, _ = colour_exclusions(lowres)
    glass = ~mask & ~bad
    if int(glass.sum()) < MIN_GLASS_PIXELS:
        return WHITE
    px = lowres[glass].reshape(-1, 3)
    med = np.median(px[:: max(1, len(px) // 100_000)], axis=0)  # a regular sample: the median of ~10⁵ is plenty
    return tuple(int(round(v)) for v in med)  # type: ignore[return-value]


def build_grid(
    reader: SlideReader,
    mpp: float | Resolution | None,
    tile_size: int = 256,
    stride: int | None = None,
    min_tissue: float = 0.5,
    annotations: str | Path | object | None = None,
    class_name: str | None = None,
    *,
    cover_edges: bool = False,
) -> TileGrid:
    """Tiles of ``tile_size`` target px every ``stride`` px whose tissue fraction is ≥ ``min_tissue``.

    ``mpp``: a ``Resolution`` (``resolution.resolve_resolution``: the one rule set, ``--slide-mpp``
    included; what the commands pass), or a target µm/px (None: level 0) on a slide that records its own
    level-0 mpp; a slide that records none is then read as if level 0 were at the target (geometry for tests
    and benchmarks; the commands refuse such slides unless ``--slide-mpp`` is given). ``annotations`` (a QuPath GeoJSON
    path, or a shapely geometry in level-0 px) further keeps only tiles whose centre lies inside a polygon
    (holes excluded); ``class_name`` filters the GeoJSON by class. ``cover_edges``: see the module docstring.
    """
    if tile_size < 1:
        raise BadInputError(f"tile size must be positive, got {tile_size}")
    stride = tile_size if stride is None else stride
    if stride < 1:
        raise BadInputError(f"stride must be positive, got {stride}")
    if not 0 <= min_tissue <= 1:
        raise BadInputError(f"--min-tissue must be in [0, 1], got {min_tissue}")
    res = mpp if isinstance(mpp, Resolution) else _plain_resolution(reader, mpp)
    target, level0_mpp = res.target_mpp, res.slide_mpp
    scale = reader.scale_for(target, level0_mpp)
    t0, s0 = tile_size * scale, stride * scale
    bx, by, bw, bh = reader.bounds
    n_cols = _cells(bw, t0, s0, cover_edges)
    n_rows = _cells(bh, t0, s0, cover_edges)

    tm = tissue_mask(reader, t0, level0_mpp=level0_mpp)
    mask = _inside_bounds(tm.mask, tm.downsample, reader.bounds)
    box = _bounds_box(mask.shape, tm.downsample, reader.bounds)
    rr, cc = np.meshgrid(np.arange(n_rows, dtype=np.int32), np.arange(n_cols, dtype=np.int32), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    xs = bx + np.round(cc * s0).astype(np.int64)
    ys = by + np.round(rr * s0).astype(np.int64)
    frac = tile_fractions(mask, tm.downsample, xs, ys, t0)
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
        fractions=frac.reshape(n_rows, n_cols), mask=mask, mask_downsample=tm.downsample, lowres=tm.image,
        min_tissue=float(min_tissue), cover_edges=cover_edges, background=glass_colour(tm.image[box], mask[box]),
        slide_mpp=level0_mpp,
    )


def _plain_resolution(reader: SlideReader, mpp: float | None) -> Resolution:
    """A bare target µm/px as a ``Resolution`` (see ``build_grid``): level 0 is the file's, else the target."""
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise BadInputError(f"--mpp must be a positive number, got {mpp}")
    level0 = reader.mpp
    if mpp is None and level0 is None:
        raise BadSlideError(f"slide {reader.path} does not record its resolution (no openslide.mpp-x/-y); declare "
                            f"the scan's level-0 microns per pixel with --slide-mpp")
    target = float(mpp if mpp is not None else level0)
    return Resolution(target_mpp=target, slide_mpp=float(level0 if level0 is not None else target), source="--mpp")


def windows_per_tile(overlap: float, tile_size: int) -> int:
    """k, the windows per tile side, for ``overlap`` = 1 − 1/k (0, 0.5, 0.75, 0.875 ...).

    Only these overlaps put a window exactly on every grid tile, so each grid tile keeps the score of its
    own window (see ``Windows``); the window stride, tile_size / k target px, must be a whole number.
    """
    if not (math.isfinite(overlap) and 0 <= overlap < 1):
        raise BadInputError(f"--overlap must be in [0, 1), got {overlap}")
    k = int(round(1 / (1 - overlap)))
    if abs(k * (1 - overlap) - 1) > 1e-6 or tile_size % k:
        choices = ", ".join(f"{1 - 1 / j:g}" for j in (1, 2, 4, 8) if tile_size % j == 0)
        raise BadInputError(f"--overlap {overlap:g}: the window stride (tile size x (1 - overlap)) must divide the "
                            f"{tile_size}-px tile into whole steps; use one of {choices}")
    return k


@dataclass
class Windows:
    """The overlapping windows a map is blended from, on a grid ``per_tile`` times finer than the tile grid.

    Window (r, c) sits at level-0 ``origin + (c, r) · level0_step`` and is one tile wide. Window (k·r, k·c)
    *is* grid tile (r, c): ``tile_window[i]`` is the index of kept grid tile i's own window, so per-tile scores
    stay on the non-overlapping grid (one score per grid tile, from its own window: see
    ``infer.assembler.tile_scores_from_windows``). With ``per_tile`` 1 the windows are the kept tiles.
    """

    xs: np.ndarray  # int64 level-0 top-left x of each window to score
    ys: np.ndarray  # int64
    rows: np.ndarray  # int32 window-grid row
    cols: np.ndarray  # int32 window-grid column
    tissue: np.ndarray  # float32 tissue fraction of each window
    n_rows: int  # window grid size
    n_cols: int
    per_tile: int  # k: windows per tile side
    level0_step: float  # level-0 px between window columns/rows (= level0_tile / k)
    tile_window: np.ndarray  # int64 (len(grid),): the window index of each kept grid tile

    @property
    def overlap(self) -> float:
        return 1 - 1 / self.per_tile

    def __len__(self) -> int:
        return int(self.xs.size)


def plan_windows(grid: TileGrid, overlap: float, min_tissue: float | None = None) -> Windows:
    """The windows to score for ``grid`` at ``overlap``.

    A window is scored when it is a kept grid tile's own window, or when it holds ≥ ``min_tissue`` (default:
    the grid's threshold) and overlaps a kept grid tile; so the map covers the kept tiles and their tissue
    (annotations included) and never reaches a whole tile beyond them. Windows run past the bounds only
    as far as the grid's own tiles do (``cover_edges``). Row-major order, as the map assembler wants.
    """
    if grid.stride != grid.tile_size:
        raise BadInputError("overlapping windows need a grid whose stride is the tile size")
    k = windows_per_tile(overlap, grid.tile_size)
    min_tissue = grid.min_tissue if min_tissue is None else min_tissue
    n_rows = (grid.n_rows - 1) * k + 1 if grid.n_rows else 0
    n_cols = (grid.n_cols - 1) * k + 1 if grid.n_cols else 0
    step = grid.level0_tile / k
    kept = np.zeros((grid.n_rows, grid.n_cols), dtype=bool)
    kept[grid.rows, grid.cols] = True
    rr, cc = np.meshgrid(np.arange(n_rows, dtype=np.int32), np.arange(n_cols, dtype=np.int32), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    # a window spans cells r//k .. (r+k-1)//k (one or two per axis)
    near = np.zeros(rr.shape, dtype=bool)
    for a in (rr // k, np.minimum((rr + k - 1) // k, max(grid.n_rows - 1, 0))):
        for b in (cc // k, np.minimum((cc + k - 1) // k, max(grid.n_cols - 1, 0))):
            near |= kept[a, b]
    xs = grid.origin[0] + np.round(cc * step).astype(np.int64)
    ys = grid.origin[1] + np.round(rr * step).astype(np.int64)
    frac = tile_fractions(grid.mask, grid.mask_downsample, xs, ys, grid.level0_tile)
    keep = near & (frac >= min_tissue)
    own = (grid.rows.astype(np.int64) * k) * n_cols + grid.cols.astype(np.int64) * k
    keep[own] = True
    idx = np.flatnonzero(keep)
    tile_window = np.searchsorted(idx, own)
    return Windows(xs=xs[idx], ys=ys[idx], rows=rr[idx], cols=cc[idx], tissue=frac[idx], n_rows=n_rows,
                   n_cols=n_cols, per_tile=k, level0_step=float(step), tile_window=tile_window.astype(np.int64))


def scored_tissue_fraction(grid: TileGrid, windows: Windows | None = None) -> float:
    """Fraction of the slide's tissue-mask pixels that lie in a scored window (the kept tiles without one).

    Computed from geometry alone (no model), at the mask's resolution: what share of the tissue the map will
    colour, barring unreadable tiles.
    """
    xs, ys = (grid.xs, grid.ys) if windows is None else (windows.xs, windows.ys)
    return tissue_coverage(grid.mask, grid.mask_downsample, xs, ys, grid.level0_tile)
