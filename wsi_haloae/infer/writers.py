"""The OUT.zarr result store: an OME-NGFF 0.4 multiscale heatmap on Zarr format 2, plus tile tables.

OME-NGFF 0.4 on Zarr format 2 is what QuPath 0.6 reads; ``--ngff 0.5`` writes the same layout as OME-NGFF 0.5
on Zarr format 3 (metadata under the ``ome`` attribute, ``dimension_names`` on the map levels). Both are
written with zarr-python 3 and read back through it, whatever the format.

Why it looks like this:
- The store is built in a sibling temp directory (``fileio.partial_name``: fixed, safe under the output's
  lock) and renamed onto the final name only after the completion marker is in it, together with the
  slide's other outputs (``fileio.publish``): a killed run never leaves something that looks finished under
  a final name, and a rerun simply deletes the leftover temp directory and starts again.
- Level 0 of the map is assembled chunk by chunk (``assembler.MapAssembler``): windows arrive in any
  order, each is blended into in-memory buffers of the 512x512 chunk(s) it covers, and a chunk is written
  (once, without reading it back) as soon as every window that touches it has arrived. Only chunks with
  pending windows are held, which for a row-major grid is one or two rows of chunks: memory follows the
  slide's width, never its area.
- Lower levels are computed after the tiles are done, chunk by chunk from the level above (NaN-aware 2x2
  mean), so background stays NaN all the way down.

Layout (see docs/output-format.md): ``0``, ``1``, ... map levels (float32, y/x); ``tiles/*`` per tissue
tile; ``grid/score_mean``, ``grid/score_max`` (n_rows, n_cols); ``mask`` the tissue mask; provenance in the
root attribute ``wsi_haloae``; completion marker = attribute ``wsi_haloae.complete`` and a ``.complete``
file, both written last.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError, OutputError
from ..fileio import os_reason, remove_path

CHUNK = 512
#: The pyramid goes down until the longest side is at most this many pixels (one TIFF tile).
MIN_LEVEL_SIZE = 256
MARKER = ".complete"
ATTR = "wsi_haloae"


def _root_attrs(out_zarr: str | Path) -> dict[str, Any]:
    """The root group's attributes, read from the metadata file itself (no zarr import; format 2 or 3)."""
    p = Path(out_zarr)
    if (p / ".zattrs").is_file():
        return json.loads((p / ".zattrs").read_text())
    return json.loads((p / "zarr.json").read_text()).get("attributes", {})


def is_complete(out_zarr: str | Path) -> bool:
    """True when ``out_zarr`` holds a finished result (marker file and attribute, both written last)."""
    p = Path(out_zarr)
    if not (p / MARKER).is_file():
        return False
    try:
        attrs = _root_attrs(p)
    except (OSError, ValueError):
        return False
    return bool(attrs.get(ATTR, {}).get("complete"))


def read_attrs(out_zarr: str | Path) -> dict[str, Any]:
    """The ``wsi_haloae`` provenance attributes of a store."""
    return _root_attrs(out_zarr).get(ATTR, {})


@dataclass(frozen=True)
class MapGeometry:
    """Where level 0 of the heatmap sits on the slide.

    ``origin_x/y``: level-0 slide pixel of the map's top-left corner (the OpenSlide bounds origin, so the
    map lines up with the image QuPath shows). ``slide_px``: level-0 slide pixels per map pixel.
    ``um``: microns per map pixel. ``block``: map pixels per tile side.
    """

    height: int
    width: int
    origin_x: float
    origin_y: float
    slide_px: float
    um: float
    block: int

    @staticmethod
    def for_slide(bounds: tuple[int, int, int, int], mpp0: float, scale: float, tile_size: int,
                  pixel_downsample: int) -> "MapGeometry":
        """``scale``: level-0 px per target px (the grid's, snapped to a pyramid level); ``mpp0``: level-0 µm/px.

        The map covers the bounds region; its pixel size is exactly what the tiles were read at times the
        downsample, so the OME scale agrees with the slide's size and mpp.
        """
        bx, by, bw, bh = bounds
        slide_px = scale * pixel_downsample
        return MapGeometry(
            height=max(1, math.ceil(bh / slide_px - 1e-6)),
            width=max(1, math.ceil(bw / slide_px - 1e-6)),
            origin_x=float(bx),
            origin_y=float(by),
            slide_px=slide_px,
            um=mpp0 * slide_px,
            block=tile_size // pixel_downsample,
        )

    def window_origins(self, rows: np.ndarray, cols: np.ndarray, per_tile: int) -> tuple[np.ndarray, np.ndarray]:
        """Map-pixel top-left of windows (``slide.grid.Windows``): ``per_tile`` windows per tile side.

        The window grid starts at the map's origin (both are the bounds' top-left), and a window step is
        ``block / per_tile`` map px, which must be whole so that windows land on map pixels exactly. From the
        grid's row/column (not by rounding each level-0 coordinate), so neighbouring windows abut exactly even
        when the level-0 tile size is fractional.
        """
        if self.block % per_tile:
            raise BadInputError(f"{per_tile} overlapping windows per tile do not fit the map's {self.block} px per "
                                f"tile: use a smaller --pixel-downsample or overlap")
        step = self.block // per_tile
        return np.asarray(cols, np.int64) * step, np.asarray(rows, np.int64) * step


#: OME-NGFF version -> Zarr format. 0.4 (Zarr 2) is the default: what QuPath 0.6 reads.
NGFF_ZARR_FORMAT = {"0.4": 2, "0.5": 3}


def open_new_store(path: Path, ngff: str = "0.4"):
    """A fresh, empty group at ``path`` in the Zarr format of OME-NGFF ``ngff`` (0.4: Zarr 2; 0.5: Zarr 3)."""
    import zarr
    from zarr.storage import LocalStore

    if ngff not in NGFF_ZARR_FORMAT:
        raise ValueError(f"OME-NGFF {ngff!r}: expected one of {', '.join(NGFF_ZARR_FORMAT)}")
    remove_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return zarr.open_group(LocalStore(path), mode="w", zarr_format=NGFF_ZARR_FORMAT[ngff])


def open_store(path: Path, mode: str = "r"):
    """An existing store (either Zarr format)."""
    import zarr
    from zarr.storage import LocalStore

    return zarr.open_group(LocalStore(path, read_only=mode == "r"), mode=mode)


def create_array(group, name: str, *, shape: tuple[int, ...] | None = None, data: np.ndarray | None = None,
                 chunks: tuple[int, ...], dtype: Any = None, fill_value: Any = 0,
                 dimension_names: tuple[str, ...] | None = None):
    """Every array of the store goes through here, so all share one encoding.

    Zarr 2 (OME-NGFF 0.4): blosc-lz4 with byte shuffle (what zarr-python 2 wrote, which every Zarr 2 reader
    has) and '/'-separated chunk keys (0.4 requires them). Zarr 3: zarr's default codecs and chunk keys, and
    ``dimension_names`` (0.5 asks for them). Chunks equal to the fill value are not written
    (``write_empty_chunks`` off): glass costs nothing on disk.
    """
    import numcodecs

    kw: dict[str, Any] = {}
    if group.metadata.zarr_format == 2:
        kw = dict(compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
                  chunk_key_encoding={"name": "v2", "separator": "/"})
    elif dimension_names is not None:
        kw = dict(dimension_names=dimension_names)
    if data is not None:
        return group.create_array(name, data=data, chunks=chunks, fill_value=fill_value,
                                  config={"write_empty_chunks": False}, **kw)
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill_value,
                              config={"write_empty_chunks": False}, **kw)


def create_map_level(group, name: str, shape: tuple[int, int]):
    return create_array(group, name, shape=shape, chunks=(CHUNK, CHUNK), dtype="f4", fill_value=np.nan,
                        dimension_names=("y", "x"))


def nan_mean_2x2(a: np.ndarray) -> np.ndarray:
    """2x2 block mean ignoring NaN (all-NaN blocks stay NaN); odd edges are padded with NaN."""
    h, w = a.shape
    if h % 2 or w % 2:
        p = np.full((h + h % 2, w + w % 2), np.nan, dtype=np.float32)
        p[:h, :w] = a
        a = p
    r = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2)
    valid = ~np.isnan(r)
    cnt = valid.sum(axis=(1, 3))
    s = np.where(valid, r, 0.0).sum(axis=(1, 3), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (s / cnt).astype(np.float32)
    out[cnt == 0] = np.nan
    return out


def build_pyramid(group, min_size: int = MIN_LEVEL_SIZE, written: set[tuple[int, int]] | None = None) -> int:
    """Add levels 1, 2, ... (2x NaN-aware mean of the level above), chunk by chunk. Returns the level count.

    ``written``: the level-0 chunks that hold data (from the assembler). A destination chunk whose source
    chunks are all absent is skipped without reading anything, so mostly-glass slides cost little here.
    Needs equal chunk sizes on all levels (each destination chunk then covers 2x2 source chunks).
    """
    level = 0
    src = group["0"]
    have = set(written) if written is not None else None
    while max(src.shape) > min_size:
        h, w = src.shape
        dst = create_map_level(group, str(level + 1), ((h + 1) // 2, (w + 1) // 2))
        ch, cw = dst.chunks
        assert src.chunks == dst.chunks
        made: set[tuple[int, int]] = set()
        for y0 in range(0, dst.shape[0], ch):
            for x0 in range(0, dst.shape[1], cw):
                cy, cx = y0 // ch, x0 // cw
                if have is not None and not any((2 * cy + a, 2 * cx + b) in have for a in (0, 1) for b in (0, 1)):
                    continue
                y1, x1 = min(dst.shape[0], y0 + ch), min(dst.shape[1], x0 + cw)
                block = src[2 * y0:min(h, 2 * y1), 2 * x0:min(w, 2 * x1)]
                if np.isnan(block).all():
                    continue  # absent chunk = NaN
                dst[y0:y1, x0:x1] = nan_mean_2x2(block)[: y1 - y0, : x1 - x0]
                made.add((cy, cx))
        level += 1
        src = dst
        if have is not None:
            have = made
    return level + 1


def write_multiscales(group, n_levels: int, um: float, name: str = "anomaly_map") -> None:
    """OME-NGFF ``multiscales`` metadata: axes y/x in micrometres, a scale transform per level.

    0.4 on a Zarr 2 group (the ``multiscales`` attribute), 0.5 on a Zarr 3 group (under the ``ome``
    attribute). Written as the spec lays it out (validated with ``ome-zarr-models`` in the tests) rather than
    through ``ome_zarr.writer``, whose import pulls in dask.array and scikit-image: seconds per process.
    """
    datasets = [
        {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [um * 2**k, um * 2**k]}]}
        for k in range(n_levels)
    ]
    axes = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    ms = {
        "name": name,
        "axes": axes,
        "datasets": datasets,
        "type": "mean",
        "metadata": {"method": "nan-aware 2x2 mean (wsi_haloae.infer.writers.nan_mean_2x2)"},
    }
    if group.metadata.zarr_format == 2:
        group.attrs["multiscales"] = [{"version": "0.4", **ms}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}


def write_table(group, name: str, data: np.ndarray, chunk: int = 65536) -> None:
    """A small 1-D/2-D table (tiles, grids); chunked along the first axis."""
    chunks = (min(max(1, data.shape[0]), chunk),) + tuple(data.shape[1:])
    fill = np.nan if data.dtype.kind == "f" else 0
    create_array(group, name, data=data, chunks=chunks, fill_value=fill)


def map_levels(group) -> list:
    """The map level arrays in order (from the multiscales metadata, either version)."""
    attrs = group.attrs.asdict()
    ms = attrs["ome"]["multiscales"] if "ome" in attrs else attrs["multiscales"]
    return [group[d["path"]] for d in ms[0]["datasets"]]


def mark_complete(tmp: Path, attrs: dict[str, Any]) -> None:
    """Write the completion marker (attribute, then file) into a finished store: the last thing written to it.

    The store is still under its temp name; ``fileio.publish`` then moves it (with the slide's other outputs)
    onto its final name.
    """
    g = open_store(tmp, mode="r+")
    g.attrs[ATTR] = dict(attrs, complete=True)
    with open(Path(tmp) / MARKER, "w") as f:
        f.write(json.dumps({"end_time": attrs.get("end_time")}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_writable(path: Path, what: str) -> None:
    """Fail early, before an hour of inference, when an output cannot be created."""
    parent = Path(path).absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the folder {parent} for the {what} ({os_reason(exc)})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write {what} (folder {parent} is not writable)")
    if Path(path).exists() and Path(path).is_dir() and what != "zarr store":
        raise OutputError(f"{path}: cannot write {what} (a folder of that name exists)")
    if what == "zarr store" and Path(path).exists() and not Path(path).is_dir():
        raise OutputError(f"{path}: cannot write {what} (a file of that name exists)")
