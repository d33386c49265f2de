#!/usr/bin/env bash
# One prepared GPU check (under 5 minutes on an H200): model throughput (bench_model), end to end
# (bench_infer) and training throughput (bench_train) with GPU settings; results to a folder.
#
#   benchmarks/gpu_check.sh [OUTDIR]      # OUTDIR defaults to $OUT, else benchmarks/results/gpu-<date>
#
# Never run in CI. On the device machine (a bare image with torch but without OpenSlide, zarr, ...), first
# prepare the wheels here with benchmarks/gpu_wheels.sh and carry .whl; this script installs them and the
# package itself into /tmp, so nothing is built or fetched there. Files written (at most 8, for $OUT):
# gpu_check.log, nvidia-smi.txt, model.json, infer.json, train.json.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%S)}}
mkdir -p "$out"
log="$out/gpu_check.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
t0=$(date +%s)
{
  echo "# benchmarks/gpu_check.sh $out  ($(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "warning: installing .whl failed"
  fi
  if ! $PY -c "import wsi_haloae.presets" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/wsi . \
      && export PYTHONPATH=/tmp/wsi${PYTHONPATH:+:$PYTHONPATH} || { echo "error: cannot install the package"; exit 3; }
  fi
  missing=$($PY - <<'PY'
import importlib
mods = ["torch", "openslide", "tifffile", "imagecodecs", "zarr", "numcodecs", "ome_zarr", "dask", "skimage",
        "safetensors", "click", "tqdm", "psutil", "PIL", "wsi_haloae.infer.engine"]
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as exc:  # noqa: BLE001
        bad.append(f"{m} ({type(exc).__name__}: {exc})")
print("; ".join(bad))
PY
)
  [ -n "$missing" ] && echo "warning: cannot import: $missing (bench_infer needs them; run benchmarks/gpu_wheels.sh and carry .whl)"
  quick=()
  if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then echo "error: no CUDA device (GPU_CHECK_ALLOW_CPU=1 runs a --quick CPU smoke run)"; exit 2; fi
    quick=(--quick)
  fi
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
  export WSI_HALOAE_BENCH_DIR=${WSI_HALOAE_BENCH_DIR:-/tmp/wsi-haloae-bench}
  # time limits: 120 + 90 + 50 s, leaving room for installs and imports inside 5 minutes; each script saves
  # its JSON after every row, so a run cut by its limit keeps what it measured (torch.compile runs last)
  echo "## bench_model"; timeout 120 $PY benchmarks/bench_model.py "${quick[@]}" --compile --out "$out/model.json"; echo "rc=$?"
  echo "## bench_infer"; timeout 90 $PY benchmarks/bench_infer.py "${quick[@]}" --out "$out/infer.json"; echo "rc=$?"
  echo "## bench_train"; timeout 50 $PY benchmarks/bench_train.py "${quick[@]}" --out "$out/train.json"; echo "rc=$?"
  echo "# done in $(( $(date +%s) - t0 )) s"
} 2>&1 | tee "$log"
