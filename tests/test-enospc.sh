#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Disk full: the overlay lives on a 4 MiB tmpfs, the base is 64 MiB.
# Write until the client gets an error: it must be ENOSPC; the server
# must stay up and keep answering reads; everything written (and answered
# with success) before must still read back, before and after a restart.
# Once space is freed, writes must work again.  qemu-img check may find
# leaked clusters afterwards, nothing worse.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

[ "$(id -u)" = 0 ] || skip "needs root to mount a small tmpfs"
requires nbdkit qemu-img mount umount
requires_python_nbd

size=$(( 64 * 1024 * 1024 ))
base=$tmpdir/base.raw
make_random_file "$base" "$size" 10
base_sum=$(sha256 "$base")

small=$tmpdir/small
mkdir "$small"
mount -t tmpfs -o size=4M tmpfs "$small" || fail "cannot mount a tmpfs"
on_exit "umount '$small'"
# 1 MiB of filler, to free later.
dd if=/dev/zero of="$small/filler" bs=1M count=1 status=none
ov=$small/overlay.qcow2
state=$tmpdir/state.pickle

start_server full base="$base" overlay="$ov"
"$PYTHON" - "$(server_uri full)" "$base" "$state" "$small/filler" <<'EOF' || fail "disk full handling"
import errno, os, pickle, random, sys
sys.path.insert(0, os.environ["testsdir"])
import nbd
from cowtest import connect, read_all, check_equal

uri, base, state, filler = sys.argv[1:]
model = bytearray(open(base, "rb").read())
rng = random.Random(12)
h = connect(uri)

def write(off, data, flags=0):
    h.pwrite(data, off, flags)
    model[off:off + len(data)] = data

# Flushed data first.
write(0, rng.randbytes(512 * 1024))
write(700 * 1024 + 3, rng.randbytes(5000))
h.zero(65536, 2 << 20)
model[2 << 20:(2 << 20) + 65536] = bytes(65536)
h.flush()

# Now fill the disk: 64 KiB writes into new clusters, some unaligned.
off = 4 << 20
failed = None
while off + 70000 < len(model):
    o = off + (rng.randrange(4096) if rng.random() < 0.3 else 0)
    data = rng.randbytes(65536)
    try:
        write(o, data)
    except nbd.Error as e:
        failed = (o, e)
        break
    off += 65536 * 2        # leave gaps: partial clusters are copied from the base
if failed is None:
    sys.exit("wrote %d MiB into a 4 MiB file system without an error" % (off >> 20))
o, e = failed
print("write at %d failed: %s" % (o, e))
if e.errnum != errno.ENOSPC:
    sys.exit("expected ENOSPC, got errno %s (%s)" % (e.errno, e))

# The server still answers, and everything answered with success is there.
# (The failed write's range may hold the old or new data, or a mixture.)
# (Up to a little past the failed write; the whole disk is compared
# after the restart.)
fail_lo, fail_hi = o, o + 65536
limit = min(len(model), fail_hi + (1 << 20))
got = bytearray(read_all(h, limit))
got[fail_lo:fail_hi] = model[fail_lo:fail_hi] = bytes(65536)
check_equal(got, model[:limit], 0, "export after ENOSPC")

# More writes into new clusters: an error must again be ENOSPC (some
# may fit in what is left), and the server lives on.
for i in range(3):
    try:
        write((40 << 20) + i * 131072, rng.randbytes(65536))
    except nbd.Error as e2:
        if e2.errnum != errno.ENOSPC:
            sys.exit("second write: expected ENOSPC, got %s" % e2)
        o2 = (40 << 20) + i * 131072
        got = h.pread(65536, o2)    # old, new or a mixture: take it
        model[o2:o2 + 65536] = got
try:
    h.flush()
except nbd.Error as e3:
    print("flush on a full file system: %s (acceptable)" % e3)

# Overwriting data already allocated needs no new space.
write(1000, rng.randbytes(3000))

# Free space: writes work again, including where it failed.
os.unlink(filler)
write(o, rng.randbytes(65536))
write(50 << 20, rng.randbytes(100000))
h.flush()
check_equal(read_all(h, limit), model[:limit], 0, "export after freeing space")
for off in (40 << 20, 50 << 20):
    check_equal(h.pread(1 << 20, off), model[off:off + (1 << 20)], off,
                "export after freeing space")
with open(state, "wb") as f:
    pickle.dump(model, f)
h.shutdown()
EOF
server_alive full || fail "the server died"
stop_server full
check_image "$ov" leaks-ok

note "restart: everything is still there"
start_server full base="$base" overlay="$ov"
"$PYTHON" - "$(server_uri full)" "$state" <<'EOF' || fail "data lost after restart"
import os, pickle, sys
sys.path.insert(0, os.environ["testsdir"])
from cowtest import connect, read_all, check_equal
uri, state = sys.argv[1:]
model = pickle.load(open(state, "rb"))
h = connect(uri)
check_equal(read_all(h), model, 0, "export after restart")
EOF
stop_server full
check_image "$ov" leaks-ok
[ "$(sha256 "$base")" = "$base_sum" ] || fail "the base was modified"
note "pass"
