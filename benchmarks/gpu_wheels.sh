#!/usr/bin/env bash
# Download, HERE (where pip can reach PyPI), the wheels the device machine lacks for the benchmarks, into .whl/
# (git-ignored). The device image has torch, numpy, scipy, scikit-image, scikit-learn, tifffile, matplotlib,
# click, tqdm, safetensors, psutil, pytest, fsspec, toolz, pyyaml, cloudpickle, aiohttp, requests; it lacks
# OpenSlide, zarr 3, ome-zarr, dask, imagecodecs and shapely. Versions follow what is installed here. Then
# prepare the data (benchmarks/gpu_prepare.py -> .gpudata/) and call the device tool's run with carry
# [".whl", ".gpudata"] and command "benchmarks/gpu_check.sh" (it installs .whl/*.whl into /tmp/site itself).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
mkdir -p "$dest"
ver() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
pkgs=(openslide-python openslide-bin zarr numcodecs donfig google-crc32c deprecated ome-zarr ome-zarr-models
      pydantic pydantic-core pydantic-zarr annotated-types typing-inspection rangehttpserver dask partd locket
      importlib-metadata imagecodecs shapely)
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
for p in "${pkgs[@]}"; do
  v=$(ver "$p" 2>/dev/null || true)
  spec=$p${v:+==$v}
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$dest" "$spec" || python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plat[@]}" -d "$dest" "$p"
done
ls -la "$dest"; du -sh "$dest"
