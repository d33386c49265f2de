"""The HaloAE model (torch; knows nothing about slides): build, run, save and load.

Public API (docs/architecture.md): ``build_model``, ``HaloAE``, ``HaloAEOutput``, ``HaloAttention``,
``postprocess``, ``tile_scores``, ``save_model``, ``load_model``, ``LoadedModel``.
"""

from __future__ import annotations

from .anomaly_map import postprocess, tile_scores
from .checkpoint import LoadedModel, load_model, save_model
from .halo import HaloAttention
from .haloae import HaloAE, HaloAEOutput, build_model

__all__ = [
    "HaloAE",
    "HaloAEOutput",
    "HaloAttention",
    "LoadedModel",
    "build_model",
    "load_model",
    "postprocess",
    "save_model",
    "tile_scores",
]
