"""Stain normalisation inside the model: a non-trainable module applied to RGB [0, 1] before the backbone.

Why here: the transform is part of what the model sees, so it belongs to the model file. ``HaloAE.extract``
runs it before the ImageNet normalisation; train, infer, cohort, evaluate and calibrate then apply exactly the
same transform with the same reference without knowing it exists, and a user cannot forget or mismatch it.

Methods (chosen at training time, ``--stain-normalize``):

- ``macenko`` (Macenko et al., ISBI 2009): per tile, the two stain vectors are estimated in optical density
  (OD) space (the plane of the two main eigenvectors of the OD covariance of stained pixels; the 1st and 99th
  percentile angles in that plane), the concentrations of each stain are found by least squares, scaled so
  that their 99th percentiles match the reference's, and the tile is re-rendered with the reference stain
  vectors.
- ``reinhard`` (Reinhard et al., 2001): per tile, the CIELAB mean and standard deviation of the stained
  pixels are matched to the reference's; glass keeps its colour (the change fades out below the stain
  threshold).
- ``none``: identity (older model files, which have no stain tensors, load as this).

Written in torch, not taken from a library: torchstain (EIDOSLAB, the torch package for this; release 1.4.1
of January 2025) normalises one (C, H, W) image at a time with no batch dimension, fits its reference on a
single image, takes percentiles with ``kthvalue`` over the flattened image, returns integers, and has no
answer for glass (an empty set of stained pixels breaks its covariance); scikit-image's
``rgb2hed``/``separate_stains`` use a fixed stain matrix (no per-image estimate) on numpy. Inference needs the
transform batched on the model's device, in float, with a per-tile fallback and a reference in the model.

OD convention: ``OD = -ln((255·I + 1) / 256)`` for I in [0, 1] (Macenko's ``-log((I + 1)/I0)`` with I0 =
256), which is exactly invertible, so pixels whose concentrations do not change (glass) come back unchanged.

Fallback: a tile whose stain cannot be estimated reliably is passed through unchanged (identity) and counted:
fewer than ``MIN_STAINED_FRACTION`` of its pixels stained (glass, pale or empty tiles), a non-finite estimate,
two stain vectors closer than ``MIN_STAIN_ANGLE`` degrees (one stain only), a stain maximum below
``MIN_MAX_CONC``, or a stain vector further than ``MAX_REFERENCE_ANGLE`` (hematoxylin 30°, eosin 20°) from
the reference's (not a variant of the training stain: pen, another stain, or a colour that must not be
mapped onto it). ``last_fallback`` holds the per-tile flags of the last batch and ``fallbacks()`` the count
since ``reset_fallbacks()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

METHODS = ("none", "macenko", "reinhard")
_CODES = {name: i for i, name in enumerate(METHODS)}
SPREAD_KEYS = ("h_median", "h_p95", "e_median", "e_p95")

#: A pixel is stained when its OD is at least this in every channel (Macenko's beta; glass is ~0).
BETA = 0.15
#: Percentile (and 100 - it) of the angles in the stain plane that define the two stain vectors (Macenko's alpha).
ALPHA = 1.0
#: Percentile of each stain's concentration that is matched to the reference's.
MAX_CONC_PERCENTILE = 99.0
#: Pixels used to estimate a tile's stain: a regular sub-grid of about this many (every 2nd row and column of 256²).
ESTIMATION_PIXELS = 16384
#: Fallback to identity below this fraction of stained pixels (in the estimation sub-grid).
MIN_STAINED_FRACTION = 0.05
#: Fallback when the two estimated stain vectors are closer than this (degrees): the tile holds one stain only.
MIN_STAIN_ANGLE = 3.0
#: Fallback when the estimated hematoxylin / eosin vector is further than this (degrees) from the reference's
#: (the colour-QC limits of ``wsi_haloae.slide.colour``; eosin's estimate is the steadier one, hence tighter).
MAX_REFERENCE_ANGLE = (30.0, 20.0)
#: Upper end of the concentration histogram (OD units); a 99th percentile above it is taken as this.
MAX_OD = 8.0
#: A stain whose concentration maximum (OD units) is below this is too faint to rescale: the tile falls back.
MIN_MAX_CONC = 0.05

#: Reference of Macenko et al.'s code (H and E unit OD vectors as columns; 99th-percentile concentrations):
#: the buffers' values until a reference is fitted (unused while the method is none).
DEFAULT_STAIN_MATRIX = ((0.5626, 0.2159), (0.7201, 0.8012), (0.4062, 0.5581))
DEFAULT_MAX_CONC = (1.9705, 1.0308)

# sRGB (D65) <-> CIE XYZ, and the D65 white point (scikit-image's constants)
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_LN256 = math.log(256.0)
_LN256_255 = math.log(256.0 / 255.0)


@dataclass
class StainEstimate:
    """Per-tile stain estimate of a batch (all tensors on the batch's device)."""

    stain_matrix: torch.Tensor  # (N, 3, 2) unit OD vectors, columns H, E
    max_conc: torch.Tensor  # (N, 2) 99th-percentile concentrations
    stained_fraction: torch.Tensor  # (N,) share of estimation pixels that are stained
    valid: torch.Tensor  # (N,) bool: usable (enough stain, finite, two distinct stains)


@dataclass
class StainReference:
    """What a model normalises to, fitted on the training tiles; JSON-able through ``to_dict``."""

    stain_matrix: np.ndarray  # (3, 2) float, unit columns H, E (OD)
    max_conc: np.ndarray  # (2,)
    lab_mean: np.ndarray  # (3,) CIELAB mean of stained pixels
    lab_std: np.ndarray  # (3,)
    tiles: int  # tiles looked at
    tiles_used: int  # tiles with a usable stain estimate (the median is over these)
    spread_deg: dict[str, float]  # median and 95th percentile angle of the per-tile vectors from the reference

    def to_dict(self) -> dict[str, Any]:
        return {
            "stain_matrix": np.round(self.stain_matrix, 6).tolist(),
            "max_conc": np.round(self.max_conc, 6).tolist(),
            "lab_mean": np.round(self.lab_mean, 4).tolist(),
            "lab_std": np.round(self.lab_std, 4).tolist(),
            "tiles": int(self.tiles),
            "tiles_used": int(self.tiles_used),
            "spread_deg": {k: round(float(v), 2) for k, v in self.spread_deg.items()},
        }


# --------------------------------------------------------------------------------------------- colour spaces
def rgb_to_od(x: torch.Tensor) -> torch.Tensor:
    """RGB [0, 1] → optical density ``-ln((255·x + 1) / 256)`` (exactly invertible by ``od_to_rgb``)."""
    return torch.log1p(x * 255.0).neg_().add_(_LN256)


def od_to_rgb(od: torch.Tensor) -> torch.Tensor:
    return torch.exp(_LN256_255 - od).sub_(1.0 / 255.0).clamp_(0.0, 1.0)


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, P) sRGB [0, 1] → CIELAB (D65), the formulas of ``skimage.color.rgb2lab``."""
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055).pow(2.4), x / 12.92)
    m = torch.tensor(_RGB_TO_XYZ, dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,njp->nip", m, lin) / torch.tensor(_WHITE_D65, dtype=x.dtype, device=x.device).view(1, 3, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12).pow(1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """(N, 3, P) CIELAB (D65) → sRGB [0, 1] (clipped), the inverse of ``rgb_to_lab``."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > 0.2068966, f.pow(3), (f - 16 / 116) / 7.787)
    xyz = xyz * torch.tensor(_WHITE_D65, dtype=lab.dtype, device=lab.device).view(1, 3, 1)
    m = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(lab.dtype).to(lab.device)
    lin = torch.einsum("ij,njp->nip", m, xyz).clamp_min(0.0)
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(1e-12).pow(1 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------- estimation
def _masked_percentile(v: torch.Tensor, mask: torch.Tensor, q: float, lo: float, hi: float, bins: int = 4096) -> torch.Tensor:
    """Percentile ``q`` of ``v`` (..., P) over ``mask`` per row, from a histogram of ``bins`` bins on [lo, hi].

    A histogram (scatter-add, cumulative sum, search) instead of a sort: O(P) per row, batched, and ~10x
    cheaper than sorting on a CPU; its resolution, (hi - lo) / bins, is far below what the estimate needs.
    Values outside [lo, hi] count in the end bins; rows with no pixel give ``lo``.
    """
    idx = ((v - lo) * (bins / (hi - lo))).long().clamp_(0, bins - 1)
    idx = torch.where(mask, idx, torch.full_like(idx, bins))  # masked-out pixels land in a spare bin
    hist = torch.zeros(*v.shape[:-1], bins + 1, dtype=v.dtype, device=v.device).scatter_add_(-1, idx, torch.ones_like(v))
    cum = hist[..., :bins].cumsum(-1)
    target = (q / 100.0) * cum[..., -1:]
    k = torch.searchsorted(cum.contiguous(), target.contiguous()).clamp_(max=bins - 1)
    return lo + (k.squeeze(-1).to(v.dtype) + 0.5) * ((hi - lo) / bins)


def _sample(x: torch.Tensor) -> torch.Tensor:
    """A regular sub-grid of about ``ESTIMATION_PIXELS`` pixels per tile: (N, 3, P)."""
    h, w = x.shape[-2:]
    step = max(1, int(round(math.sqrt(h * w / ESTIMATION_PIXELS))))
    return x[:, :, ::step, ::step].reshape(x.shape[0], 3, -1)


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle between vectors along dim -2 (..., 3, k) in degrees."""
    cos = (a * b).sum(-2) / (a.norm(dim=-2) * b.norm(dim=-2)).clamp_min(1e-12)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def estimate_stains(x: torch.Tensor) -> StainEstimate:
    """Macenko stain vectors and concentration maxima of every tile of ``x`` (N, 3, H, W) RGB [0, 1]."""
    od = rgb_to_od(_sample(x.float()))  # (N, 3, P)
    n, _, p = od.shape
    mask = (od >= BETA).all(dim=1)  # (N, P)
    count = mask.sum(dim=1)
    mf = mask.to(od.dtype).unsqueeze(1)
    denom = count.clamp_min(2).to(od.dtype)
    mean = (od * mf).sum(-1, keepdim=True) / denom.view(n, 1, 1)
    d = (od - mean) * mf
    cov = d @ d.transpose(1, 2) / (denom - 1).view(n, 1, 1)
    cov = cov + 1e-9 * torch.eye(3, dtype=od.dtype, device=od.device)  # keeps eigh defined on empty tiles
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    v = vecs[..., [2, 1]]  # (N, 3, 2): the stain plane
    # orient the first axis along positive OD, so that stained pixels project at angles within (-90°, 90°)
    sign = torch.where(v[:, :, 0].sum(1) < 0, -1.0, 1.0).to(od.dtype)
    v = torch.cat([v[:, :, :1] * sign.view(n, 1, 1), v[:, :, 1:]], dim=2)
    t = v.transpose(1, 2) @ od  # (N, 2, P)
    phi = torch.atan2(t[:, 1], t[:, 0])
    lo = _masked_percentile(phi, mask, ALPHA, -math.pi, math.pi)
    hi = _masked_percentile(phi, mask, 100.0 - ALPHA, -math.pi, math.pi)
    v_lo = v @ torch.stack([torch.cos(lo), torch.sin(lo)], dim=1).unsqueeze(-1)  # (N, 3, 1)
    v_hi = v @ torch.stack([torch.cos(hi), torch.sin(hi)], dim=1).unsqueeze(-1)
    # hematoxylin first: the vector with the larger red OD (Macenko's heuristic)
    h_first = (v_lo[:, 0, 0] > v_hi[:, 0, 0]).view(n, 1, 1)
    he = torch.where(h_first, torch.cat([v_lo, v_hi], 2), torch.cat([v_hi, v_lo], 2))
    he = he / he.norm(dim=1, keepdim=True).clamp_min(1e-12)
    conc = _unmixing(he) @ od  # (N, 2, P) concentrations
    max_conc = _masked_percentile(conc, mask.unsqueeze(1).expand(-1, 2, -1), MAX_CONC_PERCENTILE, 0.0, MAX_OD)
    frac = count.to(od.dtype) / p
    separation = _angle_deg(he[:, :, :1], he[:, :, 1:]).squeeze(-1)
    finite = torch.isfinite(he).flatten(1).all(1) & torch.isfinite(max_conc).all(1)
    valid = (frac >= MIN_STAINED_FRACTION) & finite & (separation >= MIN_STAIN_ANGLE) & (max_conc > MIN_MAX_CONC).all(1)
    return StainEstimate(he, max_conc, frac, valid)


def _unmixing(he: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) least-squares pseudo-inverse of stain vectors (N, 3, 2): concentrations = it @ OD."""
    gram = he.transpose(1, 2) @ he  # (N, 2, 2)
    a, b, c = gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1]
    det = (a * c - b * b).clamp_min(1e-8)
    inv = torch.stack([torch.stack([c, -b], -1), torch.stack([-b, a], -1)], -2) / det.view(-1, 1, 1)
    return inv @ he.transpose(1, 2)


def lab_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CIELAB mean and std (N, 3) of each tile's stained pixels, and their share of the tile (N,)."""
    s = _sample(x.float())
    mask = (rgb_to_od(s).amax(dim=1) >= BETA)  # stained: absorbs in at least one channel
    lab = rgb_to_lab(s)
    count = mask.sum(1).clamp_min(1).to(lab.dtype).view(-1, 1)
    mf = mask.to(lab.dtype).unsqueeze(1)
    mean = (lab * mf).sum(-1) / count
    var = (((lab - mean.unsqueeze(-1)) * mf) ** 2).sum(-1) / count
    return mean, var.sqrt(), mask.to(lab.dtype).mean(1)


# --------------------------------------------------------------------------------------------- the module
class StainNormalizer(nn.Module):
    """Non-trainable stain normalisation with a reference fitted on the training tiles (see module docstring).

    Buffers (saved in the model file as ``stain.*``; a file without any loads as method none):
    ``method_code`` (int64: 0 none, 1 macenko, 2 reinhard), ``reference_tiles`` (int64: tiles the reference
    is the median of; 0 = no reference), ``tiles_seen`` (int64: tiles looked at), ``stain_matrix`` (3, 2)
    unit OD vectors, columns hematoxylin, eosin, ``max_conc`` (2,), ``lab_mean`` (3,), ``lab_std`` (3,),
    ``spread_deg`` (4,): median and 95th percentile angle of the per-tile hematoxylin, then eosin, vectors
    from the reference. The method is mirrored in a Python attribute when the state is loaded, so choosing
    the path never waits for the device.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("method_code", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("reference_tiles", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("tiles_seen", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("stain_matrix", torch.tensor(DEFAULT_STAIN_MATRIX, dtype=torch.float32))
        self.register_buffer("max_conc", torch.tensor(DEFAULT_MAX_CONC, dtype=torch.float32))
        self.register_buffer("lab_mean", torch.zeros(3))
        self.register_buffer("lab_std", torch.ones(3))
        self.register_buffer("spread_deg", torch.zeros(4))
        self._method = "none"
        self._has_reference = False
        self.last_fallback: torch.Tensor | None = None
        self._fallback_total: torch.Tensor | int = 0

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self._method

    @property
    def has_reference(self) -> bool:
        return self._has_reference

    def set_reference(self, method: str, reference: StainReference | None) -> None:
        """Install ``reference`` (None: none fitted) and the method that uses it."""
        if method not in METHODS:
            raise ValueError(f"stain method {method!r} is not one of {METHODS}")
        if method != "none" and reference is None:
            raise ValueError(f"stain method {method!r} needs a reference")
        with torch.no_grad():
            self.method_code.fill_(_CODES[method])
            if reference is not None:
                dev = self.stain_matrix.device
                self.stain_matrix.copy_(torch.as_tensor(reference.stain_matrix, dtype=torch.float32, device=dev))
                self.max_conc.copy_(torch.as_tensor(reference.max_conc, dtype=torch.float32, device=dev))
                self.lab_mean.copy_(torch.as_tensor(reference.lab_mean, dtype=torch.float32, device=dev))
                self.lab_std.copy_(torch.as_tensor(reference.lab_std, dtype=torch.float32, device=dev))
                self.reference_tiles.fill_(int(reference.tiles_used))
                self.tiles_seen.fill_(int(reference.tiles))
                sp = reference.spread_deg
                self.spread_deg.copy_(torch.tensor([sp["h_median"], sp["h_p95"], sp["e_median"], sp["e_p95"]], device=dev))
        self._sync_python_state()

    def _sync_python_state(self) -> None:
        code = int(self.method_code.item())
        if not 0 <= code < len(METHODS):
            raise ValueError(f"stain method code {code} is unknown (0 none, 1 macenko, 2 reinhard)")
        self._method = METHODS[code]
        self._has_reference = int(self.reference_tiles.item()) > 0
        if self._has_reference:
            self._check_reference()

    def _check_reference(self) -> None:
        """A loaded reference must be one a fit could give: finite, unit stain vectors, positive maxima and
        spreads. A damaged or hand-edited file fails here (as a one-line model-file error), not as NaN maps
        or a colour QC that compares with NaN."""
        bufs = (self.stain_matrix, self.max_conc, self.lab_mean, self.lab_std, self.spread_deg)
        if not all(bool(torch.isfinite(b).all()) for b in bufs):
            raise ValueError("the stain reference holds NaN or infinite values")
        norms = torch.linalg.vector_norm(self.stain_matrix.double(), dim=0)
        if not bool(((norms - 1).abs() < 1e-3).all()):
            raise ValueError(f"stain vectors are not unit vectors (norms {[round(float(n), 4) for n in norms]})")
        if not (bool((self.max_conc > 0).all()) and bool((self.lab_std > 0).all())):
            raise ValueError("stain concentration maxima and CIELAB spreads must be positive")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch's signature
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.method_code.device.type != "meta":
            self._sync_python_state()

    def describe(self) -> dict[str, Any]:
        """JSON-able description: method and (when fitted) the reference; what the model metadata records."""
        d: dict[str, Any] = {"method": self.method, "reference": None}
        if self.has_reference:
            d["reference"] = {
                "stain_matrix": [[round(float(v), 6) for v in row] for row in self.stain_matrix.tolist()],
                "max_conc": [round(float(v), 6) for v in self.max_conc.tolist()],
                "lab_mean": [round(float(v), 4) for v in self.lab_mean.tolist()],
                "lab_std": [round(float(v), 4) for v in self.lab_std.tolist()],
                "tiles": int(self.tiles_seen.item()),
                "tiles_used": int(self.reference_tiles.item()),
                "spread_deg": dict(zip(SPREAD_KEYS, (round(float(v), 2) for v in self.spread_deg.tolist()))),
            }
        return d

    def qc_reference(self) -> np.ndarray | None:
        """The reference stain vectors (3, 2) float64 for a slide's colour QC, or None when none was fitted."""
        if not self.has_reference:
            return None
        return self.stain_matrix.detach().to("cpu", torch.float64).numpy().copy()

    # -- fallbacks -----------------------------------------------------------------------------------------
    def fallbacks(self) -> int:
        """Tiles passed through unchanged since the last ``reset_fallbacks()`` (waits for the device)."""
        t = self._fallback_total
        return int(t.item()) if torch.is_tensor(t) else int(t)

    def reset_fallbacks(self) -> None:
        self._fallback_total = 0
        self.last_fallback = None

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB [0, 1] → the same, stain-normalised (identity for method none)."""
        if self._method == "none":
            return x
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        with torch.autocast(device_type="cuda" if x.is_cuda else "cpu", enabled=False):  # no autocast on "meta"
            xf = x.float()
            if self._method == "macenko":
                out, ok = self._macenko(xf)
            else:
                out, ok = self._reinhard(xf)
            out = torch.where(ok.view(-1, 1, 1, 1), out, xf)
        fb = ~ok
        self.last_fallback = fb
        self._fallback_total = self._fallback_total + fb.sum()
        out = out.to(x.dtype)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out

    def _macenko(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        est = estimate_stains(x)
        ref = self.stain_matrix.to(x.dtype)
        limit = torch.tensor(MAX_REFERENCE_ANGLE, dtype=x.dtype, device=x.device)
        close = (_angle_deg(est.stain_matrix, ref.unsqueeze(0)) <= limit).all(1)
        scale = self.max_conc.to(x.dtype).view(1, 2) / est.max_conc.clamp_min(MIN_MAX_CONC)
        # unmix with the tile's vectors, rescale, remix with the reference's: one 3x3 matrix per tile
        mix = ref.unsqueeze(0) @ (scale.unsqueeze(-1) * _unmixing(est.stain_matrix))  # (N, 3, 3)
        ok = est.valid & close & torch.isfinite(mix).flatten(1).all(1)
        mix = torch.where(ok.view(n, 1, 1), mix, torch.eye(3, dtype=x.dtype, device=x.device).expand(n, 3, 3))
        od = rgb_to_od(x.reshape(n, 3, h * w))
        return od_to_rgb(mix @ od).reshape(n, 3, h, w), ok

    def _reinhard(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        mean, std, frac = lab_stats(x)
        flat = x.reshape(n, 3, h * w)
        lab = rgb_to_lab(flat)
        ref_mean = self.lab_mean.to(x.dtype).view(1, 3, 1)
        ref_std = self.lab_std.to(x.dtype).view(1, 3, 1)
        new = (lab - mean.unsqueeze(-1)) / std.clamp_min(1e-3).unsqueeze(-1) * ref_std + ref_mean
        # glass keeps its colour: the change fades in with the pixel's largest OD up to the stain threshold
        weight = (rgb_to_od(flat).amax(dim=1, keepdim=True) / BETA).clamp(0.0, 1.0)
        out = lab_to_rgb(lab + weight * (new - lab))
        ok = (frac >= MIN_STAINED_FRACTION) & (std > 0.5).all(1) & torch.isfinite(out).flatten(1).all(1)
        return out.reshape(n, 3, h, w), ok


# --------------------------------------------------------------------------------------------- fitting
@torch.no_grad()
def fit_reference(batches: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> StainReference | None:
    """The reference of a set of tiles: per-tile estimates, then their median (robust to odd tiles).

    ``batches`` yields (N, 3, H, W) RGB [0, 1] tensors. Stain vectors: the component-wise median of the tiles'
    unit vectors, renormalised; concentration maxima and CIELAB statistics: per-tile medians. Returns None
    when no tile has a usable stain estimate (unstained images, e.g. an MVTec-AD object category).
    """
    he: list[torch.Tensor] = []
    mc: list[torch.Tensor] = []
    labm: list[torch.Tensor] = []
    labs: list[torch.Tensor] = []
    seen = 0
    for x in batches:
        x = x.to(device).float()
        seen += x.shape[0]
        est = estimate_stains(x)
        mean, std, frac = lab_stats(x)
        ok = est.valid.cpu()
        he.append(est.stain_matrix.cpu()[ok])
        mc.append(est.max_conc.cpu()[ok])
        lab_ok = (frac >= MIN_STAINED_FRACTION).cpu()
        labm.append(mean.cpu()[lab_ok])
        labs.append(std.cpu()[lab_ok])
    if not he:
        return None
    he_all, mc_all = torch.cat(he).double(), torch.cat(mc).double()
    if he_all.shape[0] == 0:
        return None
    ref = he_all.median(dim=0).values
    ref = ref / ref.norm(dim=0, keepdim=True)
    ang = _angle_deg(he_all, ref.unsqueeze(0))  # (T, 2)
    spread = {
        "h_median": float(ang[:, 0].median()), "h_p95": float(torch.quantile(ang[:, 0], 0.95)),
        "e_median": float(ang[:, 1].median()), "e_p95": float(torch.quantile(ang[:, 1], 0.95)),
    }
    lm, ls = torch.cat(labm).double(), torch.cat(labs).double()
    lab_mean = lm.median(dim=0).values if lm.shape[0] else torch.tensor([50.0, 0.0, 0.0], dtype=torch.float64)
    lab_std = ls.median(dim=0).values if ls.shape[0] else torch.ones(3, dtype=torch.float64)
    return StainReference(
        stain_matrix=ref.numpy(), max_conc=mc_all.median(dim=0).values.numpy(), lab_mean=lab_mean.numpy(),
        lab_std=lab_std.numpy(), tiles=seen, tiles_used=int(he_all.shape[0]), spread_deg=spread,
    )
