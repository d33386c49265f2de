"""Memory scaling: peak RSS of ``wsi-haloae infer`` (a subprocess) on 10k², 40k² and 100k² slides.

Each slide holds the same five small tissue islands on glass, so the tissue tile count (and the run time)
stays the same while the area grows 100x: any growth of the peak RSS is memory that follows slide area,
which the pipeline must not have. Slides are written sparsely (background tiles absent), so 100k² stays
under 50 MB on disk. RSS is polled with psutil (main process, and main + reader workers) and cross-checked with
the exact ``ru_maxrss`` from wait4; on CUDA the GPU memory in use is polled with nvidia-smi.

    python benchmarks/bench_memory.py [--quick] [--out results.json] [--sizes 10000,40000,100000] [--overlap 0.5]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _slides import island_slide  # noqa: E402

TARGET = 1.5


def _du(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


class _GpuPoll(threading.Thread):
    """Largest 'memory.used' nvidia-smi reports for the process tree (MiB)."""

    def __init__(self, pids: callable) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak_mib, self.stop = pids, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                pids = self.pids()
                used = sum(float(m) for p, m in (ln.split(",") for ln in out.strip().splitlines() if "," in ln)
                           if int(p) in pids)
                self.peak_mib = max(self.peak_mib, used)
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            self.stop.wait(0.5)


def measure(cmd: list[str], poll_s: float = 0.02, gpu: bool = False) -> dict:
    """Run ``cmd``; peak RSS of the main process and of the whole tree, and wait4's ru_maxrss."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak_main = peak_tree = 0
    tree_pids: set[int] = {proc.pid}
    gp = _GpuPoll(lambda: set(tree_pids)) if gpu else None
    if gp:
        gp.start()
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    t_out = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    t_err = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    t_out.start()
    t_err.start()
    t0 = time.perf_counter()
    while True:
        try:
            rss = ps.memory_info().rss
            kids = ps.children(recursive=True)
            tree = rss
            for k in kids:
                try:
                    tree += k.memory_info().rss
                    tree_pids.add(k.pid)
                except psutil.Error:
                    pass
            peak_main, peak_tree = max(peak_main, rss), max(peak_tree, tree)
        except psutil.Error:
            pass
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(poll_s)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    t_out.join()
    t_err.join()
    if gp:
        gp.stop.set()
        gp.join()
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss_mb": peak_main / 1e6, "peak_tree_rss_mb": peak_tree / 1e6,
            "ru_maxrss_mb": ru.ru_maxrss * 1024 / 1e6, "gpu_peak_mib": gp.peak_mib if gp else None,
            "stderr_tail": "".join(err_chunks)[-2000:]}


def main() -> None:
    p = _common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", help="Comma-separated slide sides in px (default 10000,40000,100000; quick 1024,2048).")
    p.add_argument("--radius", type=int, default=None, help="Island radius in px (default 450; quick 125).")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--extras", action="store_true", help="Also write the OME-TIFF, GeoJSON and preview.")
    p.add_argument("--overlap", default="0", help="infer --overlap (the blending buffers hold twice the bytes per chunk).")
    p.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR)
    args = p.parse_args()
    t0 = time.perf_counter()
    result = _common.start("bench_memory", args)
    device = _common.resolve_device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([1024, 2048] if args.quick else [10000, 40000, 100000])
    radius = args.radius or (125 if args.quick else 450)  # quick: islands clear of the 1024 slide's edges
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = _common.make_model_file(args.preset, args.workdir)
    for size in sizes:
        ts = time.perf_counter()
        slide = island_slide(size, args.workdir, radius=radius)
        prep = time.perf_counter() - ts
        out = args.workdir / f"mem-{size}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-c", "from wsi_haloae.cli import main; main()", "infer", str(slide), "--model", str(model),
               "--out", str(out), "--device", str(device), "--workers", str(args.workers),
               "--batch-size", str(args.batch_size), "--overlap", args.overlap, "--overwrite"]
        extras = []
        if args.extras:
            extras = [args.workdir / f"mem-{size}.ome.tif", args.workdir / f"mem-{size}.geojson", args.workdir / f"mem-{size}.png"]
            cmd += ["--tiff", str(extras[0]), "--geojson", str(extras[1]), "--preview", str(extras[2])]
        m = measure(cmd, gpu=device.type == "cuda")
        if m["rc"] != 0:
            print(m["stderr_tail"], file=sys.stderr)
            sys.exit(f"error: infer failed on {slide} (exit {m['rc']})")
        attrs = json.loads((out / ".zattrs").read_text())["wsi_haloae"]
        row = {"size": size, "megapixels": size * size / 1e6, "slide_mb": slide.stat().st_size / 1e6,
               "slide_prepare_s": prep, "tiles": attrs["tiles"]["tissue"], "grid": attrs["tiles"]["grid"],
               "overlap": attrs.get("overlap", 0.0), "windows": (attrs.get("windows") or {}).get("n"),
               "map_shape": attrs["map"]["shape"], "store_mb": _du(out) / 1e6,
               "extras_mb": sum(_du(e) for e in extras) / 1e6 if extras else None,
               "infer_s": attrs.get("seconds"), **{k: v for k, v in m.items() if k != "stderr_tail"}}
        result["rows"].append(row)
        print(f"  {size}²: peak RSS {row['peak_rss_mb']:.0f} MB (tree {row['peak_tree_rss_mb']:.0f} MB), "
              f"{row['tiles']} tiles, {row['wall_s']:.1f} s, store {row['store_mb']:.2f} MB", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        for e in extras:
            if e.exists():
                e.unlink()
    rows = result["rows"]
    base = rows[0]
    for r in rows:
        r["rss_vs_smallest"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        r["tree_vs_smallest"] = r["peak_tree_rss_mb"] / base["peak_tree_rss_mb"]
    _common.print_table(rows, ["size", "megapixels", "slide_mb", "tiles", "windows", "map_shape", "wall_s", "peak_rss_mb",
                               "peak_tree_rss_mb", "ru_maxrss_mb", "gpu_peak_mib", "store_mb", "rss_vs_smallest",
                               "tree_vs_smallest"])
    last = rows[-1]
    ok = last["rss_vs_smallest"] <= TARGET
    result["target"] = {"max_ratio": TARGET, "ratio": last["rss_vs_smallest"], "holds": ok}
    print(f"# target peak RSS({last['size']}²) <= {TARGET} x peak RSS({base['size']}²): "
          f"ratio {last['rss_vs_smallest']:.2f} -> {'HOLDS' if ok else 'MISSED'}")
    _common.finish(result, args, t0)


if __name__ == "__main__":
    main()
