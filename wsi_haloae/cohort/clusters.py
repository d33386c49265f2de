"""Where the slides run: a local Dask cluster, a batch-scheduler cluster (dask-jobqueue) or an existing one.

All batch schedulers share one code path: `jobqueue_kwargs` maps the cohort options to the keyword arguments
of the dask-jobqueue class (only GPU requests differ between schedulers), so SLURM, PBS, SGE and LSF behave
alike and `--dry-run` shows exactly the job script that would be submitted.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..config import CohortConfig
from ..errors import BadInputError

log = logging.getLogger(__name__)

JOBQUEUE_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster", "lsf": "LSFCluster"}
#: Each worker advertises one "slide" slot so it runs one slide at a time while torch and the tile
#: readers use all of its cores.
SLIDE_RESOURCE = "slide"
JOB_NAME = "wsi-haloae"
DEFAULT_WALLTIME = "02:00:00"


def gpu_count() -> int:
    """GPUs this machine has (0 without torch/CUDA); only used to size a local cluster."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - broken CUDA set-ups count as none
        return 0


def local_shape(cfg: CohortConfig) -> tuple[int, int]:
    """(workers, threads per worker) of a local cluster: one worker per GPU, else one per infer_workers+1 cores."""
    cpus = os.cpu_count() or 1
    gpus = gpu_count() if cfg.options.device != "cpu" else 0
    if cfg.jobs:
        n = cfg.jobs
    elif gpus:
        n = gpus
    else:
        n = max(1, cpus // (cfg.options.workers + 1))
    return n, max(1, cpus // n)


def job_cores(cfg: CohortConfig) -> int:
    return cfg.cores or cfg.workers_per_job * (cfg.options.workers + 1)


def jobqueue_kwargs(cfg: CohortConfig, log_directory: Path | None = None) -> tuple[str, dict[str, Any]]:
    """(dask-jobqueue class name, job keyword arguments) for a batch-scheduler cohort.

    One job runs `workers_per_job` worker processes that share the job's cores, memory and GPUs; each worker
    handles one slide at a time.
    """
    if cfg.cluster not in JOBQUEUE_CLASSES:
        raise BadInputError(f"--cluster {cfg.cluster!r} is not a batch scheduler ({', '.join(JOBQUEUE_CLASSES)})")
    cores = job_cores(cfg)
    if cores < cfg.workers_per_job:
        raise BadInputError(f"--cores {cores} is fewer than --workers-per-job {cfg.workers_per_job}")
    gpus = cfg.gpus_per_job
    memory = cfg.memory or f"{cfg.workers_per_job * (16 if gpus else 8)}GB"
    extra = list(cfg.job_extra)
    kw: dict[str, Any] = {
        "cores": cores,
        "memory": memory,
        "processes": cfg.workers_per_job,
        "walltime": cfg.walltime or DEFAULT_WALLTIME,
        "queue": cfg.queue,
        "job_name": JOB_NAME,
        "python": sys.executable,
        # DataLoader tile readers are child processes: a daemonic Dask worker could not start them
        "job_script_prologue": ["export DASK_DISTRIBUTED__WORKER__DAEMON=False"],
        "worker_extra_args": ["--resources", f"{SLIDE_RESOURCE}=1"],
    }
    if log_directory is not None:
        kw["log_directory"] = str(log_directory)
    if cfg.cluster == "slurm":
        kw["account"] = cfg.account
        if gpus:
            extra.append(f"--gres=gpu:{gpus}")
    elif cfg.cluster == "pbs":
        kw["account"] = cfg.account
        if gpus:
            mem = memory.upper().replace("B", "b").replace(" ", "")
            kw["resource_spec"] = f"select=1:ncpus={cores}:ngpus={gpus}:mem={mem}"
    elif cfg.cluster == "sge":
        kw["project"] = cfg.account
        if gpus:
            extra.append(f"-l gpu={gpus}")
    elif cfg.cluster == "lsf":
        kw["project"] = cfg.account
        if gpus:
            extra.append(f'-gpu "num={gpus}"')
    kw["job_extra_directives"] = extra
    return JOBQUEUE_CLASSES[cfg.cluster], {k: v for k, v in kw.items() if v is not None}


def _jobqueue_class(name: str):
    import dask_jobqueue

    return getattr(dask_jobqueue, name)


def job_script(cfg: CohortConfig, log_directory: Path | None = None) -> str:
    """The batch script one job would run, without starting a scheduler or submitting anything."""
    cls_name, kw = jobqueue_kwargs(cfg, log_directory)
    cls = _jobqueue_class(cls_name)
    # the job object creates its log folder: a dry run must leave no trace, so remove what it made
    made = []
    if log_directory is not None:
        p = Path(log_directory)
        while not p.exists():
            made.append(p)
            p = p.parent
    try:
        job = cls.job_cls(scheduler="tcp://SCHEDULER-ADDRESS:PORT", name="dry-run", **kw)
        return job.job_script()
    finally:
        for p in made:
            with suppress(OSError):
                p.rmdir()


def _dashboard_available() -> bool:
    try:
        import bokeh  # noqa: F401

        return True
    except ImportError:
        return False


def dask_settings(cfg: CohortConfig) -> dict[str, Any]:
    """Dask configuration for this run (applies to the scheduler and to nanny-spawned local workers)."""
    return {
        # a slide whose worker died is retried this many times on other workers, then recorded as failed
        "distributed.scheduler.allowed-failures": cfg.retries,
        "distributed.worker.daemon": False,
        # forget a lost batch job quickly so that a replacement is submitted soon
        "distributed.deploy.lost-worker-timeout": "5s",
    }


@dataclass
class Cluster:
    """A connected client plus what the run loop needs to know about the cluster behind it."""

    client: Any
    kind: str
    cluster: Any = None
    jobs: int = 0
    threads: int = 1
    use_resources: bool = True
    keeper: "JobKeeper | None" = None
    description: str = ""

    def dashboard(self) -> str:
        """One line about the scheduler's web pages (the full dashboard needs bokeh)."""
        try:
            info = self.client.scheduler_info(n_workers=0)
            if "dashboard" not in info.get("services", {}):
                return "Dask dashboard: not served by this scheduler"
            link = self.client.dashboard_link
        except Exception:  # noqa: BLE001 - only informative
            return "Dask dashboard: unknown"
        if _dashboard_available():
            return f"Dask dashboard at {link}"
        return f"Dask scheduler pages at {link} (pip install bokeh for the live dashboard)"

    def slots(self) -> int:
        """Slides the connected workers can run at once (one per worker of ours; threads on others)."""
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {}).values()
        if self.use_resources:
            return sum(int((w.get("resources") or {}).get(SLIDE_RESOURCE, 0)) for w in workers)
        return sum(int(w.get("nthreads") or 1) for w in workers)


@contextmanager
def open_cluster(cfg: CohortConfig, log_directory: Path, n_tasks: int) -> Iterator[Cluster]:
    """Start (or join) the cluster for `n_tasks` slides; closes what it started, cancelling batch jobs."""
    import dask
    from distributed import Client, LocalCluster

    dash = ":0"  # any free port: several cohorts (or tests) may run on one machine; the address is printed
    with dask.config.set(dask_settings(cfg)):
        if cfg.scheduler_address:
            client = Client(cfg.scheduler_address, timeout="30s")
            try:
                # threads=0: each worker divides its machine's cores among the slides it runs at once
                yield Cluster(client, "external", use_resources=False, threads=0,
                              description=f"existing scheduler {cfg.scheduler_address}")
            finally:
                client.close()
            return
        if cfg.cluster == "local":
            n, threads = local_shape(cfg)
            n = min(n, max(1, n_tasks))
            cluster = LocalCluster(
                n_workers=n, threads_per_worker=threads, processes=True,
                resources={SLIDE_RESOURCE: 1}, dashboard_address=dash,
                memory_limit=cfg.memory or "auto", silence_logs=logging.ERROR,
            )
            client = Client(cluster)
            try:
                yield Cluster(client, "local", cluster, jobs=n, threads=threads,
                              description=f"local cluster: {n} worker process(es) x {threads} thread(s)")
            finally:
                client.close()
                cluster.close()
            return
        cls_name, kw = jobqueue_kwargs(cfg, log_directory)
        cls = _jobqueue_class(cls_name)
        cluster = cls(scheduler_options={"dashboard_address": dash}, silence_logs=logging.ERROR, **kw)
        jobs = min(cfg.jobs or 1, max(1, -(-n_tasks // cfg.workers_per_job)))
        cluster.scale(jobs=jobs)
        client = Client(cluster)
        threads = max(1, job_cores(cfg) // cfg.workers_per_job)
        try:
            yield Cluster(client, cfg.cluster, cluster, jobs=jobs, threads=threads,
                          keeper=JobKeeper(cluster, client, jobs),
                          description=f"{cls_name}: {jobs} job(s) x {cfg.workers_per_job} worker(s), "
                                      f"{kw['cores']} cores, {kw['memory']}, walltime {kw['walltime']}")
        finally:
            client.close()
            with suppress(Exception):
                cluster.close()


@dataclass
class JobKeeper:
    """Keeps `jobs` batch jobs alive: a job whose workers all went away (scancel, walltime, node failure) is
    dropped from the cluster's plan and a fresh one is submitted.

    dask-jobqueue does not resubmit on its own (SpecCluster keeps the dead job in its plan, and never notices
    jobs with several worker processes), so without this a cohort would stall once every job had died.
    """

    cluster: Any
    client: Any
    jobs: int
    grace_s: float = 3.0
    seen: set[str] = field(default_factory=set)
    gone_since: dict[str, float] = field(default_factory=dict)
    replaced: int = 0

    def _connected(self) -> set[str]:
        names = {str(w.get("name")) for w in self.client.scheduler_info(n_workers=-1).get("workers", {}).values()}
        up = set()
        for job in list(self.cluster.worker_spec):
            j = str(job)
            if any(n == j or n.startswith(j + "-") for n in names):
                up.add(j)
        return up

    def check(self) -> list[str]:
        """Replace lost jobs; returns the names of the jobs replaced now."""
        now = time.monotonic()
        up = self._connected()
        lost = []
        for job in [str(j) for j in list(self.cluster.worker_spec)]:
            if job in up:
                self.seen.add(job)
                self.gone_since.pop(job, None)
            elif job in self.seen:
                t0 = self.gone_since.setdefault(job, now)
                if now - t0 >= self.grace_s:
                    lost.append(job)
        if lost:
            self._replace(lost)
        return lost

    def _replace(self, names: list[str]) -> None:
        cluster = self.cluster

        async def drop() -> None:
            for name in names:
                for key in [k for k in list(cluster.worker_spec) if str(k) == name]:
                    del cluster.worker_spec[key]
                for key in [k for k in list(cluster.workers) if str(k) == name]:
                    job = cluster.workers.pop(key)
                    with suppress(Exception):
                        await job.close()  # cancels the batch job if it somehow still runs

        cluster.sync(drop)
        # fresh job names: SpecCluster would reuse the freed one, which the scheduler may still remember
        if hasattr(cluster, "_i"):
            cluster._i = max(cluster._i, self.jobs + self.replaced)
        for name in names:
            self.seen.discard(name)
            self.gone_since.pop(name, None)
        self.replaced += len(names)
        log.info("batch job(s) %s lost their workers; submitting %d replacement(s)", ", ".join(names), len(names))
        cluster.scale(jobs=self.jobs)
