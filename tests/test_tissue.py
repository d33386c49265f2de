"""Tissue detection: against known synthetic tissue, the colour rule (pen, dark, glass), per-tile fractions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import shared_path
from wsi_haloae.slide.reader import SlideReader
from wsi_haloae.slide.synthetic import GLASS, SyntheticSlideSpec, _inside, _texture
from wsi_haloae.slide.tissue import colour_exclusions, detect_tissue, mask_downsample, tile_fractions, tissue_mask


def test_mask_matches_synthetic_islands(synthetic_slide):
    r = SlideReader(synthetic_slide)
    tm = tissue_mask(r, 256)
    h, w = tm.mask.shape
    assert 512 <= max(h, w) <= 4096
    spec = SyntheticSlideSpec.default(2048, 2048, 0.5)  # what the conftest fixture wrote
    xs = (np.arange(w) + 0.5) * tm.downsample
    ys = (np.arange(h) + 0.5) * tm.downsample
    truth = _inside(spec.islands, xs[None, :], ys[:, None])
    iou = (truth & tm.mask).sum() / (truth | tm.mask).sum()
    assert iou > 0.9, iou
    # the planted anomaly (stain-permuted tissue) is tissue too, not "pen"
    an = _inside(spec.anomalies, xs[None, :], ys[:, None]) & truth
    assert tm.mask[an].mean() > 0.95


def test_glass_only_gives_empty_mask():
    rng = np.random.default_rng(0)
    img = np.clip(GLASS.astype(np.int16) + rng.integers(-3, 4, (600, 600, 3)), 0, 255).astype(np.uint8)
    m, _ = detect_tissue(img, 8.0)
    assert not m.any()


def test_colour_rule():
    colours = {  # RGB: excluded?
        (225, 140, 190): False,  # eosin pink
        (110, 60, 150): False,  # hematoxylin purple
        (150, 100, 60): False,  # DAB brown
        (170, 180, 215): False,  # pale hematoxylin counterstain
        (40, 120, 100): True,  # green pen
        (40, 60, 170): True,  # blue pen
        (20, 20, 25): True,  # black ink
    }
    img = np.array([list(colours)], dtype=np.uint8)
    bad, glass = colour_exclusions(img)
    assert bad[0].tolist() == list(colours.values())
    assert not glass.any()
    bad, glass = colour_exclusions(np.array([[[245, 245, 247]]], np.uint8))
    assert glass.all() and not bad.any()


def test_pen_stroke_over_glass_and_tissue_is_not_tissue():
    tex = _texture()[:512, :512]
    img = np.empty((600, 900, 3), np.uint8)
    img[:] = GLASS
    img[44:556, 44:556] = tex  # real IHC tissue
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    d.line([(600, 80), (880, 520)], fill=(40, 120, 100), width=18)  # green pen on glass
    d.line([(620, 520), (880, 100)], fill=(40, 60, 170), width=18)  # blue pen on glass
    img = np.asarray(im)
    m, _ = detect_tissue(img, 8.0)
    assert m[44:556, 44:556].mean() > 0.9
    assert m[:, 580:].mean() < 0.01


@pytest.mark.shared
def test_real_pen_marks_thumbnail():
    """histolab's TCGA thumbnail with green pen: most pen pixels are not tissue, most H&E pixels are."""
    from skimage.color import rgb2hsv

    img = np.asarray(Image.open(shared_path("histolab-fixtures", "tests", "fixtures", "pil-images-rgb", "tcga-green-pen.png")).convert("RGB"))
    hsv = rgb2hsv(img)
    h, s = hsv[..., 0], hsv[..., 1]
    pen = (h > 0.47) & (h < 0.68) & (s > 0.35)  # independent, stricter definition of the ink
    he = ((h > 0.78) | (h < 0.02)) & (s > 0.3)
    m, _ = detect_tissue(img)
    assert pen.sum() > 1000 and he.sum() > 1000
    assert m[pen].mean() < 0.2
    assert m[he].mean() > 0.8


def test_tile_fractions_match_brute_force():
    rng = np.random.default_rng(1)
    mask = rng.random((50, 70)) > 0.6
    ds = 4.0
    xs = np.array([0, 40, 100, 200, 260])
    ys = np.array([0, 20, 60, 100, 180])
    got = tile_fractions(mask, ds, xs, ys, 20.0)
    for g, x, y in zip(got, xs, ys):
        sub = mask[int(y / ds):int((y + 20) / ds), int(x / ds):int((x + 20) / ds)]
        assert g == pytest.approx(sub.mean(), abs=1e-6)


def test_mask_downsample_bounds(synthetic_slide):
    r = SlideReader(synthetic_slide)
    ds = mask_downsample(r, 256)
    assert 1 <= ds <= 256 / 8 + 1e-9
    assert max(r.dimensions) / ds >= 512
