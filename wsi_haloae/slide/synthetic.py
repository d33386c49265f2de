"""Synthetic pyramidal slides built from real tissue, for the demo, tests and benchmarks.

A fresh machine has no real slide, but scikit-image ships a real IHC histology image
(``skimage.data.immunohistochemistry``, 512x512, no download). We mirror-tile it over the plane, cut
tissue "islands" out of a white glass background, and optionally plant an anomaly (a disc of the same
tissue with the stain channels permuted and darkened). The content is a pure function of the coordinates,
so any region at any pyramid level is rendered on its own: writing a 100k x 100k slide holds one tile in
memory at a time, and background tiles compress to almost nothing.

The file is a tiled TIFF with reduced-resolution levels as separate IFDs (what OpenSlide's generic-TIFF
reader sees as a pyramid) and TIFF resolution tags in centimetres, from which OpenSlide derives
``openslide.mpp-x``/``-y``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..fileio import atomic_output

GLASS = np.array([242, 240, 244], dtype=np.uint8)


@lru_cache(maxsize=1)
def _texture() -> np.ndarray:
    from skimage import data

    img = np.asarray(data.immunohistochemistry(), dtype=np.uint8)[..., :3]
    # 2x2 mirror so the mirror-tiled plane has no seams: period 1024
    top = np.concatenate([img, img[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))


@dataclass(frozen=True)
class Disc:
    """A disc in level-0 pixels."""

    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class SyntheticSlideSpec:
    width: int = 4096
    height: int = 4096
    mpp: float = 0.5
    islands: tuple[Disc, ...] = ()
    anomalies: tuple[Disc, ...] = ()
    tile: int = 256
    levels: int | None = None  # default: halve until the long side is <= 1024
    compression: str = "jpeg"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @staticmethod
    def default(width: int = 4096, height: int = 4096, mpp: float = 0.5, anomaly: bool = True,
                n_islands: int | None = None, seed: int = 0, **kw) -> "SyntheticSlideSpec":
        """Tissue islands filling ~35% of the slide; one anomaly disc inside the largest island."""
        rng = np.random.default_rng(seed)
        short = min(width, height)
        if n_islands is None:
            n_islands = max(1, int(round(width * height / (3000.0 ** 2))))
        islands = []
        # radius chosen so the islands cover ~35 % of the area
        r = float(np.sqrt(0.35 * width * height / (np.pi * n_islands)))
        r = min(r, 0.45 * short)
        gx = int(np.ceil(np.sqrt(n_islands * width / height)))
        gy = int(np.ceil(n_islands / gx))
        k = 0
        for j in range(gy):
            for i in range(gx):
                if k >= n_islands:
                    break
                cx = (i + 0.5) * width / gx + rng.uniform(-0.1, 0.1) * width / gx
                cy = (j + 0.5) * height / gy + rng.uniform(-0.1, 0.1) * height / gy
                rr = r * rng.uniform(0.8, 1.0)
                rr = min(rr, 0.48 * width / gx, 0.48 * height / gy)
                islands.append(Disc(cx, cy, rr))
                k += 1
        anomalies = ()
        if anomaly and islands:
            big = max(islands, key=lambda d: d.r)
            anomalies = (Disc(big.cx + 0.15 * big.r, big.cy - 0.1 * big.r, max(0.35 * big.r, 300.0 / mpp * 0.5)),)
        return SyntheticSlideSpec(width, height, mpp, tuple(islands), anomalies, seed=seed, **kw)


def _inside(discs: tuple[Disc, ...], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    m = np.zeros(np.broadcast_shapes(xs.shape, ys.shape), dtype=bool)
    for d in discs:
        m |= (xs - d.cx) ** 2 + (ys - d.cy) ** 2 <= d.r ** 2
    return m


def render_region(spec: SyntheticSlideSpec, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
    """RGB uint8 (h, w, 3) of the slide at ``downsample`` whose top-left is level-0 (x, y)."""
    xs = x + (np.arange(w, dtype=np.float64) + 0.5) * downsample
    ys = y + (np.arange(h, dtype=np.float64) + 0.5) * downsample
    X, Y = xs[None, :], ys[:, None]
    out = np.empty((h, w, 3), dtype=np.uint8)
    out[:] = GLASS
    tissue = _inside(spec.islands, X, Y) & (X < spec.width) & (Y < spec.height)
    if not tissue.any():
        return out
    tex = _texture()
    period = tex.shape[0]
    # the texture is sampled at level-0 resolution; at lower levels we point-sample it (enough for a pyramid
    # used for thumbnails and tissue detection)
    ix = (np.floor(xs).astype(np.int64) % period)[None, :]
    iy = (np.floor(ys).astype(np.int64) % period)[:, None]
    pix = tex[iy, ix]
    out[tissue] = pix[tissue]
    if spec.anomalies:
        an = _inside(spec.anomalies, X, Y) & tissue
        if an.any():
            p = pix[an].astype(np.int16)
            # permute the stain channels and darken: brown/blue IHC becomes dense purple-green tissue
            q = np.stack([p[:, 2], p[:, 0], p[:, 1]], axis=1) * 0.7
            out[an] = np.clip(q, 0, 255).astype(np.uint8)
    return out


def write_synthetic_slide(path: str | Path, spec: SyntheticSlideSpec | None = None, **kw) -> Path:
    """Write ``spec`` (or ``SyntheticSlideSpec.default(**kw)``) as a pyramidal tiled TIFF OpenSlide opens."""
    import tifffile

    spec = spec or SyntheticSlideSpec.default(**kw)
    path = Path(path)
    t = spec.tile
    levels = []
    w, h, d = spec.width, spec.height, 1
    while True:
        levels.append((w, h, d))
        if spec.levels is not None and len(levels) >= spec.levels:
            break
        if spec.levels is None and max(w, h) <= 1024:
            break
        w, h, d = max(1, w // 2), max(1, h // 2), d * 2

    def tiles(lw: int, lh: int, ds: int):
        for ty in range(0, lh, t):
            for tx in range(0, lw, t):
                yield render_region(spec, tx * ds, ty * ds, t, t, ds)

    res_cm = 1e4 / spec.mpp  # pixels per centimetre
    comp = None if spec.compression in (None, "none") else spec.compression
    with atomic_output(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=spec.width * spec.height * 3 > 2**31) as tw:
        for i, (lw, lh, ds) in enumerate(levels):
            tw.write(
                tiles(lw, lh, ds),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(t, t),
                photometric="rgb",
                compression=comp,
                subfiletype=0 if i == 0 else 1,
                resolution=(res_cm / ds, res_cm / ds),
                resolutionunit="CENTIMETER",
                description=f"wsi-haloae synthetic slide; mpp={spec.mpp}" if i == 0 else None,
                metadata=None,
            )
    return path


def anomaly_mask(spec: SyntheticSlideSpec, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
    """Boolean (h, w) ground truth of the planted anomaly, same sampling as ``render_region``."""
    xs = x + (np.arange(w, dtype=np.float64) + 0.5) * downsample
    ys = y + (np.arange(h, dtype=np.float64) + 0.5) * downsample
    return _inside(spec.anomalies, xs[None, :], ys[:, None]) & _inside(spec.islands, xs[None, :], ys[:, None])
