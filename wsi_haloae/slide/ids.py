"""A slide's id: the short name its outputs and its preview's title carry (``cohort`` files, ``infer`` titles).

Why here: ``infer`` titles a preview with the same id ``cohort`` names the slide's files by, and both
commands import ``slide/``; the id is a function of the path alone, stable between runs (resuming depends
on it) and safe in any file system.
"""

from __future__ import annotations

import re
from pathlib import Path

#: File extensions OpenSlide opens as one slide. DICOM slides are folders of .dcm files (one per level).
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".tif", ".tiff", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm")
MULTI_SUFFIXES = (".ome.tiff", ".ome.tif")
BAD_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def slide_id(path: str | Path) -> str:
    """File name without its slide extension, reduced to characters that are safe in any file system.

    A DICOM slide (a ``.dcm`` file of a folder of them) is named by its folder.
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        path = path.parent
    name = path.name
    low = name.lower()
    for suf in MULTI_SUFFIXES + SLIDE_EXTENSIONS:
        if low.endswith(suf):
            name = name[: -len(suf)]
            break
    return BAD_ID_CHARS.sub("_", name).strip("._") or "slide"
