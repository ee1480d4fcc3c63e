#!/bin/bash
# Bulk transfers over an emulated link (make bench-bulk-link): `capsule warm --all` and
# `capsule prefetch --offline` of an incompressible capsule into an empty cache, `capsule
# pull` of it into an empty store, `capsule push` of another such capsule the server
# lacks, side by side in one run with rsync of the same bytes (an rsync daemon behind capsule-linkemu
# --tcp), per link: rate and loss. Goodput = bytes of blocks fetched / seconds, against
# the link rate. The link: namespaces, veth and tbf (scripts/link-lib.sh) with
# capsule-linkemu beside the server adding DELAY_MS each way (and LOSS percent, UDP only).
# Results: results/bench-bulk-link.jsonl.
# Environment: LINKS="10mbit:0 50mbit:0 10mbit:0.5" (rate:loss%), DELAY_MS=20, SIZE_MIB=64
# (the time includes the command's start: connecting, metadata),
# VARIANTS="warm offline pull push rsync sparse latency" (latency: 4 KiB O_DIRECT demand reads of
# blocks not yet here while `--prefetch all` fills the link, against the link's round trip
# plus the block's own transfer), CAPSULE_BIN, CAPSULE_QUIC_CC (the server's congestion
# controller: bbr-floor, the default, or bbr, cubic or newreno; recorded in the results).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/results-lib.sh
. scripts/results-lib.sh
BIN=$(readlink -f "${CAPSULE_BIN:-target/release/capsule}")
EMU=$(dirname "$BIN")/capsule-linkemu
LINKS=${LINKS:-10mbit:0 50mbit:0 10mbit:0.5}
DELAY_MS=${DELAY_MS:-20}
SIZE_MIB=${SIZE_MIB:-64}
VARIANTS=${VARIANTS:-warm offline pull push rsync sparse latency}
READS=${READS:-12}
die() { echo "bench-bulk-link: $*" >&2; exit 1; }
[ -x "$BIN" ] && [ -x "$EMU" ] || die "no release build ($BIN, $EMU): cargo build --release --features testtools"
for t in rsync jq nsenter python3; do command -v $t >/dev/null || die "needs $t"; done

NS=capsule-bulk-$$
SNS=capsule-bulk-srv-$$
SRV_IP=10.213.0.1
CLI_IP=10.213.0.2
VETH=capbulk$$
# shellcheck source=scripts/link-lib.sh
. scripts/link-lib.sh
W=$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-bulk.XXXXXX")
export CAPSULE_CONFIG_DIR=$W/config
mkdir -p "$CAPSULE_CONFIG_DIR"
PIDS=()
IN_NS=(nsenter "--net=/run/netns/$NS")
IN_SRV=(nsenter "--net=/run/netns/$SNS")
cleanup() {
  set +e
  fusermount3 -uz "$W/mnt" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  link_delete
  rm -rf --one-file-system "$W"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
now() { date +%s.%N; }
rx_bytes() { ip -n "$NS" -s -j link show dev "${VETH}b" | jq -r '.[0].stats64.rx.bytes'; }
tx_bytes() { ip -n "$NS" -s -j link show dev "${VETH}b" | jq -r '.[0].stats64.tx.bytes'; }
# Packets the rate limiters (tbf, both directions) dropped: what a sender sent past the
# bottleneck's queue, wasted on a real link.
drops() { echo $(( $(tc -n "$SNS" -s -j qdisc show dev "${VETH}a" | jq '[.[].drops] | add') + $(tc -n "$NS" -s -j qdisc show dev "${VETH}b" | jq '[.[].drops] | add') )); }

# A sparse 100 GiB disk with 64 KiB of data at 50 GiB (variant sparse: how soon a mount
# over the link serves its first read, in round trips and bytes).
truncate -s 100G "$W/big.raw"
head -c 65536 /dev/urandom | dd of="$W/big.raw" bs=64K seek=$((50 << 14)) conv=notrunc status=none
"$BIN" --store "$W/server" import sparse --disk "root=$W/big.raw" >/dev/null
rm -f "$W/big.raw"

# The payload: incompressible, so stored bytes = logical bytes and goodput means the link.
mkdir -p "$W/data"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$W/data/disk.raw"
"$BIN" --store "$W/server" import bulk --disk "root=$W/data/disk.raw" >/dev/null
STORED=$(store_block_bytes "$W/server")
TOKEN=$("$BIN" --store "$W/server" token create --scope write)
cat > "$W/rsyncd.conf" <<EOF
use chroot = no
[data]
path = $W/data
read only = yes
EOF

link_create
"${IN_SRV[@]}" "$BIN" --store "$W/server" serve --listen 127.0.0.1:7070 --public-read >"$W/serve.log" 2>&1 &
PIDS+=($!)
"${IN_SRV[@]}" rsync --daemon --no-detach --config="$W/rsyncd.conf" --address=127.0.0.1 --port=8873 &
PIDS+=($!)
"${IN_SRV[@]}" "$EMU" --tcp --listen "$SRV_IP:8874" --to 127.0.0.1:8873 --delay-ms "$DELAY_MS" 2>"$W/emu-tcp.log" &
PIDS+=($!)
sleep 1

printf '| link | loss %% | how | MB | seconds | goodput Mbit/s | goodput / link | dropped at the bottleneck |\n|---|---|---|---|---|---|---|---|\n'
for spec in $LINKS; do
  rate=${spec%%:*} loss=${spec#*:}
  link_rate "$rate"
  bits=$(python3 -c "import re,sys; m=re.fullmatch(r'(\d+(?:\.\d+)?)(k|m|g)?bit', sys.argv[1]); print(float(m.group(1)) * {None: 1, 'k': 1e3, 'm': 1e6, 'g': 1e9}[m.group(2)])" "$rate")
  "${IN_SRV[@]}" "$EMU" --listen "$SRV_IP:7071" --to 127.0.0.1:7070 --delay-ms "$DELAY_MS" --loss "$loss" 2>"$W/emu-udp.log" &
  emu=$!
  PIDS+=($emu)
  sleep 0.5
  for v in $VARIANTS; do
    rm -rf "$W/cache" "$W/copy" "$W/pulled"
    if [ "$v" = push ]; then
      # A capsule of new random bytes, so that every block travels.
      rm -rf "$W/local"
      head -c $((SIZE_MIB << 20)) /dev/urandom > "$W/push.raw"
      "$BIN" --store "$W/local" import fresh --disk "root=$W/push.raw" >/dev/null
      rm -f "$W/push.raw"
      pushed=$(store_block_bytes "$W/local")
      npush=$((${npush:-0} + 1))
    fi
    b0=$(rx_bytes) x0=$(tx_bytes) d0=$(drops)
    t0=$(now)
    case $v in
      warm) "${IN_NS[@]}" "$BIN" warm --all "capsule://$SRV_IP:7071/bulk" --cache "$W/cache" >"$W/out" 2>&1; bytes=$STORED ;;
      offline) "${IN_NS[@]}" "$BIN" prefetch --offline "capsule://$SRV_IP:7071/bulk" --cache "$W/cache" >"$W/out" 2>&1; bytes=$STORED ;;
      pull) "${IN_NS[@]}" "$BIN" --store "$W/pulled" pull "capsule://$SRV_IP:7071/bulk" >"$W/out" 2>&1; bytes=$STORED ;;
      push) "${IN_NS[@]}" "$BIN" --store "$W/local" push fresh "capsule://$SRV_IP:7071/pushed-$npush" --token "$TOKEN" >"$W/out" 2>&1; bytes=$pushed ;;
      sparse)
        if [ "$loss" != 0 ]; then continue; fi
        mkdir -p "$W/mnt"
        "${IN_NS[@]}" "$BIN" mount "capsule://$SRV_IP:7071/sparse" "$W/mnt" --cache "$W/cache" --read-only >"$W/out" 2>&1
        mounted=$(now)
        f() { jq ".fetch.$1" "$W/mnt/.capsule/stats.json"; }
        o0=$(f object_requests) r0=$(f requests) w0=$(f wire_received_bytes) p0=$(f path_requests)
        t_read=$(now)
        dd if="$W/mnt/root.raw" of=/dev/null bs=4096 count=1 skip=$(((50 << 18) + 1)) iflag=direct status=none
        t_done=$(now)
        o1=$(f object_requests) r1=$(f requests) w1=$(f wire_received_bytes) p1=$(f path_requests)
        "$BIN" umount "$W/mnt" >/dev/null
        read_s=$(python3 -c "print(round($t_done - $t_read, 3))")
        rtts=$(python3 -c "print(round(($t_done - $t_read) / ($DELAY_MS * 2 / 1000), 2))")
        printf '| %s | %s | sparse 100 GiB: mount %.2f s, first 4 KiB read %s s = %s RTT, %s requests, %s B on the wire |\n' \
          "$rate" "$loss" "$(python3 -c "print($mounted - $t0)")" "$read_s" "$rtts" "$((o1 - o0 + r1 - r0))" "$((w1 - w0))"
        result_line bench-bulk-link "$(jq -n --arg rate "$rate" --argjson bits "$bits" --argjson delay "$DELAY_MS" \
            '{rate: $rate, rate_bits: $bits, loss_pct: 0, delay_ms: $delay, variant: "sparse", disk_gib: 100}')" \
          "$(jq -n --argjson mount "$(python3 -c "print(round($mounted - $t0, 3))")" --argjson read "$read_s" --argjson rtts "$rtts" \
              --argjson obj "$((o1 - o0))" --argjson blk "$((r1 - r0))" --argjson wire "$((w1 - w0))" --argjson path "$((p1 - p0))" \
            '{mount_seconds: $mount, first_read_seconds: $read, first_read_rtts: $rtts, object_requests: $obj, path_requests: $path, block_requests: $blk, wire_bytes: $wire}')"
        continue ;;
      latency)
        if [ "$loss" != 0 ]; then continue; fi
        mkdir -p "$W/mnt"
        "${IN_NS[@]}" "$BIN" mount "capsule://$SRV_IP:7071/bulk" "$W/mnt" --cache "$W/cache" --read-only --prefetch all >"$W/out" 2>&1
        sleep 3  # the prefetch fills the link (and whatever buffer the path has)
        blocks=$((SIZE_MIB * 16))
        : >"$W/lat"
        for i in $(seq 1 "$READS"); do
          # From the end backwards: blocks the prefetch (in disk order) has not reached.
          blk=$((blocks - 1 - i * 5))
          t_a=$(now)
          dd if="$W/mnt/root.raw" of=/dev/null bs=4096 count=1 skip=$((blk * 16 + 3)) iflag=direct status=none
          t_b=$(now)
          python3 -c "print(round($t_b - $t_a, 4))" >>"$W/lat"
          sleep 0.3
        done
        bg=$(jq '.fetch.background_blocks' "$W/mnt/.capsule/stats.json")
        wrtt=$(jq '.fetch.window_rtt_ms' "$W/mnt/.capsule/stats.json")
        "$BIN" umount "$W/mnt" >/dev/null
        # The floor: one round trip plus the 64 KiB block's own transfer.
        floor=$(python3 -c "print(round($DELAY_MS * 2 / 1000 + 65536 * 8 / $bits, 4))")
        stats=$(python3 -c "
import statistics, sys
v = sorted(float(x) for x in open(sys.argv[1]))
print(statistics.median(v), v[-1])" "$W/lat")
        med=${stats% *} worst=${stats#* }
        printf '| %s | %s | demand 4 KiB reads during --prefetch all: median %s s, worst %s s (floor %s s) |\n' "$rate" "$loss" "$med" "$worst" "$floor"
        result_line bench-bulk-link "$(jq -n --arg rate "$rate" --argjson bits "$bits" --argjson delay "$DELAY_MS" --arg cc "${CAPSULE_QUIC_CC:-bbr-floor-losscap}" \
            '{rate: $rate, rate_bits: $bits, loss_pct: 0, delay_ms: $delay, variant: "latency", congestion: $cc}')" \
          "$(jq -n --slurpfile reads <(jq -s . "$W/lat") --argjson floor "$floor" --argjson bg "$bg" --argjson wrtt "${wrtt:-null}" \
            '{read_seconds: $reads[0], floor_seconds: $floor, background_blocks_at_end: $bg, window_rtt_ms: $wrtt}')"
        continue ;;
      rsync)
        if [ "$loss" != 0 ]; then continue; fi  # the TCP relay cannot drop packets
        mkdir -p "$W/copy"
        "${IN_NS[@]}" rsync "rsync://$SRV_IP:8874/data/disk.raw" "$W/copy/" >"$W/out" 2>&1
        bytes=$((SIZE_MIB << 20)) ;;
      *) die "unknown variant $v" ;;
    esac
    t1=$(now)
    link=$(( $(rx_bytes) - b0 )) link_tx=$(( $(tx_bytes) - x0 )) dropped=$(( $(drops) - d0 ))
    secs=$(python3 -c "print(round($t1 - $t0, 2))")
    mbit=$(python3 -c "print(round($bytes * 8 / ($t1 - $t0) / 1e6, 2))")
    ratio=$(python3 -c "print(round($bytes * 8 / ($t1 - $t0) / $bits, 3))")
    printf '| %s | %s | %s | %.1f | %s | %s | %s | %s |\n' "$rate" "$loss" "$v" "$(python3 -c "print($bytes / 1e6)")" "$secs" "$mbit" "$ratio" "$dropped"
    result_line bench-bulk-link "$(jq -n --arg rate "$rate" --argjson bits "$bits" --argjson loss "$loss" --argjson delay "$DELAY_MS" --arg v "$v" \
        --arg cc "${CAPSULE_QUIC_CC:-bbr-floor}" --argjson size "$SIZE_MIB" '{rate: $rate, rate_bits: $bits, loss_pct: $loss, delay_ms: $delay, variant: $v, congestion: $cc, size_mib: $size}')" \
      "$(jq -n --argjson bytes "$bytes" --argjson secs "$secs" --argjson link "$link" --argjson tx "$link_tx" --argjson ratio "$ratio" --argjson dropped "$dropped" \
        '{payload_bytes: $bytes, seconds: $secs, link_rx_bytes: $link, link_tx_bytes: $tx, goodput_over_rate: $ratio, bottleneck_drops: $dropped}')"
  done
  kill "$emu" 2>/dev/null; wait "$emu" 2>/dev/null || true
done
result_flush
