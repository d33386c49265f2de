"""The tiles of one slide as a torch Dataset, read in DataLoader worker processes.

Why this shape: each worker process opens the slide once (``open_slide`` caches one reader per process and
ignores a handle inherited over ``fork``) and keeps it for the whole slide. Tiles go out as uint8 CHW, a
quarter of the bytes of float32 through the worker pipes and the host-to-device copy; the model converts
and normalises on the device. A tile that cannot be decoded comes back flagged instead of raising, so one
corrupt JPEG tile does not abort a 40-minute slide; the engine counts the flags and gives up only when too
many fail.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import BadSlideError
from ..slide.reader import open_slide

log = logging.getLogger(__name__)


class TileDataset(Dataset):
    """Item ``i`` → (uint8 tensor (3, T, T), i, ok). ``ok`` is False when the tile could not be read."""

    def __init__(self, slide: str | Path, xs: np.ndarray, ys: np.ndarray, tile_size: int, mpp: float | None,
                 *, scale: float | None = None, fill: tuple[int, int, int] | None = None):
        """``scale`` (level-0 px per tile px, e.g. ``TileGrid.scale``, which holds a declared ``--slide-mpp``)
        replaces ``mpp`` when given; ``fill``: the padding of edge tiles (``TileGrid.background``)."""
        self.slide = str(slide)
        self.xs = np.asarray(xs, dtype=np.int64)
        self.ys = np.asarray(ys, dtype=np.int64)
        self.tile_size = int(tile_size)
        self.mpp = mpp
        self.scale = scale
        self.fill = fill

    def __len__(self) -> int:
        return int(self.xs.size)

    def __getitem__(self, i: int):
        t = self.tile_size
        try:
            reader = open_slide(self.slide)
            x, y = int(self.xs[i]), int(self.ys[i])
            if self.scale is not None:
                tile = reader.read_scaled(x, y, t, t, self.scale, self.fill)
            else:
                tile = reader.read_tile(x, y, t, self.mpp, self.fill)
            if tile.shape != (t, t, 3):
                raise BadSlideError(f"tile {i}: got shape {tile.shape}")
        except BadSlideError as exc:  # TileReadError is one; so is a slide that vanished mid-run
            log.debug("tile %d unreadable: %s", i, exc)
            return torch.zeros((3, t, t), dtype=torch.uint8), i, False
        return torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1))), i, True


def make_loader(ds: TileDataset, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """Batches in grid order (row-major), so the writer can flush map chunks row by row."""
    kw: dict = {}
    if workers > 0:
        kw = dict(persistent_workers=True, prefetch_factor=4)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      drop_last=False, **kw)
