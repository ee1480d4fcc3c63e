#!/bin/bash
# Read benchmark through the mount (make bench): cold and warm sequential MB/s and random
# 4 KiB reads/s of the test guest disk, side by side in one run: the raw file read locally,
# `capsule mount` of the capsule served on loopback, and qemu-nbd serving the raw file
# over TCP (sequential: QEMU's own NBD client, `qemu-img bench`; random: fio's nbd engine).
# Each figure is also given as a ratio to the local read. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
G=${CAPSULE_GUEST_DIR:-target/guest}
BIN=$(readlink -f "${CAPSULE_BIN:-target/release/capsule}")
W=$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-mount.XXXXXX")
PIDS=()
MNT=$W/mnt
cleanup() {
  "$BIN" umount "$MNT" >/dev/null 2>&1 || fusermount3 -uz "$MNT" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT
command -v fio >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fio >/dev/null
export CAPSULE_CONFIG_DIR=$W/config
SIZE=$(stat -c %s "$G/disk.raw")
RAND_SECS=${RAND_SECS:-5}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# fio_seq FILE -> MB/s of one sequential pass (1 MiB reads through the page cache)
fio_seq() { fio --name=seq --filename="$1" --rw=read --bs=1M --size="$SIZE" --ioengine=psync --output-format=json --output="$W/fio.json" >/dev/null 2>&1; jq '.jobs[0].read.bw_bytes / 1e6 | floor' "$W/fio.json"; }
# fio_rand ARGS... -> random 4 KiB reads per second (O_DIRECT: the storage path, not the page cache)
fio_rand() { fio --name=rand --rw=randread --bs=4k --size="$SIZE" --runtime="$RAND_SECS" --time_based --output-format=json --output="$W/fio.json" "$@" >/dev/null 2>&1; jq '.jobs[0].read.iops | floor' "$W/fio.json"; }

cp "$G/disk.raw" "$W/local.raw"
drop_caches; l_cold=$(fio_seq "$W/local.raw")
l_warm=$(fio_seq "$W/local.raw")
l_rand=$(fio_rand --filename="$W/local.raw" --direct=1 --ioengine=psync)

"$BIN" --store "$W/server" import guest --disk "root=$G/disk.raw" >/dev/null
P=$(port)
"$BIN" --store "$W/server" serve --listen "127.0.0.1:$P" --public-read >/dev/null 2>&1 &
PIDS+=($!)
sleep 1
mkdir -p "$MNT"
"$BIN" mount "capsule://127.0.0.1:$P/guest" "$MNT" --cache "$W/cache" --read-only >/dev/null
drop_caches; c_cold=$(fio_seq "$MNT/root.raw")
drop_caches; c_warm=$(fio_seq "$MNT/root.raw")
c_rand=$(fio_rand --filename="$MNT/root.raw" --direct=1 --ioengine=psync)
"$BIN" umount "$MNT" >/dev/null
"$BIN" mount "capsule://127.0.0.1:$P/guest" "$MNT" --cache "$W/cache-cold" --read-only >/dev/null
c_rand_cold=$(fio_rand --filename="$MNT/root.raw" --direct=1 --ioengine=psync)
"$BIN" umount "$MNT" >/dev/null

N=$(port)
qemu-nbd -r -f raw -x disk -b 127.0.0.1 -p "$N" --persistent --shared=8 "$W/local.raw" &
PIDS+=($!)
sleep 1
nbd_seq() {
  local t0 t1
  t0=$(date +%s.%N)
  qemu-img bench -f raw -s 1M -c $((SIZE >> 20)) "nbd://127.0.0.1:$N/disk" >/dev/null
  t1=$(date +%s.%N)
  awk -v s="$SIZE" -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", s / (b - a) / 1e6 }'
}
drop_caches; n_cold=$(nbd_seq)
n_warm=$(nbd_seq)
n_rand=$(fio_rand --ioengine=nbd --uri="nbd://127.0.0.1:$N/disk")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo "Test guest disk ($((SIZE >> 20)) MiB, 48 MiB of it data). Sequential: one pass, 1 MiB reads; random: 4 KiB O_DIRECT reads for ${RAND_SECS} s. Ratios are to the local file."
echo
echo "| path | seq cold MB/s | seq warm MB/s | rand 4K reads/s (warm) | seq cold / local | seq warm / local | rand / local |"
echo "|---|---|---|---|---|---|---|"
echo "| local raw file | $l_cold | $l_warm | $l_rand | 1.00 | 1.00 | 1.00 |"
echo "| capsule mount (QUIC loopback) | $c_cold | $c_warm | $c_rand | $(ratio "$c_cold" "$l_cold") | $(ratio "$c_warm" "$l_warm") | $(ratio "$c_rand" "$l_rand") |"
echo "| qemu-nbd (TCP loopback) | $n_cold | $n_warm | $n_rand | $(ratio "$n_cold" "$l_cold") | $(ratio "$n_warm" "$l_warm") | $(ratio "$n_rand" "$l_rand") |"
echo
echo "Random 4K reads on an empty cache (each miss fetches its 64 KiB block): $c_rand_cold reads/s ($(ratio "$c_rand_cold" "$l_rand") of local)."
