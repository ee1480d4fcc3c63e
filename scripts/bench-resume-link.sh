#!/bin/bash
# Resume over slow links (make bench-resume-link): a suspended test guest (it prints a
# counter every second) served across an emulated link, resumed by `capsule run` on an
# empty cache, with and without the fault-granularity fix. The link is the one
# bench-link.sh builds: two network namespaces of our own joined by a veth pair, tc tbf
# on each end, capsule-linkemu beside the server adding 20 ms each way (40 ms RTT).
# Measured per run: seconds to load the device state ("resumed in"), to the first counter
# after the resume and to the fifth, and the RAM and wire bytes fetched by the fifth.
# Runs per rate: the default (the fix, with RAM fault clusters sized from the measured
# round trip), `--memory-cluster 1` (the fix alone: one page per fault), without the fix,
# and the default with `--prefetch memory` (the RAM image fetched in the background, below
# the guest's faults); clusterN fixes the cluster at N.
# RATES="2mbit 10mbit" picks the rates, VARIANTS="fix cluster1 nofix prefetch" the runs.
# Every time runs from the start of `capsule run` (mount over the link, QEMU start, device
# state load): "device state loaded" is when its "resumed" line appears (polled every 0.1 s).
# Writes one JSON line per rate and variant to results/resume-link.jsonl
# (scripts/results-lib.sh); BENCHMARKS.md's table is generated from them
# (scripts/gen-benchmarks.py) and printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/results-lib.sh
. scripts/results-lib.sh
G=$(readlink -f "${CAPSULE_GUEST_DIR:-target/guest}")
BIN=$(readlink -f "${CAPSULE_BIN:-target/release/capsule}")
EMU=$(dirname "$BIN")/capsule-linkemu
RATES=${RATES:-2mbit 10mbit}
# fix, nofix, prefetch (--prefetch memory), clusterN (--memory-cluster N): all with
# --prefetch none; profile (run's default: the capsule's resume profile, recorded by a
# first resume, fetched ahead), profile1 (the same with one-page faults)
VARIANTS=${VARIANTS:-fix cluster1 nofix prefetch profile}
NS=capsule-rbench-$$
SNS=capsule-rbench-srv-$$
SRV_IP=10.212.0.1
VETH=caprb$$
CLI_IP=10.212.0.2
# shellcheck source=scripts/link-lib.sh
. scripts/link-lib.sh
W=$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-resume.XXXXXX")
PIDS=()
RUNS=()
cleanup() {
  # Runs first, while the server still answers: a run stops its guest, unmounts, exits.
  for p in "${RUNS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${RUNS[@]}"; do timeout 40 tail --pid="$p" -f /dev/null 2>/dev/null || kill -9 "$p" 2>/dev/null || true; done
  for rec in "$W"/runs/*/run.json; do [ -f "$rec" ] && kill -9 "$(jq -r .qemu_pid "$rec")" 2>/dev/null || true; done
  awk -v w="$W" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do fusermount3 -uz "$m" 2>/dev/null || true; done
  pkill -9 -f "mount .* $W/runs/" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  link_delete
  rm -rf "$W"
}
trap cleanup EXIT
export CAPSULE_CONFIG_DIR=$W/config CAPSULE_RUN_DIR=$W/runs
die() { echo "bench-resume-link: $*" >&2; exit 1; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
wait_for() { # wait_for FILE PATTERN TIMEOUT_S PID: until FILE has PATTERN
  local end=$((SECONDS + $3))
  until grep -qaE -- "$2" "$1" 2>/dev/null; do
    kill -0 "$4" 2>/dev/null || { cat "$1" "${1%.console}.out" >&2 2>/dev/null; die "run ended before '$2'"; }
    [ "$SECONDS" -lt "$end" ] || die "no '$2' in $1 within $3 s"
    sleep 0.1
  done
}

link_create

# The suspended capsule, made locally: boot, dirty and free 96 MiB, count, suspend.
PUB=$W/publisher
"$BIN" --store "$PUB" import guest --disk "root=$G/disk.raw" --kernel "$G/vmlinuz" --initrd "$G/initrd.gz" \
  --cmdline "console=ttyS0 quiet panic=-1" >/dev/null
"$BIN" --store "$PUB" run guest --cache "$W/pub-cache" --accel tcg --id pub --quiet --serial-log "$W/pub.console" \
  --append "gmode=loop gdirty=96" >"$W/pub.out" 2>&1 &
RUNS+=($!)
wait_for "$W/pub.console" "COUNTER 3" 180 "${RUNS[0]}"
"$BIN" --store "$PUB" suspend pub suspended --json >"$W/suspend.json"
wait "${RUNS[0]}" || true
RUNS=()
ram_blocks=$(sed -n '/^{/,$p' "$W/suspend.json" | jq .memory_blocks)
stored=$(sed -n '/^{/,$p' "$W/suspend.json" | jq .stored_bytes)

# The learnt RAM working set: one local resume to the fifth counter, recorded as profile
# "resume" (the fault order of a first resume, kept with the capsule and served with it).
if [[ " $VARIANTS " == *" profile"* ]]; then
  "$BIN" --store "$PUB" run suspended --cache "$W/rec-cache" --id rec --quiet --serial-log "$W/rec.console" \
    --record-profile resume >"$W/rec.out" 2>&1 &
  RUNS+=($!)
  wait_for "$W/rec.console" "COUNTER" 600 "${RUNS[0]}"
  until [ "$(grep -ac COUNTER "$W/rec.console" || true)" -ge 5 ]; do sleep 0.1; done
  kill -INT "${RUNS[0]}"
  wait "${RUNS[0]}" || true
  RUNS=()
  "$BIN" --store "$PUB" inspect suspended --json | jq -e '.profiles[] | select(.name == "resume")' >/dev/null || die "no resume profile recorded"
fi

SRV=$W/server
cp -a "$PUB" "$SRV"
nsenter --net="/run/netns/$SNS" "$BIN" --store "$SRV" serve --listen 127.0.0.1:7070 --public-read >/dev/null 2>&1 &
PIDS+=($!)
nsenter --net="/run/netns/$SNS" "$EMU" --listen "$SRV_IP:7071" --to 127.0.0.1:7070 --delay-ms 20 2>/dev/null &
PIDS+=($!)
URL=capsule://$SRV_IP:7071/suspended
sleep 1

n=0
for rate in $RATES; do
  link_rate "$rate"
  for variant in $VARIANTS; do
    n=$((n + 1))
    case $variant in
      # Without a profile: --prefetch none (run would use the served resume profile).
      fix) extra=(--prefetch none) ;;
      nofix) extra=(--prefetch none --no-fault-fix) ;;
      prefetch) extra=(--prefetch memory) ;;
      profile) extra=() ;;
      profile1) extra=(--memory-cluster 1) ;;
      cluster*) extra=(--prefetch none --memory-cluster "${variant#cluster}") ;;
      *) die "unknown variant $variant" ;;
    esac
    t0=$(now)
    # nsenter execs capsule: $! is the run itself, so SIGINT reaches it.
    nsenter --net="/run/netns/$NS" "$BIN" --store "$W/client$n" run "$URL" --cache "$W/cache$n" --id "r$n" --quiet \
      --serial-log "$W/r$n.console" "${extra[@]}" >"$W/r$n.out" 2>&1 &
    pid=$!
    RUNS+=($pid)
    wait_for "$W/r$n.out" "resumed" 1800 "$pid"
    loaded=$(secs "$t0" "$(now)")
    qemu_loaded=$(sed -nE 's/.*resumed .* in ([0-9.]+) s.*/\1/p' "$W/r$n.out")
    wait_for "$W/r$n.console" "COUNTER" 1800 "$pid"
    first=$(secs "$t0" "$(now)")
    until [ "$(grep -ac COUNTER "$W/r$n.console" || true)" -ge 5 ]; do
      kill -0 "$pid" 2>/dev/null || die "run r$n ended"
      sleep 0.1
    done
    fifth=$(secs "$t0" "$(now)")
    stats=$W/runs/r$n/mnt/.capsule/stats.json
    ram=$(jq '.files["memory.raw"].fetched_bytes' "$stats")
    wire=$(jq '.bytes_fetched' "$stats")
    kill -INT "$pid"
    wait "$pid" || true
    result_line resume-link "$(jq -n --arg v "$variant" --arg rate "$rate" --argjson args "$(jq -n '$ARGS.positional' --args -- "${extra[@]}")" \
        '{variant: $v, args: $args, rate: $rate, rtt_ms: 40, cache: "empty"}')" \
      "$(jq -n --argjson loaded "$loaded" --argjson q "${qemu_loaded:-null}" --argjson first "$first" --argjson fifth "$fifth" \
            --argjson ram "$ram" --argjson wire "$wire" --argjson blocks "$ram_blocks" --argjson stored "$stored" \
            '{loaded_seconds: $loaded, resumed_seconds_from_qemu_start: $q, first_counter_seconds: $first,
              fifth_counter_seconds: $fifth, ram_fetched_bytes_by_fifth: $ram, wire_bytes_by_fifth: $wire,
              capsule_ram_blocks: $blocks, capsule_stored_bytes: $stored}')"
  done
done
result_flush
python3 scripts/gen-benchmarks.py --show resume-link
