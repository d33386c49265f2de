"""Reconstruction losses: MSE + (1 − SSIM) on feature maps and on images.

SSIM uses an 11×11 Gaussian window (σ 1.5), applied per channel with a grouped convolution and without
padding (only windows that lie inside the map count, like scikit-image's ``structural_similarity`` which crops
the border). Its stabilising constants are the paper's (and the authors' code's): fixed C1 = 1e-4 and
C2 = 9e-4, i.e. (0.01·L)² and (0.03·L)² with L = 1, for features and images alike.

Why fixed: VGG features are unbounded ReLU outputs, and a data range L taken from them (max − min of a
sample, ≈ 66 for r31 features of MVTec bottle) makes C2 ≈ 3.9, larger than the local feature variance in
most channel × window pairs; SSIM then reads ≈ 1 whatever the reconstruction and the loss degenerates to
MSE (docs/model-card.md gives the measured effect). The small fixed constants only guard against division
by zero, so SSIM compares local means, variances and covariance of every channel as intended.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

K1, K2 = 0.01, 0.03
#: The paper's constants: (K1·1)², (K2·1)², as scikit-image's SSIM with data_range=1.
C1, C2 = K1**2, K2**2
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
    """Mean SSIM between prediction x and target y, both (N, C, H, W), computed in float32 (float64 stays).

    ``data_range`` None → the fixed constants C1, C2 (L = 1; see the module docstring); a number or a
    per-sample tensor L gives C1 = (K1·L)², C2 = (K2·L)². reduction "none" gives one value per sample.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: expected two (N, C, H, W) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    n, c, h, w = x.shape
    if h < window or w < window:
        raise ValueError(f"ssim: maps of {h}x{w} are smaller than the {window}x{window} window")
    if data_range is None:
        c1, c2 = C1, C2
    else:
        L = torch.as_tensor(data_range, dtype=dtype, device=x.device).reshape(-1, 1, 1, 1)
        c1, c2 = (K1 * L) ** 2, (K2 * L) ** 2
    k = gaussian_window(window, sigma, dtype=dtype, device=x.device).expand(c, 1, window, window).contiguous()

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
