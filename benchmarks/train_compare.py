"""Real attention against the authors' inverted mask, trained side by side on the same data, then evaluated.

Why: the published HaloAE numbers come from code whose attention is windowed average pooling
(docs/model-card.md); ``attention: authors-mask`` reproduces it. This trains a preset twice — as it is
(``halo``) and with ``authors-mask``, everything else equal: data, seed, steps or time budget — and runs
``evaluate`` on each model (image AUROC, pixel AUROC, AUPRO), so the two attentions compare on one footing.
Used by gpu_check.sh with a fixed time budget per model.

    python benchmarks/train_compare.py [--preset paper] [--data ../shared/data/mvtec_ad/bottle]
           [--backbone-weights random|FILE] [--max-seconds 60 | --max-steps N] [--quick]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def main() -> None:
    p = _common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper", help="Base preset; trained with attention halo and authors-mask.")
    p.add_argument("--data", type=Path, default=_common.SHARED_DATA / "mvtec_ad" / "bottle", help="MVTec-AD category folder.")
    p.add_argument("--backbone-weights", default="random")
    p.add_argument("--max-seconds", type=float, default=None, help="Training budget per model (after start-up).")
    p.add_argument("--max-steps", type=int, default=None, help="Or a step budget per model.")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 2; 6 on CUDA; quick 0).")
    p.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR / "train_compare")
    args = p.parse_args()
    t_start = time.perf_counter()
    result = _common.start("train_compare", args)
    device = _common.resolve_device(args.device)
    args.workdir.mkdir(parents=True, exist_ok=True)
    from wsi_haloae.config import ModelConfig, TrainConfig
    from wsi_haloae.evaluate import run_evaluate
    from wsi_haloae.model import load_model
    from wsi_haloae.train.trainer import run_train

    data = args.data
    if args.quick:  # a few images: the real category's when present, else planted IHC crops
        data = _common.quick_mvtec(args.workdir / "quick-data", data if data.is_dir() else None)
    result.update(data=str(data), preset=args.preset, backbone_weights=args.backbone_weights)
    if not (data / "train").is_dir() or not (data / "test").is_dir():
        result["skipped"] = f"{data}: no MVTec-AD category folder here"
        print(f"# skipped: {result['skipped']}", flush=True)
        _common.finish(result, args, t_start)
        return
    cuda = device.type == "cuda"
    workers = args.workers if args.workers is not None else (0 if args.quick else (6 if cuda else 2))
    max_steps = 1 if args.quick else args.max_steps
    max_seconds = None if args.quick else (args.max_seconds if args.max_seconds is not None or max_steps else 60.0)
    base = ModelConfig.preset("tiny" if args.quick else args.preset)
    for attention in ("halo", "authors-mask"):
        cfg_model = replace(base, name=f"{base.name}-{attention}" if attention != base.attention else base.name, attention=attention)
        preset_file = args.workdir / f"{cfg_model.name}.json"
        preset_file.write_text(json.dumps(cfg_model.to_dict()))
        out = args.workdir / f"{cfg_model.name}.safetensors"
        cfg = TrainConfig(tiles=data, out=out, preset=str(preset_file), epochs=250, samples_per_epoch=3000,
                          batch_size=1 if args.quick else args.batch_size, backbone_weights=args.backbone_weights,
                          device=str(device), workers=workers, seed=0, max_steps=max_steps, max_seconds=max_seconds,
                          checkpoint_minutes=1e9)
        t0 = time.perf_counter()
        run_train(cfg)
        train_s = time.perf_counter() - t0
        md = load_model(out).metadata
        t0 = time.perf_counter()
        ev = run_evaluate(out, data, as_json=True, device=str(device), batch_size=32 if cuda else 8)
        row = {"preset": base.name, "attention": attention, "steps": md["steps"], "train_s": train_s,
               "train_wall_time_s": md["wall_time_s"], "evaluate_s": time.perf_counter() - t0,
               "image_auroc": ev["image_auroc"], "image_auroc_max": ev["image_auroc_max"],
               "pixel_auroc": ev["pixel_auroc"], "aupro": ev["aupro"], "n_images": ev["n_images"]}
        result["rows"].append(row)
        _common.save(result, args)
        print(f"  {cfg_model.name}: {row['steps']} steps, image AUROC {row['image_auroc']}, pixel AUROC {row['pixel_auroc']}", flush=True)
    _common.print_table(result["rows"], ["preset", "attention", "steps", "train_s", "evaluate_s", "image_auroc",
                                         "image_auroc_max", "pixel_auroc", "aupro"])
    _common.finish(result, args, t_start)


if __name__ == "__main__":
    main()
