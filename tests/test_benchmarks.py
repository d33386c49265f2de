"""Smoke tests for benchmarks/: each script runs in --quick mode and writes a valid JSON result.

Figures are never asserted (they depend on the machine); what is checked is that each script runs from the
command its README gives, prints the command first, and writes the machine facts and sane, positive rates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One work folder for the module: the benchmark slides and model files are made once."""
    return tmp_path_factory.mktemp("bench-work")


def run_bench(name: str, tmp_path: Path, *extra: str, workdir: Path | None = None) -> dict:
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, WSI_HALOAE_BENCH_DIR=str(workdir or tmp_path / "work"), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--device", "cpu", "--out", str(out), *extra]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    first = p.stdout.splitlines()[0]
    assert first.startswith(f"# python benchmarks/{name}.py --quick"), first
    res = json.loads(out.read_text())
    assert res["benchmark"] == name and res["quick"] is True
    m = res["machine"]
    for key in ("cpu_model", "cpu_count", "torch", "python", "date_utc", "loadavg_start", "loadavg_end"):
        assert key in m, key
    assert m["cpu_count"] >= 1 and m["device"] == "cpu"
    assert res["rows"], "no rows"
    return res


def test_bench_model_quick(tmp_path):
    res = run_bench("bench_model", tmp_path)
    ok = [r for r in res["rows"] if "error" not in r]
    assert ok and all(r["preset"] == "tiny" for r in ok)
    for r in ok:
        assert r["tiles_per_s"] > 0 and r["tflop_per_s"] > 0
        # FlopCounterMode on the meta device: the tiny preset is ~12.9 GFLOP per tile (DESIGN.md section 7 scale)
        assert 5 < r["gflop_per_tile"] < 30
    assert res["flops_per_tile"]["tiny"] == pytest.approx(ok[0]["gflop_per_tile"] * 1e9)
    assert res["matmul_peak_flops"]["fp32"] > 0


def test_bench_infer_quick(tmp_path, workdir):
    res = run_bench("bench_infer", tmp_path, "--workdir", str(workdir), workdir=workdir)
    (r,) = res["rows"]
    assert r["tiles"] > 0 and r["tiles"] <= r["grid"]
    assert 0 < r["model_seconds"] <= r["seconds"]
    assert 0 < r["ratio"] <= 1.0 + 1e-9  # end to end can never beat the model alone in the same run
    stages = r["stages_s"]
    assert stages["  model anomaly_map"] > 0 and stages["tile loop (total)"] >= stages["  model anomaly_map"]
    assert r["store_mb"] > 0


def test_bench_memory_quick(tmp_path, workdir):
    res = run_bench("bench_memory", tmp_path, "--workdir", str(workdir), workdir=workdir)
    rows = res["rows"]
    assert [r["size"] for r in rows] == [1024, 2048]
    # the same islands in both slides: same tissue tile count whatever the area
    assert rows[0]["tiles"] == rows[1]["tiles"] > 0
    for r in rows:
        assert r["rc"] == 0 and r["peak_rss_mb"] > 50 and r["ru_maxrss_mb"] > 50 and r["store_mb"] > 0
        assert r["peak_tree_rss_mb"] >= r["peak_rss_mb"]
    assert set(res["target"]) == {"max_ratio", "ratio", "holds"}


def test_bench_reader_quick(tmp_path, workdir):
    res = run_bench("bench_reader", tmp_path, "--workdir", str(workdir), workdir=workdir)
    modes = {(r["mode"], r["workers"]) for r in res["rows"]}
    assert ("TileDataset.read_tile", 0) in modes and ("TileDataset.read_tile", 1) in modes
    n = res["slide"]["tissue_tiles"]
    for r in res["rows"]:
        assert r["tiles"] == n and r["tiles_per_s"] > 0 and r["cpu_ms_per_tile"] > 0


def test_bench_train_quick(tmp_path, workdir):
    res = run_bench("bench_train", tmp_path, "--workdir", str(workdir), workdir=workdir)
    rows = res["rows"]
    assert [(r["kind"], r["channels_last"]) for r in rows] == [("default", False), ("lever", True)]
    for r in rows:
        assert "error" not in r, r
        assert r["preset"] == "tiny" and r["steps"] == 1 and r["images_per_step"] == 3 and r["dtype"] == "fp32"
        assert r["images_per_s"] > 0 and r["tflop_per_s"] > 0 and r["vgg_s_per_step"] > 0
        # FLOPs of a training step counted on the meta device: tiny, 3 images, ~27 GFLOP each
        assert 50 < r["gflop_per_step"] < 120
    assert res["matmul_peak_flops"]["fp32"] > 0


def test_ssim_constants_quick(tmp_path):
    res = run_bench("ssim_constants", tmp_path)
    assert res["preset"] == "tiny" and res["images"] == 2
    assert 0 <= res["frac_var_below_c2_new"] <= res["frac_var_below_c2_old"] <= 1
    names = [r["degradation"] for r in res["rows"]]
    assert len(names) == 3
    for r in res["rows"]:  # the fixed constants never make a degraded reconstruction look more similar
        assert 0 < r["one_minus_ssim_old"] <= r["one_minus_ssim_new"] + 1e-6


def test_gpu_check_script_is_valid_bash():
    script = BENCH / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_bench_maps_quick(tmp_path, workdir):
    res = run_bench("bench_maps", tmp_path, workdir=workdir)
    rows = res["rows"]
    assert {r["grid"] for r in rows} == {"whole tiles only", "whole + edge tiles"} and len(rows) == 8
    for r in rows:
        assert 0 < r["tissue_scored"] <= 1 and r["windows"] >= r["grid_tiles"] > 0


def test_bench_seams_quick(tmp_path, workdir):
    res = run_bench("bench_seams", tmp_path, "--workdir", str(workdir), workdir=workdir)
    rows = res["rows"]
    assert [r["overlap"] for r in rows] == [0.0, 0.5]
    for r in rows:
        assert r["tiles"] > 0 and r["windows"] >= r["tiles"] and r["tiles_per_s"] > 0
        assert r["seam_inner"] > 0 and r["seam_ratio"] > 0 and 0 < r["scored_fraction"] <= 1
    assert rows[1]["windows"] > rows[0]["windows"]


def test_gpu_check_dry_run(tmp_path, workdir):
    """The GPU check's plan runs end to end at trivial size on the CPU and lands in one JSON with every step."""
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHON=sys.executable, WSI_HALOAE_BENCH_DIR=str(workdir), PYTHONUNBUFFERED="1",
               GPU_CHECK_PYTEST_ARGS="-k halo_attention")  # the quickest CUDA tests, here on the CPU
    p = subprocess.run([str(BENCH / "gpu_check.sh"), "--dry-run", str(out)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("# benchmarks/gpu_check.sh --dry-run") and "plan (dry run" in lines[1]
    assert (out / "gpu_check.log").read_text() == p.stdout
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["dry_run"] is True and res["complete"] is True
    assert [s["name"] for s in res["steps"]] == ["setup", "tests", "model", "infer", "train", "compare"]
    assert all(s["rc"] == 0 and not s["timed_out"] and s["seconds"] >= 0 for s in res["steps"])
    t = res["tests"]
    assert t["ran"] and t["passed"] >= 2 and t["failures"] == t["errors"] == 0
    for key in ("model", "infer", "train"):
        assert res[key]["rows"] and res[key]["quick"] is True, key
    cmp = res["attention_compare"]
    assert [r["attention"] for r in cmp["rows"]] == ["halo", "authors-mask"] and all(r["steps"] == 1 for r in cmp["rows"])
    assert res["summary"]["train_tiny_images_per_s"] > 0 and res["summary"]["anomaly_map_tiny_bf16_tiles_per_s"] > 0
    assert res["machine"]["device"] == "cpu"
