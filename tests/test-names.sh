#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Snapshot names and descriptions, and revert under connected clients:
#   - reserved names (active, base, layer-*, any case) refused, online and
#     offline, saying they are reserved; the manifest unchanged;
#   - descriptions with C1 characters (encoded or raw), invalid UTF-8, a
#     newline, a tab, ESC, DEL or a bidirectional override refused with
#     the byte and what it is;
#     printable non-ASCII UTF-8 kept intact in text and JSON;
#   - a manifest of an older version, hand-edited to hold a snapshot
#     named "active" and a description of bad bytes, still opens: JSON
#     output is valid UTF-8 JSON (python's json module), text output holds
#     no raw control byte, "active" means the active layer and the old
#     snapshot is reached by its layer file name (revert, delete);
#   - revert refused while NBD clients are connected (with their count),
#     allowed with --force, and without it once they are gone; status
#     shows the count.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img qemu-io
requires_python_nbd

cow=$abs_top_builddir/cowchain
[ -x "$cow" ] || fail "cowchain tool not built: $cow"
ctl=$tmpdir/ctl
export COWCHAIN_CONTROL=$ctl
st=$tmpdir/st

make_random_file "$tmpdir/base.img" $((4 << 20)) 5
start_server srv disk=vm1 base="$tmpdir/base.img" state="$st" control="$ctl"
uri="nbd+unix:///vm1?socket=$tmpdir/srv.sock"

write () { qemu-io -f raw -c "write -P $1 $2 $3" "$uri" >/dev/null; }
# expect_pattern URI PATTERN: the disk's first 64k hold PATTERN.
expect_pattern () {
    local out
    out=$(qemu-io -f raw -r -c "read -P $2 0 64k" "$1")
    case $out in
        *"Pattern verification failed"*|*"read 65536/65536"*) ;;
        *) fail "qemu-io could not read $1: $out";;
    esac
    case $out in *"Pattern verification failed"*) fail "$1: not $2 (${3:-})";; esac
}
manifest_same () {
    cmp -s "$tmpdir/manifest.before" "$st/manifest" ||
        fail "a refused command changed the manifest ($1)"
}
# no_raw_controls FILE: no C0 byte but newline, no DEL, no C1 (raw or
# UTF-8 encoded), no invalid UTF-8.
no_raw_controls () {
    "$PYTHON" - "$1" <<'PY'
import re, sys
b = open(sys.argv[1], "rb").read()
t = b.decode("utf-8")            # invalid UTF-8 raises
bad = re.findall("[\x00-\x09\x0b-\x1f\x7f-\x9f]", t)
assert not bad, "raw control characters %r in %r" % (bad, t)
PY
}

write 0x11 0 64k
"$cow" snapshot s0 >/dev/null

#----------------------------------------------------------------------
note "reserved names are refused, online and offline"
cp "$st/manifest" "$tmpdir/manifest.before"
for name in active base BASE Active layer-000001.qcow2 layer-000009.qcow2 \
            layer-x LAYER-2.qcow2; do
    expect_fail "snapshot name '$name' is reserved" "$cow" snapshot "$name"
done
expect_fail "names the active layer" "$cow" snapshot active
expect_fail "layer file names" "$cow" snapshot layer-000002.qcow2
# Still the old character rules, with a control byte named, not echoed.
expect_fail "byte 2 is 0x1b, a control character" "$cow" snapshot $'a\x1b[2Jb'
no_raw_controls "$tmpdir/err"
expect_fail "byte 2 is 0xc3, a non-ASCII byte" "$cow" snapshot "aé"
manifest_same "reserved names"

#----------------------------------------------------------------------
note "descriptions: printable UTF-8 only"
# bad_description TEXT DESC: refused, naming byte 2 and TEXT
bad_description () {
    expect_fail "description: byte 2" "$cow" snapshot s9 --description "$2"
    grep -q -i -- "$1" "$tmpdir/err" || { cat "$tmpdir/err"; fail "description error lacks '$1'"; }
    no_raw_controls "$tmpdir/err"
}
bad_description "U+0085, a C1 control" $'a\xc2\x85b'
bad_description "U+009B, a C1 control" $'a\xc2\x9b[2Jb'
bad_description "(0x9b) is not valid UTF-8" $'a\x9bb'
bad_description "(0xff) is not valid UTF-8" $'a\xffb'
bad_description "(0xc3) is not valid UTF-8" $'a\xc3(b'      # truncated sequence
bad_description "(0xc0) is not valid UTF-8" $'a\xc0\xafb'  # overlong '/'
bad_description "(0xed) is not valid UTF-8" $'a\xed\xa0\x80b'  # surrogate
bad_description "U+000A, a newline" $'a\nb'
bad_description "U+0009, a tab" $'a\tb'
bad_description "U+001B, an escape" $'a\x1b[2Jb'
bad_description "U+007F, a delete" $'a\x7fb'
bad_description "U+202E, a bidirectional formatting" $'a\xe2\x80\xaeb'  # RLO
bad_description "U+2066, a bidirectional formatting" $'a\xe2\x81\xa6b'  # LRI
manifest_same "bad descriptions"

utf8="Grüße, 日本語 ✓ — ünïcödé"
"$cow" snapshot s1 --description "$utf8" | grep -q "Snapshot s1 created"
"$cow" list > "$tmpdir/list"
grep -q -F " $utf8" "$tmpdir/list" || { cat "$tmpdir/list"; fail "list does not show the UTF-8 description intact"; }
"$cow" list --output=json > "$tmpdir/list.json"
"$PYTHON" - "$tmpdir/list.json" "$utf8" <<'PY'
import json, sys
v = json.loads(open(sys.argv[1], "rb").read().decode("utf-8"))
assert v["version"] == 1, v
v = v["snapshots"]
want = sys.argv[2]
assert [s["description"] for s in v if s["name"] == "s1"] == [want], v
PY

#----------------------------------------------------------------------
note "revert with NBD clients connected"
write 0x22 0 64k
cp "$st/manifest" "$tmpdir/manifest.before"

# hold_client N: an NBD connection to vm1, open until $tmpdir/cN.stop
# exists; its PID in holders[N].
declare -A holders=()
hold_client () {
    "$PYTHON" - "$uri" "$tmpdir/c$1.ready" "$tmpdir/c$1.stop" <<'PY' &
import nbd, os, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
open(sys.argv[2], "w").close()
deadline = time.time() + 300
while not os.path.exists(sys.argv[3]) and time.time() < deadline:
    time.sleep(0.05)
h.shutdown()
PY
    holders[$1]=$!
    local i
    for i in $(seq 600); do
        [ -e "$tmpdir/c$1.ready" ] && return 0
        kill -0 "${holders[$1]}" 2>/dev/null || fail "client $1 could not connect"
        sleep 0.05
    done
    fail "client $1 did not connect within 30 s"
}
release_client () {
    touch "$tmpdir/c$1.stop"
    wait "${holders[$1]}" || fail "client $1 failed"
}
clients_of_vm1 () { "$cow" status | awk '$1 == "vm1" {print $4}'; }
# wait_clients N: until status shows N clients (the server sees a client
# go only after it has gone: poll, up to 30 s).
wait_clients () {
    local i
    for i in $(seq 300); do
        [ "$(clients_of_vm1)" = "$1" ] && return 0
        sleep 0.1
    done
    "$cow" status >&2 || :
    fail "status does not show $1 clients"
}

hold_client 1
hold_client 2
wait_clients 2
expect_fail "2 NBD clients are connected to disk vm1; reverting changes the disk under them; stop them or use --force" \
    "$cow" revert s1
manifest_same "revert with 2 clients"
release_client 1
wait_clients 1
expect_fail "1 NBD client is connected to disk vm1; reverting changes the disk under it; stop it or use --force" \
    "$cow" revert s1
manifest_same "revert with 1 client"
"$cow" revert --force s1 | grep -q "Reverted to snapshot s1" || fail "revert --force with a client connected"
expect_pattern "$uri" 0x11 "after revert --force to s1"
release_client 2
wait_clients 0
write 0x33 0 64k
# qemu-io has gone, but the server may not have closed its connection yet.
wait_clients 0
"$cow" revert s1 | grep -q "Reverted to snapshot s1" || fail "revert once the clients are gone"
expect_pattern "$uri" 0x11 "after the revert to s1"
# The later-snapshots rule is still there, and said without clients.
"$cow" snapshot s2 >/dev/null
wait_clients 0
expect_fail "would delete the later snapshot 's2'" "$cow" revert s1
stop_server srv

#----------------------------------------------------------------------
note "offline: the same rules, no clients"
cp "$st/manifest" "$tmpdir/manifest.before"
expect_fail "snapshot name 'base' is reserved" "$cow" snapshot --state "$st" base
expect_fail "snapshot name 'layer-7' is reserved" "$cow" snapshot --state "$st" layer-7
expect_fail "U+0085, a C1 control" "$cow" snapshot --state "$st" s9 --description $'\xc2\x85'
expect_fail "(0xff) is not valid UTF-8" "$cow" snapshot --state "$st" s9 --description $'\xff'
manifest_same "offline refusals"
"$cow" revert --state "$st" s2 | grep -q "Reverted to snapshot s2" || fail "offline revert"

#----------------------------------------------------------------------
note "a manifest of an older version: a reserved name, bad description bytes"
# s0's line gets the name "active" and a description of raw bytes that
# older versions let through: CSI (0x9b), DEL, an invalid byte, an encoded
# C1 (U+0085) and a tab.
"$PYTHON" - "$st/manifest" <<'PY'
import sys
path = sys.argv[1]
lines = open(path).read().split("\n")
bad = b"a\x9b[31mred\x7f\xff\xc2\x85\tz"
enc = "".join(chr(c) if c < 0x80 and chr(c).isalnum() else "%%%02X" % c
              for c in bad)
for i, l in enumerate(lines):
    f = l.split(" ")
    if f[0] == "layer" and f[3] == "s0":
        f[3], f[4] = "active", enc
        lines[i] = " ".join(f)
        break
else:
    raise SystemExit("no s0 line in the manifest")
open(path, "w").write("\n".join(lines))
PY
bad_json='a\ufffd[31mred\x7f\ufffd\x85\tz'
"$cow" list --state "$st" --output=json > "$tmpdir/old.json"
"$PYTHON" - "$tmpdir/old.json" "$bad_json" <<'PY'
import json, sys
raw = open(sys.argv[1], "rb").read()
v = json.loads(raw.decode("utf-8"))["snapshots"]  # strict: valid UTF-8 JSON
want = sys.argv[2].encode().decode("unicode_escape")
old = [s for s in v if s["name"] == "active"]
assert len(old) == 1 and old[0]["description"] == want, (old, want)
for b in (b"\x9b", b"\x7f", b"\xff", b"\xc2\x85", b"\t"):
    assert b not in raw, "raw %r in the JSON output" % b
PY
"$cow" list --state "$st" > "$tmpdir/old.txt"
no_raw_controls "$tmpdir/old.txt"
old_file=$("$PYTHON" -c 'import json,os,sys; print(os.path.basename([s["file"] for s in json.load(open(sys.argv[1]))["snapshots"] if s["name"] == "active"][0]))' "$tmpdir/old.json")
grep -q -F " active ($old_file) " "$tmpdir/old.txt" || { cat "$tmpdir/old.txt"; fail "list does not show the old snapshot with its layer file"; }
grep -q -F 'a\x9b[31mred\u007f\xff\u0085\tz' "$tmpdir/old.txt" || { cat "$tmpdir/old.txt"; fail "list does not show the bad bytes escaped"; }

start_server srv2 disk=vm1 state="$st" control="$ctl"
"$cow" list --output=json > "$tmpdir/old2.json"
cmp -s <(sed 's/"creation-time": [0-9]*//' "$tmpdir/old.json") \
       <(sed 's/"creation-time": [0-9]*//' "$tmpdir/old2.json") ||
    fail "online and offline JSON lists differ"
"$cow" list > "$tmpdir/old2.txt"
no_raw_controls "$tmpdir/old2.txt"
# "active" is the active layer; the old snapshot is its layer file.
expect_fail "the snapshot that an older version let take this reserved name is reached by its layer file name, $old_file" \
    "$cow" delete active
"$cow" revert --force "$old_file" | grep -q "Reverted to snapshot $old_file" ||
    fail "revert by layer file name"
expect_pattern "nbd+unix:///vm1?socket=$tmpdir/srv2.sock" 0x11 "after the revert to s0"
"$cow" list --output=json | "$PYTHON" -c 'import json,sys; v=json.load(sys.stdin)["snapshots"]; assert [s["name"] for s in v] == ["active"], v'
"$cow" delete --wait "$old_file" >/dev/null || fail "delete by layer file name"
"$cow" list --output=json | "$PYTHON" -c 'import json,sys; v=json.load(sys.stdin); assert v == {"version": 1, "snapshots": []}, v'
stop_server srv2
for f in "$st"/layer-*.qcow2; do check_image "$f"; done

note "a layer file not named layer-*: its name is reserved too"
# A manifest from elsewhere may name the (active) layer file otherwise;
# a snapshot may not take that name, which commit and delete read as
# the layer.
top=$(awk '$1 == "layer" {f = $2} END {print f}' "$st/manifest")
mv "$st/$top" "$st/top.qcow2"
sed -i "s/ $top\( \|\$\)/ top.qcow2\1/" "$st/manifest"
cp "$st/manifest" "$tmpdir/manifest.before"
expect_fail "snapshot name 'top.qcow2' is reserved: it is the name of a layer file" \
    "$cow" snapshot --state "$st" top.qcow2
manifest_same "a layer file's name"
"$cow" snapshot --state "$st" s5 >/dev/null || fail "snapshot over a layer not named layer-*"
