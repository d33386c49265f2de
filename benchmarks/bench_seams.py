"""Maps end to end (issue 12): how much each overlap removes the seams, what it costs, and how much of a real
slide's tissue the map scores.

1. A slide of uniform normal tissue (the synthetic generator's real IHC texture over the whole slide, no
   glass) scored by a tiny HaloAE trained for a short while on normal tiles of another such slide, at each
   ``--overlap``: the seam measure of the level-0 map (``infer.seams.seam_steps``: mean |step| between
   neighbouring map pixels across tile borders, and within tiles; ratio 1 = no seam; also at the window
   step, where an overlapping map could step instead) and the throughput end
   to end (grid tiles per second: how fast a slide is done) and in windows per second.
2. CMU-1-Small-Region (real H&E, ../shared/data) with the same model at each overlap: the share of the tissue
   scored end to end (finite level-0 map pixels / tissue-mask pixels at map resolution: the store's
   ``map.scored_fraction``), and the seam measure over its tissue.

    python benchmarks/bench_seams.py [--quick] [--size 1536] [--overlaps 0,0.5,0.75] [--steps 40]
        [--backbone PATH|random] [--workers 2] [--batch-size 16] [--out results.json]
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SHARED_VGG = ("vgg-imagenet-weights", "vgg19-imagenet-normalised-to-relu3_1.safetensors")


def uniform_slide(path: Path, size: int):
    """A ``size``² slide at 0.5 µm/px covered edge to edge by the same real IHC tissue (one disc larger than it)."""
    from wsi_haloae.slide.synthetic import Disc, SyntheticSlideSpec, write_synthetic_slide

    spec = SyntheticSlideSpec(width=size, height=size, mpp=0.5, islands=(Disc(size / 2, size / 2, size),))
    if not path.is_file():
        write_synthetic_slide(path, spec)
    return path


def train_model(work: Path, steps: int, backbone: str, device: str, size: int = 1024) -> Path:
    """A tiny HaloAE trained for ``steps`` steps on normal tiles of a uniform slide (the demo's schedule)."""
    from wsi_haloae.config import TilesConfig, TrainConfig
    from wsi_haloae.slide.tiles import run_tiles
    from wsi_haloae.train.trainer import run_train

    model = work / f"seams-tiny-{steps}-{size}-{Path(backbone).stem}.safetensors"
    if model.is_file():
        return model
    slide = uniform_slide(work / f"seams-train-{size}.tif", size)
    tiles = work / "seams-train-tiles"
    shutil.rmtree(tiles, ignore_errors=True)
    run_tiles(TilesConfig(slide=slide, out=tiles, mpp=0.5, min_tissue=0.5, stride=128), progress=False)
    run_train(TrainConfig(tiles=tiles, out=model, preset="tiny", epochs=5, samples_per_epoch=max(2, 2 * steps // 5),
                          batch_size=2, backbone_weights=backbone, device=device, workers=0, seed=0, max_steps=steps))
    return model


def run_one(slide: Path, model: Path, out: Path, overlap: float, args) -> dict:
    from wsi_haloae.config import InferConfig, InferOptions
    from wsi_haloae.infer import writers
    from wsi_haloae.infer.engine import run_infer
    from wsi_haloae.infer.seams import seam_steps

    shutil.rmtree(out, ignore_errors=True)
    load0 = _common.loadavg()
    cfg = InferConfig(slide=slide, model=model, out=out, overwrite=True,
                      options=InferOptions(overlap=overlap, workers=args.workers, batch_size=args.batch_size,
                                           device=args.device, progress=False))
    r = run_infer(cfg)
    a = writers.read_attrs(out)
    level0 = writers.open_store(out)["0"]
    period = a["tile_size"] // a["pixel_downsample"]
    s = seam_steps(level0, period)
    sw = seam_steps(level0, period // a["windows"]["per_tile"])  # where windows start and end
    return {
        "slide": slide.name, "overlap": overlap, "tiles": r.tiles_tissue, "windows": r.windows,
        "seconds": round(r.seconds, 1), "tiles_per_s": round(r.tiles_per_s, 3),
        "windows_per_s": round(r.windows / r.seconds, 3) if r.seconds else None,
        "model_windows_per_s": round(r.windows / r.model_seconds, 3) if r.model_seconds else None,
        "seam_border": s.border, "seam_inner": s.inner, "seam_ratio": round(s.ratio, 4),
        "window_border": sw.border, "window_inner": sw.inner, "window_seam_ratio": round(sw.ratio, 4),
        "scored_fraction": a["map"]["scored_fraction"], "tissue_pixels": a["map"]["tissue_pixels"],
        "load": [load0, _common.loadavg()],
    }


def main() -> None:
    p = _common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1536, help="Side of the uniform slide in px (0.5 µm/px).")
    p.add_argument("--overlaps", default="0,0.5,0.75")
    p.add_argument("--steps", type=int, default=40, help="Training steps of the tiny model.")
    p.add_argument("--backbone", help="VGG19 weights: a file, or 'random' (default: ../shared/data's ImageNet "
                                      "weights when present, else random).")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-cmu", action="store_true", help="Skip CMU-1-Small-Region.")
    p.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR)
    args = p.parse_args()
    train_size = 1024
    if args.quick:  # a smoke run: a few tiles, one step, no CMU
        args.size, args.steps, args.overlaps, args.workers, args.no_cmu, train_size = 512, 1, "0,0.5", 0, True, 512
    t0 = time.perf_counter()
    result = _common.start("bench_seams", args)
    args.device = str(_common.resolve_device(args.device))
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    backbone = args.backbone
    if backbone is None:
        shared = _common.shared_file(*SHARED_VGG)
        backbone = str(shared) if shared is not None else "random"
    result["backbone"] = backbone
    model = train_model(work, args.steps, backbone, args.device, train_size)
    result["model"] = {"path": str(model), "steps": args.steps}
    overlaps = [float(v) for v in args.overlaps.split(",")]
    slides = [uniform_slide(work / f"seams-uniform-{args.size}.tif", args.size)]
    cmu = None if args.no_cmu else _common.shared_file(*_common.CMU_SMALL)
    if cmu is not None:
        slides.append(cmu)
    for slide in slides:
        for ov in overlaps:
            row = run_one(slide, model, work / f"seams-{slide.stem}-{ov:g}.zarr", ov, args)
            result["rows"].append(row)
            print(row, flush=True)
            _common.save(result, args)
    _common.print_table(result["rows"], ["slide", "overlap", "tiles", "windows", "seconds", "tiles_per_s",
                                         "windows_per_s", "seam_border", "seam_inner", "seam_ratio",
                                         "scored_fraction"])
    _common.finish(result, args, t0)


if __name__ == "__main__":
    main()
