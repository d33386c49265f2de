#!/usr/bin/env bash
# Stop the test SLURM started by start.sh: cancel its jobs, then end slurmd and slurmctld by their pid files.
set -uo pipefail

DIR="${WSI_HALOAE_SLURM_DIR:-/tmp/wsi-haloae-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# wsi-haloae test cluster"

# only ever touch our own cluster
if [ -e "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARK"; then
    echo "tests/slurm/stop.sh: $CONF is not ours; leaving it alone" >&2
    exit 0
fi

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$DIR/slurmctld.pid"; then
    # every job on this private test cluster was submitted by the tests
    timeout 10 scancel --quiet --full --state=RUNNING >/dev/null 2>&1 || true
    timeout 10 scancel --quiet --state=PENDING >/dev/null 2>&1 || true
fi

for d in slurmd slurmctld; do
    pidf="$DIR/$d.pid"
    alive "$pidf" || continue
    pid="$(cat "$pidf")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "tests/slurm/stop.sh: $d (pid $pid) ignored TERM; sending KILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidf"
done
exit 0
