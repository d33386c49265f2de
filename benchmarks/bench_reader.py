"""Reader throughput: tiles/s of tile reading alone, the I/O ceiling the pipeline must not fall below.

It reads the tissue tiles of the same real-tissue slide ``bench_infer`` uses, through the inference engine's
own ``TileDataset`` and DataLoader (``make_loader``) with 0, 1, 2, ... worker processes, and, as a lever, by
reading larger aligned regions (k x k tiles per ``read_region`` call) and splitting them into tiles. CPU
seconds per tile (this process plus reaped workers) are reported beside wall-clock rates: on a shared
machine the CPU cost is the steadier figure.

    python benchmarks/bench_reader.py [--quick] [--out results.json] [--size 8192] [--workers 0,1,2]
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import _common  # noqa: E402
from _slides import tissue_slide  # noqa: E402


def _cpu_all() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return _common.cpu_seconds() + ru.ru_utime + ru.ru_stime


class RegionDataset(Dataset):
    """Item = one k x k block of grid cells read with a single ``read_region`` call, split into its tissue tiles."""

    def __init__(self, slide: Path, grid, k: int):
        self.slide, self.k, self.t = str(slide), k, grid.tile_size
        self.x0, self.y0 = float(grid.xs[0] - grid.cols[0] * grid.level0_stride), float(grid.ys[0] - grid.rows[0] * grid.level0_stride)
        self.stride = grid.level0_stride
        blocks: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for r, c in zip(grid.rows.tolist(), grid.cols.tolist()):
            blocks.setdefault((r // k, c // k), []).append((r, c))
        self.blocks = list(blocks.items())

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> torch.Tensor:
        from wsi_haloae.slide.reader import open_slide

        (br, bc), cells = self.blocks[i]
        reader = open_slide(self.slide)
        r0, c0 = br * self.k, bc * self.k
        rows = max(r for r, _ in cells) - r0 + 1
        cols = max(c for _, c in cells) - c0 + 1
        x, y = int(round(self.x0 + c0 * self.stride)), int(round(self.y0 + r0 * self.stride))
        region = reader.read_region(x, y, 0, cols * self.t, rows * self.t)
        t = self.t
        tiles = [region[(r - r0) * t:(r - r0 + 1) * t, (c - c0) * t:(c - c0 + 1) * t] for r, c in cells]
        return torch.from_numpy(np.ascontiguousarray(np.stack(tiles).transpose(0, 3, 1, 2)))


def drain(loader, count) -> tuple[int, float, float]:
    """(tiles, wall seconds, CPU seconds incl. workers) for one full pass over ``loader``."""
    c0, t0 = _cpu_all(), time.perf_counter()
    n = 0
    it = iter(loader)
    for batch in it:
        n += count(batch)
    wall = time.perf_counter() - t0
    # persistent workers outlive the pass: stop and reap them now, so RUSAGE_CHILDREN holds their CPU time
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    del it
    gc.collect()
    return n, wall, _cpu_all() - c0


def main() -> None:
    p = _common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=None, help="Slide side in px (default 8192; quick 768).")
    p.add_argument("--workers", default=None, help="Comma-separated worker counts (default 0,1,2; quick 0,1).")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--region", type=int, default=4, help="k for the k x k region lever (0: skip).")
    p.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR)
    args = p.parse_args()
    t_start = time.perf_counter()
    result = _common.start("bench_reader", args)
    from wsi_haloae.infer.dataset import TileDataset, make_loader
    from wsi_haloae.slide.grid import build_grid
    from wsi_haloae.slide.reader import SlideReader

    size = args.size or (768 if args.quick else 8192)
    workers = [int(w) for w in args.workers.split(",")] if args.workers else ([0, 1] if args.quick else [0, 1, 2])
    args.workdir.mkdir(parents=True, exist_ok=True)
    slide, source = tissue_slide(size, args.workdir)
    with SlideReader(slide) as r:
        grid = build_grid(r, r.mpp, 256, min_tissue=0.5)
        mpp = r.mpp
    result["slide"] = {"path": str(slide), "source": source, "size": size, "tissue_tiles": len(grid)}
    print(f"# slide {slide} ({source}): {len(grid)} tissue tiles of {grid.n_grid}", flush=True)
    ds = TileDataset(slide, grid.xs, grid.ys, 256, mpp)
    for w in workers:
        loader = make_loader(ds, args.batch_size, w, pin_memory=False)
        n, wall, cpu = drain(loader, lambda b: int(b[0].shape[0]))
        del loader
        result["rows"].append({"mode": "TileDataset.read_tile", "workers": w, "tiles": n, "seconds": wall,
                               "tiles_per_s": n / wall, "cpu_ms_per_tile": 1e3 * cpu / n})
    if args.region > 1 and grid.scale == 1.0:
        rds = RegionDataset(slide, grid, args.region)
        for w in workers:
            kw = dict(num_workers=w, batch_size=None)
            if w:
                kw.update(persistent_workers=True, prefetch_factor=4)
            loader = DataLoader(rds, **kw)
            n, wall, cpu = drain(loader, lambda b: int(b.shape[0]))
            del loader
            result["rows"].append({"mode": f"read_region {args.region}x{args.region} + split", "workers": w, "tiles": n,
                                   "seconds": wall, "tiles_per_s": n / wall, "cpu_ms_per_tile": 1e3 * cpu / n})
    _common.print_table(result["rows"], ["mode", "workers", "tiles", "seconds", "tiles_per_s", "cpu_ms_per_tile"])
    _common.finish(result, args, t_start)


if __name__ == "__main__":
    main()
