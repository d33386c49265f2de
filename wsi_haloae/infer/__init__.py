"""Whole-slide inference and its outputs (``wsi-haloae infer``).

``engine.run_infer`` (torch; imported on demand) reads a slide in DataLoader workers, runs the model on the
device and hands maps to ``writers`` (OME-NGFF zarr store); the other outputs (OME-TIFF, GeoJSON, preview)
are written from the finished store through the registry in ``outputs``. ``is_complete`` and ``read_attrs``
need neither torch nor a slide; they are loaded on first use, so that the CLI can read the registry at
start-up without importing numpy.
"""

from __future__ import annotations

__all__ = ["is_complete", "read_attrs"]


def __getattr__(name: str):
    if name in __all__:
        from . import writers

        return getattr(writers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
