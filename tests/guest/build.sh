#!/bin/bash
# Build a tiny bootable Linux test guest for Capsule's VM tests.
#
#   tests/guest/build.sh OUTDIR
#
# Outputs (in OUTDIR):
#   vmlinuz          Debian amd64 kernel (the one linux-image-amd64 depends on)
#   initrd.gz        busybox initramfs: insmods virtio/ext4/balloon, mounts /dev/vda, switch_roots
#   disk.raw         128 MiB ext4 root: busybox, /sbin/init, 48 MiB payload the boot never reads
#   disk-update.raw  disk.raw after a simulated package update (~3.3 MiB of new file data)
#   manifest.txt     what was built (versions, sizes, sha256, block diff)
#   debs/            cached kernel .deb (rebuilds do not download again)
#   build/           intermediate trees (kernel-deb, rootfs, initramfs)
#   .complete        sha256 of this script; present only after a successful build
#
# Reproducible: with the same kernel .deb and host busybox, every output is byte-identical
# (fixed UUID/hash seed/timestamps/owners, seeded pseudo-random content), so block-level
# comparisons between builds and machines are meaningful. Needs: apt-get, dpkg,
# busybox-static, cpio, gzip, e2fsprogs (mke2fs -d, debugfs), openssl, xz-utils; neither
# root nor loop mounts. The guest's modes (kernel command line) are documented in the
# /sbin/init heredoc below.
set -euo pipefail

die() { echo "build.sh: $*" >&2; exit 1; }
[ $# -eq 1 ] || die "usage: $0 OUTDIR"

SELF=$(readlink -f "${BASH_SOURCE[0]}")
mkdir -p "$1"
OUT=$(readlink -f "$1")
SCRIPT_HASH=$(sha256sum "$SELF" | cut -d' ' -f1)

complete() { [ -f "$OUT/.complete" ] && [ "$(cat "$OUT/.complete")" = "$SCRIPT_HASH" ]; }
complete && exit 0

# Tests may run in parallel and all call this script: serialise, then re-check.
exec 9>"$OUT/.lock"
flock 9
complete && exit 0

# From here on OUTDIR must never look complete until the very end.
rm -f "$OUT/.complete"
rm -rf "$OUT"/.stage.* "$OUT"/debs/.dl.*   # leftovers of a killed build (we hold the lock)
STAGE=$(mktemp -d "$OUT/.stage.XXXXXX")
DL=
cleanup() { rm -rf "$STAGE" ${DL:+"$DL"}; }
trap cleanup EXIT
trap 'exit 130' INT   # run the EXIT cleanup on Ctrl-C / kill too
trap 'exit 143' TERM

DISK_MB=128
PAYLOAD_MB=48
FS_UUID=0c0ffee0-ca95-4e1e-9e57-000000000001   # fixed: identical builds, identical blocks
HASH_SEED=0c0ffee0-ca95-4e1e-9e57-000000000002  # fixed htree hash seed, same reason
EPOCH=1700000000                                # all file and fs timestamps
export E2FSPROGS_FAKE_TIME=$EPOCH               # libext2fs: mkfs/debugfs "now"
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
 crc32c_generic crc16 mbcache jbd2 ext4 virtio_balloon"  # insmod order: deps first.
# crc32c_generic: TCG's default CPU lacks SSE4.2, so ext4's metadata_csum needs the C version.

# prng FILE BYTES SEED: deterministic pseudo-random bytes (AES-128-CTR keystream of zeros).
# Feeding exactly BYTES zeros avoids `openssl | head -c`, whose SIGPIPE trips pipefail.
prng() {
  local key
  key=$(printf '%s' "capsule-guest-$3" | sha256sum | cut -c1-32)
  head -c "$2" /dev/zero |
    openssl enc -aes-128-ctr -nosalt -K "$key" -iv 00000000000000000000000000000000 > "$1"
}

############ kernel ############
mkdir -p "$OUT/debs"
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
       awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }' || true)
if [ -n "$KPKG" ]; then
  KDEB=$(find "$OUT/debs" -maxdepth 1 -name "${KPKG}_*_amd64.deb" | sort -V | tail -n1)
  if [ -z "$KDEB" ]; then
    # Download beside the cache and rename, so a half-downloaded .deb is never "cached".
    DL=$(mktemp -d "$OUT/debs/.dl.XXXXXX")
    # Sandbox user root: _apt cannot write into our private temp dir (apt would only warn).
    (cd "$DL" && apt-get download -q -o APT::Sandbox::User=root "$KPKG") || die "apt-get download $KPKG failed"
    mv "$DL"/*.deb "$OUT/debs/"
    rm -rf "$DL"
    DL=
    KDEB=$(find "$OUT/debs" -maxdepth 1 -name "${KPKG}_*_amd64.deb" | sort -V | tail -n1)
  fi
else
  # No apt lists (offline box): fall back to whatever kernel is cached.
  KDEB=$(find "$OUT/debs" -maxdepth 1 -name 'linux-image-*-amd64_*.deb' | sort -V | tail -n1)
fi
[ -f "${KDEB:-}" ] || die "no kernel package (apt-cache depends linux-image-amd64 found nothing)"
KDEB_VERSION=$(dpkg-deb -f "$KDEB" Version)

B=$STAGE/build
mkdir -p "$B"
dpkg -x "$KDEB" "$B/kernel-deb"
MODTOP=$B/kernel-deb/lib/modules
[ -d "$MODTOP" ] || MODTOP=$B/kernel-deb/usr/lib/modules   # merged-/usr kernels (trixie+)
KVER=$(find "$MODTOP" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)
MODDIR=$MODTOP/$KVER
cp "$B/kernel-deb/boot/vmlinuz-$KVER" "$STAGE/vmlinuz"

############ initramfs ############
N=$B/initramfs
mkdir -p "$N"/{bin,dev,proc,sys,newroot,lib/modules}
cp /bin/busybox "$N/bin/busybox"
for a in $(/bin/busybox --list); do
  [ "$a" = busybox ] || ln -s busybox "$N/bin/$a"   # the list names busybox itself
done

# Module files come uncompressed (6.1) or as .ko.xz/.ko.zst (newer kernels). busybox insmod
# cannot be trusted to decompress, so ship plain .ko files. Built-in ones are skipped.
ORDER=""
for m in $MODULES; do
  f=$(find "$MODDIR/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \
        -o -name "${m//_/-}.ko" -o -name "${m//_/-}.ko.xz" -o -name "${m//_/-}.ko.zst" \) | head -n1)
  if [ -z "$f" ]; then
    grep -Eq "/(${m}|${m//_/-})\.ko$" "$MODDIR/modules.builtin" 2>/dev/null ||
      die "module $m neither in $MODDIR/kernel nor in modules.builtin"
    continue
  fi
  case $f in
    *.ko.xz)  xz -dc "$f" > "$N/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$N/lib/modules/$m.ko" ;;
    *)        cp "$f" "$N/lib/modules/$m.ko" ;;
  esac
  ORDER="$ORDER $m"
done
ORDER=${ORDER# }
echo "$ORDER" > "$N/lib/modules/order"

cat > "$N/init" <<'EOF'
#!/bin/sh
# initramfs PID 1: load the drivers the kernel has as modules, mount /dev/vda, switch_root.
# Root is mounted read-only unless the kernel command line says `rw`, so tests can boot
# from a read-only image (qemu readonly=on) without ext4 ever writing to it.
export PATH=/bin
fail() { echo "CAPSULE-GUEST-ERROR initramfs: $*"; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do
  insmod "/lib/modules/$m.ko" || fail "insmod $m"
done
opt=ro
for arg in $(cat /proc/cmdline); do
  case $arg in rw) opt=rw ;; ro) opt=ro ;; esac
done
i=0
while [ ! -b /dev/vda ]; do
  [ $i -ge 200 ] && fail "no /dev/vda after 10 s"
  sleep 0.05; i=$((i + 1))
done
mount -t ext4 -o "$opt" /dev/vda /newroot || fail "mount /dev/vda ($opt)"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
EOF
chmod 755 "$N/init"

# Fixed mtimes + sorted names + --reproducible + gzip -n: byte-identical initrd per kernel.
find "$N" -exec touch -h -d "@$EPOCH" {} +
(cd "$N" && find . -mindepth 1 | LC_ALL=C sort |
   cpio -o -H newc --quiet --reproducible -R 0:0 | gzip -9n) > "$STAGE/initrd.gz"

############ root filesystem ############
R=$B/rootfs
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,usr/lib/update,usr/share/testguest,proc,sys,dev,tmp,run,etc,root,data,mnt}
cp /bin/busybox "$R/bin/busybox"
# Applet links at build time: the root is mounted read-only, `busybox --install` could not run.
for a in $(/bin/busybox --list-full); do
  [ -e "$R/$a" ] || [ -L "$R/$a" ] || ln -s /bin/busybox "$R/$a"
done
rm -f "$R/sbin/init"   # our script below, not busybox's init applet
echo testguest > "$R/etc/hostname"
printf 'NAME="Capsule test guest"\nID=capsule-testguest\nVERSION_ID=1\n' > "$R/etc/os-release"
echo "this file is removed by the simulated update" > "$R/usr/share/testguest/obsolete.txt"
prng "$R/usr/lib/update/pkg-1.bin" $((256 * 1024)) pkg-1-v1
# Never read by the boot: lazy fetching should leave it untouched.
prng "$R/data/payload.bin" $((PAYLOAD_MB * 1024 * 1024)) payload

cat > "$R/sbin/init" <<'EOF'
#!/bin/sh
# Root-disk PID 1. One image serves many tests; the kernel command line picks the mode
# (the last occurrence wins, so callers can append to a default `gmode=boot`):
#   gmode=boot    print "CAPSULE-GUEST-MARKER boot-ok", power off              (default)
#   gmode=write   remount / rw, write /root/written.txt (gtoken=XYZ, else the date) and
#                 1 MiB random /root/blob, sync, print "... write-ok", remount ro, power off
#                 (boot with `rw` and a writable drive)
#   gmode=read    print "CAPSULE-GUEST-READ <written.txt>", then "... read-ok", power off
#   gmode=loop    print "COUNTER <n>" every second forever (suspend/resume tests)
#   gdirty=N      with loop: first fill N MiB of tmpfs with random data and delete it, so
#                 N MiB of guest RAM is non-zero but free (balloon / free-page tests)
# Failures print "CAPSULE-GUEST-MARKER <mode>-failed" so tests fail fast, not by timeout.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o size=90% tmpfs /tmp
hostname -F /etc/hostname

mode=boot token= dirty=
for arg in $(cat /proc/cmdline); do
  case $arg in
    gmode=*) mode=${arg#gmode=} ;;
    gtoken=*) token=${arg#gtoken=} ;;
    gdirty=*) dirty=${arg#gdirty=} ;;
  esac
done
. /etc/os-release
echo "CAPSULE-GUEST-VERSION $VERSION_ID"
echo "CAPSULE-GUEST-UPTIME $(cut -d' ' -f1 /proc/uptime)"

off() { sync; poweroff -f; }

case $mode in
  boot)
    echo "CAPSULE-GUEST-MARKER boot-ok"
    off ;;
  write)
    [ -n "$token" ] || token=$(date +%Y-%m-%dT%H:%M:%S)
    if mount -o remount,rw / &&
       echo "$token" > /root/written.txt &&
       head -c 1048576 /dev/urandom > /root/blob &&
       sync; then
      echo "CAPSULE-GUEST-MARKER write-ok"
    else
      echo "CAPSULE-GUEST-MARKER write-failed"
    fi
    mount -o remount,ro /
    off ;;
  read)
    if [ -f /root/written.txt ]; then
      echo "CAPSULE-GUEST-READ $(cat /root/written.txt)"
      echo "CAPSULE-GUEST-MARKER read-ok"
    else
      echo "CAPSULE-GUEST-MARKER read-failed"
    fi
    off ;;
  loop)
    if [ -n "$dirty" ]; then
      dd if=/dev/urandom of=/tmp/dirty bs=1M count="$dirty" 2>/dev/null
      rm -f /tmp/dirty
      echo "dirtied $dirty MiB"
    fi
    i=0
    while :; do
      echo "COUNTER $i"
      i=$((i + 1))
      sleep 1
    done ;;
  *)
    echo "CAPSULE-GUEST-MARKER unknown-mode-$mode"
    off ;;
esac
EOF
chmod 755 "$R/sbin/init"
find "$R" -exec touch -h -d "@$EPOCH" {} +

# Pin the ext4 layout instead of trusting the host's /etc/mke2fs.conf (differs by release).
cat > "$B/mke2fs.conf" <<'EOF'
[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
	small = {
		inode_ratio = 16384
	}
EOF
: > "$STAGE/disk.raw"   # existing file: mke2fs skips its "Creating regular file" notice
MKE2FS_CONFIG=$B/mke2fs.conf mke2fs -q -F -t ext4 -b 4096 -L testroot -U "$FS_UUID" \
  -E "hash_seed=$HASH_SEED,root_owner=0:0" -d "$R" "$STAGE/disk.raw" "${DISK_MB}M"
# debugfs exits 0 even when a request fails: judge by its log.
debugfs_ok() {
  if grep -Eiq 'error|not found|could not|failed|usage|invalid' "$1"; then
    cat "$1" >&2; die "debugfs failed"
  fi
}
check_fs() { e2fsck -fn "$1" > "$B/fsck.log" 2>&1 || { cat "$B/fsck.log" >&2; die "e2fsck -fn $1 failed"; }; }
# mke2fs 1.47.0 copies each source file's ctime (which touch cannot set) and owner, and
# has no SOURCE_DATE_EPOCH support: pin them afterwards so that any builder, root or not,
# gets identical blocks (and a root-owned guest).
pin() { while read -r p; do echo "sif $p ctime @$EPOCH"; echo "sif $p uid 0"; echo "sif $p gid 0"; done; }
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | sed 's|^\.||' | pin) |
  debugfs -w -f - "$STAGE/disk.raw" > "$B/debugfs-pin.log" 2>&1
debugfs_ok "$B/debugfs-pin.log"
check_fs "$STAGE/disk.raw"

############ updated disk ############
# Simulated package update applied offline with debugfs (no loop mount): most blocks stay
# identical to disk.raw, a few MiB differ -- what a delta/dedup transfer should exploit.
U=$B/update
mkdir -p "$U"
printf 'NAME="Capsule test guest"\nID=capsule-testguest\nVERSION_ID=2\n' > "$U/os-release"
prng "$U/pkg-1.bin" $((256 * 1024)) pkg-1-v2
prng "$U/pkg-2.bin" $((3 * 1024 * 1024)) pkg-2-v1
cp --sparse=always "$STAGE/disk.raw" "$STAGE/disk-update.raw"
debugfs -w -f - "$STAGE/disk-update.raw" > "$B/debugfs.log" 2>&1 <<EOF
rm /etc/os-release
write "$U/os-release" /etc/os-release
rm /usr/lib/update/pkg-1.bin
write "$U/pkg-1.bin" /usr/lib/update/pkg-1.bin
write "$U/pkg-2.bin" /usr/lib/update/pkg-2.bin
rm /usr/share/testguest/obsolete.txt
$(printf '%s\n' /etc/os-release /usr/lib/update/pkg-1.bin /usr/lib/update/pkg-2.bin | pin)
EOF
debugfs_ok "$B/debugfs.log"
check_fs "$STAGE/disk-update.raw"
for p in /etc/os-release /usr/lib/update/pkg-1.bin /usr/lib/update/pkg-2.bin; do
  debugfs -R "stat $p" "$STAGE/disk-update.raw" 2>/dev/null | grep -q '^Inode:' || die "update lost $p"
done

############ manifest ############
DIFF_BLOCKS=$(cmp -l "$STAGE/disk.raw" "$STAGE/disk-update.raw" |
              awk '{ b[int(($1 - 1) / 4096)] = 1 } END { print length(b) }' || true)
{
  echo "# Capsule test guest, built by tests/guest/build.sh"
  echo "script_sha256: $SCRIPT_HASH"
  echo "kernel_deb: $(basename "$KDEB") ($KDEB_VERSION)"
  echo "kernel_release: $KVER"
  echo "initrd_modules: $ORDER"
  echo "fs_uuid: $FS_UUID"
  echo "disk_mb: $DISK_MB payload_mb: $PAYLOAD_MB"
  echo "update_diff_4k_blocks: $DIFF_BLOCKS"
  echo "# size sha256 file"
  for f in vmlinuz initrd.gz disk.raw disk-update.raw; do
    echo "$(stat -c %s "$STAGE/$f") $(sha256sum "$STAGE/$f" | cut -d' ' -f1) $f"
  done
} > "$STAGE/manifest.txt"

############ publish ############
for f in build vmlinuz initrd.gz disk.raw disk-update.raw manifest.txt; do
  rm -rf "${OUT:?}/$f"
  mv "$STAGE/$f" "$OUT/$f"
done
echo "$SCRIPT_HASH" > "$OUT/.complete.tmp"
mv "$OUT/.complete.tmp" "$OUT/.complete"
echo "guest built in $OUT"
