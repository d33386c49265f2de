"""Slides: reading at a target resolution, tissue detection, tile grids, training-tile extraction (no torch)."""

from __future__ import annotations

from .grid import TileGrid, build_grid, resolve_mpp
from .reader import SlideReader, TileReadError, open_slide

__all__ = ["SlideReader", "TileReadError", "open_slide", "resolve_mpp", "build_grid", "TileGrid"]
