"""Reconstruction losses: MSE + (1 − SSIM) on feature maps and on images.

SSIM uses an 11×11 Gaussian window (σ 1.5), applied per channel with a grouped convolution and without
padding (only windows that lie inside the map count, like scikit-image's ``structural_similarity`` which crops
the border). Constants C1 = (0.01·L)², C2 = (0.03·L)² need a data range L. Images here live in ImageNet-
normalised space and VGG features are unbounded ReLU outputs, so no fixed L fits both: L is taken per sample
as the (detached) range max − min of the *target* over all its channels and pixels. That keeps C1, C2 in
proportion to the data — as SSIM intends for [0, 1] or [0, 255] images — whatever the feature scale, and
never lets the gradient flow through the constants. A floor (1e-6) avoids division by zero on flat targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

K1, K2 = 0.01, 0.03
WINDOW, SIGMA = 11, 1.5


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 2-D Gaussian window (size × size)."""
    r = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g1 = torch.exp(-(r**2) / (2 * sigma**2))
    g1 = g1 / g1.sum()
    return torch.outer(g1, g1).to(dtype)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float | torch.Tensor | None = None,
    window: int = WINDOW,
    sigma: float = SIGMA,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean SSIM between prediction x and target y, both (N, C, H, W), computed in float32.

    ``data_range`` None → per-sample range of y (see module docstring). reduction "none" gives one value
    per sample.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: expected two (N, C, H, W) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    x, y = x.float(), y.float()
    n, c, h, w = x.shape
    if h < window or w < window:
        raise ValueError(f"ssim: maps of {h}x{w} are smaller than the {window}x{window} window")
    if data_range is None:
        flat = y.detach().reshape(n, -1)
        L = (flat.amax(1) - flat.amin(1)).clamp_min(1e-6).view(n, 1, 1, 1)
    else:
        L = torch.as_tensor(data_range, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
    c1, c2 = (K1 * L) ** 2, (K2 * L) ** 2
    k = gaussian_window(window, sigma, device=x.device).expand(c, 1, window, window).contiguous()

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, k, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    s = (num / den).mean(dim=(1, 2, 3))
    if reduction == "none":
        return s
    return s.mean()


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE + (1 − SSIM), both in float32 (the DESIGN's L_fm and L_im)."""
    pred, target = pred.float(), target.float()
    return F.mse_loss(pred, target) + (1.0 - ssim(pred, target))
