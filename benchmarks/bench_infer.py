"""End to end: ``run_infer`` on a slide of real tissue, against the model alone, in the same run.

The slide is CMU-1-Small-Region.svs (real H&E, Aperio) mirror-tiled into a larger pyramidal TIFF (the synthetic
IHC slide when ../shared/data is absent). ``run_infer`` records the synchronised seconds spent in the model
beside the end-to-end seconds, so both rates come from one run on one device and their ratio is the pipeline's
overhead. The main thread is profiled with cProfile (setup, waiting for tiles, model, handing maps to the
writer, pyramid, extras), the writer thread's busy time is measured by wrapping ``MapAssembler.add``, and
the reader workers' CPU time comes from ``getrusage(RUSAGE_CHILDREN)``.

    python benchmarks/bench_infer.py [--quick] [--out results.json] [--size 8192] [--workers 0,1,2]
"""

from __future__ import annotations

import cProfile
import pstats
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _slides import tissue_slide  # noqa: E402

#: (label, file suffix, function name): stages of the main thread, by cumulative time in cProfile
STAGES = [
    ("load model", "checkpoint.py", "load_model"),
    ("open slide", "reader.py", "open_slide"),
    ("tissue mask + grid", "grid.py", "build_grid"),
    ("tile loop (total)", "engine.py", "_run_tiles"),
    ("  batch memory probe (one tile)", "batch.py", "bytes_per_tile"),
    ("  wait for tiles (DataLoader)", "dataloader.py", "__next__"),
    ("  model anomaly_map", "haloae.py", "anomaly_map"),
    ("  post-process", "anomaly_map.py", "postprocess"),
    ("  hand to writer (queue full)", "engine.py", "put"),
    ("  drain writer at end", "engine.py", "close"),
    ("new store", "writers.py", "open_new_store"),
    ("map assembler set-up", "assembler.py", "__init__"),  # MapAssembler is the only class there with one
    ("write tables", "engine.py", "_write_tables"),
    ("map pyramid", "writers.py", "build_pyramid"),
    ("OME-NGFF metadata", "writers.py", "write_multiscales"),
    ("extras (tiff/geojson/preview)", "engine.py", "_write_extras"),
    ("completion marker", "writers.py", "mark_complete"),
    ("publish (renames)", "fileio.py", "publish"),
]


def stage_times(prof: cProfile.Profile, wall: float) -> dict[str, float]:
    """Cumulative seconds per stage; "other" = wall minus the top-level stages (imports, checks, summary)."""
    st = pstats.Stats(prof).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
    out: dict[str, float] = {}
    for label, suffix, func in STAGES:
        out[label] = sum(v[3] for k, v in st.items() if k[2] == func and k[0].endswith(suffix))
    out["other (imports, checks, summary)"] = wall - sum(v for k, v in out.items() if not k.startswith(" "))
    return out


class _BusyClock:
    """Wraps MapAssembler.add to add up the writer thread's busy seconds (thread CPU clock and wall)."""

    def __init__(self) -> None:
        from wsi_haloae.infer import assembler

        self.assembler = assembler
        self.orig = assembler.MapAssembler.add
        self.wall = 0.0
        self.lock = threading.Lock()

    def __enter__(self) -> "_BusyClock":
        orig, clock = self.orig, self

        def add(asm, i, block):
            t = time.perf_counter()
            try:
                return orig(asm, i, block)
            finally:
                with clock.lock:
                    clock.wall += time.perf_counter() - t

        self.assembler.MapAssembler.add = add
        return self

    def __exit__(self, *exc) -> None:
        self.assembler.MapAssembler.add = self.orig


def run_once(slide: Path, model: Path, workdir: Path, workers: int, batch: int, device: str, mpp: float | None,
             extras: bool, profile: bool) -> dict:
    from wsi_haloae.config import InferConfig, InferOptions
    from wsi_haloae.infer.engine import run_infer

    out = workdir / f"infer-{slide.stem}-w{workers}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    ex = {}
    if extras:
        ex = dict(tiff=workdir / "bench.ome.tif", geojson=workdir / "bench.geojson", preview=workdir / "bench.png")
    cfg = InferConfig(slide=slide, model=model, out=out, outputs=ex, overwrite=True,
                      options=InferOptions(batch_size=batch, workers=workers, device=str(device), mpp=mpp,
                                           progress=False))
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c0 = _common.cpu_seconds()
    prof = cProfile.Profile() if profile else None
    with _BusyClock() as busy:
        if prof:
            prof.enable()
        s = run_infer(cfg)
        if prof:
            prof.disable()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    n = s.tiles_tissue
    row = {
        "slide": slide.name, "workers": workers, "batch": batch, "device": s.device, "tiles": n,
        "grid": s.tiles_grid, "seconds": s.seconds, "model_seconds": s.model_seconds,
        "tiles_per_s": s.tiles_per_s, "model_tiles_per_s": s.model_tiles_per_s,
        "ratio": s.tiles_per_s / s.model_tiles_per_s if s.model_tiles_per_s else None,
        "main_cpu_s": _common.cpu_seconds() - c0, "reader_workers_cpu_s": worker_cpu,
        "read_ms_per_tile_cpu": 1e3 * worker_cpu / n if n and workers else None,
        "writer_busy_s": busy.wall, "store_mb": _du(out) / 1e6,
    }
    if prof:
        row["stages_s"] = stage_times(prof, s.seconds)
    shutil.rmtree(out, ignore_errors=True)
    return row


def _du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def main() -> None:
    p = _common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=None, help="Slide side in px (default 8192 on CPU, 24576 on CUDA; quick 768).")
    p.add_argument("--preset", default=None, help="Model preset (default: tiny on CPU, paper on CUDA).")
    p.add_argument("--batch-size", type=int, default=None, help="Default 16 on CPU, 256 on CUDA.")
    p.add_argument("--workers", default=None, help="Comma-separated reader worker counts, one run each (default 2).")
    p.add_argument("--mpp", type=float, default=None, help="Target µm/px (default: the slide's level 0).")
    p.add_argument("--extras", action="store_true", help="Also write the OME-TIFF, GeoJSON and preview.")
    p.add_argument("--no-profile", action="store_true", help="Run without cProfile on the main thread.")
    p.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR)
    args = p.parse_args()
    t0 = __import__("time").perf_counter()
    result = _common.start("bench_infer", args)
    device = _common.resolve_device(args.device)
    cuda = device.type == "cuda"
    size = args.size or (768 if args.quick else (24576 if cuda else 8192))
    preset = args.preset or ("paper" if cuda else "tiny")
    batch = args.batch_size or (4 if args.quick else (256 if cuda else 16))
    workers = [int(w) for w in args.workers.split(",")] if args.workers else ([1] if args.quick else ([8] if cuda else [2]))
    args.workdir.mkdir(parents=True, exist_ok=True)
    ts = time.perf_counter()
    slide, source = tissue_slide(size, args.workdir)
    result["slide"] = {"path": str(slide), "source": source, "size": size, "bytes": slide.stat().st_size,
                       "prepare_s": round(time.perf_counter() - ts, 2)}
    model = _common.make_model_file(preset, args.workdir)
    result["preset"] = preset
    print(f"# slide {slide} ({source}); preset {preset}; batch {batch}; device {device}", flush=True)
    for w in workers:
        row = run_once(slide, model, args.workdir, w, batch, str(device), args.mpp, args.extras, not args.no_profile)
        result["rows"].append(row)
        _common.save(result, args)
        if "stages_s" in row:
            print(f"## stage profile, workers={w} (main thread, cumulative seconds; writer thread busy "
                  f"{row['writer_busy_s']:.2f} s; reader workers CPU {row['reader_workers_cpu_s']:.2f} s)")
            _common.print_table([{"stage": k, "seconds": v, "share_of_wall": v / row["seconds"]}
                                 for k, v in row["stages_s"].items()], ["stage", "seconds", "share_of_wall"])
    _common.print_table(result["rows"], ["workers", "batch", "device", "tiles", "seconds", "model_seconds",
                                         "tiles_per_s", "model_tiles_per_s", "ratio", "reader_workers_cpu_s",
                                         "read_ms_per_tile_cpu", "writer_busy_s", "store_mb"])
    for r in result["rows"]:
        if r["ratio"] is None:
            print(f"# workers={r['workers']}: no tissue tiles, no ratio")
            continue
        ok = r["ratio"] >= 0.9
        print(f"# target end-to-end >= 0.9 x model-only (workers={r['workers']}): ratio {r['ratio']:.3f} -> "
              f"{'HOLDS' if ok else 'MISSED'}")
    _common.finish(result, args, t0)


if __name__ == "__main__":
    main()
