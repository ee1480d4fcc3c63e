# Sourced by benchmark scripts: raw results as JSON lines under results/, one file per
# benchmark, from which scripts/gen-benchmarks.py generates BENCHMARKS.md's tables.
#
# result_line BENCH PARAMS_JSON MEASUREMENTS_JSON
#   appends {"bench", "commit", "dirty", "date", "machine", "params", "measurements"} to
#   results/BENCH.jsonl. PARAMS_JSON and MEASUREMENTS_JSON are JSON objects (use jq -n).
RESULTS_DIR=${RESULTS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/results}

result_machine() {
  jq -n --arg host "$(hostname)" --arg kernel "$(uname -r)" --argjson cpus "$(nproc)" \
     --arg cpu "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)" \
     --argjson mem_mib "$(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo)" \
     --arg qemu "$(qemu-system-x86_64 --version 2>/dev/null | head -1)" \
     '{host: $host, kernel: $kernel, cpus: $cpus, cpu: $cpu, mem_mib: $mem_mib, qemu: $qemu}'
}

result_line() {
  local bench=$1 params=$2 measurements=$3 root commit dirty
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  commit=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
  dirty=false
  git -C "$root" diff --quiet HEAD -- . ':!results' ':!BENCHMARKS.md' 2>/dev/null || dirty=true
  mkdir -p "$RESULTS_DIR"
  jq -cn --arg bench "$bench" --arg commit "$commit" --argjson dirty "$dirty" \
     --arg date "$(date -u +%Y-%m-%dT%H:%M:%SZ)" --argjson machine "$(result_machine)" \
     --argjson params "$params" --argjson measurements "$measurements" \
     '{bench: $bench, commit: $commit, dirty: $dirty, date: $date, machine: $machine, params: $params, measurements: $measurements}' \
     >> "$RESULTS_DIR/$bench.jsonl"
}
