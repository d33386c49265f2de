"""Atomic file output shared by every command.

A killed or failed write must never leave a complete-looking file under its final name: outputs are written
to a temp name beside the final one (same folder, so the rename is atomic) and renamed only once whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_name(path: Path) -> Path:
    """The temp name of ``path`` for this process: ``.NAME.PID.part`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.part")


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path``, on any failure it is removed."""
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
