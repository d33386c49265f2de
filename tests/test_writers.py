"""The result writers on their own (no model, no slide): zarr store, OME-TIFF, GeoJSON, preview."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from wsi_haloae.errors import OutputError
from wsi_haloae.fileio import partial_name, publish
from wsi_haloae.infer import writers
from wsi_haloae.infer.geojson import CLASS_NAME, robust_threshold, write_geojson
from wsi_haloae.infer.ome_tiff import rgb_path_for, write_ome_tiff
from wsi_haloae.infer.preview import write_preview


def _random_tiles(rng, n_rows, n_cols, keep=0.6):
    rows, cols = np.nonzero(rng.random((n_rows, n_cols)) < keep)
    return rows, cols


def test_nan_mean_2x2():
    a = np.array([[1, 3, np.nan, 5], [np.nan, np.nan, np.nan, np.nan], [2, 2, 7, np.nan]], np.float32)
    out = writers.nan_mean_2x2(a)
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out[0], [2.0, 5.0])
    np.testing.assert_allclose(out[1], [2.0, 7.0])
    assert np.isnan(writers.nan_mean_2x2(np.full((2, 2), np.nan, np.float32))).all()


def _store_with_map(tmp_path, H=1300, W=900, um=2.0):
    rng = np.random.default_rng(1)
    g = writers.open_new_store(tmp_path / "m.zarr")
    a = writers.create_map_level(g, "0", (H, W))
    data = rng.random((H, W)).astype(np.float32)
    data[:, : W // 3] = np.nan  # background
    a[:] = data
    n = writers.build_pyramid(g)
    writers.write_multiscales(g, n, um)
    return g, data, n


def test_pyramid_and_multiscales_read_by_ome_zarr(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    g, data, n = _store_with_map(tmp_path)
    assert n == 4  # 1300 -> 650 -> 325 -> 163
    shapes = [lvl.shape for lvl in writers.map_levels(g)]
    assert shapes == [(1300, 900), (650, 450), (325, 225), (163, 113)]
    l1 = g["1"][:]
    np.testing.assert_allclose(l1[10, 400], np.nanmean(data[20:22, 800:802]), rtol=1e-6)
    assert np.isnan(l1[:, : 900 // 6 - 1]).all()  # background stays NaN down the pyramid
    node = list(Reader(parse_url(str(tmp_path / "m.zarr")))())[0]
    assert [d.shape for d in node.data] == shapes
    ms = node.metadata
    assert [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert all(a["unit"] == "micrometer" and a["type"] == "space" for a in ms["axes"])
    scales = [t[0]["scale"] for t in ms["coordinateTransformations"]]
    assert scales == [[2.0 * 2**k] * 2 for k in range(4)]
    attrs = json.loads((tmp_path / "m.zarr" / ".zattrs").read_text())
    assert attrs["multiscales"][0]["version"] == "0.4"
    assert json.loads((tmp_path / "m.zarr" / "0" / ".zarray").read_text())["dimension_separator"] == "/"


def test_marker_then_publish_marks_complete_last_and_replaces(tmp_path):
    out = tmp_path / "r.zarr"
    tmp = partial_name(out)
    g = writers.open_new_store(tmp)
    writers.create_map_level(g, "0", (10, 10))
    assert not writers.is_complete(tmp)
    writers.mark_complete(tmp, {"x": 1})
    assert writers.is_complete(tmp) and not out.exists()
    publish([(tmp, out)])
    assert writers.is_complete(out) and not tmp.exists()
    assert writers.read_attrs(out)["x"] == 1
    # a marker file without the attribute (or the reverse) is not complete
    (out / writers.MARKER).unlink()
    assert not writers.is_complete(out)


def test_ome_tiff_pyramid_subifds_physical_size_and_valid_xml(tmp_path):
    import tifffile
    from ome_types import from_xml

    g, data, n = _store_with_map(tmp_path, H=700, W=600, um=1.5)
    levels = writers.map_levels(g)
    f = write_ome_tiff(levels, 1.5, tmp_path / "heat.ome.tif", rgb=False)
    r = write_ome_tiff(levels, 1.5, rgb_path_for(f), rgb=True, vmin=0.0, vmax=1.0)
    assert r.name == "heat.rgb.ome.tif"
    for path, rgb in ((f, False), (r, True)):
        with tifffile.TiffFile(path) as tf:
            assert tf.is_ome
            page = tf.pages[0]
            assert page.is_tiled and page.tilewidth == 256 and page.tilelength == 256
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert len(page.subifds or ()) == n - 1  # the pyramid is in SubIFDs, not top-level pages
            assert len(tf.pages) == 1
            s = tf.series[0]
            assert [lv.shape[:2] for lv in s.levels] == [lv.shape for lv in levels]
            base = s.levels[0].asarray()
            if rgb:
                assert base.dtype == np.uint8 and base.shape[2] == 3
                assert (base[:, :100] == 255).all()  # NaN background -> white
            else:
                assert base.dtype == np.float32
                np.testing.assert_array_equal(base, data)
                np.testing.assert_array_equal(s.levels[1].asarray(), levels[1][:])
            ome = from_xml(tf.ome_metadata)
        px = ome.images[0].pixels
        assert px.physical_size_x == pytest.approx(1.5) and px.physical_size_y == pytest.approx(1.5)
        assert px.physical_size_x_unit.value == "µm"
    assert not list(tmp_path.glob(".*partial"))


def test_rgb_path_names():
    assert rgb_path_for("a/b.ome.tif").name == "b.rgb.ome.tif"
    assert rgb_path_for("b.ome.tiff").name == "b.rgb.ome.tiff"
    assert rgb_path_for("b.tif").name == "b.rgb.tif"


@pytest.mark.parametrize("name", ["tiles.geojson", "tiles.geojson.gz"])
def test_geojson_fields_as_qupath_needs(tmp_path, name):
    xs = np.array([1000, 1256, 1512, 1000])
    ys = np.array([500, 500, 500, 756])
    mean = np.array([0.1, 0.12, 5.0, np.nan], np.float32)  # the last tile failed
    mx = np.array([0.2, 0.3, 9.0, np.nan], np.float32)
    thr = robust_threshold(mean)
    n = write_geojson(tmp_path / name, xs, ys, 256.0, 256.0, mean, mx, threshold=thr["value"], offset=(100, 50),
                      rows=np.array([0, 0, 0, 1]), cols=np.array([0, 1, 2, 0]), seed="s")
    assert n == 3
    raw = (tmp_path / name).read_bytes()
    text = gzip.decompress(raw).decode() if name.endswith(".gz") else raw.decode()
    fc = json.loads(text)
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 3
    f0, f2 = fc["features"][0], fc["features"][2]
    assert f0["type"] == "Feature"
    assert f0["geometry"]["type"] == "Polygon"
    assert f0["geometry"]["coordinates"] == [[[900, 450], [1156, 450], [1156, 706], [900, 706], [900, 450]]]
    p = f0["properties"]
    assert p["objectType"] == "tile"
    assert set(p["measurements"]) == {"anomaly_score", "anomaly_score_max"}
    assert p["measurements"]["anomaly_score"] == pytest.approx(0.1)
    assert "classification" not in p
    c = f2["properties"]["classification"]
    assert c["name"] == CLASS_NAME and len(c["color"]) == 3 and all(0 <= v <= 255 for v in c["color"])
    assert len({f["id"] for f in fc["features"]}) == 3


def test_robust_threshold():
    s = np.r_[np.linspace(1.0, 2.0, 101), [50.0, 60.0]]
    t = robust_threshold(s)
    assert t["median"] == pytest.approx(np.median(s))
    assert 2.0 < t["value"] < 50.0
    assert robust_threshold(np.array([np.nan]))["value"] is None


def _panels(img, th, tw):
    """The bare and the overlaid panel of a side-by-side preview (layout constants of preview.py)."""
    from wsi_haloae.infer import preview as pv

    top = img.shape[0] - pv._MARGIN - th
    left = img[top:top + th, pv._MARGIN:pv._MARGIN + tw].astype(int)
    x = pv._MARGIN + tw + pv._GAP
    return left, img[top:top + th, x:x + tw].astype(int)


def test_preview_keeps_the_he_visible_and_outlines_anomalous_tiles(tmp_path):
    from PIL import Image

    from wsi_haloae.infer import preview as pv

    rng = np.random.default_rng(0)
    th, tw = 200, 150  # portrait: side by side
    thumb = np.repeat(np.repeat(rng.integers(80, 230, (20, 15, 3), dtype=np.uint8), 10, 0), 10, 1)
    heat = np.full((20, 15), np.nan, np.float32)  # 100 level-0 px per map px on a 1500 x 2000 slide
    heat[:10, 8:] = 1.0  # = vmin: transparent
    heat[10:, 8:] = 5.0  # = vmax: covered
    boxes = np.array([[100, 1200, 300, 1400], [300, 1200, 500, 1400], [900, 100, 1100, 300]])
    anomalous = np.array([True, True, False])
    p = write_preview(tmp_path / "p.png", thumb, (1500, 2000), heat, (0, 0, 1500, 2000), vmin=1.0, vmax=5.0,
                      title="slide-17", subtitle="2 Anomalous", tile_boxes=boxes, anomalous=anomalous)
    assert [q.name for q in tmp_path.iterdir()] == ["p.png"]  # written through a temp name
    img = np.asarray(Image.open(p).convert("RGB"))
    bare, over = _panels(img, th, tw)
    np.testing.assert_array_equal(bare[5:-5, 5:-5], thumb[5:-5, 5:-5].astype(int))  # the bare slide, untouched
    diff = np.abs(over - bare).max(axis=2)
    assert diff[5:95, 5:75].max() <= 2  # NaN (off tissue): the H&E as it is
    assert diff[5:95, 85:145].max() <= 2  # score at the bottom of the range: transparent
    covered = over[105:150, 85:145]  # (the legend sits in the lower right corner)
    want = (255 * np.array(pv.heat_rgba(np.array([[5.0]]), 1.0, 5.0)[0, 0, :3])).astype(int)
    a = pv.MAX_ALPHA
    np.testing.assert_allclose(covered, a * want + (1 - a) * bare[105:150, 85:145], atol=3)  # alpha-blended
    red = np.all(np.abs(over - np.array([220, 20, 60])) <= 40, axis=2)
    assert red[115:145, 5:55].any() and not red[5:35, 85:115].any()  # the Anomalous pair outlined, not the third
    assert not np.all(np.abs(bare - np.array([220, 20, 60])) <= 40, axis=2).any()
    # no anomalies, no tiles, an all-NaN map and a landscape slide are fine too
    p2 = write_preview(tmp_path / "q.png", thumb.transpose(1, 0, 2), (2000, 1500), np.full((4, 4), np.nan, np.float32),
                       (0, 0, 2000, 1500), vmin=0.0, vmax=1.0, title="empty")
    q = np.asarray(Image.open(p2))
    assert q.shape[0] > q.shape[1]  # landscape: the panels stack


def test_preview_outline_is_the_union_of_the_boxes():
    from wsi_haloae.infer.preview import _outline_paths

    (path,) = _outline_paths(np.array([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20]]), 1.0, (30, 30))
    corners = {(round(x), round(y)) for x, y in path}
    assert {(0, 0), (20, 0), (20, 10), (10, 20), (0, 20)} <= corners  # one L-shaped outline, box edges exact
    assert len(_outline_paths(np.array([[0, 0, 10, 10], [15, 15, 20, 20]]), 1.0, (30, 30))) == 2


def test_unwritable_output_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="file.txt"):
        writers.check_writable(blocker / "out.zarr", "zarr store")
    # the file writers leave the one-line message to their caller (infer names the output), and nothing behind
    with pytest.raises(OSError):
        write_geojson(blocker / "t.geojson", np.array([0]), np.array([0]), 1.0, 1.0, np.array([1.0]), np.array([1.0]),
                      threshold=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_pyramid_skips_absent_chunks_with_the_same_result(tmp_path):
    rng = np.random.default_rng(2)
    H, W = 2600, 3100
    data = np.full((H, W), np.nan, np.float32)
    data[100:700, 2000:2900] = rng.random((600, 900))  # one tissue island: most chunks stay absent
    full = writers.open_new_store(tmp_path / "full.zarr")
    writers.create_map_level(full, "0", (H, W))[:] = data
    n_full = writers.build_pyramid(full)
    fast = writers.open_new_store(tmp_path / "fast.zarr")
    a = writers.create_map_level(fast, "0", (H, W))
    a[:] = data
    ch = writers.CHUNK
    written = {(cy, cx) for cy in range(-(-H // ch)) for cx in range(-(-W // ch))
               if not np.isnan(data[cy * ch:(cy + 1) * ch, cx * ch:(cx + 1) * ch]).all()}
    assert len(written) < 12
    assert writers.build_pyramid(fast, written=written) == n_full == 5
    for k in range(1, n_full):
        np.testing.assert_array_equal(fast[str(k)][:], full[str(k)][:])
        assert fast[str(k)].nchunks_initialized == full[str(k)].nchunks_initialized
    assert fast["1"].nchunks_initialized < fast["1"].nchunks  # empty regions stay absent (NaN) down the pyramid
