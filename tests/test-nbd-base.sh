#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# A remote NBD base: cowchain serves base=nbd+unix:///?socket=base.sock
# (a second nbdkit serving a raw file read-only) with a local qcow2
# overlay.  Reads equal the base, writes land in the overlay only, the
# overlay records the URI as its backing file, and a restart finds it.
# Then the base goes away: reads of unwritten areas fail with EIO, written
# areas still read, writes that need the base fail without changing the
# overlay, the server stays up, and it recovers (reconnects) when the base
# comes back, also after nbdkit has forked into the background.  A base
# URI with no server behind it, or a malformed one, stops nbdkit from
# starting with a message naming the URI.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit qemu-img
requires_python_nbd

size=$(( 64 * 1024 * 1024 ))
data_size=$(( 48 * 1024 * 1024 ))   # the last 16M of the base are a hole
base=$tmpdir/base.raw
ov=$tmpdir/ov.qcow2
expected=$tmpdir/expected.raw
inject=$tmpdir/inject-base-error

# The relative socket path is on purpose: the overlay stores the URI as
# given, and the engine has to resolve it itself (nbdkit without -f
# changes to / before it reconnects).
cd "$tmpdir"
base_uri="nbd+unix:///?socket=base.sock"

make_random_file "$base" "$data_size" 7
truncate -s "$size" "$base"
base_sum=$(sha256 "$base")

#----------------------------------------------------------------------
# The base server: a plain nbdkit (never the sanitizer build) serving the
# file read-only, with a small maximum and a non-trivial minimum block
# size so that cowchain has to split and align its reads, and an error
# filter that answers every read with EIO while $inject exists.

start_base ()
{
    start_base_server "$tmpdir/base.sock" "$tmpdir/base.log" \
        --filter=blocksize-policy --filter=error \
        file "$base" \
        blocksize-minimum=512 blocksize-maximum=256K \
        blocksize-error-policy=error \
        error-pread=EIO error-pread-rate=100% error-pread-file="$inject"
}
on_exit kill_base

start_base

#----------------------------------------------------------------------
note "serve the remote base; reads equal it, writes land in the overlay"
start_server cow base="$base_uri" overlay="$ov"
[ -f "$ov" ] || fail "the overlay was not created"
uri=$(server_uri cow)

"$PYTHON" - "$uri" "$base" "$expected" "$data_size" <<'EOF'
import os, random, sys, threading
sys.path.insert(0, os.environ["testsdir"])
import nbd
from cowtest import connect, read_all, check_equal, extents

uri, base, expected, data_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
h = connect(uri)
model = bytearray(open(base, "rb").read())
size = len(model)
assert h.get_size() == size, "size %d, expected %d" % (h.get_size(), size)

# Large reads (split at the base's 256K maximum) and odd ones (widened to
# its 512-byte minimum).
check_equal(read_all(h), model, 0, "export before any write")
for off, n in [(0, 1), (511, 2), (12345, 100000), (size - 1, 1),
               (data_size - 700, 1400), (size - 70000, 70000),
               (3 << 20, 32 << 20)]:
    check_equal(h.pread(n, off), model[off:off + n], off, "read")

# Block status through to the base: data, then the hole at the end.
ext = extents(h)
hole = [e for e in ext if e[2] & nbd.STATE_ZERO]
assert hole and hole[0][0] == data_size and hole[-1][0] + hole[-1][1] == size, \
    "base hole not reported: %r" % ext
assert all(not (e[2] & nbd.STATE_ZERO) for e in ext if e[0] < data_size), \
    "data of the base reported as zero: %r" % ext

rng = random.Random(3)
def write(off, data):
    h.pwrite(data, off)
    model[off:off + len(data)] = data
def zero(off, n):
    h.zero(n, off)
    model[off:off + n] = bytes(n)

write(100, b"a" * 200)                          # partial cluster: COW
write(65536 * 3 - 10, rng.randbytes(150000))    # spans clusters, COW at ends
write(2 << 20, b"C" * 65536)                    # one whole cluster
zero(5 << 20, 3 * 65536 + 1000)                 # whole clusters and a tail
write(data_size - 300, rng.randbytes(600))      # across data and hole
h.flush()
check_equal(read_all(h), model, 0, "export after writing")

# Several connections reading at once (the base's connection pool).
errors = []
def reader(seed):
    try:
        hh = connect(uri)
        r = random.Random(seed)
        for _ in range(200):
            off = r.randrange(size)
            n = min(r.randrange(1, 300000), size - off)
            check_equal(hh.pread(n, off), model[off:off + n], off,
                        "parallel read")
        hh.shutdown()
    except Exception as e:
        errors.append(e)
ts = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
for t in ts: t.start()
for t in ts: t.join()
if errors:
    raise errors[0]

open(expected, "wb").write(model)
h.shutdown()
EOF

[ "$(sha256 "$base")" = "$base_sum" ] || fail "the base file was changed"

# nbdkit 1.32 itself leaks 280 bytes for every connection QEMU's NBD
# client makes (also with its memory plugin), which LeakSanitizer would
# blame on the server; the sanitizer build compares with Python only.
if [ "$COWCHAIN_SANITIZERS" != 1 ]; then
    note "qemu-img compare of the served disk against the expected image"
    qemu-img compare -q -f raw -F raw "$uri" "$expected" ||
        fail "qemu-img compare: the served disk differs from the expected image"
fi

stop_server cow

note "qemu-img info: the overlay's backing file is the URI"
[ "$(img_info "$ov" backing-filename)" = "$base_uri" ] ||
    fail "backing file is '$(img_info "$ov" backing-filename)', expected '$base_uri'"
[ "$(img_info "$ov" backing-filename-format)" = raw ] ||
    fail "backing format is '$(img_info "$ov" backing-filename-format)', expected raw"
check_image "$ov"
# QEMU's own NBD client follows the URI (from this directory) to the base.
qemu-img compare -q -f qcow2 -F raw "$ov" "$expected" ||
    fail "qemu-img compare: overlay + base differ from the expected image"
[ "$(sha256 "$base")" = "$base_sum" ] || fail "the base file was changed"

#----------------------------------------------------------------------
note "restart on the existing overlay; a different base URI is refused"
expect_start_failure wrong base="nbd+unix:///other?socket=base.sock" overlay="$ov"
grep -q "is not the configured base" "$(server_log wrong)" ||
    fail "no clear message for an overlay of another base"

start_server cow base="$base_uri" overlay="$ov"
"$PYTHON" - "$uri" "$expected" <<'EOF'
import os, sys
sys.path.insert(0, os.environ["testsdir"])
from cowtest import connect, read_all, check_equal
uri, expected = sys.argv[1:]
h = connect(uri)
check_equal(read_all(h), open(expected, "rb").read(), 0, "after restart")
h.shutdown()
EOF

#----------------------------------------------------------------------
note "the base answers reads with EIO: reads fail, the server stays up"
touch "$inject"
"$PYTHON" - "$uri" "$expected" <<'EOF'
import errno, os, sys
sys.path.insert(0, os.environ["testsdir"])
import nbd
from cowtest import connect, check_equal
uri, expected = sys.argv[1:]
model = open(expected, "rb").read()
h = connect(uri)
try:
    h.pread(4096, 8 << 20)
    raise AssertionError("read of an unwritten area succeeded")
except nbd.Error as e:
    # The module gives the errno's name ("EIO") or number.
    assert e.errno in ("EIO", errno.EIO), "errno %r, expected EIO" % e.errno
check_equal(h.pread(65536, 2 << 20), model[2 << 20:(2 << 20) + 65536],
            2 << 20, "written cluster")
h.shutdown()
EOF
rm -f "$inject"
server_alive cow || fail "cowchain died on a base read error"
grep -q "failed: .*Input/output error" "$(server_log cow)" ||
    fail "no message for the base's read error"

#----------------------------------------------------------------------
note "kill the base server: the overlay still serves what it holds"
ov_sum_before=
"$PYTHON" - "$uri" <<'EOF'
import os, sys
sys.path.insert(0, os.environ["testsdir"])
from cowtest import connect
h = connect(sys.argv[1])
h.flush()
h.shutdown()
EOF
ov_sum_before=$(sha256 "$ov")
cp "$ov" "$tmpdir/ov.before"
kill -KILL "$base_pid"
wait "$base_pid" 2>/dev/null || :
base_pid=

"$PYTHON" - "$uri" "$expected" "$tmpdir/model-after.raw" <<'EOF'
import errno, os, sys
sys.path.insert(0, os.environ["testsdir"])
import nbd
from cowtest import connect, check_equal, extents
uri, expected, out = sys.argv[1:]
model = bytearray(open(expected, "rb").read())

def expect_eio(what, fn):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno in ("EIO", errno.EIO), "%s: errno %r, expected EIO (%s)" % (
            what, e.errno, e)
        return
    raise AssertionError("%s succeeded with the base gone" % what)

h = connect(uri)
# Areas the overlay holds: data, and zeroed clusters.
check_equal(h.pread(65536, 2 << 20), model[2 << 20:(2 << 20) + 65536],
            2 << 20, "written cluster")
check_equal(h.pread(3 * 65536, 5 << 20), bytes(3 * 65536), 5 << 20,
            "zeroed clusters")
# Areas only the base has.
expect_eio("read of an unwritten area", lambda: h.pread(4096, 8 << 20))
expect_eio("read across written and unwritten",
           lambda: h.pread(2 * 65536, (2 << 20) + 32768))
# A write that needs copy-on-write from the base fails, changing nothing.
expect_eio("partial-cluster write", lambda: h.pwrite(b"x" * 100, 9 << 20))
# (Partial subclusters too: whole ones need no copy-on-write.)
expect_eio("write with a partial last cluster",
           lambda: h.pwrite(b"y" * (65536 + 4000), 10 << 20))
expect_eio("write with a partial first cluster",
           lambda: h.pwrite(b"z" * (65536 + 4000), (11 << 20) - 4000))
h.flush()
# The server is still there for new clients too.
h.shutdown()
h = connect(uri)
check_equal(h.pread(200, 100), model[100:300], 100, "written bytes")
# Block status of what the overlay holds needs no base.
st = []
h.block_status(65536, 2 << 20,
               lambda ctx, off, ent, err: st.extend(ent) or 0)
assert st[:2] == [65536, 0], "block status of a written cluster: %r" % st
h.shutdown()
EOF
server_alive cow || fail "cowchain died when its base went away"
grep -q "$base_uri.*reconnecting failed" "$(server_log cow)" ||
    fail "no message naming the base and the failed reconnect"

note "nothing was written to the overlay by the failed writes"
"$PYTHON" - "$uri" <<'EOF'
import os, sys
sys.path.insert(0, os.environ["testsdir"])
from cowtest import connect
h = connect(sys.argv[1])
h.flush()
h.shutdown()
EOF
if [ "$(sha256 "$ov")" != "$ov_sum_before" ]; then
    ls -l "$tmpdir/ov.before" "$ov" >&2
    cmp -l "$tmpdir/ov.before" "$ov" 2>&1 | head -20 >&2 || :
    fail "the overlay file changed although every write failed (guest data of a write whose copy-on-write read failed reached the file)"
fi

#----------------------------------------------------------------------
note "whole-cluster writes need no base; the base comes back"
"$PYTHON" - "$uri" "$expected" <<'EOF'
import os, sys
sys.path.insert(0, os.environ["testsdir"])
from cowtest import connect, check_equal
uri, expected = sys.argv[1:]
model = bytearray(open(expected, "rb").read())
h = connect(uri)
data = bytes(range(256)) * 1024                     # 4 clusters
h.pwrite(data, 12 << 20)
model[12 << 20:(12 << 20) + len(data)] = data
h.zero(65536, 13 << 20)
model[13 << 20:(13 << 20) + 65536] = bytes(65536)
check_equal(h.pread(len(data), 12 << 20), data, 12 << 20, "new clusters")
h.flush()
h.shutdown()
open(expected, "wb").write(model)
EOF

start_base
"$PYTHON" - "$uri" "$expected" <<'EOF'
import os, sys
sys.path.insert(0, os.environ["testsdir"])
from cowtest import connect, read_all, check_equal
uri, expected = sys.argv[1:]
model = open(expected, "rb").read()
h = connect(uri)
check_equal(read_all(h), model, 0, "after the base came back")
# Parallel connections: every connection of the pool reconnects.
hs = [connect(uri) for _ in range(6)]
for i, hh in enumerate(hs * 3):
    off = (i * 7919 * 4096) % (len(model) - 65536)
    check_equal(hh.pread(65536, off), model[off:off + 65536], off, "read")
for hh in hs:
    hh.shutdown()
h.shutdown()
EOF
stop_server cow
check_image "$ov"
qemu-img compare -q -f qcow2 -F raw "$ov" "$expected" ||
    fail "qemu-img compare: overlay + base differ from the expected image"
[ "$(sha256 "$base")" = "$base_sum" ] || fail "the base file was changed"

#----------------------------------------------------------------------
# nbdkit without -f forks into the background and changes to /; the
# relative socket of the URI must still reach the base on a reconnect.
note "in the background (nbdkit without -f): reconnect after a base restart"
rm -f "$tmpdir/bg.sock" "$tmpdir/bg.pid"
env ${server_env[@]+"${server_env[@]}"} \
    nbdkit --log=stderr -U "$tmpdir/bg.sock" -P "$tmpdir/bg.pid" \
    "$COWCHAIN_PLUGIN" base="$base_uri" overlay="$ov" \
    </dev/null >>"$tmpdir/bg.log" 2>&1 ||
    fail "nbdkit (background) failed to start"
bg_pid=$(pidfile_pid "$tmpdir/bg.pid")
[ -n "$bg_pid" ] || fail "no pid file from the background nbdkit"
on_exit "kill -KILL $bg_pid 2>/dev/null"
[ "$(readlink "/proc/$bg_pid/cwd")" = / ] ||
    note "the background nbdkit did not change to / (test is weaker)"
kill_base
start_base
"$PYTHON" - "nbd+unix:///?socket=$tmpdir/bg.sock" "$expected" <<'EOF'
import os, sys
sys.path.insert(0, os.environ["testsdir"])
from cowtest import connect, read_all, check_equal
uri, expected = sys.argv[1:]
h = connect(uri)
check_equal(read_all(h), open(expected, "rb").read(), 0,
            "background server after a base restart")
h.shutdown()
EOF
kill -TERM "$bg_pid"
for (( i = 0; i < 1200; i++ )); do
    kill -0 "$bg_pid" 2>/dev/null || break
    sleep 0.05
done
kill -0 "$bg_pid" 2>/dev/null && fail "background nbdkit did not exit"
check_sanitizer_log "$tmpdir/bg.log"
check_image "$ov"

#----------------------------------------------------------------------
note "no server behind the URI, or a malformed URI: nbdkit refuses to start"
expect_start_failure nosrv base="nbd+unix:///?socket=$tmpdir/nothing.sock" \
    overlay="$tmpdir/new.qcow2"
grep -q "nbd+unix:///?socket=$tmpdir/nothing.sock: cannot connect to the NBD server: " \
    "$(server_log nosrv)" ||
    fail "no clear message for a base URI with no server"
[ ! -e "$tmpdir/new.qcow2" ] || fail "an overlay was created for a dead base"

expect_start_failure tcp base="nbd://127.0.0.1:1/" overlay="$tmpdir/new.qcow2"
grep -q "nbd://127.0.0.1:1/: cannot connect to the NBD server: " \
    "$(server_log tcp)" || fail "no clear message for a refused TCP base"

expect_start_failure baduri base="nbd+unix:///" overlay="$tmpdir/new.qcow2"
grep -q "nbd+unix:///: cannot connect to the NBD server: " \
    "$(server_log baduri)" || fail "no clear message for a malformed URI"
[ ! -e "$tmpdir/new.qcow2" ] || fail "an overlay was created for a bad base"

note "PASS"
