"""Training throughput: images/s of the real training step (Cut&Paste batch, forward, three losses, Adam).

It calls the trainer's own epoch loop (``trainer._train_one_epoch``) on a DataLoader built as ``run_train``
builds it, over tiles cut from the benchmark tissue slide and loaded with ``load_tiles``; a warm-up epoch
runs first, then a timed one. Each step sees 3 x batch images (original, Cut&Paste normal, scar).

    python benchmarks/bench_train.py [--quick] [--out results.json] [--presets tiny,paper]
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _common  # noqa: E402
from _slides import tissue_slide  # noqa: E402


def tile_folder(workdir: Path, n: int) -> Path:
    """``n`` PNG tissue tiles cut from the benchmark slide (cached)."""
    from PIL import Image

    from wsi_haloae.slide.grid import build_grid
    from wsi_haloae.slide.reader import SlideReader

    folder = workdir / f"train-tiles-{n}"
    if folder.is_dir() and len(list(folder.glob("*.png"))) == n:
        return folder
    slide, _ = tissue_slide(max(1024, int(np.ceil(np.sqrt(n * 2.5))) * 256), workdir)
    folder.mkdir(parents=True, exist_ok=True)
    with SlideReader(slide) as r:
        g = build_grid(r, r.mpp, 256, min_tissue=0.5)
        for i in range(min(n, len(g))):
            Image.fromarray(r.read_tile(int(g.xs[i]), int(g.ys[i]), 256, r.mpp)).save(folder / f"t{i:04d}.png")
    return folder


def main() -> None:
    p = _common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=None, help="Comma-separated presets (default tiny,paper; quick tiny).")
    p.add_argument("--batch-size", type=int, default=None, help="Originals per step (default: CPU tiny 4 / paper 1; CUDA 16).")
    p.add_argument("--steps", type=int, default=None, help="Timed steps (default: CPU tiny 3 / paper 2; CUDA 20).")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 2; quick 0).")
    p.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR)
    args = p.parse_args()
    t_start = time.perf_counter()
    result = _common.start("bench_train", args)
    device = _common.resolve_device(args.device)
    cuda = device.type == "cuda"
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from wsi_haloae.config import TrainConfig
    from wsi_haloae.model import build_model
    from wsi_haloae.train.data import CutPasteDataset, EpochSampler, load_tiles
    from wsi_haloae.train.trainer import _train_one_epoch

    presets = args.presets.split(",") if args.presets else (["tiny"] if args.quick else ["tiny", "paper"])
    workers = args.workers if args.workers is not None else (0 if args.quick else 2)
    args.workdir.mkdir(parents=True, exist_ok=True)
    tiles = load_tiles(tile_folder(args.workdir, 8 if args.quick else 32), progress=False)
    for preset in presets:
        if args.quick:
            batch, steps, warm = 1, 1, 0  # one step, not warmed up: a smoke run, not a figure
        elif cuda:
            batch, steps, warm = 16, 20, 3
        else:
            batch, steps, warm = (4, 3, 1) if preset == "tiny" else (1, 2, 1)
        batch = args.batch_size or batch
        steps = args.steps or steps
        cfg = TrainConfig(tiles=tiles.root, out=args.workdir / "unused.safetensors", preset=preset, epochs=250,
                          samples_per_epoch=batch * steps, batch_size=batch, backbone_weights="random",
                          device=str(device), workers=workers)
        torch.manual_seed(0)
        model = build_model(preset, "random").to(device)
        opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
        ds = CutPasteDataset(tiles, cfg.samples_per_epoch, cfg.seed, cfg.jitter)
        sampler = EpochSampler(cfg.samples_per_epoch)
        loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=cuda,
                            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
        bar = tqdm(disable=True)
        t0 = time.perf_counter()
        step = 0
        if warm:
            _, step, _ = _train_one_epoch(model, opt, loader, sampler, 0, replace(cfg, max_steps=warm), device, bar, 0)
        if cuda:
            torch.cuda.synchronize(device)
        warm_s = time.perf_counter() - t0
        c0, t0 = _common.cpu_seconds(), time.perf_counter()
        _, step2, _ = _train_one_epoch(model, opt, loader, sampler, 1, cfg, device, bar, step)
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        cpu = _common.cpu_seconds() - c0
        n_steps = step2 - step
        images = 3 * batch * n_steps
        row = {"preset": preset, "batch_originals": batch, "images_per_step": 3 * batch, "steps": n_steps,
               "seconds": wall, "s_per_step": wall / n_steps, "images_per_s": images / wall,
               "originals_per_s": batch * n_steps / wall, "images_per_cpu_s": images / cpu if not cuda else None,
               "warmup_s": warm_s, "workers": workers, "device": str(device)}
        if cuda:
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        result["rows"].append(row)
        _common.save(result, args)
        print(f"  {preset}: {row['images_per_s']:.2f} images/s ({row['s_per_step']:.2f} s/step of {3 * batch} images)", flush=True)
        del loader, model, opt
    _common.print_table(result["rows"], ["preset", "batch_originals", "images_per_step", "steps", "s_per_step",
                                         "images_per_s", "originals_per_s", "images_per_cpu_s", "warmup_s", "workers"])
    _common.finish(result, args, t_start)


if __name__ == "__main__":
    main()
