#!/bin/bash
# The demo, Capsule's main job: import the test guest and its update as a capsule and a
# child capsule, serve them over QUIC on loopback, mount the child from the server on an
# empty cache, and boot an unmodified QEMU straight from the mount: only the blocks the
# boot reads travel. Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
G=${CAPSULE_GUEST_DIR:-target/guest}
D=$PWD/target/demo
BIN=$PWD/target/debug/capsule
CAPSULE="$BIN --store $D/store"
MNT=$D/mnt
export CAPSULE_CONFIG_DIR=$D/config
SERVER=
cleanup() {
  $BIN umount "$MNT" >/dev/null 2>&1 || fusermount3 -uz "$MNT" 2>/dev/null || true
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; fi
}
trap cleanup EXIT
cleanup
rm -rf "$D"; mkdir -p "$D" "$MNT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "import the test guest (disk, kernel, initrd) as capsule 'guest'"
$CAPSULE import guest --disk "root=$G/disk.raw" --kernel "$G/vmlinuz" --initrd "$G/initrd.gz" \
  --cmdline "console=ttyS0 quiet panic=-1" --ram 256M --hypervisor qemu

step "import the updated disk over it: only the changed blocks are stored"
$CAPSULE import guest-update --parent guest --disk "root=$G/disk-update.raw"

step "capsule ls / inspect / verify"
$CAPSULE ls
$CAPSULE inspect guest-update
$CAPSULE verify guest-update

step "serve the store over QUIC on loopback"
PORT=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$CAPSULE serve --listen "127.0.0.1:$PORT" --public-read &
SERVER=$!
sleep 1

step "on 'another machine' (an empty cache): mount the update straight from the server"
$BIN mount "capsule://127.0.0.1:$PORT/guest-update" "$MNT" --cache "$D/cache" --read-only
ls -l "$MNT"

step "boot an unmodified QEMU (TCG) from the mount"
timeout --foreground 120 qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot -nic none \
  -kernel "$MNT/vmlinuz" -initrd "$MNT/initrd.img" \
  -append "console=ttyS0 quiet panic=-1 gmode=boot" \
  -drive "file=$MNT/root.raw,format=raw,if=virtio,readonly=on" </dev/null \
  | tr -d '\r' | grep -ao --line-buffered -E 'CAPSULE-GUEST-[A-Z]+ .*' || true

step "what the boot cost"
jq -r '"fetched \(.blocks_fetched) blocks, \(.bytes_fetched) bytes (compressed) for a capsule of \(.files | to_entries | map(.value.blocks) | add) blocks",
       (.files | to_entries[] | "  \(.key): \(.value.resident_pct | floor)% resident (zero blocks need no fetch)")' "$MNT/.capsule/stats.json"
echo "disk: $(stat -c %s "$G/disk-update.raw") bytes; kernel + initrd are read whole at start"
