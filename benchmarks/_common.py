"""Shared plumbing for the benchmark scripts: machine facts, timing, tables and JSON results.

Every script prints the exact command that produced it first, then a table, and writes one JSON file holding
the machine description next to the rows, so a figure in RESULTS.md can always be traced to a command, a
machine and a date. The load average is recorded before and after: on a shared machine it says how much
the figures are distorted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSI_HALOAE_SHARED_DATA", REPO.parent / "shared" / "data"))
CMU_SMALL = ("openslide-testdata", "Aperio", "CMU-1-Small-Region.svs")
DEFAULT_WORKDIR = Path(os.environ.get("WSI_HALOAE_BENCH_DIR", "/tmp/wsi-haloae-bench"))


def command_line() -> str:
    """The command as typed (relative script path), so it can be pasted back."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(script), *map(shlex.quote, sys.argv[1:])])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The few CPU features that decide bf16/fp32 speed on the CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(have & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma"})
    except OSError:
        pass
    return []


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: str | None = None) -> dict[str, Any]:
    import numpy as np
    import torch

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_start": loadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "device": device,
        "gpu": None,
    }
    try:
        import openslide

        info["openslide"] = openslide.__library_version__
    except Exception:  # noqa: BLE001 - optional detail
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "cuda": torch.version.cuda,
                       "capability": f"{p.major}.{p.minor}", "count": torch.cuda.device_count()}
    return info


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke run in seconds (CI).")
    p.add_argument("--out", type=Path, help="Write the JSON results here (default: benchmarks/results/<name>.json).")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice).")
    return p


def resolve_device(name: str):
    """The package's one ``--device`` parser; a device this machine lacks ends the benchmark in one line."""
    from wsi_haloae.errors import UserError
    from wsi_haloae.model.device import resolve_device as resolve

    try:
        return resolve(name)
    except UserError as exc:
        sys.exit(f"error: {exc}")


def start(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Print the command line and return the result skeleton (machine info filled in)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {command_line()}", flush=True)
    dev = resolve_device(args.device)
    m = machine_info(str(dev))
    gpu = m["gpu"]["name"] if m["gpu"] else "none"
    print(f"# {m['date_utc']}  cpu: {m['cpu_model']} x{m['cpu_count']}  gpu: {gpu}  torch {m['torch']}  "
          f"python {m['python']}  load {m['loadavg_start']}", flush=True)
    return {"benchmark": name, "command": command_line(), "quick": bool(args.quick), "machine": m,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": []}


def save(result: dict[str, Any], args: argparse.Namespace) -> Path:
    """Write the JSON atomically (also mid-run, so a run stopped by a time limit keeps its rows)."""
    out = args.out or (REPO / "benchmarks" / "results" / f"{result['benchmark']}{'-quick' if args.quick else ''}.json")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    return out


def finish(result: dict[str, Any], args: argparse.Namespace, t0: float) -> Path:
    """Add the closing facts and write the JSON; returns its path."""
    result["machine"]["loadavg_end"] = loadavg()
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    result["complete"] = True
    out = save(result, args)
    la = result["machine"]["loadavg_end"]
    print(f"# wrote {out}  ({result['wall_s']} s; load at end {la})", flush=True)
    return out


def print_table(rows: Sequence[dict[str, Any]], columns: Iterable[str]) -> None:
    cols = list(columns)

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v == 0:
                return "0"
            a = abs(v)
            return f"{v:.3g}" if a < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths)) + " |")
    sys.stdout.flush()


def failed_row(row: dict[str, Any], exc: BaseException, label: str, result: dict[str, Any],
               args: argparse.Namespace) -> None:
    """Record a lever that does not run here as a result row (its first error lines), say so, and save."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    row["error"] = f"{type(exc).__name__}: {' | '.join(lines[:3])[:400]}"
    print(f"# {label}: failed: {row['error']}", flush=True)
    result["rows"].append(row)
    save(result, args)


def cpu_seconds() -> float:
    """User+system CPU time of this process (threads included): robust to other load on a shared machine."""
    t = os.times()
    return t.user + t.system


def shared_file(*parts: str) -> Path | None:
    p = SHARED_DATA.joinpath(*parts)
    return p if p.exists() else None


def make_model_file(preset: str, workdir: Path, mpp: float | None = None) -> Path:
    """A model file of ``preset`` with a random (seeded) backbone: speed does not depend on the weights."""
    import torch

    from wsi_haloae.model import build_model
    from wsi_haloae.model.checkpoint import save_model

    path = workdir / f"model-{preset}-random.safetensors"
    if not path.is_file():
        workdir.mkdir(parents=True, exist_ok=True)
        model = build_model(preset, backbone_weights="random").eval()
        fm = model.config.fm_size
        save_model(path, model, torch.zeros(fm, fm), {"mpp": mpp, "note": "benchmark model, random weights"})
    return path


def quick_mvtec(dest: Path, source: Path | None = None, n_train: int = 4, n_test: int = 4) -> Path:
    """A few-image MVTec-AD-layout folder for smoke runs (``--quick``, ``gpu_check.sh --dry-run``): the first
    ``n_train`` training images and ``n_test`` test images spread over the defect kinds of ``source`` when it
    exists, else crops of scikit-image's IHC image with planted dark patches and their masks."""
    import shutil

    import numpy as np
    from PIL import Image

    shutil.rmtree(dest, ignore_errors=True)
    (dest / "train" / "good").mkdir(parents=True)
    images = lambda d: sorted(f for f in d.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))  # noqa: E731
    if source is not None and (source / "train" / "good").is_dir() and (source / "test").is_dir():
        for f in images(source / "train" / "good")[:n_train]:
            shutil.copy(f, dest / "train" / "good" / f.name)
        kinds = sorted((d for d in (source / "test").iterdir() if d.is_dir()), key=lambda d: (d.name != "good", d.name))
        per_kind = [images(d) for d in kinds]
        tests = [files[i] for i in range(n_test) for files in per_kind if i < len(files)][:n_test]  # good first, then each defect
        for f in tests:
            (dest / "test" / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest / "test" / f.parent.name / f.name)
            mask = source / "ground_truth" / f.parent.name / f"{f.stem}_mask.png"
            if mask.is_file():
                (dest / "ground_truth" / f.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(mask, dest / "ground_truth" / f.parent.name / mask.name)
        return dest
    from skimage.data import immunohistochemistry

    im = immunohistochemistry()
    crops = [im[y : y + 256, x : x + 256] for y in (0, 256) for x in (0, 128, 256)]
    for i in range(n_train):
        Image.fromarray(np.ascontiguousarray(crops[i % len(crops)])).save(dest / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test):
        img = np.ascontiguousarray(np.fliplr(crops[(i + 1) % len(crops)])).copy()
        kind = "good" if i % 2 == 0 else "dark"
        (dest / "test" / kind).mkdir(parents=True, exist_ok=True)
        if kind == "dark":
            mask = np.zeros(img.shape[:2], np.uint8)
            mask[80:160, 96:176] = 255
            img[mask > 0] = (img[mask > 0] * 0.4).astype(np.uint8)
            (dest / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(dest / "ground_truth" / kind / f"{i:03d}_mask.png")
        Image.fromarray(img).save(dest / "test" / kind / f"{i:03d}.png")
    return dest
