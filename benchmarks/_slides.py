"""Benchmark slides: real tissue tiled into a large pyramidal TIFF, and big sparse slides with small islands.

Both are written tile by tile with tifffile (one tile in memory at a time), cached in the work folder by
their parameters, and written to a temp name first so an interrupted run never leaves a half slide behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from _common import CMU_SMALL, shared_file

TILE = 256


def _levels(width: int, height: int, min_side: int = 1024) -> list[tuple[int, int, int]]:
    """(w, h, downsample) per level: halve until the long side is <= min_side."""
    out, w, h, d = [], width, height, 1
    while True:
        out.append((w, h, d))
        if max(w, h) <= min_side:
            return out
        w, h, d = max(1, w // 2), max(1, h // 2), d * 2


def _first(tile_fn, x0: int, y0: int, ds: int) -> np.ndarray | None:
    """tifffile infers the tile dtype from the first tile, so that one is always written (white)."""
    t = tile_fn(x0, y0, ds)
    if t is None and x0 == 0 and y0 == 0:
        t = np.full((TILE, TILE, 3), 255, np.uint8)
    return t


def _write_pyramid(path: Path, width: int, height: int, mpp: float, tile_fn, compression: str | None,
                   description: str) -> Path:
    """tile_fn(x0, y0, ds) -> (256, 256, 3) uint8 or None (an absent, sparse tile: OpenSlide reads it as
    transparent, i.e. white). Levels are separate reduced-resolution IFDs, as OpenSlide's generic TIFF wants."""
    import tifffile

    res_cm = 1e4 / mpp
    tmp = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**31) as tw:
        for i, (lw, lh, ds) in enumerate(_levels(width, height)):
            tiles = (_first(tile_fn, tx * ds, ty * ds, ds) for ty in range(0, lh, TILE) for tx in range(0, lw, TILE))
            tw.write(tiles, shape=(lh, lw, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression=compression, subfiletype=0 if i == 0 else 1,
                     resolution=(res_cm / ds, res_cm / ds), resolutionunit="CENTIMETER",
                     description=description if i == 0 else None, metadata=None)
    tmp.replace(path)
    return path


#: where the mirror-tiling starts in the source (level-0 px): on the tissue, so that even a small slide has some
OFFSET = (640, 1280)


def tissue_slide(size: int, workdir: Path) -> tuple[Path, str]:
    """A size x size slide of real tissue, mirror-tiled over the plane and JPEG-compressed.

    Source: CMU-1-Small-Region.svs (2220x2967 Aperio H&E, 0.499 µm/px) from ../shared/data; when that is absent,
    scikit-image's real IHC image (512x512, taken to be 0.5 µm/px) -- then every tile is tissue. Writing is pure
    indexing per tile (no rendering), so even a 24k x 24k slide takes seconds. Returns (path, source description).
    """
    src = shared_file(*CMU_SMALL)
    if src is None:
        from skimage import data

        name, mpp = "skimage-ihc", 0.5
        base = np.ascontiguousarray(np.asarray(data.immunohistochemistry(), dtype=np.uint8)[..., :3])
        off = (0, 0)
    else:
        name, off = src.name, OFFSET
    path = workdir / f"{Path(name).stem}-mirror-{size}-o{off[0]}x{off[1]}.tif"
    desc = f"{name} mirror-tiled to {size}x{size}"
    if path.is_file():
        return path, desc
    from PIL import Image

    if src is not None:
        import openslide

        with openslide.OpenSlide(str(src)) as osr:
            w, h = osr.dimensions
            base = np.asarray(osr.read_region((0, 0), 0, (w, h)).convert("RGB"))
            mpp = float(osr.properties.get("openslide.mpp-x", 0.5))
    h, w = base.shape[:2]
    # per level, the source downsampled once (Lanczos); each level mirror-tiles its own copy
    srcs: dict[int, np.ndarray] = {}

    def source(ds: int) -> np.ndarray:
        if ds not in srcs:
            srcs[ds] = base if ds == 1 else np.asarray(
                Image.fromarray(base).resize((max(1, round(w / ds)), max(1, round(h / ds))), Image.Resampling.LANCZOS))
        return srcs[ds]

    def mirror(idx: np.ndarray, n: int) -> np.ndarray:
        m = idx % (2 * n)
        return np.where(m < n, m, 2 * n - 1 - m)

    def tile_fn(x0: int, y0: int, ds: int) -> np.ndarray:
        s = source(ds)
        sh, sw = s.shape[:2]
        ix = mirror((x0 + off[0]) // ds + np.arange(TILE), sw)
        iy = mirror((y0 + off[1]) // ds + np.arange(TILE), sh)
        t = s[iy[:, None], ix[None, :]]
        # outside the slide (right/bottom edge tiles): white, as a scanner writes
        vx = (x0 + np.arange(TILE) * ds) < size
        vy = (y0 + np.arange(TILE) * ds) < size
        t[~vy] = 255
        t[:, ~vx] = 255
        return t

    _write_pyramid(path, size, size, mpp, tile_fn, "jpeg", f"wsi-haloae benchmark: {name} mirror-tiled; mpp={mpp}")
    return path, desc


#: island centres as fractions of the slide side: spread out so the grid, the mask and the map span the slide
ISLAND_FRACTIONS = ((0.15, 0.2), (0.8, 0.15), (0.5, 0.5), (0.2, 0.85), (0.85, 0.8))


def island_slide(size: int, workdir: Path, radius: int = 450, mpp: float = 0.5) -> Path:
    """A size x size slide of glass (absent tiles) with the same five tissue islands of ``radius`` px whatever
    the size: tissue tile count stays constant while the slide area grows. Tissue tiles are stored
    uncompressed, background tiles not at all (sparse), so even 100k x 100k stays under 50 MB on disk
    (dense, it would be 30 GB)."""
    from wsi_haloae.slide.synthetic import Disc, SyntheticSlideSpec, render_region

    path = workdir / f"islands-{size}-r{radius}-c.tif"
    if path.is_file():
        return path
    # centres on tile centres of the 256 px grid, so every size cuts the islands into the same tiles
    islands = tuple(Disc((int(fx * size) // TILE) * TILE + TILE / 2, (int(fy * size) // TILE) * TILE + TILE / 2,
                         float(radius)) for fx, fy in ISLAND_FRACTIONS)
    spec = SyntheticSlideSpec(width=size, height=size, mpp=mpp, islands=islands, anomalies=())

    def tile_fn(x0: int, y0: int, ds: int) -> np.ndarray | None:
        x1, y1 = x0 + TILE * ds, y0 + TILE * ds
        if not any(d.cx + d.r >= x0 and d.cx - d.r <= x1 and d.cy + d.r >= y0 and d.cy - d.r <= y1 for d in islands):
            return None
        return render_region(spec, x0, y0, TILE, TILE, ds)

    return _write_pyramid(path, size, size, mpp, tile_fn, None, f"wsi-haloae benchmark islands; mpp={mpp}")
