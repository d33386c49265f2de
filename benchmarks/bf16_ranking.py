"""bf16 autocast against float32: how alike do the anomaly maps rank pixels and tiles, and which part rounds?

The inputs and the model state are those of tests/test_precision.py (tiny preset, BatchNorm statistics and mean
map from normal IHC tissue tiles in float32; test tiles with planted anomalies). For each backbone, the raw map
is computed with the backbone (VGG) and the auto-encoder each in float32 or bf16 (CPU autocast rounds the same
operations as CUDA autocast), post-processed with the float32 mean map, and compared with the all-float32 map
by Spearman's rank correlation over all pixels and over tile scores (mean and max).

    python benchmarks/bf16_ranking.py [--backbones FILE,random]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

import _common  # noqa: E402

WEIGHTS = ("vgg-imagenet-weights", "vgg19-imagenet-normalised-to-relu3_1.safetensors")


def main() -> None:
    p = _common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default=None, help="Comma-separated: VGG19 files and/or 'random' (default: the shared relu3_1 file and random).")
    args = p.parse_args()
    t_start = time.perf_counter()
    result = _common.start("bf16_ranking", args)
    from scipy.stats import spearmanr
    from test_precision import _tissue_tiles

    from wsi_haloae.model import build_model, postprocess, tile_scores
    from wsi_haloae.train.batchnorm import refresh_batchnorm
    from wsi_haloae.train.data import TileSet

    shared = _common.shared_file(*WEIGHTS)
    backbones = args.backbones.split(",") if args.backbones else [str(shared)] * (shared is not None) + ["random"]
    normal, test = _tissue_tiles()
    arrays = (normal.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    tiles = TileSet(root=None, paths=[None] * len(arrays), skipped=0, cache=arrays)  # type: ignore[arg-type]
    cpu = torch.device("cpu")
    for bb in backbones:
        model = build_model("tiny", bb, seed=0)
        refresh_batchnorm(model, tiles, cpu, 9, 0)
        with torch.no_grad():
            mean_map = model.anomaly_map(normal).mean(0)
            maps, energy = {}, {}
            for vgg16 in (False, True):
                for ae16 in (False, True):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=vgg16):
                        fm = model.extract(test)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ae16):
                        fm_hat = model.autoencoder(fm if ae16 else fm.float())
                    maps[(vgg16, ae16)] = (fm.float() - fm_hat.float()).pow(2).mean(1)
                    energy[(vgg16, ae16)] = (fm.float().pow(2).mean().item(), fm_hat.float().pow(2).mean().item())
        ref = postprocess(maps[(False, False)], mean_map)
        for (vgg16, ae16), raw in maps.items():
            pp = postprocess(raw, mean_map)
            row = {"backbone": model.backbone_info["source"], "vgg": "bf16" if vgg16 else "fp32", "autoencoder": "bf16" if ae16 else "fp32",
                   "fm_sq": energy[(vgg16, ae16)][0], "fm_hat_sq": energy[(vgg16, ae16)][1],
                   "spearman_pixels": float(spearmanr(ref.flatten(), pp.flatten())[0]),
                   "spearman_tiles_mean": float(spearmanr(tile_scores(ref)[0], tile_scores(pp)[0])[0]),
                   "spearman_tiles_max": float(spearmanr(tile_scores(ref)[1], tile_scores(pp)[1])[0])}
            result["rows"].append(row)
        _common.save(result, args)
    _common.print_table(result["rows"], ["backbone", "vgg", "autoencoder", "fm_sq", "fm_hat_sq", "spearman_pixels",
                                         "spearman_tiles_mean", "spearman_tiles_max"])
    _common.finish(result, args, t_start)


if __name__ == "__main__":
    main()
