"""Whole-slide inference: tiles → DataLoader workers → model on the device → writer thread → OUT.zarr.

Three stages overlap. Worker processes read and decode tiles (one slide handle each); the main thread only
moves batches to the device and runs the model (bf16 autocast + channels_last on CUDA, normalisation on
the device); a writer thread behind a bounded queue pastes the maps into zarr chunks, so the device never
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
import torch.nn.functional as F

from .. import __version__
from ..config import InferConfig
from ..errors import BadInputError, BadModelFileError, BadSlideError, OutputError
from ..fileio import guard_outputs, output_lock, partial_name, publish, remove_path, write_error
from ..model.device import resolve_device
from . import batch, outputs, writers
from .geojson import robust_threshold
from .outputs import STORE

log = logging.getLogger(__name__)

QUEUE_BATCHES = 8


@dataclass
class InferResult:
    """What one ``infer`` run did. ``status``: "done", or "skipped" (a complete store was already there).

    ``outputs``: every file of the slide by kind name (``infer.outputs``); ``written``: on a skip, the
    extras that were missing and were made from the existing store. ``summary``: the slide's figures as the
    store records them (attribute ``summary``), the row ``cohort`` shows.
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

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], slide: Path, status: str, seconds: float,
                   outputs: dict[str, Path], **kw) -> "InferResult":
        tiles = attrs.get("tiles", {})
        return cls(slide=str(slide), out=str(outputs[STORE.name]), status=status, tiles_grid=tiles.get("grid", 0),
                   tiles_tissue=tiles.get("tissue", 0), tiles_failed=tiles.get("failed", 0), seconds=seconds,
                   model_seconds=attrs.get("model_seconds", 0.0) if status == "done" else 0.0,
                   device=attrs.get("device", ""), mpp=attrs.get("target_mpp"),
                   outputs={k: str(v) for k, v in outputs.items()}, summary=dict(attrs.get("summary") or {}), **kw)

    @property
    def tiles_per_s(self) -> float:
        """End to end: tissue tiles over the whole run (open, grid, read, model, write, pyramid, extras)."""
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
        if self.status == "skipped":
            made = f" (wrote the missing {', '.join(self.written)})" if self.written else ""
            return f"{self.slide}: already complete, left alone: {outs} (use --overwrite to redo){made}"
        return (f"{self.slide}: {self.tiles_tissue} tiles ({self.tiles_failed} unreadable) in {self.seconds:.1f} s, "
                f"{self.tiles_per_s:.1f} tiles/s end to end, {self.model_tiles_per_s:.1f} tiles/s in the model "
                f"[{self.device}] -> {outs}")


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
    """Drains (indices, blocks, ok) batches into the chunk assembler; the first error is kept for the caller."""

    def __init__(self, assembler: writers.ChunkAssembler, out: Path):
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


def _write_extras(ctx: outputs.StoreContext, extras: dict[str, Path], temps: dict[str, Path]) -> None:
    """Write each extra from the finished store to its temp name (the caller publishes them)."""
    for name, p in extras.items():
        kind = outputs.BY_NAME[name]
        with _writing(p, kind.what):
            kind.write(ctx, temps[name])


def _run(cfg: InferConfig, paths: dict[str, Path], loaded, t_start: float) -> InferResult:
    from ..model.checkpoint import load_model
    from ..slide.grid import build_grid, resolve_mpp
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
    model_mpp = loaded.metadata.get("mpp")
    target = resolve_mpp(reader, opts.mpp if opts.mpp is not None else model_mpp)
    if opts.mpp is None and model_mpp is None:
        log.info("model records no training mpp: using the slide's level 0 (%s µm/px)", target)
    grid = build_grid(reader, target, tile_size=mcfg.tile_size, min_tissue=opts.min_tissue)
    n = len(grid)
    mpp0 = reader.mpp if reader.mpp is not None else target
    geom = writers.MapGeometry.for_slide(reader.bounds, mpp0, grid.scale, mcfg.tile_size, opts.pixel_downsample)
    px, py = geom.tile_origins(grid.xs, grid.ys, grid.rows, grid.cols, grid.level0_stride)

    tmp = partial_name(out)
    extras = {k: p for k, p in paths.items() if k != STORE.name}
    temps = {k: partial_name(p) for k, p in extras.items()}
    try:
        with _writing(out, STORE.what):
            group = writers.open_new_store(tmp, ngff=opts.ngff)
            level0 = writers.create_map_level(group, "0", (geom.height, geom.width))
        assembler = writers.ChunkAssembler(level0, px, py, block)
        score_mean = np.full(n, np.nan, np.float32)
        score_max = np.full(n, np.nan, np.float32)
        ok_all = np.zeros(n, bool)
        model_s, failed, batch_size = _run_tiles(cfg, loaded, device, grid, target, block, assembler,
                                                 score_mean, score_max, ok_all, out)
        with _writing(out, STORE.what):
            assembler.finish()
            _write_tables(group, grid, px, py, score_mean, score_max, ok_all)
            n_levels = writers.build_pyramid(group, written=assembler.written)
            writers.write_multiscales(group, n_levels, geom.um)
        thr = robust_threshold(score_mean)
        finite_max = score_max[np.isfinite(score_max)]
        vmax = float(np.quantile(finite_max, 0.99)) if finite_max.size else 1.0
        attrs: dict[str, Any] = {
            "format": "wsi-haloae-heatmap",
            "format_version": 1,
            "package_version": __version__,
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
                "width": reader.dimensions[0],
                "height": reader.dimensions[1],
                "mpp": reader.mpp,
                "bounds": list(reader.bounds),
                "vendor": getattr(reader, "vendor", None),
                "properties_sha256": reader.properties_sha256,
            },
            "target_mpp": target,
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
            },
            "tiles": {"grid": grid.n_grid, "n_rows": grid.n_rows, "n_cols": grid.n_cols, "tissue": n,
                      "failed": failed, "scored": n - failed},
            "threshold": thr,
            "display_range": [0.0, vmax],
            "summary": slide_summary(score_mean, grid.mask, thr["value"], n),
            "geojson": {"offset": [reader.bounds[0], reader.bounds[1]], "class": "Anomalous"},
            "device": str(device),
            "batch_size": batch_size,
            "batch_size_requested": opts.batch_size,
            "workers": opts.workers,
            "model_seconds": model_s,
        }
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

    result = InferResult.from_attrs(attrs, cfg.slide, "done", time.perf_counter() - t_start, paths)
    log.debug("%s", result.line())
    return result


def slide_summary(score_mean: np.ndarray, mask: np.ndarray, threshold: float | None, tiles: int) -> dict[str, Any]:
    """The slide's figures a cohort shows, stored in the store's attributes (``summary``).

    ``score_*``: over the scored tiles' mean anomaly (the per-tile value infer thresholds and exports);
    ``tissue_fraction``: the tissue mask's share of the slide; ``anomalous_tiles``: tiles above the slide's
    threshold.
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
        "anomalous_tiles": int((s > threshold).sum()) if has and threshold is not None else None,
    }


def _scorer(model: torch.nn.Module, mean_map: torch.Tensor, block: int) -> Callable[[torch.Tensor], tuple]:
    """The per-batch computation: uint8 tiles (B, 3, T, T) on the model's device -> (map blocks (B, block,
    block), tile mean scores (B,), tile max scores (B,)), all still on that device."""
    from ..model.anomaly_map import postprocess, tile_scores

    fm = model.config.fm_size
    cuda = mean_map.device.type == "cuda"

    def score(tiles: torch.Tensor) -> tuple:
        x = tiles.float().div_(255.0).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            raw = model.anomaly_map(x)
        raw = raw.float()
        pp = postprocess(raw, mean_map)
        mean, mx = tile_scores(pp)
        if block > fm:
            pp = postprocess(raw, mean_map, out_size=block)
        elif block < fm:
            pp = F.avg_pool2d(pp[:, None], fm // block)[:, 0]
        return pp, mean, mx

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


def _run_tiles(cfg: InferConfig, loaded, device: torch.device, grid, target: float, block: int,
               assembler: writers.ChunkAssembler, score_mean: np.ndarray, score_max: np.ndarray,
               ok_all: np.ndarray, out: Path) -> tuple[float, int, int]:
    """The hot loop. Returns (synchronised model seconds, unreadable tile count, batch size used)."""
    from tqdm import tqdm

    from .dataset import TileDataset, make_loader

    n = len(grid)
    opts = cfg.options
    if n == 0:
        return 0.0, 0, opts.batch_size
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
    ds = TileDataset(cfg.slide, grid.xs, grid.ys, mcfg.tile_size, target)
    loader = make_loader(ds, batch_size, workers, pin_memory=cuda)
    writer = _Writer(assembler, out)
    writer.start()
    model_s = 0.0
    failed = 0
    bar = tqdm(total=n, unit="tile", desc=Path(cfg.slide).name, disable=not opts.progress, file=sys.stderr,
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
                            f"slide {cfg.slide}: {failed} of {n} tissue tiles could not be read (more than "
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
                              "and scored (False = unreadable, scores NaN)")
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
