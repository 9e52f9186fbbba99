#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Bad input: nbdkit must refuse to start, with an error that names the
# problem (for a damaged refcount table: which fault it is), and nothing
# on disk may change (no overlay created, the base and any existing
# overlay byte for byte the same, no stray files).
# Then requests beyond the end of the disk: an error, and the server
# lives on.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit qemu-img
requires_python_nbd

size=$(( 2 * 1024 * 1024 ))
img=$tmpdir/img
mkdir "$img"
base=$img/base.raw
other=$img/other.raw
make_random_file "$base" "$size" 7
make_random_file "$other" "$size" 8

# snapshot: every file under $img with its type, size, mode, and
# modification and change times to the nanosecond (any write, truncate or
# chmod changes the change time).
snapshot ()
{
    find "$img" -printf '%P %y %s %m %T@ %C@\n' | sort
}

n=0
# refuse PATTERN ARGS...: the server must refuse to start with ARGS, its
# stderr must match PATTERN (grep -i -E), and nothing under $img changes.
refuse ()
{
    local pattern=$1; shift
    n=$(( n + 1 ))
    local before after
    before=$(snapshot)
    expect_start_failure bad$n "$@"
    after=$(snapshot)
    if [ "$before" != "$after" ]; then
        diff <(echo "$before") <(echo "$after") >&2 || :
        fail "nbdkit $*: files changed"
    fi
    if ! grep -q -i -E -e "$pattern" "$(server_log bad$n)"; then
        cat "$(server_log bad$n)" >&2
        fail "nbdkit $*: the error does not mention '$pattern'"
    fi
    echo "refused as expected: $*: $(grep -i -m1 -E -e "$pattern" "$(server_log bad$n)")"
}

ov=$img/overlay.qcow2

note "unknown key, missing or empty required keys"
refuse frobnicate base="$base" overlay="$ov" frobnicate=1
refuse base overlay="$ov"
refuse base base= overlay="$ov"
refuse overlay base="$base"
refuse overlay base="$base" overlay=

note "missing base, base a directory"
refuse nonexistent.raw base="$img/nonexistent.raw" overlay="$ov"
mkdir "$img/adir"
refuse adir base="$img/adir" overlay="$ov"

note "bad cluster-size values"
for cs in 0 256 3K 4M abc ''; do
    refuse cluster-size base="$base" overlay="$ov" "cluster-size=$cs"
done

note "bad sync, base-format and cache-size values"
for v in bogus 100ms; do
    refuse sync base="$base" overlay="$ov" "sync=$v"
done
refuse base-format base="$base" overlay="$ov" base-format=bogus
refuse cache-size base="$base" overlay="$ov" cache-size=bogus

note "an existing overlay over a different image"
qemu-img create -q -f qcow2 -b "$other" -F raw "$ov"
refuse "overlay|backing|other.raw|base.raw" base="$base" overlay="$ov"
rm -f "$ov"
# One the plugin made itself, for a base of the same size and a
# different content.
start_server mk base="$other" overlay="$ov"
nbdsh -u "$(server_uri mk)" -c 'h.pwrite(b"x" * 4096, 0); h.flush()'
stop_server mk
refuse "overlay|backing|other.raw|base.raw" base="$base" overlay="$ov"
rm -f "$ov"
# A qcow2 file with no backing file at all.
qemu-img create -q -f qcow2 "$ov" "$size"
refuse "overlay|backing" base="$base" overlay="$ov"
rm -f "$ov"

note "an overlay that is not a qcow2 file, or a damaged one"
refuse base.raw base="$base" overlay="$base"         # the base itself
make_random_file "$ov" 1048576 9
refuse overlay.qcow2 base="$base" overlay="$ov"
rm -f "$ov"
for damage in cluster_bits=0x28 l1_size=0x7fffffff version=4 \
              incompatible_features=0x8000000000000000 \
              l1_table_offset=0x201 refcount_order=7; do
    qemu-img create -q -f qcow2 -b "$base" -F raw "$ov"
    qcow2_patch "$ov" "$damage"
    refuse overlay.qcow2 base="$base" overlay="$ov"
    rm -f "$ov"
done
# The refcount table: each fault is named for what it is.
for damage in "refcount_table_offset=0x100000:runs past the end of the file" \
              "refcount_table_clusters=16:runs past the end of the file" \
              "refcount_table_offset=0x10200:not aligned to the cluster size" \
              "refcount_table_clusters=0:refcount table is empty"; do
    qemu-img create -q -f qcow2 -b "$base" -F raw "$ov"
    qcow2_patch "$ov" "${damage%%:*}"
    refuse "overlay.qcow2: .*${damage#*:}" base="$base" overlay="$ov"
    rm -f "$ov"
done
qemu-img create -q -f qcow2 -b "$base" -F raw "$ov"
truncate -s 50 "$ov"
refuse overlay.qcow2 base="$base" overlay="$ov"
rm -f "$ov"

note "overlay in a read-only directory"
mkdir "$img/ro"
if [ "$(id -u)" = 0 ]; then
    mount -t tmpfs -o ro,size=1M tmpfs "$img/ro" ||
        fail "cannot mount a read-only tmpfs (running as root)"
    on_exit "umount '$img/ro'"
    refuse "ro/overlay.qcow2|read-only" base="$base" overlay="$img/ro/overlay.qcow2"
    umount "$img/ro"
    mount | grep -q " $img/ro " && fail "cannot unmount $img/ro"
fi

# The permission cases need an unprivileged server: as root, run it as
# nobody (root reads and writes regardless of permissions).
unprivileged=
if [ "$(id -u)" != 0 ]; then
    unprivileged=yes
elif command -v setpriv >/dev/null &&
     setpriv --reuid=65534 --regid=65534 --clear-groups \
         test -r "$COWCHAIN_PLUGIN"; then
    server_wrapper=(setpriv --reuid=65534 --regid=65534 --clear-groups)
    chmod 1777 "$tmpdir"
    chmod 755 "$img"
    chmod 644 "$base"
    unprivileged=yes
    # Check that nbdkit can work as nobody at all before blaming the plugin.
    mkdir -m 1777 "$img/rw"
    start_server nobody base="$base" overlay="$img/rw/overlay.qcow2"
    nbdsh -u "$(server_uri nobody)" -c 'assert h.get_size() > 0'
    stop_server nobody
    rm -rf "$img/rw"
fi
if [ -n "$unprivileged" ]; then
    note "as an unprivileged user: unreadable base, read-only directory"
    chmod 555 "$img/ro"
    refuse "ro/overlay.qcow2|permission" base="$base" overlay="$img/ro/overlay.qcow2"
    cp "$base" "$img/unreadable.raw"
    chmod 000 "$img/unreadable.raw"
    mkdir -m 1777 "$img/rw"
    refuse "unreadable.raw|permission" base="$img/unreadable.raw" \
        overlay="$img/rw/overlay.qcow2"
    rm -rf "$img/rw" "$img/unreadable.raw"
    server_wrapper=()
    chmod 700 "$tmpdir"
else
    note "SKIP permission cases: running as root, and user nobody cannot read the plugin (or no setpriv)"
fi

note "positive control: an overlay made by qemu-img for this base is accepted"
qemu-img create -q -f qcow2 -b "$base" -F raw "$ov"
start_server good base="$base" overlay="$ov"
nbdsh -u "$(server_uri good)" -c "
import hashlib
d = hashlib.sha256(h.pread($size, 0)).hexdigest()
assert d == '$(sha256 "$base")', 'export differs from the base'
"

note "requests beyond the end of the disk"
"$PYTHON" - "$(server_uri good)" "$size" <<'EOF'
import os, sys
sys.path.insert(0, os.environ["testsdir"])
import nbd
from cowtest import connect

uri, size = sys.argv[1], int(sys.argv[2])
h = connect(uri, strict=False)
last = h.pread(512, size - 512)
cases = [
    ("pread", lambda: h.pread(1024, size - 512)),
    ("pread", lambda: h.pread(512, size)),
    ("pread", lambda: h.pread(512, 1 << 62)),
    ("pwrite", lambda: h.pwrite(b"z" * 1024, size - 512)),
    ("pwrite", lambda: h.pwrite(b"z" * 512, size + 4096)),
    ("pwrite", lambda: h.pwrite(b"z" * 512, (1 << 64) - 256)),
    ("zero", lambda: h.zero(131072, size - 65536)),
    ("trim", lambda: h.trim(131072, size - 65536)),
]
for name, fn in cases:
    try:
        fn()
    except nbd.Error as e:
        print("%s beyond the end: refused (%s)" % (name, e))
    else:
        sys.exit("%s beyond the end of the disk succeeded" % name)
    # The connection and the server are still fine.
    assert h.pread(512, size - 512) == last, "last sector changed"
h.flush()
h.shutdown()
h2 = connect(uri)
assert h2.pread(512, size - 512) == last, "last sector changed"
h2.shutdown()
EOF
server_alive good || fail "the server died"
stop_server good
check_image "$ov"
qemu-img compare -q -f qcow2 -F raw "$ov" "$base" ||
    fail "requests beyond the end changed the disk"
note "pass"
