"""Robustness to stain shifts: tile scores of a stain-shifted copy of a normal slide vs the original.

Why: a model trained on one lab's slides must rank the tiles of a differently stained slide like the same
slide stained as in training, or its scores mean nothing across sites. Steps:

1. A normal slide: CMU-1-Small-Region (Aperio H&E, ../shared/data) mirror-tiled to SIZE² (benchmarks/_slides),
   re-written as a JPEG pyramidal TIFF once as it is (k = 0) and once per shift strength k with our own HED
   shift of every pixel: hematoxylin ×(1 + k), eosin ×(1 − k), shifts +k/5 and −k/5 OD
   (``wsi_haloae.train.stain_augment.hed_shift``; the same writer for every copy, so only the stain differs).
2. Tiny models trained on tiles of the original slide (``wsi-haloae tiles`` then ``run_train``), the same
   seed, data and steps, with ``--stain-normalize macenko`` and ``none`` (both with the default
   ``--stain-augment``; add ``none-noaug`` for no augmentation at all).
3. ``wsi_haloae.infer.engine.run_infer`` (the current engine) on every copy with every model; per tile
   (matched by grid row/column): Spearman's rank correlation of tile scores (shifted vs k = 0), the median
   relative change of the score, and the per-slide call count of the MAD rule (median + 3·1.4826·MAD, the
   engine's GeoJSON threshold; calibrated calls are not on this branch).

    python benchmarks/bench_stain_robustness.py [--quick] [--size 3072] [--steps 40] [--shifts 0.1,0.2,0.3,0.5]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import _common  # noqa: E402
import _slides  # noqa: E402

R31 = ("vgg-imagenet-weights", "vgg19-imagenet-normalised-to-relu3_1.safetensors")
MODELS = {"macenko": dict(stain_normalize="macenko"), "none": dict(stain_normalize="none"),
          "none-noaug": dict(stain_normalize="none", stain_augment=0.0)}


def shifted_copy(src: Path, k: float, out: Path) -> Path:
    """``src`` (a pyramidal TIFF) with every pixel HED-shifted by strength k, written the same way."""
    import torch
    from PIL import Image

    from wsi_haloae.slide.reader import SlideReader
    from wsi_haloae.train.stain_augment import hed_shift

    if out.is_file():
        return out
    reader = SlideReader(src)
    w, h = reader.dimensions
    mpp = reader.mpp
    base = reader.read_region(0, 0, 0, w, h)
    reader.close()
    if k:
        rows = []
        for y in range(0, h, 512):  # in strips: bounded float memory
            x = torch.from_numpy(base[y : y + 512]).permute(2, 0, 1).float() / 255
            y_ = hed_shift(x, (1 + k, 1 - k, 1.0), (k / 5, -k / 5, 0.0))
            rows.append((y_.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        base = np.concatenate(rows)
    levels: dict[int, np.ndarray] = {}

    def tile_fn(x0: int, y0: int, ds: int) -> np.ndarray:
        if ds not in levels:
            levels[ds] = base if ds == 1 else np.asarray(
                Image.fromarray(base).resize((max(1, round(w / ds)), max(1, round(h / ds))), Image.Resampling.LANCZOS))
        s = levels[ds]
        t = np.full((_slides.TILE, _slides.TILE, 3), 255, np.uint8)
        part = s[y0 // ds : y0 // ds + _slides.TILE, x0 // ds : x0 // ds + _slides.TILE]
        t[: part.shape[0], : part.shape[1]] = part
        return t

    return _slides._write_pyramid(out, w, h, mpp, tile_fn, "jpeg", f"HED shift k={k} of {src.name}; mpp={mpp}")


def train_model(name: str, tiles: Path, workdir: Path, steps: int, backbone: str, seed: int) -> Path:
    from wsi_haloae.config import TrainConfig
    from wsi_haloae.train.trainer import run_train

    out = workdir / f"model-{name}-{steps}steps-{Path(backbone).stem[:12]}.safetensors"
    if not out.is_file():
        run_train(TrainConfig(tiles=tiles, out=out, preset="tiny", epochs=max(1, steps // 8), samples_per_epoch=32,
                              batch_size=4, backbone_weights=backbone, device="cpu", workers=0, seed=seed,
                              max_steps=steps, **MODELS[name]))
    return out


def scores(slide: Path, model: Path, out: Path) -> dict[tuple[int, int], float]:
    """(row, col) → tile score of one ``run_infer``."""
    import zarr

    from wsi_haloae.config import InferConfig, InferOptions
    from wsi_haloae.infer.engine import run_infer

    run_infer(InferConfig(slide=slide, model=model, out=out, overwrite=True,
                          options=InferOptions(device="cpu", workers=0, batch_size=16, progress=False)))
    g = zarr.open_group(str(out), mode="r")
    rc = np.asarray(g["tiles/rc"])
    s = np.asarray(g["tiles/score_mean"])
    return {(int(r), int(c)): float(v) for (r, c), v in zip(rc, s) if np.isfinite(v)}


def compare(base: dict, other: dict) -> dict:
    from scipy.stats import spearmanr

    from wsi_haloae.infer.geojson import robust_threshold

    keys = sorted(set(base) & set(other))
    a = np.array([base[k] for k in keys])
    b = np.array([other[k] for k in keys])
    thr_a, thr_b = robust_threshold(np.array(list(base.values())))["value"], robust_threshold(np.array(list(other.values())))["value"]
    return {
        "tiles_common": len(keys), "tiles_base": len(base), "tiles_shifted": len(other),
        "spearman": float(spearmanr(a, b).statistic),
        "median_rel_change": float(np.median(np.abs(b - a) / np.abs(a).clip(1e-12))),
        "median_score_ratio": float(np.median(b) / np.median(a)),
        "mad_calls_base": int((np.array(list(base.values())) > thr_a).sum()),
        "mad_calls_shifted": int((np.array(list(other.values())) > thr_b).sum()),
        "base_calls_above_base_threshold_in_shifted": int((b > thr_a).sum()),
    }


def main() -> None:
    p = _common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=None, help="Slide side in px (default 3072; quick 1024).")
    p.add_argument("--steps", type=int, default=None, help="Training steps per model (default 40; quick 2).")
    p.add_argument("--shifts", default=None, help="Comma-separated strengths k (default 0.1,0.2,0.3,0.5; quick 0.3).")
    p.add_argument("--models", default="macenko,none", help="Comma-separated: macenko, none, none-noaug.")
    p.add_argument("--backbone", default=None, help="VGG19 weights (default: the r31 ImageNet file in ../shared, else random).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR / "stain-robustness")
    args = p.parse_args()
    t_start = time.perf_counter()
    result = _common.start("bench_stain_robustness", args)
    from wsi_haloae.config import TilesConfig
    from wsi_haloae.slide.tiles import run_tiles

    size = args.size or (1024 if args.quick else 3072)
    steps = args.steps or (2 if args.quick else 40)
    shifts = [float(v) for v in (args.shifts or ("0.3" if args.quick else "0.1,0.2,0.3,0.5")).split(",")]
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    backbone = args.backbone or str(_common.shared_file(*R31) or "random")
    result.update(size=size, steps=steps, shifts=shifts, backbone=backbone)

    src, desc = _slides.tissue_slide(size, wd)
    slides = {k: shifted_copy(src, k, wd / f"{src.stem}-hed{k:g}.tif") for k in [0.0, *shifts]}
    result["slide"] = desc
    tiles = wd / f"tiles-{src.stem}"
    if not (tiles / "tiles.csv").is_file():
        run_tiles(TilesConfig(slide=slides[0.0], out=tiles, tile_size=256, stride=128, min_tissue=0.5))
    for name in args.models.split(","):
        model = train_model(name, tiles, wd, steps, backbone, args.seed)
        base = scores(slides[0.0], model, wd / f"{name}-k0.zarr")
        for k in shifts:
            other = scores(slides[k], model, wd / f"{name}-k{k:g}.zarr")
            row = dict(model=name, shift=k, **compare(base, other))
            result["rows"].append(row)
            _common.save(result, args)
            print(f"  {name:10s} k={k:<4g} spearman {row['spearman']:.3f}  median |Δ|/score {row['median_rel_change']:.3f}  "
                  f"MAD calls {row['mad_calls_base']} -> {row['mad_calls_shifted']}", flush=True)
    _common.print_table(result["rows"], ["model", "shift", "tiles_common", "spearman", "median_rel_change",
                                         "median_score_ratio", "mad_calls_base", "mad_calls_shifted",
                                         "base_calls_above_base_threshold_in_shifted"])
    _common.finish(result, args, t_start)


if __name__ == "__main__":
    main()
