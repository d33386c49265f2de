"""Blending overlapping window maps into level 0 (infer/assembler.py) and NaN off tissue (infer/tissue_map.py).

The probes are maps whose blend is known in closed form: constants per window, one global ramp, and the
pixel-centred Hann weight written out with math.sin (not with the code under test).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsi_haloae.infer import writers
from wsi_haloae.infer.assembler import MapAssembler, blend_window, tile_scores_from_windows
from wsi_haloae.infer.tissue_map import MapTissue


def _level0(tmp_path, h, w, name="s.zarr"):
    g = writers.open_new_store(tmp_path / name)
    return writers.create_map_level(g, "0", (h, w))


def _hann(i: int, b: int) -> float:
    return math.sin(math.pi * (i + 0.5) / b) ** 2


def _window_grid(n_rows, n_cols, step):
    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    return rows, cols, cols * step, rows * step


def test_blend_window_is_a_positive_partition_of_unity():
    w = blend_window(16, 2)
    assert w.shape == (16, 16) and w.dtype == np.float32 and (w > 0).all()
    assert w[0, 0] == pytest.approx(_hann(0, 16) ** 2) and w[7, 8] == pytest.approx(_hann(7, 16) * _hann(8, 16))
    one = w[0] / _hann(0, 16)  # the first row over its row weight: the 1-D window
    np.testing.assert_allclose(one[:8] + one[8:], 1.0, rtol=1e-6)  # k = 2: shifted copies sum to 1
    one = blend_window(64, 4)[32] / _hann(32, 64)
    np.testing.assert_allclose(one[:16] + one[16:32] + one[32:48] + one[48:], 2.0, rtol=1e-6)  # k = 4: to 2
    assert (blend_window(16, 1) == 1).all()


def test_overlap_0_is_exactly_the_pasted_tiles_in_any_order(tmp_path):
    """No overlap: each map pixel is its tile's value, bit for bit (what infer wrote before blending existed)."""
    rng = np.random.default_rng(0)
    b = 48  # not a divisor of the chunk: tiles straddle chunk borders
    rows, cols = np.nonzero(rng.random((30, 25)) < 0.6)
    px, py = cols * b + 7, rows * b + 3
    H, W = 30 * b + 5, 25 * b - 20  # last column clipped by the map edge
    blocks = rng.random((len(rows), b, b)).astype(np.float32) * 40 - 3
    blocks[0, :5, :9] = np.nan  # a NaN inside a block stays NaN
    failed = rng.random(len(rows)) < 0.1
    expected = np.full((H, W), np.nan, np.float32)
    for i in range(len(rows)):
        if not failed[i]:
            y0, x0 = py[i], px[i]
            y1, x1 = min(H, y0 + b), min(W, x0 + b)
            expected[y0:y1, x0:x1] = blocks[i][: y1 - y0, : x1 - x0]
    arr = _level0(tmp_path, H, W)
    asm = MapAssembler(arr, px, py, b, blend_window(b, 1))
    for i in rng.permutation(len(rows)):
        asm.add(int(i), None if failed[i] else blocks[i])
    assert not asm.pending and not asm.buffers  # every chunk was flushed as soon as complete
    np.testing.assert_array_equal(arr[:], expected)  # bit for bit, NaN where it was NaN
    ch = writers.CHUNK
    assert asm.written == {(y // ch, x // ch) for y, x in zip(*np.nonzero(np.isfinite(expected)))}


def test_blend_of_constant_windows_matches_the_hann_formula(tmp_path):
    """Window (r, c) holds the constant c_rc; every pixel is Σ w·c / Σ w with the weights written out."""
    b, k = 16, 2
    step = b // k
    n_rows, n_cols = 3, 4
    rows, cols, px, py = _window_grid(n_rows, n_cols, step)
    values = (1.0 + rows * 10 + cols).astype(np.float32)
    H, W = (n_rows - 1) * step + b, (n_cols - 1) * step + b
    arr = _level0(tmp_path, H, W)
    asm = MapAssembler(arr, px, py, b, blend_window(b, k))
    for i in range(len(rows)):
        asm.add(i, np.full((b, b), values[i], np.float32))
    got = arr[:]
    want = np.zeros((H, W))
    for y in range(H):
        for x in range(W):
            num = den = 0.0
            for i in range(len(rows)):
                if px[i] <= x < px[i] + b and py[i] <= y < py[i] + b:
                    w = _hann(y - py[i], b) * _hann(x - px[i], b)
                    num += w * values[i]
                    den += w
            want[y, x] = num / den
    np.testing.assert_allclose(got, want, rtol=2e-6)
    # at the slide's edges (one window) a pixel is that window's value; across a border it cross-fades
    assert got[0, 0] == pytest.approx(values[0], rel=1e-6) and got[-1, -1] == pytest.approx(values[-1], rel=1e-6)
    j = 3  # 3 px into the overlap of windows (0, 0) and (0, 1), in the top band that only row 0 covers
    assert got[0, step + j] == pytest.approx(values[0] * _hann(step + j, b) + values[1] * _hann(j, b), rel=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_windows_that_agree_blend_to_themselves(tmp_path, k):
    """A global ramp cut into windows (the map's edges cutting the last windows) comes back."""
    b = 32
    step = b // k
    rows, cols, px, py = _window_grid(6 * k, 7 * k, step)
    H, W = (6 * k - 1) * step + b - 3, (7 * k - 1) * step + b - 11
    ramp = lambda y, x: 0.25 * x - 0.5 * y + 3.0  # noqa: E731
    arr = _level0(tmp_path, H, W)
    asm = MapAssembler(arr, px, py, b, blend_window(b, k))
    yy, xx = np.mgrid[0:b, 0:b]
    for i in np.random.default_rng(k).permutation(len(rows)):
        asm.add(int(i), ramp(yy + py[i], xx + px[i]).astype(np.float32))
    Y, X = np.mgrid[0:H, 0:W]
    np.testing.assert_allclose(arr[:], ramp(Y, X), rtol=1e-5, atol=1e-5)


def test_failed_windows_contribute_nothing_and_uncovered_pixels_stay_nan(tmp_path):
    b, k = 16, 2
    step = b // k
    rows, cols, px, py = _window_grid(3, 3, step)  # covers 32 x 32
    arr = _level0(tmp_path, 40, 40)
    asm = MapAssembler(arr, px, py, b, blend_window(b, k))
    for i in range(9):
        asm.add(i, None if i == 0 else np.full((b, b), float(i), np.float32))
    got = arr[:]
    assert np.isnan(got[:8, :8]).all()  # only window 0 covers the top-left corner: it failed
    # top band between windows 0 and 1: window 0 failed, so window 1 alone decides
    assert got[0, 8:16] == pytest.approx(np.full(8, 1.0), rel=1e-6)
    assert np.isnan(got[32:, :]).all() and np.isnan(got[:, 32:]).all()  # beyond every window
    assert np.isfinite(got[8:32, 8:32]).all()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_memory_is_bounded_by_the_width_not_the_area(tmp_path, k):
    """Row-major windows: at most two rows of chunks are buffered (one, plus the next while a window row
    straddles their border), and twice the slide's height does not change the peak."""
    b = 64
    step = b // k
    peaks = []
    for n_rows in (12 * k, 24 * k):
        n_cols = 40 * k
        rows, cols, px, py = _window_grid(n_rows, n_cols, step)
        H, W = (n_rows - 1) * step + b, (n_cols - 1) * step + b
        arr = _level0(tmp_path, H, W, f"s{n_rows}.zarr")
        asm = MapAssembler(arr, px, py, b, blend_window(b, k))
        blk = np.ones((b, b), np.float32)
        for i in range(len(rows)):
            asm.add(i, blk)
        assert not asm.buffers and np.allclose(arr[:], 1.0, rtol=1e-6)
        peaks.append(asm.peak_buffered)
    chunks_per_row = -(-W // writers.CHUNK)
    assert peaks[0] == peaks[1] <= 2 * chunks_per_row
    if k == 1:
        assert peaks[0] == chunks_per_row  # tiles aligned with the chunks: exactly one row, as before


def test_finalize_hook_sees_each_chunk_once_and_all_nan_chunks_are_not_written(tmp_path):
    b = 64
    rows, cols, px, py = _window_grid(16, 16, b)  # 1024 x 1024: 2 x 2 chunks
    arr = _level0(tmp_path, 1024, 1024)
    seen = []

    def finalize(chunk, y0, x0):
        seen.append((y0, x0, chunk.shape))
        if (y0, x0) == (0, 512):
            chunk[:] = np.nan
        return chunk

    asm = MapAssembler(arr, px, py, b, None, finalize=finalize)
    for i in range(len(rows)):
        asm.add(i, np.full((b, b), 2.0, np.float32))
    assert sorted(seen) == [(0, 0, (512, 512)), (0, 512, (512, 512)), (512, 0, (512, 512)), (512, 512, (512, 512))]
    assert asm.written == {(0, 0), (1, 0), (1, 1)} and arr.nchunks_initialized == 3


def test_tile_scores_come_from_each_tiles_own_window():
    mean = np.array([0.1, 0.2, np.nan, 0.4, 0.5], np.float32)
    mx = mean * 2
    m, x = tile_scores_from_windows(np.array([0, 2, 4]), mean, mx)
    np.testing.assert_array_equal(m, mean[[0, 2, 4]])
    np.testing.assert_array_equal(x, mx[[0, 2, 4]])


# -- NaN off tissue ---------------------------------------------------------------------------------------------

def _geom(origin=(30, 10), slide_px=3.0, h=70, w=90):
    return writers.MapGeometry(height=h, width=w, origin_x=float(origin[0]), origin_y=float(origin[1]),
                               slide_px=slide_px, um=1.5, block=16)


def test_map_tissue_is_the_mask_pixel_under_each_map_pixels_centre():
    rng = np.random.default_rng(3)
    mask = rng.random((60, 50)) < 0.5  # 5 level-0 px per mask px: 250 x 300 level-0 px
    ds = 5.0
    geom = _geom()
    mt = MapTissue(mask, ds, geom)
    got = mt.block(0, 0, geom.height, geom.width)
    for y in range(geom.height):
        for x in range(geom.width):
            lx, ly = geom.origin_x + (x + 0.5) * geom.slide_px, geom.origin_y + (y + 0.5) * geom.slide_px
            mx, my = int(lx // ds), int(ly // ds)
            want = 0 <= mx < 50 and 0 <= my < 60 and mask[my, mx]
            assert got[y, x] == want, (y, x)
    np.testing.assert_array_equal(mt.block(13, 21, 9, 40), got[13:22, 21:61])  # any sub-block agrees
    assert mt.pixels() == got.sum()


def test_nan_exactly_off_tissue_after_blending(tmp_path):
    """Windows of a constant through the assembler with MapTissue as finalize: NaN exactly where the mask says glass."""
    b, k = 16, 2
    step = b // k
    rows, cols, px, py = _window_grid(9, 11, step)
    geom = writers.MapGeometry(height=(9 - 1) * step + b, width=(11 - 1) * step + b, origin_x=100.0,
                               origin_y=40.0, slide_px=4.0, um=2.0, block=b)
    mask = np.zeros((200, 200), bool)
    mask[20:45, 30:60] = True  # a rectangle of tissue in mask px (ds 3)
    mask[50, 40] = True
    mt = MapTissue(mask, 3.0, geom)
    arr = _level0(tmp_path, geom.height, geom.width)
    asm = MapAssembler(arr, px, py, b, blend_window(b, k), finalize=mt)
    for i in range(len(rows)):
        asm.add(i, np.full((b, b), 7.0, np.float32))
    got = arr[:]
    tissue = mt.block(0, 0, geom.height, geom.width)
    assert 0 < tissue.sum() < tissue.size
    np.testing.assert_array_equal(np.isfinite(got), tissue)
    np.testing.assert_allclose(got[tissue], 7.0, rtol=1e-6)


def test_window_origins_on_the_map():
    g = writers.MapGeometry(height=100, width=100, origin_x=0.0, origin_y=0.0, slide_px=4.0, um=2.0, block=64)
    x, y = g.window_origins(np.array([0, 1, 3]), np.array([2, 0, 5]), 4)
    np.testing.assert_array_equal(x, [32, 0, 80])
    np.testing.assert_array_equal(y, [0, 16, 48])
    from wsi_haloae.errors import BadInputError

    with pytest.raises(BadInputError, match="windows per tile do not fit"):
        writers.MapGeometry(height=1, width=1, origin_x=0.0, origin_y=0.0, slide_px=64.0, um=1.0,
                            block=4).window_origins(np.array([0]), np.array([0]), 8)


@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_padded_windows_land_where_they_belong(tmp_path, synthetic_slide, overlap):
    """The building blocks end to end with a probe 'model' (darkness, 4x4-pooled): grid with edge tiles on a
    slide with a bounds offset, windows, padded reads, map placement, blending, NaN off tissue. Every window
    sees the same slide pixels where windows overlap, so the blended map must equal the darkness of the
    bounds region read in one piece, pooled, with glass NaN, up to the map's cropped right/bottom edge."""
    from wsi_haloae.slide.grid import build_grid, plan_windows
    from wsi_haloae.slide.reader import SlideReader

    r = SlideReader(synthetic_slide)
    r.bounds = (100, 60, 1500, 1400)  # MIRAX-like, neither side a multiple of the tile, cutting the tissue
    grid = build_grid(r, 0.5, min_tissue=0.1, cover_edges=True)
    win = plan_windows(grid, overlap)
    d = 4
    geom = writers.MapGeometry.for_slide(r.bounds, 0.5, grid.scale, 256, d)
    assert (geom.height, geom.width) == (350, 375) and (grid.n_rows, grid.n_cols) == (6, 6)
    px, py = geom.window_origins(win.rows, win.cols, win.per_tile)
    tissue = MapTissue(grid.mask, grid.mask_downsample, geom)
    arr = _level0(tmp_path, geom.height, geom.width)
    asm = MapAssembler(arr, px, py, 256 // d, blend_window(256 // d, win.per_tile), finalize=tissue)

    def probe(rgb):
        dark = 1.0 - rgb.astype(np.float64).mean(axis=2) / 255
        h, w = dark.shape
        return dark.reshape(h // d, d, w // d, d).mean(axis=(1, 3)).astype(np.float32)

    for i in range(len(win)):
        tile = r.read_scaled(int(win.xs[i]), int(win.ys[i]), 256, 256, grid.scale, fill=grid.background)
        asm.add(i, probe(tile))
    got = arr[:]
    want = probe(r.read_region(100, 60, 0, 1500, 1400))
    want[~tissue.block(0, 0, geom.height, geom.width)] = np.nan
    covered = np.isfinite(got)
    np.testing.assert_array_equal(covered, np.isfinite(want) & covered)  # NaN wherever there is glass
    assert covered.sum() >= 0.98 * np.isfinite(want).sum()  # and nearly all tissue scored (tiles with < 0.1 are not)
    np.testing.assert_allclose(got[covered], want[covered], rtol=1e-5, atol=1e-6)
    assert np.isfinite(got[:, -1]).any() and np.isfinite(got[-1, :]).any()  # the partial strips are scored


def test_seam_measure(tmp_path):
    from wsi_haloae.infer.seams import seam_steps

    rng = np.random.default_rng(0)
    b = 16
    tiles = np.kron(rng.random((6, 7)), np.ones((b, b)))  # constant per tile: steps only at borders
    s = seam_steps(tiles, b)
    assert s.inner == 0 and s.border > 0.2 and s.ratio == float("inf")
    assert s.n_border == 6 * b * 6 + 5 * 7 * b and s.n_inner == 6 * b * (7 * b - 1) + (6 * b - 1) * 7 * b - s.n_border
    Y, X = np.mgrid[0:6 * b, 0:7 * b]
    ramp = 0.5 * X - 0.5 * Y  # smooth: the same step everywhere
    assert seam_steps(ramp, b).ratio == pytest.approx(1.0)
    noisy = ramp + np.kron(5 * rng.random((6, 7)), np.ones((b, b)))
    arr = _level0(tmp_path, 6 * b, 7 * b)  # zarr, read in blocks of rows that cut through tiles
    arr[:] = noisy.astype(np.float32)
    whole, blocks = seam_steps(noisy, b), seam_steps(arr, b, rows=5)
    assert blocks.n_border == whole.n_border and blocks.border == pytest.approx(whole.border, rel=1e-5)
    assert whole.ratio > 1.5
    shifted = seam_steps(np.pad(tiles, ((3, 0), (5, 0)), constant_values=np.nan), b, origin=(3, 5))
    assert shifted.inner == 0 and shifted.n_border == s.n_border  # NaN pairs are left out


def test_tile_dataset_reads_padded_edge_tiles_at_the_grids_scale(synthetic_slide):
    from wsi_haloae.infer.dataset import TileDataset
    from wsi_haloae.slide.grid import build_grid
    from wsi_haloae.slide.reader import SlideReader
    from wsi_haloae.slide.resolution import Resolution

    r = SlideReader(synthetic_slide)
    # a declared level 0 (--slide-mpp 0.25) at a 0.5 target: 2 level-0 px per tile px, read from level 1
    g = build_grid(r, Resolution(0.5, 0.25, "--mpp", True), tile_size=300, min_tissue=0, cover_edges=True)
    assert g.scale == 2.0 and (g.n_rows, g.n_cols) == (4, 4) and g.xs.max() == 1800
    ds = TileDataset(synthetic_slide, g.xs, g.ys, 300, None, scale=g.scale, fill=g.background)
    last = int(np.flatnonzero((g.xs == 1800) & (g.ys == 1800))[0])
    tile, i, ok = ds[last]
    assert ok and i == last and tile.shape == (3, 300, 300)
    t = tile.permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(t[:124, :124], r.read_region(1800, 1800, 1, 124, 124))  # 248 level-0 px inside
    assert (t[124:] == g.background).all() and (t[:, 124:] == g.background).all()


def test_an_assembler_without_windows_writes_nothing(tmp_path):
    arr = _level0(tmp_path, 100, 100)
    asm = MapAssembler(arr, np.zeros(0, np.int64), np.zeros(0, np.int64), 16, blend_window(16, 2))
    asm.finish()
    assert asm.written == set() and arr.nchunks_initialized == 0 and np.isnan(arr[:]).all()
