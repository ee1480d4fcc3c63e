#!/bin/bash
# The realistic guest over slow links (make bench-boot-link): the Debian guest
# (tests/guest/build-debian.sh: systemd + nginx, marker once nginx answers) booted across
# an emulated link, side by side in one run per rate:
#   nbd      QEMU's NBD client against qemu-nbd (kernel and initrd local), the peer
#   cold     `capsule run` from an empty cache
#   seed     the same, kernel and initrd given with --seed (local copies)
#   profile  the same, with the boot profile and --prefetch profile
# The link: two network namespaces of our own joined by a veth pair, tc tbf at the rate on
# both ends (scripts/link-lib.sh), and capsule-linkemu beside the servers adding DELAY_MS
# each way (UDP for capsule's QUIC, --tcp for qemu-nbd), so both see the same RTT.
# Per run: seconds from the start of the client (`capsule run` incl. its mount, or QEMU) to
# the guest's marker; bytes on the client's veth (both directions) up to the marker and in
# total; for capsule the mount's stats at the marker and `capsule run`'s fetch summary.
# The reference: the compressed demand working set at BLOCK_SIZE, from QEMU's block trace
# of a local boot (distinct blocks read, each zstd -3 compressed as the store does; zero
# blocks cost nothing) plus kernel and initrd (which QEMU reads whole). The boot profile is
# recorded first on a local mount (`capsule mount --record-profile boot`) and served.
# Every run also leaves a bytes-over-time trace (SAMPLE_S apart): TRACE_DIR/<run>.csv and,
# for capsule, the mount's raw .capsule/stats.json samples in <run>.stats.jsonl.gz.
# Results: one JSON line per run in results/bench-boot-link.jsonl (scripts/results-lib.sh).
# Environment: RATES="2mbit 10mbit", VARIANTS="nbd cold seed profile", DELAY_MS=20,
# BLOCK_SIZE=64K, COMPRESS_LEVEL=19 (the import's zstd level: a publisher preparing a
# capsule for slow links), GUEST_MEM=512 (MiB), BOOT_TIMEOUT=1200 (s per boot), SAMPLE_S=0.5,
# CAPSULE_DEBIAN_GUEST_DIR (default target/guest-debian), CAPSULE_BIN, TRACE_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/results-lib.sh
. scripts/results-lib.sh
G=$(readlink -f "${CAPSULE_DEBIAN_GUEST_DIR:-target/guest-debian}")
BIN=$(readlink -f "${CAPSULE_BIN:-target/release/capsule}")
EMU=$(dirname "$BIN")/capsule-linkemu
RATES=${RATES:-2mbit 10mbit}
VARIANTS=${VARIANTS:-nbd cold seed profile}
DELAY_MS=${DELAY_MS:-20}
BLOCK_SIZE=${BLOCK_SIZE:-64K}
COMPRESS_LEVEL=${COMPRESS_LEVEL:-19}
MEM=${GUEST_MEM:-512}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-1200}
SAMPLE_S=${SAMPLE_S:-0.5}
TRACE_DIR=${TRACE_DIR:-$RESULTS_DIR/bench-boot-link/$RESULT_RUN}
MARKER='CAPSULE-GUEST-MARKER debian-ready'
die() { echo "bench-boot-link: $*" >&2; exit 1; }
[ -f "$G/.complete" ] || die "no Debian guest in $G (make guest-debian)"
[ -x "$BIN" ] && [ -x "$EMU" ] || die "no release build ($BIN, $EMU): cargo build --release --features testtools"
for t in qemu-system-x86_64 qemu-nbd zstd jq python3 nsenter; do command -v $t >/dev/null || die "needs $t"; done
# `capsule run --id` names a directory: keep only characters it accepts.
rate_id() { echo "$1" | tr -cd 'a-z0-9'; }

NS=capsule-bbl-$$
SNS=capsule-bbl-srv-$$
SRV_IP=10.212.0.1
CLI_IP=10.212.0.2
VETH=capbbl$$
# shellcheck source=scripts/link-lib.sh
. scripts/link-lib.sh
W=$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-boot-link.XXXXXX")
export CAPSULE_CONFIG_DIR=$W/config CAPSULE_RUN_DIR=$W/runs
mkdir -p "$CAPSULE_CONFIG_DIR" "$CAPSULE_RUN_DIR" "$TRACE_DIR"
PIDS=()      # servers, relays, clients, samplers: all ours
# nsenter enters only the network namespace: `ip netns exec` would also unshare the mount
# namespace and hide the FUSE mounts from everyone else. Arrays, not functions: a function
# run with & is a subshell whose $! is not the process to kill; nsenter execs the command.
IN_NS=(nsenter "--net=/run/netns/$NS")
IN_SRV=(nsenter "--net=/run/netns/$SNS")

# kill_qemus: the QEMUs `capsule run` started (pids from their run.json, if still QEMU).
kill_qemus() {
  local j p
  for j in "$CAPSULE_RUN_DIR"/*/run.json; do
    [ -f "$j" ] || continue
    p=$(jq -r '.qemu_pid // empty' "$j" 2>/dev/null) || continue
    [ -n "$p" ] && grep -q '^qemu' "/proc/$p/comm" 2>/dev/null && kill -9 "$p" 2>/dev/null || true
  done
}
cleanup() {
  set +e
  kill_qemus
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  for m in "$W"/mnt* "$CAPSULE_RUN_DIR"/*/mnt; do
    [ -d "$m" ] && mountpoint -q "$m" && { fusermount3 -uz "$m" 2>/dev/null || umount -l "$m"; }
  done
  link_delete
  rm -rf --one-file-system "$W"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
# link_bytes: "RX TX" of the client's veth end (RX: server to client).
link_bytes() {
  ip -n "$NS" -s -j link show dev "${VETH}b" | jq -r '"\(.[0].stats64.rx.bytes) \(.[0].stats64.tx.bytes)"'
}

# sampler NAME T0 CONSOLE [MNT]: every SAMPLE_S, link counters (+ the mount's stats) to
# TRACE_DIR/NAME.csv (+ NAME.stats.jsonl); `marker` turns 1 once the guest printed it.
sampler() {
  local name=$1 t0=$2 con=$3 mnt=${4:-} csv=$TRACE_DIR/$1.csv rx tx st wire blocks seeds marker
  echo "t_s,link_rx_bytes,link_tx_bytes,wire_bytes_fetched,blocks_fetched,seed_blocks,marker" > "$csv"
  while :; do
    read -r rx tx < <(link_bytes)
    wire= blocks= seeds=
    if [ -n "$mnt" ] && st=$(timeout 2 cat "$mnt/.capsule/stats.json" 2>/dev/null) && [ -n "$st" ]; then
      read -r wire blocks seeds < <(jq -r '"\(.bytes_fetched) \(.blocks_fetched) \(.seed_blocks)"' <<<"$st")
      jq -c --argjson t "$(secs "$t0" "$(now)")" '{t: $t, stats: .}' <<<"$st" >> "$TRACE_DIR/$name.stats.jsonl"
    fi
    marker=0; grep -aq "$MARKER" "$con" 2>/dev/null && marker=1
    echo "$(secs "$t0" "$(now)"),$rx,$tx,$wire,$blocks,$seeds,$marker" >> "$csv"
    sleep "$SAMPLE_S"
  done
}

# await PID CONSOLE T0: wait for the marker (sets MARK_T, or empty if PID ended or
# BOOT_TIMEOUT passed first), then up to 120 s more for PID to end (the guest powers off).
await() {
  local pid=$1 con=$2 t0=$3 i=0
  MARK_T=
  while kill -0 "$pid" 2>/dev/null; do
    if grep -aq "$MARKER" "$con" 2>/dev/null; then MARK_T=$(now); break; fi
    [ "$(secs "$t0" "$(now)" | cut -d. -f1)" -ge "$BOOT_TIMEOUT" ] && break
    sleep 0.1
  done
  [ -n "$MARK_T" ] || { grep -aq "$MARKER" "$con" 2>/dev/null && MARK_T=$(now); } || true
  while kill -0 "$pid" 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
  kill_qemus
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

############ local references ############
echo "bench-boot-link: local boot with a block trace" >&2
QEMU_BASE=(qemu-system-x86_64 -accel tcg -m "$MEM" -nographic -no-reboot -nic none)
CMDLINE=$(cat "$G/cmdline")
t0=$(now)
timeout "$BOOT_TIMEOUT" "${QEMU_BASE[@]}" -kernel "$G/vmlinuz" -initrd "$G/initrd.gz" -append "$CMDLINE" \
  -drive "file=$G/disk.raw,format=raw,if=virtio,readonly=on" -trace bdrv_co_preadv_part -D "$W/local-trace.log" \
  </dev/null >"$W/local.console" 2>&1 &
PIDS+=($!)
await $! "$W/local.console" "$t0"
[ -n "$MARK_T" ] || die "local boot printed no marker (see a manual boot: tests/guest/boot-debian.sh)"
local_boot=$(secs "$t0" "$MARK_T")

# The working set: distinct BLOCK_SIZE blocks of the trace, each compressed as the store
# does (zstd at the import's level, kept raw unless that saves more than 16 bytes; zero
# blocks are free).
WS=$(python3 - "$W/local-trace.log" "$G/disk.raw" "$G/vmlinuz" "$G/initrd.gz" "$BLOCK_SIZE" "$COMPRESS_LEVEL" <<'EOF'
import json, re, subprocess, sys
trace, disk, kernel, initrd, bs, level = sys.argv[1:]
bs = int(bs[:-1]) * {"K": 1024, "M": 1 << 20}[bs[-1]]
def stored(raw):
    if not raw.strip(b"\0"):
        return 0
    c = subprocess.run(["zstd", f"-{level}", "-q", "-c", "--no-check"], input=raw, capture_output=True, check=True).stdout
    return len(c) if len(c) + 16 < len(raw) else len(raw)
blocks = set()
for line in open(trace):
    m = re.search(r"offset (\d+) bytes (\d+)", line)
    if m:
        o, n = int(m.group(1)), int(m.group(2))
        blocks.update(range(o // bs, (o + n - 1) // bs + 1))
with open(disk, "rb") as f:
    disk_c = 0
    for b in sorted(blocks):
        f.seek(b * bs)
        disk_c += stored(f.read(bs))
def whole(path):
    data = open(path, "rb").read()
    return sum(stored(data[i:i + bs]) for i in range(0, len(data), bs))
files_c = whole(kernel) + whole(initrd)
print(json.dumps({"block_size_bytes": bs, "disk_blocks": len(blocks), "disk_raw_bytes": len(blocks) * bs,
                  "disk_compressed_bytes": disk_c, "kernel_initrd_compressed_bytes": files_c,
                  "total_compressed_bytes": disk_c + files_c}))
EOF
)
read_4k=$(awk '/offset/ { for (i = 1; i <= NF; i++) { if ($i == "offset") o = $(i+1); if ($i == "bytes") n = $(i+1) }
    for (b = int(o / 4096); b <= int((o + n - 1) / 4096); b++) seen[b] = 1 } END { c = 0; for (k in seen) c++; print c * 4096 }' "$W/local-trace.log")

echo "bench-boot-link: import, and record the boot profile on a local mount" >&2
PUB=$W/publisher
t0=$(now)
"$BIN" --store "$PUB" import guest --block-size "$BLOCK_SIZE" --compress-level "$COMPRESS_LEVEL" --disk "root=$G/disk.raw" --kernel "$G/vmlinuz" \
  --initrd "$G/initrd.gz" --cmdline "$CMDLINE" --ram "${MEM}M" --cpus 1 >/dev/null
import_s=$(secs "$t0" "$(now)")
mkdir -p "$W/mnt-rec"
t0=$(now)
"$BIN" --store "$PUB" mount guest "$W/mnt-rec" --cache "$W/rec-cache" --read-only --record-profile boot >/dev/null
timeout "$BOOT_TIMEOUT" "${QEMU_BASE[@]}" -kernel "$W/mnt-rec/vmlinuz" -initrd "$W/mnt-rec/initrd.img" -append "$CMDLINE" \
  -drive "file=$W/mnt-rec/root.raw,format=raw,if=virtio,readonly=on" </dev/null >"$W/rec.console" 2>&1 &
PIDS+=($!)
await $! "$W/rec.console" "$t0"
[ -n "$MARK_T" ] || die "boot from the local mount printed no marker"
mount_boot=$(secs "$t0" "$MARK_T")
"$BIN" umount "$W/mnt-rec" >/dev/null
profile=$("$BIN" --store "$PUB" inspect guest --json | jq -c '[.profiles[] | select(.name == "boot")][0]')
[ "$profile" != null ] || die "no boot profile recorded"

result_line bench-boot-link "$(jq -n --arg bs "$BLOCK_SIZE" --argjson mem "$MEM" --argjson lvl "$COMPRESS_LEVEL" '{variant: "local", block_size: $bs, compress_level: $lvl, guest: "debian", guest_mem_mib: $mem}')" \
  "$(jq -n --argjson raw "$local_boot" --argjson mnt "$mount_boot" --argjson read "$read_4k" --argjson ws "$WS" \
        --argjson prof "$profile" --argjson imp "$import_s" \
        --argjson disk "$(stat -c %s "$G/disk.raw")" --argjson alloc "$(( $(stat -c %b "$G/disk.raw") * 512 ))" \
        '{raw_boot_seconds: $raw, mount_boot_seconds: $mnt, disk_bytes: $disk, disk_allocated_bytes: $alloc,
          boot_read_bytes_4k: $read, working_set: $ws, profile: $prof, import_seconds: $imp}')"
echo "bench-boot-link: local boot ${local_boot} s (raw file), ${mount_boot} s (local mount); boot read $(awk -v b="$read_4k" 'BEGIN { printf "%.1f", b / 1048576 }') MiB; working set $(jq -r '.total_compressed_bytes' <<<"$WS") B compressed" >&2

############ servers and relays, in the server namespace ############
link_create
"${IN_SRV[@]}" "$BIN" --store "$PUB" serve --listen 127.0.0.1:7070 --public-read >"$W/serve.log" 2>&1 &
PIDS+=($!)
"${IN_SRV[@]}" "$EMU" --listen "$SRV_IP:7071" --to 127.0.0.1:7070 --delay-ms "$DELAY_MS" 2>"$W/emu-udp.log" &
PIDS+=($!)
"${IN_SRV[@]}" qemu-nbd --read-only --persistent --shared=8 --format=raw --bind=127.0.0.1 --port=10809 "$G/disk.raw" 2>"$W/nbd.log" &
PIDS+=($!)
"${IN_SRV[@]}" "$EMU" --tcp --listen "$SRV_IP:10810" --to 127.0.0.1:10809 --delay-ms "$DELAY_MS" 2>"$W/emu-tcp.log" &
PIDS+=($!)
sleep 1
URL=capsule://$SRV_IP:7071/guest
ws_total=$(jq .total_compressed_bytes <<<"$WS")
ws_disk=$(jq .disk_compressed_bytes <<<"$WS")

declare -A RES=()
FAILED=0
# one VARIANT RATE BITS: one boot across the link; appends its result line.
one() {
  local v=$1 rate=$2 bits=$3 name con pid t0 b0 bm b1 mnt="" stats=null summary="" ws=$ws_total
  name=$(rate_id "$rate")-$v
  con=$W/$name.console
  : > "$con"
  read -r -a b0 < <(link_bytes)
  t0=$(now)
  case $v in
    nbd)
      ws=$ws_disk
      "${IN_NS[@]}" timeout "$BOOT_TIMEOUT" "${QEMU_BASE[@]}" -kernel "$G/vmlinuz" -initrd "$G/initrd.gz" -append "$CMDLINE" \
        -drive "file=nbd://$SRV_IP:10810,format=raw,if=virtio,readonly=on" </dev/null >"$con" 2>&1 &
      pid=$! ;;
    cold|seed|profile)
      # Without a profile: --prefetch none (run would use the served boot profile).
      local extra=(--prefetch none)
      case $v in
        seed) extra+=(--seed "$G/vmlinuz" --seed "$G/initrd.gz"); ws=$ws_disk ;;
        profile) extra=(--prefetch profile --profile boot) ;;
      esac
      mnt=$CAPSULE_RUN_DIR/$name/mnt
      "${IN_NS[@]}" "$BIN" run "$URL" --id "$name" --accel tcg --read-only --cache "$W/cache-$name" \
        --serial-log "$con" --quiet "${extra[@]}" >"$W/$name.out" 2>"$W/$name.err" &
      pid=$! ;;
    *) die "unknown variant $v (VARIANTS: nbd cold seed profile)" ;;
  esac
  PIDS+=($pid)
  sampler "$name" "$t0" "$con" "$mnt" &
  local spid=$!
  PIDS+=($spid)
  # At the marker: the link counters and the mount's stats, before shutdown adds to them.
  MARK_T=
  while kill -0 "$pid" 2>/dev/null; do
    if grep -aq "$MARKER" "$con"; then MARK_T=$(now); break; fi
    [ "$(secs "$t0" "$(now)" | cut -d. -f1)" -ge "$BOOT_TIMEOUT" ] && break
    sleep 0.1
  done
  read -r -a bm < <(link_bytes)
  if [ -n "$mnt" ] && [ -n "$MARK_T" ]; then
    stats=$(timeout 5 cat "$mnt/.capsule/stats.json" 2>/dev/null | jq -c '{bytes_fetched, blocks_fetched, seed_blocks, cache_hits, cache_misses, reconnects, read_errors}') || stats=null
    [ -n "$stats" ] || stats=null
  fi
  local boot=${MARK_T:+$(secs "$t0" "$MARK_T")}
  await "$pid" "$con" "$t0"
  local t1; t1=$(now)
  kill "$spid" 2>/dev/null || true
  # Raw stats samples compress about 10x: keep them small enough to commit with the results.
  [ -f "$TRACE_DIR/$name.stats.jsonl" ] && gzip -9nf "$TRACE_DIR/$name.stats.jsonl"
  read -r -a b1 < <(link_bytes)
  [ -f "$W/$name.err" ] && summary=$(grep -a '^capsule: fetched' "$W/$name.err" | tail -n1 | sed 's/^capsule: //' || true)
  local link=$(( bm[0] + bm[1] - b0[0] - b0[1] ))
  if [ -z "$boot" ]; then
    FAILED=1
    echo "bench-boot-link: $rate $v: no marker within ${BOOT_TIMEOUT}s; console tail:" >&2
    tail -n 5 "$con" >&2
    [ -f "$W/$name.err" ] && tail -n 5 "$W/$name.err" >&2
  fi
  RES[$rate.$v.s]=${boot:-fail}
  RES[$rate.$v.mb]=$(awk -v b="$link" 'BEGIN { printf "%.1f", b / 1e6 }')
  RES[$rate.$v.ws]=$(awk -v b="$link" -v w="$ws" 'BEGIN { printf "%.2f", b / w }')
  RES[$rate.$v.sum]=$summary
  local vs_nbd=null
  if [ -n "$boot" ] && [ "$v" != nbd ] && [ "${RES[$rate.nbd.s]:-fail}" != fail ]; then
    vs_nbd=$(awk -v a="$boot" -v b="${RES[$rate.nbd.s]}" 'BEGIN { printf "%.3f", a / b }')
  fi
  RES[$rate.$v.vs]=$vs_nbd
  result_line bench-boot-link \
    "$(jq -n --arg v "$v" --arg rate "$rate" --argjson bits "$bits" --argjson d "$DELAY_MS" --arg bs "$BLOCK_SIZE" --argjson mem "$MEM" --argjson lvl "$COMPRESS_LEVEL" \
          '{variant: $v, rate: $rate, rate_bits_per_s: $bits, rtt_ms: (2 * $d), block_size: $bs, compress_level: $lvl, guest: "debian", guest_mem_mib: $mem}')" \
    "$(jq -n --argjson boot "${boot:-null}" --argjson total "$(secs "$t0" "$t1")" \
          --argjson rx "$(( bm[0] - b0[0] ))" --argjson tx "$(( bm[1] - b0[1] ))" --argjson link "$link" \
          --argjson linkall "$(( b1[0] + b1[1] - b0[0] - b0[1] ))" --argjson ws "$ws" --argjson stats "$stats" \
          --arg sum "$summary" --argjson vs "$vs_nbd" --arg trace "${TRACE_DIR#"$PWD"/}/$name.csv" \
          '{boot_seconds: $boot, run_seconds: $total, link_bytes: $link, link_rx_bytes: $rx, link_tx_bytes: $tx,
            link_bytes_to_exit: $linkall, working_set_compressed_bytes: $ws,
            link_over_working_set: (if $ws > 0 then $link / $ws else null end),
            time_vs_nbd: $vs, mount_stats_at_marker: $stats, fetch_summary: (if $sum == "" then null else $sum end),
            trace_csv: $trace}')"
  echo "bench-boot-link: $rate $v: ${boot:-FAILED} s, $(awk -v b="$link" 'BEGIN { printf "%.1f", b / 1e6 }') MB on the link${summary:+; $summary}" >&2
}

for rate in $RATES; do
  link_rate "$rate"
  bits=$(echo "$rate" | awk '/kbit/ { sub("kbit",""); print $1 * 1000; next } /mbit/ { sub("mbit",""); print $1 * 1000000 }')
  for v in $VARIANTS; do one "$v" "$rate" "$bits"; done
done

############ table ############
echo
echo "Debian guest, $((2 * DELAY_MS)) ms RTT, $BLOCK_SIZE blocks. Local boot: ${local_boot} s from the raw file, ${mount_boot} s from a local mount."
echo "Working set (compressed): disk $(awk -v b="$ws_disk" 'BEGIN { printf "%.1f", b / 1e6 }') MB, with kernel and initrd $(awk -v b="$ws_total" 'BEGIN { printf "%.1f", b / 1e6 }') MB."
echo
echo "| link | how | s to marker | MB on link | link / working set | time vs qemu-nbd | fetch summary |"
echo "|---|---|---|---|---|---|---|"
for rate in $RATES; do
  for v in $VARIANTS; do
    vs=${RES[$rate.$v.vs]}; [ "$vs" = null ] && vs=-
    echo "| $rate | $v | ${RES[$rate.$v.s]} | ${RES[$rate.$v.mb]} | ${RES[$rate.$v.ws]} | $vs | ${RES[$rate.$v.sum]:--} |"
  done
done
echo
echo "traces: $TRACE_DIR"
# Failed variants are in the results too (boot_seconds null), so a partial run still shows.
result_flush
# Bytes over time per rate, next to the traces.
python3 scripts/plot-link.py "$TRACE_DIR" || echo "bench-boot-link: no plots (pip install matplotlib)" >&2
exit $FAILED
