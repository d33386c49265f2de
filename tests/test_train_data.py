"""A tiles folder made by ``wsi-haloae tiles`` trains on its tiles, not on its QC thumbnail."""

from __future__ import annotations

import numpy as np
from PIL import Image

from wsi_haloae.train.data import find_images


def test_find_images_skips_qc_thumbnails_and_partial_files(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("slide_0_0.png", "slide_256_0.png", "sub/slide_0_256.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "thumbnails").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "thumbnails" / "slide.png")
    (tmp_path / "slide_512_0.png.part").write_bytes(b"half")

    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]

    assert found == ["slide_0_0.png", "slide_256_0.png", "sub/slide_0_256.jpg"]


def test_a_tile_folder_named_thumbnails_is_still_read(tmp_path):
    # only a thumbnails/ folder *inside* the tile folder is QC output; the folder itself may have any name
    root = tmp_path / "thumbnails"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a.png")
    assert [p.name for p in find_images(root)] == ["a.png"]
