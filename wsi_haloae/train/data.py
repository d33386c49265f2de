"""Training tiles: find them, read them once, and serve deterministic augmented samples.

Every sample is a pure function of (seed, epoch, index): the tile it shows and its augmentations come from a
generator seeded with those three numbers. That makes a run independent of the DataLoader worker count and
lets ``--resume`` reproduce an uninterrupted run exactly.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..config import check_mpp
from ..errors import BadTilesError, UserError
from ..images import IMAGE_SUFFIXES, read_image, read_rgb, resize_rgb, warn_rescaled
from ..model.inputs import to_tensor
from .cutpaste import color_jitter, cutpaste_normal, cutpaste_scar

log = logging.getLogger(__name__)

TILE_SIZE = 256
#: Sub-folder of QC images written by ``wsi-haloae tiles`` (``wsi_haloae.slide.tiles.THUMBNAILS``).
QC_FOLDER = "thumbnails"
#: Above this many bytes of decoded tiles, read them from disk on every use instead of keeping them in memory.
CACHE_LIMIT_BYTES = 2 << 30


def tile_root(folder: Path) -> Path:
    """The folder that holds the tiles: ``train/good`` for an MVTec-AD category, else the folder itself."""
    folder = Path(folder)
    if not folder.exists():
        raise BadTilesError(f"{folder}: tile folder does not exist")
    if not folder.is_dir():
        raise BadTilesError(f"{folder}: not a folder")
    mvtec = folder / "train" / "good"
    return mvtec if mvtec.is_dir() else folder


def find_images(folder: Path) -> list[Path]:
    """All image files under ``folder`` at any depth, sorted so that runs are reproducible.

    ``thumbnails/`` folders hold the QC pictures ``wsi-haloae tiles`` writes beside its tiles: they are not
    tiles, and training on a whole-slide thumbnail would teach the model a wrong "normal".
    """
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and QC_FOLDER not in p.relative_to(folder).parts[:-1]
        and not p.name.endswith(".part")
    )
    if not files:
        raise BadTilesError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


@dataclass
class TileSet:
    """The readable training tiles of a folder; decoded 256×256 uint8 arrays kept in memory when they fit."""

    root: Path
    paths: list[Path]
    skipped: int
    cache: np.ndarray | None  # (N, 256, 256, 3) uint8 or None (read on demand)
    size: int = TILE_SIZE

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> np.ndarray:
        if self.cache is not None:
            return self.cache[i]
        return resize_rgb(read_rgb(self.paths[i]), self.size)

    def fingerprint(self) -> str:
        """A short hash of the tile list (names and sizes): resume refuses a different data set."""
        h = hashlib.sha256()
        for p in self.paths:
            h.update(str(p.relative_to(self.root)).encode())
            h.update(str(p.stat().st_size).encode())
        return h.hexdigest()[:16]


def load_tiles(folder: Path, size: int = TILE_SIZE, progress: bool = True) -> TileSet:
    """Find and decode every tile once; unreadable files are skipped and counted in the log."""
    from tqdm import tqdm

    root = tile_root(folder)
    files = find_images(root)
    keep = len(files) * size * size * 3 <= CACHE_LIMIT_BYTES
    good: list[Path] = []
    arrays: list[np.ndarray] = []
    rescaled: list[tuple[Path, str]] = []
    skipped = 0
    first_error = ""
    for p in tqdm(files, desc="reading tiles", unit="tile", disable=not progress, leave=False):
        try:
            image = read_image(p)
        except (OSError, ValueError) as exc:  # images.ImageReadError is a ValueError
            skipped += 1
            first_error = first_error or f"{p.name}: {exc}"
            log.debug("skipping unreadable tile %s: %s", p, exc)
            continue
        if image.note:
            rescaled.append((p, image.note))
        arr = resize_rgb(image.pixels, size)
        good.append(p)
        if keep:
            arrays.append(arr)
    if skipped:
        log.warning("%s: skipped %d unreadable image file(s) of %d (first: %s)", root, skipped, len(files), first_error)
    warn_rescaled(root, rescaled, len(files))
    if not good:
        raise BadTilesError(f"{root}: none of the {len(files)} image files could be read (first: {first_error})")
    log.info("%s: %d training tiles%s", root, len(good), " (cached in memory)" if keep else "")
    cache = np.stack(arrays) if keep else None
    return TileSet(root=root, paths=good, skipped=skipped, cache=cache, size=size)


def training_mpp(folder: Path) -> float | None:
    """Microns per pixel of tiles made by ``wsi-haloae tiles`` (its tiles.csv), when all rows agree."""
    for cand in (Path(folder) / "tiles.csv", tile_root(folder) / "tiles.csv"):
        if not cand.is_file():
            continue
        try:
            with cand.open(newline="") as fh:
                vals = [float(r["mpp"]) for r in csv.DictReader(fh) if r.get("mpp") not in (None, "")]
        except (OSError, ValueError, KeyError, csv.Error) as exc:
            log.warning("%s: cannot read the mpp column (%s)", cand, exc)
            return None
        if not vals:
            return None
        med = statistics.median(vals)
        if max(vals) - min(vals) > 1e-3 * med:
            log.warning("%s: tiles have different mpp (%.4g–%.4g); recording the median", cand, min(vals), max(vals))
        try:  # the model records it, and a model file with an implausible mpp is refused when loaded
            return check_mpp(med, f"{cand}: the tiles' mpp")
        except UserError as exc:
            raise BadTilesError(str(exc)) from None
    return None


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator whose state depends only on (seed, epoch, index)."""
    key = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") & ((1 << 63) - 1))


def epoch_order(n_tiles: int, n_samples: int, seed: int, epoch: int) -> np.ndarray:
    """Which tile each sample of an epoch shows: shuffled passes over the tiles, so every tile is seen evenly."""
    g = sample_generator(seed, epoch, -1)
    reps = -(-n_samples // n_tiles)
    order = torch.cat([torch.randperm(n_tiles, generator=g) for _ in range(reps)])[:n_samples]
    return order.numpy()


class EpochSampler(Sampler):
    """Yields (epoch, index) keys; the epoch is set in the main process, so persistent workers see it."""

    def __init__(self, n_samples: int) -> None:
        self.n_samples = n_samples
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in range(self.start, self.n_samples)])

    def __len__(self) -> int:
        return self.n_samples - self.start


class CutPasteDataset(Dataset):
    """Sample (epoch, i) → (original, Cut&Paste normal, Cut&Paste scar), each float (3, 256, 256) in [0, 1].

    The original is colour-jittered first (whole-image augmentation), and both pasted versions derive from the
    jittered original, so they differ from it only where something was pasted.
    """

    def __init__(self, tiles: TileSet, n_samples: int, seed: int, jitter: float = 0.1) -> None:
        self.tiles = tiles
        self.n_samples = n_samples
        self.seed = seed
        self.jitter = jitter
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.n_samples

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(len(self.tiles), self.n_samples, self.seed, epoch)}
        return self._orders[epoch]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, i = key
        g = sample_generator(self.seed, epoch, i)
        x = to_tensor(self.tiles.get(int(self._order(epoch)[i])))
        if self.jitter > 0:
            x = color_jitter(x, self.jitter, g)
        normal, _ = cutpaste_normal(x, g, jitter=self.jitter)
        scar, _ = cutpaste_scar(x, g, jitter=self.jitter)
        return x, normal, scar


class PlainTiles(Dataset):
    """Tiles as they are (no augmentation), for the training mean anomaly map."""

    def __init__(self, tiles: TileSet) -> None:
        self.tiles = tiles

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_tensor(self.tiles.get(i))
