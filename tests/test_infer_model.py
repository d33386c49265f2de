"""Inference with a real (tiny) HaloAE model file: kill -9 and rerun through the CLI, model-file errors.

The planted-anomaly test lives in test_infer_anomaly.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_haloae.config import InferConfig, InferOptions
from wsi_haloae.errors import BadModelFileError
from wsi_haloae.fileio import partial_name
from wsi_haloae.infer import writers
from wsi_haloae.infer.engine import run_infer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """An untrained tiny HaloAE (random backbone) with a zero mean map: enough to exercise the pipeline."""
    from wsi_haloae.model import build_model, save_model

    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_model(path, build_model("tiny", backbone_weights="random", seed=0), torch.zeros(64, 64), {"mpp": 0.5})
    return path


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory) -> Path:
    from wsi_haloae.slide.synthetic import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / "small.tif", width=1024, height=1024, mpp=0.5)


def _cli(slide: Path, model: Path, out: Path, extra=()) -> list[str]:
    return [sys.executable, "-m", "wsi_haloae.cli", "infer", str(slide), "--model", str(model), "--out", str(out),
            "--tiff", str(out.with_suffix(".ome.tif")), "--geojson", str(out.with_suffix(".geojson")),
            "--workers", "0", "--batch-size", "1", "--pixel-downsample", "1", *extra]


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def _chunks(store: Path) -> int:
    """Level-0 chunk files written so far."""
    level0 = store / "0"
    return sum(1 for p in level0.rglob("*") if p.is_file() and not p.name.startswith(".")) if level0.exists() else 0


def _kill_when(cmd: list[str], pred) -> bool:
    """Start ``cmd``; SIGKILL it as soon as ``pred()`` holds. True if it was killed while still running."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        hit = _wait_for(pred, proc)
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if not alive:
            pytest.fail(f"infer exited before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        return hit
    finally:
        if proc.poll() is None:
            proc.kill()


def test_kill_9_at_any_point_then_rerun_gives_the_uninterrupted_result(small_slide, tiny_model, tmp_path):
    # the uninterrupted reference, in-process
    ref = InferConfig(slide=small_slide, model=tiny_model, out=tmp_path / "ref.zarr",
                      outputs={"geojson": tmp_path / "ref.geojson"},
                      options=InferOptions(workers=0, batch_size=1, pixel_downsample=1, progress=False))
    run_infer(ref)
    ref_g = writers.open_store(ref.out)

    out = tmp_path / "run.zarr"
    partial = partial_name(out)
    cmd = _cli(small_slide, tiny_model, out)
    # 1) as soon as the temp store exists (model loaded, grid built, no tile scored yet)
    assert _kill_when(cmd, partial.exists)
    assert not out.exists() and not writers.is_complete(partial)
    # 2) in the middle of the tiles: the first level-0 chunk of the 2x2-chunk map has been written
    assert _kill_when(cmd, lambda: _chunks(partial) > 0)
    assert not out.exists() and not writers.is_complete(partial)
    assert 0 < _chunks(partial) < 4  # genuinely half-written state left behind
    # rerun to completion through the CLI
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert writers.is_complete(out) and not partial.exists()
    g = writers.open_store(out)
    levels, ref_levels = writers.map_levels(g), writers.map_levels(ref_g)
    assert [a.shape for a in levels] == [a.shape for a in ref_levels]
    for a, b in zip(levels, ref_levels):
        np.testing.assert_allclose(a[:], b[:], rtol=1e-4, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(g["tiles/xy"][:], ref_g["tiles/xy"][:])
    np.testing.assert_allclose(g["tiles/score_mean"][:], ref_g["tiles/score_mean"][:], rtol=1e-4)
    assert out.with_suffix(".ome.tif").is_file() and out.with_suffix(".geojson").is_file()
    assert "tiles/s" in p.stderr.strip().splitlines()[-1]  # the summary line, on stderr
    assert p.stdout == ""  # results go to files, nothing to stdout
    # and a second rerun leaves the complete output alone
    p2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p2.returncode == 0 and "already complete" in p2.stderr


def test_bad_and_mismatched_model_files(small_slide, tiny_model, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_model.read_bytes()[: 200_000])
    with pytest.raises(BadModelFileError, match="truncated"):
        run_infer(InferConfig(slide=small_slide, model=truncated, out=tmp_path / "o.zarr",
                              options=InferOptions(progress=False)))
    # a model whose tensors do not fit its config (e.g. edited or from another preset)
    from safetensors.torch import load_file, save_file

    from wsi_haloae.model.checkpoint import read_header

    tensors = load_file(str(tiny_model))
    key = next(k for k in tensors if k.endswith("weight") and tensors[k].ndim == 4 and "autoencoder" in k)
    tensors[key] = tensors[key][:1].contiguous()
    mismatched = tmp_path / "mismatched.safetensors"
    save_file(tensors, str(mismatched), metadata=read_header(tiny_model))
    with pytest.raises(BadModelFileError, match="shape"):
        run_infer(InferConfig(slide=small_slide, model=mismatched, out=tmp_path / "o.zarr",
                              options=InferOptions(progress=False)))
    assert not (tmp_path / "o.zarr").exists() and not partial_name(tmp_path / "o.zarr").exists()
