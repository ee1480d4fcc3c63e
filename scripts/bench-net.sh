#!/bin/bash
# Loopback pull benchmark (make bench): `capsule pull` of the test guest capsule into an
# empty store, side by side in the same run with rsync pulling the same store directory
# from a local rsync daemon. Reports MB/s of stored (compressed) bytes moved and CPU
# seconds per GB, client and server together. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
G=${CAPSULE_GUEST_DIR:-target/guest}
BIN=$(readlink -f "${CAPSULE_BIN:-target/release/capsule}")
RUNS=${RUNS:-3}
W=$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-net.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT
export CAPSULE_CONFIG_DIR=$W/config

SRV=$W/server-store
"$BIN" --store "$SRV" import guest --disk "root=$G/disk.raw" --kernel "$G/vmlinuz" --initrd "$G/initrd.gz" \
  --cmdline "console=ttyS0" >/dev/null
stored=$(find "$SRV/blocks" "$SRV/objects" -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')

# CPU ticks (user + system) of a process so far.
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# measure NAME SERVER_PID CMD...: best-of-RUNS wall seconds, and mean CPU seconds per run.
measure() {
  local name=$1 spid=$2; shift 2
  local best= cpu_sum=0
  for run in $(seq "$RUNS"); do
    rm -rf "$W/dest"; mkdir -p "$W/dest"
    local s0; s0=$(ticks "$spid")
    /usr/bin/time -f '%e %U %S' -o "$W/time" "$@" >/dev/null 2>"$W/err" || { cat "$W/err" >&2; exit 1; }
    local s1; s1=$(ticks "$spid")
    read -r wall user sys <"$W/time"
    best=$(awk -v a="$best" -v b="$wall" 'BEGIN { print (a == "" || b < a) ? b : a }')
    cpu_sum=$(awk -v c="$cpu_sum" -v u="$user" -v s="$sys" -v d="$((s1 - s0))" -v hz="$hz" 'BEGIN { print c + u + s + d / hz }')
  done
  echo "$name $best $(awk -v c="$cpu_sum" -v r="$RUNS" 'BEGIN { print c / r }')"
}

P=$(port)
"$BIN" --store "$SRV" serve --listen "127.0.0.1:$P" --public-read >/dev/null 2>&1 &
PIDS+=($!); CAPSULE_SERVER=$!
sleep 1
read -r _ c_wall c_cpu < <(measure capsule "$CAPSULE_SERVER" "$BIN" --store "$W/dest/store" pull "capsule://127.0.0.1:$P/guest")
"$BIN" --store "$W/dest/store" verify guest >/dev/null 2>&1 || true

R=$(port)
cat >"$W/rsyncd.conf" <<CONF
pid file = $W/rsyncd.pid
use chroot = no
[store]
  path = $SRV
  read only = yes
  exclude = lock server/
CONF
rsync --daemon --no-detach --config="$W/rsyncd.conf" --port="$R" --address=127.0.0.1 &
PIDS+=($!); RSYNC_SERVER=$!
sleep 1
read -r _ r_wall r_cpu < <(measure rsync "$RSYNC_SERVER" rsync -a "rsync://127.0.0.1:$R/store/" "$W/dest/")
# Capsule fsyncs every block before naming it; rsync --fsync is the like-for-like peer.
read -r _ rf_wall rf_cpu < <(measure rsync-fsync "$RSYNC_SERVER" rsync -a --fsync "rsync://127.0.0.1:$R/store/" "$W/dest/")

row() { awk -v n="$1" -v w="$2" -v c="$3" -v b="$stored" -v rw="$r_wall" -v rc="$r_cpu" 'BEGIN {
  printf "| %s | %.0f | %.2f | %.1f | %.2f | %.2f |\n", n, b / w / 1e6, w, c / (b / 1e9), rw / w, c / rc }'; }
echo "Loopback pull of the test guest capsule ($(awk -v b="$stored" 'BEGIN { printf "%.1f", b / 1048576 }') MiB stored: disk, kernel, initrd); wall time best of $RUNS, CPU mean of $RUNS (client + server)."
echo
echo "| tool | MB/s | wall s | CPU s per GB | speed vs rsync | CPU vs rsync |"
echo "|---|---|---|---|---|---|"
row "capsule pull (QUIC, TLS 1.3, verified)" "$c_wall" "$c_cpu"
row "rsync daemon (TCP, no encryption)" "$r_wall" "$r_cpu"
row "rsync daemon --fsync (same durability)" "$rf_wall" "$rf_cpu"
