"""Image files (training tiles, flat slides, test images) decoded to RGB uint8 at their real bit depth.

Why one decoder: train, slide and evaluate read the same kinds of files, and two copies of this code once
scaled 16-bit data differently. Why not Pillow alone: Pillow keeps only the high byte of 16-bit RGB (12-bit
data in 16-bit samples comes out near black, silently) and cannot open float RGB TIFFs. So deep samples
are read at full depth (tifffile for TIFF, imagecodecs' libpng for 16-bit PNG) and scaled here:

- 8-bit: as is;
- 16-bit (any integer wider than 8 bits): by the file's own statement of its range where it has one
  (TIFF MaxSampleValue / SMaxSampleValue, PNG sBIT), else by the data's largest value, rounded up to a
  sensor depth (8, 10, 12, 14 or 16 bits): 12-bit data whose brightest sample is 3012 is divided by 4095;
- float: read as [0, 1]; values outside it (or NaN) are refused, their scale cannot be guessed;
- signed integers, other channel counts: refused.

Every rescale is reported in ``RGBImage.note`` so callers can say so (once per folder, not per tile).
Alpha is composited on white, grey repeated to three channels. Numpy, Pillow, tifffile only: no torch.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

#: File endings read as images (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: Bit depths of real sensors; data in a wider container is scaled by the smallest that holds its maximum.
SENSOR_DEPTHS = (8, 10, 12, 14, 16)
_ROWS = 1024  # rows scaled at a time: a 16384² flat image never needs a float copy of itself


class ImageReadError(ValueError):
    """A file that is not an image we can read faithfully (the message names the reason, not the path)."""


class NotAnImageError(ImageReadError):
    """No decoder recognises the file at all (a text file named .png, a truncated header)."""


class ImageTooLargeError(ImageReadError):
    def __init__(self, width: int, height: int, limit: int):
        super().__init__(f"{width}x{height} px is more than the {limit} px limit")
        self.width, self.height = width, height


@dataclass
class RGBImage:
    pixels: np.ndarray  # (H, W, 3) uint8
    note: str | None = None  # how the samples were brought to 8 bits, when they were not 8-bit


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 of an image file; ``ImageReadError`` (a ValueError) or OSError when unreadable."""
    return read_image(path).pixels


def read_image(path: str | Path, max_pixels: int | None = None) -> RGBImage:
    """Decode ``path`` (PNG, JPEG, TIFF ...) to RGB uint8, scaling deep samples (see the module docstring).

    ``max_pixels``: refuse larger images from their header, before decoding (``ImageTooLargeError``).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    is_tiff = head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    if is_tiff:
        deep = _tiff_deep(path, max_pixels)
        if deep is not None:
            return to_rgb8(*deep)
    elif head == b"\x89PNG\r\n\x1a\n":
        depth, sbit = _png_depth(path)
        if depth == 16:
            return _png16(path, sbit, max_pixels)
    try:
        return _pillow(path, max_pixels)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, EOFError, ValueError) as exc:
        if not is_tiff:  # e.g. a truncated PNG, a text file named .jpg
            raise NotAnImageError(f"not a readable image ({exc})") from None
        pillow_error = exc
    try:  # tiled or otherwise unusual 8-bit TIFFs that Pillow does not decode
        return to_rgb8(*_tiff_any(path, max_pixels))
    except ImageReadError:
        raise
    except Exception as exc:
        raise NotAnImageError(f"neither Pillow ({pillow_error}) nor tifffile ({exc}) can decode it") from None


def resize_rgb(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize to size×size with an anti-aliased bilinear filter (tiles of another size or shape are squashed)."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))


def composite_white(rgba: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 grey, grey+alpha, RGB or RGBA (not premultiplied, as OpenSlide returns it) → RGB uint8 on white."""
    a = np.asarray(rgba)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=2).astype(np.uint8)
    if a.shape[2] == 3:
        return np.ascontiguousarray(a, dtype=np.uint8)
    if a.shape[2] == 4:
        alpha = a[..., 3:4]
        if alpha.min() == 255:
            return np.ascontiguousarray(a[..., :3])
        rgb = a[..., :3].astype(np.uint16)
        al = alpha.astype(np.uint16)
        return ((rgb * al + 255 * (255 - al) + 127) // 255).astype(np.uint8)
    if a.shape[2] == 2:  # grey + alpha
        return composite_white(np.concatenate([np.repeat(a[..., :1], 3, axis=2), a[..., 1:]], axis=2))
    if a.shape[2] == 1:
        return composite_white(a[..., 0])
    raise ImageReadError(f"{a.shape[2]} samples per pixel (expected grey, RGB, with or without alpha)")


def warn_rescaled(where: str | Path, notes: Sequence[tuple[Path, str]], total: int) -> None:
    """One warning for the images of a folder that were not 8-bit (per-image warnings would flood the log)."""
    if not notes:
        return
    kinds = len({n for _, n in notes})
    log.warning("%s: %d of %d image(s) were not 8-bit and were rescaled%s; first: %s: %s", where, len(notes), total,
                f" in {kinds} different ways (check they belong together)" if kinds > 1 else "", notes[0][0], notes[0][1])


# ------------------------------------------------------------------------------------------- deep samples
def to_rgb8(arr: np.ndarray, stated_max: float | None = None, stated_by: str = "") -> RGBImage:
    """Any grey/RGB(A) sample array (HW, HWC or CHW) → RGB uint8, scaled as the module docstring says."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] in (1, 2, 3, 4) and a.shape[2] not in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (separate) samples
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 2, 3, 4)):
        raise ImageReadError(f"unsupported sample layout {a.shape} (expected grey or RGB, with or without alpha)")
    if a.dtype == np.uint8:
        return RGBImage(composite_white(a))
    if a.dtype == bool:
        return RGBImage(composite_white(a.astype(np.uint8) * 255))
    if a.size == 0:
        raise ImageReadError("an empty image")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageReadError("NaN or infinite float samples: not an image of colours")
        lo, hi = float(np.min(a)), float(np.max(a))
        if lo < 0 or hi > 1:
            raise ImageReadError(f"float samples from {lo:g} to {hi:g}, outside [0, 1]: their scale cannot be told; "
                                 "save the image with 8- or 16-bit integer samples")
        return RGBImage(_scaled(a, 1.0), "float samples read as [0, 1]")
    if not np.issubdtype(a.dtype, np.integer):
        raise ImageReadError(f"unsupported sample type {a.dtype}")
    lo, hi = int(np.min(a)), int(np.max(a))
    if lo < 0:
        raise ImageReadError(f"signed samples (down to {lo}): save the image with unsigned samples")
    container = 8 * a.dtype.itemsize
    if stated_max is not None and stated_max >= max(hi, 1):
        full, why = float(stated_max), f"maximum {stated_max:g}, from the file's {stated_by}"
    else:
        ignored = f"; its {stated_by} says {stated_max:g}, less than the data" if stated_max is not None else ""
        bits = next((b for b in SENSOR_DEPTHS if hi < (1 << b)), max(hi.bit_length(), 1))
        full, why = float((1 << bits) - 1), f"the data's largest value is {hi}: read as {bits}-bit{ignored}"
    return RGBImage(_scaled(a, full), f"{container}-bit samples scaled by {full:g} ({why})")


def _scaled(a: np.ndarray, full: float) -> np.ndarray:
    """``a / full`` to uint8 (rounded), alpha composited on white, in row blocks to bound the float copy."""
    out = np.empty(a.shape[:2] + (3,), np.uint8)
    for r in range(0, a.shape[0], _ROWS):
        block = np.clip(np.rint(a[r:r + _ROWS].astype(np.float32) * np.float32(255.0 / full)), 0, 255).astype(np.uint8)
        out[r:r + _ROWS] = composite_white(block)
    return out


def _check_size(w: int, h: int, max_pixels: int | None) -> None:
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(int(w), int(h), max_pixels)


def _tiff_page(tf):
    page = tf.pages[0]
    return page, int(page.imagewidth), int(page.imagelength)


def _tiff_deep(path: Path, max_pixels: int | None) -> tuple[np.ndarray, float | None, str] | None:
    """The first page of a TIFF with deep (> 8-bit or float) samples, with its stated maximum.

    None when its samples are 8-bit or fewer (Pillow decodes those) or tifffile cannot parse it at all.
    """
    import tifffile

    try:
        tf = tifffile.TiffFile(path)
    except Exception:
        return None
    with tf:
        page, w, h = _tiff_page(tf)
        bits = page.bitspersample
        if bits <= 8 and page.sampleformat != 3:
            return None
        _check_size(w, h, max_pixels)
        stated, by = None, ""
        for code, name in ((341, "SMaxSampleValue tag"), (281, "MaxSampleValue tag")):
            tag = page.tags.get(code)
            if tag is not None and page.sampleformat == 1:
                v = tag.value
                stated, by = float(max(v) if isinstance(v, (tuple, list)) else v), name
                break
        try:
            return page.asarray(), stated, by
        except Exception as exc:  # Pillow would read it as the high byte only: refuse rather than guess
            raise ImageReadError(f"a TIFF of {bits}-bit samples that tifffile cannot decode ({exc})") from None


def _tiff_any(path: Path, max_pixels: int | None) -> tuple[np.ndarray, None, str]:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page, w, h = _tiff_page(tf)
        _check_size(w, h, max_pixels)
        return page.asarray(), None, ""


def _png_depth(path: Path) -> tuple[int, int | None]:
    """(bit depth, significant bits from sBIT or None) from a PNG's chunks before its image data.

    Hand-written because Pillow does not expose sBIT and the chunk walk is a dozen lines of the PNG spec.
    """
    depth, colour, sbit = 8, 2, None
    with open(path, "rb") as fh:
        fh.seek(8)
        for _ in range(64):  # sBIT must come before IDAT; a few ancillary chunks at most
            head = fh.read(8)
            if len(head) < 8:
                break
            n, kind = struct.unpack(">I4s", head)
            if kind == b"IDAT" or n > 1 << 24:
                break
            data = fh.read(n)
            fh.seek(4, 1)  # CRC
            if kind == b"IHDR" and len(data) >= 10:
                depth, colour = data[8], data[9]
            elif kind == b"sBIT" and data:
                channels = data[:3] if colour in (2, 3, 6) else data[:1]  # colour samples, not alpha
                sbit = max(channels)
    return depth, sbit


def _png16(path: Path, sbit: int | None, max_pixels: int | None) -> RGBImage:
    import imagecodecs

    with Image.open(path) as im:  # the size from the header, before decoding
        _check_size(*im.size, max_pixels)
    try:
        arr = imagecodecs.png_decode(path.read_bytes())
    except Exception as exc:
        raise ImageReadError(f"not a readable 16-bit PNG ({exc})") from None
    stated = float((1 << sbit) - 1) if sbit and 0 < sbit < 16 else None
    return to_rgb8(arr, stated, "sBIT chunk")


def _pillow(path: Path, max_pixels: int | None) -> RGBImage:
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # max_pixels is the limit here
    try:
        with Image.open(path) as im:
            _check_size(*im.size, max_pixels)
            im.draft("RGB", im.size)  # JPEG: decode straight to RGB
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # deep grey (PGM, 32-bit TIFF ...)
                return to_rgb8(np.asarray(im))
            if im.mode not in ("RGB", "RGBA", "L", "LA"):
                im = im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB")
            return RGBImage(composite_white(np.asarray(im)))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
