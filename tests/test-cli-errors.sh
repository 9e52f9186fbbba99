#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Errors that name what was wrong and the accepted values (issue 13), from
# the plugin's keys and from the cowchain tool; a refused start or command
# changes nothing stored.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img
requires_cowchain
requires_python_nbd
cow=$cowchain_bin
unset COWCHAIN_CONTROL COWCHAIN_TIMEOUT

base=$tmpdir/base.img
qemu-img create -q -f raw "$base" 4M

# refused NAME TEXT KEY=VALUE...: the server refuses to start, its log
# says TEXT (fixed string), and no overlay or state was created.
refused ()
{
    local name=$1 text=$2; shift 2
    expect_start_failure "$name" "$@"
    grep -q -F -- "$text" "$(server_log "$name")" ||
        { cat "$(server_log "$name")" >&2; fail "$name: the refusal does not say: $text"; }
    [ ! -e "$tmpdir/o.qcow2" ] || fail "$name: a refused start created the overlay"
    [ ! -e "$tmpdir/st" ] || fail "$name: a refused start created the state directory"
}

#----------------------------------------------------------------------
note "plugin keys"
refused missing-dir "$tmpdir/missing-dir/o.qcow2: the overlay's directory $tmpdir/missing-dir: No such file or directory" \
    base="$base" overlay="$tmpdir/missing-dir/o.qcow2"
grep -q "base's path" "$(server_log missing-dir)" && fail "missing-dir: the message still blames the base"
refused sync-word "sync: 'fast' is not flush, always or a number of milliseconds from 1 to 3600000" \
    base="$base" overlay="$tmpdir/o.qcow2" sync=fast
refused sync-big "sync: '99999999999' is not flush, always or a number of milliseconds" \
    base="$base" overlay="$tmpdir/o.qcow2" sync=99999999999
refused sync-twice "sync=10: sync= was already given; give it once" \
    base="$base" overlay="$tmpdir/o.qcow2" sync=5 sync=10
refused sync-twice2 "sync=flush: sync= was already given; give it once" \
    base="$base" overlay="$tmpdir/o.qcow2" sync=always sync=flush
refused depth-twice "max-depth=2: max-depth= was already given; give it once" \
    base="$base" state="$tmpdir/st" max-depth=1 max-depth=2
refused depth-word "max-depth: 'x' is not a number from 0 to 1000 (0 = off)" \
    base="$base" state="$tmpdir/st" max-depth=x
grep -q "empty string" "$(server_log depth-word)" && fail "max-depth=x: nbdkit's 'empty string' message"
refused cluster-twice "cluster-size=128K: cluster-size= was already given; give it once" \
    base="$base" overlay="$tmpdir/o.qcow2" cluster-size=64K cluster-size=128K
refused compat-twice "compat=0.10: compat= was already given" \
    base="$base" overlay="$tmpdir/o.qcow2" compat=1.1 compat=0.10
refused timeout-twice "base-timeout=2: base-timeout= was already given" \
    base="$base" overlay="$tmpdir/o.qcow2" base-timeout=1 base-timeout=2
refused format-twice "base-format=qcow2: base-format= was already given" \
    base="$base" overlay="$tmpdir/o.qcow2" base-format=raw base-format=qcow2
refused base-twice "base=$base: base= was already given" \
    base="$base" overlay="$tmpdir/o.qcow2" base="$base"
refused subclusters-twice "subclusters=off: subclusters= was already given" \
    base="$base" overlay="$tmpdir/o.qcow2" subclusters=on subclusters=off
refused cache-twice "cache-size=64M: cache-size= was already given" \
    base="$base" overlay="$tmpdir/o.qcow2" cache-size=32M cache-size=64M
refused control-twice "control=$tmpdir/b.ctl: control= was already given" \
    base="$base" overlay="$tmpdir/o.qcow2" control="$tmpdir/a.ctl" control="$tmpdir/b.ctl"
refused disk-key-twice "overlay=$tmpdir/p.qcow2: overlay= was already given for disk 'vdb'; give it once per disk" \
    disk=vda base="$base" overlay="$tmpdir/o.qcow2" \
    disk=vdb base="$base" overlay="$tmpdir/q.qcow2" overlay="$tmpdir/p.qcow2"
refused uid-word "control-allow-uid: 'abc' is not a uid (a number from 0 to 4294967294)" \
    base="$base" overlay="$tmpdir/o.qcow2" control="$tmpdir/a.ctl" control-allow-uid=abc
refused allow-empty "allow-backing: empty value" \
    base="$base" overlay="$tmpdir/o.qcow2" allow-backing=
refused same-overlay "disks 'vda' and 'vdb' both name the same overlay= file ($tmpdir/o.qcow2): each disk needs its own" \
    disk=vda base="$base" overlay="$tmpdir/o.qcow2" \
    disk=vdb base="$base" overlay="$tmpdir/./o.qcow2"
grep -q "another process" "$(server_log same-overlay)" && fail "same-overlay: still blamed on another process"
# Per disk, the same key on two disks is fine.
start_server two disk=vda base="$base" overlay="$tmpdir/o.qcow2" sync=always \
    disk=vdb base="$base" base-format=raw overlay="$tmpdir/q.qcow2" max-depth=0 cluster-size=4K
stop_server two
rm -f "$tmpdir/o.qcow2" "$tmpdir/q.qcow2"

note "a guessed base format is a warning naming the file and base-format="
# A raw image whose first bytes are a qcow2 header (as a guest may write
# into its disk): without base-format= it is read as qcow2.
qemu-img create -q -f qcow2 "$tmpdir/hdr.qcow2" 4M
cp "$base" "$tmpdir/raw-qcow2-head.img"
dd if="$tmpdir/hdr.qcow2" of="$tmpdir/raw-qcow2-head.img" bs=512 count=1 conv=notrunc status=none
start_server guessed base="$tmpdir/raw-qcow2-head.img" overlay="$tmpdir/o.qcow2"
grep -q -F "warning: base $tmpdir/raw-qcow2-head.img: no base-format= given, so the format was guessed from the file's first bytes: qcow2." "$(server_log guessed)" &&
    grep -q -F "give base-format=raw or base-format=qcow2" "$(server_log guessed)" ||
    { cat "$(server_log guessed)" >&2; fail "no warning about the guessed format"; }
stop_server guessed
rm -f "$tmpdir/o.qcow2"
start_server given base="$tmpdir/raw-qcow2-head.img" base-format=raw overlay="$tmpdir/o.qcow2"
grep -q "guessed" "$(server_log given)" && fail "a warning although base-format= was given"
size=$(nbdsh -u "$(server_uri given)" -c 'print(h.get_size())')
[ "$size" = $((4 << 20)) ] || fail "base-format=raw: size $size"
stop_server given
rm -f "$tmpdir/o.qcow2"
# A state directory records the format: no guess (and no warning) after
# the first start.
start_server st1 base="$base" state="$tmpdir/st"
grep -q -F "warning: base $base: no base-format= given, so the format was guessed from the file's first bytes: raw." "$(server_log st1)" ||
    fail "no warning for a guessed raw base"
stop_server st1
start_server st2 state="$tmpdir/st"
grep -q "guessed" "$(server_log st2)" && fail "a warning when the manifest records the format"
stop_server st2
rm -rf "$tmpdir/st"

#----------------------------------------------------------------------
note "the tool"
ctl=$tmpdir/ctl
start_server srv base="$base" base-format=raw state="$tmpdir/st" control="$ctl"
"$cow" --control "$ctl" snapshot s1 >/dev/null
layers_before=$(ls "$tmpdir/st")

# tool_refuses TEXT ARGS...: exit 1, stderr says TEXT (fixed string).
tool_refuses ()
{
    local text=$1; shift
    run_cowchain "$@"
    [ "$rc" = 1 ] || { cat "$tmpdir/err" >&2; fail "cowchain $*: exit $rc, not 1"; }
    grep -q -F -- "$text" "$tmpdir/err" ||
        { cat "$tmpdir/err" >&2; fail "cowchain $*: does not say: $text"; }
}

tool_refuses "snapshot: option '--disk' requires a value" snapshot --control "$ctl" s2 --disk
grep -q "invalid option" "$tmpdir/err" && fail "a missing value is reported as an invalid option"
tool_refuses "list: option '--state' requires a value" list --state
tool_refuses "list: option '--disk' given twice ('a', then 'b'); give it once" list --control "$ctl" --disk a --disk b
tool_refuses "jobs: give --control=SOCKET (or set COWCHAIN_CONTROL): jobs works on a running server" jobs
grep -q -- "--state" "$tmpdir/err" && fail "jobs without a socket suggests --state"
for cmd in wait pause resume cancel blklist status; do
    tool_refuses "$cmd: give --control=SOCKET (or set COWCHAIN_CONTROL): $cmd works on a running server" $cmd
    grep -q -- "--state" "$tmpdir/err" && fail "$cmd without a socket suggests --state"
done
tool_refuses "speed: give --control=SOCKET" speed 1M
tool_refuses "list: give --control=SOCKET (or set COWCHAIN_CONTROL) for a running server, or --state=DIR" list
tool_refuses "$tmpdir/srv.sock is not a cowchain control socket: an NBD server answers there" \
    list --control "$tmpdir/srv.sock"
grep -q "reset by peer" "$tmpdir/err" && fail "the NBD socket is reported as a reset"
tool_refuses "$tmpdir is not a socket but a directory: give the server's control socket (its control= key)" \
    list --control "$tmpdir"
tool_refuses "$base is not a socket but a regular file" list --control "$base"
tool_refuses "speed: '-5' is not an option, and no value of speed is negative" speed --control "$ctl" -5
tool_refuses "list: --output must be 'text' or 'json', not 'xml'" --output=xml list --control "$ctl"
tool_refuses "unrecognized option '--bogus' before the command" --bogus list
tool_refuses "option '--control' given twice before the command ('a', then 'b')" --control a -c b list
tool_refuses "info: --control shows a running server's disk" info --control "$ctl" "$base"
tool_refuses "revert: unexpected argument 'x'" revert --control "$ctl" s1 x
# Over the socket, the server's own check of revert's FORCE word.
"$PYTHON" - "$ctl" > "$tmpdir/reply" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"revert - s1 x\n")
s.shutdown(socket.SHUT_WR)
data = b""
while True:
    b = s.recv(4096)
    if not b:
        break
    data += b
print(data.decode())
PY
grep -q "^error 22 revert:%20FORCE%20must%20be%20%27force%27%20or%20empty,%20not%20%27x%27" "$tmpdir/reply" ||
    fail "revert with FORCE x over the socket: $(cat "$tmpdir/reply")"
grep -q "wrong number of arguments" "$tmpdir/reply" && fail "FORCE x reported as a wrong number of arguments"
# Nothing changed on the disk through all that.
[ "$(ls "$tmpdir/st")" = "$layers_before" ] || fail "the refused commands changed the state directory"
"$cow" --control "$ctl" list --output=json |
    "$PYTHON" -c 'import json,sys; v = json.load(sys.stdin); assert [s["name"] for s in v["snapshots"]] == ["s1"], v' ||
    fail "the refused commands changed the snapshots"
stop_server srv
note "ok"
