#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Snapshots while a guest writes: one disk, then two disks (vda, vdb) with
# atomic snapshots; every snapshot, read offline, is a consistent cut of
# the write log (tests/snapshot-writer.py).  Then oldstyle NBD (nbdkit -o,
# what QEMU 0.12 speaks) with sync=always: writes without flush, a
# snapshot, kill -9, restart: every answered write is there.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img qemu-io
requires_python_nbd

cow=$abs_top_builddir/cowchain
[ -x "$cow" ] || fail "cowchain tool not built: $cow"
truncate -s 8M "$tmpdir/a.img" "$tmpdir/b.img"

note "one disk"
start_server one base="$tmpdir/a.img" state="$tmpdir/one" control="$tmpdir/one.ctl"
"$PYTHON" "$testsdir/snapshot-writer.py" "$cow" "$tmpdir/one.ctl" \
    "$(server_uri one)" -- 3 6
stop_server one
for f in "$tmpdir"/one/layer-*.qcow2; do check_image "$f"; done

note "two disks, atomic snapshots"
start_server two control="$tmpdir/two.ctl" \
    disk=vda base="$tmpdir/a.img" state="$tmpdir/vda" \
    disk=vdb base="$tmpdir/b.img" state="$tmpdir/vdb"
COWCHAIN_CONTROL=$tmpdir/two.ctl "$cow" blklist > "$tmpdir/blk"
grep -q '^ vda .*vda/layer-' "$tmpdir/blk" && grep -q '^ vdb .*vdb/layer-' "$tmpdir/blk" ||
    { cat "$tmpdir/blk"; fail "blklist does not list vda and vdb"; }
"$PYTHON" "$testsdir/snapshot-writer.py" "$cow" "$tmpdir/two.ctl" \
    "nbd+unix:///vda?socket=$tmpdir/two.sock" \
    "nbd+unix:///vdb?socket=$tmpdir/two.sock" -- 3 6
stop_server two
for f in "$tmpdir"/vd?/layer-*.qcow2; do check_image "$f"; done

note "oldstyle NBD, sync=always, kill -9 after a snapshot"
start_server old -o sync=always base="$tmpdir/a.img" state="$tmpdir/old" \
    control="$tmpdir/old.ctl"
"$PYTHON" - "$tmpdir/old.sock" <<'PY'
import sys, nbd
h = nbd.NBD()
h.connect_unix(sys.argv[1])
assert h.get_protocol() == "oldstyle", h.get_protocol()
h.pwrite(b"\x5a" * 65536, 0)          # no flush: oldstyle clients never send one
PY
COWCHAIN_CONTROL=$tmpdir/old.ctl "$cow" snapshot old1
"$PYTHON" - "$tmpdir/old.sock" <<'PY'
import sys, nbd
h = nbd.NBD()
h.connect_unix(sys.argv[1])
h.pwrite(b"\xa5" * 4096, 1 << 20)
PY
crash_server old
start_server old2 state="$tmpdir/old"
"$PYTHON" - "$(server_uri old2)" <<'PY'
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
assert h.pread(65536, 0) == b"\x5a" * 65536, "write before the snapshot lost"
assert h.pread(4096, 1 << 20) == b"\xa5" * 4096, "write after the snapshot lost"
PY
stop_server old2
for f in "$tmpdir"/old/layer-*.qcow2; do check_image "$f" leaks-ok; done
