# Sourced by benchmark scripts: raw results as JSON lines under results/, one file per
# benchmark, from which scripts/gen-benchmarks.py generates BENCHMARKS.md's tables.
#
# result_line BENCH PARAMS_JSON MEASUREMENTS_JSON
#   appends {"bench", "commit", "dirty", "date", "machine", "params", "measurements"} to
#   results/BENCH.jsonl (machine.load1: the 1-minute load average when the line was
#   taken, so a figure measured on a busy machine says so). PARAMS_JSON and MEASUREMENTS_JSON are JSON objects (use jq -n).
#   params gets "run": $RESULT_RUN, one id per run of a script (its start time and pid),
#   so that the generator keeps one run's lines together. Lines wait in $RESULT_PENDING
#   until result_flush (the script's last step) appends them: a run that fails half way
#   adds nothing (its lines stay in $RESULT_PENDING for a look).
RESULT_RUN=${RESULT_RUN:-$(date -u +%Y%m%dT%H%M%SZ)-$$}
RESULTS_DIR=${RESULTS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/results}
RESULT_PENDING=${TMPDIR:-/tmp}/capsule-results-$RESULT_RUN.jsonl

result_machine() {
  jq -n --arg host "$(hostname)" --arg kernel "$(uname -r)" --argjson cpus "$(nproc)" \
     --arg cpu "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)" \
     --argjson mem_mib "$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)" \
     --arg qemu "$(qemu-system-x86_64 --version 2>/dev/null | head -1)" \
     --argjson load1 "$(cut -d' ' -f1 /proc/loadavg)" \
     '{host: $host, kernel: $kernel, cpus: $cpus, cpu: $cpu, mem_mib: $mem_mib, qemu: $qemu, load1: $load1}'
}

# The commit (and whether the tree differed from it) when the script started: a commit
# made by someone else during a long run does not split the run.
RESULT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULT_COMMIT=$(git -C "$RESULT_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
RESULT_DIRTY=false
git -C "$RESULT_ROOT" diff --quiet HEAD -- . ':!results' ':!BENCHMARKS.md' 2>/dev/null || RESULT_DIRTY=true

result_line() {
  local bench=$1 params=$2 measurements=$3
  jq -cn --arg bench "$bench" --arg commit "$RESULT_COMMIT" --argjson dirty "$RESULT_DIRTY" \
     --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --argjson machine "$(result_machine)" \
     --argjson params "$params" --arg run "$RESULT_RUN" --argjson measurements "$measurements" \
     '{bench: $bench, commit: $commit, dirty: $dirty, date: $date, machine: $machine, params: ({run: $run} + $params), measurements: $measurements}' \
     >> "$RESULT_PENDING"
}

# result_flush: appends this run's lines to results/BENCH.jsonl, each to its bench's file.
result_flush() {
  local bench
  [ -f "$RESULT_PENDING" ] || return 0
  mkdir -p "$RESULTS_DIR"
  for bench in $(jq -r .bench "$RESULT_PENDING" | sort -u); do
    jq -c --arg b "$bench" 'select(.bench == $b)' "$RESULT_PENDING" >>"$RESULTS_DIR/$bench.jsonl"
  done
  rm -f "$RESULT_PENDING"
}

# store_block_bytes STORE: bytes of the blocks a store holds, exactly: its block files, and
# each pack's span of blocks (the footer's index offset less the 16-byte header; see
# docs/format.md), without the packs' indexes.
store_block_bytes() {
  python3 - "$1" <<'PY'
import os, struct, sys
root = sys.argv[1]
total = 0
for d, _, files in os.walk(os.path.join(root, "blocks")):
    total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
packed = os.path.join(root, "packed")
for f in sorted(os.listdir(packed)) if os.path.isdir(packed) else []:
    if f.endswith(".pack"):
        with open(os.path.join(packed, f), "rb") as fh:
            fh.seek(-56, 2)
            total += struct.unpack("<Q", fh.read(8))[0] - 16
print(total)
PY
}
