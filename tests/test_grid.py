"""resolve_mpp, tile grids (coordinates, scales, tissue fractions) and QuPath annotation filtering."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import shared_path
from wsi_haloae.errors import BadInputError, BadSlideError
from wsi_haloae.slide.annotations import load_annotations
from wsi_haloae.slide.grid import build_grid, resolve_mpp
from wsi_haloae.slide.reader import SlideReader
from wsi_haloae.slide.synthetic import SyntheticSlideSpec, _inside


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(coords, kind="Polygon", cls=None):
    props = {"objectType": "annotation"}
    if cls:
        props["classification"] = {"name": cls, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coords}, "properties": props}


def test_resolve_mpp(synthetic_slide, tmp_path):
    r = SlideReader(synthetic_slide)
    assert resolve_mpp(r, None) == pytest.approx(0.5)
    assert resolve_mpp(r, 1.0) == 1.0
    from PIL import Image

    p = tmp_path / "nompp.png"
    Image.new("RGB", (300, 300), (200, 100, 150)).save(p)
    flat = SlideReader(p)
    with pytest.raises(BadSlideError, match=r"nompp\.png.*--mpp"):
        resolve_mpp(flat, None)
    assert resolve_mpp(flat, 0.8) == 0.8
    assert flat.scale_for(0.8) == 1.0  # no mpp on the slide: level 0 is taken to be at the given mpp


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
