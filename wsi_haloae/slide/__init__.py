"""Slides: reading at a target resolution, tissue detection, tile grids, training-tile extraction (no torch)."""

from __future__ import annotations

from .grid import TileGrid, Windows, build_grid, plan_windows
from .reader import SlideReader, TileReadError, open_slide
from .resolution import Resolution, magnification_to_mpp, resolve_resolution

__all__ = ["SlideReader", "TileReadError", "open_slide", "build_grid", "TileGrid", "Windows",
           "plan_windows", "Resolution", "resolve_resolution", "magnification_to_mpp"]
