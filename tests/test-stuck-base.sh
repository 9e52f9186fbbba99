#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# A remote base that stops answering (DESIGN.md invariant 10): a second
# nbdkit serves the base through the delay filter with a 120 s delay on
# every read, and cowchain has base-timeout=12 (the drain bound of chain
# changes is 10 s).  While one guest read hangs on the base:
#   - reads, writes and FLUSH of what the overlay holds keep being
#     answered within 2 s (a chain change's wait does not freeze the disk);
#   - a snapshot requested meanwhile fails after about 10 s with "did not
#     drain", and leaves no layer file and no name behind;
#   - the hung read fails with EIO after about 12 s, the server log names
#     the base and the timeout, and a snapshot then works at once.
# Then the base comes back without the delay on the same socket: a base
# read works again (the dropped connection reconnects), the whole disk
# reads as the model, and every layer passes qemu-img check.  Bad
# base-timeout values stop nbdkit from starting with a message, and so
# does a base that accepts the connection but never does the handshake
# (within the timeout, not forever).
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit qemu-img
requires_python_nbd

cow=$abs_top_builddir/cowchain
size=$(( 16 * 1024 * 1024 ))
base=$tmpdir/base.raw
state=$tmpdir/state
ctl=$tmpdir/cow.ctl
base_sock=$tmpdir/base.sock
base_uri="nbd+unix:///?socket=$base_sock"
make_random_file "$base" "$size" 11

#----------------------------------------------------------------------
note "bad base-timeout values are refused"
for v in abc -1 1e9 0.0001 '' 0x5 inf ' 5'; do
    expect_start_failure bad base="$base" state="$tmpdir/bad" \
        base-timeout="$v"
    grep -q "base-timeout: '$v' is not a number of seconds" \
        "$(server_log bad)" || fail "base-timeout=$v: no clear message"
done
[ ! -e "$tmpdir/bad/manifest" ] || fail "a refused start created a manifest"

#----------------------------------------------------------------------
note "a base that accepts but never does the handshake: start fails in time"
mute_sock=$tmpdir/mute-base.sock  # not mute.sock: the server NAME's socket
"$PYTHON" -c '
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(8)
time.sleep(120)' "$mute_sock" &
mute_pid=$!
on_exit "kill -KILL $mute_pid 2>/dev/null"
for (( i = 0; i < 600; i++ )); do [ -S "$mute_sock" ] && break; sleep 0.05; done
[ -S "$mute_sock" ] || fail "the mute listener did not start"
t0=$SECONDS
expect_start_failure mute base="nbd+unix:///?socket=$mute_sock" \
    state="$tmpdir/mute" base-timeout=1.5
grep -q "the handshake did not finish within the base timeout" \
    "$(server_log mute)" || fail "no clear message for a mute base"
(( SECONDS - t0 < 20 )) || fail "a mute base held the start for $(( SECONDS - t0 )) s"
kill -KILL "$mute_pid" 2>/dev/null || :

#----------------------------------------------------------------------
# The base server (a plain nbdkit, never the sanitizer build).

# start_base [SECONDS]: with a delay of SECONDS on every read.
start_base ()
{
    if [ $# = 0 ]; then
        start_base_server "$base_sock" "$tmpdir/base.log" file "$base"
    else
        start_base_server "$base_sock" "$tmpdir/base.log" --filter=delay \
            file "$base" delay-read="$1"
    fi
}
on_exit kill_base

start_base 120

#----------------------------------------------------------------------
note "a read hangs on the base: the rest of the disk goes on"
start_server cow base="$base_uri" state="$state" base-timeout=12 \
    control="$ctl"
uri=$(server_uri cow)

COWCHAIN_CONTROL=$ctl tmpdir=$tmpdir "$PYTHON" - "$uri" "$cow" "$base" <<'EOF'
import errno, os, subprocess, sys, threading, time
sys.path.insert(0, os.environ["testsdir"])
import nbd
from cowtest import connect, check_equal

uri, cow, base = sys.argv[1], sys.argv[2], sys.argv[3]
MiB = 1 << 20
h = connect(uri)

# The overlay holds [0, 2M): whole clusters, so no write reads the base.
model = bytearray(open(base, "rb").read()[:2 * MiB])
for off in range(0, 2 * MiB, 256 << 10):
    data = bytes([off >> 18 & 255]) * (256 << 10)
    h.pwrite(data, off)
    model[off:off + len(data)] = data
h.flush()

stuck = {}
def stuck_read():
    hh = connect(uri)
    t = time.monotonic()
    try:
        hh.pread(65536, 8 * MiB)
        stuck["result"] = "answered"
    except nbd.Error as e:
        stuck["result"] = e.errno
    stuck["time"] = time.monotonic() - t

snap = {}
def snapshot(name, into):
    t = time.monotonic()
    p = subprocess.run([cow, "snapshot", name], capture_output=True,
                       text=True)
    into["rc"], into["err"] = p.returncode, p.stderr
    into["time"] = time.monotonic() - t

r = threading.Thread(target=stuck_read)
r.start()
time.sleep(0.5)
s = threading.Thread(target=snapshot, args=("s1", snap))
s.start()

# Overlay I/O and FLUSH while the snapshot waits and the read hangs.
worst = {"read": 0, "write": 0, "flush": 0}
def timed(kind, fn, *args):
    t = time.monotonic()
    out = fn(*args)
    worst[kind] = max(worst[kind], time.monotonic() - t)
    return out
i = 0
while s.is_alive():
    off = (i * 4096 * 7) % (2 * MiB - 4096)
    data = bytes([i & 255]) * 4096
    timed("write", h.pwrite, data, off)
    model[off:off + 4096] = data
    check_equal(timed("read", h.pread, 65536, (i * 65536) % (2 * MiB)),
                model[(i * 65536) % (2 * MiB):][:65536],
                (i * 65536) % (2 * MiB), "overlay read")
    if i % 10 == 0:
        timed("flush", h.flush)
    i += 1
    time.sleep(0.01)
print("overlay I/O during the wait: %d rounds, worst %r" % (i, worst))
for kind, t in worst.items():
    assert t < 2.0, "%s took %.2f s while a base read hung" % (kind, t)
assert i > 50, "only %d rounds of overlay I/O in 10 s" % i

assert snap["rc"] != 0, "the snapshot succeeded behind a hung base read"
assert "did not drain within 10 s" in snap["err"], snap["err"]
assert 9.5 <= snap["time"] <= 14, "the snapshot failed after %.1f s" % snap["time"]
print("snapshot: %.1f s: %s" % (snap["time"], snap["err"].strip()))

r.join()
assert stuck["result"] in (errno.EIO, "EIO"), "hung read: %r" % stuck
assert 11.5 <= stuck["time"] <= 16, "hung read failed after %.1f s" % stuck["time"]
print("hung read: EIO after %.1f s" % stuck["time"])

# Nothing stuck any more: a snapshot works at once.
snap2 = {}
snapshot("s2", snap2)
assert snap2["rc"] == 0, snap2["err"]
assert snap2["time"] < 3, "snapshot took %.1f s" % snap2["time"]
h.pwrite(b"\x77" * 65536, MiB)
model[MiB:MiB + 65536] = b"\x77" * 65536
h.flush()
open(os.environ["tmpdir"] + "/model", "wb").write(model)
EOF

grep -q "base.sock: read of 65536 bytes at offset 8388608 got no answer within the base timeout of 12 s" \
    "$(server_log cow)" || fail "the server log does not name the base and the timeout"
layers=$(COWCHAIN_CONTROL=$ctl "$cow" list)
echo "$layers"
grep -q s2 <<< "$layers" || fail "snapshot s2 missing"
! grep -q s1 <<< "$layers" || fail "the failed snapshot s1 is listed"
n_files=$(find "$state" -name '*.qcow2' | wc -l)
[ "$n_files" = 2 ] || fail "$n_files layer files, expected 2 (the failed snapshot left one?)"

#----------------------------------------------------------------------
note "the base answers again: the next base read reconnects"
kill_base
start_base
"$PYTHON" - "$uri" "$base" "$tmpdir/model" <<'EOF'
import os, sys, time
sys.path.insert(0, os.environ["testsdir"])
from cowtest import connect, read_all, check_equal

uri, base, model = sys.argv[1], sys.argv[2], sys.argv[3]
expected = bytearray(open(base, "rb").read())
head = open(model, "rb").read()
expected[:len(head)] = head
h = connect(uri)
t = time.monotonic()
check_equal(h.pread(65536, 8 << 20), expected[8 << 20:(8 << 20) + 65536],
            8 << 20, "base read after the base came back")
assert time.monotonic() - t < 5, "the base read took %.1f s" % (time.monotonic() - t)
check_equal(read_all(h), bytes(expected), 0, "the whole disk")
EOF

#----------------------------------------------------------------------
note "the base server stops gracefully and another takes its socket"
# nbdkit on SIGTERM keeps its clients' connections open and answers
# ESHUTDOWN until they leave: cowchain must leave for the new server.
old_base=$base_pid
on_exit "kill -KILL $old_base 2>/dev/null"
kill -TERM "$old_base"
sleep 0.5
base_pid=
start_base
"$PYTHON" - "$uri" "$base" <<'EOF'
import os, sys, time
sys.path.insert(0, os.environ["testsdir"])
from cowtest import connect, check_equal

uri, base = sys.argv[1], sys.argv[2]
want = open(base, "rb").read()[12 << 20:(12 << 20) + 65536]
h = connect(uri)
t = time.monotonic()
check_equal(h.pread(65536, 12 << 20), want, 12 << 20,
            "base read after the base server was replaced")
assert time.monotonic() - t < 5, "the base read took %.1f s" % (time.monotonic() - t)
EOF
kill -KILL "$old_base" 2>/dev/null || :
stop_server cow

for f in "$state"/*.qcow2; do
    check_image "$f"
done
