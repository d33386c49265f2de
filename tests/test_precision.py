"""bf16 autocast (the GPU path of train and infer) against float32: the anomaly maps must rank alike.

CPU autocast to bfloat16 rounds the same operations as CUDA autocast (convolutions, linear layers, attention),
so a CPU test shows whether bf16 maps still order pixels and tiles as the float32 maps do. The model is a tiny
one with the real ImageNet VGG19 (conv1_1..conv3_1, ../shared) in the state inference sees it in (BatchNorm
statistics and the mean map computed on normal tiles, in float32); inputs are real IHC tissue (scikit-image's
image) with planted anomalies of several strengths. (With the seeded random backbone the untrained model's
f̂m is ~50x larger than fm and the map is mostly f̂m's own energy; bf16 then ranks pixels at 0.955 only —
docs/model-card.md — a regime no trained model is in, so the claim is tested on real features.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.data import immunohistochemistry

from wsi_haloae.model import build_model, postprocess, tile_scores
from wsi_haloae.model.inputs import stack_tiles
from wsi_haloae.train.data import TileSet
from wsi_haloae.train.batchnorm import refresh_batchnorm


def _tissue_tiles() -> tuple[torch.Tensor, torch.Tensor]:
    """(normal tiles for statistics, test tiles): crops, flips and rotations of the IHC image; test tiles get
    planted anomalies of graded strength (a darker, a bluer, a flat patch) so that tile scores spread."""
    im = immunohistochemistry()
    crops = [im[y : y + 256, x : x + 256] for y in (0, 128, 256) for x in (0, 128, 256)]
    normal = [np.rot90(c, k) for k, c in enumerate(crops)]
    test = []
    rng = np.random.default_rng(0)
    for i, c in enumerate(crops[:8]):
        t = np.ascontiguousarray(np.fliplr(c)).copy()
        y, x = rng.integers(16, 160, size=2)
        s = 24 + 8 * i
        patch = t[y : y + s, x : x + s].astype(np.float32)
        if i % 3 == 0:
            patch *= 0.5 + 0.05 * i
        elif i % 3 == 1:
            patch[..., 2] = np.minimum(255, patch[..., 2] + 20 * i)
        else:
            patch[:] = patch.mean(axis=(0, 1))
        t[y : y + s, x : x + s] = patch.clip(0, 255).astype(np.uint8)
        test.append(t)
    return stack_tiles(normal), stack_tiles(test)


WEIGHTS = ("vgg-imagenet-weights", "vgg19-imagenet-normalised-to-relu3_1.safetensors")


@pytest.fixture(scope="module")
def prepared():
    from conftest import shared_path

    normal, test = _tissue_tiles()
    model = build_model("tiny", shared_path(*WEIGHTS), seed=0)
    arrays = (normal.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    tiles = TileSet(root=None, paths=[None] * len(arrays), skipped=0, cache=arrays)  # type: ignore[arg-type]
    refresh_batchnorm(model, tiles, torch.device("cpu"), batch_size=9, workers=0)
    with torch.no_grad():
        mean_map = model.anomaly_map(normal).mean(0)  # float32, as the trainer computes it
    return model.eval(), mean_map, test


def _maps(model, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
        return model.anomaly_map(x)


def test_bf16_maps_rank_pixels_and_tiles_like_float32(prepared):
    model, mean_map, test = prepared
    raw32, raw16 = _maps(model, test, False), _maps(model, test, True)
    assert raw32.dtype == raw16.dtype == torch.float32  # anomaly_map hands back float32 either way
    assert not torch.equal(raw32, raw16)  # bf16 really ran
    pp32, pp16 = postprocess(raw32, mean_map), postprocess(raw16, mean_map)
    pixels = spearmanr(pp32.flatten().numpy(), pp16.flatten().numpy())[0]
    tiles = spearmanr(tile_scores(pp32)[0].numpy(), tile_scores(pp16)[0].numpy())[0]
    tiles_max = spearmanr(tile_scores(pp32)[1].numpy(), tile_scores(pp16)[1].numpy())[0]
    assert pixels >= 0.99, pixels
    assert tiles >= 0.99 and tiles_max >= 0.99, (tiles, tiles_max)


def test_postprocess_runs_in_float32_even_inside_autocast():
    """The mean map is float32 (computed without autocast); subtracting it and blurring must stay float32
    whatever region the caller is in (infer calls it outside autocast, evaluate never autocasts)."""
    normal, test = _tissue_tiles()
    model = build_model("tiny", "random", seed=0).eval()
    mean_map = _maps(model, normal, False).mean(0)
    raw = _maps(model, test, True)
    want = postprocess(raw, mean_map, out_size=128)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = postprocess(raw, mean_map, out_size=128)
        assert torch.nn.functional.conv2d(raw[:1, None], torch.ones(1, 1, 3, 3)).dtype == torch.bfloat16  # autocast is on
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
