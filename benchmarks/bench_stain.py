"""Stain normalisation cost: the normaliser's time per tile as a share of the model's (``anomaly_map``).

Why: the normaliser runs inside the model on every tile at inference (``HaloAE.extract``), so its cost is paid
on every slide. Timed on real tissue (tiles of CMU-1-Small-Region from ../shared/data; scikit-image's IHC
image without it) with a reference fitted on those tiles: ``anomaly_map`` with method none, macenko and
reinhard (the same weights), and the stain module alone. Process CPU seconds per tile are reported beside
wall-clock ones (steadier on a shared machine). Layout and dtype as ``infer`` uses them (channels_last; bf16
autocast on CUDA only).

    python benchmarks/bench_stain.py [--quick] [--preset tiny] [--batch-size 16] [--device cpu|cuda]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _common  # noqa: E402
from bench_model import sync, time_fn  # noqa: E402


def real_tiles(n: int) -> tuple[torch.Tensor, str]:
    """n tissue tiles (RGB [0, 1]) of real tissue, repeated when the source has fewer."""
    src = _common.shared_file(*_common.CMU_SMALL)
    if src is not None:
        from wsi_haloae.slide.grid import build_grid
        from wsi_haloae.slide.reader import SlideReader

        reader = SlideReader(src)
        grid = build_grid(reader, reader.mpp, 256, min_tissue=0.5)
        k = min(n, len(grid))
        arr = np.stack([reader.read_tile(int(x), int(y), 256, reader.mpp) for x, y in zip(grid.xs[:k], grid.ys[:k])])
        reader.close()
        name = src.name
    else:
        from skimage.data import immunohistochemistry

        im = immunohistochemistry()
        arr = np.stack([im[y : y + 256, x : x + 256] for y in (0, 128, 256) for x in (0, 128, 256)])
        name = "skimage immunohistochemistry"
    reps = -(-n // len(arr))
    arr = np.concatenate([arr] * reps)[:n]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255), name


def main() -> None:
    p = _common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=None, help="Tiles per batch (default: 16 on CPU, 256 on CUDA; quick: 2).")
    p.add_argument("--min-seconds", type=float, default=None)
    args = p.parse_args()
    t_start = time.perf_counter()
    result = _common.start("bench_stain", args)
    device = _common.resolve_device(args.device)
    cuda = device.type == "cuda"
    from wsi_haloae.model import build_model
    from wsi_haloae.model.stain import fit_reference

    bs = args.batch_size or (2 if args.quick else (256 if cuda else 16))
    min_s = args.min_seconds if args.min_seconds is not None else (0.2 if args.quick else (2.0 if cuda else 5.0))
    max_s = 1.0 if args.quick else 30.0
    x, source = real_tiles(bs)
    result["tiles_source"] = source
    ref = fit_reference([x])
    result["reference"] = ref.to_dict() if ref is not None else None
    model = build_model(args.preset, backbone_weights="random").eval().to(device).to(memory_format=torch.channels_last)
    xd = x.to(device).contiguous(memory_format=torch.channels_last)

    rows = []
    base: dict[str, float] = {}
    for method in ("none", "macenko", "reinhard"):
        model.stain.set_reference(method, ref if method != "none" else None)
        for what in ("anomaly_map", "stain_only"):
            if what == "stain_only" and method == "none":
                continue
            fn_model = model.anomaly_map if what == "anomaly_map" else model.stain

            def run(inp, _f=fn_model):
                with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
                    return _f(inp)

            per_batch, iters, cpu_per_batch, _ = time_fn(run, xd, device, 1 if args.quick else 3, min_s, max_s)
            model.stain.reset_fallbacks()
            run(xd)
            sync(device)
            row = dict(preset=args.preset, method=method, what=what, batch=bs, ms_per_tile=1e3 * per_batch / bs,
                       cpu_ms_per_tile=None if cuda else 1e3 * cpu_per_batch / bs, iters=iters,
                       fallbacks=model.stain.fallbacks())
            if what == "anomaly_map" and method == "none":
                base = {"wall": row["ms_per_tile"], "cpu": row["cpu_ms_per_tile"] or 0.0}
            if base:
                row["share_of_model"] = row["ms_per_tile"] / base["wall"] - (1.0 if what == "anomaly_map" else 0.0)
                if not cuda and base["cpu"]:
                    row["share_of_model_cpu"] = row["cpu_ms_per_tile"] / base["cpu"] - (1.0 if what == "anomaly_map" else 0.0)
            rows.append(row)
            result["rows"] = rows
            _common.save(result, args)
            print(f"  {method:8s} {what:11s}: {row['ms_per_tile']:.2f} ms/tile"
                  + (f", {row['cpu_ms_per_tile']:.2f} CPU ms/tile" if row["cpu_ms_per_tile"] is not None else ""), flush=True)
    cols = ["preset", "method", "what", "batch", "ms_per_tile", "cpu_ms_per_tile", "share_of_model", "share_of_model_cpu",
            "fallbacks", "iters"]
    _common.print_table(rows, cols)
    _common.finish(result, args, t_start)


if __name__ == "__main__":
    main()
