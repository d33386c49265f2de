"""Safe file output shared by every command: atomic writes, output-vs-input guards, one writer per output.

A killed or failed write must never leave a complete-looking file under its final name: outputs are written
to a temp name beside the final one (same folder, so the rename is atomic) and renamed only once whole.
An output must never overwrite or delete an input (a slide, a model, a tile folder), and two runs must never
write the same output at once: ``guard_outputs`` and ``output_lock`` check both before any work starts.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError


def temp_name(path: Path) -> Path:
    """The temp name of ``path`` for this process: ``.NAME.PID.part`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.part")


def partial_name(path: Path) -> Path:
    """The temp name of an output written under its ``output_lock``: ``.NAME.partial.EXT`` beside it.

    Fixed rather than per process: the lock already keeps a second run away, and a fixed name lets the next
    run find and remove what a killed run left (a half-written store can be gigabytes). It ends with the
    output's extension, for writers that choose a format by it (``.geojson.gz`` is gzipped).
    """
    path = Path(path)
    return path.with_name(f".{path.name}.partial{path.suffix}")


def remove_path(path: Path) -> None:
    """Remove a file or folder if it is there; never raises (it runs while another error is reported)."""
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            # zarr 3 writes a store's keys from worker threads; when one write fails, others of the same call
            # may still land after the error reached us and re-create the folder: remove until it stays gone
            for _ in range(20):
                shutil.rmtree(path, ignore_errors=True)
                time.sleep(0.05)
                if not path.exists():
                    break
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def publish(moves: Sequence[tuple[Path, Path]]) -> None:
    """Rename each finished temp onto its final path, in order, all or none.

    For outputs that only make sense together (a store and the files made from it): each existing final
    path (file or folder) is first moved aside to ``.NAME.old``; if any rename fails, the new ones are
    removed and the old ones put back, so the finals are as before; the old ones are removed only once
    every rename succeeded. Temps get the user's umask permissions. Raises the OSError.
    """
    done: list[tuple[Path, Path | None]] = []
    try:
        for tmp, final in moves:
            tmp, final = Path(tmp), Path(final)
            if tmp.is_file():
                os.chmod(tmp, _default_mode())
            old = None
            if final.exists() or final.is_symlink():
                old = final.with_name(f".{final.name}.old")
                remove_path(old)
                os.rename(final, old)
            done.append((final, old))
            os.rename(tmp, final)
    except OSError:
        for final, old in reversed(done):
            remove_path(final)
            if old is not None:
                try:
                    os.rename(old, final)
                except OSError:
                    pass
        raise
    for _, old in done:
        if old is not None:
            remove_path(old)


def os_reason(exc: BaseException) -> str:
    """The reason of an OSError as a user reads it: ``No space left on device``, ``Permission denied``."""
    if isinstance(exc, OSError):
        return exc.strerror or (os.strerror(exc.errno) if exc.errno else "") or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def write_error(path: Path, what: str, exc: BaseException) -> OutputError:
    """One-line ``OutputError`` for a failed write: ``PATH: cannot write WHAT (No space left on device)``."""
    return OutputError(f"{path}: cannot write {what} ({os_reason(exc)})")


def _default_mode() -> int:
    """0o666 minus the process umask: what ``open()`` gives a new file (umask read without a race-prone set)."""
    try:  # Linux exposes the umask without changing it
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_output(path: Path, what: str | None = None) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces ``path``, on any failure it is removed.

    The file gets the user's umask permissions (some writers create files 0600). With ``what`` given, an
    OSError while writing (a full disk) becomes one-line ``OutputError`` naming ``path``.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        try:
            yield tmp
            if tmp.exists():
                os.chmod(tmp, _default_mode())
            os.replace(tmp, path)
        except OSError as exc:
            if what is None:
                raise
            raise write_error(path, what, exc) from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def write_text_atomic(path: Path, text: str, what: str | None = None) -> None:
    with atomic_output(path, what) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------- inputs vs outputs
def _resolved(p: Path) -> Path:
    return Path(os.path.abspath(Path(p).expanduser())).resolve(strict=False)


def _file_id(p: Path) -> tuple[int, int] | None:
    """(device, inode) of an existing file (symlinks followed): equal ids are one file, hard links included."""
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def guard_outputs(outputs: Mapping[str, Path | None], inputs: Mapping[str, Path | None]) -> None:
    """Refuse, before any work, outputs that would overwrite, delete or hide an input or each other.

    ``outputs``/``inputs`` map a label the user recognises (``--tiff``, ``slide``) to a path; ``None`` entries
    are ignored. An output may not be an input (same path, a symlink to it, or a hard link of it), lie inside
    an input folder, or be a folder (a Zarr store, a tile folder) that holds an input. Outputs must differ and
    not nest. Raises one-line ``OutputError``. Lookups go through dicts, not pairs, so a cohort's thousands of
    outputs against its thousands of slides cost milliseconds.
    """
    outs = [(k, Path(p), _resolved(p)) for k, p in outputs.items() if p is not None]
    ins = [(k, Path(p), _resolved(p)) for k, p in inputs.items() if p is not None]
    in_path = {r: (k, p) for k, p, r in ins}
    in_file = {fid: (k, p) for k, p, _ in ins if (fid := _file_id(p)) is not None}
    in_holders: dict[Path, tuple[str, Path]] = {}  # every folder above an input
    for k, p, r in ins:
        for parent in r.parents:
            in_holders.setdefault(parent, (k, p))
    out_path: dict[Path, tuple[str, Path]] = {}
    out_file: dict[tuple[int, int], tuple[str, Path]] = {}
    for olabel, opath, o in outs:
        fid = _file_id(opath)
        hit = in_path.get(o) or (in_file.get(fid) if fid is not None else None)
        if hit:
            raise OutputError(f"{opath}: {olabel} would overwrite the {hit[0]} {hit[1]}; choose another path")
        for parent in o.parents:
            if parent in in_path:
                ilabel, ipath = in_path[parent]
                raise OutputError(f"{opath}: {olabel} lies inside the {ilabel} {ipath}; choose a path outside it")
        if o in in_holders:
            ilabel, ipath = in_holders[o]
            raise OutputError(f"{opath}: {olabel} would replace a folder that holds the {ilabel} {ipath}; "
                              "choose another path")
        same = out_path.get(o) or (out_file.get(fid) if fid is not None else None)
        if same:
            raise OutputError(f"{same[1]}: {same[0]} and {olabel} are the same path; give each output its own")
        out_path[o] = (olabel, opath)
        if fid is not None:
            out_file[fid] = (olabel, opath)
    for _, opath, o in outs:
        for parent in o.parents:
            if parent in out_path:
                raise OutputError(f"{opath}: an output inside another output {out_path[parent][1]}; "
                                  "give each output its own path")


# ------------------------------------------------------------------------------------------ one writer
def lock_name(path: Path) -> Path:
    """The lock file of an output: ``.NAME.lock`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextmanager
def output_lock(path: Path, what: str = "output") -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` for the ``with`` block; a second run on it is refused at once.

    The lock is ``flock`` on ``.NAME.lock`` beside the output (released by the kernel when the process dies,
    so a killed run never leaves a stale lock). The file is removed on release; an acquirer that locked a file
    which was removed meanwhile retries on the new one, so two runs can never both hold the lock.
    """
    path = Path(path)
    lock = lock_name(path)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(path, what, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{path}: another wsi-haloae run is writing this {what} (lock {lock}); wait for it "
                                  "to finish or choose another output") from None
            raise write_error(path, what, exc) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed this file after we opened it: lock the new one
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # the pid is for people reading the folder; the lock does not depend on it
    try:
        yield lock
    finally:
        try:
            lock.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)
