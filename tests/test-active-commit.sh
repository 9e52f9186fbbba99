#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Active commit under guest writes that never pause: the job copies the
# active layer into the one below while four connections keep writing
# and zeroing, each in its own byte range, with ranges that share
# clusters (partial-cluster writes of two connections hit the same
# cluster at the same time).  After its first pass the job mirrors the
# guest's changes into the target (write-blocking), so it must complete
# while the writers go on; then the disk reads exactly what the writers
# wrote (their model), the chain is one layer shorter, every layer passes
# qemu-img check, qemu-img reads the same chain offline, and so does a
# restarted server.  Run twice: a commit into the layer below, and one
# into the original base (a new empty layer goes on top).
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires nbdkit qemu-img
requires_python_nbd
requires_cowchain

cow=$cowchain_bin
M=$(( 1 << 20 ))
size=$(( 24 * M ))
make_random_file "$tmpdir/base.img" "$size" 7

# writers URI MODEL STOPFILE: four connections write random data and
# zeroes (random lengths, unaligned) into four disjoint byte ranges whose
# edges fall inside clusters, until STOPFILE exists; then each flushes,
# and the model (a raw file: what the disk must read) is updated with
# every change.  Prints the number of requests.
writers ()
{
    "$PYTHON" - "$@" <<'PY'
import os, random, sys, threading
sys.path.insert(0, os.environ["testsdir"])
from cowtest import connect
uri, model_path, stop = sys.argv[1:4]
with open(model_path, "rb") as f:
    model = bytearray(f.read())
size = len(model)
# Edges 1000 bytes past a 64 KiB boundary: neighbours share a cluster.
edges = [0] + [i * size // 4 + 1000 for i in (1, 2, 3)] + [size]
counts = [0] * 4
errors = []

def run(k):
    rng = random.Random(k)
    lo, hi = edges[k], edges[k + 1]
    h = connect(uri)
    try:
        while counts[k] < 50 or not os.path.exists(stop):
            off = rng.randrange(lo, hi)
            n = min(rng.randint(1, 96 << 10), hi - off)
            if rng.random() < 0.1:
                h.zero(n, off)
                model[off:off + n] = bytes(n)
            else:
                data = rng.randbytes(n)
                h.pwrite(data, off)
                model[off:off + n] = data
            counts[k] += 1
            if counts[k] == 1:
                open(stop + ".started%d" % k, "w").close()
        h.flush()
        h.shutdown()
    except Exception as e:
        errors.append("writer %d: %s" % (k, e))
        open(stop, "w").close()

ts = [threading.Thread(target=run, args=(k,)) for k in range(4)]
for t in ts:
    t.start()
for t in ts:
    t.join()
if errors:
    sys.exit("; ".join(errors))
with open(model_path + ".tmp", "wb") as f:
    f.write(model)
os.rename(model_path + ".tmp", model_path)
print(sum(counts))
PY
}

# same_content WHAT: the disk, read over NBD, equals the model.
same_content ()
{
    "$PYTHON" "$testsdir/merge-util.py" compare "$uri" "$model" "$1" ||
        fail "$1: disk differs from its model"
}

# run_case NAME COMMIT-OPTION...: one active commit under the writers.
run_case ()
{
    local name=$1 st=$tmpdir/st-$1 base=$tmpdir/base-$1.img n i k
    shift
    cp "$tmpdir/base.img" "$base"
    cp "$base" "$tmpdir/model-$name"
    model=$tmpdir/model-$name
    start_server "$name" base="$base" state="$st" control="$tmpdir/$name.ctl"
    uri=$(server_uri "$name")
    export COWCHAIN_CONTROL=$tmpdir/$name.ctl
    # Something in the active layer for the job's first pass, then a
    # snapshot (the layer below), then more in the new active layer.
    qemu-io -f raw -c "write -P 0x5a 0 $(( 16 * M ))" "$uri" > /dev/null
    qemu-io -f raw -c "write -P 0x5a 0 $(( 16 * M ))" "$model" > /dev/null
    "$cow" snapshot s1 > /dev/null
    qemu-io -f raw -c "write -P 0x6b $(( 4 * M )) $(( 12 * M ))" "$uri" > /dev/null
    qemu-io -f raw -c "write -P 0x6b $(( 4 * M )) $(( 12 * M ))" "$model" > /dev/null

    rm -f "$tmpdir/stop"*
    writers "$uri" "$model" "$tmpdir/stop" > "$tmpdir/writes" &
    local w=$!
    for (( i = 0; i < 600; i++ )); do
        n=0
        for k in 0 1 2 3; do [ -e "$tmpdir/stop.started$k" ] && n=$(( n + 1 )); done
        [ "$n" = 4 ] && break
        kill -0 "$w" 2> /dev/null || break
        sleep 0.05
    done
    [ "$n" = 4 ] || fail "$name: the writers did not start"
    "$cow" commit --top active --force "$@" > /dev/null ||
        fail "$name: the active commit did not start"
    # The job must end while the writers keep going.
    "$cow" --timeout=120 wait || fail "$name: the active commit did not complete"
    kill -0 "$w" 2> /dev/null || fail "$name: the writers stopped before the job ended"
    touch "$tmpdir/stop"
    wait "$w" || fail "$name: the writers failed"
    note "$name: the writers sent $(cat "$tmpdir/writes") requests"
    same_content "$name: after the active commit"
    qemu-io -f raw -c "write -P 0x7c $(( 2 * M )) 100000" "$uri" > /dev/null
    qemu-io -f raw -c "write -P 0x7c $(( 2 * M )) 100000" "$model" > /dev/null
    same_content "$name: a write after the active commit"
    stop_server "$name"
    for f in "$st"/layer-*.qcow2; do check_image "$f"; done
    qemu-img compare -q -f qcow2 -F raw "$(ls "$st"/layer-*.qcow2 | tail -n1)" "$model" ||
        fail "$name: qemu-img reads another disk than the model"
    no_leak_check=1 start_server "$name" base="$base" state="$st" \
        control="$tmpdir/$name.ctl"
    same_content "$name: after a restart"
    stop_server "$name"
}

note "active commit into the layer below, under four writers"
run_case below
[ "$(ls "$tmpdir/st-below"/layer-*.qcow2 | wc -l)" = 1 ] ||
    fail "below: the chain does not hold one layer file"

note "active commit into the original base, under four writers"
run_case base --base base --allow-base-write
[ "$(ls "$tmpdir/st-base"/layer-*.qcow2 | wc -l)" = 1 ] ||
    fail "base: the chain does not hold one (new, empty) layer file"
