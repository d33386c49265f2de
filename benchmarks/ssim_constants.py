"""SSIM constants on VGG features: the per-sample data range (before) against the paper's fixed C1, C2.

Why: SSIM's C2 only guards a division, but set from the feature range (L = max − min of a sample, C2 =
(0.03·L)²) it exceeds the local feature variance in most channel × window pairs, and 1 − SSIM of a bad
reconstruction collapses towards 0 (the feature loss becomes plain MSE). This measures, on real tiles and a
real backbone: the share of (channel, window) pairs whose local variance σ² of fm is below C2, and 1 − SSIM
of three degraded reconstructions f̂m of fm, with the old and the new constants.

    python benchmarks/ssim_constants.py [--data ../shared/data/mvtec_ad/bottle] [--preset r31]
           [--backbone-weights ../shared/data/vgg-imagenet-weights/vgg19-imagenet-normalised-to-relu3_1.safetensors]
           [--images 16] [--quick]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common  # noqa: E402

WEIGHTS = ("vgg-imagenet-weights", "vgg19-imagenet-normalised-to-relu3_1.safetensors")


def local_variance(y: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted local variance σ² per (sample, channel, valid window), in float64 (no cancellation)."""
    from wsi_haloae.train.losses import SIGMA, WINDOW, gaussian_window

    y = y.double()
    c = y.shape[1]
    k = gaussian_window(WINDOW, SIGMA, dtype=torch.float64).expand(c, 1, WINDOW, WINDOW).contiguous()
    mu = F.conv2d(y, k, groups=c)
    return (F.conv2d(y * y, k, groups=c) - mu**2).clamp_min(0)


def degradations(fm: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Reconstructions an auto-encoder could plausibly produce, each clearly worse than fm itself."""
    from wsi_haloae.train.losses import gaussian_window

    c = fm.shape[1]
    k = gaussian_window(5, 1.0).expand(c, 1, 5, 5).contiguous()
    blur = F.conv2d(F.pad(fm, (2, 2, 2, 2), mode="replicate"), k, groups=c)
    std = fm.std(dim=(2, 3), keepdim=True)
    noise = fm + 0.3 * std * torch.randn(fm.shape, generator=g)
    mean = fm.mean(dim=(2, 3), keepdim=True).expand_as(fm)  # the per-channel mean map: no structure at all
    return {"blur sigma 1 px": blur, "noise 0.3 channel std": noise, "channel mean (no structure)": mean}


def main() -> None:
    p = _common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=_common.SHARED_DATA / "mvtec_ad" / "bottle")
    p.add_argument("--preset", default="r31")
    p.add_argument("--backbone-weights", default=None, help="VGG19 state dict (default: the shared ImageNet relu3_1 file, else random).")
    p.add_argument("--images", type=int, default=16, help="Training images to use (the first N, sorted).")
    args = p.parse_args()
    t_start = time.perf_counter()
    result = _common.start("ssim_constants", args)
    from wsi_haloae.model import build_model
    from wsi_haloae.images import read_rgb, resize_rgb
    from wsi_haloae.model.inputs import stack_tiles
    from wsi_haloae.train.data import find_images, tile_root
    from wsi_haloae.train.losses import C2, K2, ssim

    weights = args.backbone_weights or (str(_common.shared_file(*WEIGHTS)) if _common.shared_file(*WEIGHTS) else "random")
    preset = "tiny" if args.quick else args.preset
    n_images = 2 if args.quick else args.images
    if args.data.is_dir():
        files = find_images(tile_root(args.data))[:n_images]
        x = stack_tiles([resize_rgb(read_rgb(f)) for f in files])
        source = str(args.data)
    else:  # no shared data: the IHC image shipped with scikit-image
        from skimage.data import immunohistochemistry

        im = immunohistochemistry()
        x = stack_tiles([im[i * 128 : i * 128 + 256, :256] for i in range(n_images)])
        source = "skimage.data.immunohistochemistry"
    model = build_model(preset, weights).eval()
    with torch.no_grad():
        fm = model.extract(x).float()
    n = fm.shape[0]
    L = (fm.reshape(n, -1).amax(1) - fm.reshape(n, -1).amin(1))
    c2_old = (K2 * L) ** 2
    var = local_variance(fm)
    frac_old = (var < c2_old.double().view(n, 1, 1, 1)).double().mean().item()
    frac_new = (var < C2).double().mean().item()
    result.update(data=source, images=n, preset=preset, backbone=model.backbone_info.get("source"), weights=weights,
                  fm_shape=list(fm.shape), range_L={"min": L.min().item(), "median": L.median().item(), "max": L.max().item()},
                  c2_old_median=c2_old.median().item(), c2_new=C2,
                  local_variance_quantiles={q: torch.quantile(var.flatten()[:: max(1, var.numel() // 10**6)], q).item()
                                            for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
                  frac_var_below_c2_old=frac_old, frac_var_below_c2_new=frac_new)
    print(f"# {source}: {n} images, {preset} features {tuple(fm.shape[1:])}, backbone {result['backbone']}")
    print(f"# per-sample range L: median {L.median():.2f} (C2 old = (0.03 L)^2 = {c2_old.median():.3f}); C2 new = {C2:g}")
    print(f"# channel x window pairs with local variance < C2: old {100 * frac_old:.1f} %, new {100 * frac_new:.1f} %")
    g = torch.Generator().manual_seed(0)
    for name, fm_hat in degradations(fm, g).items():
        old = 1 - ssim(fm_hat, fm, data_range=L).item()
        new = 1 - ssim(fm_hat, fm).item()
        new64 = 1 - ssim(fm_hat.double(), fm.double()).item()  # ssim computes in float32: check it against float64
        mse = F.mse_loss(fm_hat, fm).item()
        result["rows"].append({"degradation": name, "mse": mse, "one_minus_ssim_old": old, "one_minus_ssim_new": new, "one_minus_ssim_new_fp64": new64,
                               "loss_old": mse + old, "loss_new": mse + new})
        print(f"  {name}: MSE {mse:.4g}; 1 - SSIM old {old:.4f}, new {new:.4f} (float64 {new64:.4f})")
    _common.print_table(result["rows"], ["degradation", "mse", "one_minus_ssim_old", "one_minus_ssim_new", "loss_old", "loss_new"])
    _common.finish(result, args, t_start)


if __name__ == "__main__":
    main()
