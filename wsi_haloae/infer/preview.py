"""A PNG preview: the slide thumbnail with the heatmap overlaid and a colour bar.

Uses matplotlib's object API (Figure + Agg canvas), not pyplot, so it holds no global state and is safe in
worker threads. Both images are placed by their extent in level-0 slide pixels, so the heatmap (which
covers the OpenSlide bounds region) lands where it belongs on the whole-slide thumbnail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import atomic_output
from .ome_tiff import CMAP


def write_preview(path: str | Path, thumbnail: np.ndarray, slide_size: tuple[int, int], heat: np.ndarray,
                  heat_extent: tuple[float, float, float, float], *, vmin: float, vmax: float,
                  title: str = "", alpha: float = 0.6, dpi: int = 100) -> Path:
    """``heat_extent`` = (x0, y0, x1, y1) of ``heat`` in level-0 pixels; ``slide_size`` = (width, height).

    Atomic (``fileio.atomic_output``): a failed write leaves nothing at ``path``.
    An OSError (a full disk) propagates; infer turns it into one line naming the output.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    W, H = slide_size
    th, tw = thumbnail.shape[:2]
    fig_w = max(4.0, tw / dpi + 1.6)
    fig_h = max(3.0, th / dpi + 0.6)
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.02, 0.96 * (tw / dpi) / fig_w, 0.92 * (th / dpi) / fig_h))
    ax.imshow(thumbnail, extent=(0, W, H, 0), interpolation="antialiased")
    x0, y0, x1, y1 = heat_extent
    masked = np.ma.masked_invalid(heat)
    im = ax.imshow(masked, extent=(x0, x1, y1, y0), cmap=CMAP, vmin=vmin, vmax=max(vmax, vmin + 1e-12),
                   alpha=alpha, interpolation="nearest")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    cax = fig.add_axes((0.04 + 0.96 * (tw / dpi) / fig_w, 0.1, 0.025, 0.8))
    cb = fig.colorbar(im, cax=cax)
    cb.solids.set_alpha(1.0)
    cb.set_label("anomaly score")
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
