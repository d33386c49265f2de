"""Checks of how a command fails (issue 13): one line, exit 2, inputs untouched; and a full disk on demand.

``one_line_error(result, *fragments)``: a click result that ended in exactly one ``error: ...`` line (the
last on stderr), exit 2, no traceback, nothing on stdout. ``sha256(path)``: to prove an input byte-identical.

``fill_disk_at(monkeypatch, match, nth)`` makes the ``nth`` write whose target file name contains ``match``
write half its data and raise ``OSError(ENOSPC)``, as the kernel does when the disk fills mid-write. It
covers the writers the commands use: Pillow's ``Image.save``, ``Path.open`` for writing (``write_text``,
csv) and ``open(..., "wb")`` inside ``wsi_haloae.model.checkpoint``. Returns a dict counting the matches.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

from PIL import Image


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


def fill_disk_at(monkeypatch, match: str, nth: int = 1) -> dict:
    state = {"hits": 0}

    def due(path) -> bool:
        if match not in Path(str(path)).name:
            return False
        state["hits"] += 1
        return state["hits"] == nth

    def fail(path, data: bytes):
        with open(path, "wb") as fh:  # part of the bytes reach the disk, then it is full
            fh.write(data[: max(1, len(data) // 2)])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    real_save = Image.Image.save

    def save(self, fp, *a, **kw):
        if isinstance(fp, (str, os.PathLike)) and due(fp):
            fail(fp, b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        return real_save(self, fp, *a, **kw)

    class _File:
        """A binary file whose write hits the full disk."""

        def __init__(self, path, mode, **kw):
            self.path, self.fh = path, open(path, mode, **kw)

        def write(self, data):
            self.fh.write(data[: max(1, len(data) // 2)])
            self.fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def checkpoint_open(path, mode="r", *a, **kw):
        if "w" in mode and due(path):
            return _File(path, mode)
        return open(path, mode, *a, **kw)

    real_path_open = Path.open

    def path_open(self, mode="r", *a, **kw):
        if "w" in mode and due(self):
            return _File(self, mode, **kw)
        return real_path_open(self, mode, *a, **kw)

    from wsi_haloae.model import checkpoint

    monkeypatch.setattr(Image.Image, "save", save)
    monkeypatch.setattr(Path, "open", path_open)
    monkeypatch.setattr(checkpoint, "open", checkpoint_open, raising=False)
    return state
