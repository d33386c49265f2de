"""Cut&Paste: only the pasted region changes, sizes follow DESIGN.md section 4, and samples are reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.data import immunohistochemistry

from wsi_haloae.train.cutpaste import color_jitter, cutpaste_normal, cutpaste_scar


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these are many tiny tensor ops: with 2 intra-op threads on a busy 2-core machine they wait on each other
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tile() -> torch.Tensor:
    arr = immunohistochemistry()[100:356, 150:406]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("fn", [cutpaste_normal, cutpaste_scar])
def test_changes_only_inside_pasted_region(tile, fn):
    changed_somewhere = 0
    for seed in range(30):
        out, mask = fn(tile, torch.Generator().manual_seed(seed))
        assert out.shape == tile.shape and mask.shape == tile.shape[1:]
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        diff = (out != tile).any(0)
        assert not (diff & ~mask).any(), f"seed {seed}: pixels changed outside the pasted region"
        changed_somewhere += int(diff.any())
    assert changed_somewhere >= 27  # something is really pasted (identical only by rare coincidence)


def test_normal_patch_size_and_aspect(tile):
    h, w = tile.shape[1:]
    fracs, aspects = [], []
    for seed in range(80):
        _, mask = cutpaste_normal(tile, torch.Generator().manual_seed(seed))
        ys, xs = torch.nonzero(mask, as_tuple=True)
        ph, pw = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert ph * pw == int(mask.sum())  # a rectangle
        fracs.append(mask.sum().item() / (h * w))
        aspects.append(pw / ph)
    assert 0.018 <= min(fracs) and max(fracs) <= 0.155
    assert min(aspects) >= 0.28 and max(aspects) <= 3.5
    assert min(aspects) < 0.5 and max(aspects) > 2  # the log-uniform range is really used


def test_scar_is_thin_and_rotated(tile):
    sizes, tilted = [], 0
    for seed in range(40):
        _, mask = cutpaste_scar(tile, torch.Generator().manual_seed(seed))
        n = int(mask.sum())
        sizes.append(n)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        bh, bw = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        tilted += int(bh * bw > n * 1.3)  # a rotated strip does not fill its bounding box
        assert max(bh, bw) <= 36  # 25 px long at most (+ rotation rounding)
    assert 2 * 10 * 0.7 <= min(sizes) and max(sizes) <= 16 * 25 * 1.2
    assert tilted > 20


def test_reproducible_from_generator(tile):
    a, ma = cutpaste_scar(tile, torch.Generator().manual_seed(7))
    b, mb = cutpaste_scar(tile, torch.Generator().manual_seed(7))
    c, _ = cutpaste_scar(tile, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and torch.equal(ma, mb) and not torch.equal(a, c)


def test_color_jitter_is_bounded(tile):
    out = color_jitter(tile, 0.1, torch.Generator().manual_seed(0))
    assert out.shape == tile.shape and not torch.equal(out, tile)
    assert (out - tile).abs().mean() < 0.1
    assert torch.equal(color_jitter(tile, 0.0, torch.Generator()), tile)
