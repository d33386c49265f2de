"""The output registry: every file a slide's inference can produce, named once, in one table (``KINDS``).

Why a table: the engine (what to guard, lock, write and publish), ``cohort`` (file names in its folder, which
slides are complete), the CLI (``--tiff PATH`` for infer, ``--tiff/--no-tiff`` for cohort) and the guards
all read it, so a new output format is its writer module plus one ``OutputKind`` line here.

Every extra is written from a finished store (``StoreContext``), never from the tiles: a store that exists
can always produce a missing extra later (``infer`` reruns do exactly that), and an extra is never newer
than the store it came from. The engine writes each extra under a temp name and publishes them together with
the store (``fileio.publish``), so nothing appears under a final name unless all of the slide's outputs are
complete.

This module imports nothing heavy at import time: the CLI builds its options from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInputError

PREVIEW_SIZE = 1024  # long side of the preview's slide thumbnail, in pixels


@dataclass
class StoreContext:
    """A finished store an extra is written from (its group may still sit in its temp folder)."""

    group: Any  # the zarr group
    attrs: dict[str, Any]  # its ``wsi_haloae`` attributes
    slide: Path
    _levels: list | None = field(default=None, repr=False)

    def levels(self) -> list:
        """The map levels (zarr arrays), level 0 first."""
        if self._levels is None:
            from . import writers

            self._levels = writers.map_levels(self.group)
        return self._levels

    def reader(self):
        """The slide (opened once per process, see ``slide.reader.open_slide``)."""
        from ..slide.reader import open_slide

        return open_slide(self.slide)


def _same(p: Path) -> Path:
    return Path(p)


def _rgb_path(p: Path) -> Path:
    from .ome_tiff import rgb_path_for

    return rgb_path_for(p)


@dataclass(frozen=True)
class OutputKind:
    """One kind of output.

    ``option`` is the request that asks for it (``infer --OPTION PATH``, ``cohort --OPTION/--no-OPTION``);
    kinds that share an option (the float and the colour OME-TIFF) come together, their paths derived from
    the option's path by ``path_from``. ``cohort_suffix`` names the file in a cohort folder
    (``DIR/<id><suffix>``). ``write(ctx, path)`` writes the whole file at ``path`` (a temp name the engine
    publishes) and may raise OSError; None marks the store itself, which the engine builds.
    """

    name: str
    option: str
    what: str
    cohort_suffix: str
    write: Callable[[StoreContext, Path], None] | None
    path_from: Callable[[Path], Path] = _same
    help: str = ""  # the option's help (infer); empty for a kind that follows another kind's option
    in_cohort: bool = True  # on by default in a cohort

    @property
    def is_store(self) -> bool:
        return self.write is None

    @property
    def label(self) -> str:
        """How messages name it: the user's option, or what it is and the option it came with."""
        return f"--{self.option}" if self.help or self.is_store else f"the {self.what} of --{self.option}"

    def is_complete(self, path: Path) -> bool:
        """The store: its completion marker. A file: that it is there (files only appear when whole)."""
        if self.is_store:
            from .writers import is_complete

            return is_complete(path)
        return Path(path).is_file()


# ------------------------------------------------------------------------------------- the writers' adapters
def _tiff_float(ctx: StoreContext, path: Path) -> None:
    from .ome_tiff import write_ome_tiff

    write_ome_tiff(ctx.levels(), ctx.attrs["map"]["um_per_px"], path, rgb=False)


def _tiff_rgb(ctx: StoreContext, path: Path) -> None:
    from .ome_tiff import write_ome_tiff

    vmin, vmax = ctx.attrs["display_range"]
    write_ome_tiff(ctx.levels(), ctx.attrs["map"]["um_per_px"], path, rgb=True, vmin=vmin, vmax=vmax)


def _tile_boxes(ctx: StoreContext) -> "np.ndarray":
    """(N, 4) level-0 x0, y0, x1, y1 of the grid tiles, clipped to the slide's bounds region: an edge tile
    read padded covers only the slide's own pixels (its score is still the whole padded tile's)."""
    import numpy as np

    a = ctx.attrs
    xy = ctx.group["tiles"]["xy"][:].astype(np.float64).reshape(-1, 2)
    t = float(a["level0_tile"])
    bx, by, bw, bh = a["slide"]["bounds"]
    boxes = np.concatenate([xy, xy + t], axis=1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(bx, bx + bw)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(by, by + bh)
    return boxes


def _anomalous(ctx: StoreContext) -> "np.ndarray | None":
    """The store's Anomalous tiles (table ``tiles/anomalous``, the rule of attribute ``calls``); a store from
    before the calibrated calls has no table: its per-slide threshold decides, as it did then."""
    t = ctx.group["tiles"]
    if "anomalous" in t:
        return t["anomalous"][:].astype(bool)
    thr = ctx.attrs["threshold"]["value"]
    return t["score_mean"][:] > thr if thr is not None else None


def _pvalues(ctx: StoreContext) -> "np.ndarray | None":
    t = ctx.group["tiles"]
    return t["pvalue"][:] if "pvalue" in t else None


def _geojson(ctx: StoreContext, path: Path) -> None:
    from .geojson import calls_description, write_geojson

    a, t = ctx.attrs, ctx.group["tiles"]
    rc = t["rc"][:].reshape(-1, 2)
    b = _tile_boxes(ctx)
    write_geojson(path, b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1], t["score_mean"][:],
                  t["score_max"][:], threshold=None, offset=tuple(a["geojson"]["offset"]),
                  rows=rc[:, 0], cols=rc[:, 1], seed=f"{a['slide']['properties_sha256']}:{a['model']['sha256']}",
                  pvalues=_pvalues(ctx), anomalous=_anomalous(ctx), collection=calls_description(a))


def _preview_level(levels: list, min_side: float) -> int:
    """The smallest map level whose long side still has ``min_side`` px (enough for the preview)."""
    best = 0
    for k, lvl in enumerate(levels):
        if max(lvl.shape) >= min_side:
            best = k
    return best


def _preview_subtitle(a: dict[str, Any]) -> str:
    """The line under the preview's title: the slide's verdict and what its colours mean."""
    if a.get("status") == "no tissue":
        return f"no tissue found: 0 of {a['tiles']['grid']} grid tiles have >= {a['min_tissue']:g} tissue"
    from .calls import verdict_line

    return verdict_line(a.get("verdict"))


def _score_label(a: dict[str, Any]) -> str:
    """The colour bar's label: whether its scale is the model's (the same on every slide) or this slide's."""
    return "anomaly score (model's calibrated scale)" if a.get("calibration") else "anomaly score (this slide's scale)"


def _preview(ctx: StoreContext, path: Path) -> None:
    from ..slide.ids import slide_id
    from .preview import write_preview

    a, levels = ctx.attrs, ctx.levels()
    reader = ctx.reader()
    thumb = reader.thumbnail(PREVIEW_SIZE)
    W, H = reader.dimensions
    k = _preview_level(levels, PREVIEW_SIZE * 0.75)
    heat = levels[k]
    s = a["map"]["slide_px_per_map_px"] * 2**k
    ox, oy = a["map"]["origin_level0"]
    hh, hw = heat.shape
    vmin, vmax = a["display_range"]
    anomalous = _anomalous(ctx)  # the GeoJSON's Anomalous tiles (attribute ``calls``)
    write_preview(path, thumb, (W, H), heat[:], (ox, oy, ox + hw * s, oy + hh * s), vmin=vmin, vmax=vmax,
                  title=a["slide"].get("id") or slide_id(ctx.slide), subtitle=_preview_subtitle(a),
                  tile_boxes=_tile_boxes(ctx), anomalous=anomalous, score_label=_score_label(a))


# ------------------------------------------------------------------------------------------------ the table
STORE = OutputKind("zarr", "out", "zarr store", ".zarr", None)
KINDS: tuple[OutputKind, ...] = (
    STORE,
    OutputKind("tiff", "tiff", "OME-TIFF", ".ome.tiff", _tiff_float,
               help="Also write a pyramidal OME-TIFF heatmap (float scores; plus a colour copy NAME.rgb.ome.tif)."),
    OutputKind("tiff_rgb", "tiff", "colour OME-TIFF", ".rgb.ome.tiff", _tiff_rgb, path_from=_rgb_path),
    OutputKind("geojson", "geojson", "GeoJSON", ".geojson", _geojson,
               help="Also write QuPath tile objects (.geojson or .geojson.gz)."),
    OutputKind("preview", "preview", "preview", ".png", _preview,
               help="Also write a PNG thumbnail with the heatmap overlaid."),
)
BY_NAME: dict[str, OutputKind] = {k.name: k for k in KINDS}
#: The extra outputs a user asks for, in order, by option (``--tiff PATH`` for infer, ``--tiff`` for cohort),
#: each with the kind that carries the option's help.
OPTIONS: dict[str, OutputKind] = {k.option: k for k in KINDS if not k.is_store and k.help}
COHORT_DEFAULT: tuple[str, ...] = tuple(dict.fromkeys(k.option for k in KINDS if not k.is_store and k.in_cohort))


def _check_options(options: Iterable[str]) -> None:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise BadInputError(f"unknown output(s) {', '.join(unknown)} (known: {', '.join(OPTIONS)})")


def planned(out: Path, requested: Mapping[str, Path | None]) -> dict[str, Path]:
    """Every file a run writes, by kind name: the store at ``out`` and, for each requested option -> path,
    the kinds that option produces (``{"tiff": t}`` gives ``tiff`` and ``tiff_rgb``)."""
    asked = {opt: Path(p) for opt, p in requested.items() if p is not None}
    _check_options(asked)
    paths = {STORE.name: Path(out)}
    for k in KINDS:
        if not k.is_store and k.option in asked:
            paths[k.name] = k.path_from(asked[k.option])
    return paths


def cohort_paths(out_dir: Path, sid: str, options: Iterable[str]) -> dict[str, Path]:
    """The files of slide ``sid`` in a cohort folder, by kind name: ``DIR/<id><suffix>``."""
    options = set(options)
    _check_options(options)
    return {k.name: Path(out_dir) / f"{sid}{k.cohort_suffix}" for k in KINDS if k.is_store or k.option in options}


def requests(paths: Mapping[str, Path]) -> dict[str, Path]:
    """The option -> path requests that give ``paths`` (the inverse of ``planned``, for the extras)."""
    return {k.option: paths[k.name] for k in KINDS if not k.is_store and k.help and k.name in paths}


def labelled(paths: Mapping[str, Path]) -> dict[str, Path]:
    """``paths`` keyed by what a user calls them (for ``fileio.guard_outputs`` messages)."""
    return {BY_NAME[name].label: p for name, p in paths.items()}
