#!/usr/bin/env bash
# The four learning-curve runs of RESULTS.md, two at a time (one r31 beside one tiny: r31 training, even at its
# batch of 2, takes ~5 GB; two would crowd other work on a 24 GB machine), each at nice 10 with one
# torch thread, in the background; logs in benchmarks/out/learning_curve/*.log, results in
# benchmarks/results/learning_curve-<preset>-<data>.json. Re-running continues unfinished runs where they
# stopped. When both queues are done, `python benchmarks/learning_curve.py --report` draws the figures.
#
#   benchmarks/learning_curve_all.sh            # start both queues (returns at once; prints their PIDs)
#   benchmarks/learning_curve_all.sh r31        # only the r31 queue (e.g. to restart it)
set -euo pipefail
cd "$(dirname "$0")/.."
LOGS=benchmarks/out/learning_curve
mkdir -p "$LOGS"
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1  # numpy / scikit-learn too: one thread each

queue() {  # run one preset on the tissue set, then on bottle
    local preset=$1
    for data in tissue bottle; do
        nice -n 10 "$PY" benchmarks/learning_curve.py --preset "$preset" --data "$data" --threads 1 \
            >>"$LOGS/$preset-$data.log" 2>&1 || echo "run $preset $data failed: see $LOGS/$preset-$data.log" >>"$LOGS/queue-$preset.log"
    done
}

presets=("$@")
[ ${#presets[@]} -eq 0 ] && presets=(r31 tiny)
for preset in "${presets[@]}"; do
    nohup bash -c "$(declare -f queue); LOGS=$LOGS PY=$PY queue $preset" >>"$LOGS/queue-$preset.log" 2>&1 &
    echo "queue $preset: PID $! (logs $LOGS/$preset-tissue.log, $LOGS/$preset-bottle.log)"
done
