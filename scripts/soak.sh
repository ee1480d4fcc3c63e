#!/bin/bash
# Soak (make soak): SOAK_MINUTES (default 30) of phases, each a fresh read-only mount (empty
# cache) of the test guest served over a capsule-linkemu relay, a boot of the guest from it
# and random O_DIRECT reads, while the driver injects one fault as the boot starts (when
# nearly every read fetches): kills the server (restarted after 2-10 s), cuts the link
# (3-20 s, shorter than the stall timeout), corrupts 4 blocks in the server's store (5 s),
# or fills the cache's disk (10 s). A probe reads blocks the cache lacks while the fault
# holds: through an outage or a full disk it must get the right bytes; of a corrupt block,
# EIO (never wrong bytes), and the right bytes once repaired. Every byte read is compared
# with the source disk; every boot must print its marker with no I/O error on the console.
# Boots, reads, faults and the reads that met each kind go to results/soak.jsonl;
# BENCHMARKS.md's reliability table is generated from them.
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
[ -x "$LINKEMU" ] || die "no $LINKEMU (cargo build --release --features testtools builds it)"
python3 -c 'import blake3' 2>/dev/null || pip install -q blake3 || die "python3 needs the blake3 module (pip install blake3)"
PROBE="python3 scripts/soak-probe.py"
BLOCK=65536  # import --block-size 64K
# A process and everything it started (the booter's timeout and QEMU), by pid.
kill_tree() {
  local c
  for c in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$c"; done
  kill "$1" 2>/dev/null || true
}
cleanup() {
  local p
  [ -n "$SERVER" ] && kill -9 "$SERVER" 2>/dev/null || true
  for p in "${PIDS[@]}"; do kill_tree "$p"; done
  for p in "${PIDS[@]}"; do timeout 10 tail --pid="$p" -f /dev/null 2>/dev/null || kill -9 "$p" 2>/dev/null || true; done
  "$BIN" --store "$W/client" umount "$W/mnt" >/dev/null 2>&1 || fusermount3 -uz "$W/mnt" 2>/dev/null || true
  umount -l "$W/cachefs" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
export CAPSULE_CONFIG_DIR=$W/config
free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SRV=$W/server
"$BIN" --store "$SRV" import guest --disk "root=$G/disk.raw" --kernel "$G/vmlinuz" --initrd "$G/initrd.gz" --cmdline "console=ttyS0 quiet panic=-1" \
  --block-size 64K >/dev/null
# Which disk offsets each stored block backs, so probes read blocks the cache lacks.
indexed=$($PROBE index "$G/disk.raw" "$SRV" "$BLOCK" "$W/index")
[ "$indexed" -ge 100 ] || die "only $indexed of the disk's blocks found in the server's store by hash"
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
CACHE=$W/cachefs/cache
END=$(( $(date +%s) + MINUTES * 60 ))
rng() { python3 -c "import random; print(random.randint($1, $2))"; }
probe() { timeout 300 $PROBE read "$W/mnt/root.raw" "$G/disk.raw" "$W/index" "$CACHE" "$@" 2>>"$W/probe.err"; }
: >"$W/faults.jsonl"
: >"$W/corrupt-windows"
: >"$W/mount-stats.jsonl"
boots=0; failed=0; guest_errors=0; phase=0; corrupt_failed=0

# One fault, met by a probe of reads the cache cannot answer (8 in parallel; of a
# corruption, the 4 damaged blocks, then again once they are repaired).
fault() {
  local kind p healed=null t0 t1 damaged
  kind=$(python3 -c "import random; print(random.choice(['restart', 'cut', 'corrupt', 'fill']))")
  t0=$(date +%s.%N)
  case $kind in
    restart)
      kill -9 "$SERVER"; wait "$SERVER" 2>/dev/null || true
      probe 8 >"$W/probe.out" &
      p=$!
      sleep "$(rng 2 10)"
      starts=$((starts + 1)); start_server "$starts"
      wait "$p" || true ;;
    cut)
      touch "$W/cut"; sleep 0.2  # capsule-linkemu looks every 50 ms
      probe 8 >"$W/probe.out" &
      p=$!
      sleep "$(rng 3 20)"; rm -f "$W/cut"
      wait "$p" || true ;;
    corrupt)
      mapfile -t damaged < <($PROBE corrupt "$SRV" "$W/index" "$CACHE" 4 "$W/saved")
      probe 0 "${damaged[@]}" >"$W/probe.out" || true
      sleep 5  # the booter and the reader may meet them too
      $PROBE restore "$SRV" "$W/saved"
      echo "${t0%.*} $(( $(date +%s) + STALL ))" >>"$W/corrupt-windows"
      healed=$(probe 0 "${damaged[@]}" || echo null) ;;
    fill)
      cat /dev/zero >"$W/cachefs/filler" 2>/dev/null || true
      probe 8 >"$W/probe.out" || true
      sleep 10
      rm -f "$W/cachefs/filler" ;;
  esac
  t1=$(date +%s.%N)
  jq -cn --arg kind "$kind" --argjson t0 "$t0" --argjson t1 "$t1" --argjson probe "$(cat "$W/probe.out" 2>/dev/null || echo null)" \
    --argjson healed "${healed:-null}" '{kind: $kind, t0: $t0, t1: $t1, probe: $probe, healed: $healed}' >>"$W/faults.jsonl"
  echo "phase $phase: $kind: $(cat "$W/probe.out" 2>/dev/null) ${healed/null/}"
  rm -f "$W/probe.out"
}

# Phases until the time is up, each on a fresh mount with an empty cache (nothing in the
# daemon's memory either): a boot of the guest and random O_DIRECT reads, every byte
# compared, with one fault injected as the boot starts (when nearly every read fetches).
while [ "$(date +%s)" -lt "$((END - 45))" ]; do
  phase=$((phase + 1))
  rm -rf "$CACHE" "$W/stop"
  "$BIN" --store "$W/client" mount "capsule://127.0.0.1:$LPORT/guest" "$W/mnt" --cache "$CACHE" \
    --cache-size 96M --read-only --stall-timeout "$STALL" >/dev/null
  mount_pid=$(jq .pid "$W/mnt/.capsule/info.json")
  $PROBE reader "$W/mnt/root.raw" "$G/disk.raw" "$W/stop" >>"$W/reader.out" 2>&1 &
  reader=$!
  PIDS+=("$reader")
  console=$W/console.log
  timeout 240 qemu-system-x86_64 -accel tcg -m 256 -nographic -no-reboot -nic none \
    -kernel "$W/mnt/vmlinuz" -initrd "$W/mnt/initrd.img" -append "console=ttyS0 quiet panic=-1 gmode=boot" \
    -drive "file=$W/mnt/root.raw,format=raw,if=virtio,readonly=on" </dev/null >"$console" 2>&1 &
  booter=$!
  PIDS+=("$booter")
  sleep "$(rng 0 3)"
  fault
  wait "$booter" || true
  touch "$W/stop"
  wait "$reader" || true
  PIDS=("${PIDS[@]:0:1}")  # the relay only
  boots=$((boots + 1))
  bad=
  if ! grep -q "CAPSULE-GUEST-MARKER boot-ok" "$console" || grep -qiE "I/O error|EXT4-fs error|Buffer I/O" "$console"; then
    if [ "$(tail -1 "$W/faults.jsonl" | jq -r .kind)" = corrupt ]; then
      corrupt_failed=$((corrupt_failed + 1))  # the guest read a damaged block: EIO, as it must
    else
      grep -q "CAPSULE-GUEST-MARKER boot-ok" "$console" || { failed=$((failed + 1)); bad="boot failed"; }
      grep -qiE "I/O error|EXT4-fs error|Buffer I/O" "$console" && { guest_errors=$((guest_errors + 1)); bad="$bad guest I/O error"; }
    fi
  fi
  if [ -n "$bad" ]; then
    echo "phase $phase: $bad (console and mount log kept in target/soak-phase-$phase.*)"
    cp "$console" "target/soak-phase-$phase.console"; cp "$CACHE"/logs/*.log "target/soak-phase-$phase.mount.log" 2>/dev/null || true
  fi
  kill -0 "$mount_pid" 2>/dev/null || die "phase $phase: the mount daemon died"
  jq -c . "$W/mnt/.capsule/stats.json" >>"$W/mount-stats.jsonl"
  "$BIN" --store "$W/client" umount "$W/mnt" >/dev/null || die "phase $phase: umount failed"
done

read -r reads compared wrong errors < <(grep '^reads=' "$W/reader.out" | sed 's/[a-z]*=//g' |
  awk '{r += $1; c += $2; w += $3; e += $4} END {printf "%d %.0f %d %d\n", r, c, w, e}')
# Random reads failing inside a corruption window (a corrupt block is never served: EIO
# until it is repaired) are expected; any other is not.
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
# Per kind: faults, probe reads that met them (the block not cached when read), their
# outcomes, the slowest; of corruptions, the reads once repaired.
per_kind=$(jq -s '
  def sumof(f): map(f // 0) | add // 0;
  . as $all | reduce ("restart", "cut", "corrupt", "fill") as $k ({}; . + {($k): (
    [$all[] | select(.kind == $k)] as $f | {
      injected: ($f | length),
      probe_reads: ($f | sumof(.probe.reads)), met: ($f | sumof(.probe.uncached)), ok: ($f | sumof(.probe.ok)),
      eio: ($f | sumof(.probe.eio)), other_errors: ($f | sumof(.probe.errors)), wrong_bytes: ($f | sumof(.probe.wrong_bytes)),
      slowest_s: ($f | map(.probe.max_s // 0) | max // 0),
      healed_reads: ($f | sumof(.healed.reads)), healed_ok: ($f | sumof(.healed.ok)), healed_wrong_bytes: ($f | sumof(.healed.wrong_bytes))})})' "$W/faults.jsonl")
mount_stats=$(jq -sc '{phases: length, corrupt_blocks: (map(.fetch.corrupt_blocks) | add), timeouts: (map(.fetch.timeouts) | add),
  reconnects: (map(.reconnects) | add), blocks_fetched: (map(.blocks_fetched) | add), read_errors: (map(.read_errors) | add)}' "$W/mount-stats.jsonl")
probe_wrong=$(jq '[.[] | .wrong_bytes + .healed_wrong_bytes] | add' <<<"$per_kind")
probe_bad=$(jq '[.restart, .cut, .fill | .eio + .other_errors] + [.corrupt.other_errors] | add' <<<"$per_kind")
echo "soak: $MINUTES min, $phase phases: ${boots:-0} boots (${failed:-0} failed, ${guest_errors:-0} with guest I/O errors outside corruptions, $corrupt_failed met a corrupt block), $reads random reads ($((compared >> 20)) MiB compared), $wrong wrong bytes, $errors read errors ($in_window in corruption windows)"
echo "soak: faults and the probe reads that met them: $(jq -c . <<<"$per_kind")"
echo "soak: mount: $mount_stats"
result_line soak "$(jq -n --argjson minutes "$MINUTES" --argjson stall "$STALL" '{minutes: $minutes, stall_timeout_s: $stall, phases: "a fresh mount and cache per boot, one fault as it starts"}')" \
  "$(jq -n --argjson boots "${boots:-0}" --argjson failed "${failed:-0}" --argjson ge "${guest_errors:-0}" --argjson cf "$corrupt_failed" --argjson reads "$reads" \
     --argjson compared "$compared" --argjson wrong "$wrong" --argjson errors "$errors" --argjson inwin "$in_window" \
     --argjson per_kind "$per_kind" --argjson mount "$mount_stats" \
     '{boots: $boots, boots_failed: $failed, boots_with_guest_io_errors: $ge, boots_meeting_corrupt_blocks: $cf, reads: $reads, bytes_compared: $compared,
       wrong_bytes: $wrong, read_errors: $errors, read_errors_in_corruption_windows: $inwin,
       faults: ($per_kind | map_values(.injected)), met: $per_kind, mount: $mount}')"
result_flush
[ "$wrong" = 0 ] && [ "$probe_wrong" = 0 ] || die "wrong bytes: $wrong random, $probe_wrong probe"
[ "$probe_bad" = 0 ] || die "$probe_bad probe reads failed through an outage or a full disk (or not with EIO on a corrupt block)"
[ "$((errors - in_window))" = 0 ] || die "$((errors - in_window)) random reads failed outside corruption windows"
[ "${failed:-0}" = 0 ] && [ "${guest_errors:-0}" = 0 ] || die "${failed:-0} boots failed, ${guest_errors:-0} with guest I/O errors"
