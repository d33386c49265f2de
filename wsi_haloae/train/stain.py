"""Training side of stain normalisation: which method a run uses, and its reference, fitted on the tiles.

``--stain-normalize auto`` (the default) means ``macenko`` for a folder of histology tiles and ``none`` for an
MVTec-AD category folder (``train/good`` layout: photographs of objects, not stained tissue). The reference
is fitted on up to ``REFERENCE_TILES`` training tiles (a seeded sample, so ``--resume`` fits the same one):
the median of the per-tile estimates (``model.stain.fit_reference``). It is fitted whatever the method, so
that even a model trained without normalisation carries the stain of its training slides for colour QC.

Tiles that do not look stained: with ``auto``, training goes on without normalisation (a warning says so);
an explicit ``macenko``/``reinhard`` stops with a one-line error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..errors import BadTilesError
from ..model.stain import METHODS, StainReference, fit_reference
from .data import TileSet, to_tensor

log = logging.getLogger(__name__)

AUTO = "auto"
CHOICES = (AUTO, *METHODS)
#: Tiles the reference is fitted on (all of them when there are fewer).
REFERENCE_TILES = 512
#: Share of the sampled tiles that must give a usable stain estimate for the tiles to count as stained.
MIN_STAINED_SHARE = 0.5
_BATCH = 32


def resolve_method(requested: str, tiles_folder: Path) -> str:
    """``auto`` → ``none`` for an MVTec-AD category folder (``train/good``), else ``macenko``."""
    if requested not in CHOICES:
        raise BadTilesError(f"--stain-normalize {requested!r}: choose one of {', '.join(CHOICES)}")
    if requested != AUTO:
        return requested
    return "none" if (Path(tiles_folder) / "train" / "good").is_dir() else "macenko"


def _batches(tiles: TileSet, idx: np.ndarray) -> Iterator[torch.Tensor]:
    for s in range(0, len(idx), _BATCH):
        yield torch.stack([to_tensor(tiles.get(int(i))) for i in idx[s : s + _BATCH]])


def reference_sample(n_tiles: int, seed: int) -> np.ndarray:
    """Which tiles the reference is fitted on: all, or a seeded sample of ``REFERENCE_TILES``."""
    if n_tiles <= REFERENCE_TILES:
        return np.arange(n_tiles)
    return np.sort(np.random.default_rng(seed).choice(n_tiles, REFERENCE_TILES, replace=False))


def setup_stain(model: torch.nn.Module, tiles: TileSet, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Fit the reference on the training tiles, install it in ``model.stain``; returns the metadata block."""
    requested = cfg.stain_normalize
    method = resolve_method(requested, Path(cfg.tiles))
    idx = reference_sample(len(tiles), cfg.seed)
    ref: StainReference | None = fit_reference(_batches(tiles, idx), device=device)
    used = ref.tiles_used if ref is not None else 0
    stained = ref is not None and used >= max(1, MIN_STAINED_SHARE * len(idx))
    if not stained:
        what = f"only {used} of {len(idx)} sampled tiles have a usable stain estimate (glass, unstained or not histology?)"
        if method != "none" and requested != AUTO:
            raise BadTilesError(f"{tiles.root}: --stain-normalize {method}: {what}; use --stain-normalize none")
        if method != "none":
            log.warning("%s: %s: training without stain normalisation", tiles.root, what)
            method = "none"
        ref = None
    model.stain.set_reference(method, ref)
    log.info("stain normalisation: %s%s", method, f" (reference from {used} tiles)" if ref is not None else "")
    return {"normalize": method, "requested": requested, "augment": cfg.stain_augment, **model.stain.describe()}
