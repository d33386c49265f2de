"""Training throughput: images/s of the real training step (Cut&Paste batch, forward, three losses, Adam).

It calls the trainer's own epoch loop (``trainer._train_one_epoch``, with ``prepare_model`` and the step
options ``run_train`` uses) on a DataLoader built as ``run_train`` builds it, over tiles cut from the benchmark
tissue slide; a warm-up runs first, then a timed epoch. Each step sees 3 x batch images (original, Cut&Paste
normal, scar). FLOPs per step are counted by ``torch.utils.flop_counter`` (``train.estimate.train_step_flops``:
forward, losses, backward) and the achieved FLOP/s is compared with a measured matmul rate of the same device
and dtype. ``vgg_share`` is the frozen backbone's share of the step (timed apart on the same 3B images): the
most that sharing features between the three views could save. Levers, one at a time: channels_last, bf16
autocast, torch.compile (CUDA).

    python benchmarks/bench_train.py [--quick] [--out results.json] [--presets tiny,paper] [--device cuda]
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


def plan(cuda: bool, quick: bool, presets: list[str] | None) -> list[dict]:
    """Configurations to time: the device's default step (StepOptions.for_device), then one lever at a time."""
    if quick:
        return [dict(preset="tiny", bf16=False, channels_last=False, compile=False, kind="default"),
                dict(preset="tiny", bf16=False, channels_last=True, compile=False, kind="lever")]
    names = presets or (["paper", "paper-authors-mask", "r31", "tiny"] if cuda else ["tiny", "paper"])
    rows = []
    for k, name in enumerate(names):
        base = dict(bf16=cuda, channels_last=cuda, compile=False)
        rows.append(dict(preset=name, kind="default", **base))
        if k == 0:  # levers on the first preset only: each costs a model build and a warm-up
            if cuda:
                rows.append(dict(preset=name, kind="lever", bf16=False, channels_last=True, compile=False))
                rows.append(dict(preset=name, kind="lever", bf16=True, channels_last=False, compile=False))
            else:
                rows.append(dict(preset=name, kind="lever", bf16=False, channels_last=True, compile=False))
    if cuda and names:  # torch.compile last: a minute or more to compile, so a time limit loses nothing else
        rows.append(dict(preset=names[0], kind="lever", bf16=True, channels_last=True, compile=True))
    return rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vgg_seconds(model, x: torch.Tensor, bf16: bool, device: torch.device, iters: int) -> float:
    """Seconds per call of the frozen backbone on one step's 3B images (what sharing features could save)."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        model.extract(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            model.extract(x)
        sync(device)
    return (time.perf_counter() - t0) / iters


def main() -> None:
    p = _common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=None, help="Comma-separated presets (default CPU tiny,paper; CUDA paper,paper-authors-mask,r31,tiny; quick tiny).")
    p.add_argument("--batch-size", type=int, default=None, help="Originals per step (default: CPU tiny 4 / paper 1; CUDA 4, the paper's).")
    p.add_argument("--steps", type=int, default=None, help="Timed steps (default: CPU tiny 3 / paper 2; CUDA 30).")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 2, CUDA 6; quick 0).")
    p.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR)
    args = p.parse_args()
    t_start = time.perf_counter()
    result = _common.start("bench_train", args)
    device = _common.resolve_device(args.device)
    cuda = device.type == "cuda"
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from bench_model import matmul_peak
    from wsi_haloae.config import ModelConfig, TrainConfig
    from wsi_haloae.model import build_model
    from wsi_haloae.train.data import CutPasteDataset, EpochSampler, load_tiles
    from wsi_haloae.train.estimate import train_step_flops
    from wsi_haloae.train.trainer import StepOptions, _train_one_epoch, prepare_model

    presets = args.presets.split(",") if args.presets else None
    workers = args.workers if args.workers is not None else (0 if args.quick else (6 if cuda else 2))
    args.workdir.mkdir(parents=True, exist_ok=True)
    tiles = load_tiles(tile_folder(args.workdir, 8 if args.quick else 32), progress=False)
    n = 512 if args.quick else (8192 if cuda else 2048)
    peaks, peaks_cpu = {}, {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if name == "bf16" and not cuda:
            continue  # no native bf16 on the development CPU; the training step runs fp32 there
        peaks[name], peaks_cpu[name] = matmul_peak(device, dt, n, 0.3 if args.quick else 1.0)
    result["matmul_peak_flops"], result["matmul_peak_flops_per_cpu_s"], result["matmul_n"] = peaks, peaks_cpu, n
    print(f"# matmul peak ({n}^3): " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()), flush=True)
    for row_cfg in plan(cuda, args.quick, presets):
        preset = row_cfg["preset"]
        if args.quick:
            batch, steps, warm = 1, 1, 0  # one step, not warmed up: a smoke run, not a figure
        elif cuda:
            batch, steps, warm = 4, 30, 3 if not row_cfg["compile"] else 2
        else:
            batch, steps, warm = (4, 3, 1) if preset.startswith("tiny") else (1, 2, 1)
        batch = args.batch_size or batch
        steps = args.steps or steps
        cfg = TrainConfig(tiles=tiles.root, out=args.workdir / "unused.safetensors", preset=preset, epochs=250,
                          samples_per_epoch=batch * steps, batch_size=batch, backbone_weights="random",
                          device=str(device), workers=workers)
        opts = StepOptions(bf16=row_cfg["bf16"], channels_last=row_cfg["channels_last"])
        torch.manual_seed(0)
        model = build_model(preset, "random").to(device)
        forward = prepare_model(model, opts, row_cfg["compile"])
        opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
        ds = CutPasteDataset(tiles, cfg.samples_per_epoch, cfg.seed, cfg.jitter)
        sampler = EpochSampler(cfg.samples_per_epoch)
        loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, pin_memory=cuda,
                            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
        bar = tqdm(disable=True)
        row = dict(row_cfg, dtype="bf16" if opts.bf16 else "fp32", batch_originals=batch, images_per_step=3 * batch,
                   workers=workers, device=str(device))
        try:
            t0 = time.perf_counter()
            step = 0
            if warm:
                _, step, _ = _train_one_epoch(forward, opt, loader, sampler, 0, replace(cfg, max_steps=warm), device, bar, 0, opts=opts)
            sync(device)
            warm_s = time.perf_counter() - t0
            c0, t0 = _common.cpu_seconds(), time.perf_counter()
            _, step2, _ = _train_one_epoch(forward, opt, loader, sampler, 1, cfg, device, bar, step, opts=opts)
            sync(device)
            wall = time.perf_counter() - t0
            cpu = _common.cpu_seconds() - c0
        except Exception as exc:  # noqa: BLE001 - a lever that does not run here is a result too
            _common.failed_row(row, exc, str(row_cfg), result, args)
            del loader, model, forward, opt
            continue
        n_steps = step2 - step
        images = 3 * batch * n_steps
        flops = train_step_flops(ModelConfig.preset(preset), batch)
        x = torch.rand(3 * batch, 3, 256, 256, device=device).contiguous(
            memory_format=torch.channels_last if opts.channels_last else torch.contiguous_format)
        vgg_s = vgg_seconds(model, x, opts.bf16, device, 1 if args.quick else 3)
        peak = peaks.get(row["dtype"], peaks["fp32"])
        row.update(steps=n_steps, seconds=wall, s_per_step=wall / n_steps, images_per_s=images / wall,
                   originals_per_s=batch * n_steps / wall, images_per_cpu_s=images / cpu if not cuda else None,
                   gflop_per_step=flops / 1e9, tflop_per_s=flops * n_steps / wall / 1e12,
                   frac_of_peak=flops * n_steps / wall / peak, vgg_s_per_step=vgg_s, vgg_share=vgg_s / (wall / n_steps),
                   warmup_s=warm_s)
        if not cuda:  # steadier on a shared CPU: FLOP per CPU second against the matmul's FLOP per CPU second
            row["frac_of_peak_cpu"] = flops * n_steps / cpu / peaks_cpu["fp32"]
        if cuda:
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        result["rows"].append(row)
        _common.save(result, args)
        print(f"  {preset} {row['dtype']} cl={int(opts.channels_last)} compile={int(row_cfg['compile'])}: "
              f"{row['images_per_s']:.2f} images/s ({row['s_per_step']:.3f} s/step of {3 * batch} images), "
              f"{row['tflop_per_s']:.3f} TFLOP/s = {100 * row['frac_of_peak']:.1f} % of matmul; VGG {100 * row['vgg_share']:.0f} % of the step",
              flush=True)
        del loader, model, forward, opt
        if cuda:
            torch.cuda.empty_cache()
    _common.print_table(result["rows"], ["preset", "kind", "dtype", "channels_last", "compile", "batch_originals",
                                         "images_per_step", "steps", "s_per_step", "images_per_s", "images_per_cpu_s",
                                         "gflop_per_step", "tflop_per_s", "frac_of_peak", "frac_of_peak_cpu",
                                         "vgg_share", "warmup_s"])
    _common.finish(result, args, t_start)


if __name__ == "__main__":
    main()
