#!/bin/bash
# Boot the Debian test guest (tests/guest/build-debian.sh) from its local raw file under TCG
# and report the seconds to its marker; with TRACE=FILE also the MiB of disk the boot read.
#
#   tests/guest/boot-debian.sh [OUTDIR] [extra kernel args...]   (default target/guest-debian)
#
# Environment:
#   GUEST_TIMEOUT=S  seconds before QEMU is killed (default 300; exit status 124)
#   GUEST_MEM=MiB    guest RAM (default 512)
#   TRACE=FILE       QEMU block trace (bdrv_co_preadv_part) to FILE, summarised at the end
#   CONSOLE=FILE     keep the serial console there (default: a temporary file, echoed)
# The QEMU command line it runs is the reference one for this guest:
#   qemu-system-x86_64 -accel tcg -m 512 -nographic -no-reboot -nic none \
#     -kernel OUT/vmlinuz -initrd OUT/initrd.gz -append "$(cat OUT/cmdline)" \
#     -drive file=OUT/disk.raw,format=raw,if=virtio,readonly=on
set -euo pipefail
ROOTDIR=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-$ROOTDIR/target/guest-debian}
[ $# -gt 0 ] && shift
for f in vmlinuz initrd.gz disk.raw cmdline; do
  [ -f "$OUT/$f" ] || { echo "boot-debian.sh: missing $OUT/$f (run tests/guest/build-debian.sh)" >&2; exit 2; }
done
CON=${CONSOLE:-$(mktemp)}
[ -n "${CONSOLE:-}" ] || trap 'rm -f "$CON"' EXIT
trace=()
[ -n "${TRACE:-}" ] && trace=(-trace bdrv_co_preadv_part -D "$TRACE")

secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
t0=$(date +%s.%N)
: > "$CON"
timeout "${GUEST_TIMEOUT:-300}" \
  qemu-system-x86_64 -accel tcg -m "${GUEST_MEM:-512}" -nographic -no-reboot -nic none \
  -kernel "$OUT/vmlinuz" -initrd "$OUT/initrd.gz" -append "$(cat "$OUT/cmdline") $*" \
  -drive "file=$OUT/disk.raw,format=raw,if=virtio,readonly=on" "${trace[@]}" \
  </dev/null >"$CON" 2>&1 &
qpid=$!
tail -f --pid=$qpid "$CON" &
# The time that matters is to the marker, not to QEMU's exit (shutdown takes a while).
tm=
while kill -0 $qpid 2>/dev/null; do
  if [ -z "$tm" ] && grep -aq 'CAPSULE-GUEST-MARKER' "$CON"; then tm=$(date +%s.%N); fi
  sleep 0.1
done
rc=0; wait $qpid || rc=$?
t1=$(date +%s.%N)
[ -n "$tm" ] || ! grep -aq 'CAPSULE-GUEST-MARKER' "$CON" || tm=$t1
marker=$(grep -a -o 'CAPSULE-GUEST-MARKER [a-z-]*' "$CON" | tail -n1 || true)
echo "boot-debian: ${marker:-no marker} after ${tm:+$(secs "$t0" "$tm")} s; QEMU ran $(secs "$t0" "$t1") s (exit $rc)" >&2
if [ -n "${TRACE:-}" ]; then
  # Distinct bytes read (4 KiB granularity) and total bytes requested.
  awk '/offset/ { for (i = 1; i <= NF; i++) { if ($i == "offset") o = $(i+1); if ($i == "bytes") n = $(i+1) }
         tot += n; for (b = int(o / 4096); b <= int((o + n - 1) / 4096); b++) seen[b] = 1 }
       END { c = 0; for (k in seen) c++; printf "boot-debian: disk read %.1f MiB distinct (%d requests summing %.1f MiB)\n", c * 4096 / 1048576, NR, tot / 1048576 }' \
    "$TRACE" >&2
fi
[ "$marker" = "CAPSULE-GUEST-MARKER debian-ready" ]
