"""Whole-slide inference: geometry and values of the outputs, resumability, errors.

Most tests drive ``run_infer`` with a *probe* model: a stand-in with the HaloAE interface whose anomaly
map is the tile's darkness (1 − mean RGB) pooled to 64x64. Its output is known exactly from the slide
pixels, so these tests check that every tile's map lands in the right place at the right scale, that
background is NaN and that tables/attributes agree, independently of any training. The real tiny HaloAE
runs in test_infer_model.py (planted anomaly, kill-and-rerun through the CLI).
"""

from __future__ import annotations

import gzip
import math
import json
import shutil
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsi_haloae.config import InferConfig, InferOptions, ModelConfig
from wsi_haloae.errors import BadModelFileError, BadSlideError, OutputError
from wsi_haloae.fileio import partial_name
from wsi_haloae.infer import writers
from wsi_haloae.infer.engine import run_infer
from wsi_haloae.infer.outputs import OPTIONS as OUTPUT_OPTIONS
from wsi_haloae.model.anomaly_map import postprocess
from wsi_haloae.model.checkpoint import LoadedModel
from wsi_haloae.slide.reader import SlideReader


class ProbeModel(nn.Module):
    """HaloAE's inference interface; anomaly map = darkness of the tile, 4x4 mean-pooled to 64x64."""

    def __init__(self):
        super().__init__()
        self.config = ModelConfig.preset("tiny")
        self.backbone_info = {"source": "probe"}
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(1.0 - x.float().mean(dim=1, keepdim=True), 4)[:, 0]


def probe(mpp: float | None = 0.5) -> LoadedModel:
    return LoadedModel(model=ProbeModel(), mean_map=torch.zeros(64, 64), metadata={"mpp": mpp}, sha256="0" * 64)


def expected_block(reader: SlideReader, x: int, y: int, mpp: float, downsample: int,
                   fill: tuple[int, int, int] | None = None) -> np.ndarray:
    tile = torch.from_numpy(reader.read_tile(x, y, 256, mpp, fill=fill)).permute(2, 0, 1)[None].float() / 255
    raw = ProbeModel().anomaly_map(tile)
    b = 256 // downsample
    if b > 64:
        return postprocess(raw, torch.zeros(64, 64), out_size=b)[0].numpy()
    pp = postprocess(raw, torch.zeros(64, 64))
    return F.avg_pool2d(pp[:, None], 64 // b)[0, 0].numpy() if b < 64 else pp[0].numpy()


def tissue_on_map(out: Path) -> np.ndarray:
    """bool (h, w): tissue under each level-0 map pixel, from the store's own mask and geometry."""
    from wsi_haloae.infer.tissue_map import MapTissue

    g, a = writers.open_store(out), writers.read_attrs(out)
    m = a["map"]
    h, w = m["shape"]
    geom = writers.MapGeometry(height=h, width=w, origin_x=m["origin_level0"][0], origin_y=m["origin_level0"][1],
                               slide_px=m["slide_px_per_map_px"], um=m["um_per_px"],
                               block=a["tile_size"] // a["pixel_downsample"])
    return MapTissue(g["mask"][:].astype(bool), g["mask"].attrs["downsample"], geom).block(0, 0, h, w)


def assert_block(got: np.ndarray, want: np.ndarray, tissue: np.ndarray) -> None:
    """A tile's map: its expected values on tissue, NaN on glass."""
    np.testing.assert_allclose(got[tissue], want[tissue], rtol=1e-5, atol=1e-6)
    assert np.isnan(got[~tissue]).all()


OPTION_FIELDS = {f.name for f in fields(InferOptions)}


def cfg_for(slide: Path, tmp: Path, **kw) -> InferConfig:
    """An InferConfig from flat keywords: InferOptions fields, extra outputs by name, or InferConfig fields."""
    base = dict(slide=slide, model=tmp / "unused.safetensors", out=tmp / "o.zarr", workers=0, batch_size=4,
                progress=False)
    base.update(kw)
    return with_(InferConfig(slide=base.pop("slide"), model=base.pop("model"), out=base.pop("out")), **base)


def with_(cfg: InferConfig, **kw) -> InferConfig:
    """``cfg`` with some InferOptions fields, extra outputs or InferConfig fields changed."""
    opts = {k: kw.pop(k) for k in list(kw) if k in OPTION_FIELDS}
    extras = {k: kw.pop(k) for k in list(kw) if k in OUTPUT_OPTIONS}
    return replace(cfg, options=replace(cfg.options, **opts), outputs={**cfg.outputs, **extras}, **kw)


@pytest.fixture(scope="module")
def probe_run(synthetic_slide, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    cfg = cfg_for(synthetic_slide, tmp, tiff=tmp / "h.ome.tif", geojson=tmp / "t.geojson.gz", preview=tmp / "p.png",
                  workers=1)
    summary = run_infer(cfg, loaded=probe())
    return cfg, summary


def test_map_values_placement_and_nan_background(probe_run):
    cfg, summary = probe_run
    assert summary.status == "done" and writers.is_complete(cfg.out)
    g = writers.open_store(cfg.out)
    reader = SlideReader(cfg.slide)
    m = g["0"][:]
    assert m.shape == (2048 // 4, 2048 // 4)
    xy, rc = g["tiles/xy"][:], g["tiles/rc"][:]
    assert len(xy) == summary.tiles_tissue > 5
    tissue = tissue_on_map(cfg.out)
    covered = np.zeros(m.shape, bool)
    want_means = []
    for (x, y), (r, c) in zip(xy, rc):
        assert (x, y) == (c * 256, r * 256)
        sl = np.s_[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64]
        want = expected_block(reader, x, y, 0.5, 4)
        assert_block(m[sl], want, tissue[sl])
        want_means.append(want.mean())
        covered[sl] = True
    assert np.isnan(m[~covered]).all()  # background (non-tissue tiles) is NaN
    assert np.isfinite(m[covered & tissue]).all() and np.isnan(m[~tissue]).all()  # and glass inside tiles too
    assert 0 < (covered & ~tissue).sum()  # there was glass inside scored tiles to NaN
    # tile scores: the mean of the tile's whole map (glass included), as the model scored it; in the grid
    means = g["tiles/score_mean"][:]
    np.testing.assert_allclose(means, want_means, rtol=1e-5)
    grid = g["grid/score_mean"][:]
    assert grid.shape == (8, 8)
    np.testing.assert_array_equal(grid[rc[:, 0], rc[:, 1]], means)
    assert np.isnan(grid).sum() == 64 - len(rc)
    assert g["mask"].attrs["downsample"] > 0 and g["mask"][:].any()


def test_store_metadata_agrees_with_slide(probe_run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    cfg, summary = probe_run
    node = list(Reader(parse_url(str(cfg.out)))())[0]
    shapes = [d.shape for d in node.data]
    assert shapes == [(512, 512), (256, 256)]
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    # map pixel = 0.5 µm/px * 4 slide px; the extent in µm equals the slide's
    assert scales == [[2.0, 2.0], [4.0, 4.0]]
    for shp, sc in zip(shapes, scales):
        assert shp[0] * sc[0] == pytest.approx(2048 * 0.5, abs=sc[0])
    # the store is valid OME-NGFF 0.4 on Zarr format 2 (what QuPath 0.6 reads)
    import zarr
    from ome_zarr_models.v04 import Image

    group = zarr.open_group(str(cfg.out), mode="r")
    assert group.metadata.zarr_format == 2
    img = Image.from_zarr(group)
    assert [d.path for d in img.attributes.multiscales[0].datasets] == ["0", "1"]
    a = writers.read_attrs(cfg.out)
    assert a["complete"] is True and a["ngff"] == "0.4"
    assert a["slide"]["width"] == 2048 and a["slide"]["mpp"] == pytest.approx(0.5)
    assert len(a["slide"]["properties_sha256"]) == 64
    assert a["model"]["sha256"] == "0" * 64 and a["model"]["config"]["name"] == "tiny"
    assert a["tile_size"] == 256 and a["pixel_downsample"] == 4
    assert a["tiles"] == {"grid": 64, "n_rows": 8, "n_cols": 8, "tissue": summary.tiles_tissue, "failed": 0,
                          "scored": summary.tiles_tissue}
    assert a["start_time"] <= a["end_time"]
    assert a["package_version"]
    assert 0 < a["model_seconds"] <= a["seconds"]
    assert a["threshold"]["value"] is not None


def test_geojson_and_tiff_from_a_run(probe_run):
    import tifffile

    cfg, summary = probe_run
    g = writers.open_store(cfg.out)
    fc = json.loads(gzip.decompress(Path(cfg.outputs["geojson"]).read_bytes()))
    feats = fc["features"]
    assert len(feats) == summary.tiles_tissue
    xy, means = g["tiles/xy"][:], g["tiles/score_mean"][:]
    thr = writers.read_attrs(cfg.out)["threshold"]["value"]
    for f, (x, y), s in zip(feats, xy, means):
        assert f["geometry"]["coordinates"][0][0] == [int(x), int(y)]  # no bounds on this slide
        assert f["geometry"]["coordinates"][0][2] == [int(x) + 256, int(y) + 256]
        assert f["properties"]["objectType"] == "tile"
        assert f["properties"]["measurements"]["anomaly_score"] == pytest.approx(float(s))
        assert ("classification" in f["properties"]) == (s > thr)
    with tifffile.TiffFile(cfg.outputs["tiff"]) as tf:
        assert len(tf.pages[0].subifds) == 1
        np.testing.assert_array_equal(tf.series[0].levels[0].asarray(), g["0"][:])
        assert 'PhysicalSizeX="2.0"' in tf.ome_metadata
    assert Path(str(cfg.outputs["tiff"]).replace(".ome.tif", ".rgb.ome.tif")).is_file()
    assert Path(cfg.outputs["preview"]).stat().st_size > 10_000
    assert not list(Path(cfg.out).parent.glob(".*partial"))


def test_run_infer_returns_and_logs_but_never_prints(synthetic_slide, tmp_path, capfd, caplog):
    import logging

    cfg = cfg_for(synthetic_slide, tmp_path, geojson=tmp_path / "t.geojson")
    with caplog.at_level(logging.DEBUG, logger="wsi_haloae.infer.engine"):
        result = run_infer(cfg, loaded=probe())
        again = run_infer(with_(cfg, preview=tmp_path / "p.png"), loaded=probe())
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert result.status == "done" and again.status == "skipped" and again.written == ["preview"]
    assert result.line() in caplog.text and "wrote the missing preview" in again.line()
    # the slide's figures come from the store's attributes, for infer and cohort alike
    summary = writers.read_attrs(cfg.out)["summary"]
    assert result.summary == again.summary == summary
    scores = writers.open_store(cfg.out)["tiles/score_mean"][:]
    assert summary["tiles"] == result.tiles_tissue == len(scores)
    assert summary["score_max"] == pytest.approx(float(np.nanmax(scores)))
    assert 0 < summary["tissue_fraction"] < 1 and summary["anomalous_tiles"] >= 0
    assert set(result.outputs) == {"zarr", "geojson"} and set(again.outputs) == {"zarr", "geojson", "preview"}


def test_ngff_05_on_zarr_3_holds_the_same_result(synthetic_slide, tmp_path, probe_run):
    import zarr
    from ome_zarr_models.v05 import Image

    cfg = cfg_for(synthetic_slide, tmp_path, ngff="0.5", geojson=tmp_path / "t.geojson")
    result = run_infer(cfg, loaded=probe())
    group = zarr.open_group(str(cfg.out), mode="r")
    assert group.metadata.zarr_format == 3 and (Path(cfg.out) / "zarr.json").is_file()
    img = Image.from_zarr(group)
    assert [d.path for d in img.ome_attributes.multiscales[0].datasets] == ["0", "1"]
    assert group["0"].metadata.dimension_names == ("y", "x")
    assert writers.is_complete(cfg.out) and writers.read_attrs(cfg.out)["ngff"] == "0.5"
    ref_cfg, ref = probe_run
    ref_g = writers.open_store(ref_cfg.out)
    for a, b in zip(writers.map_levels(writers.open_store(cfg.out)), writers.map_levels(ref_g)):
        np.testing.assert_array_equal(a[:], b[:])
    assert result.summary == ref.summary
    assert run_infer(cfg, loaded=probe()).status == "skipped"  # completeness is read from zarr.json


def test_a_complete_store_of_another_slide_or_model_is_not_taken_for_this_run(synthetic_slide, tmp_path):
    from wsi_haloae.slide.synthetic import write_synthetic_slide

    cfg = cfg_for(synthetic_slide, tmp_path)
    run_infer(cfg, loaded=probe())
    other = write_synthetic_slide(tmp_path / "other.tif", width=1024, height=1024, mpp=0.5, seed=3)
    with pytest.raises(OutputError, match="made from another slide"):
        run_infer(with_(cfg, slide=other), loaded=probe())
    m = probe()
    m.sha256 = "1" * 64
    with pytest.raises(OutputError, match="made by another model"):
        run_infer(cfg, loaded=m)
    assert run_infer(with_(cfg, slide=other, overwrite=True), loaded=m).status == "done"


@pytest.mark.parametrize("downsample", [1, 8])
def test_pixel_downsample(synthetic_slide, tmp_path, downsample):
    cfg = cfg_for(synthetic_slide, tmp_path, pixel_downsample=downsample)
    run_infer(cfg, loaded=probe())
    g = writers.open_store(cfg.out)
    b = 256 // downsample
    levels = writers.map_levels(g)
    assert levels[0].shape == (2048 // downsample,) * 2
    assert max(levels[-1].shape) <= writers.MIN_LEVEL_SIZE
    scale0 = g.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale0 == [0.5 * downsample] * 2
    reader = SlideReader(synthetic_slide)
    tissue = tissue_on_map(cfg.out)
    for i in (0, g["tiles/xy"].shape[0] // 2):
        (x, y), (r, c) = g["tiles/xy"][i], g["tiles/rc"][i]
        sl = np.s_[r * b:(r + 1) * b, c * b:(c + 1) * b]
        assert_block(levels[0][sl], expected_block(reader, x, y, 0.5, downsample), tissue[sl])


def test_target_mpp_coarser_than_the_slide(tmp_path):
    """A 0.25 µm/px slide run by a 0.5 µm/px model: tiles come from pyramid level 1; scales follow."""
    from wsi_haloae.slide.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "fine.tif", width=2048, height=1536, mpp=0.25)
    cfg = cfg_for(slide, tmp_path)
    s = run_infer(cfg, loaded=probe(mpp=0.5))
    a = writers.read_attrs(cfg.out)
    assert a["target_mpp"] == 0.5 and a["level0_tile"] == pytest.approx(512)
    g = writers.open_store(cfg.out)
    assert g["0"].shape == (1536 // 8, 2048 // 8)
    assert g.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [2.0, 2.0]
    assert s.mpp == 0.5 and s.tiles_tissue > 0
    # --mpp overrides the model's mpp
    s2 = run_infer(with_(cfg, out=tmp_path / "o2.zarr", mpp=0.25), loaded=probe(mpp=0.5))
    assert writers.open_store(tmp_path / "o2.zarr")["0"].shape == (1536 // 4, 2048 // 4)
    assert s2.mpp == 0.25


def test_complete_output_is_skipped_incomplete_is_redone(synthetic_slide, tmp_path):
    cfg = cfg_for(synthetic_slide, tmp_path)
    first = run_infer(cfg, loaded=probe())
    stamp = writers.read_attrs(cfg.out)["end_time"]
    ref = writers.open_store(cfg.out)["0"][:]
    again = run_infer(with_(cfg, geojson=tmp_path / "late.geojson"), loaded=probe())
    assert again.status == "skipped" and first.status == "done"
    assert writers.read_attrs(cfg.out)["end_time"] == stamp  # left alone
    assert (tmp_path / "late.geojson").is_file()  # a newly requested extra is made from the existing store
    # an output without its marker (killed during a previous run's rename) and a stale temp dir: redone
    (Path(cfg.out) / writers.MARKER).unlink()
    stale = partial_name(cfg.out)
    stale.mkdir()
    (stale / "junk").write_text("x")
    redone = run_infer(cfg, loaded=probe())
    assert redone.status == "done" and writers.is_complete(cfg.out) and not stale.exists()
    np.testing.assert_array_equal(writers.open_store(cfg.out)["0"][:], ref)
    assert run_infer(with_(cfg, overwrite=True), loaded=probe()).status == "done"


def _corrupt_level0_tiles(path: Path, which) -> int:
    """Overwrite the start of chosen level-0 JPEG tiles (grid row-major) with zeros: undecodable tiles."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        ncols = -(-page.imagewidth // page.tilewidth)
        offsets = page.dataoffsets
    n = 0
    with open(path, "r+b") as f:
        for r, c in which:
            f.seek(offsets[r * ncols + c])
            f.write(b"\0" * 64)
            n += 1
    return n


def test_corrupt_tiles_recorded_missing_or_slide_refused(synthetic_slide, tmp_path):
    ref = cfg_for(synthetic_slide, tmp_path / "ref")
    run_infer(ref, loaded=probe())
    rc = writers.open_store(ref.out)["tiles/rc"][:]
    one = tmp_path / "one_bad.tif"
    shutil.copy(synthetic_slide, one)
    _corrupt_level0_tiles(one, [tuple(rc[0])])
    cfg = cfg_for(one, tmp_path, max_failed_fraction=0.1)
    s = run_infer(cfg, loaded=probe())
    assert s.tiles_failed == 1 and writers.is_complete(cfg.out)
    g = writers.open_store(cfg.out)
    r, c = rc[0]
    assert np.isnan(g["0"][r * 64:(r + 1) * 64, c * 64:(c + 1) * 64]).all()
    assert np.isnan(g["tiles/score_mean"][0]) and not g["tiles/ok"][0] and g["tiles/ok"][1:].all()
    assert writers.read_attrs(cfg.out)["tiles"]["failed"] == 1
    # half the tissue unreadable: the slide is refused, nothing complete is left behind
    half = tmp_path / "half_bad.tif"
    shutil.copy(synthetic_slide, half)
    _corrupt_level0_tiles(half, [tuple(x) for x in rc[len(rc) // 2:]])
    bad = cfg_for(half, tmp_path, out=tmp_path / "half.zarr", geojson=tmp_path / "half.geojson")
    with pytest.raises(BadSlideError, match="could not be read"):
        run_infer(bad, loaded=probe())
    assert not Path(bad.out).exists() and not partial_name(bad.out).exists()
    assert not Path(bad.outputs["geojson"]).exists()


def test_errors_are_user_errors_without_marker(synthetic_slide, tmp_path):
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all")
    with pytest.raises(BadSlideError, match="junk.svs"):
        run_infer(cfg_for(junk, tmp_path), loaded=probe())
    assert not (tmp_path / "o.zarr").exists()
    pickle_like = tmp_path / "model.pth"
    pickle_like.write_bytes(b"\x80\x04\x95" + b"\0" * 200)
    with pytest.raises(BadModelFileError, match="model.pth"):
        run_infer(cfg_for(synthetic_slide, tmp_path, model=pickle_like))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="a_file"):
        run_infer(cfg_for(synthetic_slide, tmp_path, out=blocker / "o.zarr"), loaded=probe())
    with pytest.raises(OutputError):
        run_infer(cfg_for(synthetic_slide, tmp_path, preview=blocker / "p.png"), loaded=probe())
    assert not (tmp_path / "o.zarr").exists()


def test_cli_error_is_one_line(tmp_path):
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"nope")
    p = subprocess.run([sys.executable, "-m", "wsi_haloae.cli", "infer", str(junk), "--model", str(tmp_path / "m"),
                        "--out", str(tmp_path / "o.zarr")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model file" in lines[0]
    assert not (tmp_path / "o.zarr").exists()


def test_slide_with_bounds_offset(synthetic_slide, tmp_path):
    """A MIRAX-like slide whose non-empty region starts at (bounds-x, bounds-y): the map covers the bounds
    region from its origin, tiles land at (level-0 − origin) / 4, and GeoJSON is in QuPath's cropped frame."""
    from wsi_haloae.slide.reader import open_slide

    slide = tmp_path / "bounded.tif"
    shutil.copy(synthetic_slide, slide)  # its own path: its own cached reader, patched below
    r = open_slide(slide)
    r.properties.update({"openslide.bounds-x": "100", "openslide.bounds-y": "60",
                         "openslide.bounds-width": "1800", "openslide.bounds-height": "1900"})
    r.bounds = r._bounds()
    assert r.bounds == (100, 60, 1800, 1900)
    cfg = cfg_for(slide, tmp_path, geojson=tmp_path / "t.geojson", workers=0)  # workers=0: this process's reader
    run_infer(cfg, loaded=probe())
    g = writers.open_store(cfg.out)
    m = g["0"][:]
    assert m.shape == (475, 450)
    a = writers.read_attrs(cfg.out)
    assert a["map"]["origin_level0"] == [100.0, 60.0] and a["geojson"]["offset"] == [100, 60]
    xy, rc = g["tiles/xy"][:], g["tiles/rc"][:]
    assert (xy[:, 0] == 100 + rc[:, 1] * 256).all() and (xy[:, 1] == 60 + rc[:, 0] * 256).all()
    (x, y), (row, col) = xy[0], rc[0]
    sl = np.s_[row * 64:(row + 1) * 64, col * 64:(col + 1) * 64]
    assert_block(m[sl], expected_block(r, x, y, 0.5, 4, fill=tuple(a["background"])), tissue_on_map(cfg.out)[sl])
    feats = json.loads((tmp_path / "t.geojson").read_text())["features"]
    assert feats[0]["geometry"]["coordinates"][0][0] == [int(x) - 100, int(y) - 60]


def test_pixel_downsample_must_tile_the_map(synthetic_slide, tmp_path):
    from wsi_haloae.errors import BadInputError

    for d in (3, 512):
        with pytest.raises(BadInputError, match="pixel-downsample"):
            run_infer(cfg_for(synthetic_slide, tmp_path, pixel_downsample=d), loaded=probe())
    assert not (tmp_path / "o.zarr").exists()


# -- maps (issue 12): edge tiles, overlap blending, NaN off tissue, resolution rules, no tissue ----------------

def _hann(i: int, b: int) -> float:
    return math.sin(math.pi * (i + 0.5) / b) ** 2


def _bounded_copy(synthetic_slide: Path, tmp: Path, bounds=(100, 60, 1500, 1400)) -> tuple[Path, SlideReader]:
    """The synthetic slide under its own path with a MIRAX-like bounds region whose sides are not multiples of
    a tile and which cuts through the tissue (read in this process: run with workers=0)."""
    from wsi_haloae.slide.reader import open_slide

    slide = tmp / "bounded.tif"
    shutil.copy(synthetic_slide, slide)
    r = open_slide(slide)
    bx, by, bw, bh = bounds
    r.properties.update({"openslide.bounds-x": str(bx), "openslide.bounds-y": str(by),
                         "openslide.bounds-width": str(bw), "openslide.bounds-height": str(bh)})
    r.bounds = r._bounds()
    assert r.bounds == bounds
    return slide, r


@pytest.mark.parametrize("overlap", [0.0, 0.5])
def test_overlap_blend_and_edge_tiles_exact_end_to_end(synthetic_slide, tmp_path, overlap):
    """run_infer with a probe model at overlap 0 and 0.5 on a slide whose bounds region ends inside the last
    tiles: every level-0 map pixel equals Σ w·map / Σ w over the windows that cover it, each window's map being
    the probe's map of that window read padded with the slide's glass, the weights the pixel-centred Hann
    written out with math.sin, then NaN off the tissue mask. So placement, blending at borders and at the
    slide's edges, padding and NaN are all exact; tile scores are each tile's own window's."""
    from wsi_haloae.slide.grid import build_grid, plan_windows

    slide, r = _bounded_copy(synthetic_slide, tmp_path)
    cfg = cfg_for(slide, tmp_path, overlap=overlap, geojson=tmp_path / "t.geojson", preview=tmp_path / "p.png")
    result = run_infer(cfg, loaded=probe())
    g, a = writers.open_store(cfg.out), writers.read_attrs(cfg.out)
    got = g["0"][:]
    assert got.shape == (350, 375)  # ceil(1400 / 4) x 1500 / 4: cropped to the bounds region

    # the windows, planned independently of the engine (same rules), read and scored by hand
    grid = build_grid(r, 0.5, min_tissue=0.1, cover_edges=True)
    win = plan_windows(grid, overlap)
    k, b = win.per_tile, 64
    assert (grid.n_rows, grid.n_cols) == (6, 6) and a["windows"] == {"n": len(win), "per_tile": k, "failed": 0}
    assert a["overlap"] == overlap and a["cover_edges"] is True and a["background"] == list(grid.background)
    num = np.zeros(got.shape)
    den = np.zeros(got.shape)
    w1 = np.array([_hann(i, b) if k > 1 else 1.0 for i in range(b)])
    maps = []
    for x, y in zip(win.xs, win.ys):
        blk = expected_block(r, int(x), int(y), 0.5, 4, fill=grid.background)
        maps.append(blk)
        mx, my = (int(x) - 100) // 4, (int(y) - 60) // 4
        assert (mx * 4 + 100, my * 4 + 60) == (x, y)
        ys, xs = slice(my, min(my + b, got.shape[0])), slice(mx, min(mx + b, got.shape[1]))
        h, w = ys.stop - ys.start, xs.stop - xs.start
        wt = np.outer(w1[:h], w1[:w])
        num[ys, xs] += wt * blk[:h, :w]
        den[ys, xs] += wt
    with np.errstate(invalid="ignore"):
        want = np.where(den > 0, num / den, np.nan)
    tissue = tissue_on_map(cfg.out)
    want[~tissue] = np.nan
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)  # NaN exactly where expected, values elsewhere
    assert np.isfinite(got).sum() > 0.2 * got.size
    # slide edges: the last map row and column (partial tiles, read padded) are scored where there is tissue
    assert np.isfinite(got[-1]).any() and np.isfinite(got[:, -1]).any()

    # tile tables stay on the grid: one row per kept tile, scored by its own window
    xy, means, mxs = g["tiles/xy"][:], g["tiles/score_mean"][:], g["tiles/score_max"][:]
    np.testing.assert_array_equal(xy, np.stack([grid.xs, grid.ys], axis=1))
    own = [maps[j] for j in win.tile_window]
    np.testing.assert_allclose(means, [m.mean() for m in own], rtol=1e-5)
    np.testing.assert_allclose(mxs, [m.max() for m in own], rtol=1e-5)
    edge = (xy[:, 0] + 256 > 1600) | (xy[:, 1] + 256 > 1460)
    assert edge.any() and np.isfinite(means[edge]).all()  # edge tiles are scored
    assert result.tiles_tissue == len(grid) and result.windows == len(win)

    # the scored share of the tissue, and the GeoJSON's edge tiles clipped to the slide (QuPath's frame)
    assert a["map"]["scored_pixels"] == np.isfinite(got).sum() == round(a["map"]["scored_fraction"] * tissue.sum())
    assert a["map"]["tissue_pixels"] == tissue.sum() and a["map"]["scored_fraction"] > 0.95
    feats = json.loads((tmp_path / "t.geojson").read_text())["features"]
    corners = np.array([f["geometry"]["coordinates"][0][2] for f in feats])
    assert corners[:, 0].max() == 1500 and corners[:, 1].max() == 1400
    if overlap:
        assert len(win) > 2 * len(grid) and result.line().count("windows at overlap 0.5") == 1


def test_overlap_0_and_0_5_agree_on_tile_scores(synthetic_slide, tmp_path):
    """A tile's score is its own window's: the same with and without overlap (the calibration depends on it)."""
    a = run_infer(cfg_for(synthetic_slide, tmp_path, out=tmp_path / "a.zarr"), loaded=probe())
    b = run_infer(cfg_for(synthetic_slide, tmp_path, out=tmp_path / "b.zarr", overlap=0.5), loaded=probe())
    ga, gb = writers.open_store(a.out), writers.open_store(b.out)
    np.testing.assert_array_equal(ga["tiles/xy"][:], gb["tiles/xy"][:])
    np.testing.assert_allclose(ga["tiles/score_mean"][:], gb["tiles/score_mean"][:], rtol=1e-6)
    assert b.windows > a.windows == a.tiles_tissue == b.tiles_tissue


def _glass_slide(path: Path) -> Path:
    from wsi_haloae.slide.synthetic import SyntheticSlideSpec, write_synthetic_slide

    return write_synthetic_slide(path, SyntheticSlideSpec(width=1100, height=700, mpp=0.5, islands=()))


def test_no_tissue_is_a_complete_empty_result(tmp_path, caplog):
    import logging

    slide = _glass_slide(tmp_path / "glass.tif")
    cfg = cfg_for(slide, tmp_path, tiff=tmp_path / "g.ome.tif", geojson=tmp_path / "g.geojson",
                  preview=tmp_path / "g.png")
    with caplog.at_level(logging.INFO, logger="wsi_haloae.infer.engine"):
        result = run_infer(cfg, loaded=probe())
    assert result.status == result.outcome == "no tissue" and result.tiles_tissue == 0
    assert "no tissue (0 of 15 grid tiles have >= 0.1 tissue)" in result.line()
    warn = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warn] == [f"{slide}: no tissue found (0 of 15 grid tiles have >= 0.1 tissue); "
                                              "check the slide or lower --min-tissue"]
    assert writers.is_complete(cfg.out)
    g, a = writers.open_store(cfg.out), writers.read_attrs(cfg.out)
    assert a["status"] == "no tissue" and a["tiles"]["tissue"] == 0 and a["summary"]["tiles"] == 0
    assert a["summary"]["score_max"] is None and a["threshold"]["value"] is None
    assert np.isnan(g["0"][:]).all() and g["0"].nchunks_initialized == 0
    assert g["tiles/xy"].shape == (0, 2) and g["tiles/score_mean"].shape == (0,)
    assert np.isnan(g["grid/score_mean"][:]).all() and g["grid/score_mean"].shape == (3, 5)
    assert json.loads((tmp_path / "g.geojson").read_text())["features"] == []
    assert (tmp_path / "g.png").stat().st_size > 5000 and Path(cfg.outputs["tiff"]).is_file()
    # a rerun leaves it alone and still says what it is
    again = run_infer(cfg, loaded=probe())
    assert again.status == "skipped" and again.outcome == "no tissue" and "(no tissue)" in again.line()


def test_cli_no_tissue_exits_0_and_overlap_is_checked(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from wsi_haloae.cli import main
    from wsi_haloae.model import checkpoint

    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: probe())
    slide = _glass_slide(tmp_path / "glass.tif")
    args = ["infer", str(slide), "--model", str(tmp_path / "m.safetensors"), "--workers", "0"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o.zarr")])
    assert res.exit_code == 0, res.output
    assert "no tissue (0 of 15 grid tiles" in res.stderr
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "p.zarr"), "--overlap", "0.3"])
    assert res.exit_code == 2 and res.stderr.startswith("error: --overlap 0.3: use one of 0, 0.5, 0.75, 0.875")
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "p.zarr"), "--mpp", "1", "--magnification", "20x"])
    assert res.exit_code == 2 and "not both" in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "p.zarr").exists()


def _flat_tissue_image(path: Path, size=(700, 600)) -> Path:
    """A flat PNG of real tissue: a slide that records no resolution."""
    from PIL import Image

    from wsi_haloae.slide.synthetic import Disc, SyntheticSlideSpec, render_region

    w, h = size
    spec = SyntheticSlideSpec(width=w, height=h, islands=(Disc(w / 2, h / 2, 0.45 * min(w, h)),))
    Image.fromarray(render_region(spec, 0, 0, w, h)).save(path)
    return path


def test_resolution_rules_in_infer(tmp_path, caplog):
    """No mpp: refused naming --slide-mpp; declared: scored at the right scale with the right physical size;
    a target > 4x finer than level 0 refused before anything is planned; > 10 % from the model's mpp: a warning."""
    import logging

    import tifffile

    from wsi_haloae.errors import BadInputError

    flat = _flat_tissue_image(tmp_path / "flat.png")
    cfg = cfg_for(flat, tmp_path, tiff=tmp_path / "f.ome.tif")
    with pytest.raises(BadSlideError, match=r"flat\.png does not record its resolution.*--slide-mpp"):
        run_infer(cfg, loaded=probe())
    assert not Path(cfg.out).exists() and not partial_name(cfg.out).exists()
    # declared at 0.25 µm/px, model at 0.5: read at scale 2, map pixel = 0.25 * 2 * 4 = 2 µm
    s = run_infer(with_(cfg, slide_mpp=0.25), loaded=probe(mpp=0.5))
    a = writers.read_attrs(cfg.out)
    assert s.status == "done" and s.tiles_tissue > 0 and a["level0_tile"] == 512
    assert a["resolution"] == {"target_mpp": 0.5, "slide_mpp": 0.25, "source": "model", "slide_mpp_declared": True,
                               "warnings": []}
    assert a["map"]["um_per_px"] == 2.0 and writers.open_store(cfg.out)["0"].shape == (75, 88)
    with tifffile.TiffFile(cfg.outputs["tiff"]) as tf:
        assert 'PhysicalSizeX="2.0"' in tf.ome_metadata
    # --magnification is --mpp by another name; --mpp 0.001 (500x finer) is refused before any tile is planned
    s = run_infer(cfg_for(flat, tmp_path, out=tmp_path / "m.zarr", slide_mpp=0.25, magnification="20x"),
                  loaded=probe(mpp=0.5))
    assert writers.read_attrs(s.out)["resolution"]["source"] == "--magnification" and s.mpp == 0.5
    with pytest.raises(BadInputError, match="more than 4x finer than the slide's level 0"):
        run_infer(cfg_for(flat, tmp_path, out=tmp_path / "x.zarr", slide_mpp=0.25, mpp=0.001), loaded=probe())
    assert not (tmp_path / "x.zarr").exists()
    # a target the model was not trained at: scored, with a warning that says so (recorded in the store)
    with caplog.at_level(logging.WARNING, logger="wsi_haloae.infer.engine"):
        s = run_infer(cfg_for(flat, tmp_path, out=tmp_path / "w.zarr", slide_mpp=0.5, mpp=1.0), loaded=probe(mpp=0.5))
    msg = "scoring at 1 µm/px but the model was trained at 0.5 µm/px"
    assert s.status == "done" and any(msg in r.getMessage() for r in caplog.records)
    assert msg in writers.read_attrs(s.out)["resolution"]["warnings"][0]
