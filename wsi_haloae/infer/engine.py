"""Whole-slide inference: windows → DataLoader workers → model on the device → writer thread → OUT.zarr.

The windows are the slide's tiles (edge tiles included, read padded), or with ``--overlap`` the overlapping
windows around them (``_plan_map``). Three stages overlap. Worker processes read and decode windows (one
slide handle each); the main thread only moves batches to the device and runs the model (bf16 autocast +
channels_last on CUDA, normalisation on the device); a writer thread behind a bounded queue blends the maps
into zarr chunks (``assembler.MapAssembler``, glass NaN'd by ``tissue_map.MapTissue``), so the device never
waits for compression or disk. Everything lands in a temp store; the extras (``infer.outputs``) are written
from it under temp names, and all of them are renamed onto their final names together, the store last,
only after its completion marker is written (see writers.py): a run killed or failing at any point (a full
disk included) leaves no complete-looking output, and a rerun starts clean. Every output is guarded
against the inputs and locked (``fileio``) for the whole run.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import multiprocessing
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import InferConfig
from ..errors import BadInputError, BadModelFileError, BadSlideError, OutputError
from ..fileio import guard_outputs, output_lock, partial_name, publish, remove_path, write_error
from ..model.device import resolve_device
from ..slide.ids import slide_id
from . import batch, outputs, writers
from .assembler import MapAssembler, blend_window, tile_scores_from_windows
from .colour import check_slide_colours, colour_attrs, colour_clause, colour_summary, warn_if_unusual
from .calls import SlideCalls, call_slide, other_calls, verdict_line
from .geojson import robust_threshold
from .outputs import STORE
from .tissue_map import MapTissue

log = logging.getLogger(__name__)

QUEUE_BATCHES = 8


@dataclass
class InferResult:
    """What one ``infer`` run did. ``status``: "done", "no tissue" (done, but the slide has no tile with
    ``--min-tissue`` tissue: a complete, empty result), or "skipped" (a complete store was already there).

    ``outcome``: what the store records ("done" or "no tissue"), also on a skip. ``outputs``: every file of
    the slide by kind name (``infer.outputs``); ``written``: on a skip, the extras that were missing and were
    made from the existing store. ``summary``: the slide's figures as the store records them (attribute
    ``summary``), the row ``cohort`` shows. ``windows``: the windows scored (= tiles at overlap 0).
    """

    slide: str
    out: str
    status: str
    tiles_grid: int = 0
    tiles_tissue: int = 0
    tiles_failed: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    device: str = ""
    mpp: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    outcome: str = "done"
    windows: int = 0
    overlap: float = 0.0
    min_tissue: float | None = None
    tissue_scored: float | None = None  # share of the tissue-mask pixels the map scores
    colour_qc: dict[str, Any] | None = None  # the store's ``colour_qc`` attribute (infer/colour.py); None before it existed
    verdict: dict[str, Any] = field(default_factory=dict)  # the store's ``verdict`` attribute (scoring.SlideVerdict)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], slide: Path, status: str, seconds: float,
                   outputs: dict[str, Path], **kw) -> "InferResult":
        tiles = attrs.get("tiles", {})
        return cls(slide=str(slide), out=str(outputs[STORE.name]), status=status, tiles_grid=tiles.get("grid", 0),
                   tiles_tissue=tiles.get("tissue", 0), tiles_failed=tiles.get("failed", 0), seconds=seconds,
                   model_seconds=attrs.get("model_seconds", 0.0) if status != "skipped" else 0.0,
                   device=attrs.get("device", ""), mpp=attrs.get("target_mpp"),
                   outputs={k: str(v) for k, v in outputs.items()}, summary=dict(attrs.get("summary") or {}),
                   outcome=attrs.get("status", "done"), windows=(attrs.get("windows") or {}).get("n", 0),
                   overlap=attrs.get("overlap", 0.0), min_tissue=attrs.get("min_tissue"),
                   tissue_scored=(attrs.get("map") or {}).get("scored_fraction"),
                   verdict=dict(attrs.get("verdict") or {}), colour_qc=attrs.get("colour_qc"), **kw)

    @property
    def tiles_per_s(self) -> float:
        """End to end: tissue (grid) tiles over the whole run (open, grid, read, model, write, pyramid, extras),
        whatever the overlap: how fast a slide is done."""
        return self.tiles_tissue / self.seconds if self.seconds > 0 else 0.0

    @property
    def model_tiles_per_s(self) -> float:
        """Model only: tissue tiles over the synchronised time spent in the model and post-processing."""
        return self.tiles_tissue / self.model_seconds if self.model_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tiles_per_s"] = self.tiles_per_s
        d["model_tiles_per_s"] = self.model_tiles_per_s
        return d

    def line(self) -> str:
        """The one-line summary the CLI prints on stderr."""
        outs = ", ".join(self.outputs.values()) or self.out
        colour = colour_clause(self.summary)
        if self.status == "skipped":
            made = f" (wrote the missing {', '.join(self.written)})" if self.written else ""
            what = " (no tissue)" if self.outcome == NO_TISSUE else ""
            verdict = verdict_line(self.verdict)
            return (f"{self.slide}: already complete{what}, left alone{'; ' + verdict if verdict else ''}: {outs} "
                    f"(use --overwrite to redo){made}{colour}")
        if self.status == NO_TISSUE:
            return f"{self.slide}: no tissue ({no_tissue_reason(self.tiles_grid, self.min_tissue)}) -> {outs}{colour}"
        windows = f", {self.windows} windows at overlap {self.overlap:g}" if self.overlap else ""
        scored = f", {self.tissue_scored:.1%} of the tissue scored" if self.tissue_scored is not None else ""
        verdict = verdict_line(self.verdict)
        return (f"{self.slide}: {self.tiles_tissue} tiles ({self.tiles_failed} unreadable{windows}{scored}) in "
                f"{self.seconds:.1f} s, {self.tiles_per_s:.1f} tiles/s end to end, {self.model_tiles_per_s:.1f} "
                f"tiles/s in the model [{self.device}]{'; ' + verdict if verdict else ''} -> {outs}{colour}")


#: ``InferResult.status`` / the store's ``status`` of a slide without a tile of tissue.
NO_TISSUE = "no tissue"


def no_tissue_reason(grid_tiles: int, min_tissue: float | None) -> str:
    thr = f"{min_tissue:g}" if min_tissue is not None else "--min-tissue"
    return f"0 of {grid_tiles} grid tiles have >= {thr} tissue"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _block_for(tile_size: int, fm_size: int, pixel_downsample: int) -> int:
    """Map pixels per tile side; refuses downsamples that do not tile the map exactly."""
    d = pixel_downsample
    if d < 1 or tile_size % d:
        raise BadInputError(f"--pixel-downsample {d} must divide the tile size {tile_size} (e.g. 1, 2, 4, 8, 16)")
    b = tile_size // d
    if b < fm_size and fm_size % b:
        raise BadInputError(f"--pixel-downsample {d}: {tile_size // d} map pixels per tile does not divide the "
                            f"model's {fm_size}x{fm_size} map")
    return b


@contextmanager
def _writing(path: Path, what: str) -> Iterator[None]:
    """An OSError while writing (a full disk, a lost mount) becomes one line naming the output."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, what, exc) from None


class _Writer(threading.Thread):
    """Drains (indices, blocks, ok) batches into the map assembler; the first error is kept for the caller."""

    def __init__(self, assembler: MapAssembler, out: Path):
        super().__init__(name="wsi-haloae-writer", daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self.asm = assembler
        self.out = out
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # keep draining so the producer never blocks on a dead writer
            idx, blocks, ok = item
            try:
                with _writing(self.out, STORE.what):
                    for j, i in enumerate(idx):
                        self.asm.add(int(i), blocks[j] if ok[j] else None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self.error = exc

    def put(self, item) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def run_infer(cfg: InferConfig, loaded=None) -> InferResult:
    """Run ``cfg.model`` (or ``loaded``) over ``cfg.slide``; write OUT.zarr and the requested extras.

    Never prints: it logs, and returns what it did (the CLI prints ``result.line()``). Every output is checked
    against the inputs and locked before any work; all of them appear together or not at all.
    """
    t_start = time.perf_counter()
    paths = outputs.planned(cfg.out, cfg.outputs)
    guard_outputs(outputs.labelled(paths), {"slide": cfg.slide, "--model": cfg.model})
    for name, p in paths.items():
        writers.check_writable(p, outputs.BY_NAME[name].what)
    with ExitStack() as locks:
        for name, p in paths.items():
            locks.enter_context(output_lock(p, outputs.BY_NAME[name].what))
        if not cfg.overwrite and STORE.is_complete(paths[STORE.name]):
            return _complete_the_extras(cfg, paths, t_start, loaded)
        return _run(cfg, paths, loaded, t_start)


def _complete_the_extras(cfg: InferConfig, paths: dict[str, Path], t_start: float, loaded) -> InferResult:
    """A complete store is there: leave it alone, and make only the requested extras that are missing."""
    out = paths[STORE.name]
    attrs = writers.read_attrs(out)
    _check_same_run(cfg, out, attrs, loaded)
    missing = {n: p for n, p in paths.items() if not outputs.BY_NAME[n].is_complete(p)}
    temps = {n: partial_name(p) for n, p in missing.items()}
    try:
        if missing:
            _write_extras(outputs.StoreContext(writers.open_store(out), attrs, Path(cfg.slide)), missing, temps)
            with _writing(next(iter(missing.values())), "outputs"):
                publish([(temps[n], missing[n]) for n in missing])
    finally:
        for t in temps.values():
            remove_path(t)
    result = InferResult.from_attrs(attrs, cfg.slide, "skipped", time.perf_counter() - t_start, paths,
                                    written=list(missing))
    log.debug("%s", result.line())
    return result


def _check_same_run(cfg: InferConfig, out: Path, attrs: dict[str, Any], loaded) -> None:
    """A complete store is only "already done" for the same slide and model: anything else is refused rather
    than reported as this run's result."""
    from ..slide.reader import open_slide

    recorded = attrs.get("slide") or {}
    scan = recorded.get("properties_sha256")  # the scan, wherever its file has moved since
    if scan and scan != open_slide(cfg.slide).properties_sha256:
        raise OutputError(f"{out}: complete, but made from another slide ({recorded.get('path')}); use --overwrite "
                          "to replace it, or choose another --out")
    sha = (attrs.get("model") or {}).get("sha256")
    if loaded is not None:
        have = loaded.sha256
    elif Path(cfg.model).is_file():
        from ..model.features import file_sha256

        have = file_sha256(Path(cfg.model))
    else:
        return  # no model file to compare with: the store stands on its own
    if sha and sha != have:
        raise OutputError(f"{out}: complete, but made by another model (sha256 {sha[:12]}...); use --overwrite to "
                          "replace it, or choose another --out")
    _warn_other_calls(cfg, out, attrs)


def _warn_other_calls(cfg: InferConfig, out: Path, attrs: dict[str, Any]) -> None:
    """A complete store keeps the calls it was made with: say so when this run asked for other ones."""
    differ = other_calls(attrs.get("calls"), cfg.options.threshold, cfg.options.fdr)
    if differ:
        log.warning("%s: complete, with calls %s; its calls are kept (use --overwrite to redo them)", out, differ)


def _write_extras(ctx: outputs.StoreContext, extras: dict[str, Path], temps: dict[str, Path]) -> None:
    """Write each extra from the finished store to its temp name (the caller publishes them)."""
    for name, p in extras.items():
        kind = outputs.BY_NAME[name]
        with _writing(p, kind.what):
            kind.write(ctx, temps[name])


def _run(cfg: InferConfig, paths: dict[str, Path], loaded, t_start: float) -> InferResult:
    from ..model.checkpoint import load_model
    from ..slide.reader import open_slide

    opts = cfg.options
    start_time = _now()
    out = paths[STORE.name]
    if loaded is None:
        device = resolve_device(opts.device)
        loaded = load_model(cfg.model, device=device)
    else:
        device = next(loaded.model.parameters()).device
    model = loaded.model.eval()
    mcfg = model.config
    block = _block_for(mcfg.tile_size, mcfg.fm_size, opts.pixel_downsample)

    reader = open_slide(cfg.slide)
    res = _resolution(cfg, reader, loaded.metadata.get("mpp"))
    plan = _plan_map(reader, res, mcfg.tile_size, opts)
    grid, win, geom = plan.grid, plan.windows, plan.geom
    n = len(grid)
    colour = check_slide_colours(grid, reader.bounds, model)  # flagged slides are still scored (infer/colour.py)
    if n:  # without tissue the one warning is "no tissue found"; the colour verdict is still recorded
        warn_if_unusual(cfg.slide, colour)

    tmp = partial_name(out)
    extras = {k: p for k, p in paths.items() if k != STORE.name}
    temps = {k: partial_name(p) for k, p in extras.items()}
    try:
        with _writing(out, STORE.what):
            group = writers.open_new_store(tmp, ngff=opts.ngff)
            level0 = writers.create_map_level(group, "0", (geom.height, geom.width))
        assembler = MapAssembler(level0, plan.px, plan.py, block, blend_window(block, win.per_tile),
                                 finalize=plan.tissue)
        w_mean = np.full(len(win), np.nan, np.float32)
        w_max = np.full(len(win), np.nan, np.float32)
        w_ok = np.zeros(len(win), bool)
        model_s, w_failed, batch_size = _run_tiles(cfg, loaded, device, grid, win, block, assembler, w_mean, w_max,
                                                   w_ok, out)
        # one score per grid tile, its own window's (see assembler.tile_scores_from_windows)
        score_mean, score_max = tile_scores_from_windows(win.tile_window, w_mean, w_max)
        ok_all = w_ok[win.tile_window]
        failed = int(n - ok_all.sum())
        sc = call_slide(score_mean, grid, res.slide_mpp, loaded.metadata, loaded.sha256,
                        f"model {loaded.path or cfg.model}", opts)
        with _writing(out, STORE.what):
            assembler.finish()
            _write_tables(group, grid, plan.px[win.tile_window], plan.py[win.tile_window], score_mean, score_max,
                          ok_all)
            _write_calls(group["tiles"], sc)
            n_levels = writers.build_pyramid(group, written=assembler.written)
            writers.write_multiscales(group, n_levels, geom.um)
        thr = robust_threshold(score_mean)
        display_range, display_source = sc.display_range(score_max)
        attrs: dict[str, Any] = {
            "format": "wsi-haloae-heatmap",
            "format_version": 1,
            "package_version": __version__,
            "status": "done" if n else NO_TISSUE,
            "start_time": start_time,
            "model": {
                "path": str(loaded.path or cfg.model),
                "sha256": loaded.sha256,
                "config": mcfg.to_dict(),
                "backbone": getattr(model, "backbone_info", {}),
                "metadata": loaded.metadata,
            },
            "slide": {
                "path": str(Path(cfg.slide).absolute()),
                "id": cfg.slide_id or slide_id(cfg.slide),
                "width": reader.dimensions[0],
                "height": reader.dimensions[1],
                "mpp": reader.mpp,
                "bounds": list(reader.bounds),
                "vendor": getattr(reader, "vendor", None),
                "properties_sha256": reader.properties_sha256,
            },
            "target_mpp": res.target_mpp,
            "resolution": _resolution_attrs(res),
            "tile_size": mcfg.tile_size,
            "level0_tile": grid.level0_tile,
            "min_tissue": opts.min_tissue,
            "pixel_downsample": opts.pixel_downsample,
            "ngff": opts.ngff,
            "map": {
                "um_per_px": geom.um,
                "slide_px_per_map_px": geom.slide_px,
                "origin_level0": [geom.origin_x, geom.origin_y],
                "levels": n_levels,
                "shape": [geom.height, geom.width],
                **_scored_pixels(plan.tissue),
            },
            "tiles": {"grid": grid.n_grid, "n_rows": grid.n_rows, "n_cols": grid.n_cols, "tissue": n,
                      "failed": failed, "scored": n - failed},
            **_window_attrs(grid, win, w_failed),
            "threshold": thr,
            **sc.attrs(),  # calls, calibration, verdict
            "display_range": display_range,
            "display_range_source": display_source,
            "summary": {**slide_summary(score_mean, grid.mask, n), **sc.summary()},
            "geojson": {"offset": [reader.bounds[0], reader.bounds[1]], "class": "Anomalous"},
            "device": str(device),
            "batch_size": batch_size,
            "batch_size_requested": opts.batch_size,
            "workers": opts.workers,
            "model_seconds": model_s,
        }
        attrs["colour_qc"] = colour_attrs(colour)
        attrs["summary"].update(colour_summary(colour))
        with _writing(out, STORE.what):
            group.attrs[writers.ATTR] = attrs
        _write_extras(outputs.StoreContext(group, attrs, Path(cfg.slide)), extras, temps)
        seconds = time.perf_counter() - t_start
        attrs.update(end_time=_now(), seconds=seconds, tiles_per_s=n / seconds if seconds else 0.0,
                     model_tiles_per_s=n / model_s if model_s else 0.0,
                     outputs={k: str(v) for k, v in paths.items()})
        with _writing(out, STORE.what):
            writers.mark_complete(tmp, attrs)
        with _writing(out, "outputs"):
            publish([*((temps[k], extras[k]) for k in extras), (tmp, out)])  # the store last
    finally:
        remove_path(tmp)
        for t in temps.values():
            remove_path(t)

    result = InferResult.from_attrs(attrs, cfg.slide, attrs["status"], time.perf_counter() - t_start, paths)
    if result.status == NO_TISSUE:
        log.warning("%s: no tissue found (%s); check the slide or lower --min-tissue", cfg.slide,
                    no_tissue_reason(grid.n_grid, opts.min_tissue))
    log.debug("%s", result.line())
    return result


# ------------------------------------------------------------------------------ resolution and the map's plan
def _resolution(cfg: InferConfig, reader, model_mpp: float | None):
    """The one rule set of every command (``slide.resolution``); its warnings are logged here.

    Refuses, before any tile is planned, a slide that records no mpp without ``--slide-mpp`` and a target
    more than 4x finer than level 0.
    """
    from ..slide.resolution import resolve_resolution

    opts = cfg.options
    res = resolve_resolution(str(cfg.slide), reader.mpp, slide_mpp=opts.slide_mpp, mpp=opts.mpp,
                             magnification=opts.magnification, model_mpp=model_mpp)
    for line in res.warnings:
        log.warning("%s", line)
    if res.source == "slide":
        log.info("model records no training mpp: using the slide's level 0 (%s µm/px)", res.target_mpp)
    return res


def _resolution_attrs(res) -> dict[str, Any]:
    return {"target_mpp": res.target_mpp, "slide_mpp": res.slide_mpp, "source": res.source,
            "slide_mpp_declared": res.slide_mpp_declared, "warnings": list(res.warnings)}


@dataclass
class MapPlan:
    """Where everything of one slide's map goes: the grid of tiles (scores, tables, GeoJSON), the windows
    that are scored (= the tiles at overlap 0), the map's geometry, each window's map-pixel top-left and
    the tissue mask at map resolution (NaN off tissue, and the scored-pixel count)."""

    grid: Any  # slide.grid.TileGrid
    windows: Any  # slide.grid.Windows
    geom: writers.MapGeometry
    px: np.ndarray
    py: np.ndarray
    tissue: MapTissue


def _plan_map(reader, res, tile_size: int, opts) -> MapPlan:
    """Edge tiles included (read padded with the slide's glass), tiles with >= ``min_tissue``, windows at
    ``overlap``. The map's physical size comes from the resolution's level 0 (the file's or ``--slide-mpp``)."""
    from ..slide.grid import build_grid, plan_windows

    grid = build_grid(reader, res, tile_size=tile_size, min_tissue=opts.min_tissue, cover_edges=True)
    win = plan_windows(grid, opts.overlap)
    geom = writers.MapGeometry.for_slide(reader.bounds, res.slide_mpp, grid.scale, tile_size, opts.pixel_downsample)
    px, py = geom.window_origins(win.rows, win.cols, win.per_tile)
    return MapPlan(grid, win, geom, px, py, MapTissue(grid.mask, grid.mask_downsample, geom))


def _scored_pixels(tissue: MapTissue) -> dict[str, Any]:
    """How much of the tissue the level-0 map scores: finite map pixels over tissue-mask pixels at map resolution."""
    total = tissue.pixels()
    return {"tissue_pixels": total, "scored_pixels": tissue.scored,
            "scored_fraction": round(tissue.scored / total, 6) if total else None}


def _window_attrs(grid, win, failed: int) -> dict[str, Any]:
    return {"overlap": win.overlap, "windows": {"n": len(win), "per_tile": win.per_tile, "failed": failed},
            "cover_edges": grid.cover_edges, "background": list(grid.background)}


def slide_summary(score_mean: np.ndarray, mask: np.ndarray, tiles: int) -> dict[str, Any]:
    """The slide's figures a cohort shows, stored in the store's attributes (``summary``).

    ``score_*``: over the scored tiles' mean anomaly (the raw per-tile value infer exports);
    ``tissue_fraction``: the tissue mask's share of the slide. The calls and verdict are added beside these
    (``calls.SlideCalls.summary``: ``anomalous_tiles``, ``verdict`` ...).
    """
    s = np.asarray(score_mean, dtype=np.float64)
    s = s[np.isfinite(s)]
    has = s.size > 0
    return {
        "tiles": int(tiles),
        "tissue_fraction": round(float(mask.mean()), 4) if mask.size else None,
        "score_mean": float(s.mean()) if has else None,
        "score_p95": float(np.quantile(s, 0.95)) if has else None,
        "score_max": float(s.max()) if has else None,
    }


def _scorer(model: torch.nn.Module, mean_map: torch.Tensor, block: int) -> Callable[[torch.Tensor], tuple]:
    """The per-batch computation: uint8 tiles (B, 3, T, T) on the model's device -> (map blocks (B, block,
    block), tile mean scores (B,), tile max scores (B,)), all still on that device; ``score_batch`` is the one
    scoring path (calibration uses it too)."""
    from ..model.anomaly_map import score_batch

    def score(tiles: torch.Tensor) -> tuple:
        return score_batch(model, tiles.float().div_(255.0), mean_map, block=block)

    return score


def _batch_size(cfg: InferConfig, model, mean_map: torch.Tensor, device: torch.device, n: int, block: int,
                workers: int) -> int:
    """``--batch-size``, reduced with a warning to what fits in memory (infer/batch.py)."""
    requested = cfg.options.batch_size
    if min(requested, n) <= 1:
        return requested  # nothing to reduce
    per_model = batch.bytes_per_tile(lambda m, mm: _scorer(m, mm, block), model, mean_map, device)
    per_host = batch.host_bytes_per_tile(model.config.tile_size, block, workers, QUEUE_BATCHES)
    return batch.fit_batch_size(requested, n, device, per_model, per_host, batch.available_host_bytes(),
                                batch.available_device_bytes(device))


def _run_tiles(cfg: InferConfig, loaded, device: torch.device, grid, win, block: int,
               assembler: MapAssembler, score_mean: np.ndarray, score_max: np.ndarray,
               ok_all: np.ndarray, out: Path) -> tuple[float, int, int]:
    """The hot loop over the windows ``win`` (the grid's tiles at overlap 0); the arrays are per window.
    Returns (synchronised model seconds, unreadable window count, batch size used)."""
    from tqdm import tqdm

    from .dataset import TileDataset, make_loader

    n = len(win)
    opts = cfg.options
    if n == 0:
        return 0.0, 0, opts.batch_size
    unit = "tile" if win.per_tile == 1 else "window"
    mcfg = loaded.model.config
    cuda = device.type == "cuda"
    # channels_last on every device: cuDNN's and oneDNN's fast convolution layout (+30-60 % tiles per CPU
    # second measured in benchmarks/RESULTS.md, same outputs)
    loaded.model.to(memory_format=torch.channels_last)
    mean_map = loaded.mean_map.to(device).float()
    score = _scorer(loaded.model, mean_map, block)
    workers = opts.workers
    if workers and multiprocessing.current_process().daemon:
        log.warning("%s: running in a daemonic process, which cannot start tile readers: reading in-process", cfg.slide)
        workers = 0
    batch_size = _batch_size(cfg, loaded.model, mean_map, device, n, block, workers)
    workers = min(workers, (n - 1) // batch_size)  # a slide of one batch is read faster in-process
    max_failed = int(math.floor(opts.max_failed_fraction * n))
    ds = TileDataset(cfg.slide, win.xs, win.ys, mcfg.tile_size, None, scale=grid.scale, fill=grid.background)
    loader = make_loader(ds, batch_size, workers, pin_memory=cuda)
    writer = _Writer(assembler, out)
    writer.start()
    model_s = 0.0
    failed = 0
    bar = tqdm(total=n, unit=unit, desc=Path(cfg.slide).name, disable=not opts.progress, file=sys.stderr,
               dynamic_ncols=True, smoothing=0.1)
    try:
        with torch.inference_mode():
            for tiles, idx, ok in loader:
                ok_np = ok.numpy().astype(bool)
                idx_np = idx.numpy()
                nbad = int((~ok_np).sum())
                if nbad:
                    failed += nbad
                    if failed > max_failed:
                        raise BadSlideError(
                            f"slide {cfg.slide}: {failed} of {n} tissue {unit}s could not be read (more than "
                            f"{opts.max_failed_fraction:.0%}); the file looks truncated or corrupt"
                        )
                x = tiles.to(device, non_blocking=True)
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                pp, mean, mx = score(x)
                if cuda:
                    torch.cuda.synchronize(device)
                model_s += time.perf_counter() - t0
                blocks = pp.to("cpu", torch.float32).numpy()
                mean_np, max_np = mean.float().cpu().numpy(), mx.float().cpu().numpy()
                if not (np.isfinite(mean_np[ok_np]).all() and np.isfinite(max_np[ok_np]).all()):
                    raise BadModelFileError(
                        f"{loaded.path or cfg.model}: the model's anomaly maps hold NaN or infinite values "
                        "(its weights or mean map are probably corrupt, e.g. a diverged training run); "
                        "nothing was written")
                score_mean[idx_np] = np.where(ok_np, mean_np, np.nan)
                score_max[idx_np] = np.where(ok_np, max_np, np.nan)
                ok_all[idx_np] = ok_np
                writer.put((idx_np, blocks, ok_np))
                bar.update(len(idx_np))
    except BaseException:
        writer.error = writer.error or RuntimeError("aborted")
        writer.q.put(None)  # the writer skips what is queued once .error is set, so this never blocks long
        writer.join()
        raise
    finally:
        bar.close()
        del loader
    writer.close()
    return model_s, failed, batch_size


def _write_tables(group, grid, px, py, score_mean, score_max, ok) -> None:
    """Per-tile tables, score grids (NaN outside tissue / unreadable) and the tissue mask."""
    t = group.create_group("tiles")
    writers.write_table(t, "xy", np.stack([grid.xs, grid.ys], axis=1).astype(np.int64))
    writers.write_table(t, "rc", np.stack([grid.rows, grid.cols], axis=1).astype(np.int32))
    writers.write_table(t, "map_xy", np.stack([px, py], axis=1).astype(np.int64))
    writers.write_table(t, "tissue", grid.tissue.astype(np.float32))
    writers.write_table(t, "score_mean", score_mean)
    writers.write_table(t, "score_max", score_max)
    writers.write_table(t, "ok", ok.astype(bool))
    t.attrs["description"] = ("one row per tissue tile, in grid order: xy = level-0 top-left (bounds offset "
                              "included), rc = grid row/column, map_xy = top-left in level-0 map pixels, ok = read "
                              "and scored (False = unreadable, scores NaN); pvalue = conformal p-value against the "
                              "model's calibration (calibrated models only), anomalous = the call of attribute "
                              "'calls'")
    g = group.create_group("grid")
    for name, vals in (("score_mean", score_mean), ("score_max", score_max)):
        a = np.full((grid.n_rows, grid.n_cols), np.nan, np.float32)
        a[grid.rows, grid.cols] = vals
        writers.create_array(g, name, data=a, fill_value=np.nan,
                             chunks=(min(1024, max(1, grid.n_rows)), min(1024, max(1, grid.n_cols))))
    g.attrs["description"] = "(n_rows, n_cols) tile scores; NaN where there is no tissue or the tile was unreadable"
    m = writers.create_array(group, "mask", data=grid.mask.astype(np.uint8), chunks=(1024, 1024), fill_value=0)
    m.attrs["downsample"] = float(grid.mask_downsample)
    m.attrs["description"] = "tissue mask (1 = tissue); mask pixel (0, 0) = level-0 (0, 0); downsample = level-0 px per mask px"


def _write_calls(t, sc: SlideCalls) -> None:
    """The calls beside the scores, one row per tissue tile in grid order: ``pvalue`` (calibrated models only)
    and ``anomalous`` (the rule in force), so every output shows the same tiles as Anomalous."""
    if sc.pvalues is not None:
        writers.write_table(t, "pvalue", sc.pvalues)
    writers.write_table(t, "anomalous", sc.anomalous.astype(bool))
