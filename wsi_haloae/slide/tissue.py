"""Tissue detection on a low-resolution image of the slide.

1. HSV saturation (stained tissue is coloured, glass is grey-white), median-blurred; Otsu threshold on it,
   never below 0.05 (so a slide that is almost all glass does not get its noise split in two).
2. Hysteresis: pixels a little more saturated than the glass (glass level + 0.05) or clearly darker than it
   (HSV value 0.06 below the glass) count when connected to pixels above the Otsu threshold. Otsu on a
   slide with strong and pale stain often splits strong from pale rather than tissue from glass; this
   keeps the pale tissue attached to stained tissue.
3. A colour rule removes what saturation cannot tell from tissue (below).
4. Morphology: close (disk radius 2), drop objects and fill holes smaller than 0.01 mm².

Everything runs on an image of at most ``MAX_MASK_SIDE`` px on the long side, so time and memory do not
grow with the slide.

Colour rule (HSV, all in [0, 1]; brightfield stains):

- pen marks: hue 0.45-0.70 (green → cyan → blue) with saturation ≥ 0.30. H&E (hue ≈ 0.75-1.0 and
  0-0.05), DAB (≈ 0.05-0.12) and a pale hematoxylin counterstain (hue ≈ 0.6, saturation ≈ 0.15) fall
  outside it. Red pen cannot be told from eosin by colour and is kept.
- black ink and very dark debris: value < 0.15.
- glass: value > 0.90 with saturation < 0.10.

Fluorescence slides (dark background) are outside what this detects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .reader import SlideReader

#: Resolution we aim at for the mask (≈ 1.25x objective), in µm per mask pixel.
MASK_MPP = 8.0
MIN_MASK_SIDE = 512
MAX_MASK_SIDE = 2048  # bounds time (~1-2 s) and memory (~100 MB) of the detection on any slide
#: Objects (and holes) smaller than this many µm² are dropped (filled); 0.01 mm² ≈ a 100 µm square.
MIN_OBJECT_UM2 = 10_000.0

PEN_HUE = (0.45, 0.70)
PEN_MIN_SAT = 0.30
DARK_MAX_VALUE = 0.15
SAT_FLOOR = 0.05
#: A pixel at least this much darker (HSV value) than the glass is pale tissue when attached to stained tissue.
PALE_VALUE_MARGIN = 0.06


@dataclass
class TissueMask:
    mask: np.ndarray  # bool (h, w)
    downsample: float  # level-0 px per mask px
    threshold: float  # saturation threshold used
    image: np.ndarray  # the RGB uint8 low-resolution image it was computed from


def _remove_small_objects(m: np.ndarray, size: int) -> np.ndarray:
    from skimage import morphology

    try:
        return morphology.remove_small_objects(m, max_size=size)
    except TypeError:  # scikit-image < 0.26
        return morphology.remove_small_objects(m, min_size=size + 1)


def _remove_small_holes(m: np.ndarray, size: int) -> np.ndarray:
    from skimage import morphology

    try:
        return morphology.remove_small_holes(m, max_size=size)
    except TypeError:  # scikit-image < 0.26
        return morphology.remove_small_holes(m, area_threshold=size + 1)


def _hsv(rgb: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] as float32 via Pillow's C conversion (~10x faster than skimage's float64 one)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").convert("HSV"), dtype=np.float32) / 255.0


def colour_exclusions(rgb: np.ndarray, hsv: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pen-or-dark, glass-like) boolean masks from the colour rule in the module docstring."""
    hsv = _hsv(rgb) if hsv is None else hsv
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    pen = (h >= PEN_HUE[0]) & (h <= PEN_HUE[1]) & (s >= PEN_MIN_SAT)
    dark = v < DARK_MAX_VALUE
    glass = (v > 0.90) & (s < 0.10)
    return pen | dark, glass


def detect_tissue(rgb: np.ndarray, mask_mpp: float | None = None) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of an RGB uint8 image and the saturation threshold used.

    ``mask_mpp`` (µm per pixel of ``rgb``) scales the small-object and hole sizes; without it they are a
    fixed 0.01 % of the image area (at least 16 px).
    """
    from scipy import ndimage
    from skimage import filters, morphology
    hsv = _hsv(rgb)
    sat = ndimage.median_filter(np.round(hsv[..., 1] * 255).astype(np.uint8), size=5)  # denoise JPEG speckle
    val = ndimage.median_filter(np.round(hsv[..., 2] * 255).astype(np.uint8), size=3)
    if sat.max() == sat.min():
        t = 255.0
    else:
        t = float(filters.threshold_otsu(sat))
    t = max(t, SAT_FLOOR * 255)
    # Otsu often splits strongly stained tissue from pale tissue (weak hematoxylin, loose stroma) rather than
    # tissue from glass. Hysteresis: pale pixels count when connected to strongly stained ones, "pale" being
    # a saturation just above the glass level, or a value clearly darker than the glass.
    seeds = sat > t
    glass_px = ~seeds
    glass_sat = float(np.median(sat[glass_px])) if glass_px.any() else 0.0
    glass_val = float(np.median(val[glass_px])) if glass_px.any() else 255.0
    low = min(t, max(SAT_FLOOR * 255, min(t / 2, glass_sat + 0.05 * 255)))
    weak = (sat > low) | (val.astype(np.float32) < glass_val - PALE_VALUE_MARGIN * 255)
    labels, _ = ndimage.label(weak | seeds)
    keep = np.unique(labels[seeds])
    m = np.isin(labels, keep[keep > 0])
    bad, glass = colour_exclusions(rgb, hsv)
    m &= ~bad & ~glass
    m = morphology.closing(m, morphology.disk(2)).astype(bool)
    if mask_mpp:
        size = max(4, int(MIN_OBJECT_UM2 / mask_mpp**2))
    else:
        size = max(16, int(1e-4 * m.size))
    m = _remove_small_objects(m, size)
    m = _remove_small_holes(m, size)
    return m, t / 255.0


def mask_downsample(reader: SlideReader, level0_tile: float | None = None, level0_mpp: float | None = None) -> float:
    """Level-0 px per mask px: ≈ 8 µm/px, ≥ 8 mask px per tile side, long side within [512, 4096].

    ``level0_mpp`` stands in for a slide that does not record its mpp (the user's ``--mpp``).
    """
    W, H = reader.dimensions
    long = max(W, H)
    mpp = reader.mpp or level0_mpp
    ds = MASK_MPP / mpp if mpp else long / 2048
    if level0_tile:
        ds = min(ds, level0_tile / 8)
    ds = min(ds, long / MIN_MASK_SIDE)  # at least MIN_MASK_SIDE on the long side ...
    ds = max(ds, long / MAX_MASK_SIDE, 1.0)  # ... at most MAX_MASK_SIDE, never above level 0
    return float(ds)


def tissue_mask(reader: SlideReader, level0_tile: float | None = None, level0_mpp: float | None = None) -> TissueMask:
    """Read the slide at low resolution and detect tissue on it."""
    ds = mask_downsample(reader, level0_tile, level0_mpp)
    img = reader.read_lowres(ds)
    mpp = reader.mpp or level0_mpp
    m, t = detect_tissue(img, mpp * ds if mpp else None)
    return TissueMask(m, ds, t, img)


def tile_fractions(mask: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, size: float) -> np.ndarray:
    """Fraction of each level-0 square (x, y, size) that is tissue, via a summed-area table: O(tiles).

    The denominator is the whole square: the part of a square beyond the mask (beyond the slide) is not
    tissue, so an edge tile that is half outside the slide holds at most 0.5.
    """
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    h, w = mask.shape

    def edges(v: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = np.round(v / downsample).astype(np.int64)
        b = np.maximum(np.round((v + size) / downsample).astype(np.int64), a + 1)  # at least one mask px
        return a.clip(0, n), b.clip(0, n), b - a

    x0, x1, nx = edges(np.asarray(xs, dtype=np.float64), w)
    y0, y1, ny = edges(np.asarray(ys, dtype=np.float64), h)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (inside / (nx * ny)).astype(np.float32).clip(0, 1)


def tissue_coverage(mask: np.ndarray, downsample: float, xs: np.ndarray, ys: np.ndarray, size: float) -> float:
    """Fraction of the mask's tissue pixels that lie in at least one level-0 square (x, y, size).

    Same pixel rounding as ``tile_fractions``. Memory: one boolean image the size of the mask; time O(squares
    + mask) through a 2-D difference array.
    """
    total = int(mask.sum())
    if total == 0:
        return 1.0
    h, w = mask.shape
    diff = np.zeros((h + 1, w + 1), dtype=np.int32)
    xs = np.asarray(xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    x0 = np.round(xs / downsample).astype(np.int64)
    y0 = np.round(ys / downsample).astype(np.int64)
    x1 = np.maximum(np.round((xs + size) / downsample).astype(np.int64), x0 + 1).clip(0, w)
    y1 = np.maximum(np.round((ys + size) / downsample).astype(np.int64), y0 + 1).clip(0, h)
    x0, y0 = x0.clip(0, w), y0.clip(0, h)
    np.add.at(diff, (y0, x0), 1)
    np.add.at(diff, (y0, x1), -1)
    np.add.at(diff, (y1, x0), -1)
    np.add.at(diff, (y1, x1), 1)
    covered = np.cumsum(np.cumsum(diff, axis=0), axis=1)[:h, :w] > 0
    return float((covered & mask).sum() / total)
