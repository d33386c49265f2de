"""A disk that fills up at a chosen write, for tests that must not need root or a real small file system.

``disk_full(match)`` wraps Python's ``open`` (``builtins.open`` and ``io.open``, which ``pathlib`` uses, so
zarr's store, tifffile, Pillow/matplotlib, gzip and json writes all go through it): once a file opened for
writing whose path satisfies ``match`` has been written ``after_bytes`` bytes in total, every further write to
such a file raises ``OSError(ENOSPC)``, as a full disk does. Reads are untouched. Usable in a subprocess too:
``python -c "import faults; faults.disk_full_at('p.png'); from wsi_haloae.cli import main; main()" ...``.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from collections.abc import Callable

_REAL_OPEN = io.open


class _FullDisk:
    def __init__(self, match: Callable[[str], bool], after_bytes: int):
        self.match = match
        self.left = after_bytes
        self.hits: list[str] = []  # paths whose write failed

    def spend(self, path: str, n: int) -> None:
        if n <= 0:
            return
        if self.left < n:
            self.left = 0
            self.hits.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        self.left -= n


class _File:
    """A file object whose writes draw on the disk's remaining bytes; everything else is the real file's."""

    def __init__(self, f, path: str, disk: _FullDisk):
        object.__setattr__(self, "_f", f)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_disk", disk)

    def write(self, data):
        self._disk.spend(self._path, len(data) if not isinstance(data, memoryview) else data.nbytes)
        return self._f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __setattr__(self, name, value):
        setattr(self._f, name, value)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def disk_full(match: Callable[[str], bool], after_bytes: int = 0) -> _FullDisk:
    """Install the fault for this process (undo with ``restore()``); returns the disk (``.hits``)."""
    disk = _FullDisk(match, after_bytes)

    def fake_open(file, mode="r", *args, **kwargs):
        f = _REAL_OPEN(file, mode, *args, **kwargs)
        path = os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else ""
        if path and any(c in mode for c in "wax+") and disk.match(path):
            return _File(f, path, disk)
        return f

    builtins.open = fake_open
    io.open = fake_open
    return disk


def disk_full_at(fragment: str, after_bytes: int = 0) -> _FullDisk:
    """``disk_full`` for files whose path contains ``fragment``."""
    return disk_full(lambda p: fragment in p, after_bytes)


def restore() -> None:
    builtins.open = _REAL_OPEN
    io.open = _REAL_OPEN
