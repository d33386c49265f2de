"""``wsi-haloae demo``: the whole flow, offline, on a slide it builds itself, in a few minutes on 2 CPU cores.

Why this shape: a newcomer on a fresh machine has no slide, no model and no network. scikit-image ships a
real IHC image, from which ``slide.synthetic`` assembles a pyramidal slide that OpenSlide opens: two tissue
islands, one of them holding a planted anomaly (the same tissue with its stains permuted and darkened).
The demo then does what a user does with a real slide:

1. marks the normal island with a QuPath-style GeoJSON annotation and extracts training tiles inside it
   (``wsi-haloae tiles --annotations``);
2. trains a ``tiny`` HaloAE on them for a short while (``wsi-haloae train``), with the ImageNet VGG19
   weights when they are in the TORCH_HOME cache, else a seeded random backbone (said so, and recorded);
3. calibrates it (``wsi-haloae calibrate``) on tiles of a second slide of the same tissue without any
   anomaly, as a lab calibrates on its own normal slides: the p-values, calls and colour scale of infer rest
   on it (docs/scores.md). The training tiles are too few for a hold-out (the demo trains on ~34 tiles; a
   calibration needs >= 20 and, for calls on a slide, hundreds), so training keeps them all;
4. runs ``wsi-haloae infer`` with all four outputs;
5. checks the result against the ground truth it planted and prints the slide's verdict, where everything
   is and how to open it in QuPath.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import CalibrateConfig, InferConfig, InferOptions, TilesConfig, TrainConfig
from .slide.synthetic import Disc, SyntheticSlideSpec, anomaly_mask, write_synthetic_slide

MPP = 0.5
#: Training budget: about a minute on 2 quiet CPU cores (tiny preset, 3 x 2 images per step, 20 steps), not
#: the paper's schedule (hours): the auto-encoder is far from converged, so the demo's score mostly measures
#: how far a tile's features are from the normal training tiles' (the mean map). The evolving loss weights run
#: through their whole schedule over these 5 short epochs.
EPOCHS = 5
SAMPLES_PER_EPOCH = 8
BATCH_SIZE = 2
STRIDE = 256
#: Calibration tiles: every 96 px on the normal slide (~320 overlapping tiles; scoring them is most of the
#: demo's time on a CPU). With n calibration tiles a call on the demo slide's 64 tissue tiles needs about
#: 64 / (0.05 (n + 1)) tiles more unusual than all of them (docs/scores.md): 4 at n = 320 (the planted anomaly
#: covers 6 tiles), 2 at n = 729 (every 64 px, twice the time), 26 at n = 48 (every 256 px).
CALIBRATION_STRIDE = 96


def demo_spec() -> SyntheticSlideSpec:
    """3072x2048 px at 0.5 µm/px: a normal island on the left, an island with a planted anomaly on the right."""
    left = Disc(800.0, 1024.0, 690.0)
    right = Disc(2260.0, 1024.0, 690.0)
    anomaly = Disc(2330.0, 930.0, 300.0)
    return SyntheticSlideSpec(width=3072, height=2048, mpp=MPP, islands=(left, right), anomalies=(anomaly,), seed=0)


def calibration_spec() -> SyntheticSlideSpec:
    """The demo slide's tissue and islands without the planted anomaly: normal tissue for the calibration."""
    s = demo_spec()
    return SyntheticSlideSpec(width=s.width, height=s.height, mpp=s.mpp, islands=s.islands, anomalies=(), seed=1)


def _normal_annotation(spec: SyntheticSlideSpec, path: Path) -> Path:
    """A QuPath-style GeoJSON annotation (class "Normal") around the left island: where training tiles come from."""
    d = spec.islands[0]
    pad = 40.0
    x0, y0, x1, y1 = d.cx - d.r - pad, d.cy - d.r - pad, d.cx + d.r + pad, d.cy + d.r + pad
    feature = {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
        "properties": {"objectType": "annotation", "classification": {"name": "Normal", "color": [0, 160, 0]}},
    }
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}, indent=1))
    return path


def _backbone(weights: str | Path | None = None) -> tuple[str, str]:
    from .model.features import imagenet_cache_path

    if weights is not None:
        if not Path(weights).is_file():
            from .errors import WeightsUnavailableError

            raise WeightsUnavailableError(f"--backbone-weights {weights}: no such file")
        return str(weights), f"VGG19 weights from {weights}"
    cached = imagenet_cache_path()
    if cached.is_file():
        return "imagenet", f"ImageNet VGG19 weights from the TORCH_HOME cache ({cached})"
    return "random", (f"a seeded RANDOM VGG19 backbone: no ImageNet weights in the TORCH_HOME cache ({cached}); "
                      f"put vgg19-dcbb9e9d.pth there, or pass --backbone-weights FILE, for real features")


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    if labels.all() or not labels.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def _check(spec: SyntheticSlideSpec, out_zarr: Path) -> dict[str, Any]:
    """Tile scores inside the planted anomaly (≥ 25 % of the tile) versus all other tissue tiles."""
    from .infer.writers import open_store, read_attrs

    g = open_store(out_zarr)
    xy, scores = g["tiles/xy"][:], g["tiles/score_mean"][:]
    t = float(read_attrs(out_zarr)["level0_tile"])
    ds = max(1.0, t / 32)
    frac = np.array([anomaly_mask(spec, int(x), int(y), 32, 32, downsample=ds).mean() for x, y in xy])
    ok = np.isfinite(scores)
    lab = frac[ok] >= 0.25
    s = scores[ok]
    res: dict[str, Any] = {"tiles": int(ok.sum()), "anomalous_tiles": int(lab.sum())}
    if lab.any() and (~lab).any():
        res.update(mean_anomalous=float(s[lab].mean()), mean_normal=float(s[~lab].mean()), auroc=_auroc(s, lab))
        res["anomaly_scored_higher"] = bool(res["mean_anomalous"] > res["mean_normal"])
    attrs = read_attrs(out_zarr)
    flagged = g["tiles/anomalous"][:][ok]  # the calls of infer (attribute ``calls``): the GeoJSON's Anomalous
    res.update(classified_anomalous=int(flagged.sum()), classified_on_anomaly=int((flagged & (frac[ok] > 0)).sum()),
               rule=attrs["calls"]["method"], verdict=attrs["verdict"])
    return res


#: The planted anomaly is a stain change, the very thing stain normalisation maps towards the training colours
#: and stain augmentation teaches the model to ignore: with the defaults (macenko, 0.05) the demo's tile
#: AUROC was 0.47 (random backbone, 20 steps), without them 1.00 (docs/quickstart.md). Colour QC still runs.
DEMO_STAIN = {"stain_normalize": "none", "stain_augment": 0.0}


def run_demo(out: str | Path = "wsi-haloae-demo", device: str = "auto", train_steps: int | None = None,
             backbone_weights: str | Path | None = None, calibration_stride: int = CALIBRATION_STRIDE) -> dict[str, Any]:
    """Build the demo slide, extract normal tiles, train a tiny model, calibrate it, run infer, report.
    Returns the summary.

    ``train_steps`` caps the optimizer steps and ``calibration_stride`` spaces the calibration tiles (testing
    aids; the command uses the full short schedule and ``CALIBRATION_STRIDE``).
    ``backbone_weights``: a VGG19 state-dict file; default ImageNet from the TORCH_HOME cache, else random.
    """
    from .calibrate import run_calibrate
    from .infer.engine import run_infer
    from .slide.tiles import run_tiles
    from .train.trainer import run_train

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[demo] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    spec = demo_spec()
    slide = out / "demo_slide.tif"
    log(f"writing a {spec.width}x{spec.height} pyramidal demo slide ({spec.mpp} µm/px) of real IHC tissue "
        f"(scikit-image) with a planted anomaly: {slide}")
    write_synthetic_slide(slide, spec)
    annotation = _normal_annotation(spec, out / "normal_region.geojson")

    tiles_dir = out / "train_tiles"
    log(f"extracting normal training tiles inside {annotation.name} -> {tiles_dir}")
    run_tiles(TilesConfig(slide=slide, out=tiles_dir, mpp=MPP, tile_size=256, stride=STRIDE, min_tissue=0.5,
                          annotations=annotation, class_name="Normal"), progress=False)

    backbone, backbone_note = _backbone(backbone_weights)
    log(f"backbone: {backbone_note}")
    model = out / "model.safetensors"
    steps = EPOCHS * SAMPLES_PER_EPOCH // BATCH_SIZE if train_steps is None else train_steps
    log(f"training a tiny HaloAE for {steps} steps -> {model}")
    run_train(TrainConfig(tiles=tiles_dir, out=model, preset="tiny", epochs=EPOCHS, samples_per_epoch=SAMPLES_PER_EPOCH,
                          batch_size=BATCH_SIZE, backbone_weights=backbone, device=device, workers=0, seed=0,
                          max_steps=train_steps, val_fraction=0.0, **DEMO_STAIN))

    cal_slide = out / "normal_slide.tif"
    cal_tiles = out / "calibration_tiles"
    log(f"calibrating it on normal tissue it never trained on: a second slide without the anomaly ({cal_slide}), "
        f"tiles every {calibration_stride} px -> {cal_tiles}")
    write_synthetic_slide(cal_slide, calibration_spec())
    run_tiles(TilesConfig(slide=cal_slide, out=cal_tiles, mpp=MPP, tile_size=256, stride=calibration_stride,
                          min_tissue=0.5), progress=False)
    calibration = run_calibrate(CalibrateConfig(model=model, tiles=cal_tiles, out=model, device=device, workers=0,
                                                batch_size=8, progress=False))

    cfg = InferConfig(slide=slide, model=model, out=out / "heatmap.zarr",
                      outputs={"tiff": out / "heatmap.ome.tif", "geojson": out / "heatmap_tiles.geojson",
                               "preview": out / "heatmap.png"},
                      options=InferOptions(device=device, workers=1, batch_size=8, progress=True), overwrite=True)
    log("running infer on the whole demo slide")
    summary = run_infer(cfg)
    check = _check(spec, cfg.out)
    result = {
        "out": str(out),
        "slide": str(slide),
        "model": str(model),
        "backbone": backbone,
        "calibration": {"n": calibration.n, "tiles": str(cal_tiles), "display_range": list(calibration.display_range)},
        "infer": summary.to_dict(),
        "check": check,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=1))
    _print_report(result, summary.outputs, backbone_note)
    return result


def _print_report(result: dict[str, Any], outputs: dict[str, str], backbone_note: str) -> None:
    from .infer.calls import verdict_line

    c = result["check"]
    if "anomaly_scored_higher" in c:
        verdict = (f"the planted anomaly {'scored HIGHER' if c['anomaly_scored_higher'] else 'did NOT score higher'} "
                   f"than the rest of the tissue: mean tile score {c['mean_anomalous']:.4g} on its "
                   f"{c['anomalous_tiles']} tiles vs {c['mean_normal']:.4g} on the other "
                   f"{c['tiles'] - c['anomalous_tiles']} (tile AUROC {c['auroc']:.2f})")
        if not c["anomaly_scored_higher"]:
            verdict += ("; the random backbone's features are weak: give real VGG19 weights (see docs/quickstart.md)"
                        if result["backbone"] == "random" else
                        "; the demo trains for a minute or two, a real model for hours")
    else:
        verdict = "no comparison possible (no scored tile on one side)"
    if "classified_anomalous" in c:
        verdict += (f". {c['classified_anomalous']} tile(s) are classified 'Anomalous' in the GeoJSON "
                    f"({c['rule']}), {c['classified_on_anomaly']} of them touching the planted anomaly")
    lines = [
        "",
        f"wsi-haloae demo finished in {result['seconds']:.0f} s. Everything is in {result['out']}/:",
        f"  slide          {result['slide']}",
        f"  model          {result['model']}   (backbone: {backbone_note})",
        f"  heatmap store  {outputs['zarr']}   (OME-Zarr; docs/output-format.md)",
        f"  OME-TIFF       {outputs['tiff']} (float) and {outputs['tiff_rgb']} (colour)",
        f"  QuPath tiles   {outputs['geojson']}",
        f"  preview        {outputs['preview']}",
        "",
        f"Result: {verdict}.",
        f"Slide {verdict_line(c['verdict'])}.",
        "",
        "Open it in QuPath (docs/qupath.md):",
        f"  1. drag {result['slide']} onto QuPath;",
        f"  2. drag {outputs['geojson']} onto the slide (tiles with 'anomaly_score' and 'anomaly_pvalue'",
        "     measurements; the tiles called at FDR 0.05 are classified 'Anomalous');",
        "  3. Measure > Show measurement maps > anomaly_score colours the slide;",
        f"  4. {outputs['tiff_rgb']} (or the .zarr folder, QuPath 0.6+) opens as an image of the heatmap.",
        "",
    ]
    print("\n".join(lines))
