"""Synthetic pyramidal slides built from real tissue, for the demo, tests and benchmarks.

A fresh machine has no real slide, but scikit-image ships a real IHC histology image
(``skimage.data.immunohistochemistry``, 512x512, no download). We mirror-tile it over the plane, cut
tissue "islands" out of a white glass background, and optionally plant an anomaly (a disc of the same
tissue with the stain channels permuted and darkened). The content is a pure function of the coordinates,
so any region at any pyramid level is rendered on its own: writing a 100k x 100k slide holds one tile in
memory at a time, and background tiles compress to almost nothing.

Two textures: ``mirror`` (the image mirror-tiled, period 1024 px, the demo's) and ``patchwork`` (square
patches of ``PATCH`` px, each a seeded random crop of the image, flipped/transposed at random): with
``patchwork`` no two slides of different ``seed`` share a tile, which is what calibration tests need (normal
tissue the model never saw). Two anomaly kinds: ``stain`` (channels permuted, darkened; the demo's) and
``blood`` (a haemorrhage: the tissue's texture recoloured dark red to pink, as red blood cells look).

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
TEXTURES = ("mirror", "patchwork")
ANOMALY_KINDS = ("stain", "blood")
#: Side of one patchwork patch in level-0 px: not a divisor of 256, so patch seams fall anywhere in a tile.
PATCH = 192


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
    texture: str = "mirror"  # "mirror" | "patchwork" (seeded by ``seed``)
    anomaly_kind: str = "stain"  # "stain" | "blood"

    def __post_init__(self) -> None:
        if self.texture not in TEXTURES:
            raise ValueError(f"texture must be one of {TEXTURES}, got {self.texture!r}")
        if self.anomaly_kind not in ANOMALY_KINDS:
            raise ValueError(f"anomaly_kind must be one of {ANOMALY_KINDS}, got {self.anomaly_kind!r}")

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
    # the texture is sampled at level-0 resolution; at lower levels we point-sample it (enough for a pyramid
    # used for thumbnails and tissue detection)
    pix = _sample(spec, xs, ys)
    out[tissue] = pix[tissue]
    if spec.anomalies:
        an = _inside(spec.anomalies, X, Y) & tissue
        if an.any():
            if spec.anomaly_kind == "blood":
                # a haemorrhage: the tissue's texture recoloured from dark red to pink (red blood cells)
                g = pix[an].astype(np.float32).mean(axis=1, keepdims=True) / 255.0
                dark, light = np.array([140, 15, 30], np.float32), np.array([240, 150, 160], np.float32)
                out[an] = (dark + (light - dark) * g).astype(np.uint8)
            else:
                p = pix[an].astype(np.int16)
                # permute the stain channels and darken: brown/blue IHC becomes dense purple-green tissue
                q = np.stack([p[:, 2], p[:, 0], p[:, 1]], axis=1) * 0.7
                out[an] = np.clip(q, 0, 255).astype(np.uint8)
    return out


def _mix(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit integer hash of (a, b, seed), vectorised (splitmix64's finaliser)."""
    with np.errstate(over="ignore"):
        x = (a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (b.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
        x ^= np.uint64((seed * 0x165667B19E3779F9) & 0xFFFFFFFFFFFFFFFF)
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x ^= x >> np.uint64(shift)
            x *= np.uint64(mult)
        return x ^ (x >> np.uint64(31))


def _sample(spec: SyntheticSlideSpec, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Texture pixels (len(ys), len(xs), 3) at level-0 coordinates."""
    xi = np.floor(xs).astype(np.int64)[None, :]
    yi = np.floor(ys).astype(np.int64)[:, None]
    if spec.texture == "mirror":
        tex = _texture()
        period = tex.shape[0]
        return tex[yi % period, xi % period]
    src = _texture()[:512, :512]  # the original image (the mirror's top-left quarter)
    h = _mix(yi // PATCH, xi // PATCH, spec.seed)
    span = np.uint64(src.shape[0] - PATCH + 1)
    ox = (h % span).astype(np.int64)
    oy = ((h >> np.uint64(20)) % span).astype(np.int64)
    t = (h >> np.uint64(40)).astype(np.int64)
    u = np.broadcast_to(xi % PATCH, h.shape)
    v = np.broadcast_to(yi % PATCH, h.shape)
    u, v = np.where(t & 1, v, u), np.where(t & 1, u, v)  # transpose
    u = np.where(t & 2, PATCH - 1 - u, u)  # flips
    v = np.where(t & 4, PATCH - 1 - v, v)
    return src[oy + v, ox + u]


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


def patchwork_spec(seed: int, size: int = 2048, mpp: float = 0.5, anomaly_radius: float = 0.0,
                   anomaly_kind: str = "blood") -> SyntheticSlideSpec:
    """A square slide filled by one round island of patchwork tissue (``seed`` picks its patches), with a planted
    anomaly disc of ``anomaly_radius`` level-0 px (none when 0) centred off the middle, inside the island.

    Slides of different seeds show the same tissue but never the same tile: normal slides for calibration
    checks (train on some, calibrate on others, score new ones).
    """
    c = size / 2
    island = Disc(c, c, 0.47 * size)
    anomalies = (Disc(c + 0.12 * size, c - 0.08 * size, float(anomaly_radius)),) if anomaly_radius > 0 else ()
    return SyntheticSlideSpec(width=size, height=size, mpp=mpp, islands=(island,), anomalies=anomalies, seed=seed,
                              texture="patchwork", anomaly_kind=anomaly_kind)
