"""Tiled pyramidal OME-TIFF copies of the heatmap, streamed from the zarr levels.

Two files, because viewers differ: a float32 file (the scores themselves, NaN background, for analysis
and QuPath's brightness/contrast + LUT tools) and an RGB file (the same map through a colormap, white
background, for viewing anywhere). The pyramid lives in SubIFDs (what Bio-Formats/QuPath expect); OpenSlide
cannot read it (float samples, SubIFDs), so read these back with tifffile. Tiles are read from zarr one
band of 256 rows at a time: memory follows the map's width, never its area.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..fileio import atomic_output

TILE = 256
CMAP = "inferno"
BACKGROUND_RGB = (255, 255, 255)


def rgb_path_for(path: str | Path) -> Path:
    """``heat.ome.tif`` -> ``heat.rgb.ome.tif`` (``x.tif`` -> ``x.rgb.tif``)."""
    p = Path(path)
    name = p.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return p.with_name(name[: -len(suffix)] + ".rgb" + name[-len(suffix):])
    return p.with_name(name + ".rgb.ome.tif")


def colorize(a: np.ndarray, vmin: float, vmax: float, cmap: str = CMAP) -> np.ndarray:
    """float (h, w) -> uint8 (h, w, 3) through a matplotlib colormap; NaN -> white."""
    from matplotlib import colormaps

    lut = (colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    span = max(vmax - vmin, 1e-12)
    nan = np.isnan(a)
    idx = np.clip((np.where(nan, vmin, a) - vmin) / span * 255, 0, 255).astype(np.uint8)
    out = lut[idx]
    out[nan] = BACKGROUND_RGB
    return out


def _tiles(level, rgb: bool, vmin: float, vmax: float) -> Iterator[np.ndarray]:
    h, w = level.shape
    for y0 in range(0, h, TILE):
        band = level[y0:min(h, y0 + TILE), :]
        if rgb:
            band = colorize(band, vmin, vmax)
        for x0 in range(0, w, TILE):
            yield np.ascontiguousarray(band[:, x0:x0 + TILE])


def write_ome_tiff(levels: list, um: float, path: str | Path, *, rgb: bool, vmin: float = 0.0, vmax: float = 1.0,
                   name: str = "anomaly_map") -> Path:
    """Write ``levels`` (2-D arrays, each half the size of the previous) as one pyramidal OME-TIFF.

    ``um`` is the level-0 pixel size in micrometres. Atomic (``fileio.atomic_output``): a failed write leaves
    nothing at ``path``. An OSError (a full disk) propagates; infer turns it into one line naming the output.
    """
    import tifffile

    path = Path(path)
    h, w = levels[0].shape
    samples = 3 if rgb else 1
    itemsize = 1 if rgb else 4
    total = sum(a.shape[0] * a.shape[1] for a in levels) * samples * itemsize
    metadata = {
        "axes": "YXS" if rgb else "YX",
        "Name": name,
        "PhysicalSizeX": um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": um,
        "PhysicalSizeYUnit": "µm",
    }
    common = dict(
        tile=(TILE, TILE),
        dtype=np.uint8 if rgb else np.float32,
        photometric="rgb" if rgb else "minisblack",
        compression="zlib",
        resolutionunit="CENTIMETER",
    )
    with atomic_output(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=total > 2**31, ome=True) as tif:
        for k, level in enumerate(levels):
            lh, lw = level.shape
            shape = (lh, lw, 3) if rgb else (lh, lw)
            res = 1e4 / (um * 2**k)  # pixels per centimetre
            kw = dict(common, shape=shape, resolution=(res, res))
            if k == 0:
                tif.write(_tiles(level, rgb, vmin, vmax), subifds=len(levels) - 1, metadata=metadata, **kw)
            else:
                tif.write(_tiles(level, rgb, vmin, vmax), subfiletype=1, metadata=None, **kw)
    return path
