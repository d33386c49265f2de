"""Scoring normal tiles into a ``Calibration``: the end of ``train`` and the body of ``calibrate``.

Tiles are scored exactly as ``infer`` scores slide tiles (``model.anomaly_map.score_batch``: eval mode,
channels_last, bf16 autocast on CUDA, post-processing with the training mean map), so a calibration score
and a slide's tile score are the same statistic. Memory stays bounded: one score per tile, and a strided
sample of post-processed pixels capped at ``PIXEL_BUDGET`` values for the pixel quantiles.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import __version__
from ..scoring.calibration import MIN_TILES, Calibration
from .data import PlainTiles, TileSet, training_mpp
from .holdout import Holdout, TileSubset

log = logging.getLogger(__name__)

#: At most this many post-processed pixel values are kept for the pixel quantiles (32 MB as float64).
PIXEL_BUDGET = 4_000_000


def pixel_stride(n_tiles: int, fm_size: int, budget: int = PIXEL_BUDGET) -> int:
    """The smallest power-of-two stride whose (fm_size/stride)² pixels per tile fit ``budget`` for n tiles."""
    s = 1
    while s < fm_size and n_tiles * (-(-fm_size // s)) ** 2 > budget:
        s *= 2
    return s


@torch.inference_mode()
def score_tiles(model, mean_map: torch.Tensor, tiles: TileSet | TileSubset, device: torch.device,
                batch_size: int = 32, workers: int = 0, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Tile scores (N,) float32 and a strided sample of post-processed pixel values of ``tiles``."""
    from ..model.anomaly_map import score_batch

    model = model.eval().to(memory_format=torch.channels_last)
    mm = mean_map.to(device).float()
    stride = pixel_stride(len(tiles), mm.shape[-1])
    loader = DataLoader(PlainTiles(tiles), batch_size=batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    scores = np.empty(len(tiles), np.float32)
    pixels: list[np.ndarray] = []
    done = 0
    for x in tqdm(loader, desc="scoring calibration tiles", unit="batch", disable=not progress, leave=False):
        pp, mean, _ = score_batch(model, x.to(device, non_blocking=True), mm)
        scores[done:done + x.shape[0]] = mean.float().cpu().numpy()
        pixels.append(pp[:, ::stride, ::stride].float().cpu().numpy().ravel())
        done += x.shape[0]
    return scores, np.concatenate(pixels) if pixels else np.zeros(0, np.float32)


def calibrate(model, mean_map: torch.Tensor, tiles: TileSet | TileSubset, device: torch.device,
              provenance: dict[str, Any], batch_size: int = 32, workers: int = 0,
              progress: bool = True) -> Calibration | None:
    """Score ``tiles`` and build their calibration; None (with a warning) if fewer than ``MIN_TILES`` score."""
    scores, pixels = score_tiles(model, mean_map, tiles, device, batch_size, workers, progress)
    ok = np.isfinite(scores)
    if ok.sum() < MIN_TILES:
        log.warning("calibration: only %d of %d tiles have a finite score (need %d); no calibration",
                    int(ok.sum()), len(scores), MIN_TILES)
        return None
    if not ok.all():
        log.warning("calibration: %d of %d tiles have no finite score and are left out", int((~ok).sum()), len(scores))
    prov = {**provenance, "device": str(device), "package_version": __version__}
    return Calibration.from_scores(scores[ok], pixels, prov, mean_map=mean_map.detach().float().cpu().numpy())


def calibrate_holdout(model, mean_map: torch.Tensor, holdout: Holdout, device: torch.device, folder: Path,
                      batch_size: int, workers: int) -> dict[str, Any] | None:
    """The trainer's hook: the held-out tiles' calibration block for the model's metadata (None: none)."""
    if holdout.calibration is None:
        return None
    prov = {
        "source": "training hold-out",
        "holdout": holdout.mode,
        "tiles": str(Path(folder).resolve()),
        "slides": list(holdout.slides),
        "n_slides": holdout.n_slides,
        "mpp": training_mpp(Path(folder)),
    }
    cal = calibrate(model, mean_map, holdout.calibration, device, prov, batch_size=batch_size, workers=workers)
    if cal is None:
        return None
    log.info("%s", cal.line())
    return cal.to_dict()
