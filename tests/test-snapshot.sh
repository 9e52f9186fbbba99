#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Live snapshots through the cowchain tool: snapshot, list (table, tree,
# JSON), revert, blklist, status; names, times and descriptions surviving
# a restart; every layer valid for qemu-img; each snapshot's frozen layer,
# read offline by qemu-img, holding the disk as it was; refused names and
# commands changing nothing; offline commands refused while the server
# holds the disk, and working once it is stopped.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img qemu-io
requires_python_nbd

cow=$abs_top_builddir/cowchain
[ -x "$cow" ] || fail "cowchain tool not built: $cow"
ctl=$tmpdir/ctl
export COWCHAIN_CONTROL=$ctl

make_random_file "$tmpdir/base.img" $((16 << 20)) 7
base_sum=$(sha256 "$tmpdir/base.img")
start_server srv base="$tmpdir/base.img" state="$tmpdir/st" control="$ctl"
uri=$(server_uri srv)

write () { qemu-io -f raw -c "write -P $1 $2 $3" "$uri" >/dev/null; }
expect_pattern () {
    local out
    out=$(qemu-io -f raw -r -c "read -P $2 $3 $4" "$1")
    case $out in *"Pattern verification failed"*) fail "$1: not $2 at $3+$4";; esac
}

note "two snapshots while serving"
write 0x11 0 1M
"$cow" snapshot s1 --description "first snapshot" | grep -q "Snapshot s1 created"
write 0x22 0 512k
"$cow" snapshot s2
write 0x33 0 4k

"$cow" list > "$tmpdir/list"
grep -q '^ s1 .*disk-snapshot *first snapshot$' "$tmpdir/list" || { cat "$tmpdir/list"; fail "list lacks s1"; }
grep -q '^ s2 ' "$tmpdir/list" || fail "list lacks s2"
"$cow" list --tree | grep -q "(current)" || fail "tree lacks the current state"
"$cow" list --output=json > "$tmpdir/list.json"
"$PYTHON" - "$tmpdir/list.json" <<'PY'
import json, sys, time
v = json.load(open(sys.argv[1]))
assert v["version"] == 1, v
v = v["snapshots"]
assert [s["name"] for s in v] == ["s1", "s2"], v
assert v[0]["description"] == "first snapshot" and v[1]["parent"] == "s1", v
assert all(abs(s["creation-time"] - time.time()) < 600 for s in v), v
PY

note "every layer is valid qcow2; the chain is visible to qemu-img"
active=$("$cow" blklist | awk '$1 == "(default)" {print $2}')
[ -f "$active" ] || fail "blklist did not name the active layer: $active"
qemu-img info -U --backing-chain "$active" > "$tmpdir/chain"
[ "$(grep -c '^image:' "$tmpdir/chain")" = 4 ] || { cat "$tmpdir/chain"; fail "chain is not 3 layers + base"; }
for f in "$tmpdir"/st/layer-*.qcow2; do check_image "$f"; done
"$cow" info --disk "" --backing-chain > "$tmpdir/cinfo"
[ "$(grep -c '^image:' "$tmpdir/cinfo")" = 4 ] || { cat "$tmpdir/cinfo"; fail "cowchain info --disk --backing-chain is not 3 layers + base"; }
grep -q "^image: $active\$" "$tmpdir/cinfo" || { cat "$tmpdir/cinfo"; fail "cowchain info --disk did not start at the active layer"; }

note "each snapshot, read offline, is the disk as it was"
files=$("$cow" list --output=json | "$PYTHON" -c 'import json,sys; [print(s["file"]) for s in json.load(sys.stdin)["snapshots"]]')
s1=$(echo "$files" | sed -n 1p); s2=$(echo "$files" | sed -n 2p)
cp "$tmpdir/base.img" "$tmpdir/m1"; qemu-io -f raw -c 'write -P 0x11 0 1M' "$tmpdir/m1" >/dev/null
cp "$tmpdir/m1" "$tmpdir/m2"; qemu-io -f raw -c 'write -P 0x22 0 512k' "$tmpdir/m2" >/dev/null
qemu-img compare -U -q -f raw -F qcow2 "$tmpdir/m1" "$s1" || fail "snapshot s1 differs from its model"
qemu-img compare -U -q -f raw -F qcow2 "$tmpdir/m2" "$s2" || fail "snapshot s2 differs from its model"

note "refused names and commands change nothing"
cp "$tmpdir/st/manifest" "$tmpdir/manifest.before"
expect_fail "already exists" "$cow" snapshot s1
expect_fail "may not start" "$cow" snapshot ../x
expect_fail "not allowed" "$cow" snapshot /abs
expect_fail "empty" "$cow" snapshot ""
expect_fail "at most 128" "$cow" snapshot "$(printf 'a%.0s' $(seq 300))"
expect_fail "control" "$cow" snapshot "$(printf 'a\tb')"
expect_fail "no disk named" "$cow" snapshot --disk nosuch s9
expect_fail "no snapshot named" "$cow" revert nosuch
expect_fail "in use" "$cow" list --state "$tmpdir/st"
expect_fail "in use" "$cow" snapshot --state "$tmpdir/st" s9
cmp -s "$tmpdir/manifest.before" "$tmpdir/st/manifest" || fail "a refused command changed the manifest"

note "control socket: mode 0600, bounded requests, garbage"
[ "$(stat -c %a "$ctl")" = 600 ] || fail "control socket mode is $(stat -c %a "$ctl")"
"$PYTHON" - "$ctl" <<'PY'
import socket, sys
def talk(data):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
    try:
        s.sendall(data); s.shutdown(socket.SHUT_WR)
    except BrokenPipeError:
        pass
    out = b""
    while True:
        d = s.recv(65536)
        if not d: break
        out += d
    return out
r = talk(b"x" * (1 << 20) + b"\n")
assert r.startswith(b"error ") and b"too%20large" in r, r[:200]
r = talk(bytes(range(256)) + b"\n")
assert r.startswith(b"error "), r[:200]
r = talk(b"snapshot\n")
assert r.startswith(b"error "), r[:200]
r = talk(b"status\n")
assert r.startswith(b"ok\n"), r[:200]
PY
if command -v setpriv >/dev/null && [ "$(id -u)" = 0 ]; then
    # Let the other uid reach the socket itself, so that the server's own
    # peer check is what refuses it.
    chmod 0711 "$tmpdir"; chmod 0666 "$ctl"
    out=$(setpriv --reuid=65534 --regid=65534 --clear-groups "$cow" status 2>&1 || :)
    chmod 0600 "$ctl"; chmod 0700 "$tmpdir"
    case $out in *"not allowed"*) ;; *) fail "another uid was not refused: $out";; esac
fi
cmp -s "$tmpdir/manifest.before" "$tmpdir/st/manifest" || fail "bad requests changed the manifest"

note "revert"
expect_fail "--force" "$cow" revert s1
"$cow" revert s2
expect_pattern "$uri" 0x22 0 512k
expect_pattern "$uri" 0x11 512k 512k
write 0x44 0 64k
"$cow" revert --force s1
expect_pattern "$uri" 0x11 0 1M
[ "$("$cow" list --output=json | "$PYTHON" -c 'import json,sys; print(len(json.load(sys.stdin)["snapshots"]))')" = 1 ] ||
    fail "s2 should be gone after revert --force s1"
[ "$(ls "$tmpdir"/st/layer-*.qcow2 | wc -l)" = 2 ] || fail "dropped layer files were not deleted"

note "restart: names, times and descriptions persist"
write 0x55 2M 1M
"$cow" snapshot s3 --description "after revert"
"$cow" list --output=json > "$tmpdir/before.json"
stop_server srv
for f in "$tmpdir"/st/layer-*.qcow2; do check_image "$f"; done
note "offline commands on the stopped disk"
"$cow" list --state "$tmpdir/st" --output=json > "$tmpdir/offline.json"
cmp -s "$tmpdir/before.json" "$tmpdir/offline.json" || fail "offline list differs"
"$cow" snapshot --state "$tmpdir/st" s4 --description offline
start_server srv state="$tmpdir/st" control="$ctl"
"$cow" list --output=json > "$tmpdir/after.json"
"$PYTHON" - "$tmpdir/before.json" "$tmpdir/after.json" <<'PY'
import json, sys
b, a = (json.load(open(p))["snapshots"] for p in sys.argv[1:])
assert a[:len(b)] == b, (b, a)
assert [s["name"] for s in a] == ["s1", "s3", "s4"] and a[2]["description"] == "offline", a
PY
expect_pattern "$uri" 0x55 2M 1M
expect_pattern "$uri" 0x11 0 1M
stop_server srv
[ "$(sha256 "$tmpdir/base.img")" = "$base_sum" ] || fail "the base changed"
