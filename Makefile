# Capsule: `make demo` runs the main job, `make test` runs every test. Both install what
# they need first (apt packages, Rust crates, the test guest).

CARGO ?= cargo
GUEST := target/guest
export CAPSULE_GUEST_DIR := $(CURDIR)/$(GUEST)

.PHONY: all setup build guest guest-debian test crash fuzz bench-load bench-scale soak demo bench bench-tables bench-link bench-run bench-resume-link bench-boot-link bench-bulk-link bench-backup bench-crypt clean

all: build

setup:
	@bash scripts/setup.sh

build: setup
	$(CARGO) build --workspace --all-targets

guest: setup
	bash tests/guest/build.sh $(GUEST)

# The realistic guest (Debian bookworm, systemd, nginx; about 2 minutes): benchmarks only.
guest-debian: setup
	bash tests/guest/build-debian.sh target/guest-debian

test: setup guest
	bash scripts/test.sh

# kill -9 at random points of imports, pulls, commits and a mount being written, 100
# times each (make test does 12): nothing that verifies afterwards is wrong.
crash: setup guest
	CAPSULE_CRASH_ITERATIONS=$${CAPSULE_CRASH_ITERATIONS:-100} $(CARGO) test --test crash -- --test-threads 2

# Every decoder of outside input, 1,000,000 generated and mutated inputs each (make test
# runs 3,000): a line per target with its count, time and slowest input; fails on a panic
# or a hang (inputs that did are kept in target/fuzz-crashes/).
fuzz: setup
	$(CARGO) run --release -p capsule-fuzz -- --inputs $${FUZZ_INPUTS:-1000000}

demo: setup guest
	$(CARGO) build
	bash scripts/demo.sh

# The short benchmarks: each appends its raw results to results/*.jsonl; then the tables
# of BENCHMARKS.md are regenerated from them.
bench: setup guest guest-debian
	$(CARGO) build --release --features testtools
	bash -o pipefail -c 'bash scripts/bench-format.sh | tee target/bench-format.md'
	bash -o pipefail -c 'bash scripts/bench-net.sh | tee target/bench-net.md'
	bash -o pipefail -c 'bash scripts/bench-mount.sh | tee target/bench-mount.md'
	bash -o pipefail -c 'bash scripts/bench-run.sh | tee target/bench-run.md'
	python3 scripts/gen-benchmarks.py

# BENCHMARKS.md's tables from results/*.jsonl (--check: fail if BENCHMARKS.md is stale).
bench-tables:
	python3 scripts/gen-benchmarks.py

# Boot, suspend (with and without ballooning) and resume (with and without the
# fault-granularity fix) over loopback QUIC: a few minutes.
bench-run: setup guest
	$(CARGO) build --release --features testtools
	bash -o pipefail -c 'bash scripts/bench-run.sh | tee target/bench-run.md'
	python3 scripts/gen-benchmarks.py

# Resumes a suspended guest over emulated 2 and 10 Mbit/s links, with and without the
# fault-granularity fix, with --prefetch memory and with --memory-cluster 8: about 20 minutes.
bench-resume-link: setup guest
	$(CARGO) build --release --features testtools
	bash -o pipefail -c 'bash scripts/bench-resume-link.sh | tee target/bench-resume-link.md'
	python3 scripts/gen-benchmarks.py

# A pull from a server that 1,000 idle connections and 100 slow-header clients load
# (capsule-loadgen), beside the same pull alone: rate ratio and server RSS (a few minutes).
bench-load: setup guest
	$(CARGO) build --release --features testtools
	bash -o pipefail -c 'bash scripts/bench-load.sh | tee target/bench-load.md'
	python3 scripts/gen-benchmarks.py

# Encrypted against plain capsules: import, cold and warm reads through the mount (minutes).
bench-crypt: setup guest
	$(CARGO) build --release --features testtools
	bash -o pipefail -c 'bash scripts/bench-crypt.sh | tee target/bench-crypt.md'
	python3 scripts/gen-benchmarks.py

# 32 cold clients warming the guest from one server on a local store, one and two servers
# on a 3-node Garage cluster: throughput, per-client times, server memory (a few minutes).
bench-scale: setup guest
	$(CARGO) build --release
	bash -o pipefail -c 'bash scripts/bench-scale.sh | tee target/bench-scale.md'
	python3 scripts/gen-benchmarks.py

# 30 minutes (SOAK_MINUTES) of phases, each a fresh mount booting the guest and reading
# at random while one fault holds (server killed, link cut, served blocks corrupt, cache
# disk full) and a probe reads blocks the cache lacks: the reliability table (wrong bytes
# must be 0). Correctness needs no quiet machine (a busy one makes fewer phases).
soak: setup guest
	$(CARGO) build --release --features testtools
	bash -o pipefail -c 'bash scripts/soak.sh | tee target/soak.md'
	python3 scripts/gen-benchmarks.py

# Boots over emulated 384 kbit/s, 2 and 10 Mbit/s links: long (about an hour at 384 kbit/s).
bench-link: setup guest
	$(CARGO) build --release --features testtools
	bash -o pipefail -c 'bash scripts/bench-link.sh | tee target/bench-link.md'
	python3 scripts/gen-benchmarks.py

# The Debian guest over emulated 2 and 10 Mbit/s links with 40 ms RTT: qemu-nbd against
# capsule run (cold, seeded, profile prefetch), side by side (RATES=, VARIANTS= for a subset).
bench-boot-link: setup guest-debian
	$(CARGO) build --release --features testtools
	python3 -c 'import matplotlib' 2>/dev/null || pip install -q matplotlib
	bash -o pipefail -c 'bash scripts/bench-boot-link.sh | tee target/bench-boot-link.md'

# Warm and offline-prefetch goodput over emulated 10 and 50 Mbit/s links (40 ms RTT, also
# with 0.5% loss) beside rsync: about 5 minutes.
bench-bulk-link: setup
	$(CARGO) build --release --features testtools
	bash -o pipefail -c 'bash scripts/bench-bulk-link.sh | tee target/bench-bulk-link.md'

# Two weeks of the Debian guest's disk backed up daily by capsule commit + push, restic, borg
# and rsync --inplace side by side; a restore of day 7 over an emulated 10 Mbit/s link and
# retention (capsule rm + gc against restic forget --prune, borg prune): about 45 minutes.
bench-backup: setup guest-debian
	$(CARGO) build --release --features testtools
	python3 -c 'import matplotlib' 2>/dev/null || pip install -q matplotlib
	bash -o pipefail -c 'bash scripts/bench-backup.sh | tee target/bench-backup.md'
	python3 scripts/gen-benchmarks.py

clean:
	$(CARGO) clean
