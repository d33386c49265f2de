"""A PNG preview a pathologist can read: the bare slide beside the slide with its anomaly heat.

What it shows and why:
- two panels of the same thumbnail: left the bare H&E, right the heat over it, so the tissue is always
  readable (side by side for portrait slides, one above the other for landscape ones);
- the heat's opacity follows the score (0 at the bottom of the display range, ``MAX_ALPHA`` at its top), so
  normal tissue keeps its own colours and only high scores cover it; off tissue the map is NaN and nothing
  is drawn;
- Anomalous tiles outlined (the outline of their union, so a region of many tiles reads as one shape);
- a colour bar over the caller's fixed display range (the model's, so two slides' previews compare), drawn
  as the colours look over white at the opacity used;
- the slide's id as the title.

Matplotlib's object API (Figure + Agg canvas), not pyplot: no global state, safe in worker threads. Images
are placed by their extent in level-0 slide pixels, so the heatmap (which covers the OpenSlide bounds
region) lands where it belongs on the whole-slide thumbnail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fileio import atomic_output
from .geojson import CLASS_COLOR

#: Colour map of the heat. Viridis rather than the RGB TIFF's inferno: over H&E, inferno's reds and pinks
#: read as eosin and its white-yellow top hides the tissue under it, while viridis' greens and yellow are
#: complementary to H&E and its dark low end vanishes at the low opacity of low scores (compared by eye on
#: CMU-1-Small-Region with inferno, turbo, viridis and YlOrRd). Perceptually uniform and colour-blind safe.
CMAP = "viridis"
#: Opacity of the heat at the top of the display range (the H&E stays faintly visible even there).
MAX_ALPHA = 0.8
#: Outline colour of Anomalous tiles: QuPath's class colour in our GeoJSON (crimson; absent from viridis).
OUTLINE = "#%02x%02x%02x" % CLASS_COLOR
#: Layout in figure pixels at ``dpi``.
_MARGIN, _GAP, _TITLE, _SUBTITLE, _LABEL, _BAR = 12, 16, 30, 20, 18, 90


def heat_rgba(heat: np.ndarray, vmin: float, vmax: float, cmap: str = CMAP) -> np.ndarray:
    """(h, w, 4) float RGBA: the colour map over [vmin, vmax], opacity rising with the score, NaN transparent."""
    from matplotlib import colormaps

    span = max(vmax - vmin, 1e-12)
    t = np.clip((np.asarray(heat, np.float64) - vmin) / span, 0, 1)
    finite = np.isfinite(heat)
    t = np.where(finite, t, 0)
    rgba = colormaps[cmap](t)
    rgba[..., 3] = np.where(finite, MAX_ALPHA * t, 0.0)
    return rgba


def _bar_colours(cmap: str = CMAP, n: int = 256):
    """The colour bar: each colour as it looks at its opacity over white."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    t = np.linspace(0, 1, n)
    c = colormaps[cmap](t)[:, :3]
    a = (MAX_ALPHA * t)[:, None]
    return ListedColormap(a * c + (1 - a) * 1.0)


def _outline_paths(boxes: np.ndarray, raster_scale: float, shape: tuple[int, int]) -> list[np.ndarray]:
    """Outlines (level-0 x, y) of the union of ``boxes`` (N, 4: x0, y0, x1, y1), traced on a raster of ``shape``."""
    from skimage import measure

    h, w = shape
    r = np.zeros((h + 2, w + 2), dtype=np.float32)  # one empty pixel all round closes every contour
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64):
        c0, c1 = int(np.floor(x0 * raster_scale)), int(np.ceil(x1 * raster_scale))
        r0, r1 = int(np.floor(y0 * raster_scale)), int(np.ceil(y1 * raster_scale))
        r[max(0, r0) + 1:min(h, max(r1, r0 + 1)) + 1, max(0, c0) + 1:min(w, max(c1, c0 + 1)) + 1] = 1
    paths = []
    for c in measure.find_contours(r, 0.5):
        # contour at 0.5 runs half a pixel outside the filled pixel centres: it is the box edge in pixel units
        ys, xs = c[:, 0] - 1 + 0.5, c[:, 1] - 1 + 0.5
        paths.append(np.stack([xs / raster_scale, ys / raster_scale], axis=1))
    return paths


def write_preview(path: str | Path, thumbnail: np.ndarray, slide_size: tuple[int, int], heat: np.ndarray,
                  heat_extent: tuple[float, float, float, float], *, vmin: float, vmax: float,
                  title: str = "", subtitle: str = "", tile_boxes: np.ndarray | None = None,
                  anomalous: np.ndarray | None = None, score_label: str = "anomaly score",
                  cmap: str = CMAP, dpi: int = 100) -> Path:
    """Write the preview PNG (atomically) and return ``path``.

    ``thumbnail``: RGB of the whole slide; ``slide_size``: its level-0 (width, height); ``heat``: the map
    (NaN = not scored / off tissue) whose level-0 extent is ``heat_extent`` = (x0, y0, x1, y1);
    ``vmin, vmax``: the fixed display range; ``title``: the slide's id; ``subtitle``: one line under it
    (e.g. the verdict); ``tile_boxes`` (N, 4) level-0 x0, y0, x1, y1 of the scored tiles and ``anomalous``
    (N,) bool: the Anomalous ones are outlined; ``cmap``: a matplotlib colour map.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    path = Path(path)
    W, H = slide_size
    th, tw = thumbnail.shape[:2]
    side_by_side = tw <= 1.2 * th
    top = _MARGIN + (_TITLE if title else 0) + (_SUBTITLE if subtitle else 0)
    if side_by_side:
        fig_w, fig_h = 2 * tw + _GAP + _BAR + 2 * _MARGIN, th + top + _LABEL + _MARGIN
        panels = [(_MARGIN, _MARGIN), (_MARGIN + tw + _GAP, _MARGIN)]
    else:
        fig_w, fig_h = tw + _BAR + 2 * _MARGIN, 2 * (th + _LABEL) + _GAP + top + _MARGIN
        panels = [(_MARGIN, _MARGIN + th + _LABEL + _GAP), (_MARGIN, _MARGIN)]
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)

    def axes_at(x: float, y: float, w: float, h: float):
        return fig.add_axes((x / fig_w, y / fig_h, w / fig_w, h / fig_h))

    x0, y0, x1, y1 = heat_extent
    axes = []
    for k, (px, py) in enumerate(panels):
        ax = axes_at(px, py, tw, th)
        ax.imshow(thumbnail, extent=(0, W, H, 0), interpolation="antialiased")
        if k == 1:
            ax.imshow(heat_rgba(heat, vmin, vmax, cmap), extent=(x0, x1, y1, y0), interpolation="nearest")
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_color("#bbbbbb")
        axes.append(ax)
    bare, over = axes
    label = dict(fontsize=9, color="#333333", loc="left", pad=3)
    bare.set_title("slide", **label)
    over.set_title("anomaly score over tissue", **label)

    n_anom = 0
    if tile_boxes is not None and anomalous is not None and np.any(anomalous):
        boxes = np.asarray(tile_boxes, np.float64)[np.asarray(anomalous, bool)]
        n_anom = len(boxes)
        k = 2 * max(tw / W, th / H)  # raster at twice the thumbnail's resolution
        for p in _outline_paths(boxes, k, (int(np.ceil(H * k)), int(np.ceil(W * k)))):
            over.plot(p[:, 0], p[:, 1], color=OUTLINE, linewidth=1.4, solid_joinstyle="miter")
        over.set_xlim(0, W)
        over.set_ylim(H, 0)
        over.legend(handles=[Line2D([], [], color=OUTLINE, linewidth=1.4, label=f"Anomalous tiles ({n_anom})")],
                    loc="lower right", fontsize=8, framealpha=0.85, borderpad=0.3, handlelength=1.5)

    bar_x = panels[1][0] + tw + 10
    cax = axes_at(bar_x, panels[1][1] + 0.1 * th, 14, 0.8 * th)
    sm = ScalarMappable(norm=Normalize(vmin=vmin, vmax=max(vmax, vmin + 1e-12)), cmap=_bar_colours(cmap))
    cb = fig.colorbar(sm, cax=cax)
    cb.set_label(score_label, fontsize=9)
    cb.ax.tick_params(labelsize=8)
    cb.outline.set_edgecolor("#888888")
    if title:
        fig.text(_MARGIN / fig_w, 1 - (_MARGIN + 18) / fig_h, title, fontsize=13, weight="bold", color="#111111")
    if subtitle:
        y = _MARGIN + (_TITLE if title else 0) + 13
        fig.text(_MARGIN / fig_w, 1 - y / fig_h, subtitle, fontsize=9, color="#333333")
    with atomic_output(path) as tmp:  # an OSError (full disk) propagates: infer names the output in one line
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
