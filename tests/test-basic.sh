#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The basics: serve a raw base through a new overlay; reads equal the
# base; write, zero and trim; the overlay is a valid qcow2 v3 file whose
# backing file is the base, qemu-img check is clean, qemu-img compare and
# qemu-io see what NBD saw, and the base is never written.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit qemu-img qemu-io
requires_python_nbd

size=$(( 32 * 1024 * 1024 ))
base=$tmpdir/base.raw
ov=$tmpdir/overlay.qcow2
expected=$tmpdir/expected.raw
make_random_file "$base" "$size" 1
base_sum=$(sha256 "$base")

start_server basic base="$base" overlay="$ov"
[ -f "$ov" ] || fail "the overlay was not created"
uri=$(server_uri basic)

note "reads equal the base; write, zero, trim"
"$PYTHON" - "$uri" "$base" "$expected" <<'EOF'
import random, sys, os
sys.path.insert(0, os.environ["testsdir"])
import nbd
from cowtest import connect, read_all, check_equal

uri, base, expected = sys.argv[1:]
h = connect(uri)
model = bytearray(open(base, "rb").read())
size = len(model)

assert h.get_size() == size, "size %d, expected %d" % (h.get_size(), size)
assert not h.is_read_only(), "export is read-only"
for what, ok in [("flush", h.can_flush()), ("fua", h.can_fua()),
                 ("multi-conn", h.can_multi_conn()), ("trim", h.can_trim()),
                 ("zero", h.can_zero())]:
    assert ok, "server does not advertise %s" % what
mn = h.get_block_size(nbd.SIZE_MINIMUM)
pref = h.get_block_size(nbd.SIZE_PREFERRED)
assert mn == 1, "minimum block size %d, expected 1" % mn
assert pref == 65536, "preferred block size %d, expected 65536" % pref

check_equal(read_all(h), model, 0, "export before any write")
# Odd-sized reads at odd places.
for off, n in [(0, 1), (65535, 2), (12345, 100000), (size - 1, 1),
               (size - 70000, 70000)]:
    check_equal(h.pread(n, off), model[off:off + n], off, "read")

rng = random.Random(2)
def write(off, data, flags=0):
    h.pwrite(data, off, flags)
    model[off:off + len(data)] = data
def zero(off, n, flags=0):
    h.zero(n, off, flags)
    model[off:off + n] = bytes(n)

write(0, b"A" * 4096)                          # pattern, for qemu-io -P
write(65535, b"\x42")                          # last byte of cluster 0
write(1048576 + 1000, rng.randbytes(100 * 1024))  # spans three clusters
write(2 * 1048576, b"C" * 65536)               # exactly one cluster
write(3 * 1048576 + 512, b"D" * 512, nbd.CMD_FLAG_FUA)
write(size - 512, b"E" * 512)                  # last sector
zero(8 * 1048576, 65536)                       # one whole cluster
zero(9 * 1048576 + 17, 1000)                   # part of a cluster
zero(10 * 1048576, 3 * 65536 + 4096)           # clusters and a tail
h.trim(65536, 16 * 1048576)                    # whole cluster: zero
model[16 * 1048576:16 * 1048576 + 65536] = bytes(65536)
h.trim(100, 17 * 1048576 + 5)                  # partial: left as it was
h.flush()

check_equal(read_all(h), model, 0, "export after writing")
open(expected, "wb").write(model)
h.shutdown()
EOF

stop_server basic

note "qemu-img info: overlay (qcow2 v3) -> base (raw)"
qemu-img info --backing-chain --output=json "$ov" > "$tmpdir/info.json"
"$PYTHON" - "$tmpdir/info.json" "$ov" "$base" "$size" <<'EOF'
import json, os, sys
info, ov, base, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
chain = json.load(open(info))
def fail(msg):
    print(json.dumps(chain, indent=2), file=sys.stderr)
    sys.exit("FAIL: " + msg)
if len(chain) != 2:
    fail("backing chain has %d images, expected 2" % len(chain))
top, bottom = chain
if os.path.realpath(top["filename"]) != os.path.realpath(ov):
    fail("top of chain is %s" % top["filename"])
if top["format"] != "qcow2":
    fail("overlay format %s" % top["format"])
if top["virtual-size"] != size:
    fail("overlay virtual size %d, expected %d" % (top["virtual-size"], size))
if top.get("cluster-size") != 65536:
    fail("default cluster size is %s, expected 65536" % top.get("cluster-size"))
data = top.get("format-specific", {}).get("data", {})
if data.get("compat") != "1.1":
    fail("overlay compat %s, expected 1.1 (qcow2 v3)" % data.get("compat"))
if data.get("refcount-bits") != 16:
    fail("refcount bits %s, expected 16" % data.get("refcount-bits"))
if top.get("backing-filename-format") != "raw":
    fail("backing format %s, expected raw" % top.get("backing-filename-format"))
full = top.get("full-backing-filename")
if not full or os.path.realpath(full) != os.path.realpath(base):
    fail("backing file %s, expected %s" % (full, base))
if os.path.realpath(bottom["filename"]) != os.path.realpath(base):
    fail("bottom of chain is %s" % bottom["filename"])
if bottom["format"] != "raw":
    fail("base format %s" % bottom["format"])
EOF

note "qemu-img check, qemu-img compare"
check_image "$ov"
qemu-img compare -q -f qcow2 -F raw "$ov" "$expected" ||
    fail "qemu-img compare: overlay differs from the expected image"
rc=0
qemu-img compare -q -f qcow2 -F raw "$ov" "$base" || rc=$?
[ "$rc" -eq 1 ] || fail "qemu-img compare overlay vs base: exit $rc, expected 1 (different)"
qemu-img convert -f qcow2 -O raw "$ov" "$tmpdir/converted.raw"
cmp "$tmpdir/converted.raw" "$expected" ||
    fail "qemu-img convert of the overlay differs from the expected image"
rm -f "$tmpdir/converted.raw"
[ "$(sha256 "$base")" = "$base_sum" ] || fail "the base was modified"

note "qemu-io reads the same as NBD"
qio ()
{
    qemu-io -f qcow2 -r "$ov" "$@" > "$tmpdir/qemu-io.out" 2>&1 || {
        cat "$tmpdir/qemu-io.out" >&2
        fail "qemu-io $*"
    }
    if grep -q -i -E 'fail|error' "$tmpdir/qemu-io.out"; then
        cat "$tmpdir/qemu-io.out" >&2
        fail "qemu-io $*"
    fi
}
qio -c 'read -P 0x41 0 4096' \
    -c 'read -P 0x42 65535 1' \
    -c 'read -P 0x43 2M 64k' \
    -c 'read -P 0x44 3146240 512' \
    -c "read -P 0x45 $(( size - 512 )) 512" \
    -c 'read -P 0 8M 64k' \
    -c 'read -P 0 9437201 1000' \
    -c 'read -P 0 10M 200704' \
    -c 'read -P 0 16M 64k'
# Mixed data: dump with qemu-io -v and compare with the expected bytes.
for range in "65500 100" "1049576 102400" "17825792 65536" "3146000 1100"; do
    set -- $range
    qemu-io -f qcow2 -r "$ov" -c "read -v $1 $2" > "$tmpdir/dump.out" ||
        fail "qemu-io read -v $1 $2"
    "$PYTHON" - "$tmpdir/dump.out" "$expected" "$1" "$2" <<'EOF' ||
import sys
dump, expected, off, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
got = bytearray()
for line in open(dump):
    # "%08x:  xx xx ... xx  ascii": 16 bytes a line at fixed columns.
    if len(line) > 10 and line[8] == ":" and line[9:11] == "  ":
        for i in range(16):
            tok = line[11 + 3 * i:13 + 3 * i]
            if len(tok) < 2 or tok.strip() != tok:
                break
            try:
                got.append(int(tok, 16))
            except ValueError:
                break
with open(expected, "rb") as f:
    f.seek(off)
    want = f.read(n)
if bytes(got) != want:
    sys.exit("qemu-io read -v %d %d: %d bytes, differs from NBD" % (off, n, len(got)))
EOF
    fail "qemu-io sees different data at $1+$2"
done

note "restart on the existing overlay; also cluster-size=4K for a new one"
start_server basic base="$base" overlay="$ov"
nbdsh -u "$(server_uri basic)" -c "
import hashlib
buf = bytearray()
off = 0
while off < h.get_size():
    n = min(4 << 20, h.get_size() - off)
    buf += h.pread(n, off)
    off += n
d = hashlib.sha256(buf).hexdigest()
assert d == '$(sha256 "$expected")', 'export differs after restart'
"
stop_server basic
check_image "$ov"

ov4k=$tmpdir/overlay-4k.qcow2
start_server b4k base="$base" overlay="$ov4k" cluster-size=4K
nbdsh -u "$(server_uri b4k)" -c '
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096, h.get_block_size(nbd.SIZE_PREFERRED)
h.pwrite(b"x" * 5000, 4000)
h.flush()
'
stop_server b4k
check_image "$ov4k"
[ "$(img_info "$ov4k" cluster-size)" = 4096 ] || fail "cluster-size=4K not honoured"
qemu-io -f qcow2 -r "$ov4k" -c 'read -P 0x78 4000 5000' > "$tmpdir/qemu-io.out" ||
    fail "cluster-size=4K overlay: data not read back by qemu-io"
[ "$(sha256 "$base")" = "$base_sum" ] || fail "the base was modified"

note "pass"
