"""Which normal tiles train the model and which are kept out to calibrate it.

Calibration tiles must be exchangeable with the normal tiles of a *new* slide. Tiles of the slides the model
trained on are not: they share the slide's stain, scanner run and patient, so their scores run lower than a
new slide's and p-values computed from them would call too much. So when the tiles record their slide
(``tiles.csv`` from ``wsi-haloae tiles``) and there are at least ``MIN_SLIDES`` slides, whole slides are held
out; otherwise a seeded random share of the tiles is. Held-out tiles are out of training *and* of the
training mean map.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..scoring.calibration import MIN_TILES
from .data import QC_FOLDER, TileSet

log = logging.getLogger(__name__)

MIN_SLIDES = 3
#: Salt of the hold-out's random generator, so that it never coincides with another use of the seed.
_SALT = 0xCA1B


@dataclass
class TileSubset:
    """Some tiles of a ``TileSet`` (a view: no tile is copied), with the interface training uses."""

    parent: TileSet
    index: np.ndarray

    @property
    def root(self) -> Path:
        return self.parent.root

    @property
    def paths(self) -> list[Path]:
        return [self.parent.paths[int(i)] for i in self.index]

    @property
    def skipped(self) -> int:
        return self.parent.skipped

    @property
    def size(self) -> int:
        return self.parent.size

    def __len__(self) -> int:
        return int(self.index.size)

    def get(self, i: int) -> np.ndarray:
        return self.parent.get(int(self.index[i]))

    def fingerprint(self) -> str:
        return self.parent.fingerprint()


@dataclass
class Holdout:
    """The split: ``train`` tiles, ``calibration`` tiles (None: no calibration), how it was made and why."""

    train: TileSet | TileSubset
    calibration: TileSubset | None
    mode: str  # "slides" | "tiles" | "none"
    note: str  # one line for the log
    slides: list[str] = field(default_factory=list)  # the slides the calibration tiles come from, when known
    n_slides: int | None = None  # slides among the held-out tiles, when the tiles record them
    warn: bool = False  # the note is a warning: a calibration was asked for and cannot be made

    def describe(self) -> dict:
        """For the model's metadata and the calibration's provenance."""
        return {"mode": self.mode, "tiles": 0 if self.calibration is None else len(self.calibration),
                "slides": list(self.slides), "n_slides": self.n_slides}


def tile_slides(tiles: TileSet) -> list[str | None]:
    """The slide each tile was cut from, from every ``tiles.csv`` under the tile folder (None where unknown)."""
    where: dict[Path, str] = {}
    for manifest in sorted(tiles.root.rglob("tiles.csv")):
        if QC_FOLDER in manifest.relative_to(tiles.root).parts[:-1]:
            continue
        try:
            with manifest.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    if row.get("file") and row.get("slide"):
                        where[(manifest.parent / row["file"]).resolve()] = row["slide"]
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            log.warning("%s: cannot read the tile manifest (%s); its tiles count as of unknown slide", manifest, exc)
    return [where.get(p.resolve()) for p in tiles.paths]


def _pick_slides(sizes: dict[str, int], fraction: float, rng: np.random.Generator) -> list[str]:
    """Whole slides in a seeded random order until they hold ``fraction`` of the tiles, skipping a slide that
    would take more than twice that; at least one slide held out and at least two left for training."""
    total = sum(sizes.values())
    target, cap = fraction * total, 2 * fraction * total
    order = [list(sizes)[i] for i in rng.permutation(len(sizes))]
    held: list[str] = []
    count = 0
    for s in order:
        if count >= target or len(held) >= len(sizes) - 2:
            break
        if count + sizes[s] <= cap:
            held.append(s)
            count += sizes[s]
    if not held:  # every slide alone holds more than twice the share: the smallest (<= a third of the tiles)
        held = [min(order, key=lambda s: sizes[s])]
    return held


def split_holdout(tiles: TileSet, fraction: float, seed: int) -> Holdout:
    """Split ``tiles`` into training and calibration tiles (see the module docstring); seeded, and logged in
    one line (a warning when a calibration was asked for and cannot be made)."""
    h = _split(tiles, fraction, seed)
    (log.warning if h.warn else log.info)("%s", h.note)
    return h


def _split(tiles: TileSet, fraction: float, seed: int) -> Holdout:
    if not 0 <= fraction <= 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5], got {fraction}")
    n = len(tiles)
    if fraction == 0:
        return Holdout(tiles, None, "none", "calibration hold-out: none (--val-fraction 0); the model will have no "
                       "calibration until `wsi-haloae calibrate`")
    rng = np.random.default_rng([seed, _SALT])
    slides = tile_slides(tiles)
    known = [s for s in slides if s is not None]
    distinct = sorted(set(known))
    held_slides: list[str] = []
    why_tiles = ""
    if len(known) == n and len(distinct) >= MIN_SLIDES:
        counts = Counter(known)
        sizes = {s: counts[s] for s in distinct}
        held_slides = _pick_slides(sizes, fraction, rng)
    elif len(known) < n:
        why_tiles = ("the tiles do not record their slide (no tiles.csv from `wsi-haloae tiles`)" if not known else
                     f"{n - len(known)} of {n} tiles are not in a tiles.csv")
    else:
        why_tiles = f"they come from {len(distinct)} slide{'s' if len(distinct) != 1 else ''} (whole slides need >= {MIN_SLIDES})"

    if held_slides:
        hs = set(held_slides)
        mask = np.array([s in hs for s in slides])
        mode = "slides"
        names = ", ".join(Path(s).name for s in held_slides[:5]) + (", ..." if len(held_slides) > 5 else "")
        what = (f"{len(held_slides)} of {len(distinct)} slides ({int(mask.sum())} of {n} tiles, "
                f"{100 * mask.mean():.1f} %): {names}")
    else:
        k = int(round(fraction * n))
        mask = np.zeros(n, bool)
        mask[rng.choice(n, size=min(k, n - 1), replace=False)] = True
        mode = "tiles"
        what = f"{int(mask.sum())} of {n} tiles ({100 * mask.mean():.1f} %, seeded), not whole slides: {why_tiles}"
    if mask.sum() < MIN_TILES:
        size = (f"the held-out slide{'s' if len(held_slides) > 1 else ''} would hold {int(mask.sum())} tiles"
                if held_slides else f"{fraction:g} of {n} tiles is {int(mask.sum())}")
        return Holdout(tiles, None, "none",
                       f"calibration hold-out: none: {size}, fewer than the {MIN_TILES} a calibration needs; training "
                       f"on all {n} tiles, and the model will have NO calibration (raise --val-fraction, or run "
                       "`wsi-haloae calibrate` on other normal tiles)", warn=True)
    train = TileSubset(tiles, np.flatnonzero(~mask))
    cal = TileSubset(tiles, np.flatnonzero(mask))
    from_slides = sorted({slides[i] for i in cal.index if slides[i] is not None})
    return Holdout(train, cal, mode, f"calibration hold-out: {what}; kept out of training and of the mean map",
                   slides=from_slides, n_slides=len(from_slides) if len(known) == n else None)
