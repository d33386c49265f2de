"""Stain augmentation for training: random scale and shift of each stain's concentration (HED jitter).

Tellez et al., "Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference to train
distilled stain-invariant convolutional networks" (IEEE TMI 2018): deconvolve the tile into hematoxylin, eosin
and DAB concentrations, then per channel c: ``C_c ← α_c · C_c + β_c`` with ``α_c ~ U(1 − s, 1 + s)`` and
``β_c ~ U(−s, s)``, and recompose. Here the concentrations are in natural-log optical density units (the OD
convention of ``wsi_haloae.model.stain``, exactly invertible), on scikit-image's Ruifrok–Johnston H-E-DAB
matrix (``skimage.color.hed_from_rgb``), so ``s = 0.05`` changes each stain's amount by up to ±5 % and adds
up to ±0.05 OD (about ±5 % of the transmitted light). The shift applies to every pixel, glass included, as
in Tellez et al.: scanners differ in background too.

Each sample's factors come from its own generator, keyed by (seed, epoch, index) with a salt of its own, so
switching augmentation on or off leaves the Cut&Paste geometry and the colour jitter of every sample
unchanged, and ``--resume`` reproduces an uninterrupted run (``train/data.py``).
"""

from __future__ import annotations

import hashlib
import math

import torch
from skimage.color import hed_from_rgb, rgb_from_hed

_LN256 = math.log(256.0)
_HED_FROM_RGB = torch.tensor(hed_from_rgb, dtype=torch.float32)  # (3 rgb, 3 hed): concentrations = OD @ it
_RGB_FROM_HED = torch.tensor(rgb_from_hed, dtype=torch.float32)


def stain_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for sample (epoch, index) of run ``seed``, independent of the sample's other augmentations."""
    key = hashlib.blake2b(f"stain/{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") & ((1 << 63) - 1))


def hed_shift(x: torch.Tensor, scale: torch.Tensor | tuple[float, float, float],
              shift: torch.Tensor | tuple[float, float, float]) -> torch.Tensor:
    """Scale and shift the H, E, DAB concentrations of ``x`` (3, H, W) or (N, 3, H, W) RGB [0, 1].

    ``scale`` and ``shift`` are 3 numbers (H, E, DAB; shift in OD units) or (N, 3) per image.
    ``hed_shift(x, (1, 1, 1), (0, 0, 0))`` returns ``x`` up to float rounding.
    """
    single = x.dim() == 3
    xb = (x.unsqueeze(0) if single else x).float()
    n = xb.shape[0]
    scale = torch.as_tensor(scale, dtype=torch.float32, device=xb.device).expand(n, 3)
    shift = torch.as_tensor(shift, dtype=torch.float32, device=xb.device).expand(n, 3)
    od = _LN256 - torch.log1p(xb * 255.0)  # (N, 3, H, W)
    conc = torch.einsum("nchw,cs->nshw", od, _HED_FROM_RGB.to(xb.device))
    conc = conc * scale.view(n, 3, 1, 1) + shift.view(n, 3, 1, 1)
    od = torch.einsum("nshw,sc->nchw", conc, _RGB_FROM_HED.to(xb.device))
    out = (torch.exp(_LN256 - od) - 1.0).div_(255.0).clamp_(0.0, 1.0).to(x.dtype)
    return out[0] if single else out


def hed_jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Random HED scale in [1 − s, 1 + s] and shift in [−s, s] per stain (``s = strength``) of one tile (3, H, W)."""
    if strength <= 0:
        return x
    u = torch.rand(2, 3, generator=g) * 2.0 - 1.0  # U(-1, 1)
    return hed_shift(x, 1.0 + strength * u[0], strength * u[1])
