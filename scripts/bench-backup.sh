#!/bin/bash
# Capsule as a backup system, against restic, borg and `rsync --inplace` (make bench-backup;
# issue 14: "the experiment the paper left out"). About 45 minutes.
#
# Two weeks of use of the Debian guest's disk (tests/guest/build-debian.sh), deterministic
# for SEED: each day its root file system is loop-mounted from a writable `capsule mount`
# of the previous day and gets a day's work (scripts/backup-day.py: documents edited,
# created and deleted, photos, an application log, a growing SQLite database, a package
# upgrade on days 4 and 11), then `capsule commit` makes the day's child capsule. The same
# fourteen states are then backed up side by side, each tool to its own server in a
# network namespace of ours across a veth pair (no rate limit), so that bytes sent are the
# bytes on the client's veth (both directions) whatever the protocol:
#   capsule  `capsule push` of the day's child to `capsule serve` (QUIC)
#   restic   `restic backup` of the raw image to an sftp repository (sshd of ours)
#   borg     `borg create` of the raw image to an ssh repository (`borg serve`), lz4, no encryption
#   rsync    `rsync --inplace` of the raw image over ssh (one copy: no history)
# Per day and tool: bytes sent, repository size (bytes stored, apparent), seconds (Capsule:
# commit + push). Then a restore of day 7 on an empty machine across an emulated 10 Mbit/s
# link (tc tbf, capsule-linkemu adding DELAY_MS each way: UDP for QUIC, --tcp for ssh; as
# scripts/bench-boot-link.sh): Capsule `capsule run`s it from the server at once (time to
# the guest's marker) and `capsule prefetch` brings the whole image (time until all is
# local); the others restore the image (restic restore over sftp, borg extract over ssh,
# rsync -z of a day-7 copy kept on the server, since --inplace keeps only the latest), then
# QEMU boots it (kernel and initrd local, as the capsule carries them). Every restored image
# is compared with day 7's. Last, retention on the servers: `capsule rm` of days 1-7 and
# `capsule gc` (which alone frees nothing: day 8 reads through them), then `capsule flatten`
# of day 8 and `capsule gc` (every remaining day must `capsule verify`), `restic forget
# --keep-last 7 --prune`, `borg prune --keep-last 7` + `borg compact`: bytes freed.
# Results: results/backup.jsonl (scripts/results-lib.sh), tables by scripts/gen-benchmarks.py,
# plot by scripts/plot-backup.py (results/backup/stored.png).
# Environment: DAYS=14, SEED=1, RESTORE_DAY=7, RATE=10mbit, DELAY_MS=20, GUEST_MEM=512,
# BOOT_TIMEOUT=900, RESTORE=1 (0: the two weeks and retention only, no restore; about 15
# minutes), CAPSULE_DEBIAN_GUEST_DIR (default target/guest-debian), CAPSULE_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/results-lib.sh
. scripts/results-lib.sh
G=$(readlink -f "${CAPSULE_DEBIAN_GUEST_DIR:-target/guest-debian}")
BIN=$(readlink -f "${CAPSULE_BIN:-target/release/capsule}")
EMU=$(dirname "$BIN")/capsule-linkemu
DAYS=${DAYS:-14}
SEED=${SEED:-1}
RESTORE_DAY=${RESTORE_DAY:-7}
RATE=${RATE:-10mbit}
DELAY_MS=${DELAY_MS:-20}
MEM=${GUEST_MEM:-512}
BOOT_TIMEOUT=${BOOT_TIMEOUT:-900}
RESTORE=${RESTORE:-1}
MARKER='CAPSULE-GUEST-MARKER debian-ready'
TOOLS=(capsule restic borg rsync)
die() { echo "bench-backup: $*" >&2; exit 1; }
log() { echo "bench-backup: $*" >&2; }
[ -f "$G/.complete" ] || die "no Debian guest in $G (make guest-debian)"
[ -x "$BIN" ] && [ -x "$EMU" ] || die "no release build ($BIN, $EMU): cargo build --release --features testtools"
need=()
for t in restic borg /usr/sbin/sshd; do command -v $t >/dev/null || need+=("$t"); done
if [ ${#need[@]} -gt 0 ]; then
  log "installing restic, borgbackup, openssh-server"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q restic borgbackup openssh-server >/dev/null
fi
for t in qemu-system-x86_64 jq python3 nsenter rsync losetup ssh-keygen sha256sum; do command -v $t >/dev/null || die "needs $t"; done
CMDLINE=$(cat "$G/cmdline")

NS=capsule-bkp-$$
SNS=capsule-bkp-srv-$$
SRV_IP=10.213.0.1
CLI_IP=10.213.0.2
VETH=capbkp$$
# shellcheck source=scripts/link-lib.sh
. scripts/link-lib.sh
W=$(mktemp -d "${TMPDIR:-/tmp}/capsule-bench-backup.XXXXXX")
export CAPSULE_CONFIG_DIR=$W/config CAPSULE_RUN_DIR=$W/runs
mkdir -p "$CAPSULE_CONFIG_DIR" "$CAPSULE_RUN_DIR" "$W/ext" "$W/mnt" "$W/srv" "$W/cli"
PIDS=()
LOOP=
IN_NS=(nsenter "--net=/run/netns/$NS")
IN_SRV=(nsenter "--net=/run/netns/$SNS")

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
  mountpoint -q "$W/ext" && umount "$W/ext"
  [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
  awk -v w="$W" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
  done
  link_delete
  rm -rf --one-file-system "$W"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
# link_total: bytes on the client's veth end, both directions.
link_total() { ip -n "$NS" -s -j link show dev "${VETH}b" | jq -r '.[0].stats64.rx.bytes + .[0].stats64.tx.bytes'; }
size_of() { { du -sb "$@" 2>/dev/null || true; } | awk '{ s += $1 } END { print s + 0 }'; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }

# The servers: capsule serve, and sshd (sftp for restic, `borg serve`, rsync), ours alone.
link_create
SRV_STORE=$W/srv/capsule
TOKEN=$("$BIN" --store "$SRV_STORE" token create --scope write | tail -n 1)
[ -n "$TOKEN" ] || die "token create printed no token"
export CAPSULE_TOKEN=$TOKEN
"${IN_SRV[@]}" "$BIN" --store "$SRV_STORE" serve --listen 0.0.0.0:7070 >"$W/serve.log" 2>&1 &
PIDS+=($!)
mkdir -p "$W/ssh" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/host" >/dev/null
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/id" >/dev/null
cp "$W/ssh/id.pub" "$W/ssh/authorized_keys"
cat > "$W/ssh/sshd_config" <<EOF
Port 2222
ListenAddress 0.0.0.0
HostKey $W/ssh/host
PidFile $W/ssh/sshd.pid
AuthorizedKeysFile $W/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
SetEnv BORG_BASE_DIR=$W/srv/borg-home
Subsystem sftp internal-sftp
EOF
"${IN_SRV[@]}" /usr/sbin/sshd -D -e -f "$W/ssh/sshd_config" 2>"$W/sshd.log" &
PIDS+=($!)
# ssh_to PORT: the ssh command line the clients use (our key, no host key bookkeeping).
ssh_to() { echo "ssh -p $1 -i $W/ssh/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes"; }
sleep 1
"${IN_NS[@]}" $(ssh_to 2222) root@$SRV_IP true || { cat "$W/sshd.log" >&2; die "sshd in the server namespace does not answer"; }

export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$W/cli/restic-cache
export BORG_BASE_DIR=$W/cli/borg-home BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
RESTIC_REPO=$W/srv/restic BORG_REPO_DIR=$W/srv/borg RSYNC_DST=$W/srv/rsync
RESTIC_R=(-r "sftp:root@$SRV_IP:$RESTIC_REPO" -o "sftp.command=$(ssh_to 2222) root@$SRV_IP -s sftp")
export BORG_RSH="ssh -i $W/ssh/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes"
BORG_URL=ssh://root@$SRV_IP:2222$BORG_REPO_DIR
mkdir -p "$RSYNC_DST"
"${IN_NS[@]}" restic "${RESTIC_R[@]}" init >/dev/null
"${IN_NS[@]}" borg init --encryption=none "$BORG_URL"

############ two weeks ############
CLI_STORE=$W/cli/capsule
IMG=$W/cli/disk.raw
log "day 0: import the Debian guest"
"$BIN" --store "$CLI_STORE" import day-00 --disk "root=$G/disk.raw" --kernel "$G/vmlinuz" --initrd "$G/initrd.gz" \
  --cmdline "$CMDLINE" --ram "${MEM}M" --cpus 1 >/dev/null
declare -A SENT=() STORED=() TIME=()
# timed TOOL CMD...: runs CMD in the client namespace; sets SENT/TIME for TOOL.
timed() {
  local tool=$1 b0 t0
  shift
  b0=$(link_total)
  t0=$(now)
  "${IN_NS[@]}" "$@" >"$W/$tool.out" 2>"$W/$tool.err" || { tail -n 20 "$W/$tool.err" >&2; die "$tool failed: $*"; }
  TIME[$tool]=$(secs "$t0" "$(now)")
  SENT[$tool]=$(( $(link_total) - b0 ))
}
for day in $(seq 1 "$DAYS"); do
  d=$(printf 'day-%02d' "$day")
  prev=$(printf 'day-%02d' $((day - 1)))
  "$BIN" --store "$CLI_STORE" mount "$prev" "$W/mnt" --cache "$W/cli/cache" >/dev/null
  LOOP=$(losetup -f --show "$W/mnt/root.raw")
  mount "$LOOP" "$W/ext"
  work=$(python3 scripts/backup-day.py "$W/ext" "$day" "$SEED")
  used=$(df -B1 --output=used "$W/ext" | tail -n 1)
  umount "$W/ext"
  losetup -d "$LOOP"
  LOOP=
  t0=$(now)
  commit=$("$BIN" --store "$CLI_STORE" commit "$W/mnt" "$d")
  commit_s=$(secs "$t0" "$(now)")
  # The day's raw image, for the other tools (the disk as the guest would leave it).
  cp --sparse=always "$W/mnt/root.raw" "$IMG.new"
  mv "$IMG.new" "$IMG"
  "$BIN" umount "$W/mnt" >/dev/null
  [ "$day" = "$RESTORE_DAY" ] && cp --sparse=always "$IMG" "$W/srv/day-restore.raw"

  timed capsule "$BIN" --store "$CLI_STORE" push "$d" "capsule://$SRV_IP:7070/$d" --json
  push=$(cat "$W/capsule.out")
  TIME[capsule]=$(awk -v a="${TIME[capsule]}" -v b="$commit_s" 'BEGIN { printf "%.2f", a + b }')
  STORED[capsule]=$(size_of "$SRV_STORE/blocks" "$SRV_STORE/packed" "$SRV_STORE/objects" "$SRV_STORE/refs" "$SRV_STORE/profiles")
  timed restic restic "${RESTIC_R[@]}" backup --tag "$d" --json "$IMG"
  STORED[restic]=$(size_of "$RESTIC_REPO")
  timed borg borg create --compression lz4 --json "$BORG_URL::$d" "$IMG"
  STORED[borg]=$(size_of "$BORG_REPO_DIR")
  timed rsync rsync --inplace --stats -e "$(ssh_to 2222)" "$IMG" "root@$SRV_IP:$RSYNC_DST/disk.raw"
  STORED[rsync]=$(size_of "$RSYNC_DST")
  [ "$day" = "$RESTORE_DAY" ] && "$BIN" --store "$SRV_STORE" verify "$d" >/dev/null

  for tool in "${TOOLS[@]}"; do
    extra=null
    [ "$tool" = capsule ] && extra=$(jq -c --arg c "$commit" --argjson cs "$commit_s" '{push: ., commit: $c, commit_seconds: $cs}' <<<"$push")
    result_line backup "$(jq -n --arg t "$tool" --argjson d "$day" --argjson seed "$SEED" '{section: "day", tool: $t, day: $d, seed: $seed, guest: "debian"}')" \
      "$(jq -n --argjson s "${SENT[$tool]}" --argjson st "${STORED[$tool]}" --argjson t "${TIME[$tool]}" --argjson w "$work" \
            --argjson used "$used" --argjson x "$extra" \
            '{sent_bytes: $s, stored_bytes: $st, seconds: $t, work: $w, fs_used_bytes: $used, detail: $x}')"
  done
  log "$d: written $(mb "$(jq .written_bytes <<<"$work")") MB; sent MB capsule $(mb "${SENT[capsule]}") restic $(mb "${SENT[restic]}") borg $(mb "${SENT[borg]}") rsync $(mb "${SENT[rsync]}"); stored MB $(mb "${STORED[capsule]}") $(mb "${STORED[restic]}") $(mb "${STORED[borg]}") $(mb "${STORED[rsync]}"); s ${TIME[capsule]} ${TIME[restic]} ${TIME[borg]} ${TIME[rsync]}"
done
RD=$(printf 'day-%02d' "$RESTORE_DAY")
WANT=$(sha256sum "$W/srv/day-restore.raw" | cut -d' ' -f1)

FAILED=0
if [ "$RESTORE" = 1 ]; then
############ restore of day 7 on an empty machine, across the slow link ############
log "restore of $RD across $RATE, $((2 * DELAY_MS)) ms RTT"
link_rate "$RATE"
"${IN_SRV[@]}" "$EMU" --listen "$SRV_IP:7071" --to 127.0.0.1:7070 --delay-ms "$DELAY_MS" 2>"$W/emu-udp.log" &
PIDS+=($!)
"${IN_SRV[@]}" "$EMU" --tcp --listen "$SRV_IP:2223" --to 127.0.0.1:2222 --delay-ms "$DELAY_MS" 2>"$W/emu-tcp.log" &
PIDS+=($!)
sleep 1
RESTIC_R=(-r "sftp:root@$SRV_IP:$RESTIC_REPO" -o "sftp.command=$(ssh_to 2223) root@$SRV_IP -s sftp")
BORG_URL=ssh://root@$SRV_IP:2223$BORG_REPO_DIR

# boot_to_marker CONSOLE CMD...: runs CMD (in the client namespace) until the guest's
# marker; sets BOOT_S (empty if none within BOOT_TIMEOUT), then waits for CMD to end.
boot_to_marker() {
  local con=$1 pid t0 i=0
  shift
  : > "$con"
  t0=$(now)
  "${IN_NS[@]}" "$@" </dev/null >"$con.out" 2>&1 &
  pid=$!
  PIDS+=($pid)
  BOOT_S=
  while kill -0 "$pid" 2>/dev/null; do
    if grep -aq "$MARKER" "$con" "$con.out" 2>/dev/null; then BOOT_S=$(secs "$t0" "$(now)"); break; fi
    [ "$(secs "$t0" "$(now)" | cut -d. -f1)" -ge "$BOOT_TIMEOUT" ] && break
    sleep 0.1
  done
  [ -n "$BOOT_S" ] || { grep -aq "$MARKER" "$con" "$con.out" 2>/dev/null && BOOT_S=$(secs "$t0" "$(now)"); } || true
  while kill -0 "$pid" 2>/dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
  kill_qemus
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
# restored TOOL LOCAL_S LINK_BYTES RUN_S BOOT_S SHA256: records a restore (SHA256: of the
# restored image before the guest booted from it, against day 7's).
restored() {
  local tool=$1 local_s=$2 link=$3 run_s=$4 boot_s=$5 ok=false
  [ "$6" = "$WANT" ] && ok=true
  [ "$ok" = true ] || { FAILED=1; log "$tool: the restored image is not day $RESTORE_DAY's"; }
  [ -n "$run_s" ] || { FAILED=1; log "$tool: the guest printed no marker"; }
  result_line backup "$(jq -n --arg t "$tool" --argjson d "$RESTORE_DAY" --arg rate "$RATE" --argjson dm "$DELAY_MS" \
                        '{section: "restore", tool: $t, day: $d, rate: $rate, rtt_ms: (2 * $dm), guest: "debian"}')" \
    "$(jq -n --argjson l "$local_s" --argjson b "$link" --argjson r "${run_s:-null}" --argjson boot "${boot_s:-null}" --argjson ok "$ok" \
          '{runs_seconds: $r, image_local_seconds: $l, link_bytes: $b, boot_seconds: $boot, image_matches: $ok}')"
  log "restore $tool: guest runs after ${run_s:-FAILED} s, whole image local after $local_s s, $(mb "$link") MB on the link, image matches: $ok"
}

# Capsule: run from the server at once; then, on another empty cache, the whole image.
b0=$(link_total)
EMPTY=(--store "$W/cli/empty-store")
boot_to_marker "$W/capsule.console" "$BIN" "${EMPTY[@]}" run "capsule://$SRV_IP:7071/$RD" --id restore --accel tcg --cache "$W/cli/run-cache" \
  --serial-log "$W/capsule.console" --quiet --prefetch none
run_s=$BOOT_S
b1=$(link_total)
t0=$(now)
"${IN_NS[@]}" "$BIN" "${EMPTY[@]}" prefetch "capsule://$SRV_IP:7071/$RD" --cache "$W/cli/prefetch-cache" >/dev/null 2>"$W/prefetch.err" \
  || { cat "$W/prefetch.err" >&2; die "prefetch failed"; }
local_s=$(secs "$t0" "$(now)")
b2=$(link_total)
"$BIN" "${EMPTY[@]}" mount "capsule://$SRV_IP:7071/$RD" "$W/mnt" --cache "$W/cli/prefetch-cache" --offline --read-only >/dev/null
sha=$(sha256sum "$W/mnt/root.raw" | cut -d' ' -f1)
"$BIN" umount "$W/mnt" >/dev/null
# Link bytes: the prefetch's (the whole image; the run's are in the log line).
log "capsule run: $(mb $((b1 - b0))) MB on the link until the guest powered off"
restored capsule "$local_s" "$((b2 - b1))" "$run_s" "$run_s" "$sha"

# The others: restore the image (timed), check it, then boot it.
restore_then_boot() {
  local tool=$1 image=$2 b0 t0 local_s link sha
  shift 2
  b0=$(link_total)
  t0=$(now)
  "${IN_NS[@]}" "$@" >"$W/$tool-restore.out" 2>&1 || { tail -n 20 "$W/$tool-restore.out" >&2; die "$tool restore failed"; }
  local_s=$(secs "$t0" "$(now)")
  link=$(( $(link_total) - b0 ))
  sha=$(sha256sum "$image" | cut -d' ' -f1)
  boot_to_marker "$W/$tool.console" qemu-system-x86_64 -accel tcg -m "$MEM" -nographic -no-reboot -nic none \
    -kernel "$G/vmlinuz" -initrd "$G/initrd.gz" -append "$CMDLINE" -drive "file=$image,format=raw,if=virtio"
  restored "$tool" "$local_s" "$link" "${BOOT_S:+$(awk -v a="$local_s" -v b="$BOOT_S" 'BEGIN { printf "%.2f", a + b }')}" "$BOOT_S" "$sha"
  rm -f "$image"
}
export RESTIC_CACHE_DIR=$W/cli/restic-cache-empty BORG_BASE_DIR=$W/cli/borg-home-empty
R=$W/cli/restore
mkdir -p "$R/restic" "$R/borg" "$R/rsync"
restore_then_boot restic "$R/restic$IMG" restic "${RESTIC_R[@]}" restore latest --tag "$RD" --target "$R/restic"
restore_then_boot borg "$R/borg$IMG" sh -c 'cd "$1" && shift && exec borg extract --sparse "$@"' - "$R/borg" "$BORG_URL::$RD"
restore_then_boot rsync "$R/rsync/disk.raw" rsync -z --sparse -e "$(ssh_to 2223)" "root@$SRV_IP:$W/srv/day-restore.raw" "$R/rsync/disk.raw"
fi # RESTORE

############ retention: the servers drop days 1-7 ############
log "retention: drop days 1-$RESTORE_DAY"
retained() {
  local tool=$1 before=$2 after=$3 s=$4 ok=$5 detail=${6:-null}
  result_line backup "$(jq -n --arg t "$tool" --argjson k "$RESTORE_DAY" '{section: "retention", tool: $t, dropped_days: $k}')" \
    "$(jq -n --argjson b "$before" --argjson a "$after" --argjson s "$s" --argjson ok "$ok" --argjson x "$detail" \
          '{stored_before: $b, stored_after: $a, freed_bytes: ($b - $a), seconds: $s, remaining_verified: $ok, detail: $x}')"
  log "retention $tool: $(mb "$before") MB -> $(mb "$after") MB in $s s (remaining intact: $ok)"
}
# Capsule: on the server's store (its server stopped: gc takes the store's lock).
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true
before=$(size_of "$SRV_STORE/blocks" "$SRV_STORE/packed" "$SRV_STORE/objects" "$SRV_STORE/refs" "$SRV_STORE/profiles")
t0=$(now)
# rm alone first (day 8 still reads through days 1-7: it says so, and gc frees next to
# nothing), then `capsule flatten` of the oldest kept day, as `rm --flatten` would do at once.
# shellcheck disable=SC2046
rm_out=$("$BIN" --store "$SRV_STORE" rm $(seq -f 'day-%02g' 1 "$RESTORE_DAY") --json)
gc_rm=$("$BIN" --store "$SRV_STORE" gc --json)
flattened=()
for name in $(jq -r '.still_reaching_removed[]' <<<"$rm_out"); do
  flattened+=("$("$BIN" --store "$SRV_STORE" flatten "$name" --json)")
done
gc=$("$BIN" --store "$SRV_STORE" gc --json)
s=$(secs "$t0" "$(now)")
after=$(size_of "$SRV_STORE/blocks" "$SRV_STORE/packed" "$SRV_STORE/objects" "$SRV_STORE/refs" "$SRV_STORE/profiles")
CAPSULE_RETENTION=$(jq -n --argjson rm "$rm_out" --argjson g1 "$gc_rm" --argjson g2 "$gc" '{rm: $rm, gc_after_rm: $g1, gc_after_flatten: $g2, flattened: $ARGS.positional}' \
  --jsonargs "${flattened[@]}")
log "capsule rm: $(jq -c . <<<"$rm_out"); gc after rm alone: $(jq -c . <<<"$gc_rm")"
ok=true
for day in $(seq $((RESTORE_DAY + 1)) "$DAYS"); do
  "$BIN" --store "$SRV_STORE" verify "$(printf 'day-%02d' "$day")" >/dev/null 2>"$W/verify.err" || { ok=false; FAILED=1; cat "$W/verify.err" >&2; }
done
log "capsule gc: $gc"
retained capsule "$before" "$after" "$s" "$ok" "$CAPSULE_RETENTION"
# restic and borg: on the server's repositories, as their admin would.
export RESTIC_CACHE_DIR=$W/srv/restic-cache BORG_BASE_DIR=$W/srv/borg-home
before=$(size_of "$RESTIC_REPO")
t0=$(now)
restic -r "$RESTIC_REPO" forget --keep-last $((DAYS - RESTORE_DAY)) --prune >"$W/restic-forget.out" 2>&1 || { cat "$W/restic-forget.out" >&2; die "restic forget failed"; }
s=$(secs "$t0" "$(now)")
ok=true
restic -r "$RESTIC_REPO" check >"$W/restic-check.out" 2>&1 || { ok=false; FAILED=1; cat "$W/restic-check.out" >&2; }
retained restic "$before" "$(size_of "$RESTIC_REPO")" "$s" "$ok"
before=$(size_of "$BORG_REPO_DIR")
t0=$(now)
borg prune --keep-last $((DAYS - RESTORE_DAY)) "$BORG_REPO_DIR" && borg compact "$BORG_REPO_DIR" || die "borg prune/compact failed"
s=$(secs "$t0" "$(now)")
ok=true
borg check --repository-only "$BORG_REPO_DIR" 2>"$W/borg-check.err" || { ok=false; FAILED=1; cat "$W/borg-check.err" >&2; }
retained borg "$before" "$(size_of "$BORG_REPO_DIR")" "$s" "$ok"

result_flush
python3 scripts/gen-benchmarks.py --show backup || true
python3 scripts/plot-backup.py || log "no plot (pip install matplotlib)"
exit $FAILED
