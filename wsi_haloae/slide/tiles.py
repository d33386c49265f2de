"""``wsi-haloae tiles``: cut the tissue tiles of one slide into image files to build a training set.

Output folder layout (several slides may share one folder):

- ``<stem>_<x>_<y>.png|jpg``: one tile per file, (x, y) its level-0 top-left (bounds offset included);
- ``tiles.csv``: the manifest, one row per tile of every slide extracted into the folder (a re-run of a
  slide replaces that slide's rows);
- ``thumbnails/<stem>.png``: the slide at low resolution with the kept tiles outlined, to check the
  selection by eye (kept apart so that it is never mistaken for a tile).

Each image is written under a hidden temporary name and renamed into place, so an interrupted run leaves
no half-written image under a final name; a re-run skips the tiles already there (and removes stale
temporary files).
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..config import TilesConfig
from ..errors import BadInputError, BadSlideError, OutputError
from ..fileio import atomic_output, guard_outputs, output_lock, write_error
from .grid import TileGrid, build_grid
from .reader import SlideReader, TileReadError, open_slide
from .resolution import Resolution, resolve_resolution

log = logging.getLogger(__name__)

MANIFEST = "tiles.csv"
THUMBNAILS = "thumbnails"
FIELDS = ["slide", "file", "x", "y", "level0_size", "tile_size", "mpp", "tissue"]
#: Tiles handed to a worker at a time: big enough to amortise the inter-process hop, small for smooth progress.
CHUNK = 8
THUMB_MAX = 2048
PNG_COMPRESS = 1  # zlib level: ~3x faster than the default 6 for ~10 % larger files
JPEG_QUALITY = 95


@dataclass
class TilesSummary:
    slide: Path
    out: Path
    grid_tiles: int
    kept: int
    written: int
    skipped: int
    failed: int
    seconds: float  # whole command
    write_seconds: float  # reading + encoding + writing the tiles (after the grid is built)
    manifest: Path
    thumbnail: Path

    @property
    def tiles_per_s(self) -> float:
        """Extraction rate: tiles written per second of the writing phase."""
        return self.written / self.write_seconds if self.write_seconds > 0 else float("nan")


def slide_stem(path: Path) -> str:
    """File-name stem of a slide: the name without its extension (a DICOM folder: the folder name)."""
    p = Path(path)
    return p.name if p.is_dir() else p.stem


def tile_name(stem: str, x: int, y: int, fmt: str) -> str:
    return f"{stem}_{int(x)}_{int(y)}.{fmt}"


def _save_atomic(img: np.ndarray, final: Path, fmt: str) -> None:
    with atomic_output(final, "a tile") as tmp:
        im = Image.fromarray(img)
        if fmt == "png":
            im.save(tmp, format="PNG", compress_level=PNG_COMPRESS)
        else:
            im.save(tmp, format="JPEG", quality=JPEG_QUALITY)


def _write_chunk(slide: str, scale: float, size: int, fmt: str, items: list[tuple[int, int, str]]) -> tuple[int, list[str]]:
    """Worker body: read and write a few tiles with this process's reader. Returns (written, errors).

    ``scale``: level-0 px per tile px, the grid's (it already holds any ``--slide-mpp``).
    """
    reader = open_slide(slide)
    written, errors = 0, []
    for x, y, final in items:
        try:
            img = reader.read_scaled(x, y, size, size, scale)
        except TileReadError as exc:
            errors.append(str(exc))
            continue
        _save_atomic(img, Path(final), fmt)
        written += 1
    return written, errors


def _clean_stale(out: Path, stem: str) -> None:
    for p in out.glob(f".{stem}_*.part"):
        p.unlink(missing_ok=True)


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    try:
        (out / THUMBNAILS).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create output folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise OutputError(f"{out}: output folder is not writable")


def _write_manifest(out: Path, slide_key: str, rows: list[dict]) -> Path:
    """Replace this slide's rows in ``tiles.csv``, keeping other slides' rows; atomic."""
    path = out / MANIFEST
    keep: list[dict] = []
    if path.exists():
        try:
            with path.open(newline="") as f:
                rd = csv.DictReader(f)
                if rd.fieldnames is None or "slide" not in rd.fieldnames:
                    raise OutputError(f"{path}: exists but is not a tiles manifest (no 'slide' column)")
                keep = [r for r in rd if r.get("slide") != slide_key]
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            raise OutputError(f"{path}: exists but cannot be read ({exc})") from None
    with atomic_output(path, "the tile manifest") as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(keep)
        w.writerows(rows)
    return path


def draw_thumbnail(grid: TileGrid, path: Path, ok: np.ndarray | None = None) -> Path:
    """The slide at low resolution with each kept tile outlined (green; red where the read failed)."""
    img = Image.fromarray(grid.lowres)
    f = min(1.0, THUMB_MAX / max(img.size))
    if f < 1:
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.LANCZOS)
    k = f / grid.mask_downsample  # thumbnail px per level-0 px
    d = ImageDraw.Draw(img)
    for i, (x, y) in enumerate(zip(grid.xs.tolist(), grid.ys.tolist())):
        colour = (0, 170, 0) if ok is None or ok[i] else (220, 0, 0)
        d.rectangle([x * k, y * k, (x + grid.level0_tile) * k - 1, (y + grid.level0_tile) * k - 1], outline=colour, width=1)
    with atomic_output(path, "the thumbnail") as tmp:
        img.save(tmp, format="PNG")
    return path


def run_tiles(cfg: TilesConfig, progress: bool = True) -> TilesSummary:
    """Extract the tissue tiles of ``cfg.slide`` into ``cfg.out`` (see the module docstring).

    The outputs are checked against the inputs and the folder locked before any work; a failed write (a
    full disk) is one line, and leaves only whole tiles under final names (a rerun continues).
    """
    t_start = time.perf_counter()
    fmt = cfg.format.lower()
    if fmt == "jpeg":
        fmt = "jpg"
    if fmt not in ("png", "jpg"):
        raise BadInputError(f"--format must be png or jpg, got {cfg.format!r}")
    if cfg.workers < 1:
        raise BadInputError(f"--workers must be ≥ 1, got {cfg.workers}")
    if cfg.class_name is not None and cfg.annotations is None:
        raise BadInputError("--class needs --annotations")
    slide = Path(cfg.slide)
    out = Path(cfg.out)
    # the folder may not hold an input: training reads every image under it (a flat slide would become a tile)
    guard_outputs({"--out": out}, {"slide": slide, "--annotations": cfg.annotations})
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    reader: SlideReader = open_slide(slide)  # BadSlideError for anything unopenable, before any output
    res = resolve_resolution(str(slide), reader.mpp, slide_mpp=cfg.slide_mpp, mpp=cfg.mpp,
                             magnification=cfg.magnification)  # refusals before any output exists
    for line in res.warnings:
        log.warning(line)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(out, "the tile folder", exc) from None
    with output_lock(out, "tile folder"):  # one run at a time: tiles.csv is read, merged and rewritten
        return _extract(cfg, slide, out, reader, res, fmt, progress, t_start)


def _extract(cfg: TilesConfig, slide: Path, out: Path, reader: SlideReader, res: Resolution, fmt: str,
             progress: bool, t_start: float) -> TilesSummary:
    from tqdm import tqdm

    grid = build_grid(reader, res, cfg.tile_size, cfg.stride, cfg.min_tissue, cfg.annotations, cfg.class_name)
    n_kept_grid = len(grid)
    if n_kept_grid == 0:
        log.warning("%s: none of the %d grid tiles has ≥ %.2f tissue%s; see the thumbnail, or lower --min-tissue",
                    slide, grid.n_grid, cfg.min_tissue, " inside the annotations" if cfg.annotations else "")
    if cfg.max_tiles is not None and len(grid) > cfg.max_tiles:
        rng = np.random.default_rng(cfg.seed)
        grid = grid.subset(np.sort(rng.choice(len(grid), size=cfg.max_tiles, replace=False)))

    _prepare_out(out)
    stem = slide_stem(slide)
    _clean_stale(out, stem)
    names = [tile_name(stem, x, y, fmt) for x, y in zip(grid.xs.tolist(), grid.ys.tolist())]
    exists = np.array([(out / n).is_file() for n in names], dtype=bool)
    todo = [(int(grid.xs[i]), int(grid.ys[i]), str(out / names[i])) for i in np.flatnonzero(~exists)]
    scale = grid.scale
    slide_arg = str(slide)

    errors: list[str] = []
    written = 0
    t_write = time.perf_counter()
    chunks = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]

    def new_bar():
        return tqdm(total=len(todo), desc=f"tiles {stem}", unit="tile", file=sys.stderr, disable=not progress or not todo)

    try:
        if cfg.workers == 1 or len(chunks) <= 1:
            with new_bar() as bar:
                for ch in chunks:
                    w, e = _write_chunk(slide_arg, scale, grid.tile_size, fmt, ch)
                    written += w
                    errors += e
                    bar.update(len(ch))
        else:
            import multiprocessing as mp

            # fork (as DataLoader does): workers start at once, each opens its own handle via open_slide
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            with ProcessPoolExecutor(max_workers=min(cfg.workers, len(chunks)), mp_context=ctx) as pool:
                futs = {pool.submit(_write_chunk, slide_arg, scale, grid.tile_size, fmt, ch): len(ch) for ch in chunks}
                try:
                    with new_bar() as bar:  # after the fork: tqdm's monitor thread must not be forked
                        for fut in as_completed(futs):
                            w, e = fut.result()
                            written += w
                            errors += e
                            bar.update(futs[fut])
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
    except OutputError as exc:  # a full disk: each tile under a final name is whole, and a rerun skips it
        raise OutputError(f"{exc}; the tiles already written are whole and kept: free space, then rerun") from None

    write_seconds = time.perf_counter() - t_write
    if errors:
        log.warning("%s: %d tile(s) could not be read and were skipped; first: %s", slide, len(errors), errors[0])
    ok = np.array([(out / n).is_file() for n in names], dtype=bool)
    failed_names = {names[i] for i in np.flatnonzero(~ok)}
    if len(names) and not ok.any():
        raise BadSlideError(f"cannot read slide {slide}: no tile could be read ({errors[0] if errors else 'unknown'})")

    slide_key = str(slide.resolve())
    rows = [
        {"slide": slide_key, "file": n, "x": int(x), "y": int(y), "level0_size": f"{grid.level0_tile:g}",
         "tile_size": grid.tile_size, "mpp": f"{grid.mpp:g}", "tissue": f"{t:.4f}"}
        for n, x, y, t in zip(names, grid.xs.tolist(), grid.ys.tolist(), grid.tissue.tolist()) if n not in failed_names
    ]
    thumb = draw_thumbnail(grid, out / THUMBNAILS / f"{stem}.png", ok)
    manifest = _write_manifest(out, slide_key, rows)  # last: the manifest rows say the slide is done
    seconds = time.perf_counter() - t_start
    summary = TilesSummary(slide, out, grid.n_grid, len(rows), written, int(exists.sum()), len(failed_names), seconds,
                           write_seconds, manifest, thumb)
    sample = f" (a random {cfg.max_tiles} of {n_kept_grid})" if n_kept_grid > len(grid) else ""
    rate = f", {summary.tiles_per_s:.1f} tiles/s" if written else ""
    print(
        f"tiles: {len(rows)} kept{sample} / {grid.n_grid} grid tiles at {grid.mpp:g} mpp; {written} written "
        f"({write_seconds:.1f} s{rate}), {summary.skipped} already there, {len(failed_names)} unreadable; "
        f"{seconds:.1f} s in all -> {out}",
        file=sys.stderr,
    )
    return summary
