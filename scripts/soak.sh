#!/bin/bash
# Soak (make soak): SOAK_MINUTES (default 30) of guest boots and O_DIRECT reads through a
# mount of the test guest served over a capsule-linkemu relay, while a driver every 15-40 s
# kills and restarts the server, cuts the link (shorter than the stall timeout), corrupts
# a block in the server's store (restored after 10 s) or fills the cache's disk (freed
# after 15 s). Every byte read is compared with the source disk; every boot must print its
# marker with no I/O error on the console. Reports boots, reads, faults by kind, wrong bytes
# (must be 0) and read/guest I/O errors (must be 0 outside corruption windows) to
# results/soak.jsonl; BENCHMARKS.md's reliability table is generated from them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/results-lib.sh
. scripts/results-lib.sh
G=${CAPSULE_GUEST_DIR:-target/guest}
BIN=$(readlink -f "${CAPSULE_BIN:-target/release/capsule}")
LINKEMU=$(readlink -f "$(dirname "$BIN")/capsule-linkemu")
MINUTES=${SOAK_MINUTES:-30}
STALL=60
W=$(mktemp -d "${TMPDIR:-/tmp}/capsule-soak.XXXXXX")
PIDS=()
SERVER=
die() { echo "soak: $*" >&2; exit 1; }
[ -x "$LINKEMU" ] || die "no $LINKEMU (cargo build --release builds it)"
cleanup() {
  local p
  [ -n "$SERVER" ] && kill -9 "$SERVER" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  "$BIN" --store "$W/client" umount "$W/mnt" >/dev/null 2>&1 || fusermount3 -uz "$W/mnt" 2>/dev/null || true
  for p in "${PIDS[@]}"; do timeout 10 tail --pid="$p" -f /dev/null 2>/dev/null || kill -9 "$p" 2>/dev/null || true; done
  umount -l "$W/cachefs" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
export CAPSULE_CONFIG_DIR=$W/config
free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SRV=$W/server
"$BIN" --store "$SRV" import guest --disk "root=$G/disk.raw" --kernel "$G/vmlinuz" --initrd "$G/initrd.gz" --cmdline "console=ttyS0 quiet panic=-1" >/dev/null
SPORT=$(free_port)
LPORT=$(free_port)
start_server() {
  "$BIN" --store "$SRV" serve --listen "127.0.0.1:$SPORT" --public-read >>"$W/serve.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 100); do [ "$(grep -c 'certificate SHA-256' "$W/serve.log")" -gt "${1:-0}" ] && return; sleep 0.1; done
  die "the server did not start"
}
starts=0
start_server $starts
"$LINKEMU" --listen "127.0.0.1:$LPORT" --to "127.0.0.1:$SPORT" --delay-ms 2 --cut-file "$W/cut" >"$W/linkemu.log" 2>&1 &
PIDS+=("$!")
# The cache on a small filesystem of its own, so the driver can fill it.
mkdir -p "$W/cachefs" "$W/mnt"
mount -t tmpfs -o size=384m capsule-soak "$W/cachefs"
"$BIN" --store "$W/client" mount "capsule://127.0.0.1:$LPORT/guest" "$W/mnt" --cache "$W/cachefs/cache" \
  --cache-size 96M --read-only --stall-timeout "$STALL" >/dev/null
MOUNT_PID=$(python3 -c "import json; print(json.load(open('$W/mnt/.capsule/info.json'))['pid'])")
END=$(( $(date +%s) + MINUTES * 60 ))

# Reader: O_DIRECT random reads (aligned), each compared with the source; one line per
# error with its time, counters at the end.
python3 - "$W/mnt/root.raw" "$G/disk.raw" "$END" >"$W/reader.out" 2>&1 <<'PY' &
import mmap, os, random, sys, time
path, source, end = sys.argv[1], sys.argv[2], float(sys.argv[3])
src = open(source, "rb").read()
size = len(src)
reads = wrong = errors = compared = 0
buf = mmap.mmap(-1, 1 << 20)
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
rng = random.Random(1)
while time.time() < end:
    length = rng.choice([4096, 65536, 1 << 20])
    off = rng.randrange(0, size - length + 1) // 4096 * 4096
    try:
        n = os.preadv(fd, [memoryview(buf)[:length]], off)
        reads += 1
        compared += n
        if buf[:n] != src[off:off + n]:
            wrong += sum(1 for a, b in zip(buf[:n], src[off:off + n]) if a != b)
            print(f"WRONG {time.time():.1f} offset {off} length {n}", flush=True)
    except OSError as e:
        errors += 1
        print(f"ERROR {time.time():.1f} offset {off}: {e}", flush=True)
        time.sleep(0.2)
print(f"reads={reads} compared={compared} wrong={wrong} errors={errors}", flush=True)
PY
PIDS+=("$!")
READER=$!

# Booter: the guest from the mount, again and again.
(
  boots=0; failed=0; guest_errors=0
  while [ "$(date +%s)" -lt "$((END - 60))" ]; do
    console=$W/console-$boots.log
    timeout 240 qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot -nic none \
      -kernel "$W/mnt/vmlinuz" -initrd "$W/mnt/initrd.img" -append "console=ttyS0 quiet panic=-1 gmode=boot" \
      -drive "file=$W/mnt/root.raw,format=raw,if=virtio,readonly=on" </dev/null >"$console" 2>&1 || true
    boots=$((boots + 1))
    if ! grep -q "CAPSULE-GUEST-MARKER boot-ok" "$console"; then failed=$((failed + 1)); echo "BOOT-FAILED $(date +%s) $console"; fi
    if grep -qiE "I/O error|EXT4-fs error|Buffer I/O" "$console"; then guest_errors=$((guest_errors + 1)); echo "GUEST-IO-ERROR $(date +%s) $console"; fi
    echo "boots=$boots failed=$failed guest_io_errors=$guest_errors"
  done
) >"$W/booter.out" 2>&1 &
PIDS+=("$!")
BOOTER=$!

# Driver: one fault at a time.
declare -A FAULTS=([restart]=0 [cut]=0 [corrupt]=0 [fill]=0)
: >"$W/corrupt-windows"
rng() { python3 -c "import random; print(random.randint($1, $2))"; }
while [ "$(date +%s)" -lt "$((END - 20))" ]; do
  sleep "$(rng 15 40)"
  kind=$(python3 -c "import random; print(random.choice(['restart', 'cut', 'corrupt', 'fill']))")
  FAULTS[$kind]=$((FAULTS[$kind] + 1))
  case $kind in
    restart)
      kill -9 "$SERVER"; wait "$SERVER" 2>/dev/null || true
      sleep "$(rng 2 10)"
      starts=$((starts + 1)); start_server "$starts" ;;
    cut)
      touch "$W/cut"; sleep "$(rng 3 20)"; rm -f "$W/cut" ;;
    corrupt)
      f=$(find "$SRV/blocks" -type f | shuf -n 1)
      cp "$f" "$W/saved-block"
      t0=$(date +%s)
      python3 -c "import sys; p=sys.argv[1]; b=bytearray(open(p,'rb').read()); b[-1]^=0xff; open(p,'wb').write(b)" "$f"
      sleep 10
      cp "$W/saved-block" "$f"
      echo "$t0 $(( $(date +%s) + STALL ))" >>"$W/corrupt-windows" ;;
    fill)
      avail=$(df --output=avail -B1 "$W/cachefs" | tail -1)
      fallocate -l $(( avail > (8 << 20) ? avail - (8 << 20) : 0 )) "$W/cachefs/filler" 2>/dev/null || true
      sleep 15
      rm -f "$W/cachefs/filler" ;;
  esac
  echo "fault $kind at $(date +%s)"
done
wait "$READER" || true
wait "$BOOTER" || true
kill -0 "$MOUNT_PID" 2>/dev/null || die "the mount daemon died"

read -r reads compared wrong errors < <(tail -1 "$W/reader.out" | sed 's/[a-z]*=//g')
last_boot=$(grep '^boots=' "$W/booter.out" | tail -1)
boots=$(sed -n 's/boots=\([0-9]*\).*/\1/p' <<<"$last_boot")
failed=$(sed -n 's/.*failed=\([0-9]*\).*/\1/p' <<<"$last_boot")
guest_errors=$(sed -n 's/.*guest_io_errors=\([0-9]*\).*/\1/p' <<<"$last_boot")
# Read errors inside a corruption window (a corrupt block is never served: EIO until fixed)
# are expected; any other is not.
in_window=$(python3 - "$W/reader.out" "$W/corrupt-windows" <<'PY'
import sys
windows = [tuple(map(float, l.split())) for l in open(sys.argv[2]) if l.strip()]
n = 0
for l in open(sys.argv[1]):
    if l.startswith("ERROR "):
        t = float(l.split()[1])
        n += any(a <= t <= b for a, b in windows)
print(n)
PY
)
echo "soak: $MINUTES min: ${boots:-0} boots (${failed:-0} failed, ${guest_errors:-0} with guest I/O errors), $reads reads ($((compared >> 20)) MiB compared), $wrong wrong bytes, $errors read errors ($in_window in corruption windows); faults: restart ${FAULTS[restart]}, cut ${FAULTS[cut]}, corrupt ${FAULTS[corrupt]}, fill ${FAULTS[fill]}"
result_line soak "$(jq -n --argjson minutes "$MINUTES" --argjson stall "$STALL" '{minutes: $minutes, stall_timeout_s: $stall}')" \
  "$(jq -n --argjson boots "${boots:-0}" --argjson failed "${failed:-0}" --argjson ge "${guest_errors:-0}" --argjson reads "$reads" \
     --argjson compared "$compared" --argjson wrong "$wrong" --argjson errors "$errors" --argjson inwin "$in_window" \
     --argjson restart "${FAULTS[restart]}" --argjson cut "${FAULTS[cut]}" --argjson corrupt "${FAULTS[corrupt]}" --argjson fill "${FAULTS[fill]}" \
     '{boots: $boots, boots_failed: $failed, boots_with_guest_io_errors: $ge, reads: $reads, bytes_compared: $compared,
       wrong_bytes: $wrong, read_errors: $errors, read_errors_in_corruption_windows: $inwin,
       faults: {restart: $restart, cut: $cut, corrupt: $corrupt, fill: $fill}}')"
result_flush
[ "$wrong" = 0 ] || die "$wrong wrong bytes"
