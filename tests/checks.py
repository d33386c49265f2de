"""Checks of how a command fails (issue 13): one line, exit 2, inputs untouched; and a full disk on demand.

``one_line_error(result, *fragments)``: a click result that ended in exactly one ``error: ...`` line (the
last on stderr), exit 2, no traceback, nothing on stdout. ``sha256(path)``: to prove an input byte-identical.

A full disk without root: ``full_disk(doomed, room)`` wraps Python's ``open`` so that files whose path
``doomed`` accepts share ``room`` bytes, after which a write raises ``OSError(ENOSPC)`` as the kernel does
(``full_disk_at(fragment)`` for paths containing ``fragment``; ``restore()`` undoes it). Every writer the
commands use goes through ``open``: zarr's store (``Path.open``), tifffile, Pillow's ``Image.save``,
matplotlib, gzip, csv, json, the model file. ``fill_disk_at(monkeypatch, match, nth)``: the ``nth`` file
opened for writing whose name contains ``match`` writes half its data and raises.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import os
from pathlib import Path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line_error(res, *fragments: str) -> str:
    """The error line of a failed click run, checked to be the only one and the last; contains ``fragments``."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [line for line in res.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and res.stderr.endswith(lines[0] + "\n"), res.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in res.output and res.stdout == "", res.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


class Disk:
    """A disk that fills up: files opened for writing whose path ``doomed(path)`` accepts share ``room`` bytes;
    a write past it writes what still fits (``half``: half of what it is given, as when the disk fills
    mid-write) and raises ``OSError(ENOSPC)``. ``hits``: the files whose write failed."""

    def __init__(self, doomed, room: int = 0, half: bool = False, modes: str = "wax+"):
        self.doomed, self.room, self.half, self.modes = doomed, room, half, modes
        self.hits: list[str] = []

    def open(self, file, mode="r", *args, **kwargs):
        f = _REAL_OPEN(file, mode, *args, **kwargs)
        path = os.fsdecode(file) if isinstance(file, (str, bytes, os.PathLike)) else ""
        if path and any(c in mode for c in self.modes) and self.doomed(path):
            return _FullFile(f, path, self)
        return f

    def write(self, f, path: str, data):
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if n <= self.room:
            self.room -= n
            return f.write(data)
        fits = max(1, n // 2) if self.half else self.room
        if fits:
            f.write(data[:fits])
            f.flush()
        self.room = 0
        self.hits.append(path)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


_REAL_OPEN = io.open


class _FullFile:
    """A real file object whose writes draw on the disk's room; everything else is the file's own."""

    def __init__(self, f, path: str, disk: Disk):
        object.__setattr__(self, "_f", f)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_disk", disk)

    def write(self, data):
        return self._disk.write(self._f, self._path, data)

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


def full_disk(doomed, room: int = 0, half: bool = False, modes: str = "wax+", monkeypatch=None) -> Disk:
    """Install a ``Disk`` for this process: it wraps Python's ``open`` (``builtins.open`` and ``io.open``, which
    ``pathlib`` uses), so zarr's store, tifffile, Pillow, matplotlib, gzip, csv and json writes all meet it;
    reads are untouched. With ``monkeypatch`` it is undone with the test; else call ``restore()``. Works in a
    subprocess too: ``python -c "import checks; checks.full_disk_at('p.png'); from wsi_haloae.cli import main;
    main()" ...``."""
    disk = Disk(doomed, room, half, modes)
    for mod in (builtins, io):
        if monkeypatch is not None:
            monkeypatch.setattr(mod, "open", disk.open)
        else:
            mod.open = disk.open
    return disk


def full_disk_at(fragment: str, room: int = 0) -> Disk:
    """``full_disk`` for the files whose path contains ``fragment`` (undo with ``restore()``)."""
    return full_disk(lambda p: fragment in p, room)


def restore() -> None:
    builtins.open = _REAL_OPEN
    io.open = _REAL_OPEN


def fill_disk_at(monkeypatch, match: str, nth: int = 1) -> dict:
    """The ``nth`` file opened for writing whose name contains ``match`` gets half its first write, then
    ``OSError(ENOSPC)``. Returns a dict counting the matching opens (``hits``)."""
    state = {"hits": 0}

    def due(path: str) -> bool:
        if match not in Path(path).name:
            return False
        state["hits"] += 1
        return state["hits"] == nth

    full_disk(due, half=True, modes="w", monkeypatch=monkeypatch)
    return state
