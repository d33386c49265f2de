"""Turn the SLIDES argument (CSV manifest, folder or glob) into a list of slides with unique output ids.

The id names every output file (DIR/<id>.zarr, ...), so it must be stable between runs (resuming depends on
it) and unique within a cohort; paths are made absolute because workers may run in another directory.
"""

from __future__ import annotations

import csv
import glob
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError
from ..slide.ids import BAD_ID_CHARS as _BAD_ID_CHARS
from ..slide.ids import SLIDE_EXTENSIONS, slide_id

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class SlideEntry:
    """One slide of the cohort: output id, absolute path, and optional per-slide resolutions (manifest): the
    target ``mpp`` and the scan's level-0 ``slide_mpp`` (for slides that do not record it)."""

    id: str
    path: Path
    mpp: float | None = None
    slide_mpp: float | None = None


def _is_slide_file(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(SLIDE_EXTENSIONS) and not p.name.startswith(".")


def _dicom_folder(p: Path) -> Path | None:
    """A folder of DICOM WSI files opens through any one of its .dcm files."""
    dcm = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() == ".dcm")
    return dcm[0] if dcm else None


def _unique(paths: list[Path]) -> list[SlideEntry]:
    """Ids from file names; a clash (a/x.svs, b/x.svs) gets a -2, -3 suffix in sorted-path order (stable)."""
    out: list[SlideEntry] = []
    seen: dict[str, int] = {}
    for p in sorted(paths):
        sid = slide_id(p.parent if p.suffix.lower() == ".dcm" else p)
        n = seen.get(sid.lower(), 0) + 1
        seen[sid.lower()] = n
        out.append(SlideEntry(sid if n == 1 else f"{sid}-{n}", p))
    return out


def _from_folder(folder: Path) -> list[SlideEntry]:
    """Slide files directly in the folder, plus sub-folders holding a DICOM slide (not recursive otherwise)."""
    paths: list[Path] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            dcm = _dicom_folder(p)
            if dcm is not None:
                paths.append(dcm.resolve())
        elif _is_slide_file(p) and p.suffix.lower() != ".dcm":
            paths.append(p.resolve())
    # a folder that is itself one DICOM slide
    if not paths:
        dcm = _dicom_folder(folder)
        if dcm is not None:
            paths.append(dcm.resolve())
    return _unique(paths)


def _from_glob(pattern: str) -> list[SlideEntry]:
    """Every file the pattern matches (the user chose them: no extension filter); ** recurses."""
    paths = [Path(p).resolve() for p in glob.glob(pattern, recursive=True)]
    files = [p for p in paths if p.is_file()]
    for d in (p for p in paths if p.is_dir()):
        dcm = _dicom_folder(d)
        if dcm is not None:
            files.append(dcm)
    return _unique(files)


def _from_manifest(path: Path) -> list[SlideEntry]:
    """CSV with a `slide` column (paths relative to the manifest's folder), optional `id`, `mpp`, `slide_mpp`."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read manifest ({exc})") from None
    rows = list(csv.DictReader(text.splitlines()))
    header = [h.strip().lower() for h in (csv.DictReader(text.splitlines()).fieldnames or [])]
    if "slide" not in header:
        raise BadInputError(f"{path}: manifest has no 'slide' column (columns: {', '.join(header) or 'none'})")
    base = path.resolve().parent
    entries: list[SlideEntry] = []
    ids: dict[str, int] = {}
    for lineno, raw in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not row.get("slide"):
            if not any(row.values()):
                continue  # blank line
            raise BadInputError(f"{path}:{lineno}: empty 'slide' value")
        p = Path(row["slide"]).expanduser()
        p = (p if p.is_absolute() else base / p).resolve()
        if p.is_dir():
            p = _dicom_folder(p) or p
        sid = row.get("id") or slide_id(p.parent if p.suffix.lower() == ".dcm" else p)
        if _BAD_ID_CHARS.search(sid) or sid.startswith("."):
            raise BadInputError(f"{path}:{lineno}: id {sid!r} may only hold letters, digits, '.', '_', '-'")
        if sid.lower() in ids:
            raise BadInputError(f"{path}:{lineno}: id {sid!r} already used on line {ids[sid.lower()]}; ids must be unique")
        ids[sid.lower()] = lineno
        mpp, slide_mpp = (_positive(path, lineno, row, col) for col in ("mpp", "slide_mpp"))
        entries.append(SlideEntry(sid, p, mpp, slide_mpp))
    return entries


def _positive(path: Path, lineno: int, row: dict[str, str], col: str) -> float | None:
    """The manifest's ``col`` value on this row: None when empty, else a positive number."""
    if not row.get(col):
        return None
    try:
        v = float(row[col])
    except ValueError:
        v = -1.0
    if not (v > 0 and v != float("inf")):
        raise BadInputError(f"{path}:{lineno}: {col} {row[col]!r} is not a positive number")
    return v


def collect_slides(spec: str) -> list[SlideEntry]:
    """Resolve SLIDES: an existing .csv file is a manifest, a folder is scanned, anything else is a glob."""
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() == ".csv":
        entries = _from_manifest(p)
        what = "manifest"
    elif p.is_dir():
        entries = _from_folder(p)
        what = "folder"
    elif p.is_file():
        entries = _unique([p.resolve()])
        what = "file"
    elif _GLOB_CHARS.search(spec):
        entries = _from_glob(str(p))
        what = "pattern"
    else:
        raise BadInputError(f"{spec}: no such manifest, folder or file")
    if not entries:
        hint = f" (looked for {' '.join(SLIDE_EXTENSIONS)})" if what == "folder" else ""
        raise BadInputError(f"{spec}: {what} holds no slides{hint}")
    return entries
