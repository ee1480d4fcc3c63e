#!/usr/bin/env python3
"""Plots bytes stored per day per tool from the latest run of scripts/bench-backup.sh:

    scripts/plot-backup.py [RESULTS_JSONL] [OUT_PNG]

Defaults: $RESULTS_DIR (else results/)/backup.jsonl and .../backup/stored.png (BENCHMARKS.md shows it).
Needs matplotlib (pip install matplotlib)."""

import json
import os
import sys

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("plot-backup: needs matplotlib (pip install matplotlib)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.environ.get("RESULTS_DIR", os.path.join(ROOT, "results"))
STYLE = {"capsule": "o-", "restic": "s-", "borg": "^-", "rsync": "x--"}


def main(argv):
    src = argv[1] if len(argv) > 1 else os.path.join(RESULTS, "backup.jsonl")
    out = argv[2] if len(argv) > 2 else os.path.join(RESULTS, "backup", "stored.png")
    rows = [json.loads(line) for line in open(src) if line.strip()]
    days = [r for r in rows if r["params"].get("section") == "day"]
    if not days:
        sys.exit(f"plot-backup: no day rows in {src}")
    latest = max(days, key=lambda r: r["date"])
    run = (latest["commit"], latest["params"]["run"])
    days = [r for r in days if (r["commit"], r["params"]["run"]) == run]
    tools = []
    for r in days:
        if r["params"]["tool"] not in tools:
            tools.append(r["params"]["tool"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for tool in tools:
        pts = sorted((r["params"]["day"], r["measurements"]) for r in days if r["params"]["tool"] == tool)
        x = [d for d, _ in pts]
        ax1.plot(x, [m["stored_bytes"] / 1e6 for _, m in pts], STYLE.get(tool, ".-"), label=tool)
        ax2.plot(x, [m["sent_bytes"] / 1e6 for _, m in pts], STYLE.get(tool, ".-"), label=tool)
    ax1.set(xlabel="day", ylabel="MB stored on the server (total)", title="Bytes stored")
    ax2.set(xlabel="day", ylabel="MB sent that day (log scale)", title="Bytes sent per day", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Two weeks of the Debian guest's disk, backed up daily (run {run[1]}, {run[0][:7]})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"plot-backup: {out}")


if __name__ == "__main__":
    main(sys.argv)
