"""The CUDA paths: halo attention, bf16 maps, a training run and whole-slide inference on the GPU.

They run where CUDA is (``benchmarks/gpu_check.sh`` runs ``pytest -m cuda``) and are skipped elsewhere. With
``WSI_HALOAE_CUDA_TESTS_ON_CPU=1`` (``gpu_check.sh --dry-run``) they run on the CPU instead, so their own code
is exercised on machines without a GPU; the comparisons are then CPU against CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from wsi_haloae.model.halo import HaloAttention

pytestmark = pytest.mark.cuda

WEIGHTS = ("vgg-imagenet-weights", "vgg19-imagenet-normalised-to-relu3_1.safetensors")


@pytest.fixture(scope="module")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("WSI_HALOAE_CUDA_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("no CUDA device (WSI_HALOAE_CUDA_TESTS_ON_CPU=1 runs these on the CPU)")


@pytest.mark.parametrize("mask", ["halo", "authors"])
def test_halo_attention_on_device_equals_cpu_float64(device, mask):
    torch.manual_seed(0)
    att = HaloAttention(32, 4, dim_head=16, block=12, halo=2, mask=mask).double()
    x = torch.randn(2, 32, 60, 60, dtype=torch.double)
    with torch.no_grad():
        want = att(x).float()
        got = att.float().to(device)(x.float().to(device)).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bf16_maps_on_device_rank_like_float32(device, shared):
    """The GPU inference path (bf16 autocast) against float32 on the same device, real ImageNet features."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_precision import _tissue_tiles

    from wsi_haloae.model import build_model, postprocess, tile_scores
    from wsi_haloae.train.batchnorm import refresh_batchnorm
    from wsi_haloae.train.data import TileSet

    normal, test = _tissue_tiles()
    model = build_model("tiny", shared(*WEIGHTS), seed=0).to(device)
    arrays = (normal.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    refresh_batchnorm(model, TileSet(root=None, paths=[None] * len(arrays), skipped=0, cache=arrays), device, 9, 0)  # type: ignore[arg-type]
    test = test.to(device)
    with torch.no_grad():
        mean_map = model.anomaly_map(normal.to(device)).mean(0)
        raw32 = model.anomaly_map(test)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            raw16 = model.anomaly_map(test)
    pp32, pp16 = postprocess(raw32, mean_map).cpu(), postprocess(raw16, mean_map).cpu()
    assert spearmanr(pp32.flatten(), pp16.flatten())[0] >= 0.99
    assert spearmanr(tile_scores(pp32)[0], tile_scores(pp16)[0])[0] >= 0.99


def _geojson_scores(path: Path) -> dict[tuple[float, float], float]:
    feats = json.loads(path.read_text())["features"]
    return {tuple(f["geometry"]["coordinates"][0][0]): f["properties"]["measurements"]["anomaly_score"] for f in feats}


def test_train_then_infer_on_device(device, tmp_path, synthetic_slide):
    """A short training run on the device (bf16 + channels_last there, timed checkpoints, BatchNorm refresh),
    then the CLI's whole-slide inference with it on the device and on the CPU: same tiles, same ranking."""
    from test_train import write_tiles

    from wsi_haloae.config import TrainConfig
    from wsi_haloae.model import load_model
    from wsi_haloae.train.trainer import run_train

    from conftest import SHARED_DATA

    weights = SHARED_DATA.joinpath(*WEIGHTS)
    tiles = write_tiles(tmp_path / "tiles", n=6)
    out = tmp_path / "model.safetensors"
    run_train(TrainConfig(tiles=tiles, out=out, preset="tiny", epochs=1, samples_per_epoch=6, batch_size=2,
                          backbone_weights=str(weights) if weights.is_file() else "random", device=str(device),
                          workers=0, checkpoint_minutes=0))
    loaded = load_model(out, device)
    assert loaded.metadata["steps"] == 3 and loaded.metadata["device"].startswith(device.type)
    assert torch.isfinite(loaded.mean_map).all()
    scores = {}
    for dev in sorted({device.type, "cpu"}):
        geo = tmp_path / f"{dev}.geojson"
        cmd = [sys.executable, "-m", "wsi_haloae.cli", "infer", str(synthetic_slide), "--model", str(out),
               "--out", str(tmp_path / f"{dev}.zarr"), "--geojson", str(geo), "--device", dev, "--workers", "0"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        scores[dev] = _geojson_scores(geo)
    ref = scores["cpu"]
    for dev, got in scores.items():
        assert got.keys() == ref.keys() and len(ref) > 5
        a = np.array([ref[k] for k in sorted(ref)])
        b = np.array([got[k] for k in sorted(ref)])
        assert np.isfinite(b).all()
        if weights.is_file():  # real features: bf16 on the GPU must rank tiles as float32 on the CPU does
            assert spearmanr(a, b)[0] >= 0.99, dev
