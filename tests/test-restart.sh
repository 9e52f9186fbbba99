#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Durability across restarts.
#  1. FUA writes, and writes from one connection flushed from another
#     (multi-conn), survive a normal stop (SIGTERM) and restart.
#  2. kill -9 after a FLUSH: every write answered before the flush, and
#     every FUA write, survives; writes after the flush are each either
#     there or not (never torn, never garbage); qemu-img check finds at
#     most leaked clusters (exit 3), never corruption.  Twice, on the
#     same overlay, so the second crash hits a reopened file.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit qemu-img
requires_python_nbd

size=$(( 16 * 1024 * 1024 ))
base=$tmpdir/base.raw
ov=$tmpdir/overlay.qcow2
state=$tmpdir/state.pickle
make_random_file "$base" "$size" 5
base_sum=$(sha256 "$base")

cat > "$tmpdir/crash.py" <<'EOF'
import os, pickle, random, signal, sys
sys.path.insert(0, os.environ["testsdir"])
import nbd
from cowtest import connect, read_all, check_equal, describe_diff

mode, uri, state = sys.argv[1:4]
M = 1 << 20

def load():
    with open(state, "rb") as f:
        return pickle.load(f)

def save(s):
    with open(state + ".tmp", "wb") as f:
        pickle.dump(s, f)
    os.rename(state + ".tmp", state)

if mode == "init":
    base = sys.argv[4]
    save({"model": bytearray(open(base, "rb").read()), "unflushed": []})

elif mode == "term":
    # Phase 1: FUA writes; writes on h2 flushed through h1.
    s = load()
    model = s["model"]
    h1, h2 = connect(uri), connect(uri)
    assert h1.can_multi_conn(), "multi-conn not advertised"
    rng = random.Random(11)
    for off, n in [(0, 512), (65536 - 100, 200), (M + 7, 150000),
                   (5 * M, 65536), (len(model) - 4096, 4096)]:
        data = rng.randbytes(n)
        h1.pwrite(data, off, nbd.CMD_FLAG_FUA)
        model[off:off + n] = data
    for off, n in [(7 * M + 3, 5000), (8 * M, 131072), (9 * M - 1, 2)]:
        data = rng.randbytes(n)
        h2.pwrite(data, off)
        model[off:off + n] = data
    h2.zero(65536, 10 * M)
    model[10 * M:10 * M + 65536] = bytes(65536)
    h2.trim(65536, 11 * M)
    model[11 * M:11 * M + 65536] = bytes(65536)
    h1.flush()
    check_equal(read_all(h2), model, 0, "export before stopping")
    save(s)
    h1.shutdown(); h2.shutdown()

elif mode == "crash":
    # Phase 2: writes, FLUSH, FUA writes, unflushed writes, kill -9.
    pid, seed = int(sys.argv[4]), int(sys.argv[5])
    s = load()
    model = s["model"]
    size = len(model)
    rng = random.Random(seed)
    hs = [connect(uri) for _ in range(3)]
    for i in range(60):
        h = hs[i % 3]
        r = rng.random()
        off = rng.randrange(size)
        n = min(rng.randint(1, 200000), size - off)
        if r < 0.7:
            data = rng.randbytes(n)
            h.pwrite(data, off)
            model[off:off + n] = data
        elif r < 0.85:
            h.zero(n, off)
            model[off:off + n] = bytes(n)
        else:
            c = rng.randrange(size // 65536) * 65536
            h.trim(65536, c)
            model[c:c + 65536] = bytes(65536)
    hs[1].flush()               # one flush, for all connections

    # FUA after the flush: must survive too.
    used = []
    for i in range(5):
        off = rng.randrange(size // 4096) * 4096 + rng.randrange(4096 - 700)
        data = rng.randbytes(700)
        hs[i % 3].pwrite(data, off, nbd.CMD_FLAG_FUA)
        model[off:off + 700] = data
        used.append(off // 4096)
    c = rng.randrange(size // 65536) * 65536
    hs[0].zero(65536, c, nbd.CMD_FLAG_FUA)
    model[c:c + 65536] = bytes(65536)
    used += range(c // 4096, (c + 65536) // 4096)

    # Not flushed: each within one 4K page, on pages not used above.
    unflushed = []
    while len(unflushed) < 20:
        page = rng.randrange(size // 4096)
        if page in used:
            continue
        used.append(page)
        lo = rng.randrange(4096)
        hi = rng.randint(lo + 1, 4096)
        off, n = page * 4096 + lo, hi - lo
        data = rng.randbytes(n)
        hs[len(unflushed) % 3].pwrite(data, off)
        unflushed.append((off, bytes(model[off:off + n]), data))
    s["unflushed"] = unflushed
    save(s)                     # before the kill: the model is what's durable
    os.kill(pid, signal.SIGKILL)

elif mode == "check":
    s = load()
    model = s["model"]
    h = connect(uri)
    got = bytearray(read_all(h))
    # Each unflushed write is all there or not there at all.
    for off, old, new in s["unflushed"]:
        n = len(new)
        now = bytes(got[off:off + n])
        if now != old and now != new:
            sys.exit("unflushed write at %d (%d bytes) is neither old nor new: %s"
                     % (off, n, describe_diff(now, new, off)))
        model[off:off + n] = now
    check_equal(got, model, 0, "export after kill -9 and restart "
                "(flushed and FUA writes)")
    s["unflushed"] = []
    save(s)
    h.shutdown()
EOF
crash=("$PYTHON" "$tmpdir/crash.py")

"${crash[@]}" init "" "$state" "$base"

note "FUA and multi-conn flush, then SIGTERM and restart"
start_server srv base="$base" overlay="$ov"
"${crash[@]}" term "$(server_uri srv)" "$state" || fail "writing"
stop_server srv
check_image "$ov"
start_server srv base="$base" overlay="$ov"
"${crash[@]}" check "$(server_uri srv)" "$state" ||
    fail "writes lost across SIGTERM and restart"
stop_server srv
check_image "$ov"

for round in 1 2; do
    note "kill -9 after a flush, round $round"
    start_server srv base="$base" overlay="$ov"
    "${crash[@]}" crash "$(server_uri srv)" "$state" "$(server_pid srv)" "$round" ||
        fail "writing (round $round)"
    reap_server srv
    check_image "$ov" leaks-ok
    start_server srv base="$base" overlay="$ov"
    "${crash[@]}" check "$(server_uri srv)" "$state" ||
        fail "flushed or FUA writes lost after kill -9 (round $round)"
    stop_server srv
    check_image "$ov" leaks-ok
done

[ "$(sha256 "$base")" = "$base_sum" ] || fail "the base was modified"
note "pass"
