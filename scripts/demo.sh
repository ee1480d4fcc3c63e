#!/bin/bash
# The demo, Capsule's main job: import the test guest and its update as a capsule and a
# child capsule, serve them over QUIC on loopback, and `capsule run` the child from the
# server on an empty cache: an unmodified QEMU boots straight from the mount and only the
# blocks the boot reads travel. Then a running guest is suspended on "host A" and resumed
# on "host B" (another empty cache). Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
G=${CAPSULE_GUEST_DIR:-target/guest}
D=$PWD/target/demo
BIN=$PWD/target/debug/capsule
CAPSULE="$BIN --store $D/store"
export CAPSULE_CONFIG_DIR=$D/config CAPSULE_RUN_DIR=$D/runs
SERVER= RUN_A= RUN_B=
cleanup() {
  for p in $RUN_A $RUN_B; do kill -INT "$p" 2>/dev/null || true; done
  for p in $RUN_A $RUN_B; do timeout 30 tail --pid="$p" -f /dev/null 2>/dev/null || kill -9 "$p" 2>/dev/null || true; done
  for m in "$D"/runs/*/mnt; do [ -d "$m" ] && fusermount3 -uz "$m" 2>/dev/null; done
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; fi
}
trap cleanup EXIT
cleanup
rm -rf "$D"; mkdir -p "$D"

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

step "on 'another machine' (an empty cache): capsule run the update straight from the server"
echo "(an unmodified QEMU, TCG, boots from the mount; the console follows)"
$BIN --store "$D/host-c" run "capsule://127.0.0.1:$PORT/guest-update" --cache "$D/cache-c" --accel tcg \
  --append gmode=boot --read-only 2>&1 | tr -d '\r' | grep -a --line-buffered -E 'CAPSULE-GUEST-[A-Z]+ |capsule: (fetched|guest stopped|running)'
echo "disk image: $(du -h --apparent-size "$G/disk-update.raw" | cut -f1); kernel and initrd are read whole at start"

step "host A: run a guest that counts, suspend it and push the suspended capsule"
TOKEN=$($CAPSULE token create --scope write)
$BIN --store "$D/host-a" run "capsule://127.0.0.1:$PORT/guest" --cache "$D/cache-a" --accel tcg --id on-a \
  --append gmode=loop --quiet --serial-log "$D/a.console" --token "$TOKEN" >"$D/a.out" 2>&1 &
RUN_A=$!
for _ in $(seq 300); do grep -q 'COUNTER 3' "$D/a.console" 2>/dev/null && break; sleep 0.2; done
tail -n 2 "$D/a.console" | tr -d '\r'
$BIN --store "$D/host-a" suspend on-a guest-suspended --push "capsule://127.0.0.1:$PORT/guest-suspended" --token "$TOKEN"
wait "$RUN_A" || true; RUN_A=
echo "host A stopped at: $(grep -a COUNTER "$D/a.console" | tail -n1 | tr -d '\r')"

step "host B (an empty cache): resume it; the counter goes on"
$BIN --store "$D/host-b" run "capsule://127.0.0.1:$PORT/guest-suspended" --cache "$D/cache-b" --id on-b \
  --quiet --serial-log "$D/b.console" --token "$TOKEN" >"$D/b.out" 2>&1 &
RUN_B=$!
for _ in $(seq 300); do [ "$(cat "$D/b.console" 2>/dev/null | grep -ac COUNTER || true)" -ge 3 ] && break; sleep 0.2; done
grep -a 'resumed' "$D/b.out" || true
grep -a COUNTER "$D/b.console" | head -n 3 | tr -d '\r'
jq -r '"resume fetched \(.files["memory.raw"].fetched_bytes) bytes of \(.files["memory.raw"].blocks * 4096) bytes of RAM so far"' "$D/runs/on-b/mnt/.capsule/stats.json"
kill -INT "$RUN_B"; wait "$RUN_B" || true; RUN_B=
