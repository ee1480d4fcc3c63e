#!/bin/bash
# Build a realistic test guest: Debian bookworm (debootstrap minbase) with systemd, udev,
# dbus and nginx-light, whose boot marker is printed only once nginx really answers.
#
#   tests/guest/build-debian.sh [OUTDIR]      (default target/guest-debian)
#
# Outputs (in OUTDIR):
#   vmlinuz        Debian amd64 kernel (the one linux-image-amd64 depends on, as build.sh)
#   initrd.gz      busybox initramfs: insmods virtio/ext4, mounts /dev/vda, switch_roots to
#                  /sbin/init (= systemd); same init as build.sh's
#   disk.raw       1 GiB sparse ext4 root (mke2fs -d, no loop mounts), with the kernel's
#                  modules in /lib/modules (depmod'ed) so udev/systemd can load others
#   cmdline        the kernel command line to boot it with
#   manifest.txt   what was built (package versions, sizes, sha256)
#   debs/          cached kernel .deb and debootstrap's package cache (rebuilds are offline)
#   .complete      sha256 of this script; present only after a successful build
#
# The guest: root mounted read-only (fstab says ro, so it boots from readonly=on drives and
# read-only mounts alike); /tmp, /var/tmp, /var/log, /var/lib/nginx are tmpfs. No network
# configuration (nothing waits for one); serial getty only. capsule-marker.service, ordered
# after nginx.service, GETs http://127.0.0.1/capsule.txt with bash's /dev/tcp, then prints
# `CAPSULE-GUEST-MARKER debian-ready` (or `debian-failed`) and `CAPSULE-GUEST-UPTIME s` to
# /dev/ttyS0, and powers off if the kernel command line has `gmode=boot`.
#
# Reproducible: fixed UUID/hash seed/machine-id/timestamps/ctimes, a pinned mke2fs.conf and
# run-dependent leftovers removed, so two builds from the same packages are byte-identical
# (checked). Package versions are whatever the mirror serves (listed in the manifest).
# Needs root (debootstrap chroots), debootstrap, busybox-static, cpio, e2fsprogs, apt.
# MIRROR=URL overrides the Debian mirror (default: the one /etc/apt uses for bookworm).
set -euo pipefail

die() { echo "build-debian.sh: $*" >&2; exit 1; }
SELF=$(readlink -f "${BASH_SOURCE[0]}")
ROOTDIR=$(cd "$(dirname "$SELF")/../.." && pwd)
mkdir -p "${1:-$ROOTDIR/target/guest-debian}"
OUT=$(readlink -f "${1:-$ROOTDIR/target/guest-debian}")
SCRIPT_HASH=$(sha256sum "$SELF" | cut -d' ' -f1)

complete() { [ -f "$OUT/.complete" ] && [ "$(cat "$OUT/.complete")" = "$SCRIPT_HASH" ]; }
complete && exit 0
[ "$(id -u)" = 0 ] || die "needs root (debootstrap chroots)"
command -v debootstrap >/dev/null ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
command -v busybox >/dev/null ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >/dev/null

exec 9>"$OUT/.lock"
flock 9
complete && exit 0

rm -f "$OUT/.complete"
# unmount_under DIR: whatever debootstrap left mounted in a chroot (killed mid-build).
unmount_under() {
  awk -v d="$1/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m" || true; done
}
for old in "$OUT"/.stage.*; do [ -d "$old" ] && unmount_under "$old" && rm -rf --one-file-system "$old"; done
STAGE=$(mktemp -d "$OUT/.stage.XXXXXX")
# --one-file-system: never recurse into a /proc or /dev a chroot may still have mounted.
cleanup() { unmount_under "$STAGE"; rm -rf --one-file-system "$STAGE"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SUITE=bookworm
DISK_MB=1024
FS_UUID=0c0ffee0-ca95-4e1e-9e57-0000000000d1
HASH_SEED=0c0ffee0-ca95-4e1e-9e57-0000000000d2
MACHINE_ID=0c0ffee0ca954e1e9e570000000000d3   # fixed: no "first boot" (firstboot would prompt)
EPOCH=1700000000
export E2FSPROGS_FAKE_TIME=$EPOCH SOURCE_DATE_EPOCH=$EPOCH
PACKAGES=systemd-sysv,udev,kmod,dbus,nginx-light
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
 crc32c_generic crc16 mbcache jbd2 ext4 virtio_balloon"

# The mirror apt already uses for this suite (deb822 or one-line sources), so debootstrap
# goes wherever apt is allowed to go.
if [ -z "${MIRROR:-}" ]; then
  MIRROR=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
           awk '/^URIs:/ { u = $2 } /^Suites:/ && / '"$SUITE"'( |$)/ && u ~ /\/debian\/?$/ { print u; exit }')
  [ -n "$MIRROR" ] || MIRROR=$(awk '$1 == "deb" && $3 == "'"$SUITE"'" && $2 ~ /\/debian\/?$/ { print $2; exit }' \
                                 /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

############ kernel (same package as build.sh; reuse its cached .deb) ############
mkdir -p "$OUT/debs/apt"
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
       awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }' || true)
find_kdeb() {
  find "$OUT/debs" "$ROOTDIR/target/guest/debs" -maxdepth 1 -name "${KPKG:-linux-image-*-amd64}_*_amd64.deb" \
    2>/dev/null | sort -V | tail -n1
}
KDEB=$(find_kdeb)
if [ -z "$KDEB" ] && [ -n "$KPKG" ]; then
  DL=$(mktemp -d "$STAGE/dl.XXXXXX")
  (cd "$DL" && apt-get download -q -o APT::Sandbox::User=root "$KPKG") || die "apt-get download $KPKG failed"
  mv "$DL"/*.deb "$OUT/debs/"
  KDEB=$(find_kdeb)
fi
[ -f "${KDEB:-}" ] || die "no kernel package"
B=$STAGE/build
mkdir -p "$B"
dpkg -x "$KDEB" "$B/kernel-deb"
MODTOP=$B/kernel-deb/lib/modules
[ -d "$MODTOP" ] || MODTOP=$B/kernel-deb/usr/lib/modules
KVER=$(find "$MODTOP" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n1)
MODDIR=$MODTOP/$KVER
cp "$B/kernel-deb/boot/vmlinuz-$KVER" "$STAGE/vmlinuz"

############ initramfs (build.sh's, verbatim in behaviour) ############
N=$B/initramfs
mkdir -p "$N"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$(command -v busybox)" "$N/bin/busybox"
for a in $("$N/bin/busybox" --list); do [ "$a" = busybox ] || ln -s busybox "$N/bin/$a"; done
ORDER=""
for m in $MODULES; do
  f=$(find "$MODDIR/kernel" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \
        -o -name "${m//_/-}.ko" -o -name "${m//_/-}.ko.xz" -o -name "${m//_/-}.ko.zst" \) | head -n1)
  if [ -z "$f" ]; then
    grep -Eq "/(${m}|${m//_/-})\.ko$" "$MODDIR/modules.builtin" 2>/dev/null || die "module $m not found"
    continue
  fi
  case $f in
    *.ko.xz)  xz -dc "$f" > "$N/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$N/lib/modules/$m.ko" ;;
    *)        cp "$f" "$N/lib/modules/$m.ko" ;;
  esac
  ORDER="$ORDER $m"
done
echo "${ORDER# }" > "$N/lib/modules/order"
cat > "$N/init" <<'EOF'
#!/bin/sh
# initramfs PID 1: load the drivers the kernel has as modules, mount /dev/vda (read-only
# unless the command line says `rw`), switch_root to systemd.
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
find "$N" -exec touch -h -d "@$EPOCH" {} +
(cd "$N" && find . -mindepth 1 | LC_ALL=C sort |
   cpio -o -H newc --quiet --reproducible -R 0:0 | gzip -9n) > "$STAGE/initrd.gz"

############ root filesystem ############
R=$B/rootfs
echo "build-debian.sh: debootstrap $SUITE from $MIRROR (packages cached in $OUT/debs/apt)" >&2
debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$OUT/debs/apt" \
  "$SUITE" "$R" "$MIRROR" > "$B/debootstrap.log" 2>&1 || { tail -n 30 "$B/debootstrap.log" >&2; die "debootstrap failed"; }
unmount_under "$R"
[ -L "$R/etc/systemd/system/multi-user.target.wants/nginx.service" ] || die "nginx.service not enabled by its package"

# The kernel's modules, indexed, so udev and systemd-modules-load find the rest.
mkdir -p "$R/lib/modules"
cp -a "$MODDIR" "$R/lib/modules/$KVER"
chroot "$R" depmod -a "$KVER"

echo capsule-debian > "$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tcapsule-debian\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$R/etc/hosts"
echo "$MACHINE_ID" > "$R/etc/machine-id"
: > "$R/etc/resolv.conf"
cat > "$R/etc/fstab" <<'EOF'
# Read-only root: the same image boots from a readonly=on drive or a read-only mount.
/dev/vda        /               ext4    ro,noatime      0 0
tmpfs           /tmp            tmpfs   nosuid,nodev,mode=1777  0 0
tmpfs           /var/tmp        tmpfs   nosuid,nodev,mode=1777  0 0
tmpfs           /var/log        tmpfs   nosuid,nodev,mode=0755  0 0
tmpfs           /var/lib/nginx  tmpfs   nosuid,nodev,mode=0755  0 0
EOF
# /var/log is empty tmpfs at boot: nginx needs its log directory back before it starts.
echo 'd /var/log/nginx 0755 root adm -' > "$R/etc/tmpfiles.d/capsule-nginx.conf"
# logind's sandbox bind-mounts this path: on a read-only root it must exist already.
mkdir -p "$R/var/lib/systemd/linger"

# Units that would fail on a read-only root or only cost boot time, and the VGA getty.
for u in systemd-firstboot.service systemd-random-seed.service ldconfig.service \
         systemd-update-done.service apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
         e2scrub_all.timer e2scrub_reap.service fstrim.timer; do
  ln -sfn /dev/null "$R/etc/systemd/system/$u"
done
rm -f "$R/etc/systemd/system/getty.target.wants/getty@tty1.service"

echo capsule-debian-ok > "$R/var/www/html/capsule.txt"
cat > "$R/usr/local/sbin/capsule-marker" <<'EOF'
#!/bin/bash
# Boot marker: print it only once nginx really serves a page, then (gmode=boot) power off.
mode=
for a in $(cat /proc/cmdline); do case $a in gmode=*) mode=${a#gmode=} ;; esac; done
probe() {
  exec 3<>/dev/tcp/127.0.0.1/80 || return 1
  printf 'GET /capsule.txt HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
  local resp
  resp=$(timeout 5 cat <&3)
  exec 3<&-
  [[ $resp == "HTTP/1.1 200"* && $resp == *capsule-debian-ok* ]]
}
result=failed
for _ in $(seq 150); do   # nginx.service is "started" before it listens on some boots
  if probe 2>/dev/null; then result=ready; break; fi
  sleep 0.2
done
{
  echo "CAPSULE-GUEST-UPTIME $(cut -d' ' -f1 /proc/uptime)"
  echo "CAPSULE-GUEST-MARKER debian-$result"
} > /dev/ttyS0
[ "$mode" = boot ] && systemctl poweroff --no-block
[ $result = ready ]
EOF
chmod 755 "$R/usr/local/sbin/capsule-marker"
cat > "$R/etc/systemd/system/capsule-marker.service" <<'EOF'
[Unit]
Description=Capsule boot marker (nginx answers)
Wants=nginx.service
After=nginx.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/capsule-marker

[Install]
WantedBy=multi-user.target
EOF
ln -sfn /etc/systemd/system/capsule-marker.service "$R/etc/systemd/system/multi-user.target.wants/capsule-marker.service"

# Run-dependent leftovers of the build, and what the guest never needs.
dpkg-query --admindir="$R/var/lib/dpkg" -W -f '${Package} ${Version}\n' | LC_ALL=C sort > "$B/packages.txt"
rm -rf "$R"/var/cache/apt/*.bin "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* \
       "$R"/var/log/* "$R"/var/cache/debconf/*-old "$R"/var/lib/dpkg/*-old "$R"/tmp/* "$R"/var/tmp/* \
       "$R"/etc/ssh/ssh_host_* "$R/debootstrap" "$R/var/cache/ldconfig/aux-cache"
# dbus's postinst made a random id; Debian's own images link it to the (fixed) system one.
ln -sfn /etc/machine-id "$R/var/lib/dbus/machine-id"
find "$R" -exec touch -h -d "@$EPOCH" {} +

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
EOF
: > "$STAGE/disk.raw"
MKE2FS_CONFIG=$B/mke2fs.conf mke2fs -q -F -t ext4 -b 4096 -L debianroot -U "$FS_UUID" \
  -E "hash_seed=$HASH_SEED,root_owner=0:0" -d "$R" "$STAGE/disk.raw" "${DISK_MB}M"
# mke2fs copies each file's ctime (touch cannot set it): pin them. Owners are already right
# (debootstrap ran as root).
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | sed 's|^\.||' | grep -v '[[:space:]"]' |
   while read -r p; do echo "sif \"$p\" ctime @$EPOCH"; done) |
  debugfs -w -f - "$STAGE/disk.raw" > "$B/debugfs-pin.log" 2>&1
# debugfs exits 0 when a request fails and echoes each request (file names may say "error").
if grep -v '^debugfs: ' "$B/debugfs-pin.log" | grep -Eiq 'error|not found|could not|failed|invalid'; then
  grep -v '^debugfs: ' "$B/debugfs-pin.log" | head >&2; die "debugfs failed"
fi
e2fsck -fn "$STAGE/disk.raw" > "$B/fsck.log" 2>&1 || { cat "$B/fsck.log" >&2; die "e2fsck failed"; }

echo "console=ttyS0 quiet panic=-1 gmode=boot" > "$STAGE/cmdline"
{
  echo "# Capsule Debian test guest, built by tests/guest/build-debian.sh"
  echo "script_sha256: $SCRIPT_HASH"
  echo "suite: $SUITE mirror: $MIRROR variant: minbase include: $PACKAGES"
  echo "kernel_deb: $(basename "$KDEB") kernel_release: $KVER"
  echo "fs_uuid: $FS_UUID disk_mb: $DISK_MB allocated_bytes: $(( $(stat -c %b "$STAGE/disk.raw") * 512 ))"
  echo "cmdline: $(cat "$STAGE/cmdline")"
  echo "# size sha256 file"
  for f in vmlinuz initrd.gz disk.raw; do
    echo "$(stat -c %s "$STAGE/$f") $(sha256sum "$STAGE/$f" | cut -d' ' -f1) $f"
  done
  echo "# packages"
  cat "$B/packages.txt"
} > "$STAGE/manifest.txt"

# The rootfs tree stays out of OUT (hundreds of MiB, root-owned); keep only the logs.
mkdir -p "$STAGE/logs"
mv "$B"/*.log "$STAGE/logs/"
for f in logs vmlinuz initrd.gz disk.raw cmdline manifest.txt; do
  rm -rf "${OUT:?}/$f"
  mv "$STAGE/$f" "$OUT/$f"
done
echo "$SCRIPT_HASH" > "$OUT/.complete.tmp"
mv "$OUT/.complete.tmp" "$OUT/.complete"
echo "Debian guest built in $OUT"
