"""SSIM (Gaussian 11, σ 1.5, grouped conv) and the reconstruction loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from wsi_haloae.train.losses import reconstruction_loss, ssim


def test_ssim_of_identical_inputs_is_one():
    x = torch.randn(2, 7, 32, 32) * 3 + 1
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert reconstruction_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_ssim_matches_scikit_image(channels):
    g = torch.Generator().manual_seed(channels)
    y = torch.rand(2, channels, 40, 36, generator=g) * 4 - 1
    x = y + 0.3 * torch.randn(y.shape, generator=g)
    ours = ssim(x, y, reduction="none")
    for i in range(2):
        a = x[i].permute(1, 2, 0).double().numpy()
        b = y[i].permute(1, 2, 0).double().numpy()
        ref = structural_similarity(
            a, b, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=float(b.max() - b.min())
        )
        assert ours[i].item() == pytest.approx(ref, abs=1e-4)


def test_ssim_falls_with_noise_and_has_gradients():
    y = torch.rand(1, 4, 32, 32)
    near = (y + 0.05 * torch.randn_like(y)).requires_grad_()
    far = y + 0.5 * torch.randn_like(y)
    s = ssim(near, y)
    assert ssim(far, y) < s < 1
    s.backward()
    assert torch.isfinite(near.grad).all() and near.grad.abs().sum() > 0


def test_ssim_rejects_bad_shapes():
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))  # smaller than the window
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 2, 16, 16))


def test_reconstruction_loss_is_mse_plus_dissimilarity():
    y = torch.rand(2, 3, 24, 24)
    x = y + 0.1
    expected = torch.mean((x - y) ** 2) + 1 - ssim(x, y)
    assert reconstruction_loss(x, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert np.isclose(ssim(x, y).item(), 1.0, atol=0.05)  # a constant shift barely changes structure
