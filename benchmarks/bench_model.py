"""Model throughput: tiles/s of ``HaloAE.anomaly_map`` per preset, batch size, dtype and layout.

Why: the model is the ceiling of the whole pipeline, so its speed (and how far it is from the hardware) is the
first thing to know. FLOPs per tile are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta
device (nothing computed), and the achieved FLOP/s is compared with a measured matmul peak of the same
device and dtype. Weights are random (a seeded backbone): speed does not depend on them.

    python benchmarks/bench_model.py [--quick] [--out results.json] [--device cuda] [--compile]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import _common  # noqa: E402


def flops_per_tile(preset: str) -> int:
    """FLOPs of anomaly_map for one 256x256 tile (meta device: instant, no weights)."""
    from wsi_haloae.config import ModelConfig
    from wsi_haloae.model.haloae import HaloAE

    cfg = ModelConfig.preset(preset)
    with torch.device("meta"):
        model = HaloAE(cfg).eval()
        x = torch.empty(1, 3, cfg.tile_size, cfg.tile_size)
    with FlopCounterMode(display=False) as fc:
        model.anomaly_map(x)
    return int(fc.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 1.0) -> tuple[float, float]:
    """(FLOP/s, FLOP per process CPU second) of a square matmul: the practical peak the model is compared with.

    The per-CPU-second figure is what to compare on a shared CPU, where wall-clock rates drop with other load.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    it, t0, c0 = 0, time.perf_counter(), _common.cpu_seconds()
    while True:
        a @ b
        it += 1
        sync(device)
        dt = time.perf_counter() - t0
        if dt >= seconds and it >= 2:
            cpu = _common.cpu_seconds() - c0
            return 2 * n**3 * it / dt, 2 * n**3 * it / cpu if cpu > 0 else 0.0


def time_fn(fn, x: torch.Tensor, device: torch.device, min_iters: int, min_s: float, max_s: float,
            warmup: int = 1) -> tuple[float, int, float, float]:
    """(seconds per batch, iterations, process CPU seconds per batch, first-call seconds)."""
    t = time.perf_counter()
    for _ in range(warmup):
        fn(x)
    sync(device)
    first = time.perf_counter() - t
    it = 0
    c0, t0 = _common.cpu_seconds(), time.perf_counter()
    while True:
        fn(x)
        sync(device)
        it += 1
        dt = time.perf_counter() - t0
        if it >= min_iters and (dt >= min_s or dt >= max_s):
            break
        if dt >= max_s:
            break
    return dt / it, it, (_common.cpu_seconds() - c0) / it, first


def plan(device: torch.device, quick: bool, presets: list[str] | None, batch_sizes: list[int] | None,
         compile_: bool) -> list[dict]:
    """The configurations to time: a batch sweep per preset (default dtype/layout), then one lever at a time."""
    cuda = device.type == "cuda"
    if quick:
        table = {"tiny": ([1], 1)}
    elif cuda:
        table = {"paper": ([32, 64, 128, 256], 128), "r31": ([128], 128), "tiny": ([256], 256)}
    else:
        # the paper preset on a handful of tiles only (about a second per tile on 2 cores)
        table = {"tiny": ([1, 4, 8, 16, 32], 16), "r31": ([2], 2), "paper": ([1, 2], 2)}
    if presets:
        table = {p: table.get(p, ([2], 2)) for p in presets}
    base = dict(dtype="bf16", channels_last=True, compile=False) if cuda else dict(dtype="fp32", channels_last=False, compile=False)
    levers = ([dict(dtype="fp32", channels_last=True, compile=False), dict(dtype="bf16", channels_last=False, compile=False)]
              if cuda else
              [dict(dtype="fp32", channels_last=True, compile=False), dict(dtype="bf16", channels_last=False, compile=False),
               dict(dtype="bf16", channels_last=True, compile=False)])
    if quick:
        levers = [dict(dtype="bf16", channels_last=True, compile=False)]
    out, last = [], []
    for k, (preset, (sizes, lever_bs)) in enumerate(table.items()):
        lbs = lever_bs if not batch_sizes else max(batch_sizes)
        for bs in batch_sizes or sizes:
            out.append(dict(preset=preset, batch=bs, kind="sweep", **base))
        for lv in levers:
            out.append(dict(preset=preset, batch=lbs, kind="lever", **lv))
        # torch.compile costs a minute or more per model: only the first preset, and last of all, so that a
        # time limit (gpu_check.sh) loses nothing else; never in --quick
        if compile_ and k == 0 and not quick:
            last.append(dict(preset=preset, batch=lbs, kind="lever", **dict(base, channels_last=True, compile=True)))
    return out + last


def main() -> None:
    p = _common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--presets", help="Comma-separated presets (default: tiny,r31,paper; quick: tiny).")
    p.add_argument("--batch-sizes", help="Comma-separated batch sizes (overrides the per-preset defaults).")
    p.add_argument("--compile", action="store_true", help="Also time torch.compile (static batch shape).")
    p.add_argument("--min-seconds", type=float, default=None, help="Time each configuration at least this long.")
    args = p.parse_args()
    t_start = time.perf_counter()
    result = _common.start("bench_model", args)
    device = _common.resolve_device(args.device)
    from wsi_haloae.model import build_model

    cuda = device.type == "cuda"
    presets = args.presets.split(",") if args.presets else None
    sizes = [int(v) for v in args.batch_sizes.split(",")] if args.batch_sizes else None
    min_s = args.min_seconds if args.min_seconds is not None else (0.2 if args.quick else (1.0 if cuda else 3.0))
    max_s = 1.0 if args.quick else (10.0 if cuda else 20.0)

    n = 512 if args.quick else (8192 if cuda else 2048)
    peaks, peaks_cpu = {}, {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        try:
            peaks[name], peaks_cpu[name] = matmul_peak(device, dt, n, 0.3 if args.quick else 1.0)
        except RuntimeError:
            pass
    result["matmul_peak_flops"] = peaks
    result["matmul_peak_flops_per_cpu_s"] = peaks_cpu
    result["matmul_n"] = n
    print(f"# matmul peak ({n}^3): " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items()), flush=True)

    models: dict[str, torch.nn.Module] = {}
    flops: dict[str, int] = {}
    cols = ["preset", "kind", "batch", "dtype", "channels_last", "compile", "tiles_per_s", "tiles_per_cpu_s",
            "ms_per_tile", "gflop_per_tile", "tflop_per_s", "frac_of_peak", "frac_of_peak_cpu", "iters", "first_call_s"]
    for cfgrow in plan(device, args.quick, presets, sizes, args.compile):
        preset = cfgrow["preset"]
        if preset not in models:
            models = {preset: build_model(preset, backbone_weights="random").eval().to(device)}
            flops[preset] = flops_per_tile(preset)
            result["flops_per_tile"] = flops
        model = models[preset]
        cl = cfgrow["channels_last"]
        model = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        x = torch.rand(cfgrow["batch"], 3, 256, 256, device=device)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        bf16 = cfgrow["dtype"] == "bf16"

        # torch.compile cannot trace under inference_mode here ("Cannot set version_counter for inference
        # tensor" in halo attention's `rel_height.to(dtype).t()`): compiled runs use no_grad instead
        grad_off = torch.no_grad if cfgrow["compile"] else torch.inference_mode

        def run(inp, _m=model, _bf16=bf16, _off=grad_off):
            with _off(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=_bf16):
                return _m.anomaly_map(inp)

        fn = torch.compile(run, dynamic=False) if cfgrow["compile"] else run
        row = dict(cfgrow)
        try:
            per_batch, iters, cpu_per_batch, first = time_fn(fn, x, device, 1 if args.quick else 2, min_s, max_s,
                                                             warmup=2 if cfgrow["compile"] else 1)
        except Exception as exc:  # noqa: BLE001 - a lever that does not run here is a result too
            _common.failed_row(row, exc, f"{preset} {cfgrow}", result, args)
            continue
        b = cfgrow["batch"]
        tps = b / per_batch
        fl = flops[preset] * tps
        row.update(tiles_per_s=tps, ms_per_tile=1e3 * per_batch / b, tiles_per_cpu_s=b / cpu_per_batch if not cuda else None,
                   gflop_per_tile=flops[preset] / 1e9, tflop_per_s=fl / 1e12,
                   frac_of_peak=fl / peaks.get(cfgrow["dtype"], peaks["fp32"]), iters=iters, first_call_s=first)
        if not cuda:  # steadier on a shared CPU: FLOP per CPU second against the matmul's FLOP per CPU second
            row["frac_of_peak_cpu"] = flops[preset] * b / cpu_per_batch / peaks_cpu.get(cfgrow["dtype"], peaks_cpu["fp32"])
        if cuda:
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        result["rows"].append(row)
        _common.save(result, args)  # partial results survive a time limit
        print(f"  {preset:6s} {cfgrow['kind']:5s} bs {b:4d} {cfgrow['dtype']} cl={int(cl)} compile={int(cfgrow['compile'])}: "
              f"{tps:8.2f} tiles/s, {fl / 1e12:.3f} TFLOP/s", flush=True)
    result["flops_per_tile"] = flops
    _common.print_table(result["rows"], cols)
    _common.finish(result, args, t_start)


if __name__ == "__main__":
    main()
