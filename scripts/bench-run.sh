#!/bin/bash
# `capsule run` / `capsule suspend` benchmark: what a VM costs to move, measured end to end
# with a real QEMU (TCG) running straight from a real mount fed over QUIC on loopback.
#   1. cold boot of the test guest from an empty cache: disk bytes fetched against the
#      disk's size, and bytes on the wire;
#   2. suspend with and without ballooning (guest dirtied and freed 96 MiB): RAM blocks in
#      the child, bytes stored and pushed, device state, seconds per phase;
#   3. resume of the ballooned child on an empty cache with and without the
#      fault-granularity fix: RAM fetched in the first 10 s against what QEMU touched.
# One run of each, one VM at a time. Writes one JSON line per measured variant to
# results/run.jsonl (scripts/results-lib.sh); BENCHMARKS.md's tables are generated from
# them (scripts/gen-benchmarks.py) and printed at the end. Progress and failures go to
# stderr. Everything it starts is stopped, and its work dir removed, on exit.
#
#   bash scripts/bench-run.sh | tee target/bench-run.md
# Environment: CAPSULE (binary, default target/release/capsule), CAPSULE_GUEST_DIR
# (default target/guest), TMPDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/results-lib.sh
. scripts/results-lib.sh
G=${CAPSULE_GUEST_DIR:-target/guest}
CAPSULE=${CAPSULE:-target/release/capsule}

die() { echo "bench-run: error: $*" >&2; exit 1; }
log() { echo "bench-run: $*" >&2; }

[ -x "$CAPSULE" ] || die "no capsule binary at $CAPSULE (cargo build --release, or set CAPSULE)"
BIN=$(readlink -f "$CAPSULE")
for f in vmlinuz initrd.gz disk.raw; do
  [ -f "$G/$f" ] || die "missing $G/$f (make guest)"
done
for c in jq python3 fusermount3 qemu-system-x86_64; do
  command -v "$c" >/dev/null || die "$c not found"
done

W=$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-run.XXXXXX")
export CAPSULE_CONFIG_DIR=$W/cfg CAPSULE_RUN_DIR=$W/runs
mkdir -p "$CAPSULE_CONFIG_DIR" "$CAPSULE_RUN_DIR"
SERVER_PID= SERVER_PIDS=
declare -A RPID=()   # run id -> pid of its `capsule run`

cleanup() {
  local rc=$? p id m
  trap - EXIT INT TERM
  # QEMU first: a `capsule run` whose QEMU is gone unmounts and exits at once.
  for rec in "$W"/runs/*/run.json; do
    [ -f "$rec" ] || continue
    p=$(jq -r '.qemu_pid // empty' "$rec" 2>/dev/null || true)
    [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true
  done
  for id in "${!RPID[@]}"; do
    p=${RPID[$id]}
    if kill -0 "$p" 2>/dev/null; then
      kill -TERM "$p" 2>/dev/null || true
      for _ in $(seq 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$p" 2>/dev/null || true
    fi
  done
  for p in $SERVER_PIDS; do kill "$p" 2>/dev/null || true; done
  # Any mount left under the work dir (deepest first).
  awk -v w="$W" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$W"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Dumps what a run left, for a failure message.
run_logs() {
  local id=$1
  echo "--- capsule run $id output:" >&2
  tail -n 30 "$W/$id.out" >&2 2>/dev/null || true
  echo "--- console of $id (tail):" >&2
  tail -n 20 "$W/$id.console" 2>/dev/null | tr -d '\r' >&2 || true
}
run_fail() { local id=$1; shift; run_logs "$id"; die "run $id: $*"; }

udp_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_run ID STORE SOURCE CACHE [extra args...]: `capsule run` in the background.
# SIGINT back to its default disposition: bash leaves it ignored in background jobs.
start_run() {
  local id=$1 store=$2 source=$3 cache=$4
  shift 4
  date +%s.%N >"$W/$id.start"
  env --default-signal=INT "$BIN" --store "$store" run "$source" --cache "$cache" --accel tcg --quiet \
    --id "$id" --serial-log "$W/$id.console" "$@" </dev/null >"$W/$id.out" 2>&1 &
  RPID[$id]=$!
}

alive() { kill -0 "${RPID[$1]}" 2>/dev/null; }

# wait_until ID TIMEOUT_S WHAT COMMAND...: until COMMAND succeeds, failing if run ID ends first.
wait_until() {
  local id=$1 t=$2 what=$3 end=$(($2 + SECONDS))
  shift 3
  until "$@" >/dev/null 2>&1; do
    alive "$id" || run_fail "$id" "ended before $what"
    [ "$SECONDS" -lt "$end" ] || run_fail "$id" "no $what within ${t} s"
    sleep 0.1
  done
}
# wait_console ID PATTERN TIMEOUT_S
wait_console() { wait_until "$1" "$3" "'$2' on the console" grep -qaF -- "$2" "$W/$1.console"; }
# wait_record ID TIMEOUT_S: until run.json is there and whole (QEMU started, resumed if suspended).
wait_record() { wait_until "$1" "$2" "run.json" jq -e '.qemu_pid and .mountpoint' "$W/runs/$1/run.json"; }

# wait_exit ID TIMEOUT_S: until `capsule run` exits; sets RC to its exit status.
wait_exit() {
  local id=$1 t=$2 end=$((SECONDS + $2))
  while alive "$id"; do
    [ "$SECONDS" -lt "$end" ] || run_fail "$id" "still running after ${t} s"
    sleep 0.2
  done
  RC=0
  wait "${RPID[$id]}" || RC=$?
  unset "RPID[$id]"
}

# "1.9 MiB" -> bytes (as precise as the one decimal the CLI prints)
bytes() { awk -v v="$1" -v u="$2" 'BEGIN { m["B"]=1; m["KiB"]=1024; m["MiB"]=1048576; m["GiB"]=1073741824; m["TiB"]=1099511627776;
  if (!(u in m)) { print "bad unit " u > "/dev/stderr"; exit 1 } printf "%.0f", v * m[u] }'; }

# ---------------------------------------------------------------- server
log "work dir $W"
# start_server STORE: import the guest into STORE, serve it; sets URL (and TOKEN).
# Each suspend pushes to a server of its own, so neither push finds the other's blocks.
start_server() {
  local S=$1
  "$BIN" --store "$S" import guest --disk "root=$G/disk.raw" --kernel "$G/vmlinuz" --initrd "$G/initrd.gz" \
    --cmdline "console=ttyS0 quiet panic=-1" >"$S.import.out" 2>&1 || { cat "$S.import.out" >&2; die "import failed"; }
  TOKEN=$("$BIN" --store "$S" token create --scope write 2>"$S.token.err" | tail -n 1) || { cat "$S.token.err" >&2; die "token create failed"; }
  [ -n "$TOKEN" ] || die "token create printed no token"
  local port pid end
  port=$(udp_port)
  "$BIN" --store "$S" serve --listen "127.0.0.1:$port" --public-read >"$S.server.out" 2>&1 &
  pid=$!
  SERVER_PIDS="$SERVER_PIDS $pid"
  SERVER_PID=$pid
  end=$((SECONDS + 20))
  until grep -q "capsule: serving .* on " "$S.server.out" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { cat "$S.server.out" >&2; die "server exited"; }
    [ "$SECONDS" -lt "$end" ] || { cat "$S.server.out" >&2; die "server not serving within 20 s"; }
    sleep 0.1
  done
  URL=capsule://127.0.0.1:$port
}
start_server "$W/server"
DISK_SIZE=$(stat -c %s "$G/disk.raw")

# ---------------------------------------------------------------- 1. cold boot
log "1/3 cold boot from an empty cache"
start_run boot "$W/client-boot" "$URL/guest" "$W/cache-boot" --append "gmode=boot"
wait_exit boot 240
BOOT_WALL=$(awk -v a="$(cat "$W/boot.start")" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
[ "$RC" = 0 ] || run_fail boot "exited with status $RC"
grep -qa "CAPSULE-GUEST-MARKER boot-ok" "$W/boot.console" || run_fail boot "no boot-ok marker on the console"
LINE=$(grep -a "capsule: fetched .* of disk" "$W/boot.out" | tail -n 1) || run_fail boot "no fetch summary line"
# capsule: fetched D U of S U of disk (OTHERS); W U on the wire (N blocks) from SRC
read -r b_dv b_du b_sv b_su b_wv b_wu b_blocks < <(sed -nE \
  's/.*fetched ([0-9.]+) ([KMGT]?i?B) of ([0-9.]+) ([KMGT]?i?B) of disk \(.*\); ([0-9.]+) ([KMGT]?i?B) on the wire \(([0-9]+) blocks\).*/\1 \2 \3 \4 \5 \6 \7/p' <<<"$LINE") || true
[ -n "${b_blocks:-}" ] || run_fail boot "cannot parse: $LINE"
b_others=$(sed -nE 's/.* of disk \((.*)\); .* on the wire .*/\1/p' <<<"$LINE")
B_DISK=$(bytes "$b_dv" "$b_du")
B_WIRE=$(bytes "$b_wv" "$b_wu")
B_GUEST_S=$(sed -nE 's/.*guest stopped \(.*\) after ([0-9.]+) s.*/\1/p' "$W/boot.out" | tail -n 1)

# ---------------------------------------------------------------- 2. suspend
# suspend_one ID CHILDNAME [--no-balloon]: run gmode=loop gdirty=96 to COUNTER 5, suspend
# and push; leaves $W/ID.suspend.json (the report) and $W/ID.push (the push line).
suspend_one() {
  local id=$1 name=$2
  shift 2
  start_run "$id" "$W/host-a-$id" "$URL/guest" "$W/cache-a-$id" --append "gmode=loop gdirty=96" --token "$TOKEN"
  wait_console "$id" "COUNTER 5" 240
  "$BIN" --store "$W/host-a-$id" suspend "$id" "$name" --json "$@" --push "$URL/$name" --token "$TOKEN" \
    >"$W/$id.suspend.out" 2>"$W/$id.suspend.err" || { cat "$W/$id.suspend.out" "$W/$id.suspend.err" >&2; run_fail "$id" "suspend failed"; }
  sed -n '/^{/,$p' "$W/$id.suspend.out" >"$W/$id.suspend.json"
  jq -e '.memory_blocks' "$W/$id.suspend.json" >/dev/null || { cat "$W/$id.suspend.out" >&2; die "suspend $id: no JSON report"; }
  grep -a "^pushed $name: " "$W/$id.suspend.out" >"$W/$id.push" || { cat "$W/$id.suspend.out" >&2; die "suspend $id: no push line"; }
  wait_exit "$id" 90
  [ "$RC" = 0 ] || run_fail "$id" "exited with status $RC after the suspend"
  grep -qa "suspended as $name" "$W/$id.out" || run_fail "$id" "run did not report the suspend"
}
log "2/3 suspend with ballooning (gmode=loop gdirty=96)"
suspend_one shrunk guest-balloon
RESUME_URL=$URL
log "2/3 suspend without ballooning (gmode=loop gdirty=96), pushed to a second server"
start_server "$W/server2"
suspend_one plain guest-noballoon --no-balloon
URL=$RESUME_URL

# push line: pushed N: L logical, B blocks sent/received (X U encoded), K blocks skipped (...), O objects; wire: W U sent, R received
push_field() {
  sed -nE 's/^pushed [^:]*: .* logical, ([0-9]+) blocks sent\/received \(([0-9.]+) ([KMGT]?i?B) encoded\), ([0-9]+) blocks skipped.*; wire: ([0-9.]+) ([KMGT]?i?B) sent.*/\1 \2 \3 \4 \5 \6/p' "$W/$1.push"
}
declare -A SUS=()
for id in shrunk plain; do
  j=$W/$id.suspend.json
  read -r p_blocks p_xv p_xu p_skip p_wv p_wu < <(push_field "$id") || true
  [ -n "${p_wu:-}" ] || die "cannot parse push line: $(cat "$W/$id.push")"
  SUS[$id.sent_blocks]=$p_blocks
  SUS[$id.sent]=$(bytes "$p_xv" "$p_xu")
  SUS[$id.skipped]=$p_skip
  SUS[$id.wire]=$(bytes "$p_wv" "$p_wu")
  SUS[$id.last]=$(tr -d '\r' <"$W/$id.console" | sed -nE 's/^COUNTER ([0-9]+)$/\1/p' | tail -n 1)
done

# ---------------------------------------------------------------- 3. resume
# resume_one ID [--no-fault-fix]: resume guest-balloon on an empty cache; 10 s after run.json
# appears, sample stats.json and QEMU's smaps; then Ctrl-C it.
declare -A RES=()
resume_one() {
  local id=$1
  shift
  start_run "$id" "$W/host-b-$id" "$URL/guest-balloon" "$W/cache-b-$id" --token "$TOKEN" "$@"
  # Device state loaded: from the start of `capsule run` (mount, QEMU start, load, cont) to
  # its "resumed" line, polled every 0.1 s.
  wait_until "$id" 120 "the 'resumed' line" grep -qa "capsule: resumed " "$W/$id.out"
  RES[$id.loaded]=$(awk -v a="$(cat "$W/$id.start")" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
  wait_record "$id" 120
  local rec=$W/runs/$id/run.json pid mnt
  pid=$(jq -r .qemu_pid "$rec")
  mnt=$(jq -r .mountpoint "$rec")
  sleep 10
  alive "$id" || run_fail "$id" "ended within 10 s of resuming"
  cp "$mnt/.capsule/stats.json" "$W/$id.stats.json" || run_fail "$id" "cannot read $mnt/.capsule/stats.json"
  # Rss and FilePmdMapped of QEMU's mappings of memory.raw
  awk '/^[0-9a-f]+-[0-9a-f]+ / { inside = ($NF ~ /\/memory\.raw$/) ; next }
       inside && $1 == "Rss:" { rss += $2 } inside && $1 == "FilePmdMapped:" { pmd += $2 }
       END { printf "%d %d\n", rss * 1024, pmd * 1024 }' "/proc/$pid/smaps" >"$W/$id.rss" || run_fail "$id" "cannot read /proc/$pid/smaps"
  kill -INT "${RPID[$id]}"
  wait_exit "$id" 60
  local s
  s=$(sed -nE 's/.*capsule: resumed .* in ([0-9.]+) s.*/\1/p' "$W/$id.out" | tail -n 1)
  [ -n "$s" ] || run_fail "$id" "no 'resumed ... in X s' line (booted instead of resuming?)"
  if grep -qa "CAPSULE-GUEST-VERSION" "$W/$id.console"; then run_fail "$id" "the guest booted instead of resuming"; fi
  RES[$id.secs]=$s
  RES[$id.ram]=$(jq -r '.files["memory.raw"].fetched_bytes' "$W/$id.stats.json")
  RES[$id.wire]=$(jq -r .bytes_fetched "$W/$id.stats.json")
  RES[$id.blocks]=$(jq -r .blocks_fetched "$W/$id.stats.json")
  read -r "RES[$id.rss]" "RES[$id.pmd]" <"$W/$id.rss"
  local c
  c=$(tr -d '\r' <"$W/$id.console" | sed -nE 's/^COUNTER ([0-9]+)$/\1/p')
  RES[$id.first]=$(head -n 1 <<<"$c")
  RES[$id.last]=$(tail -n 1 <<<"$c")
  RES[$id.rc]=$RC
}
log "3/3 resume with the fault-granularity fix"
resume_one fix
log "3/3 resume without it (--no-fault-fix)"
resume_one nofix --no-fault-fix

# ---------------------------------------------------------------- results
result_line run '{"section": "boot", "accel": "tcg", "append": "gmode=boot", "cache": "empty"}' \
  "$(jq -n --argjson disk "$DISK_SIZE" --argjson fetched "$B_DISK" --argjson wire "$B_WIRE" --argjson blocks "$b_blocks" \
        --arg others "$b_others" --argjson guest "${B_GUEST_S:-null}" --argjson wall "$BOOT_WALL" --arg line "${LINE#capsule: }" \
        '{disk_bytes: $disk, disk_fetched_bytes_approx: $fetched, other_files_fetched: $others, wire_bytes_approx: $wire,
          blocks_fetched: $blocks, guest_seconds: $guest, run_seconds: $wall, summary_line: $line}')"
for id in plain shrunk; do
  j=$W/$id.suspend.json
  if [ "$id" = plain ]; then variant=no-balloon; else variant=balloon; fi
  result_line run "$(jq -n --arg v "$variant" '{section: "suspend", variant: $v, append: "gmode=loop gdirty=96", at_counter: 5}')" \
    "$(jq -n --slurpfile r "$j" --argjson sent_blocks "${SUS[$id.sent_blocks]}" --argjson sent "${SUS[$id.sent]}" \
          --argjson skipped "${SUS[$id.skipped]}" --argjson wire "${SUS[$id.wire]}" --argjson last "${SUS[$id.last]:-null}" \
          --arg line "$(cat "$W/$id.push")" \
          '$r[0] as $r | {memory_blocks: $r.memory_blocks, changed_blocks: $r.changed_blocks, stored_bytes: $r.stored_bytes,
            devstate_bytes: $r.devstate_bytes, balloon_reached_mib: ($r.balloon.reached_mib // null),
            balloon_target_mib: ($r.balloon.target_mib // null), seconds: $r.seconds,
            push_blocks_sent: $sent_blocks, push_block_bytes_sent_approx: $sent, push_blocks_skipped: $skipped,
            push_wire_bytes_approx: $wire, last_counter: $last, push_line: $line}')"
done
for id in fix nofix; do
  if [ "$id" = fix ]; then variant=fix; else variant=no-fault-fix; fi
  result_line run "$(jq -n --arg v "$variant" '{section: "resume", variant: $v, capsule: "guest-balloon", cache: "empty", sample_after_seconds: 10}')" \
    "$(jq -n --argjson loaded "${RES[$id.loaded]}" --argjson qemu "${RES[$id.secs]}" --argjson ram "${RES[$id.ram]}" \
          --argjson rss "${RES[$id.rss]}" --argjson pmd "${RES[$id.pmd]}" --argjson wire "${RES[$id.wire]}" \
          --argjson blocks "${RES[$id.blocks]}" --argjson first "${RES[$id.first]:-null}" --argjson last "${RES[$id.last]:-null}" \
          --argjson rc "${RES[$id.rc]}" --argjson at "${SUS[shrunk.last]:-null}" \
          '{loaded_seconds_from_run_start: $loaded, resumed_seconds_from_qemu_start: $qemu, ram_fetched_bytes: $ram,
            ram_touched_bytes: $rss, ram_huge_mapped_bytes: $pmd, wire_bytes: $wire, blocks_fetched: $blocks,
            first_counter: $first, last_counter: $last, suspended_at_counter: $at, exit_status_after_ctrl_c: $rc}')"
done
result_flush
python3 scripts/gen-benchmarks.py --show run
log "done"
