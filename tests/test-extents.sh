#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Extents (base:allocation) through the whole chain: a sparse raw base
# with a little data, an overlay with data clusters, zero clusters and
# trimmed clusters.  nbdinfo --map and block_status must say data where
# there is data, hole+zero where neither layer has anything, zero for
# zeroed clusters, and never zero where the bytes are not zero.  nbdcopy
# and qemu-img convert (which both skip what is reported as zero) must
# produce an identical image.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit nbdinfo nbdcopy qemu-img
requires_python_nbd

# Positions are in units of U = 256 KiB; the disk is 64 U = 16 MiB.
U=$(( 256 * 1024 ))
size=$(( 64 * U ))
base=$tmpdir/base.raw
expected=$tmpdir/expected.raw

# The sparse base: data at [1U, 1U+64K), [10U+4K, 10U+8K), [63U, 64U).
truncate -s "$size" "$base"
make_random_file "$tmpdir/data" $(( 2 * 1024 * 1024 )) 3
dd if="$tmpdir/data" of="$base" bs=4096 seek=64 count=16 conv=notrunc status=none
dd if="$tmpdir/data" of="$base" bs=4096 skip=100 seek=641 count=1 conv=notrunc status=none
dd if="$tmpdir/data" of="$base" bs=4096 skip=200 seek=4032 count=64 conv=notrunc status=none
rm -f "$tmpdir/data"
base_sum=$(sha256 "$base")

# Does this file system report holes at all?  (Every Linux file system
# the tests run on does; if not, the base cannot be sparse.)
"$PYTHON" - "$base" <<'EOF' || fail "the file system under $tmpdir does not report holes (SEEK_HOLE)"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
sys.exit(0 if os.lseek(fd, 0, os.SEEK_HOLE) == 0 and
         os.lseek(fd, 0, os.SEEK_DATA) == 256 * 1024 else 1)
EOF

# check_map URI: the extent checks, through nbdinfo --map and through
# block_status directly.
check_map ()
{
    nbdinfo --map --json "$1" > "$tmpdir/map.json" || fail "nbdinfo --map"
    nbdinfo --map "$1" > "$tmpdir/map.txt"
    cat "$tmpdir/map.txt"
    "$PYTHON" - "$1" "$tmpdir/map.json" "$expected" <<'EOF' || fail "extents"
import json, os, sys
sys.path.insert(0, os.environ["testsdir"])
import nbd
from cowtest import connect, extents

uri, mapfile, expected = sys.argv[1:]
model = open(expected, "rb").read()
size = len(model)
U = 256 * 1024
HOLE, ZERO = nbd.STATE_HOLE, nbd.STATE_ZERO
NAMES = {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}

# (start, end, rule, why)
K = 1024
rules = [
    (0, 1 * U, "hole", "nothing in base or overlay"),
    (1 * U, 1 * U + 64 * K, "zero", "zeroed cluster over base data"),
    (2 * U, 10 * U, "hole", "nothing in base or overlay"),
    (10 * U + 4 * K, 10 * U + 8 * K, "data", "base data (partial trim ignored)"),
    (12 * U, 20 * U, "hole", "nothing in base or overlay"),
    (20 * U, 20 * U + 64 * K, "data", "overlay data"),
    (30 * U + 5, 30 * U + 105, "data", "overlay data"),
    (40 * U, 40 * U + 128 * K, "zero", "zeroed clusters over a base hole"),
    (41 * U, 63 * U, "hole", "nothing in base or overlay"),
    (63 * U, 63 * U + 64 * K, "zero", "trimmed cluster over base data"),
    (63 * U + 64 * K, 63 * U + 128 * K, "data", "base data"),
    (63 * U + 128 * K + 7, 63 * U + 128 * K + 1007, "not-hole", "partly zeroed base data"),
    (63 * U + 128 * K + 2048, 64 * U, "data", "base data"),
]

def ok(rule, flags):
    if rule == "hole":
        return flags & (HOLE | ZERO) == HOLE | ZERO
    if rule == "zero":
        return flags & ZERO != 0
    if rule == "data":
        return flags & (HOLE | ZERO) == 0
    if rule == "not-hole":
        return flags & HOLE == 0
    raise ValueError(rule)

def check(exts, source):
    errors = []
    pos = 0
    for off, length, flags in exts:
        if off != pos:
            errors.append("%s: extent at %d, expected %d" % (source, off, pos))
        pos = off + length
        if flags & ZERO and any(model[off:off + length]):
            errors.append("%s: [%d, %d) reported %s but is not all zero" %
                          (source, off, off + length, NAMES.get(flags, flags)))
    if pos != size:
        errors.append("%s: extents end at %d, size %d" % (source, pos, size))
    for start, end, rule, why in rules:
        for off, length, flags in exts:
            if off < end and start < off + length and not ok(rule, flags):
                errors.append("%s: [%d, %d) reported %s, expected %s (%s)" %
                              (source, off, off + length,
                               NAMES.get(flags, flags), rule, why))
    return errors

errors = []
m = json.load(open(mapfile))
errors += check([(e["offset"], e["length"], e["type"]) for e in m], "nbdinfo --map")

h = connect(uri)
errors += check(extents(h, size), "block_status")

# Queries that start in the middle of things, one extent at a time.
for start, end, rule, why in rules:
    for off in (start, (start + end) // 2 + 1):
        got = []
        def cb(ctx, o, entries, err):
            if ctx == nbd.CONTEXT_BASE_ALLOCATION:
                got.append((o, list(entries)))
            return 0
        h.block_status(min(65536, size - off), off, cb, nbd.CMD_FLAG_REQ_ONE)
        if len(got) != 1 or got[0][0] != off or len(got[0][1]) != 2 or got[0][1][0] == 0:
            errors.append("block_status REQ_ONE at %d: %r" % (off, got))
            continue
        length, flags = got[0][1]
        if not ok(rule, flags):
            errors.append("block_status REQ_ONE at %d: %s, expected %s (%s)" %
                          (off, NAMES.get(flags, flags), rule, why))
        if flags & ZERO and any(model[off:off + length]):
            errors.append("block_status REQ_ONE at %d: zero, but data there" % off)
h.shutdown()
if errors:
    print("\n".join(errors[:30]), file=sys.stderr)
    sys.exit(1)
EOF
}

check_copies ()
{
    local uri=$1
    rm -f "$tmpdir/copy.raw" "$tmpdir/copy2.raw" "$tmpdir/conv.qcow2"
    nbdcopy "$uri" "$tmpdir/copy.raw" || fail "nbdcopy"
    cmp "$tmpdir/copy.raw" "$expected" || fail "nbdcopy output differs"
    # Into a sparse file: whatever is reported zero is not written at all.
    truncate -s "$size" "$tmpdir/copy2.raw"
    nbdcopy --destination-is-zero "$uri" "$tmpdir/copy2.raw" ||
        fail "nbdcopy --destination-is-zero"
    cmp "$tmpdir/copy2.raw" "$expected" ||
        fail "nbdcopy --destination-is-zero output differs"
    qemu-img convert -f raw "$uri" -O qcow2 "$tmpdir/conv.qcow2" ||
        fail "qemu-img convert from the export"
    qemu-img compare -q -f qcow2 -F raw "$tmpdir/conv.qcow2" "$expected" ||
        fail "qemu-img convert output differs"
    rm -f "$tmpdir/copy.raw" "$tmpdir/copy2.raw" "$tmpdir/conv.qcow2"
}

for cs in 64K 4K; do
    ov=$tmpdir/overlay-$cs.qcow2
    note "cluster size $cs"
    start_server ext base="$base" overlay="$ov" cluster-size=$cs
    uri=$(server_uri ext)
    "$PYTHON" - "$uri" "$base" "$expected" <<'EOF'
import os, random, sys
sys.path.insert(0, os.environ["testsdir"])
from cowtest import connect, read_all, check_equal
uri, base, expected = sys.argv[1:]
U, K = 256 * 1024, 1024
h = connect(uri)
model = bytearray(open(base, "rb").read())
check_equal(read_all(h), model, 0, "sparse base through the export")
rng = random.Random(4)
def write(off, data):
    h.pwrite(data, off)
    model[off:off + len(data)] = data
def zero(off, n):
    h.zero(n, off)
    model[off:off + n] = bytes(n)
write(20 * U, rng.randbytes(64 * K))
write(30 * U + 5, rng.randbytes(100))
zero(1 * U, 64 * K)
zero(40 * U, 128 * K)
h.trim(64 * K, 63 * U)
model[63 * U:63 * U + 64 * K] = bytes(64 * K)
zero(63 * U + 128 * K + 7, 1000)
h.trim(100, 10 * U + 4 * K + 10)   # inside one cluster: ignored
h.flush()
open(expected, "wb").write(model)
check_equal(read_all(h), model, 0, "export after writing")
EOF
    check_map "$uri"
    check_copies "$uri"
    stop_server ext
    check_image "$ov"

    if [ "$cs" = 64K ]; then
        note "cluster size $cs, after a restart"
        start_server ext base="$base" overlay="$ov"
        check_map "$uri"
        check_copies "$uri"
        stop_server ext
        check_image "$ov"
    fi
    qemu-img compare -q -f qcow2 -F raw "$ov" "$expected" ||
        fail "qemu-img compare: overlay differs"
    [ "$(sha256 "$base")" = "$base_sum" ] || fail "the base was modified"
done

note "pass"
