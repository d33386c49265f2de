"""Whole-slide inference: tiles → DataLoader workers → model on the device → writer thread → OUT.zarr.

Three stages overlap. Worker processes read and decode tiles (one slide handle each); the main thread only
moves batches to the device and runs the model (bf16 autocast + channels_last on CUDA, normalisation on
the device); a writer thread behind a bounded queue pastes the maps into zarr chunks, so the device never
waits for compression or disk. Everything lands in a temp store that is renamed onto OUT.zarr only after
its completion marker is written (see writers.py): a run killed at any point leaves no complete-looking
output, and a rerun starts clean.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import multiprocessing
import queue
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..config import InferConfig
from ..errors import BadInputError, BadSlideError
from ..model.device import resolve_device
from . import writers
from .geojson import robust_threshold, write_geojson
from .ome_tiff import rgb_path_for, write_ome_tiff
from .preview import write_preview

log = logging.getLogger(__name__)

PREVIEW_SIZE = 1024
QUEUE_BATCHES = 8


@dataclass
class InferSummary:
    """What one ``infer`` run did; ``status`` is "done" or "skipped" (a complete output was already there)."""

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
        outs = ", ".join(self.outputs.values()) or self.out
        if self.status == "skipped":
            return f"{self.slide}: already complete, left alone: {outs} (use --overwrite to redo)"
        return (f"{self.slide}: {self.tiles_tissue} tiles ({self.tiles_failed} unreadable) in {self.seconds:.1f} s, "
                f"{self.tiles_per_s:.1f} tiles/s end to end, {self.model_tiles_per_s:.1f} tiles/s in the model "
                f"[{self.device}] -> {outs}")



def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _outputs(cfg: InferConfig) -> dict[str, Path]:
    outs = {"zarr": Path(cfg.out)}
    if cfg.tiff:
        outs["tiff"] = Path(cfg.tiff)
        outs["tiff_rgb"] = rgb_path_for(cfg.tiff)
    if cfg.geojson:
        outs["geojson"] = Path(cfg.geojson)
    if cfg.preview:
        outs["preview"] = Path(cfg.preview)
    return outs


def _check_outputs(outs: dict[str, Path]) -> None:
    for key, p in outs.items():
        writers.check_writable(p, "zarr store" if key == "zarr" else key)
    paths = [p.absolute() for p in outs.values()]
    if len(set(paths)) != len(paths):
        raise BadInputError("output paths must differ: " + ", ".join(str(p) for p in outs.values()))


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


class _Writer(threading.Thread):
    """Drains (indices, blocks, ok) batches into the chunk assembler; the first error is kept for the caller."""

    def __init__(self, assembler: writers.ChunkAssembler):
        super().__init__(name="wsi-haloae-writer", daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self.asm = assembler
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


def run_infer(cfg: InferConfig, loaded=None) -> InferSummary:
    """Run ``cfg.model`` (or ``loaded``) over ``cfg.slide``; write OUT.zarr and the requested extras."""
    t_start = time.perf_counter()
    start_time = _now()
    out = Path(cfg.out)
    outs = _outputs(cfg)
    _check_outputs(outs)

    if writers.is_complete(out) and not cfg.overwrite:
        made = _write_missing_extras(cfg, out)
        attrs = writers.read_attrs(out)
        tiles = attrs.get("tiles", {})
        s = InferSummary(slide=str(cfg.slide), out=str(out), status="skipped", tiles_grid=tiles.get("grid", 0),
                         tiles_tissue=tiles.get("tissue", 0), tiles_failed=tiles.get("failed", 0),
                         seconds=time.perf_counter() - t_start, device=attrs.get("device", ""),
                         mpp=attrs.get("target_mpp"), outputs={k: str(v) for k, v in outs.items()})
        print(s.line() + (f" (wrote missing {', '.join(made)})" if made else ""), file=sys.stderr)
        return s

    from ..model.checkpoint import load_model
    from ..slide.grid import build_grid, resolve_mpp
    from ..slide.reader import open_slide

    if loaded is None:
        device = resolve_device(cfg.device)
        loaded = load_model(cfg.model, device=device)
    else:
        device = next(loaded.model.parameters()).device
    model = loaded.model.eval()
    mcfg = model.config
    block = _block_for(mcfg.tile_size, mcfg.fm_size, cfg.pixel_downsample)

    reader = open_slide(cfg.slide)
    model_mpp = loaded.metadata.get("mpp")
    target = resolve_mpp(reader, cfg.mpp if cfg.mpp is not None else model_mpp)
    if cfg.mpp is None and model_mpp is None:
        log.info("model records no training mpp: using the slide's level 0 (%s µm/px)", target)
    grid = build_grid(reader, target, tile_size=mcfg.tile_size, min_tissue=cfg.min_tissue)
    n = len(grid)
    mpp0 = reader.mpp if reader.mpp is not None else target
    geom = writers.MapGeometry.for_slide(reader.bounds, mpp0, grid.scale, mcfg.tile_size, cfg.pixel_downsample)
    px, py = geom.tile_origins(grid.xs, grid.ys, grid.rows, grid.cols, grid.level0_stride)

    tmp = writers.tmp_path_for(out)
    try:
        group = writers.open_new_store(tmp)
        level0 = writers.create_map_level(group, "0", (geom.height, geom.width))
        assembler = writers.ChunkAssembler(level0, px, py, block)
        score_mean = np.full(n, np.nan, np.float32)
        score_max = np.full(n, np.nan, np.float32)
        ok_all = np.zeros(n, bool)
        model_s, failed = _run_tiles(cfg, loaded, device, grid, target, block, assembler,
                                     score_mean, score_max, ok_all)
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
            "min_tissue": cfg.min_tissue,
            "pixel_downsample": cfg.pixel_downsample,
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
            "geojson": {"offset": [reader.bounds[0], reader.bounds[1]], "class": "Anomalous"},
            "device": str(device),
            "batch_size": cfg.batch_size,
            "workers": cfg.workers,
            "model_seconds": model_s,
        }
        group.attrs[writers.ATTR] = attrs
        _write_extras(cfg, group, attrs, reader)
        seconds = time.perf_counter() - t_start
        attrs.update(end_time=_now(), seconds=seconds, tiles_per_s=n / seconds if seconds else 0.0,
                     model_tiles_per_s=n / model_s if model_s else 0.0,
                     outputs={k: str(v) for k, v in outs.items()})
        writers.finalize(tmp, out, attrs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    s = InferSummary(slide=str(cfg.slide), out=str(out), status="done", tiles_grid=grid.n_grid, tiles_tissue=n,
                     tiles_failed=failed, seconds=time.perf_counter() - t_start, model_seconds=model_s,
                     device=str(device), mpp=target, outputs={k: str(v) for k, v in outs.items()})
    print(s.line(), file=sys.stderr)
    return s


def _run_tiles(cfg: InferConfig, loaded, device: torch.device, grid, target: float, block: int,
               assembler: writers.ChunkAssembler, score_mean: np.ndarray, score_max: np.ndarray,
               ok_all: np.ndarray) -> tuple[float, int]:
    """The hot loop. Returns (synchronised model seconds, unreadable tile count)."""
    from tqdm import tqdm

    from ..model.anomaly_map import postprocess, tile_scores
    from .dataset import TileDataset, make_loader

    n = len(grid)
    if n == 0:
        return 0.0, 0
    model = loaded.model
    mcfg = model.config
    fm = mcfg.fm_size
    cuda = device.type == "cuda"
    mean_map = loaded.mean_map.to(device).float()
    # channels_last on every device: cuDNN's and oneDNN's fast convolution layout (+30-60 % tiles per CPU
    # second measured in benchmarks/RESULTS.md, same outputs)
    model = model.to(memory_format=torch.channels_last)
    max_failed = int(math.floor(cfg.max_failed_fraction * n))
    ds = TileDataset(cfg.slide, grid.xs, grid.ys, mcfg.tile_size, target)
    workers = min(cfg.workers, n // cfg.batch_size)  # a slide of one batch is read faster in-process
    if workers and multiprocessing.current_process().daemon:
        log.warning("%s: running in a daemonic process, which cannot start tile readers: reading in-process", cfg.slide)
        workers = 0
    loader = make_loader(ds, cfg.batch_size, workers, pin_memory=cuda)
    writer = _Writer(assembler)
    writer.start()
    model_s = 0.0
    failed = 0
    bar = tqdm(total=n, unit="tile", desc=Path(cfg.slide).name, disable=not cfg.progress, file=sys.stderr,
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
                            f"{cfg.max_failed_fraction:.0%}); the file looks truncated or corrupt"
                        )
                x = tiles.to(device, non_blocking=True)
                if cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                x = x.float().div_(255.0).contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
                    raw = model.anomaly_map(x)
                raw = raw.float()
                pp = postprocess(raw, mean_map)
                mean, mx = tile_scores(pp)
                if block > fm:
                    pp = postprocess(raw, mean_map, out_size=block)
                elif block < fm:
                    pp = F.avg_pool2d(pp[:, None], fm // block)[:, 0]
                if cuda:
                    torch.cuda.synchronize(device)
                model_s += time.perf_counter() - t0
                blocks = pp.to("cpu", torch.float32).numpy()
                score_mean[idx_np] = np.where(ok_np, mean.float().cpu().numpy(), np.nan)
                score_max[idx_np] = np.where(ok_np, mx.float().cpu().numpy(), np.nan)
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
    return model_s, failed


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
        g.create_dataset(name, data=a, chunks=(min(1024, max(1, grid.n_rows)), min(1024, max(1, grid.n_cols))),
                         fill_value=np.nan)
    g.attrs["description"] = "(n_rows, n_cols) tile scores; NaN where there is no tissue or the tile was unreadable"
    m = group.create_dataset("mask", data=grid.mask.astype(np.uint8), chunks=(1024, 1024), fill_value=0)
    m.attrs["downsample"] = float(grid.mask_downsample)
    m.attrs["description"] = "tissue mask (1 = tissue); mask pixel (0, 0) = level-0 (0, 0); downsample = level-0 px per mask px"


def _heat_level_index(levels: list, min_side: float) -> int:
    """The smallest map level whose long side still has ``min_side`` px (enough for the preview)."""
    best = 0
    for k, lvl in enumerate(levels):
        if max(lvl.shape) >= min_side:
            best = k
    return best


def _write_extras(cfg: InferConfig, group, attrs: dict[str, Any], reader) -> list[str]:
    """OME-TIFF (float + RGB), GeoJSON and preview from a finished map in ``group``. Returns what it wrote."""
    made = []
    levels = writers.map_levels(group)
    um = attrs["map"]["um_per_px"]
    vmin, vmax = attrs["display_range"]
    if cfg.tiff:
        write_ome_tiff(levels, um, cfg.tiff, rgb=False)
        write_ome_tiff(levels, um, rgb_path_for(cfg.tiff), rgb=True, vmin=vmin, vmax=vmax)
        made.append("tiff")
    if cfg.geojson:
        t = group["tiles"]
        xy, rc = t["xy"][:], t["rc"][:]
        write_geojson(cfg.geojson, xy[:, 0], xy[:, 1], attrs["level0_tile"], attrs["level0_tile"],
                      t["score_mean"][:], t["score_max"][:], threshold=attrs["threshold"]["value"],
                      offset=tuple(attrs["geojson"]["offset"]), rows=rc[:, 0], cols=rc[:, 1],
                      seed=f"{attrs['slide']['properties_sha256']}:{attrs['model']['sha256']}")
        made.append("geojson")
    if cfg.preview:
        thumb = reader.thumbnail(PREVIEW_SIZE)
        W, H = reader.dimensions
        k = _heat_level_index(levels, PREVIEW_SIZE * 0.75)
        heat = levels[k]
        s = attrs["map"]["slide_px_per_map_px"] * 2**k
        ox, oy = attrs["map"]["origin_level0"]
        hh, hw = heat.shape
        write_preview(cfg.preview, thumb, (W, H), heat[:], (ox, oy, ox + hw * s, oy + hh * s), vmin=vmin, vmax=vmax,
                      title=f"{Path(str(cfg.slide)).name}: anomaly score")
        made.append("preview")
    return made


def _write_missing_extras(cfg: InferConfig, out: Path) -> list[str]:
    """A complete store already exists: produce only the requested extras that are not on disk yet."""
    from dataclasses import replace

    missing = replace(
        cfg,
        tiff=cfg.tiff if cfg.tiff and not (Path(cfg.tiff).exists() and rgb_path_for(cfg.tiff).exists()) else None,
        geojson=cfg.geojson if cfg.geojson and not Path(cfg.geojson).exists() else None,
        preview=cfg.preview if cfg.preview and not Path(cfg.preview).exists() else None,
    )
    if not (missing.tiff or missing.geojson or missing.preview):
        return []
    group = writers.open_store(out)
    attrs = writers.read_attrs(out)
    reader = None
    if missing.preview:
        from ..slide.reader import open_slide

        reader = open_slide(cfg.slide)
    return _write_extras(missing, group, attrs, reader)
