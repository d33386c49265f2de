"""Tile grids (coordinates, scales, tissue fractions) and QuPath annotation filtering."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import shared_path
from wsi_haloae.errors import BadInputError
from wsi_haloae.slide.annotations import load_annotations
from wsi_haloae.slide.grid import build_grid
from wsi_haloae.slide.reader import SlideReader
from wsi_haloae.slide.synthetic import GLASS, SyntheticSlideSpec, _inside


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(coords, kind="Polygon", cls=None):
    props = {"objectType": "annotation"}
    if cls:
        props["classification"] = {"name": cls, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": props}


@pytest.mark.parametrize("mpp, tile, stride, scale, n", [(0.5, 256, None, 1.0, 8), (1.0, 256, None, 2.0, 4),
                                                         (0.75, 128, None, 1.5, 10), (0.5, 256, 128, 1.0, 15)])
def test_grid_geometry(synthetic_slide, mpp, tile, stride, scale, n):
    r = SlideReader(synthetic_slide)
    g = build_grid(r, mpp, tile_size=tile, stride=stride, min_tissue=0.0)
    assert g.scale == pytest.approx(scale) and g.level0_tile == pytest.approx(tile * scale)
    assert (g.n_rows, g.n_cols) == (n, n) and len(g) == n * n == g.n_grid
    s0 = (stride or tile) * scale
    np.testing.assert_array_equal(g.xs, np.round(g.cols * s0).astype(np.int64))
    np.testing.assert_array_equal(g.ys, np.round(g.rows * s0).astype(np.int64))
    assert (g.xs + g.level0_tile <= 2048 + 1e-6).all()  # whole tiles only
    assert g.fractions.shape == (n, n) and g.tissue.dtype == np.float32


def test_grid_tissue_fraction_matches_geometry(synthetic_slide):
    r = SlideReader(synthetic_slide)
    g = build_grid(r, 0.5, min_tissue=0.0)
    spec = SyntheticSlideSpec.default(2048, 2048, 0.5)
    # analytic fraction of each tile inside the tissue disc (16x16 samples per tile)
    o = (np.arange(16) + 0.5) * 16
    truth = np.array([_inside(spec.islands, (x + o)[None, :], (y + o)[:, None]).mean() for x, y in zip(g.xs, g.ys)])
    assert np.abs(truth - g.tissue).mean() < 0.08
    kept = build_grid(r, 0.5, min_tissue=0.5)
    assert 0 < len(kept) < g.n_grid
    assert (truth[kept.rows * g.n_cols + kept.cols] > 0.3).all()
    assert (kept.tissue >= 0.5).all()


def test_annotations_restrict_with_holes_and_classes(synthetic_slide, tmp_path):
    r = SlideReader(synthetic_slide)
    outer = _square(0, 0, 2048, 2048)
    hole = _square(768, 768, 1280, 1280)  # centres of the 4 middle tiles
    fc = {"type": "FeatureCollection", "features": [
        _feature([outer, hole], cls="Tumor"),
        _feature([[_square(0, 0, 512, 512)]], kind="MultiPolygon", cls="Stroma"),
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
    ]}
    p = tmp_path / "ann.geojson"
    p.write_text(json.dumps(fc))
    g = build_grid(r, 0.5, min_tissue=0.0, annotations=p, class_name="Tumor")
    cx, cy = g.xs + 128, g.ys + 128
    assert g.n_grid == 64 and len(g) == 60
    assert not ((cx > 768) & (cx < 1280) & (cy > 768) & (cy < 1280)).any()
    g = build_grid(r, 0.5, min_tissue=0.0, annotations=p, class_name="Stroma")
    assert sorted(zip(g.xs.tolist(), g.ys.tolist())) == [(0, 0), (0, 256), (256, 0), (256, 256)]
    # list form, no class filter: the union; a polygon over the hole fills it
    p2 = tmp_path / "list.geojson"
    p2.write_text(json.dumps(fc["features"]))
    assert len(build_grid(r, 0.5, min_tissue=0.0, annotations=p2)) == 60
    p2.write_text(json.dumps(fc["features"] + [_feature([_square(700, 700, 1300, 1300)])]))
    assert len(build_grid(r, 0.5, min_tissue=0.0, annotations=p2)) == 64
    with pytest.raises(BadInputError, match="no polygon of class 'Nope'.*Stroma, Tumor"):
        build_grid(r, 0.5, annotations=p, class_name="Nope")


def test_annotation_errors_and_bounds_offset(tmp_path):
    with pytest.raises(BadInputError, match="missing.geojson: no such file"):
        load_annotations(tmp_path / "missing.geojson")
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(BadInputError, match="bad.geojson: not readable JSON"):
        load_annotations(bad)
    pts = tmp_path / "pts.geojson"
    pts.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}}]}))
    with pytest.raises(BadInputError, match="no Polygon"):
        load_annotations(pts)
    ok = tmp_path / "ok.geojson"
    ok.write_text(json.dumps(_feature([_square(0, 0, 10, 10)])))
    g = load_annotations(ok, offset=(100, 50))  # QuPath px are relative to the OpenSlide bounds
    assert g.bounds == (100.0, 50.0, 110.0, 60.0)


def test_invalid_outlines_keep_all_their_area_and_say_so(synthetic_slide, tmp_path, caplog):
    """Issue 13 case 7: a bow-tie lost a lobe to buffer(0), silently. Both lobes stay; a warning names it."""
    import logging

    bowtie = [[0, 0], [2048, 2048], [2048, 0], [0, 2048], [0, 0]]  # crosses itself at (1024, 1024)
    crossing_hole = [_square(0, 0, 1024, 1024), _square(512, 512, 1536, 640)]  # hole sticks out of its shell
    p = tmp_path / "bowtie.geojson"
    p.write_text(json.dumps({"type": "FeatureCollection", "features": [_feature([bowtie], cls="Tumor"),
                                                                       _feature(crossing_hole, cls="Stroma")]}))
    with caplog.at_level(logging.WARNING):
        g = load_annotations(p, class_name="Tumor")
    assert g.is_valid and g.area == pytest.approx(2 * 1024 * 2048 / 2)  # both triangles: half the square
    assert "1 invalid polygon(s) repaired with shapely.make_valid" in caplog.text and "Self-intersection" in caplog.text
    r = SlideReader(synthetic_slide)
    grid = build_grid(r, 0.5, min_tissue=0.0, annotations=p, class_name="Tumor")
    cx = grid.xs + 128
    assert (cx < 1024).sum() == (cx > 1024).sum() > 0  # left and right lobes alike
    stroma = load_annotations(p, class_name="Stroma")
    assert stroma.area == pytest.approx(1024 * 1024 - 512 * 128)  # the hole still cuts, only inside its shell


@pytest.mark.shared
def test_cmu_grid_against_independent_thumbnail_mask():
    """CMU-1-Small-Region at 0.5 mpp: the kept tiles are the tissue, judged by a plain grey threshold on
    OpenSlide's own thumbnail (no code shared with the detector)."""
    import openslide

    p = shared_path("openslide-testdata", "Aperio", "CMU-1-Small-Region.svs")
    osr = openslide.OpenSlide(str(p))
    th = np.asarray(osr.get_thumbnail((555, 742)).convert("L"))
    k = th.shape[1] / osr.dimensions[0]
    ind = th < 215  # glass is ~244 grey
    g = build_grid(SlideReader(p), 0.5, min_tissue=0.0)
    assert g.scale == 1.0 and (g.n_rows, g.n_cols) == (11, 8)  # 0.499 is within 2 % of 0.5: read level 0
    frac = np.array([ind[int(y * k):int((y + 256) * k), int(x * k):int((x + 256) * k)].mean() for x, y in zip(g.xs, g.ys)])
    kept = g.tissue >= 0.5
    assert 25 <= kept.sum() <= 45
    assert (frac[kept] > 0.3).all()  # every kept tile is mostly tissue
    assert kept[frac > 0.7].all()  # every clearly-tissue tile is kept
    assert ((frac > 0.5) == kept).mean() > 0.9


def test_bounds_offset_grid_and_annotations(synthetic_slide, tmp_path):
    """A slide with an openslide.bounds-* region (MIRAX-like): the grid starts at the bounds, and QuPath
    annotation pixels (relative to the bounds) are shifted onto level 0."""
    r = SlideReader(synthetic_slide)
    r.properties.update({"openslide.bounds-x": "100", "openslide.bounds-y": "60",
                         "openslide.bounds-width": "1800", "openslide.bounds-height": "1900"})
    r.bounds = r._bounds()
    assert r.bounds == (100, 60, 1800, 1900)
    g = build_grid(r, 0.5, min_tissue=0.0)
    assert g.origin == (100, 60) and (g.n_rows, g.n_cols) == (7, 7)
    assert g.xs.min() == 100 and g.ys.min() == 60 and ((g.xs - 100) % 256 == 0).all()
    p = tmp_path / "a.geojson"
    p.write_text(json.dumps([_feature([_square(0, 0, 512, 512)])]))
    g = build_grid(r, 0.5, min_tissue=0.0, annotations=p)
    assert sorted(zip(g.xs.tolist(), g.ys.tolist())) == [(100, 60), (100, 316), (356, 60), (356, 316)]
    r.properties["openslide.bounds-width"] = "99999"  # inconsistent bounds are ignored
    assert r._bounds() == (0, 0, 2048, 2048)


# -- every tissue pixel in a tile: edge tiles, padding, windows ---------------------------------------------------

def test_cover_edges_adds_the_partial_strip_with_whole_tile_fractions(synthetic_slide):
    r = SlideReader(synthetic_slide)
    whole = build_grid(r, 0.5, tile_size=300, min_tissue=0.0)
    edges = build_grid(r, 0.5, tile_size=300, min_tissue=0.0, cover_edges=True)
    assert (whole.n_rows, whole.n_cols) == (6, 6) and (edges.n_rows, edges.n_cols) == (7, 7)
    assert edges.xs.max() == 1800 and edges.xs.max() + edges.level0_tile > 2048  # runs past the edge
    np.testing.assert_array_equal(edges.fractions[:6, :6], whole.fractions)  # inside: unchanged
    # the last column holds 248 of its 300 px: its fraction counts the whole tile (outside = not tissue)
    assert (edges.fractions[:, 6] <= 248 / 300 + 0.03).all()
    # a region smaller than one tile still gets one (padded) tile
    r.bounds = (0, 0, 100, 50)
    tiny = build_grid(r, 0.5, min_tissue=0.0, cover_edges=True)
    assert (tiny.n_rows, tiny.n_cols, len(tiny)) == (1, 1, 1)
    assert build_grid(r, 0.5, min_tissue=0.0).n_grid == 0


def test_background_is_the_slides_glass(synthetic_slide):
    g = build_grid(SlideReader(synthetic_slide), 0.5)
    assert np.abs(np.array(g.background) - np.array(GLASS, int)).max() <= 3  # (242, 240, 244) after JPEG


def _read_both(reader, x, y, size, mpp, fill):
    return reader.read_tile(x, y, size, mpp), reader.read_tile(x, y, size, mpp, fill=fill)


@pytest.mark.parametrize("mpp", [0.5, 1.0, 0.75])
def test_padded_read_beyond_the_slide_tiff(synthetic_slide, mpp):
    """OpenSlide: the part of an edge tile beyond the slide is the fill colour, the rest is the normal read."""
    r = SlideReader(synthetic_slide)
    fill = (10, 200, 30)
    scale = r.scale_for(mpp)
    x = y = 2048 - int(100 * scale)  # 100 target px inside, the rest outside
    plain, padded = _read_both(r, x, y, 256, mpp, fill)
    inside = 100 if scale in (1.0, 2.0) else 96  # resampled reads: leave the Lanczos reach at the border
    np.testing.assert_array_equal(padded[:inside, :inside], plain[:inside, :inside])
    edge = 100 + (0 if scale in (1.0, 2.0) else 4)
    assert (padded[edge:, :] == fill).all() and (padded[:, edge:] == fill).all()
    assert (plain[edge:, edge:] == 255).all()  # unpadded: OpenSlide's transparent -> white
    inner = r.read_tile(512, 512, 256, mpp, fill=fill)  # wholly inside: the fill changes nothing
    np.testing.assert_array_equal(inner, r.read_tile(512, 512, 256, mpp))


def test_padded_read_flat_image_and_bounds(tmp_path, synthetic_slide):
    """A flat image pads the same way, and so does the area outside a MIRAX-like bounds region."""
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    p = tmp_path / "flat.png"
    Image.fromarray(rgb).save(p)
    flat = SlideReader(p)
    fill = (1, 2, 3)
    t = flat.read_tile(350, 250, 64, None, fill=fill)
    np.testing.assert_array_equal(t[:50, :50], rgb[250:300, 350:400])
    assert (t[50:] == fill).all() and (t[:, 50:] == fill).all()
    r = SlideReader(synthetic_slide)
    r.bounds = (100, 60, 1800, 1900)
    t = r.read_tile(0, 0, 256, 0.5, fill=fill)
    assert (t[:60] == fill).all() and (t[:, :100] == fill).all()
    np.testing.assert_array_equal(t[60:, 100:], r.read_region(100, 60, 0, 156, 196))


def test_grid_without_tissue_is_valid(tmp_path):
    from PIL import Image

    from wsi_haloae.slide.grid import plan_windows, scored_tissue_fraction

    p = tmp_path / "glass.png"
    Image.new("RGB", (700, 500), (240, 240, 238)).save(p)
    g = build_grid(SlideReader(p), 0.5, min_tissue=0.1, cover_edges=True)
    assert len(g) == 0 and (g.n_rows, g.n_cols) == (2, 3) and g.fractions.shape == (2, 3)
    assert g.xs.dtype == np.int64 and g.rows.dtype == np.int32 and not g.mask.any()
    w = plan_windows(g, 0.5)
    assert len(w) == 0 and w.tile_window.shape == (0,) and (w.n_rows, w.n_cols) == (3, 5)
    assert scored_tissue_fraction(g, w) == 1.0  # nothing to score: nothing missed


def test_windows_at_overlap(synthetic_slide):
    from wsi_haloae.slide.grid import plan_windows, scored_tissue_fraction, windows_per_tile

    r = SlideReader(synthetic_slide)
    g = build_grid(r, 0.5, min_tissue=0.1, cover_edges=True)
    w1 = plan_windows(g, 0.0)
    assert w1.per_tile == 1 and len(w1) == len(g)
    np.testing.assert_array_equal(w1.xs[w1.tile_window], g.xs)
    for overlap, k in ((0.5, 2), (0.75, 4)):
        w = plan_windows(g, overlap)
        assert w.per_tile == k and w.level0_step == 256 / k and w.overlap == overlap
        assert (w.n_rows, w.n_cols) == ((g.n_rows - 1) * k + 1,) * 2
        # each grid tile keeps its own window: same place
        np.testing.assert_array_equal(w.xs[w.tile_window], g.xs)
        np.testing.assert_array_equal(w.ys[w.tile_window], g.ys)
        np.testing.assert_array_equal(w.rows[w.tile_window], g.rows * k)
        # row-major, positions on the window grid, every window has tissue and touches a kept tile
        flat = w.rows.astype(np.int64) * w.n_cols + w.cols
        assert (np.diff(flat) > 0).all()
        np.testing.assert_array_equal(w.xs, np.round(w.cols * 256 / k).astype(np.int64))
        assert (w.tissue >= 0.1).all()
        kept = {(int(a), int(b)) for a, b in zip(g.rows, g.cols)}
        assert all({(rr // k, cc // k), (rr // k, (cc + k - 1) // k), ((rr + k - 1) // k, cc // k),
                    ((rr + k - 1) // k, (cc + k - 1) // k)} & kept for rr, cc in zip(w.rows.tolist(), w.cols.tolist()))
        assert len(w) > len(g)
        assert scored_tissue_fraction(g, w) >= scored_tissue_fraction(g)
    assert windows_per_tile(0.875, 256) == 8
    for bad in (0.3, 1.0, -0.5, float("nan")):
        with pytest.raises(BadInputError, match="--overlap"):
            windows_per_tile(bad, 256)
    with pytest.raises(BadInputError, match="use one of 0, 0.5"):
        windows_per_tile(0.75, 250)  # 250 / 4 is not whole


@pytest.mark.shared
def test_cmu_scored_tissue_fraction():
    """CMU-1-Small-Region at 0.5 µm/px: whole tiles with ≥ 0.5 tissue leave ~14-20 % of the tissue unscored
    (edges, the 151-px strip); edge tiles with any real tissue (≥ 0.1) score ≥ 98 % of it."""
    from wsi_haloae.slide.grid import plan_windows, scored_tissue_fraction

    r = SlideReader(shared_path("openslide-testdata", "Aperio", "CMU-1-Small-Region.svs"))
    old = build_grid(r, 0.5, min_tissue=0.5)
    new = build_grid(r, 0.5, min_tissue=0.1, cover_edges=True)
    assert (new.n_rows, new.n_cols) == (12, 9)
    assert scored_tissue_fraction(old) < 0.85
    assert scored_tissue_fraction(new) >= 0.98
    assert scored_tissue_fraction(new, plan_windows(new, 0.5)) >= 0.99
