#!/usr/bin/env python3
"""The soak's hands (scripts/soak.sh): the random reader, and the driver's probes that make
a fault meet reads which must fetch (blocks the mount's cache does not hold).

  index SOURCE SERVER_STORE BLOCK_SIZE OUT   blocks of SOURCE the server's store holds
  corrupt SERVER_STORE INDEX CACHE N SAVE    damage N blocks the cache lacks; prints them
  restore SERVER_STORE SAVE                  put the damaged blocks back
  read FILE SOURCE INDEX CACHE N [HASH...]   N O_DIRECT reads in parallel of blocks the cache
                                             lacks (or of HASHes): a JSON line of outcomes
  reader FILE SOURCE STOP                    random O_DIRECT reads until STOP exists, all
                                             compared
"""
import errno, json, mmap, os, random, struct, sys, threading, time


def block_file(store, h):
    return os.path.join(store, "blocks", h[:2], h)


def stored_blocks(store):
    """hash -> (file, offset, length) of each block a store holds: its block files, and the
    entries of each pack's index (44 bytes: hash, offset u64, length u32; it ends where the
    56-byte footer begins, which starts with its offset and count; docs/format.md)."""
    out = {}
    for d, _, files in os.walk(os.path.join(store, "blocks")):
        for f in files:
            out[f] = (os.path.join(d, f), 0, os.path.getsize(os.path.join(d, f)))
    packed = os.path.join(store, "packed")
    for f in sorted(os.listdir(packed)) if os.path.isdir(packed) else []:
        if not f.endswith(".pack"):
            continue
        path = os.path.join(packed, f)
        data = open(path, "rb").read()
        index, count = struct.unpack_from("<QQ", data, len(data) - 56)
        for e in range(index, index + 44 * count, 44):
            off, length = struct.unpack_from("<QI", data, e + 32)
            out[data[e:e + 32].hex()] = (path, off, length)
    return out


def load_index(path):
    return [tuple(l.split()) for l in open(path) if l.strip()]


def uncached(index, cache, n, rng):
    """n distinct blocks (offset, hash) of the index whose file the cache lacks."""
    seen, out = set(), []
    for off, h in rng.sample(index, len(index)):
        if h in seen or os.path.exists(block_file(cache, h)):
            continue
        seen.add(h)
        out.append((int(off), h))
        if len(out) == n:
            break
    return out


def index(source, store, block_size, out):
    import blake3  # soak.sh installs it
    block_size = int(block_size)
    zero = bytes(block_size)
    lines = []
    held = stored_blocks(store)
    with open(source, "rb") as f:
        off = 0
        while chunk := f.read(block_size):
            if chunk != zero[:len(chunk)]:
                h = blake3.blake3(chunk).hexdigest()
                if h in held:
                    lines.append(f"{off} {h}\n")
            off += len(chunk)
    open(out, "w").writelines(lines)
    print(len(lines))


def corrupt(store, index_path, cache, n, save):
    os.makedirs(save, exist_ok=True)
    held = stored_blocks(store)
    for _, h in uncached(load_index(index_path), cache, int(n), random.Random()):
        path, off, length = held[h]
        with open(path, "r+b") as f:
            f.seek(off)
            good = f.read(length)
            open(os.path.join(save, h), "wb").write(good)
            f.seek(off + length - 1)
            f.write(bytes([good[-1] ^ 0xFF]))
        print(h)


def restore(store, save):
    held = stored_blocks(store)
    for h in os.listdir(save):
        path, off, _ = held[h]
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(open(os.path.join(save, h), "rb").read())
        os.unlink(os.path.join(save, h))


def read(path, source, index_path, cache, n, hashes):
    index = load_index(index_path)
    if hashes:
        first = {}
        for off, h in index:
            first.setdefault(h, int(off))
        targets = [(first[h], h) for h in hashes if h in first]
    else:
        targets = uncached(index, cache, int(n), random.Random())
    src = open(source, "rb")
    out = {"reads": 0, "uncached": 0, "ok": 0, "wrong_bytes": 0, "eio": 0, "errors": 0, "max_s": 0.0}
    lock = threading.Lock()

    def one(off, h):
        was_cached = os.path.exists(block_file(cache, h))
        buf = mmap.mmap(-1, 65536)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        t0 = time.time()
        try:
            got = os.preadv(fd, [memoryview(buf)[:65536]], off)
            with lock:
                want = os.pread(src.fileno(), got, off)
                wrong = sum(1 for a, b in zip(buf[:got], want) if a != b) if buf[:got] != want else 0
                out["wrong_bytes"] += wrong
                out["ok"] += wrong == 0
                if wrong:
                    print(f"WRONG probe offset {off} block {h}", file=sys.stderr)
        except OSError as e:
            with lock:
                key = "eio" if e.errno == errno.EIO else "errors"
                out[key] += 1
                if key == "errors":
                    print(f"ERROR probe offset {off}: {e}", file=sys.stderr)
        finally:
            os.close(fd)
        with lock:
            out["reads"] += 1
            out["uncached"] += not was_cached
            out["max_s"] = max(out["max_s"], round(time.time() - t0, 2))

    threads = [threading.Thread(target=one, args=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(out))


def reader(path, source, stop):
    """Random O_DIRECT reads (aligned), each compared with the source; a line per error
    with its time, the counters at the end."""
    src = open(source, "rb").read()
    size = len(src)
    reads = wrong = errors = compared = 0
    buf = mmap.mmap(-1, 1 << 20)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    rng = random.Random(1)
    while not os.path.exists(stop):
        length = rng.choice([4096, 65536, 1 << 20])
        off = rng.randrange(0, size - length + 1) // 4096 * 4096
        try:
            n = os.preadv(fd, [memoryview(buf)[:length]], off)
            reads += 1
            compared += n
            if buf[:n] != src[off:off + n]:
                wrong += sum(1 for a, b in zip(buf[:n], src[off:off + n]) if a != b)
                print(f"WRONG {time.time():.1f} offset {off} length {n}", flush=True)
        except OSError as e:
            errors += 1
            print(f"ERROR {time.time():.1f} offset {off}: {e}", flush=True)
            time.sleep(0.2)
    print(f"reads={reads} compared={compared} wrong={wrong} errors={errors}", flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "read":
        read(*args[:5], args[5:])
    else:
        {"index": index, "corrupt": corrupt, "restore": restore, "reader": reader}[cmd](*args)
