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
# Boot times run from the start of `capsule mount` (its start-up over the link included)
# to the guest's boot marker; the full copy's boot from QEMU's start (local files).
# Writes one JSON line per rate and variant to results/link.jsonl (scripts/results-lib.sh);
# BENCHMARKS.md's table is generated from them (scripts/gen-benchmarks.py), printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/results-lib.sh
. scripts/results-lib.sh
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
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
boot() { # boot MOUNTDIR T0 -> seconds from T0 (taken before the mount) to the guest's marker
  in_ns timeout --foreground 1800 qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot -nic none \
    -kernel "$1/vmlinuz" -initrd "$1/initrd.img" -append "console=ttyS0 quiet panic=-1 gmode=boot" \
    -drive "file=$1/root.raw,format=raw,if=virtio,readonly=on" </dev/null | grep -aq 'CAPSULE-GUEST-MARKER boot-ok' \
    || { echo "bench: boot from $1 failed" >&2; exit 1; }
  secs "$2" "$(now)"
}
mkdir -p "$W/mnt-rec"
t0=$(now)
"$BIN" --store "$PUB" mount guest "$W/mnt-rec" --cache "$W/rec-cache" --read-only --record-profile boot >/dev/null
local_boot=$(boot "$W/mnt-rec" "$t0")
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

n=0
dir=
mount_remote() { # mount_remote EXTRA...: a fresh cache; sets $dir (no subshell: $n must count)
  n=$((n + 1))
  dir=$W/mnt$n
  mkdir -p "$dir"
  in_ns "$BIN" mount "$URL" "$dir" --cache "$W/cache$n" --read-only "$@" >/dev/null
}

# line VARIANT RATE MEASUREMENTS_JSON
line() {
  result_line link "$(jq -n --arg v "$1" --arg rate "$2" --argjson bits "${3:-null}" '{variant: $v, rate: $rate, rate_bits_per_s: $bits, rtt_ms: 40}')" "$4"
}
line local "" "" "$(jq -n --argjson s "$local_boot" --argjson need "$need" '{boot_seconds: $s, boot_profile_stored_bytes: $need}')"
for rate in $RATES; do
  echo "bench-link: $rate" >&2
  link_rate "$rate"
  bits=$(echo "$rate" | awk '/kbit/ { sub("kbit",""); print $1 * 1000; next } /mbit/ { sub("mbit",""); print $1 * 1000000 }')

  t0=$(now); mount_remote; demand=$(boot "$dir" "$t0"); "$BIN" umount "$dir" >/dev/null
  line demand "$rate" "$bits" "$(jq -n --argjson s "$demand" '{boot_seconds: $s}')"

  n=$((n + 1)); t0=$(now)
  in_ns "$BIN" warm "$URL" --profile boot --cache "$W/cache$n" >/dev/null
  warm=$(secs "$t0" "$(now)")
  mkdir -p "$W/mnt$n"
  t0=$(now)
  in_ns "$BIN" mount "$URL" "$W/mnt$n" --cache "$W/cache$n" --read-only >/dev/null
  warmed=$(boot "$W/mnt$n" "$t0"); "$BIN" umount "$W/mnt$n" >/dev/null
  line warm "$rate" "$bits" "$(jq -n --argjson w "$warm" --argjson s "$warmed" '{warm_seconds: $w, boot_seconds: $s}')"

  t0=$(now); mount_remote --prefetch profile; prefetched=$(boot "$dir" "$t0"); "$BIN" umount "$dir" >/dev/null
  line prefetch "$rate" "$bits" "$(jq -n --argjson s "$prefetched" '{boot_seconds: $s}')"

  [ -z "${SKIP_BULK:-}" ] || continue
  rm -rf "$W/copy"; mkdir -p "$W/copy"; t0=$(now)
  in_ns rsync -az "rsync://$SRV_IP:8730/guest/" "$W/copy/"
  copy=$(secs "$t0" "$(now)")
  t0=$(now)
  in_ns timeout --foreground 300 qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot -nic none \
    -kernel "$W/copy/vmlinuz" -initrd "$W/copy/initrd.gz" -append "console=ttyS0 quiet panic=-1 gmode=boot" \
    -drive "file=$W/copy/disk.raw,format=raw,if=virtio,readonly=on" </dev/null | grep -aq 'CAPSULE-GUEST-MARKER boot-ok' \
    || { echo "bench: boot of the copy failed" >&2; exit 1; }
  copyboot=$(secs "$t0" "$(now)")
  line copy "$rate" "$bits" "$(jq -n --argjson c "$copy" --argjson s "$copyboot" '{copy_seconds: $c, boot_seconds: $s}')"

  n=$((n + 1)); t0=$(now)
  in_ns "$BIN" prefetch --offline "$URL" --cache "$W/cache$n" >/dev/null
  offline=$(secs "$t0" "$(now)")
  line offline "$rate" "$bits" "$(jq -n --argjson s "$offline" '{seconds: $s}')"
done
result_flush
python3 scripts/gen-benchmarks.py --show link
