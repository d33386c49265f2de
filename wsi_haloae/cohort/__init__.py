"""`wsi-haloae cohort`: many slides on a Dask cluster (local, SLURM, PBS, SGE, LSF or an existing scheduler).

Each slide is one task writing DIR/<id>.zarr (and the other outputs infer writes). Slides whose outputs are
complete are skipped before any cluster starts, so re-running the same command after an interruption only
does what is missing. A bad slide becomes a 'failed' row and never stops the others; a slide whose worker
died is retried elsewhere (--retries) and a lost batch job is replaced. The result is DIR/cohort.csv,
DIR/cohort.json and DIR/index.html.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import CohortConfig, InferOptions
from ..errors import BadInputError, BadModelFileError, OutputError
from .clusters import SLIDE_RESOURCE, job_script, jobqueue_kwargs, local_shape, open_cluster
from .report import write_reports
from .slides import SlideEntry, collect_slides
from .worker import RECORD_DIR, SlideTask, process_slide, record_path, slide_row, verdict_row

#: The status of a slide without tissue (``infer.engine.NO_TISSUE``; not imported from there: it loads torch).
NO_TISSUE = "no tissue"

__all__ = ["run_cohort", "collect_slides", "SlideEntry", "jobqueue_kwargs", "job_script"]

log = logging.getLogger(__name__)
REPORT_EVERY_S = 15.0


def _eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _colour_warning(row: dict[str, Any]) -> str:
    """infer's colour warning for a cohort row (its reason from the slide's summary)."""
    from ..slide.colour import WARNING

    return f"{WARNING} ({row.get('colour_reason')})"


def _blank_row(e: SlideEntry, status: str, error: str = "") -> dict[str, Any]:
    return {"id": e.id, "path": str(e.path), "status": status, "error": error, "tiles": None,
            "tissue_fraction": None, "score_mean": None, "score_p95": None, "score_max": None,
            "anomalous_tiles": None, "seconds": None, "host": None, "worker": None, "model_loads": None,
            **verdict_row({})}


def _extras(cfg: CohortConfig) -> tuple[str, ...]:
    """The extra outputs of every slide, by option name (the registry's defaults unless the user chose)."""
    from ..infer.outputs import COHORT_DEFAULT

    return COHORT_DEFAULT if cfg.outputs is None else tuple(cfg.outputs)


def _state(out: Path, e: SlideEntry, cfg: CohortConfig, sha: str) -> str:
    """'done' (complete store by this model and every requested output present), 'extras' (complete store,
    some requested file missing: infer adds just those), 'stale' (another model's result) or 'todo'."""
    from ..infer import outputs
    from ..infer.writers import read_attrs

    paths = outputs.cohort_paths(out, e.id, _extras(cfg))
    store = paths[outputs.STORE.name]
    if not outputs.STORE.is_complete(store):
        return "todo"
    if (read_attrs(store).get("model") or {}).get("sha256") != sha:
        return "stale"
    return "done" if all(outputs.BY_NAME[k].is_complete(p) for k, p in paths.items()) else "extras"


def _skipped_row(out: Path, e: SlideEntry, cfg: CohortConfig) -> tuple[dict[str, Any], str | None]:
    """A complete slide's row (figures from its store, host and seconds from the run that made it) and, when
    its stored calls were made under another rule or FDR than this run asks for, how they differ."""
    import json

    from ..infer import outputs
    from ..infer.calls import other_calls
    from ..infer.writers import read_attrs

    row, differ = _blank_row(e, "skipped"), None
    try:
        old = json.loads(record_path(out, e.id).read_text())
        row.update({k: old.get(k) for k in ("seconds", "host", "worker")})
    except (OSError, ValueError):
        pass  # complete outputs from a plain `infer` run: no record of where it ran
    try:
        attrs = read_attrs(outputs.cohort_paths(out, e.id, ())[outputs.STORE.name])
        row.update(slide_row(attrs))
        if attrs.get("status") == NO_TISSUE:
            row["status"] = NO_TISSUE  # never hidden among the skipped: the slide still has no tissue
        differ = other_calls(attrs.get("calls"), cfg.options.threshold, cfg.options.fdr)
    except (OSError, ValueError) as exc:  # a figure we cannot read is not a reason to redo the slide
        log.warning("%s: cannot read figures from its store (%s)", e.id, exc)
    return row, differ


def _warn_kept_calls(kept: dict[str, str]) -> None:
    """Complete slides keep their calls: one line when some were made under another rule or FDR, since the
    cohort page would otherwise compare verdicts made at different levels without saying so."""
    if not kept:
        return
    ids = sorted(kept)
    shown = ", ".join(f"{i} ({kept[i]})" for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    log.warning("%d complete slide(s) keep calls made under other settings than asked: %s; add --overwrite to "
                "redo them (the cohort page lists them)", len(ids), shown)


def _plan(entries: list[SlideEntry], out: Path, cfg: CohortConfig,
          sha: str) -> tuple[dict[str, dict], list[SlideEntry], set[str], dict[str, str]]:
    """Rows known before any cluster starts (skipped, missing), the slides left to run, those of them whose
    complete output came from another model (redone with overwrite), and the skipped slides whose calls were
    made under another rule or FDR (id: how)."""
    rows: dict[str, dict] = {}
    todo: list[SlideEntry] = []
    redo: set[str] = set()
    kept: dict[str, str] = {}
    for e in entries:
        if not e.path.exists():
            rows[e.id] = _blank_row(e, "failed", f"{e.path}: no such file")
            continue
        state = "todo" if cfg.overwrite else _state(out, e, cfg, sha)
        if state == "done":
            rows[e.id], differ = _skipped_row(out, e, cfg)
            if differ:
                kept[e.id] = differ
            continue
        todo.append(e)
        if state == "stale" or cfg.overwrite:
            redo.add(e.id)
    return rows, todo, redo, kept


def _check_options(cfg: CohortConfig) -> None:
    """Options that would fail every slide fail the command instead, before anything runs."""
    if cfg.options.magnification is not None:
        from ..slide.resolution import magnification_to_mpp

        magnification_to_mpp(cfg.options.magnification)


def _guard(cfg: CohortConfig, entries: list[SlideEntry], out: Path, model: Path) -> None:
    """Before anything runs: no file the cohort writes may overwrite, or sit inside, an input (the model, the
    manifest, any slide: e.g. a slide DIR/A.ome.tiff would be the OME-TIFF of slide A)."""
    from ..fileio import guard_outputs
    from ..infer.outputs import BY_NAME, cohort_paths

    inputs: dict[str, Path] = {"--model": model}
    if Path(cfg.slides).is_file():
        inputs["manifest"] = Path(cfg.slides)
    inputs.update({f"slide {e.id}": e.path for e in entries})
    outputs: dict[str, Path] = {f"cohort {name}": out / name for name in ("cohort.csv", "cohort.json", "index.html")}
    outputs["cohort records"] = out / RECORD_DIR
    extras = _extras(cfg)
    for e in entries:
        for name, p in cohort_paths(out, e.id, extras).items():
            outputs[f"the {BY_NAME[name].what} of slide {e.id}"] = p
    guard_outputs(outputs, inputs)


def _model_sha256(model: Path) -> tuple[str, dict[str, Any]]:
    """Load the model once here (CPU) so that a wrong model file fails the command, not every slide; its
    sha256 and its calibration's summary (None when it has none) for the cohort's report."""
    from ..model.checkpoint import load_model
    from ..scoring import Calibration

    if not model.is_file():
        raise BadModelFileError(f"{model}: no such model file")
    loaded = load_model(model, device="cpu")
    cal = Calibration.from_metadata(loaded.metadata, f"model file {model}")
    return loaded.sha256, {"calibration": None if cal is None else cal.summary()}


def _print_plan(cfg: CohortConfig, entries: list[SlideEntry], rows: dict[str, dict], todo: list[SlideEntry],
                out: Path) -> None:
    n_skip = sum(r["status"] == "skipped" for r in rows.values())
    n_missing = sum(r["status"] == "failed" for r in rows.values())
    print(f"cohort plan: {len(entries)} slides from {cfg.slides}: {len(todo)} to run, {n_skip} complete (skipped), "
          f"{n_missing} missing")
    from ..infer.outputs import BY_NAME, cohort_paths

    names = [BY_NAME[k].cohort_suffix for k in cohort_paths(out, "x", _extras(cfg))]
    print(f"outputs: {out}/" + ", ".join(f"<id>{s}" for s in names) + "; cohort.csv, cohort.json, index.html")
    for e in todo:
        print(f"  run   {e.id}\t{e.path}" + (f"\tmpp={e.mpp}" if e.mpp else "")
              + (f"\tslide_mpp={e.slide_mpp}" if e.slide_mpp else ""))
    for r in rows.values():
        print(f"  {'skip' if r['status'] == 'skipped' else 'miss'}  {r['id']}\t{r['path']}")
    if cfg.scheduler_address:
        print(f"cluster: existing Dask scheduler at {cfg.scheduler_address}")
    elif cfg.cluster == "local":
        n, threads = local_shape(cfg)
        print(f"cluster: local, {min(n, max(1, len(todo)))} worker process(es) x {threads} thread(s), "
              f"device {cfg.options.device}")
    else:
        cls_name, kw = jobqueue_kwargs(cfg)
        jobs = min(cfg.jobs or 1, max(1, -(-len(todo) // cfg.workers_per_job)))  # never more jobs than slides
        print(f"cluster: {cfg.cluster} ({cls_name}), {jobs} job(s) x {cfg.workers_per_job} worker(s); each job: "
              f"{kw['cores']} cores, {kw['memory']}, walltime {kw['walltime']}"
              + (f", {cfg.gpus_per_job} GPU(s)" if cfg.gpus_per_job else ""))
        print("job script (one per job; nothing submitted):")
        print(job_script(cfg, out / RECORD_DIR / "logs"))


def slide_options(options: InferOptions, e: SlideEntry) -> InferOptions:
    """The cohort's options for one slide: a manifest's ``mpp`` replaces ``--mpp``/``--magnification`` and its
    ``slide_mpp`` replaces ``--slide-mpp``, for that slide only."""
    if e.mpp is not None:
        options = replace(options, mpp=e.mpp, magnification=None)
    if e.slide_mpp is not None:
        options = replace(options, slide_mpp=e.slide_mpp)
    return options


def _task(e: SlideEntry, cfg: CohortConfig, out: Path, model: Path, sha: str, threads: int,
          overwrite: bool, echo: bool) -> SlideTask:
    return SlideTask(id=e.id, slide=str(e.path), out_dir=str(out), model=str(model), model_sha256=sha,
                     options=slide_options(cfg.options, e), outputs=_extras(cfg), threads=threads, overwrite=overwrite, echo=echo)


def _future_row(fut, e: SlideEntry, retries: int) -> dict[str, Any]:
    """The row a finished future stands for; a task error here means its workers kept dying."""
    from distributed import KilledWorker

    from .worker import one_line

    if fut.status == "finished":
        return fut.result()
    row = _blank_row(e, "failed")
    exc = fut.exception() if fut.status == "error" else None
    if isinstance(exc, KilledWorker):
        row["error"] = (f"its worker died {retries + 1} time(s) while running this slide "
                        "(out of memory, walltime or a crash; see the worker logs)")
    elif exc is not None:
        row["error"] = one_line(exc)
    else:
        row["error"] = f"task {fut.status}"
    return row


def _run_tasks(cfg: CohortConfig, todo: list[SlideEntry], redo: set[str], rows: dict[str, dict], out: Path,
               model: Path, sha: str, total: int, write) -> None:
    """Feed the slides to the cluster, follow them with a progress bar, and keep batch jobs coming back.

    Slides are submitted only as fast as workers have free slots: the scheduler would otherwise queue many
    slides on one worker, and if that worker died every one of them would count a failure (--retries)
    although only one was running.
    """
    from collections import deque

    from distributed import wait
    from tqdm import tqdm

    with open_cluster(cfg, out / RECORD_DIR / "logs", len(todo)) as cl:
        _eprint(f"cohort: {cl.description}")
        _eprint(f"cohort: {cl.dashboard()}")
        run = uuid.uuid4().hex[:8]
        waiting = deque(todo)
        running: dict[Any, SlideEntry] = {}  # future -> slide; dropped once read, so results are not kept
        bar = tqdm(total=total, initial=total - len(todo), unit="slide", desc="slides", file=sys.stderr,
                   dynamic_ncols=True, smoothing=0.1)
        last_write = time.monotonic()
        no_worker_since: float | None = None
        try:
            while waiting or running:
                slots = cl.slots()
                while waiting and len(running) < max(1, slots):
                    e = waiting.popleft()
                    t = _task(e, cfg, out, model, sha, cl.threads, e.id in redo, echo=cl.kind != "local")
                    f = cl.client.submit(process_slide, t, key=f"slide-{e.id}-{run}", pure=False,
                                         resources={SLIDE_RESOURCE: 1} if cl.use_resources else None)
                    running[f] = e
                try:
                    done, _ = wait(list(running), timeout=2, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = set()
                for f in done:
                    e = running.pop(f)
                    row = _future_row(f, e, cfg.retries)
                    f.release()
                    rows[e.id] = row
                    if row["status"] == "failed":
                        bar.write(f"cohort: {e.id} failed: {row['error']}", file=sys.stderr)
                    elif row["status"] == NO_TISSUE:
                        bar.write(f"cohort: {e.id}: no tissue found (no tile has >= {cfg.options.min_tissue:g} "
                                  f"tissue)", file=sys.stderr)
                    if row.get("colour_qc") == "unusual":
                        bar.write(f"cohort: {e.id}: {_colour_warning(row)}", file=sys.stderr)
                    bar.update(1)
                if cl.keeper is not None:
                    lost = cl.keeper.check()
                    if lost:
                        bar.write(f"cohort: batch job(s) {', '.join(lost)} lost their workers (cancelled, walltime "
                                  f"or node failure); submitted {len(lost)} replacement(s)", file=sys.stderr)
                now = time.monotonic()
                if slots == 0:
                    no_worker_since = no_worker_since or now
                    if now - no_worker_since > 60:
                        bar.write(f"cohort: still waiting for workers (see {out / RECORD_DIR / 'logs'})", file=sys.stderr)
                        no_worker_since = now
                else:
                    no_worker_since = None
                if now - last_write > REPORT_EVERY_S:
                    write()
                    last_write = now
        finally:
            bar.close()
            for e in [*running.values(), *waiting]:
                rows.setdefault(e.id, _blank_row(e, "failed", "not run: the cohort was interrupted"))


def run_cohort(cfg: CohortConfig) -> int:
    """Run a cohort; returns 0 when every slide is done, skipped or has no tissue, 1 when any failed."""
    if cfg.cluster not in ("local", "slurm", "pbs", "sge", "lsf"):
        raise BadInputError(f"--cluster {cfg.cluster!r}: use local, slurm, pbs, sge or lsf")
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        import distributed  # noqa: F401 - it configures its loggers on import; quieten them after that

        # Dask's INFO chatter (connections, nannies) would bury the progress bar; -vv shows it
        for name in ("distributed", "dask_jobqueue"):
            logging.getLogger(name).setLevel(logging.WARNING)
    _check_options(cfg)
    entries = collect_slides(cfg.slides)
    out = Path(cfg.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    model = Path(cfg.model).expanduser().resolve()
    _guard(cfg, entries, out, model)
    sha, calibration = _model_sha256(model)
    rows, todo, redo, kept = _plan(entries, out, cfg, sha)
    _warn_kept_calls(kept)
    if cfg.dry_run:
        _print_plan(cfg, entries, rows, todo, out)
        return 0
    try:
        (out / RECORD_DIR / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output folder ({exc.strerror})") from None

    t0 = time.time()
    meta: dict[str, Any] = {"slides": cfg.slides, "model": str(model), "model_sha256": sha, "out": str(out),
                            "cluster": "external" if cfg.scheduler_address else cfg.cluster,
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
                            "threshold": cfg.options.threshold, "fdr": cfg.options.fdr, **calibration,
                            "kept_calls": kept}

    def write() -> None:
        ordered = [rows[e.id] if e.id in rows else _blank_row(e, "pending") for e in entries]
        meta["seconds"] = round(time.time() - t0, 2)
        write_reports(out, ordered, meta)

    _eprint(f"cohort: {len(entries)} slides, {len(todo)} to run, {len(entries) - len(todo)} already decided "
            f"(skipped or missing)")
    try:
        if todo:
            _run_tasks(cfg, todo, redo, rows, out, model, sha, len(entries), write)
    finally:
        write()
    counts = {s: sum(r["status"] == s for r in rows.values()) for s in ("done", NO_TISSUE, "skipped", "failed")}
    line = (f"cohort: {counts['done']} done, {counts[NO_TISSUE]} no tissue, {counts['skipped']} skipped, "
            f"{counts['failed']} failed of {len(entries)} slides in {time.time() - t0:.1f}s; table "
            f"{out / 'cohort.csv'}, page {out / 'index.html'}")
    _eprint(line)
    if counts[NO_TISSUE]:
        _eprint(f"cohort: {counts[NO_TISSUE]} slide(s) with no tissue (status 'no tissue' in {out / 'cohort.csv'}): "
                f"check them, or lower --min-tissue")
    unusual = [r["id"] for r in rows.values() if r.get("colour_qc") == "unusual"]
    if unusual:
        _eprint(f"cohort: {len(unusual)} slide(s) with colours unlike the training slides (colour_qc 'unusual' in "
                f"{out / 'cohort.csv'}; scores may not be comparable): {', '.join(unusual[:10])}"
                + (" ..." if len(unusual) > 10 else ""))
    if counts["failed"]:
        _eprint(f"cohort: {counts['failed']} of {len(entries)} slides failed (see the error column of {out / 'cohort.csv'})")
        return 1
    return 0
