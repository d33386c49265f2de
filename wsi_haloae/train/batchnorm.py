"""BatchNorm statistics of the finished model, measured on the training tiles before the mean map.

In training mode BatchNorm normalises with each batch's statistics; in eval mode (inference, the mean map,
evaluate) with running statistics, which PyTorch keeps as an exponential moving average (momentum 0.1) of the
batch statistics *of every past step's weights*, starting from mean 0 / variance 1. That average lags the
weights: after a short run it is still close to its start (at initialisation the auto-encoder's eval-mode
output is near zero — mean f̂m² 6e-4 against 0.28 in training mode), and after any run it mixes statistics of
weights the model no longer has. The statistics that belong to the saved weights are those of the final
auto-encoder on normal tiles, so after the last step we recompute them: running statistics reset, momentum
None (a plain average over batches), one pass in training mode over the training tiles without gradient.
That is ``torch.optim.swa_utils.update_bn``, the field's tool for exactly this (SWA re-estimates BatchNorm
after averaging weights).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, Subset

from .data import PlainTiles, TileSet

log = logging.getLogger(__name__)

#: Enough tiles for per-channel means and variances over 60×60 positions; beyond it the pass costs time only.
MAX_TILES = 2048


@torch.no_grad()
def refresh_batchnorm(model: torch.nn.Module, tiles: TileSet, device: torch.device, batch_size: int, workers: int,
                      seed: int = 0, max_tiles: int = MAX_TILES) -> int:
    """Recompute the auto-encoder's BatchNorm running statistics on (up to ``max_tiles``) training tiles with
    the current weights; returns the number of tiles used. Leaves the model in eval mode."""
    dataset: torch.utils.data.Dataset = PlainTiles(tiles)
    if len(tiles) > max_tiles:
        pick = np.sort(np.random.default_rng(seed).choice(len(tiles), size=max_tiles, replace=False))
        dataset = Subset(dataset, pick.tolist())
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    cuda = device.type == "cuda"

    def features() -> Iterator[torch.Tensor]:
        for x in loader:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
                yield model.extract(x.to(device, non_blocking=True))

    model.eval()
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
        update_bn(features(), model.autoencoder)
    model.eval()
    n = len(dataset)
    log.info("BatchNorm statistics recomputed on %d training tiles", n)
    return n
