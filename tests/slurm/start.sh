#!/usr/bin/env bash
# Start a real single-node SLURM (Debian slurm-wlm 22.05) for the test suite: slurmctld + slurmd as root,
# AuthType=auth/none, state/spool/logs under $WSI_HALOAE_SLURM_DIR (default /tmp/wsi-haloae-slurm).
# Idempotent: when our cluster is already up it returns at once; when slurm-wlm is installed it skips apt.
# Exits non-zero with one clear line on stderr when SLURM cannot be had (the SLURM tests then skip).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
DIR="${WSI_HALOAE_SLURM_DIR:-/tmp/wsi-haloae-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# wsi-haloae test cluster"
WAIT="${WSI_HALOAE_SLURM_WAIT:-60}"

die() { echo "tests/slurm/start.sh: $*" >&2; exit 1; }
log() { echo "tests/slurm/start.sh: $*" >&2; }

[ "$(id -u)" = 0 ] || die "needs root to run slurmctld/slurmd as the test cluster (running as $(id -un))"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
usable() { timeout 10 sinfo -h -N -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; }

if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && usable; then
    log "already running ($DIR)"
    exit 0
fi

# 1. install slurm-wlm when missing (quick no-op when present)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm is not installed and there is no apt-get to install it"
    log "installing slurm-wlm"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm; } >"${TMPDIR:-/tmp}/wsi-haloae-slurm-apt.log" 2>&1 \
        || die "apt-get install slurm-wlm failed (log: ${TMPDIR:-/tmp}/wsi-haloae-slurm-apt.log)"
fi

# 2. never take over somebody's real cluster configuration
if [ -e "$CONF" ] && ! head -1 "$CONF" | grep -qF "$MARK"; then
    die "$CONF exists and is not ours; refusing to overwrite a real SLURM configuration"
fi

# 3. stop leftovers of an earlier run of ours, then write a fresh configuration from this machine's hardware
bash "$HERE/stop.sh" >/dev/null 2>&1 || true
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm
HOST="$(hostname -s)"
HW="$(slurmd -C | head -1)"
field() { echo "$HW" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
CPUS="$(field CPUs)"; SOCKETS="$(field SocketsPerBoard)"; CORES="$(field CoresPerSocket)"; THREADS="$(field ThreadsPerCore)"
MEM="$(field RealMemory)"
[ -n "$CPUS" ] && [ -n "$MEM" ] || die "could not read this machine's CPUs/memory from 'slurmd -C' ($HW)"
MEM=$(( MEM * 9 / 10 ))   # slurmd drains a node whose real memory is below RealMemory: leave headroom
sed -e "s|@HOST@|$HOST|g" -e "s|@DIR@|$DIR|g" -e "s|@CPUS@|$CPUS|g" -e "s|@SOCKETS@|${SOCKETS:-1}|g" \
    -e "s|@CORES@|${CORES:-$CPUS}|g" -e "s|@THREADS@|${THREADS:-1}|g" -e "s|@MEM@|$MEM|g" \
    -e "s|@CTLD_PORT@|${WSI_HALOAE_SLURMCTLD_PORT:-6817}|g" -e "s|@SLURMD_PORT@|${WSI_HALOAE_SLURMD_PORT:-6818}|g" \
    "$HERE/slurm.conf.in" >"$CONF.tmp"
mv "$CONF.tmp" "$CONF"
getent hosts "$HOST" >/dev/null || log "warning: $HOST does not resolve; using NodeAddr=127.0.0.1"

# 4. start the daemons (-c: clear old job state so a previous run's jobs do not come back)
slurmctld -c || die "slurmctld failed to start (see $DIR/log/slurmctld.log)"
slurmd || die "slurmd failed to start (see $DIR/log/slurmd.log)"

# 5. bounded wait until the node is idle and a job step really runs
deadline=$(( $(date +%s) + WAIT ))
until usable; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        state="$(timeout 5 sinfo -h -N -o '%t %E' 2>&1 || true)"
        die "node not idle after ${WAIT}s (sinfo: ${state:-nothing}); logs in $DIR/log"
    fi
    # a node that came up DOWN (e.g. after an unclean stop) is brought back explicitly
    timeout 5 scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    sleep 1
done
out="$(timeout "$WAIT" srun -N1 -n1 -t 1 hostname 2>&1)" || die "'srun hostname' failed: $out (logs in $DIR/log)"
log "SLURM up: node $HOST ($CPUS CPUs, ${MEM} MB), srun -> $out"
