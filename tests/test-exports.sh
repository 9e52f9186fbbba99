#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Exports are listed truthfully: nbdinfo --list shows every disk's export
# with a description naming the disk, its base and its active layer (which
# a snapshot changes); a single-disk server lists its one export ("");
# an export name that is not served is refused with a clear error, and
# the default export ("", what QEMU sends for nbd+unix:///?socket=...)
# and oldstyle clients (nbdkit -o) keep reaching the default disk.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit nbdinfo qemu-io
requires_python_nbd
requires_cowchain

size=$(( 16 * 1024 * 1024 ))
truncate -s "$size" "$tmpdir/base.img"

# list_json SOCKET: the export list as JSON.
list_json ()
{
    nbdinfo --json --list "nbd+unix:///?socket=$1" > "$tmpdir/list.json" ||
        fail "nbdinfo --list failed on $1"
}

# check_list EXPECTED-NAMES... (after list_json): the exports, in order,
# as name|description lines in $tmpdir/list.txt.
check_list ()
{
    "$PYTHON" - "$tmpdir/list.json" "$@" > "$tmpdir/list.txt" <<'EOF' ||
import json, sys
j = json.load(open(sys.argv[1]))
names = [e["export-name"] for e in j["exports"]]
want = sys.argv[2:]
if names != want:
    sys.exit("exports %r, expected %r" % (names, want))
for e in j["exports"]:
    print("%s|%s" % (e["export-name"], e.get("description", "")))
EOF
        fail "wrong export list (see above)"
    cat "$tmpdir/list.txt"
}

# desc_of NAME: the description listed for NAME.
desc_of ()
{
    grep "^$1|" "$tmpdir/list.txt" | cut -d'|' -f2-
}

# expect_refused SOCKET NAME LOG
expect_refused ()
{
    local sock=$1 name=$2 log=$3
    if nbdinfo "nbd+unix:///$name?socket=$sock" > "$tmpdir/out" 2>&1; then
        cat "$tmpdir/out"
        fail "export '$name' was served; it should be refused"
    fi
    grep -q "no export named '$name' is served here" "$log" ||
        fail "the server log does not say why '$name' was refused"
}

note "one unnamed disk: listed as \"\" with its base and layer"
start_server one base="$tmpdir/base.img" overlay="$tmpdir/one.qcow2"
list_json "$tmpdir/one.sock"
check_list ""
d=$(desc_of "")
case $d in
    *"base $tmpdir/base.img, active layer $tmpdir/one.qcow2"*"the default export"*) ;;
    *) fail "description of the unnamed disk: '$d'" ;;
esac
expect_refused "$tmpdir/one.sock" vda "$(server_log one)"
grep -q 'one unnamed disk, export ""' "$(server_log one)" ||
    fail "the refusal does not say what is served"
# The default export: libnbd and QEMU ask for "".
nbdsh -u "$(server_uri one)" -c 'h.pwrite(b"o" * 512, 0); h.flush()'
qemu-io -f raw -r "$(server_uri one)" -c 'read -P 0x6f 1 1' > /dev/null ||
    fail "qemu-io could not read the default export"
stop_server one

note "two disks: both listed, the default one marked; a snapshot shows"
mkdir -p "$tmpdir/run"
ctl=$tmpdir/run/two.ctl
start_server two control="$ctl" \
    disk=vda base="$tmpdir/base.img" state="$tmpdir/vda" \
    disk=vdb base="$tmpdir/base.img" state="$tmpdir/vdb" default-export=vdb
list_json "$tmpdir/two.sock"
check_list vda vdb
case $(desc_of vda) in
    "cowchain disk vda: base $tmpdir/base.img, active layer $tmpdir/vda/layer-000001.qcow2, 1 layer, 0 snapshots") ;;
    *) fail "description of vda: '$(desc_of vda)'" ;;
esac
case $(desc_of vdb) in
    *"disk vdb:"*"; the default export") ;;
    *) fail "description of vdb: '$(desc_of vdb)'" ;;
esac
run_cowchain snapshot --control "$ctl" --disk vda s1
[ "$rc" = 0 ] || fail "snapshot failed: $(cat "$tmpdir/err")"
list_json "$tmpdir/two.sock"
check_list vda vdb
case $(desc_of vda) in
    *"active layer $tmpdir/vda/layer-000002.qcow2, 2 layers, 1 snapshot") ;;
    *) fail "after a snapshot, description of vda: '$(desc_of vda)'" ;;
esac

note "two disks: unknown names refused, \"\" reaches the default disk"
expect_refused "$tmpdir/two.sock" vdc "$(server_log two)"
grep -q "exports vda, vdb" "$(server_log two)" ||
    fail "the refusal does not list the exports"
expect_refused "$tmpdir/two.sock" VDA "$(server_log two)"
# A long name is cut in the log (64 bytes, then ...).
long=$(printf 'x%.0s' {1..100})
nbdinfo "nbd+unix:///$long?socket=$tmpdir/two.sock" > /dev/null 2>&1 &&
    fail "a 100-byte export name was served"
grep -q "no export named '$(printf 'x%.0s' {1..64})\.\.\.' is served" \
    "$(server_log two)" || fail "the long name is not cut at 64 bytes"
nbdsh -u "nbd+unix:///?socket=$tmpdir/two.sock" \
    -c 'h.pwrite(b"\xbb" * 512, 0); h.flush()'
qemu-io -f raw -r "nbd+unix:///vdb?socket=$tmpdir/two.sock" \
    -c 'read -P 0xbb 0 512' > /dev/null ||
    fail "the default export did not reach vdb"
qemu-io -f raw -r "nbd+unix:///vda?socket=$tmpdir/two.sock" \
    -c 'read -P 0 0 512' > /dev/null ||
    fail "a write to the default export reached vda"
stop_server two

note "oldstyle (nbdkit -o): no export name, the default disk"
start_server old -o sync=always \
    disk=vda base="$tmpdir/base.img" state="$tmpdir/vda" \
    disk=vdb base="$tmpdir/base.img" state="$tmpdir/vdb"
nbdinfo "$(server_uri old)" > "$tmpdir/out" ||
    fail "nbdinfo could not connect to the oldstyle server"
grep -q "protocol: oldstyle" "$tmpdir/out" || fail "not oldstyle: $(cat "$tmpdir/out")"
qemu-io -f raw -t writeback "nbd:unix:$tmpdir/old.sock" \
    -c 'write -P 0xaa 4096 4096' > /dev/null ||
    fail "qemu-io (oldstyle) could not write"
stop_server old
start_server check disk=vda state="$tmpdir/vda" disk=vdb state="$tmpdir/vdb"
qemu-io -f raw -r "nbd+unix:///vda?socket=$tmpdir/check.sock" \
    -c 'read -P 0xaa 4096 4096' > /dev/null ||
    fail "the oldstyle write did not reach the first disk"
stop_server check

note "ok"
