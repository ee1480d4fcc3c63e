#!/bin/bash
# Block-size benchmark of the capsule format (make bench): for the test guest disk and its
# update, at 4K..1M blocks, what the manifest, maps and blocks cost, what the child adds
# over its parent, and import speed. casync (content-defined chunking) runs side by side
# in the same run on the same files as the peer. Writes one JSON line per block size and
# one for casync to results/format.jsonl (scripts/results-lib.sh); the table in
# BENCHMARKS.md is generated from them (scripts/gen-benchmarks.py), and printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/results-lib.sh
. scripts/results-lib.sh
G=${CAPSULE_GUEST_DIR:-target/guest}
BIN=${CAPSULE_BIN:-target/release/capsule}
W=$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench.XXXXXX")
trap 'rm -rf "$W"' EXIT
command -v casync >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends casync >/dev/null

now() { date +%s.%N; }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }
dir_bytes() { find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'; }
size=$(stat -c %s "$G/disk.raw")

# Warm the page cache so every run reads the inputs from memory alike.
cat "$G/disk.raw" "$G/disk-update.raw" >/dev/null

# The peer first: casync with its default chunker (64 KiB average) and compression.
# Import times are the best of $RUNS runs into fresh stores (this machine is noisy).
RUNS=${RUNS:-3}
best() { awk -v a="$1" -v b="$2" 'BEGIN { print (a == "" || b < a) ? b : a }'; }
cz_secs=
for run in $(seq "$RUNS"); do
  S=$W/casync-$run; mkdir -p "$S/store"
  t0=$(now); casync make --store="$S/store" "$S/base.caibx" "$G/disk.raw" >/dev/null; t1=$(now)
  cz_secs=$(best "$cz_secs" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
done
cz_base=$(dir_bytes "$S/store"); cz_index=$(stat -c %s "$S/base.caibx")
casync make --store="$S/store" "$S/update.caibx" "$G/disk-update.raw" >/dev/null
cz_child=$(( $(dir_bytes "$S/store") - cz_base ))
cz_rate=$(awk -v s="$size" -v t="$cz_secs" 'BEGIN { printf "%.0f", s / t / 1e6 }')

# Which disk bytes a real boot reads: QEMU's block-layer trace of one TCG boot.
timeout --foreground 120 qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot -nic none \
  -kernel "$G/vmlinuz" -initrd "$G/initrd.gz" -append "console=ttyS0 quiet panic=-1 gmode=boot" \
  -drive "file=$G/disk.raw,format=raw,if=virtio,readonly=on" \
  -trace bdrv_co_preadv_part -D "$W/boot-trace.log" </dev/null >"$W/boot-console.log" 2>&1 || true
grep -q 'CAPSULE-GUEST-MARKER boot-ok' "$W/boot-console.log" || { echo "bench: guest did not boot" >&2; exit 1; }
# boot_blocks BS: how many distinct blocks of size BS the boot touched.
boot_blocks() {
  awk -v bs="$1" '/offset/ { for (i = 1; i <= NF; i++) { if ($i == "offset") o = $(i+1); if ($i == "bytes") n = $(i+1) }
      for (b = int(o / bs); b <= int((o + n - 1) / bs); b++) seen[b] = 1 }
    END { c = 0; for (k in seen) c++; print c }' "$W/boot-trace.log"
}
to_bytes() { case $1 in *K) echo $(( ${1%K} * 1024 ));; *M) echo $(( ${1%M} * 1048576 ));; esac; }

changed=$({ cmp -l "$G/disk.raw" "$G/disk-update.raw" || true; } | wc -l)
result_line format "$(jq -n --argjson runs "$RUNS" '{tool: "casync", chunking: "content-defined, 64 KiB average", runs: $runs}')" \
  "$(jq -n --argjson disk "$size" --argjson changed "$changed" --argjson secs "$cz_secs" --argjson index "$cz_index" \
        --argjson base "$cz_base" --argjson child "$cz_child" \
        '{disk_bytes: $disk, update_changed_bytes: $changed, import_seconds_best: $secs, index_bytes: $index,
          base_stored_bytes: $base, child_added_bytes: $child}')"
for bs in 4K 16K 64K 256K 1M; do
  echo "bench-format: block size $bs" >&2
  secs=
  for run in $(seq "$RUNS"); do
    S=$W/$bs-$run
    t0=$(now)
    base=$("$BIN" --store "$S" import base --block-size "$bs" --disk "root=$G/disk.raw" --json)
    t1=$(now)
    secs=$(best "$secs" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')")
  done
  child=$("$BIN" --store "$S" import update --parent base --disk "root=$G/disk-update.raw" --json)
  bsb=$(to_bytes "$bs")
  result_line format "$(jq -n --arg bs "$bs" --argjson bsb "$bsb" --argjson runs "$RUNS" '{tool: "capsule", block_size: $bs, block_size_bytes: $bsb, runs: $runs}')" \
    "$(jq -n --argjson disk "$size" --argjson changed "$changed" --argjson secs "$secs" --argjson base "$base" --argjson child "$child" \
          --argjson boot "$(boot_blocks "$bsb")" --argjson bsb "$bsb" \
          '{disk_bytes: $disk, update_changed_bytes: $changed, import_seconds_best: $secs,
            manifest_bytes: $base.manifest_bytes, base_metadata_bytes: $base.images[0][1].metadata_bytes,
            base_stored_bytes: $base.images[0][1].stored_bytes, child_blocks: $child.images[0][1].mapped_blocks,
            child_added_bytes: ($child.images[0][1].stored_bytes + $child.images[0][1].metadata_bytes + $child.manifest_bytes),
            boot_blocks: $boot, boot_bytes: ($boot * $bsb)}')"
done
result_flush
python3 scripts/gen-benchmarks.py --show format
