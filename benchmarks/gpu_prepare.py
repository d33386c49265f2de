"""Prepare, HERE, the data gpu_check.sh uses on the device machine, which cannot see ../shared: ``.gpudata/``.

The device tool carries at most 64 MiB with the working tree, so this writes a compact mirror of the parts of
../shared/data that the GPU check needs, in the same layout (gpu_check.sh points WSI_HALOAE_SHARED_DATA at it):
the offline ImageNet VGG19 weights to relu3_1 (2.2 MB), CMU-1-Small-Region.svs (1.9 MB, the tissue of the
end-to-end slide), and MVTec-AD bottle resized to 256×256 — the size the model reads anyway; images as JPEG
quality 95, masks as PNG (nearest) — about 7 MB instead of 150. Evaluation on it therefore measures pixel
metrics at 256² instead of 900². ``.gpudata/`` is git-ignored (.gitignore); carry it with ``carry:
[".whl", ".gpudata"]``.

    python benchmarks/gpu_prepare.py [--dest .gpudata]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

PARTS = [("vgg-imagenet-weights", "vgg19-imagenet-normalised-to-relu3_1.safetensors"), _common.CMU_SMALL]


def resize_category(src: Path, dst: Path, size: int = 256) -> int:
    from PIL import Image

    n = 0
    for f in sorted(src.rglob("*.png")):
        rel = f.relative_to(src)
        mask = rel.parts[0] == "ground_truth"
        out = dst / (rel if mask else rel.with_suffix(".jpg"))
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as im:
            im = im.resize((size, size), Image.NEAREST if mask else Image.BILINEAR)
            if mask:
                im.save(out)
            else:
                im.convert("RGB").save(out, quality=95)
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", type=Path, default=_common.REPO / ".gpudata")
    args = p.parse_args()
    for parts in PARTS:
        src = _common.shared_file(*parts)
        if src is None:
            print(f"# absent, not carried: {_common.SHARED_DATA.joinpath(*parts)}")
            continue
        out = args.dest.joinpath(*parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, out)
    bottle = _common.shared_file("mvtec_ad", "bottle")
    if bottle is not None:
        dst = args.dest / "mvtec_ad" / "bottle"
        shutil.rmtree(dst, ignore_errors=True)
        print(f"# bottle: {resize_category(bottle, dst)} images resized to 256x256")
    total = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"# {args.dest}: {total / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
