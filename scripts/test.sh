#!/bin/bash
# Runs every test of the workspace and ends with one total line, so the closing line
# counts all suites rather than the last (possibly empty) one. A test binary that
# crashes (no "test result:" line) and a target that does not compile count as failures,
# and the whole run is bounded: CAPSULE_TEST_TIMEOUT seconds (default 2400), builds
# included, after which everything it started is stopped and the run fails.
# All in one function, read whole before it runs: editing this file during a run (bash
# reads scripts as it goes) cannot change what the run does next.
main() {
  set -uo pipefail
  cd "$(dirname "$0")/.."
  mkdir -p target
  limit=${CAPSULE_TEST_TIMEOUT:-2400}

  # The tests' temporary files (and so their mounts, caches and QEMU disks) go under one
  # directory of this run, so that a timed-out run can find what it left behind.
  scratch=$(mktemp -d /tmp/capsule-test.XXXXXX)
  # Traversable (each test's own directory inside stays 0700): tests that check what
  # another local user can do need to reach the files they guard.
  chmod 755 "$scratch"
  export TMPDIR=$scratch

  cleanup() {
    # Processes that outlived their test: mount daemons, servers and QEMUs run on files
    # under the scratch directory, in sessions of their own that the timeout's signal missed.
    # A daemon's death also fails any read still waiting on its mount (ENOTCONN).
    for pid in $(pgrep -f -- "$scratch/"); do
      kill -9 "$pid" 2>/dev/null
    done
    # Then the mounts under it (from mountinfo, never touching them), deepest first: abort
    # the FUSE connection where fusectl is mounted, and detach.
    while read -r dev mnt; do
      abort=/sys/fs/fuse/connections/${dev#*:}/abort
      [ -e "$abort" ] && echo 1 > "$abort"
      fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
    done < <(awk -v d="$scratch/" 'index($5, d) == 1 {print $3, $5}' /proc/self/mountinfo | sort -r -k2)
    rm -rf "$scratch" 2>/dev/null
  }
  trap cleanup EXIT

  # timeout signals the whole process group it leads: cargo, the test binaries and what
  # they started in the foreground.
  timeout --kill-after=30 "$limit" cargo test --workspace --features capsule/testtools --no-fail-fast "$@" 2>&1 | tee target/test.log
  status=${PIPESTATUS[0]}

  # Per binary ("Running ..." / "Doc-tests ..."): its "test result:" counts, or a crash if it
  # printed none. Then the targets cargo could not compile.
  read -r passed failed crashed < <(awk '
    function close_binary() { if (open) crashed++; open = 0 }
    /^ +(Running|Doc-tests) / { close_binary(); open = 1 }
    /^test result:/ { open = 0; for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
    END { close_binary(); print p + 0, f + 0, crashed + 0 }' target/test.log)
  uncompiled=$(grep -c '^error: could not compile' target/test.log)

  echo
  summary="tests: $passed passed, $failed failed, $crashed test binaries crashed, $uncompiled targets did not compile"
  if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    summary="$summary; TIMED OUT after $limit s"
  fi
  echo "$summary"
  if [ "$status" = 0 ] && [ $((failed + crashed + uncompiled)) -gt 0 ]; then
    status=1
  fi
  if ! cargo fmt --all --check >/dev/null; then
    echo "tests: cargo fmt --all --check finds unformatted code"
    status=1
  fi
  # Lints as errors (clippy.toml lets tests unwrap); same target dir, so mostly a re-check.
  if ! cargo clippy --workspace --all-targets --features capsule/testtools --quiet -- -D warnings; then
    echo "tests: cargo clippy --workspace --all-targets -- -D warnings finds problems"
    status=1
  fi
  # BENCHMARKS.md's tables must be what the committed raw results generate.
  if ! python3 scripts/gen-benchmarks.py --check >/dev/null; then
    echo "tests: BENCHMARKS.md differs from what results/ generates (run make bench-tables)"
    status=1
  fi
  exit "$status"
}
main "$@"
exit
