"""benchmarks/planted.py: every planted anomaly's mask is where its pixels changed, and the data split is disjoint.

Base tiles are real tissue (scikit-image's IHC image, in the wheel), so the tests need no ../shared.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.data import immunohistochemistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import planted  # noqa: E402

#: How far outside the mask a feathered rim may change pixels (px at 0.5 µm/px): blur fades in over 8 µm
#: (16 px, half of it outside the mask, measured radially, so a little more across an oblique edge).
RIM = {"foreign": 2, "crowding": 3, "ink": 3, "fold": 2, "blur": 12}


@pytest.fixture(scope="module")
def tiles() -> list[np.ndarray]:
    img = np.asarray(immunohistochemistry())[..., :3]
    return [img[y : y + 256, x : x + 256] for y, x in ((0, 0), (256, 256), (128, 200), (256, 0))]


@pytest.fixture(scope="module")
def sources() -> list[planted.Source]:
    from skimage.color import hed2rgb, rgb2hed

    img = np.asarray(immunohistochemistry())[..., :3]
    swapped = (np.clip(hed2rgb(rgb2hed(img)[..., [2, 1, 0]]), 0, 1) * 255).astype(np.uint8)
    return [planted.Source("swapped stains", swapped, 0.5)]


@pytest.mark.parametrize("kind", planted.KINDS)
def test_mask_is_where_the_pixels_changed(kind, tiles, sources):
    for seed, tile in enumerate(tiles):
        rng = np.random.default_rng(seed)
        p = planted.plant(kind, tile, rng, 0.5, sources)
        assert p.image.shape == tile.shape and p.image.dtype == np.uint8
        assert p.mask.shape == tile.shape[:2] and p.mask.dtype == bool
        changed = np.abs(p.image.astype(int) - tile.astype(int)).max(axis=2) > 0
        # nothing changes outside the mask but its feathered rim ...
        near = ndi.binary_dilation(p.mask, iterations=RIM[kind])
        assert not (changed & ~near).any(), f"{kind}: {int((changed & ~near).sum())} changed pixels outside the mask"
        # ... pixels with zero weight keep the base tile's exact bytes ...
        assert np.array_equal(p.image[p.alpha <= 0], tile[p.alpha <= 0])
        # ... and the mask is no larger than what was changed (a blur leaves flat pixels as they were)
        share = changed[p.mask].mean()
        assert share > (0.5 if kind == "blur" else 0.85), f"{kind}: only {share:.2f} of the mask changed"
        # a lesion of the advertised scale: a few % to half of the tile
        assert 0.004 < p.mask.mean() < 0.6, (kind, p.mask.mean())


@pytest.mark.parametrize("kind", planted.KINDS)
def test_planting_is_seeded(kind, tiles, sources):
    a = planted.plant(kind, tiles[0], np.random.default_rng(7), 0.5, sources)
    b = planted.plant(kind, tiles[0], np.random.default_rng(7), 0.5, sources)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)


def test_sizes_follow_microns_per_pixel(tiles, sources):
    """The same lesion in µm covers ~4x fewer pixels on a tile at 1 µm/px than at 0.5."""
    areas = {}
    for mpp in (0.5, 1.0):
        areas[mpp] = np.mean([planted.plant("blur", tiles[0], np.random.default_rng(s), mpp, sources).mask.sum() for s in range(8)])
    assert 2.5 < areas[0.5] / areas[1.0] < 6


def test_block_split_is_disjoint():
    rows = [{"x": x, "y": y} for y in range(0, 3072, 128) for x in range(0, 3072, 128)]
    train, test = planted._split_by_blocks(rows, block=1024, tile0=256)
    assert train and test

    def covered(rs):
        m = np.zeros((3072 + 256, 3072 + 256), bool)
        for r in rs:
            m[r["y"] : r["y"] + 256, r["x"] : r["x"] + 256] = True
        return m

    assert not (covered(train) & covered(test)).any()


def test_small_set_layout_and_masks(tmp_path):
    root = tmp_path / "set"
    man = planted.build_small_set(root, per_kind=1)
    assert man == planted.build_small_set(root, per_kind=1)  # built once, then read back
    for t in man["test"]:
        img = Image.open(root / t["file"])
        assert img.size == (256, 256)
        if t["kind"] == "good":
            continue
        mask = np.asarray(Image.open(root / "ground_truth" / t["kind"] / f"{Path(t['file']).stem}_mask.png")) > 127
        base = np.asarray(Image.open(root / t["base"]).convert("RGB")).astype(int)
        changed = np.abs(np.asarray(img.convert("RGB")).astype(int) - base).max(axis=2) > 0
        assert mask.any() and changed[mask].mean() > 0.5
    again = planted.build_small_set(tmp_path / "again", per_kind=1)
    assert again["test_sha256"] == man["test_sha256"]  # the evaluation set is a function of the seed
