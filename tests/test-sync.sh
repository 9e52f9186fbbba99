#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Sync policies for clients that never flush.
#  sync=always: a write is durable when answered: kill -9 right after the
#    write returns (the client still connected, no FLUSH sent), restart,
#    the data is there.
#  sync=100: a background flush every 100 ms: kill -9 0.5 s after the
#    write, the data is there.
#  oldstyle (nbdkit -o, where FLUSH is not usable) with sync=always: same.
# After each crash qemu-img check may find leaked clusters, nothing worse.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit qemu-img
requires_python_nbd

size=$(( 16 * 1024 * 1024 ))
base=$tmpdir/base.raw
make_random_file "$base" "$size" 6
base_sum=$(sha256 "$base")

# sync.py write URI PID SEED DELAY BASE EXPECTED CASE: write (no flush), wait DELAY
# seconds, kill -9 the server while still connected, save what the disk
# must now hold.  sync.py check URI EXPECTED.
cat > "$tmpdir/sync.py" <<'EOF'
import os, random, signal, sys, time
sys.path.insert(0, os.environ["testsdir"])
import nbd
from cowtest import connect, read_all, check_equal

mode, uri = sys.argv[1:3]
if mode == "write":
    pid, seed, delay, base, expected = (int(sys.argv[3]), int(sys.argv[4]),
                                        float(sys.argv[5]), sys.argv[6],
                                        sys.argv[7])
    # An oldstyle client (QEMU 0.12) only reads and writes; nbdkit -o
    # refuses WRITE_ZEROES anyway.
    writes_only = sys.argv[8] == "oldstyle"
    model = bytearray(open(base, "rb").read())
    size = len(model)
    rng = random.Random(seed)
    h = connect(uri)
    ops = []
    for i in range(12):
        off = rng.randrange(size)
        n = min(rng.choice([1, 512, 4096, 70000, 300000]), size - off)
        data = rng.randbytes(n)
        h.pwrite(data, off)
        model[off:off + n] = data
    if not writes_only:
        c = rng.randrange(size // 65536) * 65536
        h.zero(65536, c)                # a zero cluster over base data
        model[c:c + 65536] = bytes(65536)
        off = rng.randrange(size - 3000)
        h.zero(3000, off)               # real zeroes
        model[off:off + 3000] = bytes(3000)
    open(expected, "wb").write(model)
    if delay:
        time.sleep(delay)
    os.kill(pid, signal.SIGKILL)        # no flush, no disconnect
elif mode == "check":
    expected = sys.argv[3]
    h = connect(uri)
    check_equal(read_all(h), open(expected, "rb").read(), 0,
                "export after kill -9 and restart")
    h.shutdown()
EOF

# run_case NAME DELAY NBDKIT-ARGS...
run_case ()
{
    local name=$1 delay=$2; shift 2
    local ov=$tmpdir/$name.qcow2 expected=$tmpdir/$name.expected
    note "$name: $*: kill -9 ${delay}s after unflushed writes"
    start_server "$name" base="$base" overlay="$ov" "$@"
    "$PYTHON" "$tmpdir/sync.py" write "$(server_uri "$name")" \
        "$(server_pid "$name")" "$seed" "$delay" "$base" "$expected" "$name" ||
        fail "$name: writing"
    seed=$(( seed + 1 ))
    reap_server "$name"
    check_image "$ov" leaks-ok
    # Restart with the same policy (its clean stop is the one that the
    # leak check sees).
    start_server "$name" base="$base" overlay="$ov" "$@"
    "$PYTHON" "$tmpdir/sync.py" check "$(server_uri "$name")" "$expected" ||
        fail "$name ($*): writes lost after kill -9"
    if [ "$name" = oldstyle ]; then
        # The oldstyle protocol really was used.
        nbdsh -u "$(server_uri "$name")" \
            -c 'assert h.get_protocol() == "oldstyle", h.get_protocol()'
    fi
    stop_server "$name"
    check_image "$ov" leaks-ok
    rm -f "$ov" "$expected"
}

seed=100
run_case always 0 sync=always
run_case interval 0.5 sync=100
run_case oldstyle 0 -o sync=always

[ "$(sha256 "$base")" = "$base_sum" ] || fail "the base was modified"
note "pass"
