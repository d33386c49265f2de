"""Post-processing of raw anomaly maps: subtract the training mean map, blur, up-sample; tile scores.

The mean map is the average raw map over the TRAINING tiles (stored in the model file); the authors computed
it on test images, which leaks test data into the score. Works on torch tensors (on any device) and, for
convenience, on numpy arrays (returned as numpy).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

BLUR_SIZE = 3
BLUR_SIGMA = 0.8


def gaussian_kernel(size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA, device=None, dtype=torch.float32) -> torch.Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def postprocess(raw, mean_map, out_size: int | None = None):
    """(N, 64, 64) raw maps → (N, S, S): |raw − mean_map|, 3×3 Gaussian blur (σ 0.8), bilinear to ``out_size``.

    The blur pads by reflection so that tile borders are not darkened. S is 64 unless ``out_size`` is given.
    Everything runs in float32 — the dtype the training mean map was computed in — even when called inside a
    bf16 autocast region (which would otherwise run the blur in bf16).
    """
    as_numpy = isinstance(raw, np.ndarray)
    r = torch.as_tensor(raw)
    with torch.autocast(device_type="cuda" if r.is_cuda else "cpu", enabled=False):  # "meta" has no autocast (batch probe)
        return _postprocess_fp32(r, mean_map, out_size, as_numpy)


def _postprocess_fp32(r: torch.Tensor, mean_map, out_size: int | None, as_numpy: bool):
    if r.ndim != 3:
        raise ValueError(f"postprocess: raw maps must be (N, H, W), got shape {tuple(r.shape)}")
    r = r.float()
    m = torch.as_tensor(mean_map, device=r.device).float()
    if m.shape != r.shape[1:]:
        raise ValueError(f"postprocess: mean map shape {tuple(m.shape)} != map shape {tuple(r.shape[1:])}")
    x = (r - m).abs()[:, None]
    k = gaussian_kernel(device=x.device)[None, None]
    pad = BLUR_SIZE // 2
    x = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), k)
    if out_size is not None and out_size != x.shape[-1]:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False)
    out = x[:, 0]
    return out.cpu().numpy() if as_numpy else out


def tile_scores(pp):
    """Per-tile (mean, max) of post-processed maps (N, S, S); the mean is the tile's anomaly score."""
    if isinstance(pp, np.ndarray):
        flat = pp.reshape(pp.shape[0], -1)
        return flat.mean(axis=1), flat.max(axis=1)
    flat = pp.flatten(1)
    return flat.mean(dim=1), flat.amax(dim=1)


def score_batch(model, x: torch.Tensor, mean_map: torch.Tensor,
                block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiles (N, 3, S, S) in [0, 1] on the model's device → (post-processed maps, tile mean, tile max).

    The scoring path of inference, in one place so that calibration scores tiles exactly as slides are scored:
    the model in eval mode (the caller's job), channels_last input, bf16 autocast on CUDA, the raw map taken
    back to float32, then ``postprocess`` with the training mean map. The tile scores always come from the
    map at the model's resolution (fm_size²); ``block`` only resamples the map returned (a slide's map at its
    output resolution: blurred then upsampled, or average-pooled). Call it under ``torch.inference_mode()``.
    """
    cuda = x.device.type == "cuda"
    x = x.float().contiguous(memory_format=torch.channels_last)
    # "cpu" for every other device: autocast knows no "meta", where infer's memory probe runs this
    with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
        raw = model.anomaly_map(x)
    raw = raw.float()
    pp = postprocess(raw, mean_map)
    mean, mx = tile_scores(pp)
    fm = pp.shape[-1]
    if block is not None and block > fm:
        pp = postprocess(raw, mean_map, out_size=block)
    elif block is not None and block < fm:
        pp = F.avg_pool2d(pp[:, None], fm // block)[:, 0]
    return pp, mean, mx
