#!/bin/bash
# Install what Capsule's build, tests and demo need on a fresh Debian machine.
# Idempotent and quiet when everything is present (it runs before every make test/demo).
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }

apt_install() {
  if [ -z "${APT_UPDATED:-}" ]; then
    echo "setup: apt-get update" >&2
    apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  echo "setup: apt-get install $*" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ "$(id -u)" != 0 ]; then
  apt_install() { echo "setup: missing packages, run as root: apt-get install $*" >&2; exit 1; }
fi

# One step at a time: some machines ship a newer qemu-utils from backports that conflicts
# with Debian's qemu-system-x86; installing qemu-system first replaces it, then
# qemu-utils of the matching version goes in cleanly.
have qemu-system-x86_64 || apt_install qemu-system-x86
{ have qemu-img && have qemu-io && have qemu-nbd; } || apt_install qemu-utils
for pair in fusermount3:fuse3 cpio:cpio mke2fs:e2fsprogs debugfs:e2fsprogs zstd:zstd xz:xz-utils \
            openssl:openssl rsync:rsync flock:util-linux jq:jq python3:python3; do
  have "${pair%%:*}" || need_apt+=("${pair#*:}")
done
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx switch_root || need_apt+=(busybox-static)
[ ${#need_apt[@]} -eq 0 ] || apt_install "${need_apt[@]}"

have cargo || { echo "setup: cargo not found; install a Rust toolchain (rustup)" >&2; exit 1; }

# Garage, the S3-compatible distributed object store the scale-out tests run capsule servers
# on (tests/scale.rs): built from crates.io once, then reused from ~/.cargo/bin. Pinned: the
# tests drive its admin commands. Only what the tests use (the sqlite engine, bundled C
# libraries; no LMDB, K2V or metrics) at opt-level 1: about 9 CPU-minutes instead of the
# full build's 15 to 35 wall minutes here, and fast enough for a test cluster.
GARAGE_VERSION=2.5.0
garage_bin="${CARGO_HOME:-$HOME/.cargo}/bin/garage"
if ! { have garage || [ -x "$garage_bin" ]; }; then
  echo "setup: cargo install garage@$GARAGE_VERSION (once; several minutes)" >&2
  garage_install() {
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=0 \
      cargo install --quiet "$@" "garage@$GARAGE_VERSION" --no-default-features --features bundled-libs,sqlite
  }
  garage_install --locked || garage_install
fi
