#!/usr/bin/env python3
"""Plots the link runs of a benchmark: bytes over time, demand and background apart, the
guest's marker marked. One PNG per rate, next to the traces:

    scripts/plot-link.py TRACE_DIR [OUT_DIR]

TRACE_DIR holds <rate>-<variant>.csv (t_s, link_rx_bytes, ..., marker) and, for capsule
runs, <rate>-<variant>.stats.jsonl.gz (the mount's stats.json samples), as
scripts/bench-boot-link.sh writes them. Needs matplotlib (pip install matplotlib)."""

import csv
import gzip
import json
import os
import sys
from collections import defaultdict

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("plot-link: needs matplotlib (pip install matplotlib)")


def read_csv(path):
    rows = list(csv.DictReader(open(path)))
    t = [float(r["t_s"]) for r in rows]
    rx0 = int(rows[0]["link_rx_bytes"]) if rows else 0
    rx = [(int(r["link_rx_bytes"]) - rx0) / 1e6 for r in rows]
    marker = next((float(r["t_s"]) for r in rows if r.get("marker") == "1"), None)
    return t, rx, marker


def read_stats(path):
    t, demand, ahead = [], [], []
    with gzip.open(path, "rt") as f:
        for line in f:
            s = json.loads(line)
            fetch = s["stats"].get("fetch") or {}
            if "demand_bytes" not in fetch:
                continue
            t.append(s["t"])
            demand.append(fetch["demand_bytes"] / 1e6)
            ahead.append((fetch["fetched_bytes"] - fetch["demand_bytes"]) / 1e6)
    return t, demand, ahead


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    trace_dir = sys.argv[1]
    out_dir = sys.argv[2] if len(sys.argv) > 2 else trace_dir
    runs = defaultdict(list)
    for name in sorted(os.listdir(trace_dir)):
        if name.endswith(".csv"):
            rate, _, variant = name[:-4].partition("-")
            runs[rate].append(variant)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for rate, variants in runs.items():
        fig, ax = plt.subplots(figsize=(9, 5))
        for i, v in enumerate(variants):
            color = f"C{i}"
            t, rx, marker = read_csv(os.path.join(trace_dir, f"{rate}-{v}.csv"))
            ax.plot(t, rx, color=color, label=f"{v}: link bytes")
            stats = os.path.join(trace_dir, f"{rate}-{v}.stats.jsonl.gz")
            if os.path.exists(stats):
                st, demand, ahead = read_stats(stats)
                if st:
                    ax.plot(st, demand, color=color, linestyle="--", label=f"{v}: demand (encoded)")
                    ax.plot(st, ahead, color=color, linestyle=":", label=f"{v}: readahead + background")
            if marker is not None:
                ax.axvline(marker, color=color, alpha=0.5)
                ax.annotate(f"{v} ready", (marker, 0), rotation=90, va="bottom", ha="right", color=color, fontsize=8)
        ax.set_xlabel("seconds from the start of the client")
        ax.set_ylabel("MB")
        ax.set_title(f"Debian guest boot over {rate}, 40 ms RTT (vertical lines: guest ready)")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
        out = os.path.join(out_dir, f"{rate}.png")
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    for w in written:
        print(w)


if __name__ == "__main__":
    main()
