"""The ``evaluate`` command: image AUROC, pixel AUROC and AUPRO of a model on an MVTec-AD-layout folder.

Layout: ``test/<defect>/*.png`` (``test/good`` = normal) and ``ground_truth/<defect>/<name>_mask.png``.
Each test image is resized to 256×256 for the model (as in training); its raw 64×64 map is post-processed as
at inference (|raw − training mean map|, 3×3 Gaussian blur σ 0.8) and bilinearly up-sampled to the image's
full resolution for the pixel metrics, which are exact over every pixel (no subsampling). The image score is
the mean of the post-processed map (the tile score of inference); the max is reported as well.
"""

from __future__ import annotations

import html
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .errors import BadInputError, BadTilesError, OutputError
from .fileio import write_text_atomic
from .images import IMAGE_SUFFIXES, read_image, resize_rgb, warn_rescaled
from .metrics import PixelScores, image_auroc
from .scoring import Calibration

log = logging.getLogger(__name__)

REPORT_PANEL = 320  # px per panel in the report PNGs
#: Level of the per-image calibrated calls (an image is called when its conformal p-value is <= ALPHA).
ALPHA = 0.05


@dataclass
class TestImage:
    path: Path
    defect: str  # "good" for normal images
    mask: Path | None  # None for good images

    @property
    def anomalous(self) -> bool:
        return self.defect != "good"

    @property
    def name(self) -> str:
        return f"{self.defect}_{self.path.stem}"


def find_test_set(data: Path) -> list[TestImage]:
    """List test images and their masks; a defective image without its mask is an error."""
    data = Path(data)
    if not data.is_dir():
        raise BadTilesError(f"{data}: evaluation folder does not exist" if not data.exists() else f"{data}: not a folder")
    test = data / "test"
    if not test.is_dir():
        raise BadTilesError(f"{data}: no test/ folder (expected the MVTec AD layout test/<defect>/*.png)")
    items: list[TestImage] = []
    for sub in sorted(p for p in test.iterdir() if p.is_dir()):
        for img in sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            if sub.name == "good":
                items.append(TestImage(img, "good", None))
                continue
            mask = data / "ground_truth" / sub.name / f"{img.stem}_mask.png"
            if not mask.is_file():
                raise BadInputError(f"{img}: its ground-truth mask {mask} is missing")
            items.append(TestImage(img, sub.name, mask))
    if not items:
        raise BadTilesError(f"{test}: no test images ({', '.join(IMAGE_SUFFIXES)}) in its sub-folders")
    return items


def _read_mask(item: TestImage, shape: tuple[int, int]) -> np.ndarray:
    if item.mask is None:
        return np.zeros(shape, dtype=bool)
    try:
        with Image.open(item.mask) as im:
            m = np.asarray(im.convert("L")) > 127
    except OSError as exc:
        raise BadInputError(f"{item.mask}: unreadable mask ({exc})") from None
    if m.shape != shape:
        raise BadInputError(f"{item.mask}: mask is {m.shape[1]}x{m.shape[0]}, its image is {shape[1]}x{shape[0]}")
    return m


def _read_image(item: TestImage, rescaled: list[tuple[Path, str]] | None = None) -> np.ndarray:
    try:
        image = read_image(item.path)
    except (OSError, ValueError) as exc:  # images.ImageReadError is a ValueError
        raise BadInputError(f"{item.path}: unreadable test image ({exc})") from None
    if image.note and rescaled is not None:
        rescaled.append((item.path, image.note))
    return image.pixels


def _upsample(pp: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """(S, S) post-processed map → (H, W) float32 by bilinear interpolation (what postprocess(out_size) does)."""
    up = F.interpolate(pp[None, None].float(), size=shape, mode="bilinear", align_corners=False)
    return up[0, 0].cpu().numpy()


def run_evaluate(
    model: Path,
    data: Path,
    as_json: bool = False,
    report: Path | None = None,
    device: str = "auto",
    batch_size: int = 8,
) -> dict[str, Any]:
    """Evaluate a model file on an MVTec-layout folder; prints JSON or a table on stdout and returns the figures."""
    from .model import load_model, postprocess, tile_scores
    from .model.device import resolve_device
    from .model.inputs import stack_tiles

    dev = resolve_device(device)
    items = find_test_set(Path(data))
    loaded = load_model(model, dev)
    calibration = Calibration.from_metadata(loaded.metadata, f"model file {model}")
    net = loaded.model.eval()
    pixels = PixelScores()
    labels: list[int] = []
    means: list[float] = []
    maxes: list[float] = []
    maps64: list[torch.Tensor] = []
    shapes: list[tuple[int, int]] = []
    rescaled: list[tuple[Path, str]] = []
    size = net.config.tile_size
    with tqdm(total=len(items), desc="evaluating", unit="img", leave=False) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            full = [_read_image(it, rescaled) for it in chunk]
            x = stack_tiles([resize_rgb(a, size) for a in full]).to(dev)
            with torch.no_grad():
                pp = postprocess(net.anomaly_map(x), loaded.mean_map).float()
            mean, mx = tile_scores(pp)
            for it, arr, m, s_mean, s_max in zip(chunk, full, pp, mean.tolist(), mx.tolist(), strict=True):
                shape = arr.shape[:2]
                pixels.add(_upsample(m, shape), _read_mask(it, shape))
                labels.append(int(it.anomalous))
                means.append(s_mean)
                maxes.append(s_max)
                maps64.append(m.cpu())
                shapes.append(shape)
            bar.update(len(chunk))
    warn_rescaled(Path(data) / "test", rescaled, len(items))
    if len(set(labels)) < 2:
        log.warning("%s: the test set has only %s images; image AUROC is undefined", data, "anomalous" if labels[0] else "normal")
    result: dict[str, Any] = {
        "image_auroc": image_auroc(labels, means),
        "image_auroc_max": image_auroc(labels, maxes),
        "pixel_auroc": pixels.pixel_auroc(),
        "aupro": pixels.aupro(0.3),
        "n_images": len(items),
        "n_anomalous": int(sum(labels)),
        **calibrated_calls(calibration, labels, means, ALPHA, [it.defect for it in items]),
    }
    if calibration is None:
        log.warning("%s has no calibration: the false- and true-positive rates of calibrated calls are n/a "
                    "(train with --val-fraction > 0, or run `wsi-haloae calibrate`)", model)
    if report is not None:
        _write_report(Path(report), items, maps64, shapes, means, maxes, result, model, calibration)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    else:
        print(_table(result, items, labels, means, model, Path(data), loaded.sha256))
    return result


def calibrated_calls(calibration: Calibration | None, labels: list[int], scores: list[float], alpha: float,
                     defects: list[str] | None = None) -> dict[str, Any]:
    """Per-image calls "conformal p-value <= alpha" from the model's calibration: the false-positive rate on the
    normal images and the true-positive rate on the defective ones, also per defect type when ``defects`` names
    each image's (None where undefined or uncalibrated)."""
    lab = np.asarray(labels, dtype=bool)
    out: dict[str, Any] = {"alpha": alpha, "calibration_n": None, "fpr_at_alpha": None, "tpr_at_alpha": None,
                           "called_good": None, "called_defect": None, "tpr_at_alpha_per_defect": None}
    if calibration is None:
        return out
    called = calibration.pvalues(np.asarray(scores, dtype=np.float64)) <= alpha
    out.update(calibration_n=calibration.n, called_good=int(called[~lab].sum()), called_defect=int(called[lab].sum()))
    if (~lab).any():
        out["fpr_at_alpha"] = float(called[~lab].mean())
    if lab.any():
        out["tpr_at_alpha"] = float(called[lab].mean())
    if defects is not None:
        d = np.asarray(defects)
        out["tpr_at_alpha_per_defect"] = {str(k): float(called[lab & (d == k)].mean()) for k in sorted(set(d[lab].tolist()))}
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _count(k: int | None, n: int) -> str:
    return "" if k is None else f"  ({k} of {n} images called)"


def _table(result: dict[str, Any], items: list[TestImage], labels: list[int], means: list[float], model: Path, data: Path, sha: str) -> str:
    lines = [
        f"model        {model}  (sha256 {sha[:12]})",
        f"data         {data}",
        f"images       {result['n_images']} ({result['n_anomalous']} anomalous)",
        "",
        f"{'metric':34s} {'%':>6s}",
        f"{'image AUROC (score = mean of map)':34s} {_fmt(result['image_auroc']):>6s}",
        f"{'image AUROC (score = max of map)':34s} {_fmt(result['image_auroc_max']):>6s}",
        f"{'pixel AUROC':34s} {_fmt(result['pixel_auroc']):>6s}",
        f"{'AUPRO (FPR <= 0.3)':34s} {_fmt(result['aupro']):>6s}",
        "",
        f"calibrated per-image calls (conformal p-value <= {result['alpha']:g}):",
        f"{'  false-positive rate on good':34s} {_fmt(result['fpr_at_alpha']):>6s}" + _count(result["called_good"], len(labels) - sum(labels)),
        f"{'  true-positive rate on defects':34s} {_fmt(result['tpr_at_alpha']):>6s}" + _count(result["called_defect"], sum(labels)),
        ("  (n/a: the model has no calibration; train with --val-fraction > 0 or run `wsi-haloae calibrate`)"
         if result["calibration_n"] is None else
         f"  (calibration: {result['calibration_n']} normal tiles; smallest p-value 1/{result['calibration_n'] + 1})"),
    ]
    defects = sorted({it.defect for it in items if it.anomalous})
    if len(defects) > 1:
        lines.append("")
        lines.append("image AUROC per defect type (against the good images):")
        for d in defects:
            sel = [i for i, it in enumerate(items) if it.defect in (d, "good")]
            auc = image_auroc([labels[i] for i in sel], [means[i] for i in sel])
            n = sum(1 for it in items if it.defect == d)
            tpr = (result.get("tpr_at_alpha_per_defect") or {}).get(d)
            called = "" if tpr is None else f", {_fmt(tpr)} % called at p <= {result['alpha']:g}"
            lines.append(f"  {d:30s} {_fmt(auc):>6s}  ({n} images{called})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- report
def _panel(arr: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))


def _write_report(
    out: Path,
    items: list[TestImage],
    maps64: list[torch.Tensor],
    shapes: list[tuple[int, int]],
    means: list[float],
    maxes: list[float],
    result: dict[str, Any],
    model: Path,
    calibration: Calibration | None = None,
) -> None:
    """One PNG per image (input | heatmap over input | ground truth) and an index.html, sorted by score."""
    from matplotlib import colormaps

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the report folder ({exc.strerror or exc})") from None
    cmap = colormaps["jet"]
    # one colour scale for all images, so that they can be compared: the calibration's (normal-pixel median to
    # 99.9th percentile, the same scale as infer's maps) when the model has one, else 0 to the largest score
    vmin, vmax = calibration.display_range if calibration is not None else (0.0, max(maxes) or 1.0)
    scale = (f"calibrated display range {vmin:.4g} … {vmax:.4g}: normal-pixel median to 99.9th percentile"
             if calibration is not None else f"0 … {vmax:.4g}, the largest score")
    size = REPORT_PANEL
    gap = np.full((size, 6, 3), 255, np.uint8)
    rows = []
    for it, m, shape, s_mean, s_max in tqdm(list(zip(items, maps64, shapes, means, maxes, strict=True)), desc="report", unit="img", leave=False):
        img = _panel(_read_image(it), size)
        heat = _upsample(m, (size, size))
        colour = (cmap(np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0, 1))[..., :3] * 255).astype(np.float32)
        overlay = (0.5 * img + 0.5 * colour).astype(np.uint8)
        gt = _read_mask(it, shape).astype(np.uint8) * 255
        gt = np.repeat(_panel(gt, size)[..., None], 3, axis=2)
        png = out / f"{it.name}.png"
        Image.fromarray(np.concatenate([img, gap, overlay, gap, gt], axis=1)).save(png)
        rows.append((s_mean, it, s_max, png.name))
    rows.sort(key=lambda r: -r[0])
    body = "\n".join(
        f"<tr><td>{html.escape(it.defect)}</td><td>{html.escape(it.path.name)}</td><td>{s:.5f}</td><td>{mx:.5f}</td>"
        f'<td><img src="{html.escape(name)}" loading="lazy" width="{3 * size + 12}"></td></tr>'
        for s, it, mx, name in rows
    )
    figures = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in result.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>wsi-haloae evaluation</title>
<style>body{{font-family:sans-serif}} td{{padding:4px;vertical-align:middle}} tr:nth-child(even){{background:#f4f4f4}}</style>
</head><body>
<h1>wsi-haloae evaluation</h1>
<p>model: {html.escape(str(model))}</p>
<ul>{figures}</ul>
<p>Each row: input | anomaly heatmap over the input (jet, {html.escape(scale)}, one scale for all images) | ground truth.
Sorted by image score (mean of the post-processed map), highest first.</p>
<table><tr><th>defect</th><th>image</th><th>score (mean)</th><th>max</th><th>input | heatmap | ground truth</th></tr>
{body}
</table></body></html>
"""
    write_text_atomic(out / "index.html", page)
    log.info("report: %s", out / "index.html")
