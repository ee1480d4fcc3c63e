#!/bin/bash
# Loopback pull benchmark (make bench): `capsule pull` of the test guest capsule into an
# empty store, side by side in the same run with rsync pulling the same store directory
# from a local rsync daemon (plain, and with --fsync: capsule's blocks are durable before
# a ref names them).
# Measures wall seconds (best of RUNS) and CPU seconds (mean of RUNS) of the client and of
# the whole server: the server and each client run in a cgroup of their own (cpuacct),
# so the rsync daemon's per-connection children count too. Writes one JSON line per tool
# to results/net.jsonl (scripts/results-lib.sh); BENCHMARKS.md's table is generated from
# them (scripts/gen-benchmarks.py) and printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/results-lib.sh
. scripts/results-lib.sh
G=${CAPSULE_GUEST_DIR:-target/guest}
BIN=$(readlink -f "${CAPSULE_BIN:-target/release/capsule}")
RUNS=${RUNS:-3}
W=$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-net.XXXXXX")
PIDS=()
CGROUPS=()
die() { echo "bench-net: $*" >&2; exit 1; }

# CPU accounting by cgroup: v2 (cpu.stat usage_usec) or v1 cpuacct (cpuacct.usage, ns).
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  CG_ROOT=/sys/fs/cgroup
  cg_usage() { awk '$1 == "usage_usec" { printf "%.6f\n", $2 / 1e6 }' "$1/cpu.stat"; }
elif [ -d /sys/fs/cgroup/cpuacct ]; then
  CG_ROOT=/sys/fs/cgroup/cpuacct
  cg_usage() { awk '{ printf "%.6f\n", $1 / 1e9 }' "$1/cpuacct.usage"; }
else
  die "no cgroup CPU accounting (/sys/fs/cgroup): cannot count the servers' CPU"
fi
# cg_new NAME: a new cgroup, in $CG.
cg_new() { CG=$CG_ROOT/capsule-bench-net-$$-$1; mkdir "$CG" || die "cannot create cgroup $CG"; CGROUPS+=("$CG"); }
# IN_CG CGROUP CMD...: runs CMD inside CGROUP (and so its children); sh execs CMD, so $! of
# a background IN_CG is CMD's pid.
IN_CG=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"')

cleanup() {
  local p cg
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do timeout 10 tail --pid="$p" -f /dev/null 2>/dev/null || kill -9 "$p" 2>/dev/null || true; done
  for cg in "${CGROUPS[@]}"; do
    # Anything still in it (an rsync daemon's child): to the parent cgroup, then remove it.
    for p in $(cat "$cg/cgroup.procs" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    for _ in $(seq 50); do rmdir "$cg" 2>/dev/null && break; sleep 0.1; done
  done
  rm -rf "$W"
}
trap cleanup EXIT
export CAPSULE_CONFIG_DIR=$W/config

SRV=$W/server-store
"$BIN" --store "$SRV" import guest --disk "root=$G/disk.raw" --kernel "$G/vmlinuz" --initrd "$G/initrd.gz" \
  --cmdline "console=ttyS0" >/dev/null
stored=$(find "$SRV/blocks" "$SRV/packed" "$SRV/objects" -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')
files=$(find "$SRV/blocks" "$SRV/packed" "$SRV/objects" -type f | wc -l)

port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# quiet_server CGROUP: until nothing in CGROUP but its first process runs (an rsync daemon's
# child for the last connection has exited), at most 10 s.
quiet_server() { for _ in $(seq 100); do [ "$(wc -l <"$1/cgroup.procs")" -le 1 ] && return 0; sleep 0.1; done; die "server children still running"; }

# measure TOOL SERVER_CGROUP CMD...: one result line: best-of-RUNS wall seconds, mean CPU
# seconds per run of the client (its cgroup) and of the server (its cgroup).
measure() {
  local tool=$1 scg=$2; shift 2
  local best= ccpu=0 scpu=0 run ccg s0 s1 c0 c1 wall
  cg_new "client-$tool"; ccg=$CG
  for run in $(seq "$RUNS"); do
    rm -rf "$W/dest"; mkdir -p "$W/dest"
    sync
    s0=$(cg_usage "$scg"); c0=$(cg_usage "$ccg")
    /usr/bin/time -f '%e' -o "$W/time" "${IN_CG[@]}" "$ccg" "$@" >/dev/null 2>"$W/err" \
      || { cat "$W/err" >&2; die "$tool failed"; }
    quiet_server "$scg"
    s1=$(cg_usage "$scg"); c1=$(cg_usage "$ccg")
    read -r wall <"$W/time"
    best=$(awk -v a="$best" -v b="$wall" 'BEGIN { print (a == "" || b < a) ? b : a }')
    ccpu=$(awk -v c="$ccpu" -v a="$c0" -v b="$c1" 'BEGIN { print c + b - a }')
    scpu=$(awk -v c="$scpu" -v a="$s0" -v b="$s1" 'BEGIN { print c + b - a }')
  done
  result_line net "$(jq -n --arg tool "$tool" --argjson runs "$RUNS" '{tool: $tool, runs: $runs}')" \
    "$(jq -n --argjson stored "$stored" --argjson files "$files" --argjson wall "$best" \
          --argjson c "$(awk -v c="$ccpu" -v r="$RUNS" 'BEGIN { printf "%.4f", c / r }')" \
          --argjson s "$(awk -v c="$scpu" -v r="$RUNS" 'BEGIN { printf "%.4f", c / r }')" \
          '{stored_bytes: $stored, files: $files, wall_seconds_best: $wall, client_cpu_seconds_mean: $c, server_cpu_seconds_mean: $s}')"
}

echo "bench-net: capsule pull" >&2
cg_new capsule-serve; SCG=$CG
P=$(port)
"${IN_CG[@]}" "$SCG" "$BIN" --store "$SRV" serve --listen "127.0.0.1:$P" --public-read >/dev/null 2>&1 &
PIDS+=($!)
sleep 1
measure capsule "$SCG" "$BIN" --store "$W/dest/store" pull "capsule://127.0.0.1:$P/guest"
"$BIN" --store "$W/dest/store" verify guest >/dev/null 2>&1 || die "the pulled capsule does not verify"

echo "bench-net: rsync" >&2
cg_new rsyncd; RCG=$CG
R=$(port)
cat >"$W/rsyncd.conf" <<CONF
pid file = $W/rsyncd.pid
use chroot = no
[store]
  path = $SRV
  read only = yes
  exclude = lock server/
CONF
"${IN_CG[@]}" "$RCG" rsync --daemon --no-detach --config="$W/rsyncd.conf" --port="$R" --address=127.0.0.1 &
PIDS+=($!)
sleep 1
measure rsync "$RCG" rsync -a "rsync://127.0.0.1:$R/store/" "$W/dest/"
# Capsule's blocks are durable (one pack, fsynced) before a ref names them; rsync --fsync is
# the like-for-like peer.
measure rsync-fsync "$RCG" rsync -a --fsync "rsync://127.0.0.1:$R/store/" "$W/dest/"

result_flush
python3 scripts/gen-benchmarks.py --show net
