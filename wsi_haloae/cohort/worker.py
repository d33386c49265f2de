"""What runs on a Dask worker: one slide per task, with the model loaded once per worker process.

The model is cached per process (keyed by the model file's sha256 and the device), so a worker keeps it on
its GPU from one slide to the next. Every failure inside a slide becomes a 'failed' row with a one-line
error: a bad slide never raises into Dask, so Dask's own retries are left for workers that die.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import InferConfig, InferOptions
from ..fileio import write_text_atomic

log = logging.getLogger(__name__)

RECORD_DIR = ".cohort"  # DIR/.cohort/<id>.json: the row of a finished slide, reused when it is skipped later


@dataclass(frozen=True)
class SlideTask:
    """Everything a worker needs for one slide (plain data: it travels to the worker pickled).

    ``options`` is the cohort's ``InferOptions`` passed whole (with the manifest's mpp for this slide, if any);
    ``outputs`` the extra outputs by option name (``infer.outputs``).
    """

    id: str
    slide: str
    out_dir: str
    model: str
    model_sha256: str
    options: InferOptions
    outputs: tuple[str, ...]
    threads: int
    overwrite: bool = False
    echo: bool = False  # print each slide's summary line on the worker's stderr (job logs), not on a local console


def record_path(out_dir: Path, sid: str) -> Path:
    return out_dir / RECORD_DIR / f"{sid}.json"


def one_line(exc: BaseException) -> str:
    """An exception as one line: user errors by message, anything else with its type."""
    from ..errors import UserError

    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if isinstance(exc, UserError) else f"{type(exc).__name__}: {msg}"


# ---------------------------------------------------------------------------------------------- model cache
_LOCK = threading.Lock()
_CACHE: dict[tuple[str, str], Any] = {}
_LOADS = 0


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except Exception:
        return str(os.getpid())


def _threads_per_slide() -> int:
    """On a worker we did not start, slides run `nthreads` at a time: share the machine's cores among them."""
    try:
        from distributed import get_worker

        return max(1, (os.cpu_count() or 1) // max(1, get_worker().state.nthreads))
    except Exception:  # noqa: BLE001 - not inside a Dask worker
        return 1


def worker_device(requested: str) -> str:
    """'cpu', or one GPU per worker: the worker name's trailing number (LocalCluster 0,1,..; jobqueue
    job-0, job-1) picks among the GPUs this process sees (the job's GPUs under SLURM --gres)."""
    import torch

    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if requested not in ("auto", "cuda"):
        return requested  # an explicit cuda:N
    if not torch.cuda.is_available():
        return "cuda"  # let the engine report that CUDA is missing
    m = re.search(r"(\d+)$", _worker_name())
    idx = int(m.group(1)) if m else 0
    return f"cuda:{idx % torch.cuda.device_count()}"


def cached_model(path: str, sha256: str, device: str):
    """The LoadedModel for (model sha256, device) in this process; loads it on first use only."""
    global _LOADS
    from ..errors import BadModelFileError
    from ..model.checkpoint import load_model

    key = (sha256, device)
    with _LOCK:
        loaded = _CACHE.get(key)
        if loaded is None:
            _CACHE.clear()  # one model per worker: a new cohort with another model replaces the old one
            loaded = load_model(Path(path), device=device)
            if loaded.sha256 != sha256:
                raise BadModelFileError(f"{path}: model file changed while the cohort was running")
            _CACHE[key] = loaded
            _LOADS += 1
        return loaded


def model_loads() -> int:
    """How many times this process loaded a model (1 per worker when the cache works)."""
    return _LOADS


# ------------------------------------------------------------------------------------------------ the task
#: The colour QC keys of a store's ``summary`` (infer/colour.py), shown per slide.
COLOUR_KEYS = ("colour_qc", "stain_distance", "colour_reason")


def slide_row(attrs: dict[str, Any]) -> dict[str, Any]:
    """A slide's cohort figures, as its store records them (attribute ``summary``; see infer.engine)."""
    summary = attrs.get("summary") or {}
    row = {k: summary.get(k) for k in ("tiles", "tissue_fraction", "score_mean", "score_p95", "score_max",
                                       "anomalous_tiles")}
    row.update({k: summary.get(k) for k in COLOUR_KEYS})
    return row | verdict_row(summary)


def verdict_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The calibrated verdict's columns of a slide (``scoring.SUMMARY_KEYS``; None for a store without them)."""
    from ..scoring.verdict import SUMMARY_KEYS

    return {k: summary.get(k) for k in SUMMARY_KEYS}


def _write_record(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(row, indent=1))


def process_slide(task: SlideTask) -> dict[str, Any]:
    """Run inference on one slide; always returns the slide's cohort row (status done, no tissue or failed)."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {
        "id": task.id, "path": task.slide, "status": "failed", "error": "",
        "tiles": None, "tissue_fraction": None, "score_mean": None, "score_p95": None, "score_max": None,
        "anomalous_tiles": None, "seconds": None, "host": socket.gethostname(), "worker": _worker_name(), "model_loads": None,
        **verdict_row({}),
    }
    try:
        import torch

        from ..infer import outputs
        from ..infer.engine import run_infer

        torch.set_num_threads(task.threads or _threads_per_slide())  # Dask sets OMP_NUM_THREADS=1 in workers
        opts = task.options
        readers = opts.workers
        if readers and multiprocessing.current_process().daemon:
            # a daemonic worker (an external cluster started without DASK_DISTRIBUTED__WORKER__DAEMON=False)
            # cannot start tile-reader processes: read tiles in the worker itself
            log.warning("slide %s: daemonic Dask worker, reading tiles without reader processes", task.id)
            readers = 0
        device = worker_device(opts.device)
        loaded = cached_model(task.model, task.model_sha256, device)
        paths = outputs.cohort_paths(Path(task.out_dir), task.id, task.outputs)
        cfg = InferConfig(slide=Path(task.slide), model=Path(task.model), out=paths[outputs.STORE.name],
                          outputs=outputs.requests(paths), overwrite=task.overwrite, slide_id=task.id,
                          options=replace(opts, device=device, workers=readers, progress=False))
        result = run_infer(cfg, loaded=loaded)
        if task.echo:  # batch jobs: the summary line goes to the job's log, not to the cohort's console
            print(result.line(), file=sys.stderr, flush=True)
        row.update(slide_row({"summary": result.summary}))
        row["status"] = result.outcome  # "done", or "no tissue": a complete result, neither done nor failed
    except Exception as exc:  # noqa: BLE001 - every failure is this slide's, recorded, never raised
        row["error"] = one_line(exc)
        from ..errors import UserError

        if not isinstance(exc, UserError):
            log.error("slide %s failed:\n%s", task.id, traceback.format_exc())
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["model_loads"] = model_loads()
    if row["status"] != "failed":
        _write_record(record_path(Path(task.out_dir), task.id), row)
    return row
