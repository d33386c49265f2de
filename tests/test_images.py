"""Image files at their real bit depth (issue 13, case 7): 12-bit data in 16-bit samples and float TIFFs in
[0, 1] were read near-black, silently. One decoder (``wsi_haloae.images``) serves train, slide and evaluate."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from skimage.data import immunohistochemistry

from checks import one_line_error, sha256
from wsi_haloae.cli import main
from wsi_haloae.errors import BadSlideError, BadTilesError
from wsi_haloae.images import ImageReadError, read_image, read_rgb
from wsi_haloae.slide.reader import SlideReader
from wsi_haloae.train.data import load_tiles

IHC = immunohistochemistry()[:256, :256]  # real tissue, uint8
TRUTH = IHC.astype(np.float64) / 255  # what every deep version below encodes


def _close(a: np.ndarray) -> None:
    assert a.dtype == np.uint8 and a.shape == IHC.shape
    assert np.abs(a.astype(int) - IHC.astype(int)).max() <= 1  # rounding only: not darkened, not stretched


def _png16(path: Path, data: np.ndarray, sbit: int | None = None) -> Path:
    """A 16-bit RGB PNG (libpng via imagecodecs), with an sBIT chunk after IHDR when ``sbit`` is given."""
    import imagecodecs

    raw = imagecodecs.png_encode(data)
    if sbit is not None:
        chunk = b"sBIT" + bytes([sbit] * 3)
        ihdr_end = 8 + 8 + 13 + 4
        raw = raw[:ihdr_end] + struct.pack(">I", 3) + chunk + struct.pack(">I", zlib.crc32(chunk)) + raw[ihdr_end:]
    path.write_bytes(raw)
    return path


def test_12_bit_data_in_16_bit_tiff_is_scaled_by_its_depth(tmp_path):
    twelve = np.rint(TRUTH * 4095).astype(np.uint16)
    p = tmp_path / "t12.tif"
    tifffile.imwrite(p, twelve, photometric="rgb")
    img = read_image(p)
    _close(img.pixels)
    assert "16-bit samples scaled by 4095" in img.note and "read as 12-bit" in img.note


def test_stated_maximum_wins_over_the_data(tmp_path):
    """A dark 12-bit image (max 2000) stating MaxSampleValue 4095 is not stretched to 11 bits."""
    dark = np.rint(TRUTH * 0.45 * 4095).astype(np.uint16)
    p = tmp_path / "dark.tif"
    tifffile.imwrite(p, dark, photometric="rgb", extratags=[(281, "H", 1, 4095, True)])
    img = read_image(p)
    assert "from the file's MaxSampleValue tag" in img.note
    assert abs(img.pixels.mean() - 0.45 * IHC.mean()) < 1
    p16 = _png16(tmp_path / "dark.png", dark, sbit=12)
    img = read_image(p16)
    assert "sBIT chunk" in img.note and abs(img.pixels.mean() - 0.45 * IHC.mean()) < 1


def test_16_bit_png_full_depth_and_float_tiff(tmp_path):
    img = read_image(_png16(tmp_path / "full.png", np.rint(TRUTH * 65535).astype(np.uint16)))
    _close(img.pixels)
    assert "read as 16-bit" in img.note
    p = tmp_path / "f.tif"
    tifffile.imwrite(p, TRUTH.astype(np.float32), photometric="rgb")
    img = read_image(p)
    _close(img.pixels)
    assert img.note == "float samples read as [0, 1]"
    # 8-bit files are untouched and say nothing
    tifffile.imwrite(tmp_path / "u8.tif", IHC, photometric="rgb")
    img = read_image(tmp_path / "u8.tif")
    assert img.note is None and np.array_equal(img.pixels, IHC)


@pytest.mark.parametrize("data, why", [
    ((TRUTH * 255).astype(np.float32), r"float samples from 0 to 251, outside \[0, 1\]"),
    (np.where(TRUTH > 0.5, np.nan, TRUTH).astype(np.float32), "NaN or infinite float samples"),
    ((TRUTH * 1000 - 10).astype(np.int16), "signed samples"),
])
def test_samples_of_unknown_scale_are_refused(tmp_path, data, why):
    p = tmp_path / "odd.tif"
    tifffile.imwrite(p, data, photometric="rgb")
    with pytest.raises(ImageReadError, match=why):
        read_rgb(p)


def test_training_tiles_rescaled_with_one_warning(tmp_path, caplog):
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(3):
        tifffile.imwrite(folder / f"t{i}.tif", np.rint(TRUTH * 4095).astype(np.uint16), photometric="rgb")
    with caplog.at_level(logging.WARNING):
        ts = load_tiles(folder, progress=False)
    _close(ts.get(0))
    warnings = [r.getMessage() for r in caplog.records if "rescaled" in r.getMessage()]
    assert len(warnings) == 1 and "3 of 3 image(s) were not 8-bit" in warnings[0] and "12-bit" in warnings[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    tifffile.imwrite(bad / "f.tif", (TRUTH * 255).astype(np.float32), photometric="rgb")
    with pytest.raises(BadTilesError, match=r"none of the 1 image files could be read \(first: f.tif: float samples"):
        load_tiles(bad, progress=False)


@pytest.mark.parametrize("tiled", [False, True])  # tiled: OpenSlide opens it (generic-tiff) and keeps the high byte
def test_slides_with_deep_samples_read_right(tmp_path, tiled, caplog):
    p = tmp_path / "s.tif"
    kw = dict(tile=(64, 64)) if tiled else {}
    tifffile.imwrite(p, np.rint(TRUTH * 4095).astype(np.uint16), photometric="rgb", **kw)
    with caplog.at_level(logging.WARNING):
        r = SlideReader(p)
    _close(r.read_region(0, 0, 0, 256, 256))
    assert "read as 12-bit" in caplog.text


def test_slide_of_unknown_scale_is_one_line_exit_2_and_writes_nothing(tmp_path):
    p = tmp_path / "f.tif"
    tifffile.imwrite(p, (TRUTH * 255).astype(np.float32), photometric="rgb", tile=(64, 64))
    before = sha256(p)
    with pytest.raises(BadSlideError, match="float samples from 0 to 251"):
        SlideReader(p)
    out = tmp_path / "tiles"
    r = CliRunner().invoke(main, ["tiles", str(p), "--mpp", "0.5", "--out", str(out)])
    assert one_line_error(r, "float samples").startswith("error: cannot open slide")
    assert not out.exists() and sha256(p) == before


def test_tiles_command_on_a_12_bit_slide(tmp_path, caplog):
    p = tmp_path / "s12.tif"
    tifffile.imwrite(p, np.rint(TRUTH * 4095).astype(np.uint16), photometric="rgb")
    out = tmp_path / "tiles"
    with caplog.at_level(logging.WARNING):
        r = CliRunner().invoke(main, ["tiles", str(p), "--slide-mpp", "0.5", "--min-tissue", "0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "read as 12-bit" in caplog.text
    _close(read_rgb(out / "s12_0_0.png"))
