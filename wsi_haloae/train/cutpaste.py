"""Cut&Paste augmentation (Li et al., CVPR 2021) as used by HaloAE's self-supervised classifier.

"normal": a rectangle of 2–15 % of the image area, aspect ratio log-uniform in [0.3, 3.33], colour-jittered,
pasted at another random place. "scar": a thin 2–16 × 10–25 px strip, colour-jittered, rotated by ±45°, pasted.

Every function takes an explicit ``torch.Generator`` so that a sample is reproducible from its seed, and returns
the pasted-region mask so that tests (and anyone curious) can see exactly what changed.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def color_jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation in [1−s, 1+s] and hue in [−s, s] (torchvision's ColorJitter(s, s, s, s)).

    Written with torchvision's functional ops so that the random factors come from ``g``, not the global RNG.
    """
    if strength <= 0:
        return x
    b = _uniform(g, max(0.0, 1 - strength), 1 + strength)
    c = _uniform(g, max(0.0, 1 - strength), 1 + strength)
    s = _uniform(g, max(0.0, 1 - strength), 1 + strength)
    h = _uniform(g, -min(strength, 0.5), min(strength, 0.5))
    x = TF.adjust_brightness(x, b)
    x = TF.adjust_contrast(x, c)
    x = TF.adjust_saturation(x, s)
    x = TF.adjust_hue(x, h)
    return x.clamp_(0.0, 1.0)


def cutpaste_normal(
    x: torch.Tensor,
    g: torch.Generator,
    area: tuple[float, float] = (0.02, 0.15),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    jitter: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a jittered copy of a random rectangle somewhere else. x: (3, H, W) in [0, 1] → (out, mask (H, W))."""
    _, H, W = x.shape
    target = _uniform(g, *area) * H * W
    ratio = math.exp(_uniform(g, math.log(aspect[0]), math.log(aspect[1])))
    w = max(1, min(W, int(round(math.sqrt(target * ratio)))))
    h = max(1, min(H, int(round(math.sqrt(target / ratio)))))
    sy, sx = _randint(g, 0, H - h), _randint(g, 0, W - w)
    patch = color_jitter(x[:, sy : sy + h, sx : sx + w].clone(), jitter, g)
    ty, tx = _randint(g, 0, H - h), _randint(g, 0, W - w)
    out = x.clone()
    out[:, ty : ty + h, tx : tx + w] = patch
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[ty : ty + h, tx : tx + w] = True
    return out, mask


def cutpaste_scar(
    x: torch.Tensor,
    g: torch.Generator,
    width: tuple[int, int] = (2, 16),
    height: tuple[int, int] = (10, 25),
    rotation: tuple[float, float] = (-45.0, 45.0),
    jitter: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a thin, jittered, rotated strip. Only the rotated strip's own pixels are pasted (mask (H, W))."""
    _, H, W = x.shape
    w, h = _randint(g, *width), _randint(g, *height)
    sy, sx = _randint(g, 0, H - h), _randint(g, 0, W - w)
    patch = color_jitter(x[:, sy : sy + h, sx : sx + w].clone(), jitter, g)
    angle = _uniform(g, *rotation)
    # rotate colour and a ones-mask together; nearest keeps the strip's edge crisp and the mask exact
    rgba = torch.cat([patch, torch.ones(1, h, w)], dim=0)
    rgba = TF.rotate(rgba, angle, interpolation=InterpolationMode.NEAREST, expand=True, fill=0.0)
    ph, pw = rgba.shape[1:]
    ph, pw = min(ph, H), min(pw, W)
    rgba = rgba[:, :ph, :pw]
    ty, tx = _randint(g, 0, H - ph), _randint(g, 0, W - pw)
    inside = rgba[3] > 0.5
    out = x.clone()
    region = out[:, ty : ty + ph, tx : tx + pw]
    region[:, inside] = rgba[:3][:, inside]
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[ty : ty + ph, tx : tx + pw] = inside
    return out, mask
