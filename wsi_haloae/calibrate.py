"""The ``calibrate`` command: (re)calibrate a model on normal tiles from the user's own site or scanner.

A model's p-values are only as good as the match between its calibration tiles and the slides it scores
(same tissue, stain, scanner). A site scores its own normal slides once (``wsi-haloae tiles`` on them), then
``calibrate`` measures the model on those tiles and writes a copy of the model whose metadata carries the
new calibration; weights, mean map and every other entry stay as they were. Thousands of tiles are needed
for whole-slide calls (docs/scores.md), far more than a training hold-out usually gives.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from .config import CalibrateConfig
from .errors import BadInputError, BadTilesError
from .fileio import guard_outputs, output_lock
from .scoring.calibration import MIN_TILES, Calibration

log = logging.getLogger(__name__)

#: Calibration tiles read at another resolution than the model's by more than this are refused.
MPP_TOLERANCE = 0.02


def _same_path(a: Path, b: Path) -> bool:
    return Path(os.path.abspath(a.expanduser())).resolve() == Path(os.path.abspath(b.expanduser())).resolve()


def _enough(count: int, where: Path, what: str) -> None:
    if count < MIN_TILES:
        raise BadTilesError(f"{where}: {count} {what}; a calibration needs at least {MIN_TILES} normal tiles "
                            "(thousands for whole-slide calls, see docs/scores.md)")


def run_calibrate(cfg: CalibrateConfig) -> Calibration:
    """Score ``cfg.tiles`` with ``cfg.model`` and write the model with their calibration to ``cfg.out``."""
    from .model.checkpoint import load_model, read_header, rewrite_metadata
    from .model.device import resolve_device
    from .train.calibration import calibrate
    from .train.data import find_images, load_tiles, tile_root, training_mpp
    from .train.holdout import tile_slides

    t0 = time.perf_counter()
    model_path, out, folder = Path(cfg.model), Path(cfg.out), Path(cfg.tiles)
    in_place = _same_path(out, model_path)
    if in_place:
        out = Path(os.path.abspath(model_path)).resolve()  # a symlinked model: replace the file it points to
    guard_outputs({"--out": out}, {"--tiles": folder, **({} if in_place else {"--model": model_path})})
    read_header(model_path)  # a wrong model file fails here, before any tile is read
    device = resolve_device(cfg.device)
    with output_lock(out, "model file"):
        loaded = load_model(model_path, device)
        # the cheap checks first (no tile decoded yet): resolution from tiles.csv, number of image files
        tiles_mpp, model_mpp = training_mpp(folder), loaded.metadata.get("mpp")
        if tiles_mpp is not None and model_mpp is not None and abs(tiles_mpp - model_mpp) > MPP_TOLERANCE * model_mpp:
            raise BadInputError(f"{folder}: tiles are at {tiles_mpp:g} µm/px (tiles.csv) but the model scores slides at "
                                f"{model_mpp:g} µm/px; extract calibration tiles with `wsi-haloae tiles --mpp {model_mpp:g}`")
        if tiles_mpp is None:
            log.info("%s: no tiles.csv with an mpp column; assuming the tiles are at the model's resolution", folder)
        _enough(len(find_images(tile_root(folder))), tile_root(folder), "image files")
        tiles = load_tiles(folder, progress=cfg.progress)
        _enough(len(tiles), tiles.root, "readable tiles")
        if str(tiles.root.resolve()) == str(loaded.metadata.get("data")):
            log.warning("%s: these are the tiles the model was trained on; it scores them lower than new tissue, so "
                        "p-values from this calibration will be too small (too many calls): use other normal slides",
                        tiles.root)
        slides = sorted({s for s in tile_slides(tiles) if s})
        old = Calibration.from_metadata(loaded.metadata, f"model file {model_path}")
        provenance = {
            "source": "calibrate",
            "tiles": str(tiles.root.resolve()),
            "slides": slides,
            "n_slides": len(slides) or None,
            "mpp": tiles_mpp,
            "model": str(Path(os.path.abspath(model_path))),
            "model_sha256": loaded.sha256,
            "replaces": None if old is None else {"source": old.provenance.get("source"), "date": old.provenance.get("date"),
                                                  "n": old.n},
        }
        log.info("scoring %d tiles of %s with %s on %s", len(tiles), tiles.root, model_path, device)
        cal = calibrate(loaded.model, loaded.mean_map, tiles, device, provenance, batch_size=cfg.batch_size,
                        workers=cfg.workers, progress=cfg.progress)
        if cal is None:
            raise BadTilesError(f"{tiles.root}: fewer than {MIN_TILES} tiles got a finite score; no calibration written")
        rewrite_metadata(model_path, out, {"calibration": cal.to_dict()})
    print(f"calibrated {out}: {cal.n:,} normal tiles"
          + (f" from {len(slides)} slide{'s' if len(slides) != 1 else ''}" if slides else "")
          + f" in {tiles.root} ({time.perf_counter() - t0:.1f} s); smallest p-value 1/{cal.n + 1:,}, "
          f"tile score median {cal.score_quantile(0.5):.4g}, 99th percentile {cal.score_quantile(0.99):.4g}; "
          f"display range {cal.display_range[0]:.4g}-{cal.display_range[1]:.4g}"
          + (" (replaced in place)" if in_place else ""), file=sys.stderr)
    return cal
