#!/usr/bin/env bash
# One prepared GPU check, at most 9 minutes on one GPU (an H200), every figure in ONE JSON:
#   1. the test suite's CUDA tests (pytest -m cuda)
#   2. anomaly_map throughput of tiny / r31 / paper in bf16 + channels_last, the fp32 and NCHW levers, and
#      torch.compile of paper (bench_model)
#   3. infer end to end on a generated 16384² real-tissue slide with the paper preset (bench_infer)
#   4. training throughput: images/s and FLOP/s against the matmul's, levers, compile (bench_train)
#   5. the two attentions side by side: train the preset with real halo attention and with the authors'
#      inverted mask for a fixed time each on MVTec-AD bottle, then evaluate both (train_compare; r31 with the
#      ImageNet relu3_1 backbone when its file is there, else paper with a random backbone; skipped cleanly
#      without bottle)
#
#   benchmarks/gpu_check.sh [--dry-run] [OUTDIR]
#
# OUTDIR (default $OUT, else benchmarks/results/gpu_check-<date>) receives gpu_check.json (everything),
# gpu_check.log and nvidia-smi.txt; a real run also copies the JSON to benchmarks/results/gpu_check-<date>.json.
# Every step runs under `timeout` with its own limit (the limits add up to < 9 minutes with the kill grace),
# so one hung step cannot eat the budget; a benchmark cut by its limit keeps the rows it had saved.
# --dry-run prints the plan, then runs every step at trivial size on the CPU (the CUDA tests too, on the CPU:
# WSI_HALOAE_CUDA_TESTS_ON_CPU=1; GPU_CHECK_PYTEST_ARGS narrows them) - what tests/test_benchmarks.py does.
#
# On the device machine (bare image: torch, scipy, scikit-image, pytest, no OpenSlide/zarr/dask), prepare HERE:
#   benchmarks/gpu_wheels.sh          # wheels the image lacks -> .whl/ (~40 MB)
#   python benchmarks/gpu_prepare.py  # ../shared parts it needs -> .gpudata/ (~9 MB: bottle at 256², weights, CMU-1)
# then call the device tool's run with carry [".whl", ".gpudata"], command "benchmarks/gpu_check.sh",
# timeout_s 570.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
stamp=$(date -u +%Y%m%dT%H%M%S)
out=${1:-${OUT:-benchmarks/results/gpu_check-$stamp}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
log="$out/gpu_check.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export WSI_HALOAE_BENCH_DIR=${WSI_HALOAE_BENCH_DIR:-$work/bench}
if [ -d .gpudata ] && [ -z "${WSI_HALOAE_SHARED_DATA:-}" ]; then export WSI_HALOAE_SHARED_DATA=$PWD/.gpudata; fi
data=${WSI_HALOAE_SHARED_DATA:-$(cd .. && pwd)/shared/data}
weights=$data/vgg-imagenet-weights/vgg19-imagenet-normalised-to-relu3_1.safetensors
bottle=$data/mvtec_ad/bottle
if [ -f "$weights" ]; then cmp_args=(--preset r31 --backbone-weights "$weights"); else cmp_args=(--preset paper --backbone-weights random); fi

# name | limit on the GPU (s) | limit in --dry-run (s) | command
if [ $dry = 1 ]; then
  dev=(--device cpu); q=(--quick)
  export WSI_HALOAE_CUDA_TESTS_ON_CPU=1 CUDA_VISIBLE_DEVICES=""
  pytest_args=(${GPU_CHECK_PYTEST_ARGS:-})
else
  dev=(--device cuda); q=(); pytest_args=()
fi
steps=(
  "tests|60|900|$PY -m pytest -q -m cuda -p no:cacheprovider --junitxml $work/tests.xml ${pytest_args[*]:-}"
  "model|110|600|$PY benchmarks/bench_model.py ${q[*]:-} ${dev[*]} --compile --min-seconds 0.5 --out $work/model.json"
  "infer|80|600|$PY benchmarks/bench_infer.py ${q[*]:-} ${dev[*]} $([ $dry = 1 ] || echo --size 16384 --preset paper --workers 8) --out $work/infer.json"
  "train|60|600|$PY benchmarks/bench_train.py ${q[*]:-} ${dev[*]} --out $work/train.json"
  "compare|125|900|$PY benchmarks/train_compare.py ${q[*]:-} ${dev[*]} ${cmp_args[*]} --data $bottle --max-seconds 40 --out $work/compare.json"
)
setup_limit=45; report_limit=10

plan() {
  echo "# benchmarks/gpu_check.sh $([ $dry = 1 ] && echo '--dry-run ')$out  ($(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  echo "# plan ($([ $dry = 1 ] && echo 'dry run: trivial sizes on the CPU' || echo 'GPU')); data: $data"
  echo "#   setup   limit ${setup_limit}s: install .whl/*.whl and the package into /tmp when they are missing"
  total=$((setup_limit + report_limit + 5 * (${#steps[@]} + 2)))
  for s in "${steps[@]}"; do
    IFS='|' read -r name lim dlim cmd <<<"$s"
    l=$([ $dry = 1 ] && echo "$dlim" || echo "$lim"); total=$((total + l))
    printf '#   %-7s limit %4ss: %s\n' "$name" "$l" "$cmd"
  done
  echo "#   report  limit ${report_limit}s: benchmarks/gpu_report.py -> $out/gpu_check.json"
  echo "# worst case with kill grace: ${total}s"
}

run_step() {  # name limit command...: run under timeout, record "name limit seconds rc" in steps.tsv
  local name=$1 lim=$2; shift 2
  echo "## $name (limit ${lim}s)"
  local t0; t0=$(date +%s.%N)
  timeout -k 5 "$lim" "$@"
  local rc=$?
  local t1; t1=$(date +%s.%N)
  printf '%s\t%s\t%s\t%s\n' "$name" "$lim" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')" "$rc" >> "$work/steps.tsv"
  echo "## $name: rc=$rc"
  return 0
}

{
  plan
  setup() {
    if ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import openslide, zarr, dask" 2>/dev/null; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 3
    fi
    if ! $PY -c "import wsi_haloae.presets" 2>/dev/null; then
      $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/wsi . || return 3
    fi
  }
  export PYTHONPATH=/tmp/site:/tmp/wsi${PYTHONPATH:+:$PYTHONPATH}
  export -f setup; export PY
  run_step setup "$setup_limit" bash -c setup
  if [ $dry = 0 ] && ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device here (benchmarks/gpu_check.sh --dry-run runs the plan on the CPU)"; exit 2
  fi
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$out/nvidia-smi.txt"
  for s in "${steps[@]}"; do
    IFS='|' read -r name lim dlim cmd <<<"$s"
    [ $dry = 1 ] && lim=$dlim
    # shellcheck disable=SC2086  # the command is a word list by design
    run_step "$name" "$lim" $cmd
  done
  timeout -k 5 "$report_limit" $PY benchmarks/gpu_report.py "$work" "$out/gpu_check.json" \
    $([ $dry = 1 ] && echo --dry-run) --nvidia-smi "$out/nvidia-smi.txt"
  if [ $dry = 0 ] && [ -f "$out/gpu_check.json" ]; then cp "$out/gpu_check.json" "benchmarks/results/gpu_check-$stamp.json"; fi
  echo "# done in $(awk -F'\t' '{s += $3} END {printf "%.0f", s}' "$work/steps.tsv" 2>/dev/null) s"
} 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
rm -rf "$work"
exit "$rc"
