#!/bin/bash
# Runs every test of the workspace and ends with one total line, so the closing line
# counts all suites rather than the last (possibly empty) one.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee target/test.log
status=${PIPESTATUS[0]}
read -r passed failed < <(awk '/^test result:/ {for (i=1;i<=NF;i++) {if ($(i+1) ~ /^passed/) p+=$i; if ($(i+1) ~ /^failed/) f+=$i}} END {print p+0, f+0}' target/test.log)
echo
echo "tests: $passed passed, $failed failed"
exit "$status"
