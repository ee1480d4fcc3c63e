#!/bin/bash
# The demo: import the test guest and its update as a capsule and a child capsule, show
# what the child costs, serve them over QUIC on loopback, pull the child into a second
# store (only missing blocks travel), verify, export it as a qcow2 chain and boot it.
# (Later: mount instead of pull, and boot straight from the mount.)
set -euo pipefail
cd "$(dirname "$0")/.."
G=${CAPSULE_GUEST_DIR:-target/guest}
D=target/demo
CAPSULE="target/debug/capsule --store $D/store"
HERE="target/debug/capsule --store $D/here"
rm -rf "$D"; mkdir -p "$D"
export CAPSULE_CONFIG_DIR=$D/config
SERVER=
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; true' EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "import the test guest (disk, kernel, initrd) as capsule 'guest'"
$CAPSULE import guest --disk "root=$G/disk.raw" --kernel "$G/vmlinuz" --initrd "$G/initrd.gz" \
  --cmdline "console=ttyS0 quiet panic=-1" --ram 256M --hypervisor qemu

step "import the updated disk over it: only the changed blocks are stored"
$CAPSULE import guest-update --parent guest --disk "root=$G/disk-update.raw"

step "capsule ls"
$CAPSULE ls
step "capsule inspect guest-update"
$CAPSULE inspect guest-update
step "capsule verify guest-update (every manifest, layer, map page and block)"
$CAPSULE verify guest-update

step "serve the store over QUIC on loopback"
PORT=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$CAPSULE serve --listen "127.0.0.1:$PORT" --public-read &
SERVER=$!
sleep 1

step "on 'another machine' (a second store): pull the parent, then the update"
$HERE pull "capsule://127.0.0.1:$PORT/guest"
$HERE pull "capsule://127.0.0.1:$PORT/guest-update"
$HERE verify guest-update

step "export guest-update as a qcow2 chain mirroring its layers"
$HERE export guest-update --format qcow2 --out "$D/export"
qemu-img info --backing-chain "$D/export/root.qcow2" | grep -E '^(image|backing file|disk size):'

step "boot the exported chain in QEMU (TCG)"
timeout --foreground 120 qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot -nic none \
  -kernel "$D/export/vmlinuz" -initrd "$D/export/initrd.img" \
  -append "console=ttyS0 quiet panic=-1 gmode=boot" \
  -drive "file=$D/export/root.qcow2,format=qcow2,if=virtio,snapshot=on" </dev/null \
  | tr -d '\r' | grep -ao --line-buffered -E 'CAPSULE-GUEST-[A-Z]+ .*' || true
echo
echo "demo store: $D/store"
