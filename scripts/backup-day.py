#!/usr/bin/env python3
"""One day's work on a guest's root file system, mounted on the host (for
scripts/bench-backup.sh): deterministic for a seed and a day, so runs are comparable.

    scripts/backup-day.py ROOT DAY [SEED]

A user's documents are edited, created and deleted (text, compressible about 3x), photos
arrive (incompressible), an application appends to its log (rotated and gzipped weekly)
and grows its SQLite database (inserts, updates, deletes), and on "update days" a few MB
of files under /usr/share/doc change as a package upgrade would. Nothing the guest needs
to boot is touched. Prints what it did as one JSON line."""

import gzip
import json
import os
import random
import sqlite3
import sys

WORDS = ("capsule block layer chain server client disk memory guest kernel backup restore "
         "snapshot prune retention commit push pull mount cache verify hash zstd link "
         "network latency bandwidth report meeting budget invoice customer order shipment "
         "review draft final release note todo fixed broken weekly monthly plan the a of "
         "and to in is for on with as at by from this that it be are was were").split()


def text(rng, nbytes):
    out, n = [], 0
    while n < nbytes:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16)))
        if rng.random() < 0.3:
            line += f" #{rng.randint(0, 10**6)} {rng.random():.6f}"
        out.append(line)
        n += len(line) + 1
    return ("\n".join(out) + "\n").encode()


def main(argv):
    if len(argv) not in (3, 4):
        sys.exit(__doc__)
    root, day = argv[1], int(argv[2])
    seed = int(argv[3]) if len(argv) == 4 else 1
    rng = random.Random(seed * 1000 + day)
    did = {"day": day, "written_bytes": 0, "created": 0, "edited": 0, "deleted": 0}
    home = os.path.join(root, "home/user")
    docs, photos = os.path.join(home, "docs"), os.path.join(home, "photos")
    logdir, dbdir = os.path.join(root, "var/log/app"), os.path.join(root, "var/lib/app")
    for d in (docs, photos, logdir, dbdir):
        os.makedirs(d, exist_ok=True)

    def write(path, data):
        with open(path, "wb") as f:
            f.write(data)
        did["written_bytes"] += len(data)

    # Documents: edit some, create some (10-120 KB of text each), delete a few old ones.
    existing = sorted(os.listdir(docs))
    for name in rng.sample(existing, min(len(existing), 25)):
        path = os.path.join(docs, name)
        lines = open(path, "rb").read().split(b"\n")
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(lines))
            lines[i] = text(rng, rng.randint(40, 400)).rstrip(b"\n")
        if rng.random() < 0.5:
            lines += text(rng, rng.randint(1000, 8000)).split(b"\n")
        write(path, b"\n".join(lines))
        did["edited"] += 1
    for i in range(40):
        write(os.path.join(docs, f"d{day:02d}-{i:03d}.txt"), text(rng, rng.randint(10_000, 120_000)))
        did["created"] += 1
    for name in rng.sample(existing, len(existing) // 12):
        os.unlink(os.path.join(docs, name))
        did["deleted"] += 1

    # Photos: 2-4 incompressible files of 0.5-1.5 MB; every third day an old album goes.
    for i in range(rng.randint(2, 4)):
        write(os.path.join(photos, f"IMG_{day:02d}{i:02d}.jpg"), rng.randbytes(rng.randint(500_000, 1_500_000)))
        did["created"] += 1
    if day % 3 == 0:
        for name in sorted(os.listdir(photos)):
            if name.startswith(f"IMG_{day - 3:02d}"):
                os.unlink(os.path.join(photos, name))
                did["deleted"] += 1

    # The application's log: about 1.5 MB a day, rotated (gzipped) every seventh day.
    log = os.path.join(logdir, "app.log")
    with open(log, "ab") as f:
        for i in range(12_000):
            line = f"2026-01-{day:02d}T{i * 7 // 1000 % 24:02d}:{i % 60:02d}:{i * 13 % 60:02d}Z app[{rng.randint(100, 999)}]: " \
                   + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + f" id={rng.getrandbits(48):012x}\n"
            f.write(line.encode())
            did["written_bytes"] += len(line)
    if day % 7 == 0:
        with open(log, "rb") as src, gzip.GzipFile(log + f".{day:02d}.gz", "wb", mtime=0) as dst:
            dst.write(src.read())
        os.unlink(log)
        for name in os.listdir(logdir):
            if name.endswith(".gz") and int(name.split(".")[-2]) < day - 7:
                os.unlink(os.path.join(logdir, name))
                did["deleted"] += 1

    # The database: 15,000 inserts, 2% of the rows updated, old rows deleted.
    db = sqlite3.connect(os.path.join(dbdir, "app.db"))
    db.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, day INTEGER, kind TEXT, body TEXT)")
    db.executemany("INSERT INTO events (day, kind, body) VALUES (?, ?, ?)",
                   [(day, rng.choice(WORDS), text(rng, rng.randint(60, 240)).decode()) for _ in range(15_000)])
    n = db.execute("SELECT max(id) FROM events").fetchone()[0]
    db.executemany("UPDATE events SET body = ? WHERE id = ?",
                   [(text(rng, 100).decode(), rng.randint(1, n)) for _ in range(n // 50)])
    db.execute("DELETE FROM events WHERE day < ? AND id % 3 = 0", (day - 5,))
    db.commit()
    db.close()

    # Update days: a package upgrade rewrites a few MB of /usr/share/doc.
    if day % 7 == 4:
        share = os.path.join(root, "usr/share/doc")
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(share) for f in fs
                       if not os.path.islink(os.path.join(d, f)))
        budget = 4_000_000
        for path in rng.sample(files, len(files)):
            data = open(path, "rb").read()
            write(path, data + f"\nupgraded on day {day}\n".encode())
            did["edited"] += 1
            budget -= len(data)
            if budget <= 0:
                break
    print(json.dumps(did))


if __name__ == "__main__":
    main(sys.argv)
