"""Whole-slide inference and its outputs (``wsi-haloae infer``).

``engine.run_infer`` (torch; imported on demand) reads a slide in DataLoader workers, runs the model on the
device and hands maps to ``writers`` (OME-NGFF zarr store), ``ome_tiff``, ``geojson`` and ``preview``.
The light helpers below need neither torch nor a slide.
"""

from __future__ import annotations

from .writers import is_complete, read_attrs

__all__ = ["is_complete", "read_attrs"]
