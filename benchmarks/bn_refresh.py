"""BatchNorm statistics after training: running averages (before) against recomputed on the training tiles (now).

Why: eval-mode BatchNorm uses running statistics that start at mean 0 / variance 1 and follow the weights with
momentum 0.1, so after a short run the auto-encoder's eval-mode output is still near zero and the anomaly map
is little more than the feature energy. This trains one model per step count with ``refresh_bn=False``, then
derives the recomputed version from the same weights (``train.batchnorm.refresh_batchnorm`` + a new training
mean map), and evaluates both on the MVTec-AD test set. Also reported: on the first test images, mean f̂m²
against mean fm² and the correlation of fm and f̂m in eval mode (how much of the features the model returns).

    python benchmarks/bn_refresh.py [--data ../shared/data/mvtec_ad/bottle] [--preset tiny] [--steps 0,60]
           [--samples-per-epoch 24] [--batch-size 4] [--backbone-weights FILE] [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common  # noqa: E402

WEIGHTS = ("vgg-imagenet-weights", "vgg19-imagenet-normalised-to-relu3_1.safetensors")


@torch.no_grad()
def reconstruction_stats(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    model.eval()
    fm, fm_hat = model.reconstruct(x)
    a, b = fm.flatten(), fm_hat.flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    return {"fm_sq": fm.pow(2).mean().item(), "fm_hat_sq": fm_hat.pow(2).mean().item(), "corr_fm_fm_hat": corr}


def main() -> None:
    p = _common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=_common.SHARED_DATA / "mvtec_ad" / "bottle")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--backbone-weights", default=None, help="VGG19 state dict (default: the shared ImageNet relu3_1 file, else random).")
    p.add_argument("--steps", default="0,60", help="Comma-separated training lengths in optimizer steps.")
    p.add_argument("--samples-per-epoch", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=_common.DEFAULT_WORKDIR / "bn_refresh")
    args = p.parse_args()
    t_start = time.perf_counter()
    result = _common.start("bn_refresh", args)
    device = _common.resolve_device(args.device)
    from wsi_haloae.config import TrainConfig
    from wsi_haloae.evaluate import find_test_set, run_evaluate
    from wsi_haloae.model import load_model, save_model
    from wsi_haloae.train.batchnorm import refresh_batchnorm
    from wsi_haloae.images import read_rgb, resize_rgb
    from wsi_haloae.model.inputs import stack_tiles
    from wsi_haloae.train.data import load_tiles
    from wsi_haloae.train.trainer import run_train, training_mean_map

    data = args.data
    if not data.is_dir() and not args.quick:
        sys.exit(f"error: {data}: no MVTec-AD category folder (needs train/good, test/, ground_truth/)")
    weights = args.backbone_weights or (str(_common.shared_file(*WEIGHTS)) if _common.shared_file(*WEIGHTS) else "random")
    steps_list = [0, 1] if args.quick else [int(v) for v in args.steps.split(",")]
    spe, bs = (2, 1) if args.quick else (args.samples_per_epoch, args.batch_size)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.quick:  # a few images (4 training, 4 test): the real category's when present, else planted IHC crops
        data = _common.quick_mvtec(args.workdir / "quick-data", data if data.is_dir() else None)
    tiles = load_tiles(data, progress=False)
    eval_data = data
    probe = stack_tiles([resize_rgb(read_rgb(it.path)) for it in find_test_set(eval_data)[:4]])
    for steps in steps_list:
        epochs = max(1, -(-steps * bs // spe))
        ema = args.workdir / f"{args.preset}-{steps}-running.safetensors"
        cfg = TrainConfig(tiles=data, out=ema, preset=args.preset, epochs=epochs, samples_per_epoch=spe, batch_size=bs,
                          backbone_weights=weights, device=str(device), workers=0 if args.quick else 1, seed=0,
                          max_steps=steps, refresh_bn=False)
        t0 = time.perf_counter()
        run_train(cfg)
        train_s = time.perf_counter() - t0
        loaded = load_model(ema, device)
        before = reconstruction_stats(loaded.model, probe.to(device))
        refresh_batchnorm(loaded.model, tiles, device, 3 * bs, 0, seed=0)
        mean_map = training_mean_map(loaded.model, tiles, device, batch_size=max(8, 3 * bs), workers=0)
        refreshed = args.workdir / f"{args.preset}-{steps}-recomputed.safetensors"
        save_model(refreshed, loaded.model, mean_map, dict(loaded.metadata, batchnorm="recomputed (bn_refresh.py)"))
        after = reconstruction_stats(loaded.model, probe.to(device))
        for label, path, stats in (("running averages", ema, before), ("recomputed on training tiles", refreshed, after)):
            ev = run_evaluate(path, eval_data, as_json=True, device=str(device), batch_size=8)
            row = {"preset": args.preset, "steps": steps, "batchnorm": label, **stats,
                   "image_auroc": ev["image_auroc"], "image_auroc_max": ev["image_auroc_max"],
                   "pixel_auroc": ev["pixel_auroc"], "aupro": ev["aupro"], "train_s": train_s}
            result["rows"].append(row)
            _common.save(result, args)
    result.update(data=str(data), weights=weights, samples_per_epoch=spe, batch_size=bs, tiles=len(tiles))
    _common.print_table(result["rows"], ["preset", "steps", "batchnorm", "fm_sq", "fm_hat_sq", "corr_fm_fm_hat",
                                         "image_auroc", "image_auroc_max", "pixel_auroc", "aupro"])
    _common.finish(result, args, t_start)


if __name__ == "__main__":
    main()
