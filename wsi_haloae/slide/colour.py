"""Colour QC of a slide: are its colours those of the stain the model was trained on?

Stain normalisation (``wsi_haloae.model.stain``) maps moderate stain differences onto the training
reference; it cannot turn a fluorescence image, a grey-scale scan, a slide decoded in false colours or a
different stain into the training stain. This check says so instead of letting such slides be scored
silently. It runs on the low-resolution image the tissue mask comes from (``TileGrid.lowres`` and
``TileGrid.mask``), so it costs a fraction of a second and no extra reading.

Checks, in order (the first that fails is the reason; measured thresholds: ``benchmarks/bench_stain_qc.py``
and docs/stain.md):

1. dark background: median luminance below ``DARK_MEDIAN_LUMINANCE`` (fluorescence, inverted image);
   brightfield images, glass or not, are bright.
2. grey-scale: the 99th percentile of chroma (max − min of R, G, B) below ``GREY_CHROMA``.
3. coloured background: the brightest tenth of the image (glass, or the palest tissue) has a median chroma
   above ``BACKGROUND_CHROMA`` (false colours: the DICOM copy of CMU-1 that OpenSlide decodes with pink glass).
4. too little stained tissue to estimate stain vectors (fewer than ``MIN_STAINED_PIXELS``).
5. stain vectors (Macenko on the tissue pixels) further than ``MAX_ANGLE_DEG`` from the model's reference
   (hematoxylin 30°, eosin 20°: the same limits beyond which the normaliser leaves a tile unchanged).

numpy only (no torch: ``slide/`` never imports it). The estimator mirrors ``model/stain.py``'s (same OD
convention, stain threshold, percentiles and hematoxylin-first rule), so angles from both are comparable; a
test holds the two to the same vectors on the same tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Kept equal to wsi_haloae.model.stain (tests/test_stain_qc.py checks it): OD threshold, angle percentile.
BETA = 0.15
ALPHA = 1.0
#: Macenko et al.'s reference stain vectors (columns H, E), for models without a fitted reference.
DEFAULT_STAIN_MATRIX = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
#: Largest angle (degrees) between a slide's and the reference's hematoxylin / eosin vector still "ok".
MAX_ANGLE_DEG = {"hematoxylin": 30.0, "eosin": 20.0}

DARK_MEDIAN_LUMINANCE = 0.30
GREY_CHROMA = 0.04
BACKGROUND_CHROMA = 0.25
MIN_STAINED_PIXELS = 100
#: At most this many tissue pixels go into the estimate (a regular subsample beyond it).
MAX_PIXELS = 1_000_000

WARNING = "colours unlike the training slides; scores may not be comparable"

#: What the stain vectors were compared with, by ``ColourQC.reference`` (recorded beside it in outputs).
COMPARED_WITH = {
    "model": "the model's stain reference, fitted on its training tiles",
    "default": "Macenko's default H&E stain vectors",
    "none": "nothing: the model has no stain reference (a model file older than stain normalisation, or "
            "training tiles that did not look stained); brightfield checks only (dark background, grey-scale, "
            "coloured glass)",
}


@dataclass(frozen=True)
class ColourQC:
    """The colour check of one slide; ``to_dict()`` is what outputs record."""

    status: str  # "ok" | "unusual"
    reason: str | None  # why unusual (one clause), None when ok
    stain_distance: float | None  # degrees: the larger of the two angles below (None: not estimated)
    hematoxylin_angle: float | None  # degrees between the slide's and the reference's hematoxylin vector
    eosin_angle: float | None
    stain_vectors: np.ndarray | None = field(default=None, repr=False)  # (3, 2) estimated, columns H, E
    reference_vectors: np.ndarray | None = field(default=None, repr=False)  # (3, 2) compared with
    reference: str = "model"  # "model" (fitted on the training tiles) | "default" (Macenko's H&E) | "none" (see NO_REFERENCE)
    stained_pixels: int = 0  # low-resolution tissue pixels the stain estimate used
    median_luminance: float = 0.0
    background_rgb: tuple[int, int, int] = (0, 0, 0)  # median colour of the brightest tenth of the image

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def warning(self) -> str | None:
        """The one-line warning for logs and summaries, or None when ok."""
        return None if self.ok else f"{WARNING} ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        def vec(m: np.ndarray | None) -> dict[str, list[float]] | None:
            if m is None:
                return None
            return {"hematoxylin": [round(float(v), 4) for v in m[:, 0]], "eosin": [round(float(v), 4) for v in m[:, 1]]}

        def deg(v: float | None) -> float | None:
            return None if v is None else round(float(v), 2)

        return {
            "status": self.status,
            "reason": self.reason,
            "stain_distance": deg(self.stain_distance),
            "hematoxylin_angle": deg(self.hematoxylin_angle),
            "eosin_angle": deg(self.eosin_angle),
            "stain_vectors": vec(self.stain_vectors),
            "reference_vectors": vec(self.reference_vectors),
            "reference": self.reference,
            "compared_with": COMPARED_WITH[self.reference],
            "stained_pixels": int(self.stained_pixels),
            "median_luminance": round(float(self.median_luminance), 4),
            "background_rgb": [int(v) for v in self.background_rgb],
            "thresholds": {"max_angle_deg": dict(MAX_ANGLE_DEG), "dark_median_luminance": DARK_MEDIAN_LUMINANCE,
                           "grey_chroma": GREY_CHROMA, "background_chroma": BACKGROUND_CHROMA},
        }


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB → OD ``-ln((I + 1) / 256)`` (the convention of ``model/stain.py``), float64."""
    return np.log(256.0) - np.log1p(np.asarray(rgb, dtype=np.float64))


def estimate_stain_vectors(rgb: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray | None, int]:
    """Macenko stain vectors (3, 2) (unit columns: hematoxylin, eosin) of the stained pixels, and their count.

    ``rgb`` is uint8 (..., 3); ``mask`` (same leading shape) restricts the pixels. Returns (None, count) when
    fewer than ``MIN_STAINED_PIXELS`` pixels are stained or the two vectors cannot be told apart.
    """
    px = np.asarray(rgb).reshape(-1, 3)
    if mask is not None:
        px = px[np.asarray(mask, dtype=bool).reshape(-1)]
    if px.shape[0] > MAX_PIXELS:
        px = px[:: int(np.ceil(px.shape[0] / MAX_PIXELS))]
    od = optical_density(px)
    od = od[(od >= BETA).all(axis=1)]
    n = int(od.shape[0])
    if n < MIN_STAINED_PIXELS:
        return None, n
    _, vecs = np.linalg.eigh(np.cov(od.T))
    v = vecs[:, [2, 1]]
    if v[:, 0].sum() < 0:
        v[:, 0] = -v[:, 0]
    t = od @ v
    phi = np.arctan2(t[:, 1], t[:, 0])
    lo, hi = np.percentile(phi, [ALPHA, 100.0 - ALPHA])
    a = v @ np.array([np.cos(lo), np.sin(lo)])
    b = v @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([a, b], axis=1) if a[0] > b[0] else np.stack([b, a], axis=1)
    he = he / np.linalg.norm(he, axis=0, keepdims=True)
    if not np.isfinite(he).all() or angle_deg(he[:, 0], he[:, 1]) < 1.0:
        return None, n
    return he, n


def angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    cos = float(np.dot(u, v) / max(np.linalg.norm(u) * np.linalg.norm(v), 1e-12))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def colour_qc(lowres: np.ndarray, mask: np.ndarray, reference: np.ndarray | None = None, *,
              compare: bool = True) -> ColourQC:
    """Check a slide's colours: ``lowres`` RGB uint8 (h, w, 3) and its tissue ``mask`` (h, w) bool.

    ``reference``: the model's stain vectors (3, 2) (``model.stain.qc_reference()``), or None for Macenko's
    default H&E reference. ``compare=False`` (a model without a stain reference): checks 1-3 only; the stain
    vectors are estimated and recorded when possible but compared with nothing (``reference`` "none"). See
    the module docstring for the checks and thresholds.
    """
    rgb = np.asarray(lowres)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"colour_qc: expected an RGB image (h, w, 3), got shape {rgb.shape}")
    rgb = rgb[..., :3]
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"colour_qc: mask shape {mask.shape} does not match the image {rgb.shape[:2]}")
    ref_name = "none" if not compare else "model" if reference is not None else "default"
    ref = np.asarray(reference if reference is not None else DEFAULT_STAIN_MATRIX, dtype=np.float64)
    ref = ref / np.linalg.norm(ref, axis=0, keepdims=True)

    f = rgb.reshape(-1, 3).astype(np.float32) / 255.0
    if f.shape[0] > MAX_PIXELS:
        f = f[:: int(np.ceil(f.shape[0] / MAX_PIXELS))]
    luminance = f @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    chroma = f.max(axis=1) - f.min(axis=1)
    median_lum = float(np.median(luminance))
    bright = luminance >= np.percentile(luminance, 90)
    background = tuple(int(round(v)) for v in np.median(f[bright], axis=0) * 255)
    common = dict(reference_vectors=ref if compare else None, reference=ref_name, median_luminance=median_lum,
                  background_rgb=background)

    def unusual(reason: str, **kw: Any) -> ColourQC:
        return ColourQC("unusual", reason, kw.pop("stain_distance", None), kw.pop("hematoxylin_angle", None),
                        kw.pop("eosin_angle", None), **kw, **common)

    if median_lum < DARK_MEDIAN_LUMINANCE:
        return unusual(f"dark background (median luminance {median_lum:.2f}): fluorescence or an inverted image, not brightfield")
    if float(np.percentile(chroma, 99)) < GREY_CHROMA:
        return unusual("grey-scale image: no stain colour")
    bg_chroma = float(np.median(chroma[bright]))
    if bg_chroma > BACKGROUND_CHROMA:
        return unusual(f"the brightest areas (glass) are coloured, RGB {background}: false colours?")
    he, n = estimate_stain_vectors(rgb, mask)
    if not compare:
        return ColourQC("ok", None, None, None, None, stain_vectors=he, stained_pixels=n, **common)
    if he is None:
        return unusual(f"too little stained tissue to estimate its stain colours ({n} low-resolution pixels)", stained_pixels=n)
    h_ang, e_ang = angle_deg(he[:, 0], ref[:, 0]), angle_deg(he[:, 1], ref[:, 1])
    dist = max(h_ang, e_ang)
    angles = dict(stain_distance=dist, hematoxylin_angle=h_ang, eosin_angle=e_ang, stain_vectors=he, stained_pixels=n)
    off = [f"{name} {a:.0f}° from the training stain (limit {MAX_ANGLE_DEG[name]:.0f}°)"
           for name, a in (("hematoxylin", h_ang), ("eosin", e_ang)) if a > MAX_ANGLE_DEG[name]]
    if off:
        return unusual("; ".join(off), **angles)
    return ColourQC("ok", None, **angles, **common)


def grid_colour_qc(grid: Any, bounds: tuple[int, int, int, int], reference: np.ndarray | None = None, *,
                   compare: bool = True) -> ColourQC:
    """``colour_qc`` of a ``TileGrid``'s low-resolution image and tissue mask (what ``infer`` already read),
    cropped to the scanned ``bounds`` (a slide's unscanned margin is not its glass)."""
    from .grid import _bounds_box

    box = _bounds_box(grid.mask.shape, grid.mask_downsample, bounds)
    lowres = np.asarray(grid.lowres)[: grid.mask.shape[0], : grid.mask.shape[1]]
    return colour_qc(lowres[box], grid.mask[box], reference, compare=compare)
