#!/bin/bash
# Boot over slow links (make bench-link): the test guest booted from a capsule served
# across an emulated link between two network namespaces of our own joined by a veth
# pair: the rate limit is tc tbf on each veth end, and capsule-linkemu (beside the server)
# adds 20 ms each way for 40 ms RTT. The relay hop is on the server side's lo, so each
# byte crosses the shaped link once. One run per rate, side by side:
#   demand        mount on an empty cache, boot
#   warm+boot     `capsule warm --profile boot` first (its time shown), then boot
#   prefetch      mount with `--prefetch profile` (background), boot at once
#   full copy     rsync -z of the raw disk, kernel and initrd first (TCP: rate-limited,
#                 but without the added delay: netem is missing), then boot locally
# Beside them, the physical limit: compressed bytes the boot needs / link rate, and the
# time `capsule prefetch --offline` takes. RATES="2mbit 10mbit" picks rates;
# SKIP_BULK=1 skips the full copy and offline-ready runs (over 20 min each at 384 kbit/s).
set -euo pipefail
cd "$(dirname "$0")/.."
G=$(readlink -f "${CAPSULE_GUEST_DIR:-target/guest}")
BIN=$(readlink -f "${CAPSULE_BIN:-target/release/capsule}")
EMU=$(dirname "$BIN")/capsule-linkemu
RATES=${RATES:-384kbit 2mbit 10mbit}
NS=capsule-bench-$$
SNS=capsule-bench-srv-$$
SRV_IP=10.211.0.1
VETH=capbench$$
CLI_IP=10.211.0.2
# shellcheck source=scripts/link-lib.sh
. scripts/link-lib.sh
W=$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-link.XXXXXX")
PIDS=()
# nsenter enters only the network namespace: `ip netns exec` would also unshare the mount
# namespace and hide the FUSE mounts from everyone else.
in_ns() { nsenter --net="/run/netns/$NS" "$@"; }
cleanup() {
  for m in "$W"/mnt*; do [ -d "$m" ] && { "$BIN" umount "$m" >/dev/null 2>&1 || fusermount3 -uz "$m" 2>/dev/null || true; }; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -f "rsync --daemon --no-detach --config=$W" 2>/dev/null || true
  link_delete
  rm -rf "$W"
}
trap cleanup EXIT
export CAPSULE_CONFIG_DIR=$W/config

link_create

# The publisher's capsule and its boot profile, recorded from a local mount.
PUB=$W/publisher
"$BIN" --store "$PUB" import guest --disk "root=$G/disk.raw" --kernel "$G/vmlinuz" --initrd "$G/initrd.gz" \
  --cmdline "console=ttyS0 quiet panic=-1" >/dev/null
boot() { # boot MOUNTDIR -> seconds from QEMU start to the guest's marker
  local t0 t1
  t0=$(date +%s.%N)
  in_ns timeout --foreground 1800 qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot -nic none \
    -kernel "$1/vmlinuz" -initrd "$1/initrd.img" -append "console=ttyS0 quiet panic=-1 gmode=boot" \
    -drive "file=$1/root.raw,format=raw,if=virtio,readonly=on" </dev/null | grep -aq 'CAPSULE-GUEST-MARKER boot-ok' \
    || { echo "bench: boot from $1 failed" >&2; exit 1; }
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }'
}
mkdir -p "$W/mnt-rec"
"$BIN" --store "$PUB" mount guest "$W/mnt-rec" --cache "$W/rec-cache" --read-only --record-profile boot >/dev/null
local_boot=$(boot "$W/mnt-rec")
"$BIN" umount "$W/mnt-rec" >/dev/null
need=$("$BIN" --store "$PUB" inspect guest --json | jq '.profiles[0].stored_bytes')

# The server, and the relay adding the delay, inside the namespace.
SRV=$W/server
cp -a "$PUB" "$SRV"
nsenter --net="/run/netns/$SNS" "$BIN" --store "$SRV" serve --listen 127.0.0.1:7070 --public-read >/dev/null 2>&1 &
PIDS+=($!)
nsenter --net="/run/netns/$SNS" "$EMU" --listen "$SRV_IP:7071" --to 127.0.0.1:7070 --delay-ms 20 2>/dev/null &
PIDS+=($!)
URL=capsule://$SRV_IP:7071/guest
mkdir -p "$W/rsync-src"
cp "$G/disk.raw" "$G/vmlinuz" "$G/initrd.gz" "$W/rsync-src/"
cat >"$W/rsyncd.conf" <<CONF
use chroot = no
[guest]
  path = $W/rsync-src
  read only = yes
CONF
nsenter --net="/run/netns/$SNS" rsync --daemon --no-detach --config="$W/rsyncd.conf" --port=8730 --address="$SRV_IP" &
PIDS+=($!)
sleep 1

secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
n=0
dir=
mount_remote() { # mount_remote EXTRA...: a fresh cache; sets $dir (no subshell: $n must count)
  n=$((n + 1))
  dir=$W/mnt$n
  mkdir -p "$dir"
  in_ns "$BIN" mount "$URL" "$dir" --cache "$W/cache$n" --read-only "$@" >/dev/null
}

echo "Boot of the test guest over an emulated link (40 ms RTT); local boot from a mount: ${local_boot} s."
echo "The boot reads $(awk -v b="$need" 'BEGIN { printf "%.1f", b / 1048576 }') MiB compressed (kernel and initrd whole, then the disk blocks it touches)."
echo
echo "| link | physical limit s | demand s | warm s + boot s | background prefetch s | full copy s + boot s | offline-ready s |"
echo "|---|---|---|---|---|---|---|"
for rate in $RATES; do
  link_rate "$rate"
  bits=$(echo "$rate" | awk '/kbit/ { sub("kbit",""); print $1 * 1000; next } /mbit/ { sub("mbit",""); print $1 * 1000000 }')
  limit=$(awk -v b="$need" -v r="$bits" 'BEGIN { printf "%.1f", b * 8 / r }')

  mount_remote; demand=$(boot "$dir"); "$BIN" umount "$dir" >/dev/null

  n=$((n + 1)); t0=$(date +%s.%N)
  in_ns "$BIN" warm "$URL" --profile boot --cache "$W/cache$n" >/dev/null
  warm=$(secs "$t0" "$(date +%s.%N)")
  mkdir -p "$W/mnt$n"
  in_ns "$BIN" mount "$URL" "$W/mnt$n" --cache "$W/cache$n" --read-only >/dev/null
  warmed=$(boot "$W/mnt$n"); "$BIN" umount "$W/mnt$n" >/dev/null

  mount_remote --prefetch profile; prefetched=$(boot "$dir"); "$BIN" umount "$dir" >/dev/null

  if [ -n "${SKIP_BULK:-}" ]; then
    echo "| $rate | $limit | $demand | $warm + $warmed | $prefetched | not run | not run |"
    continue
  fi
  rm -rf "$W/copy"; mkdir -p "$W/copy"; t0=$(date +%s.%N)
  in_ns rsync -az "rsync://$SRV_IP:8730/guest/" "$W/copy/"
  copy=$(secs "$t0" "$(date +%s.%N)")
  t0=$(date +%s.%N)
  in_ns timeout --foreground 300 qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot -nic none \
    -kernel "$W/copy/vmlinuz" -initrd "$W/copy/initrd.gz" -append "console=ttyS0 quiet panic=-1 gmode=boot" \
    -drive "file=$W/copy/disk.raw,format=raw,if=virtio,readonly=on" </dev/null | grep -aq 'CAPSULE-GUEST-MARKER boot-ok'
  copyboot=$(secs "$t0" "$(date +%s.%N)")

  n=$((n + 1)); t0=$(date +%s.%N)
  in_ns "$BIN" prefetch --offline "$URL" --cache "$W/cache$n" >/dev/null
  offline=$(secs "$t0" "$(date +%s.%N)")

  echo "| $rate | $limit | $demand | $warm + $warmed | $prefetched | $copy + $copyboot | $offline |"
done
