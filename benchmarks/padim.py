"""PaDiM (Defard et al., ICPR 2021) on HaloAE's own feature map: the peer a learning curve is read against.

It sees exactly what the HaloAE auto-encoder sees: the frozen VGG19 taps of the compared preset, each pooled
to 64×64 and concatenated (``wsi_haloae.model.features.VGGFeatures``, same weights file). PaDiM then keeps a
seeded random subset of ``dims`` channels (as the paper does to cut cost), fits one Gaussian per map
position on the training tiles — mean and a Ledoit–Wolf shrunk covariance (scikit-learn), as few training
tiles as 100–200 are fewer than a full covariance needs — and scores a position by its Mahalanobis distance.
The 64×64 distance map then goes through the same post-processing as HaloAE's (3×3 Gaussian blur, σ 0.8,
``wsi_haloae.model.postprocess`` with a zero mean map: the distance is already relative to the training
tiles) and the same tile score (mean of the map; max reported too).

It does not train: one pass over the training tiles fits it. Benchmarks only, never in the package.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch

from wsi_haloae.config import ModelConfig
from wsi_haloae.model.features import VGGFeatures
from wsi_haloae.model.haloae import IMAGENET_MEAN, IMAGENET_STD


class PaDiM:
    """Per-position Gaussian model of a random channel subset of the preset's VGG feature map."""

    def __init__(self, preset: str, backbone_weights: str | os.PathLike, dims: int = 100, seed: int = 0) -> None:
        cfg = ModelConfig.preset(preset)
        self.features = VGGFeatures(cfg.taps, cfg.fm_size).eval()
        self.backbone_info = self.features.load_backbone(backbone_weights)
        channels = self.features.channels
        self.dims = min(dims, channels)
        g = torch.Generator().manual_seed(seed)
        self.channels = torch.sort(torch.randperm(channels, generator=g)[: self.dims]).values
        self.fm_size = cfg.fm_size
        self.mean: torch.Tensor | None = None  # (P, d)
        self.precision: torch.Tensor | None = None  # (P, d, d)
        self.shrinkage: np.ndarray | None = None  # (P,) Ledoit-Wolf shrinkage per position
        self.n_train = 0
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """RGB [0, 1] (N, 3, 256, 256) → (N, P, d) features at every map position."""
        fm = self.features((x - self._mean) / self._std)[:, self.channels]  # (N, d, 64, 64)
        return fm.flatten(2).transpose(1, 2).contiguous()

    def fit(self, batches: Iterable[torch.Tensor]) -> "PaDiM":
        """One pass over the training tiles: mean and Ledoit–Wolf covariance per position, then its inverse."""
        from sklearn.covariance import ledoit_wolf

        emb = torch.cat([self.embed(x) for x in batches]).double().numpy()  # (N, P, d)
        n, p, d = emb.shape
        if n < 2:
            raise ValueError("PaDiM needs at least 2 training tiles")
        mean = emb.mean(axis=0)
        precision = np.empty((p, d, d), dtype=np.float64)
        shrink = np.empty(p)
        for i in range(p):
            cov, shrink[i] = ledoit_wolf(emb[:, i, :])
            try:
                precision[i] = np.linalg.inv(cov)
            except np.linalg.LinAlgError:  # a constant position (e.g. bottle's black background: every ReLU 0)
                precision[i] = np.linalg.inv(cov + 0.01 * np.eye(d))  # PaDiM's own regulariser, only here
        self.mean = torch.from_numpy(mean).float()
        self.precision = torch.from_numpy(precision).float()
        self.shrinkage = shrink
        self.n_train = n
        return self

    @torch.no_grad()
    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 256, 256) → (N, 64, 64) Mahalanobis distance of each position to its training Gaussian."""
        if self.mean is None or self.precision is None:
            raise RuntimeError("PaDiM.raw_map before fit")
        diff = self.embed(x) - self.mean[None]  # (N, P, d)
        m2 = torch.einsum("npd,pde,npe->np", diff, self.precision, diff).clamp_min(0)
        return m2.sqrt().view(x.shape[0], self.fm_size, self.fm_size)

    def map(self, x: torch.Tensor) -> torch.Tensor:
        """Post-processed (N, 64, 64) map: the raw distance through HaloAE's blur (zero mean map)."""
        from wsi_haloae.model import postprocess

        raw = self.raw_map(x)
        return postprocess(raw, torch.zeros(raw.shape[1:]))
