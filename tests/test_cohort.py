"""`wsi-haloae cohort`: slide lists, job scripts, and real runs on a local Dask cluster and on a real SLURM.

The SLURM tests need the single-node cluster of tests/slurm/start.sh (CI starts it); they skip with the
reason when `sinfo` cannot reach a controller.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import shared_path
from wsi_haloae.config import CohortConfig, InferOptions
from wsi_haloae.errors import BadInputError

CLI = [sys.executable, "-m", "wsi_haloae.cli", "cohort"]
FAST = ["--device", "cpu", "--infer-workers", "0", "--batch-size", "8"]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch

    from wsi_haloae.model import build_model
    from wsi_haloae.model.checkpoint import save_model

    model = build_model("tiny", backbone_weights="random")
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return save_model(path, model, torch.zeros(64, 64), {"mpp": None})


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory) -> Path:
    """Two small synthetic slides and one file of garbage bytes posing as a slide."""
    from wsi_haloae.slide.synthetic import write_synthetic_slide

    d = tmp_path_factory.mktemp("cohort_slides")
    for i in range(2):
        write_synthetic_slide(d / f"syn{i}.tif", width=1024, height=1024, mpp=0.5, seed=i)
    (d / "x.svs").write_bytes(os.urandom(4096))
    return d


def run_cli(*args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    p = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    return p, time.perf_counter() - t0


def read_rows(out: Path) -> dict[str, dict]:
    with open(out / "cohort.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


# ----------------------------------------------------------------------------------------- slide lists
def test_folder_lists_slides_and_dicom_folders(tmp_path):
    from wsi_haloae.cohort import collect_slides

    for name in ("b.svs", "a.ndpi", "c.ome.tiff", "notes.txt", ".hidden.svs", "d.MRXS"):
        (tmp_path / name).write_bytes(b"x")
    dcm = tmp_path / "case 7"
    dcm.mkdir()
    for name in ("level1.dcm", "level0.dcm"):
        (dcm / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    got = {e.id: e.path for e in collect_slides(str(tmp_path))}
    assert set(got) == {"a", "b", "c", "d", "case_7"}
    assert got["case_7"] == (dcm / "level0.dcm").resolve()  # a DICOM slide opens through one of its files
    assert all(p.is_absolute() for p in got.values())
    with pytest.raises(BadInputError, match="holds no slides"):
        collect_slides(str(tmp_path / "empty"))
    with pytest.raises(BadInputError, match="no such manifest, folder or file"):
        collect_slides(str(tmp_path / "nowhere"))


def test_glob_recurses_and_disambiguates_ids(tmp_path):
    from wsi_haloae.cohort import collect_slides

    for sub in ("p1", "p2"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "s.svs").write_bytes(b"x")
    (tmp_path / "p2" / "t.svs").write_bytes(b"x")
    got = collect_slides(str(tmp_path / "**" / "*.svs"))
    assert [(e.id, e.path.parent.name) for e in got] == [("s", "p1"), ("s-2", "p2"), ("t", "p2")]
    with pytest.raises(BadInputError, match="holds no slides"):
        collect_slides(str(tmp_path / "*.ndpi"))


def test_manifest_columns_relative_paths_and_errors(tmp_path):
    from wsi_haloae.cohort import collect_slides

    (tmp_path / "imgs").mkdir()
    m = tmp_path / "cohort.csv"
    m.write_text("Slide,id,mpp,slide_mpp\nimgs/a.svs,case-1,0.25,\n/abs/b.ndpi,,,0.23\n\n")
    got = collect_slides(str(m))
    assert [(e.id, e.mpp, e.slide_mpp) for e in got] == [("case-1", 0.25, None), ("b", None, 0.23)]
    assert got[0].path == (tmp_path / "imgs" / "a.svs").resolve()  # relative to the manifest, not the cwd
    assert got[1].path == Path("/abs/b.ndpi")
    for text, msg in (("path\na.svs\n", "no 'slide' column"),
                      ("slide,id\na.svs,x\nb.svs,X\n", "already used on line 2"),
                      ("slide,mpp\na.svs,fast\n", "not a positive number"),
                      ("slide,slide_mpp\na.svs,-0.5\n", "slide_mpp '-0.5' is not a positive number"),
                      ("slide,id\na.svs,../up\n", "may only hold")):
        m.write_text(text)
        with pytest.raises(BadInputError, match=msg):
            collect_slides(str(m))


def test_report_escapes_sorts_and_keeps_columns(tmp_path):
    from wsi_haloae.cohort.report import COLUMNS, write_reports

    (tmp_path / "hot.png").write_bytes(b"png")
    rows = [{"id": "x<1>", "path": "/s/x.svs", "status": "failed", "error": "cannot open: <bad> & worse"},
            {"id": "cold", "path": "/s/c.svs", "status": "done", "score_max": 0.1, "tiles": 9, "host": "n1"},
            {"id": "hot", "path": "/s/h.svs", "status": "skipped", "score_max": 0.9, "tiles": 4}]
    write_reports(tmp_path, rows, {"model_sha256": "abc"})
    with open(tmp_path / "cohort.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == COLUMNS and [r["id"] for r in got] == ["x<1>", "cold", "hot"]
    assert got[1]["score_max"] == "0.1" and got[0]["tiles"] == ""
    assert json.loads((tmp_path / "cohort.json").read_text())["cohort"]["model_sha256"] == "abc"
    page = (tmp_path / "index.html").read_text()
    assert "x&lt;1&gt;" in page and "&lt;bad&gt; &amp; worse" in page and "<bad>" not in page
    assert page.index('data-v="hot"') < page.index('data-v="cold"') < page.index('data-v="x&lt;1&gt;"')
    assert 'src="hot.png"' in page and 'src="cold.png"' not in page  # only previews that exist
    assert not list(tmp_path.glob(".*.part"))  # written through temp names


# ------------------------------------------------------------------------------------------- job scripts
def test_jobqueue_kwargs_map_gpus_per_scheduler(tmp_path):
    from wsi_haloae.cohort import jobqueue_kwargs

    base = dict(slides="x", model=Path("m"), out=tmp_path, gpus_per_job=2, cores=8, memory="32GB", account="proj")
    name, kw = jobqueue_kwargs(CohortConfig(cluster="slurm", job_extra=("--constraint=a100",), **base))
    assert name == "SLURMCluster" and kw["account"] == "proj" and kw["cores"] == 8
    assert kw["job_extra_directives"] == ["--constraint=a100", "--gres=gpu:2"]
    name, kw = jobqueue_kwargs(CohortConfig(cluster="pbs", **base))
    assert name == "PBSCluster" and kw["resource_spec"] == "select=1:ncpus=8:ngpus=2:mem=32Gb"
    name, kw = jobqueue_kwargs(CohortConfig(cluster="sge", **base))
    assert name == "SGECluster" and kw["project"] == "proj" and kw["job_extra_directives"] == ["-l gpu=2"]
    name, kw = jobqueue_kwargs(CohortConfig(cluster="lsf", **base))
    assert name == "LSFCluster" and kw["job_extra_directives"] == ['-gpu "num=2"']
    # defaults: one core per tile reader plus one, memory per worker, a finite walltime
    _, kw = jobqueue_kwargs(CohortConfig(cluster="slurm", slides="x", model=Path("m"), out=tmp_path,
                                         workers_per_job=2, options=InferOptions(workers=3)))
    assert (kw["cores"], kw["memory"], kw["processes"], kw["walltime"]) == (8, "16GB", 2, "02:00:00")
    with pytest.raises(BadInputError, match="fewer than --workers-per-job"):
        jobqueue_kwargs(CohortConfig(cluster="slurm", slides="x", model=Path("m"), out=tmp_path, cores=1,
                                     workers_per_job=2))


def test_dry_run_prints_plan_and_slurm_script_without_running(tiny_model, slide_dir, tmp_path):
    out = tmp_path / "out"
    p, _ = run_cli(slide_dir, "--model", tiny_model, "--out", out, "--cluster", "slurm", "--jobs", "3",
                   "--gpus-per-job", "1", "--cores", "6", "--memory", "24GB", "--walltime", "01:30:00",
                   "--queue", "gpu", "--account", "lab42", "--job-extra=--constraint=a100", "--dry-run")
    assert p.returncode == 0, p.stderr
    s = p.stdout
    assert "3 slides" in s and "3 to run" in s and "3 job(s)" in s
    p, _ = run_cli(slide_dir, "--model", tiny_model, "--out", out, "--cluster", "slurm", "--jobs", "9", "--dry-run")
    assert "3 job(s)" in p.stdout  # never more jobs than slides
    for directive in ("#SBATCH -p gpu", "#SBATCH -A lab42", "#SBATCH --cpus-per-task=6", "#SBATCH --mem=23G",
                      "#SBATCH -t 01:30:00", "#SBATCH --gres=gpu:1", "#SBATCH --constraint=a100",
                      "#SBATCH -J wsi-haloae"):
        assert directive in s, f"{directive!r} missing from:\n{s}"
    assert "--resources slide=1" in s and "DASK_DISTRIBUTED__WORKER__DAEMON=False" in s
    assert not out.exists()  # nothing ran, nothing written


# ---------------------------------------------------------------------------------------- local cluster
def test_local_cohort_records_failures_and_resumes(tiny_model, slide_dir, tmp_path):
    out = tmp_path / "out"
    p, _ = run_cli(slide_dir, "--model", tiny_model, "--out", out, "--jobs", "1", *FAST)
    assert p.returncode == 1, p.stderr
    assert "1 of 3 slides failed" in p.stderr
    # issue 13 case 6: a slide's failure is a log line (stderr); stdout stays empty
    assert "cohort: x failed: " in p.stderr and p.stdout == ""
    rows = read_rows(out)
    assert {k: r["status"] for k, r in rows.items()} == {"syn0": "done", "syn1": "done", "x": "failed"}
    assert "x.svs" in rows["x"]["error"] and "\n" not in rows["x"]["error"]
    from wsi_haloae.infer.writers import is_complete

    for sid in ("syn0", "syn1"):
        r = rows[sid]
        assert is_complete(out / f"{sid}.zarr")
        for suffix in (".ome.tiff", ".geojson", ".png"):
            assert (out / f"{sid}{suffix}").is_file()
        assert int(r["tiles"]) > 0 and 0 < float(r["tissue_fraction"]) < 1
        assert 0 <= float(r["score_mean"]) <= float(r["score_p95"]) <= float(r["score_max"])
        assert float(r["seconds"]) > 0 and r["host"]
    # one worker, three slides: the model was loaded once and kept
    js = json.loads((out / "cohort.json").read_text())
    assert [s["model_loads"] for s in js["slides"]] == [1, 1, 1]
    assert js["cohort"]["model_sha256"]
    page = (out / "index.html").read_text()
    assert 'src="syn0.png"' in page and 'src="syn1.png"' in page and "sortBy" in page and "x.svs" in page

    # an interrupted slide (no completion marker) is redone, a complete one skipped untouched
    (out / "syn1.zarr" / ".complete").unlink()
    before = (out / "syn0.zarr" / ".complete").stat().st_mtime_ns
    p, _ = run_cli(slide_dir, "--model", tiny_model, "--out", out, "--jobs", "1", *FAST)
    assert p.returncode == 1
    rows = read_rows(out)
    assert {k: r["status"] for k, r in rows.items()} == {"syn0": "skipped", "syn1": "done", "x": "failed"}
    assert (out / "syn0.zarr" / ".complete").stat().st_mtime_ns == before
    assert rows["syn0"]["tiles"] and rows["syn0"]["score_max"]  # figures of a skipped slide come from its store

    # nothing left to run: no cluster starts, exit 0 once the bad file is gone; asked for another FDR, the
    # complete slides keep their calls, and the log and the page both say which and how
    shutil.move(slide_dir / "x.svs", tmp_path / "x.svs")
    try:
        p, secs = run_cli(slide_dir, "--model", tiny_model, "--out", out, "--fdr", "0.1", *FAST)
    finally:
        shutil.move(tmp_path / "x.svs", slide_dir / "x.svs")
    assert p.returncode == 0, p.stderr
    assert "local cluster" not in p.stderr and "2 slides, 0 to run" in p.stderr
    assert {r["status"] for r in read_rows(out).values()} == {"skipped"}
    assert secs < 30
    kept = [ln for ln in p.stderr.splitlines() if "keep calls made under other settings" in ln]
    assert len(kept) == 1 and "2 complete slide(s)" in kept[0] and "syn0 (made at --threshold fdr --fdr 0.05, asked --threshold fdr --fdr 0.1)" in kept[0]
    page = (out / "index.html").read_text()
    assert "Not so for 2 slide(s) complete from an earlier run" in page and "syn1: made at --threshold fdr --fdr 0.05" in page
    assert json.loads((out / "cohort.json").read_text())["cohort"]["kept_calls"].keys() == {"syn0", "syn1"}


def test_local_cohort_resolution_rules_and_no_tissue(tiny_model, slide_dir, tmp_path):
    """The rules of infer, slide by slide: a slide without mpp fails naming --slide-mpp unless the manifest
    declares it, a target > 4x finer than level 0 fails, a slide of glass is 'no tissue' (not failed, not
    done, not hidden on a rerun) and does not make the exit status 1 on its own."""
    from PIL import Image

    from wsi_haloae.slide.synthetic import Disc, SyntheticSlideSpec, render_region, write_synthetic_slide

    spec = SyntheticSlideSpec(width=600, height=500, islands=(Disc(300, 250, 220),))
    flat = tmp_path / "flat.png"
    Image.fromarray(render_region(spec, 0, 0, 600, 500)).save(flat)
    glass = write_synthetic_slide(tmp_path / "glass.tif", SyntheticSlideSpec(width=800, height=600, islands=()))
    m = tmp_path / "m.csv"
    m.write_text(f"slide,id,mpp,slide_mpp\n{glass},glass,,\n{flat},declared,,0.5\n{flat},undeclared,,\n"
                 f"{slide_dir / 'syn0.tif'},too-fine,0.001,\n")
    out = tmp_path / "out"
    p, _ = run_cli(m, "--model", tiny_model, "--out", out, "--jobs", "1", "--no-tiff", *FAST)
    assert p.returncode == 1, p.stderr
    rows = read_rows(out)
    assert {k: r["status"] for k, r in rows.items()} == {"glass": "no tissue", "declared": "done",
                                                         "undeclared": "failed", "too-fine": "failed"}
    assert "flat.png does not record its resolution" in rows["undeclared"]["error"]
    assert "--slide-mpp" in rows["undeclared"]["error"]
    assert "more than 4x finer" in rows["too-fine"]["error"]
    assert rows["glass"]["tiles"] == "0" and rows["glass"]["error"] == "" and (out / "glass.png").is_file()
    assert int(rows["declared"]["tiles"]) > 0
    assert "1 done, 1 no tissue, 0 skipped, 2 failed of 4 slides" in p.stderr
    assert "glass: no tissue found" in p.stderr
    from wsi_haloae.infer.writers import read_attrs

    assert read_attrs(out / "glass.zarr")["status"] == "no tissue"
    assert read_attrs(out / "declared.zarr")["resolution"]["slide_mpp_declared"] is True
    # a bad --magnification fails the command before anything runs
    p, _ = run_cli(m, "--model", tiny_model, "--out", out, "--magnification", "big", *FAST)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --magnification")
    # only complete slides left: no cluster, exit 0; the glass slide is still shown as such
    m.write_text(f"slide,id,slide_mpp\n{glass},glass,\n{flat},declared,0.5\n")
    p, _ = run_cli(m, "--model", tiny_model, "--out", out, "--no-tiff", *FAST)
    assert p.returncode == 0, p.stderr
    assert {k: r["status"] for k, r in read_rows(out).items()} == {"glass": "no tissue", "declared": "skipped"}
    assert "0 done, 1 no tissue, 1 skipped, 0 failed" in p.stderr and "local cluster" not in p.stderr


def _children(pid: int, marker: str) -> list[int]:
    """Child processes of `pid` whose command line contains `marker` (from /proc: no extra dependency)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and marker in cmd:
            out.append(int(d.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the worker process")
def test_local_worker_killed_mid_run_is_restarted_and_slide_retried(tiny_model, slide_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, str(slide_dir / "syn*.tif"), "--model", str(tiny_model), "--out", str(out),
                             "--jobs", "1", "--retries", "1", *FAST],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((out / ".cohort").glob("*.json")):  # first slide finished; the second starts now
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no slide finished in time"
            time.sleep(0.2)
        workers = _children(proc.pid, "spawn_main")
        assert len(workers) == 1, workers
        os.kill(workers[0], 9)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert {r["status"] for r in read_rows(out).values()} == {"done"}


def test_bad_model_fails_before_any_slide(slide_dir, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    p, _ = run_cli(slide_dir, "--model", bad, "--out", tmp_path / "out", *FAST)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "bad.safetensors" in p.stderr
    assert not (tmp_path / "out" / "cohort.csv").exists()


# ------------------------------------------------------------------------------------------------- SLURM
def _slurm_reason() -> str | None:
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "SLURM is not installed (tests/slurm/start.sh installs and starts it)"
    try:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    states = p.stdout.split()
    if p.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mix", "alloc") for s in states):
        return f"no usable SLURM node (sinfo: {(p.stdout + p.stderr).strip()[:200] or 'nothing'}); run tests/slurm/start.sh"
    return None


_SLURM_REASON = _slurm_reason()  # once: sinfo waits for its timeout when no controller answers
slurm = pytest.mark.skipif(_SLURM_REASON is not None, reason=str(_SLURM_REASON))
SLURM_OPTS = ["--cluster", "slurm", "--cores", "1", "--memory", "2GB", "--walltime", "00:10:00", *FAST]


def _our_jobs() -> list[str]:
    p = subprocess.run(["squeue", "-h", "-n", "wsi-haloae", "-t", "PENDING,RUNNING", "-o", "%i %t"],
                       capture_output=True, text=True)
    return p.stdout.strip().splitlines()


@pytest.mark.slurm
@slurm
def test_slurm_cohort_with_broken_slide_then_resume(tiny_model, slide_dir, tmp_path):
    broken = SHARED_BROKEN()
    rows = ["slide,id,mpp", f"{slide_dir / 'syn0.tif'},syn0,", f"{slide_dir / 'syn1.tif'},syn1,",
            f"{broken},broken,"]
    try:
        cmu = shared_path("openslide-testdata", "Aperio", "CMU-1-Small-Region.svs")
        rows.append(f"{cmu},cmu1,2.0")  # 2 µm/px keeps it to a few tiles
    except pytest.skip.Exception:
        from wsi_haloae.slide.synthetic import write_synthetic_slide

        rows.append(f"{write_synthetic_slide(tmp_path / 'syn2.tif', width=1024, height=1024, seed=2)},syn2,")
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    p, _ = run_cli(manifest, "--model", tiny_model, "--out", out, "--jobs", "2", *SLURM_OPTS)
    assert p.returncode == 1, p.stderr
    assert "1 of 4 slides failed" in p.stderr
    got = read_rows(out)
    good = [k for k in got if k != "broken"]
    assert {got[k]["status"] for k in good} == {"done"} and got["broken"]["status"] == "failed"
    assert "broken" in got["broken"]["error"]
    assert all(got[k]["worker"].startswith("SLURMCluster-") for k in good)  # really ran in SLURM jobs
    assert any(f.suffix == ".err" for f in (out / ".cohort" / "logs").iterdir())
    assert not _our_jobs(), "jobs must be cancelled when the cohort ends"

    p, secs = run_cli(manifest, "--model", tiny_model, "--out", out, "--jobs", "2", *SLURM_OPTS)
    assert p.returncode == 1
    again = read_rows(out)
    assert {again[k]["status"] for k in good} == {"skipped"} and again["broken"]["status"] == "failed"
    assert secs < 60, f"resume took {secs:.0f}s"  # one job start for the broken slide, nothing else
    assert not _our_jobs()


def SHARED_BROKEN() -> Path:
    """histolab's truncated .svs; garbage bytes of our own when ../shared/data is absent."""
    try:
        return shared_path("histolab-fixtures", "tests", "fixtures", "svs-images", "broken.svs")
    except pytest.skip.Exception:
        p = Path(os.environ.get("TMPDIR", "/tmp")) / f"wsi-haloae-broken-{os.getpid()}.svs"
        p.write_bytes(os.urandom(1001))
        return p


@pytest.mark.slurm
@slurm
def test_slurm_job_cancelled_mid_run_is_replaced(tiny_model, slide_dir, tmp_path):
    """One job; scancel it after its first slide: the cohort must still finish every slide."""
    from wsi_haloae.slide.synthetic import write_synthetic_slide

    d = tmp_path / "slides"
    d.mkdir()
    for i in range(4):
        write_synthetic_slide(d / f"k{i}.tif", width=1024, height=1024, mpp=0.5, seed=20 + i)
    out = tmp_path / "out"
    proc = subprocess.Popen([*CLI, str(d), "--model", str(tiny_model), "--out", str(out), "--jobs", "1",
                             *SLURM_OPTS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while not list((out / ".cohort").glob("*.json")):  # a slide finished: the job is mid-cohort
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no slide finished in time"
            time.sleep(0.5)
        running = [j.split()[0] for j in _our_jobs() if j.split()[1] == "R"]
        assert running, "the cohort's job is not running"
        subprocess.run(["scancel", *running], check=True)
        _, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "lost their workers" in err
    rows = read_rows(out)
    assert {r["status"] for r in rows.values()} == {"done"} and len(rows) == 4
    workers = {r["worker"] for r in rows.values()}
    assert len(workers) >= 2, f"slides after the kill must run in a replacement job: {workers}"
    assert not _our_jobs()
