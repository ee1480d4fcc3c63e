#!/bin/bash
# Boot the test guest built by build.sh, for manual checks.
#
#   tests/guest/boot.sh OUTDIR [extra kernel args...]
#
# Extra args are appended after the default `gmode=boot`; the guest honours the last one,
# e.g. `boot.sh OUT gmode=loop gdirty=64`.
# Environment:
#   GUEST_DISK=FILE   disk image (default OUTDIR/disk.raw; e.g. OUTDIR/disk-update.raw)
#   GUEST_RW=1        attach the disk writable (drops readonly=on); pass `rw` too so the
#                     initramfs mounts it read-write: GUEST_RW=1 boot.sh OUT rw gmode=write
#   GUEST_TIMEOUT=S   seconds before the VM is killed (default 60; exit status 124)
# TCG only: /dev/kvm exists on our machines but KVM hangs there.
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: $0 OUTDIR [kernel args...]" >&2; exit 2; }
OUT=$1
shift
DISK=${GUEST_DISK:-$OUT/disk.raw}
RO=,readonly=on
[ "${GUEST_RW:-0}" = 1 ] && RO=

for f in "$OUT/vmlinuz" "$OUT/initrd.gz" "$DISK"; do
  [ -f "$f" ] || { echo "boot.sh: missing $f (run tests/guest/build.sh $OUT)" >&2; exit 2; }
done

# --foreground: otherwise qemu runs in a background process group and, started from a
# terminal, is stopped by SIGTTIN when -nographic reads the console.
exec timeout --foreground "${GUEST_TIMEOUT:-60}" \
  qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot \
  -kernel "$OUT/vmlinuz" -initrd "$OUT/initrd.gz" \
  -append "console=ttyS0 quiet panic=-1 gmode=boot $*" \
  -drive "file=$DISK,format=raw,if=virtio$RO"
