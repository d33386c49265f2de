"""One small reader type over OpenSlide (and, for small plain images, Pillow/tifffile).

Why a wrapper: the rest of the package needs RGB uint8 arrays at a target resolution, one error type that
names the file, a per-tile error it can survive, and a handle per process that is safe after ``fork``
(DataLoader / process-pool workers). OpenSlide does the real work; we pick the pyramid level and resample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import BadSlideError
from ..fileio import os_reason
from ..images import ImageReadError, ImageTooLargeError, NotAnImageError, composite_white, read_image

log = logging.getLogger(__name__)

#: Largest plain (non-pyramidal) image we decode fully into memory: 16384² px (≈ 800 MB as RGB).
#: A bigger flat image is refused: convert it to a pyramidal TIFF first (e.g. ``vips tiffsave --tile --pyramid``).
MAX_FLAT_PIXELS = 16384 * 16384

#: Relative tolerance under which a level's downsample counts as the wanted scale (0.499 vs 0.5 mpp).
SCALE_TOLERANCE = 0.02

#: Longest side, in level pixels, of one OpenSlide read when building a low-resolution image in chunks.
_CHUNK = 2048


class TileReadError(BadSlideError):
    """A read failed inside a slide that opened fine (e.g. a corrupt JPEG tile).

    The inference engine catches this per tile, counts it, and goes on; anywhere else it is a user error
    like any other bad slide. The reader reopens its handle after one, because OpenSlide leaves a handle in
    an error state once a read fails.
    """


def _resolve_path(path: Path) -> Path:
    """A DICOM WSI folder is opened through any one of its files (OpenSlide finds the rest)."""
    if path.is_dir():
        dcm = sorted(p for p in path.iterdir() if p.suffix.lower() == ".dcm")
        if not dcm:
            raise BadSlideError(f"cannot open slide {path}: a folder, and it holds no DICOM (.dcm) file")
        return dcm[0]
    return path


def _deep_tiff(path: Path) -> bool:
    """Whether a TIFF's first page has more than 8 bits per sample, or float samples (cheap: tags only)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            return page.bitspersample > 8 or page.sampleformat == 3
    except Exception:  # OpenSlide opened it; if tifffile cannot, leave it to OpenSlide
        return False


def _valid_mpp(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


class _OpenSlideBackend:
    def __init__(self, path: Path):
        import openslide

        self._osr = openslide.OpenSlide(str(path))
        self.dimensions = self._osr.dimensions
        self.level_dimensions = tuple(self._osr.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
        self.properties = dict(self._osr.properties)

    def read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        return composite_white(self._osr.read_region((x, y), level, (w, h)))

    def close(self) -> None:
        self._osr.close()


class _ArrayBackend:
    """A whole small image held in memory: plain PNG/JPEG/flat TIFF that OpenSlide refuses."""

    def __init__(self, path: Path):
        self.array = self._load(path)
        h, w = self.array.shape[:2]
        self.dimensions = (w, h)
        self.level_dimensions = ((w, h),)
        self.level_downsamples = (1.0,)
        self.properties = {"wsi-haloae.reader": "flat-image"}

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        """The decoded image (``images.read_image``: deep samples scaled, with a warning); its errors pass up."""
        image = read_image(path, max_pixels=MAX_FLAT_PIXELS)
        if image.note:
            log.warning("%s: %s", path, image.note)
        return image.pixels

    def read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        H, W = self.array.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self.array[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self.array = np.zeros((0, 0, 3), np.uint8)


class SlideReader:
    """A whole-slide image: geometry, resolution, and RGB reads at any target resolution.

    Coordinates are always level-0 pixels of the full image (as OpenSlide's ``read_region`` takes them,
    bounds offset included).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._backend: _OpenSlideBackend | _ArrayBackend | None = None
        if not self.path.exists():
            raise BadSlideError(f"cannot open slide {self.path}: no such file or folder")
        self._file = _resolve_path(self.path)
        self._open()
        b = self._backend
        assert b is not None
        self.dimensions: tuple[int, int] = tuple(int(v) for v in b.dimensions)  # type: ignore[assignment]
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(tuple(map(int, d)) for d in b.level_dimensions)
        self.level_downsamples: tuple[float, ...] = tuple(b.level_downsamples)
        self.level_count = len(self.level_dimensions)
        self.properties: dict[str, str] = dict(b.properties)
        self.properties_sha256 = hashlib.sha256(
            json.dumps(sorted(self.properties.items()), ensure_ascii=False).encode()
        ).hexdigest()
        mx = _valid_mpp(self.properties.get("openslide.mpp-x"))
        my = _valid_mpp(self.properties.get("openslide.mpp-y"))
        #: level-0 microns per pixel (mean of x and y), None when the file does not say
        self.mpp: float | None = (mx + my) / 2 if mx and my else (mx or my)
        #: (x, y, w, h) of the non-empty region in level-0 px
        self.bounds: tuple[int, int, int, int] = self._bounds()
        self.vendor = self.properties.get("openslide.vendor", "flat-image" if self.is_flat else "unknown")

    def _bounds(self) -> tuple[int, int, int, int]:
        w, h = self.dimensions
        try:
            bx = int(self.properties.get("openslide.bounds-x", 0))
            by = int(self.properties.get("openslide.bounds-y", 0))
            bw = int(self.properties.get("openslide.bounds-width", w - bx))
            bh = int(self.properties.get("openslide.bounds-height", h - by))
        except ValueError:
            return (0, 0, w, h)
        if not (0 <= bx < w and 0 <= by < h and 0 < bw <= w - bx and 0 < bh <= h - by):
            return (0, 0, w, h)
        return (bx, by, bw, bh)

    # -- opening ---------------------------------------------------------------------------------------------
    def _open(self) -> None:
        import openslide

        try:
            backend = _OpenSlideBackend(self._file)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            unsupported = str(exc) or "unsupported format"
        except openslide.OpenSlideError as exc:
            raise BadSlideError(f"cannot open slide {self.path}: {exc}") from None
        except OSError as exc:
            raise BadSlideError(f"cannot open slide {self.path}: {os_reason(exc)}") from None
        else:
            if backend.properties.get("openslide.vendor") != "generic-tiff" or not _deep_tiff(self._file):
                self._backend = backend
                return
            backend.close()  # OpenSlide would keep only the high byte of each sample: decode it ourselves
            w, h = backend.dimensions
            if w * h > MAX_FLAT_PIXELS:
                raise BadSlideError(
                    f"cannot open slide {self.path}: a {w}x{h} px TIFF with more than 8 bits per sample, too large "
                    "to decode whole, and OpenSlide would read only the high byte of each; convert it to 8 bits"
                )
            unsupported = ""
        try:
            self._backend = _ArrayBackend(self._file)
        except NotAnImageError:
            raise BadSlideError(
                f"cannot open slide {self.path}: not a format OpenSlide reads ({unsupported}) nor an image Pillow "
                f"or tifffile can decode"
            ) from None
        except ImageTooLargeError as exc:
            raise BadSlideError(
                f"cannot open slide {self.path}: a flat (non-pyramidal) image of {exc.width}x{exc.height} px, larger "
                f"than the {MAX_FLAT_PIXELS} px limit for flat images; convert it to a pyramidal tiled TIFF"
            ) from None
        except ImageReadError as exc:  # decodable, but not as colour we can trust (float outside [0, 1] ...)
            raise BadSlideError(f"cannot open slide {self.path}: {exc}") from None
        except OSError as exc:
            raise BadSlideError(f"cannot open slide {self.path}: {os_reason(exc)}") from None

    @property
    def is_flat(self) -> bool:
        return isinstance(self._backend, _ArrayBackend)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> "SlideReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SlideReader({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]}, levels={self.level_count}, mpp={self.mpp})"

    # -- reading ---------------------------------------------------------------------------------------------
    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at ``level`` whose top-left is level-0 (x, y); transparent areas are white."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range 0..{self.level_count - 1}")
        if self._backend is None:  # reopened after a failed read (or after close)
            self._open()
        assert self._backend is not None
        try:
            return self._backend.read(int(x), int(y), int(level), int(w), int(h))
        except Exception as exc:
            import openslide

            if isinstance(exc, (openslide.OpenSlideError, OSError)):
                # OpenSlide handles stay in an error state after a failed read: drop it, reopen on next use
                try:
                    self.close()
                except Exception:  # pragma: no cover - closing a broken handle
                    self._backend = None
                raise TileReadError(
                    f"cannot read slide {self.path} at level {level} ({x}, {y}, {w}x{h}): {exc}"
                ) from None
            raise

    def best_level(self, scale: float) -> int:
        """The lowest-resolution level whose downsample is ≤ ``scale`` (level-0 px per output px)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= scale * (1 + SCALE_TOLERANCE):
                best = i
        return best

    def scale_for(self, mpp: float | None, level0_mpp: float | None = None) -> float:
        """Level-0 px per output px at target ``mpp``; snapped to a pyramid level within 2 %.

        ``level0_mpp`` replaces the file's level-0 resolution (the user's ``--slide-mpp``, see
        ``resolution.resolve_resolution``). A slide without either, read at a given ``mpp``, is taken to be
        *at* that mpp at level 0 (scale 1).
        """
        level0 = level0_mpp if level0_mpp is not None else self.mpp
        if mpp is None or level0 is None:
            return 1.0
        s = mpp / level0
        for d in self.level_downsamples:
            if abs(s / d - 1) <= SCALE_TOLERANCE:
                return float(d)
        return float(s)

    def read_scaled(self, x: float, y: float, w: int, h: int, scale: float,
                    fill: tuple[int, int, int] | None = None) -> np.ndarray:
        """RGB uint8 (h, w, 3): the level-0 rectangle at (x, y) of size (w·scale, h·scale), resampled.

        Reads the best pyramid level and resizes with Lanczos (antialiased when shrinking); exact (no
        resampling) when a level's downsample equals ``scale``. With ``fill``, everything outside
        ``bounds`` (beyond the slide, or outside a MIRAX-like scanned region) is that colour *before*
        resampling, the same for OpenSlide and flat images, so an edge tile is the slide padded with it.
        """
        level = self.best_level(scale)
        d = self.level_downsamples[level]
        r = scale / d  # level px per output px
        lx, ly = x / d, y / d
        if abs(r - 1) < 1e-9:
            rx, ry = int(round(lx * d)), int(round(ly * d))
            region = self.read_region(rx, ry, level, w, h)
            return self._fill_outside(region, rx, ry, d, fill) if fill is not None else region
        m = 3 if r > 1 else 2  # margin for the filter support, in level px
        ix0, iy0 = math.floor(lx) - m, math.floor(ly) - m
        ix1, iy1 = math.ceil(lx + w * r) + m, math.ceil(ly + h * r) + m
        rx, ry = int(round(ix0 * d)), int(round(iy0 * d))
        region = self.read_region(rx, ry, level, ix1 - ix0, iy1 - iy0)
        if fill is not None:
            region = self._fill_outside(region, rx, ry, d, fill)
        box = (lx - ix0, ly - iy0, lx - ix0 + w * r, ly - iy0 + h * r)
        out = Image.fromarray(region).resize((w, h), Image.Resampling.LANCZOS, box=box)
        return np.asarray(out)

    def _fill_outside(self, region: np.ndarray, x: int, y: int, d: float, fill: tuple[int, int, int]) -> np.ndarray:
        """``region`` (read at downsample ``d`` from level-0 (x, y)) with its pixels outside ``bounds`` set to ``fill``.

        A pixel is outside when its centre is; the bounds edges are mapped to the level by ``round``.
        """
        bx, by, bw, bh = self.bounds
        h, w = region.shape[:2]
        c0 = min(w, max(0, int(round((bx - x) / d))))
        c1 = min(w, max(0, int(round((bx + bw - x) / d))))
        r0 = min(h, max(0, int(round((by - y) / d))))
        r1 = min(h, max(0, int(round((by + bh - y) / d))))
        if (c0, r0, c1, r1) == (0, 0, w, h):
            return region
        out = np.empty_like(region)
        out[...] = np.asarray(fill, dtype=np.uint8)
        out[r0:r1, c0:c1] = region[r0:r1, c0:c1]
        return out

    def read_tile(self, x: int, y: int, size: int, mpp: float | None,
                  fill: tuple[int, int, int] | None = None) -> np.ndarray:
        """RGB uint8 (size, size, 3) at target ``mpp`` whose top-left is level-0 (x, y); ``fill``: see ``read_scaled``."""
        return self.read_scaled(x, y, size, size, self.scale_for(mpp), fill)

    def read_lowres(self, downsample: float) -> np.ndarray:
        """The whole slide at ``downsample`` level-0 px per pixel, read in bounded chunks (memory ∝ output)."""
        W, H = self.dimensions
        ow, oh = max(1, math.ceil(W / downsample)), max(1, math.ceil(H / downsample))
        level = self.best_level(downsample)
        r = downsample / self.level_downsamples[level]
        step = max(1, int(_CHUNK / r))  # output px per chunk so one read stays ≤ _CHUNK level px
        out = np.full((oh, ow, 3), 255, dtype=np.uint8)
        failed = total = 0
        last: Exception | None = None
        for oy in range(0, oh, step):
            for ox in range(0, ow, step):
                cw, ch = min(step, ow - ox), min(step, oh - oy)
                total += 1
                try:
                    out[oy:oy + ch, ox:ox + cw] = self.read_scaled(ox * downsample, oy * downsample, cw, ch, downsample)
                except TileReadError as exc:
                    failed += 1
                    last = exc
        if failed:
            if failed == total:
                raise BadSlideError(str(last))
            log.warning("%s: %d of %d low-resolution chunks unreadable (left white): %s", self.path, failed, total, last)
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB uint8 image of the whole slide whose long side is ``max_size`` px (or the slide's, if smaller)."""
        W, H = self.dimensions
        ds = max(1.0, max(W, H) / max_size)
        return self.read_lowres(ds)


_CACHE: dict[tuple[int, str], SlideReader] = {}
#: Readers kept open per process; a long-lived cohort worker visiting many slides closes the oldest
#: (a closed reader still works: it reopens its handle on the next read).
CACHE_SIZE = 8


def open_slide(path: str | os.PathLike) -> SlideReader:
    """The reader for ``path`` in this process: opened on first use, then reused.

    Keyed by process id, so a forked DataLoader / pool worker never shares its parent's OpenSlide handle
    (the inherited entry is ignored, not closed: it belongs to the parent).
    """
    key = (os.getpid(), str(Path(path).resolve()))
    r = _CACHE.pop(key, None)
    if r is None:
        for k in [k for k in _CACHE if k[0] != key[0]]:
            del _CACHE[k]  # inherited from a parent process: forget without closing
        r = SlideReader(path)
        while len(_CACHE) >= CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE))).close()
    _CACHE[key] = r  # (re)inserted last: the dict order is least- to most-recently used
    return r
