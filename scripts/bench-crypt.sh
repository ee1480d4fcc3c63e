#!/bin/bash
# What encryption costs (make bench-crypt): the test guest disk imported, then read whole
# through `capsule mount` of the capsule served on loopback QUIC, as a plain capsule and as
# an encrypted one (`import --key`), side by side in one run, alternating (plain, encrypted,
# plain, encrypted ...; REPS rounds, the best of each kept: the machine is shared).
# Import MB/s: disk bytes / wall time of `capsule import` into an empty store. Cold read:
# an empty cache and the page cache dropped, one sequential pass (1 MiB reads); warm: the
# page cache dropped again, the blocks now in the capsule cache (so warm is decrypt +
# decompress + hash). One JSON line per variant to results/crypt.jsonl
# (scripts/results-lib.sh); BENCHMARKS.md's table is generated from them
# (scripts/gen-benchmarks.py) and printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/results-lib.sh
. scripts/results-lib.sh
G=${CAPSULE_GUEST_DIR:-target/guest}
BIN=$(readlink -f "${CAPSULE_BIN:-target/release/capsule}")
REPS=${REPS:-3}
W=$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-crypt.XXXXXX")
PIDS=()
MNT=$W/mnt
cleanup() {
  "$BIN" umount "$MNT" >/dev/null 2>&1 || fusermount3 -uz "$MNT" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
export CAPSULE_CONFIG_DIR=$W/config CAPSULE_KEY_DIR=$W/keys
DISK=$G/disk.raw
SIZE=$(stat -c %s "$DISK")
mkdir -p "$MNT"

drop_caches() {
  sync
  echo 3 >/proc/sys/vm/drop_caches || { echo "bench-crypt: cannot drop the page cache (needs root): cold and warm would mean nothing" >&2; exit 1; }
}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
mbps() { awk -v s="$SIZE" -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", s / (b - a) / 1e6 }'; }
best() { printf '%s\n' "$@" | sort -g | tail -1; }
# read_pass FILE -> MB/s of one sequential pass
read_pass() {
  local t0 t1
  t0=$(now)
  dd if="$1" of=/dev/null bs=1M status=none
  t1=$(now)
  mbps "$t0" "$t1"
}

"$BIN" key create bench >/dev/null
declare -A IMPORT COLD WARM STORED
for variant in plain encrypted; do IMPORT[$variant]=""; COLD[$variant]=""; WARM[$variant]=""; done
for rep in $(seq "$REPS"); do
  for variant in plain encrypted; do
    store=$W/store-$variant-$rep
    key=()
    [ "$variant" = encrypted ] && key=(--key bench)
    drop_caches
    t0=$(now)
    "$BIN" --store "$store" import guest --disk "root=$DISK" "${key[@]}" >/dev/null
    t1=$(now)
    IMPORT[$variant]+=" $(mbps "$t0" "$t1")"
    STORED[$variant]=$(store_block_bytes "$store")
    P=$(port)
    "$BIN" --store "$store" serve --listen "127.0.0.1:$P" --public-read >/dev/null 2>&1 &
    server=$!
    PIDS+=("$server")
    sleep 1
    "$BIN" mount "capsule://127.0.0.1:$P/guest" "$MNT" --cache "$W/cache-$variant-$rep" --read-only >/dev/null
    drop_caches; COLD[$variant]+=" $(read_pass "$MNT/root.raw")"
    drop_caches; WARM[$variant]+=" $(read_pass "$MNT/root.raw")"
    "$BIN" umount "$MNT" >/dev/null
    kill "$server"; wait "$server" 2>/dev/null || true
    rm -rf "$store" "$W/cache-$variant-$rep"
  done
done

for variant in plain encrypted; do
  # shellcheck disable=SC2086
  result_line crypt "$(jq -n --arg v "$variant" --argjson reps "$REPS" '{variant: $v, reps: $reps, read_bytes: 1048576}')" \
    "$(jq -n --argjson size "$SIZE" --argjson stored "${STORED[$variant]}" --argjson imp "$(best ${IMPORT[$variant]})" \
          --argjson cold "$(best ${COLD[$variant]})" --argjson warm "$(best ${WARM[$variant]})" \
          '{disk_bytes: $size, stored_bytes: $stored, import_mb_per_s: $imp, cold_read_mb_per_s: $cold, warm_read_mb_per_s: $warm}')"
done
result_flush
python3 scripts/gen-benchmarks.py --show crypt
