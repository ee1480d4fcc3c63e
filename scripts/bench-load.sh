#!/bin/bash
# Server under hostile load (make bench-load): `capsule pull` of the test guest capsule
# from a `capsule serve` with default bounds, alone and then while capsule-loadgen holds
# IDLE connections that never ask anything and SLOW clients sending a request header a
# byte a second (from other loopback addresses, 25 per address), runs alternating.
# Records the pull's wall time (median of RUNS each), the loaded/unloaded rate ratio (the
# goal: >= 0.8), the server's peak and loaded RSS, and how many hostile connections were
# live, to results/load.jsonl (scripts/results-lib.sh); BENCHMARKS.md's table is
# generated from them (scripts/gen-benchmarks.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/results-lib.sh
. scripts/results-lib.sh
G=${CAPSULE_GUEST_DIR:-target/guest}
BIN=$(readlink -f "${CAPSULE_BIN:-target/release/capsule}")
LOADGEN=$(readlink -f "${CAPSULE_LOADGEN:-$(dirname "$BIN")/capsule-loadgen}")
RUNS=${RUNS:-3}
IDLE=${IDLE:-1000}
SLOW=${SLOW:-100}
W=$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-load.XXXXXX")
PIDS=()
die() { echo "bench-load: $*" >&2; exit 1; }
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do timeout 10 tail --pid="$p" -f /dev/null 2>/dev/null || kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
export CAPSULE_CONFIG_DIR=$W/config
# One UDP socket per hostile connection.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

SRV=$W/server-store
"$BIN" --store "$SRV" import guest --disk "root=$G/disk.raw" >/dev/null
size=$(stat -c %s "$G/disk.raw")
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" --store "$SRV" serve --listen "127.0.0.1:$port" --public-read >"$W/serve.log" 2>&1 &
SERVER=$!
PIDS+=("$SERVER")
for _ in $(seq 100); do grep -q "certificate SHA-256" "$W/serve.log" && break; sleep 0.1; done
grep -q "certificate SHA-256" "$W/serve.log" || die "the server did not start: $(cat "$W/serve.log")"
URL=capsule://127.0.0.1:$port

rss_kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }
# pull_s: seconds of one `capsule pull` of the guest into an empty store.
n=0
pull_s() {
  n=$((n + 1))
  local store=$W/client-$n start end
  start=$(date +%s.%N)
  "$BIN" --store "$store" pull "$URL/guest" >/dev/null 2>"$W/pull-$n.err" || die "pull failed: $(cat "$W/pull-$n.err")"
  end=$(date +%s.%N)
  rm -rf "$store"
  echo "$end - $start" | bc -l
}
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

pull_s >/dev/null # warm-up: the page cache holds the server's store for both cases
base_rss=$(rss_kib "$SERVER" VmRSS)
unloaded=()
loaded=()
for r in $(seq "$RUNS"); do
  unloaded+=("$(pull_s)")
  "$LOADGEN" --url "$URL" --idle "$IDLE" --slow "$SLOW" --every 2 >"$W/loadgen-$r.log" 2>&1 &
  LG=$!
  PIDS+=("$LG")
  # Until the crowd is in (at most 90 s).
  for _ in $(seq 45); do
    sleep 2
    last=$(tail -1 "$W/loadgen-$r.log")
    idle_live=$(sed -n 's/.*idle_live=\([0-9]*\).*/\1/p' <<<"$last")
    slow_live=$(sed -n 's/.*slow_live=\([0-9]*\).*/\1/p' <<<"$last")
    [ "${idle_live:-0}" -ge "$IDLE" ] && [ "${slow_live:-0}" -ge "$SLOW" ] && break
  done
  loaded+=("$(pull_s)")
  last=$(tail -1 "$W/loadgen-$r.log")
  echo "run $r: unloaded ${unloaded[-1]} s, loaded ${loaded[-1]} s; $last"
  loaded_rss=$(rss_kib "$SERVER" VmRSS)
  kill "$LG"
  wait "$LG" 2>/dev/null || true
done
peak_rss=$(rss_kib "$SERVER" VmHWM)
u=$(printf '%s\n' "${unloaded[@]}" | median)
l=$(printf '%s\n' "${loaded[@]}" | median)
idle_live=$(sed -n 's/.*idle_live=\([0-9]*\).*/\1/p' <<<"$last")
slow_live=$(sed -n 's/.*slow_live=\([0-9]*\).*/\1/p' <<<"$last")
refused=$(sed -n 's/.*refused=\([0-9]*\).*/\1/p' <<<"$last")
ratio=$(echo "$u / $l" | bc -l)
echo "pull of $((size >> 20)) MiB: unloaded $u s, under $idle_live idle + $slow_live slow connections $l s: rate ratio $(printf '%.2f' "$ratio") (goal >= 0.8); server RSS $((base_rss >> 10)) MiB idle, $((loaded_rss >> 10)) MiB loaded, peak $((peak_rss >> 10)) MiB"
result_line load "$(jq -n --argjson idle "$IDLE" --argjson slow "$SLOW" --argjson runs "$RUNS" --argjson bytes "$size" \
  '{idle: $idle, slow: $slow, runs: $runs, bytes: $bytes}')" \
  "$(jq -n --argjson u "$u" --argjson l "$l" --argjson ratio "$ratio" --argjson base "$base_rss" --argjson loaded "$loaded_rss" \
     --argjson peak "$peak_rss" --argjson il "${idle_live:-0}" --argjson sl "${slow_live:-0}" --argjson refused "${refused:-0}" \
     '{unloaded_s: $u, loaded_s: $l, rate_ratio: $ratio, server_rss_idle_kib: $base, server_rss_loaded_kib: $loaded,
       server_peak_rss_kib: $peak, idle_live: $il, slow_live: $sl, loadgen_refused: $refused}')"
result_flush
