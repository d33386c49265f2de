"""SSIM (Gaussian 11, σ 1.5, grouped conv) and the reconstruction loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from wsi_haloae.train.losses import C1, C2, reconstruction_loss, ssim


def test_ssim_of_identical_inputs_is_one():
    x = torch.randn(2, 7, 32, 32) * 3 + 1
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    assert reconstruction_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)


def _skimage_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float) -> float:
    """scikit-image's SSIM of one (C, H, W) pair with the paper's settings (Gaussian 11, sigma 1.5, population
    covariance); data_range 1 gives its constants C1 = (0.01)^2 = 1e-4, C2 = (0.03)^2 = 9e-4."""
    return structural_similarity(
        x.permute(1, 2, 0).double().numpy(), y.permute(1, 2, 0).double().numpy(), channel_axis=2,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range,
    )


def test_ssim_constants_are_the_papers():
    assert C1 == pytest.approx(1e-4) and C2 == pytest.approx(9e-4)


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_ssim_matches_scikit_image_with_fixed_constants(channels):
    """Known inputs on the scale of VGG features (sparse ReLU-like maps up to ~60, flat zero areas) and of
    normalised images: our default SSIM is scikit-image's with data_range=1, whatever the data's own range."""
    g = torch.Generator().manual_seed(channels)
    feat = (torch.randn(2, channels, 40, 36, generator=g) * 20).clamp_min(0)  # ReLU-like, range ~60
    feat[:, :, :12] = 0.0  # a flat region where only the constants keep SSIM defined
    feat_hat = (feat + 2.0 * torch.randn(feat.shape, generator=g)).clamp_min(0)
    img = torch.rand(2, channels, 40, 36, generator=g) * 4.8 - 2.1  # ImageNet-normalised range
    img_hat = img + 0.3 * torch.randn(img.shape, generator=g)
    for x, y in ((feat_hat, feat), (img_hat, img)):
        ours = ssim(x, y, reduction="none")
        for i in range(2):
            assert ours[i].item() == pytest.approx(_skimage_ssim(x[i], y[i], data_range=1.0), abs=1e-4)


def test_ssim_with_an_explicit_data_range_matches_scikit_image():
    g = torch.Generator().manual_seed(7)
    y = torch.rand(2, 3, 40, 36, generator=g) * 4 - 1
    x = y + 0.3 * torch.randn(y.shape, generator=g)
    L = (y.flatten(1).amax(1) - y.flatten(1).amin(1))
    ours = ssim(x, y, data_range=L, reduction="none")
    for i in range(2):
        assert ours[i].item() == pytest.approx(_skimage_ssim(x[i], y[i], data_range=float(L[i])), abs=1e-4)


def test_fixed_constants_keep_ssim_sensitive_on_large_features():
    """The reason for the change: on features spanning ~60, constants from that range (C2 = (0.03*60)^2 = 3.3)
    swamp a local variance of ~0.25 and SSIM reads near 1 for a poor reconstruction; the fixed ones do not."""
    g = torch.Generator().manual_seed(0)
    y = 0.5 * torch.randn(1, 4, 48, 48, generator=g)  # local variance ~0.25
    y[:, :, 0, 0] = 60.0  # one bright pixel sets the sample's range
    x = y + 0.35 * torch.randn(y.shape, generator=g)  # noise of half the signal's variance
    L = y.flatten(1).amax(1) - y.flatten(1).amin(1)
    assert 1 - ssim(x, y, data_range=L).item() < 0.06
    assert 1 - ssim(x, y).item() > 0.4


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
