#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# cowchain info against qemu-img info: for images made by qemu-img
# (compat 0.10 and 1.1, cluster sizes from 512 bytes to 2 MiB, refcount
# widths, flags, raw, and backing chains of depth 3 with relative names
# across directories), the JSON fields both tools have must agree, alone
# and with --backing-chain.  A backing loop is a clear error, not a hang;
# json: and URL backing names are shown but never opened; chains deeper
# than 64 levels are refused; a backing name of control characters and
# invalid UTF-8 is shown escaped (text) and as valid JSON; the command
# line itself behaves.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires qemu-img qemu-io timeout
[ -x "$PYTHON" ] || fail "$PYTHON not found"

requires_cowchain
cowchain_timeout=60

# expect_rc RC PATTERN ARGS...: exit status RC and stderr matching PATTERN
# (grep -E; empty: anything).
expect_rc ()
{
    local want=$1 pattern=$2; shift 2
    run_cowchain "$@"
    if [ "$rc" -ne "$want" ]; then
        cat "$tmpdir/err" >&2
        fail "cowchain $*: exit status $rc, expected $want"
    fi
    if [ -n "$pattern" ] && ! grep -E -q -- "$pattern" "$tmpdir/err"; then
        cat "$tmpdir/err" >&2
        fail "cowchain $*: stderr does not match '$pattern'"
    fi
}

# compare_json QEMU_JSON COWCHAIN_JSON: the fields both tools report
# must be equal, for one image or (as arrays) for a whole chain.
compare_json ()
{
    "$PYTHON" - "$1" "$2" <<'EOF'
import json, sys
qemu = json.load(open(sys.argv[1]))
ours = json.load(open(sys.argv[2]))
if isinstance(qemu, dict):
    qemu, ours = [qemu], [ours]
assert isinstance(ours, list), "cowchain gave %r" % (ours,)
assert len(qemu) == len(ours), \
    "chain of %d images, qemu-img shows %d" % (len(ours), len(qemu))
top = ["filename", "format", "virtual-size", "actual-size", "cluster-size",
       "backing-filename", "backing-filename-format", "full-backing-filename",
       "dirty-flag"]
spec = ["compat", "refcount-bits", "lazy-refcounts", "corrupt",
        "compression-type", "extended-l2"]
for i, (q, o) in enumerate(zip(qemu, ours)):
    # qemu-img counts a raw file's size in 512-byte sectors, rounded up;
    # cowchain serves (and shows) the file's exact size.
    if o.get("format") == "raw" and "virtual-size" in o:
        o["virtual-size"] = (o["virtual-size"] + 511) // 512 * 512
    for k in top:
        assert q.get(k) == o.get(k), \
            "image %d (%s): %s: cowchain %r, qemu-img %r" % (
                i, q.get("filename"), k, o.get(k), q.get(k))
    qs = q.get("format-specific", {})
    os_ = o.get("format-specific", {})
    assert qs.get("type") == os_.get("type"), "image %d: format-specific type" % i
    for k in spec:
        assert qs.get("data", {}).get(k) == os_.get("data", {}).get(k), \
            "image %d (%s): %s: cowchain %r, qemu-img %r" % (
                i, q.get("filename"), k, os_.get("data", {}).get(k),
                qs.get("data", {}).get(k))
EOF
}

# json_same_as_qemu IMAGE [--backing-chain]: the JSON fields.
json_same_as_qemu ()
{
    local img=$1; shift
    qemu-img info --output=json "$@" "$img" > "$tmpdir/qemu.json" ||
        fail "qemu-img info $img failed"
    expect_rc 0 "" info --output=json "$@" "$img"
    cp "$tmpdir/out" "$tmpdir/ours.json"
    compare_json "$tmpdir/qemu.json" "$tmpdir/ours.json" ||
        fail "cowchain info --output=json $* $img differs from qemu-img"
}

# same_as_qemu IMAGE [--backing-chain]: JSON and the human lines.
same_as_qemu ()
{
    local img=$1; shift
    json_same_as_qemu "$img" "$@"
    qemu-img info "$@" "$img" > "$tmpdir/qemu.txt"
    expect_rc 0 "" info "$@" "$img"
    diff <(grep -E '^(image|file format|virtual size|disk size|cluster_size|backing file( format)?):' "$tmpdir/qemu.txt") \
         <(grep -E '^(image|file format|virtual size|disk size|cluster_size|backing file( format)?):' "$tmpdir/out") >&2 ||
        fail "cowchain info $* $img: human output differs from qemu-img"
}

cd "$tmpdir"

note "command line"
expect_rc 0 "" --help
grep -q '^  info ' out && grep -q '^  check ' out || fail "--help lists no commands"
grep -q 'Exit status' out || fail "--help does not document exit statuses"
expect_rc 0 "" info --help
grep -q -- '--backing-chain' out || fail "info --help says nothing of --backing-chain"
expect_rc 0 "" help info
expect_rc 0 "" --version
expect_rc 1 "^cowchain: " no-such-command
expect_rc 1 "^cowchain: " info
expect_rc 1 "^cowchain: " info --no-such-option x
expect_rc 1 "^cowchain: .*xml" info --output=xml x
expect_rc 1 "^cowchain: " info a b
expect_rc 1 "^cowchain: .*nonexistent" info nonexistent.qcow2

note "single images made by qemu-img"
qemu-img create -q -f qcow2 v3.qcow2 64M
qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 40M 64k' v3.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 v2.qcow2 100M
qemu-io -c 'write -P 3 0 300k' v2.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=512 c512.qcow2 10M
qemu-img create -q -f qcow2 -o cluster_size=2M c2m.qcow2 1G
qemu-img create -q -f qcow2 -o refcount_bits=1 rb1.qcow2 5G
qemu-img create -q -f qcow2 -o refcount_bits=64,lazy_refcounts=on rb64.qcow2 12345678k
qemu-img create -q -f qcow2 odd.qcow2 1000000
qemu-img create -q -f raw plain.raw 3M
make_random_file data.raw 1000000 3
for img in v3.qcow2 v2.qcow2 c512.qcow2 c2m.qcow2 rb1.qcow2 rb64.qcow2 \
           odd.qcow2 plain.raw; do
    same_as_qemu "$img"
done
# Not a multiple of 512 bytes: qemu-img's human line shows it rounded up.
json_same_as_qemu data.raw
expect_rc 0 "" info v3.qcow2
grep -q '^virtual size: 64 MiB (67108864 bytes)$' out ||
    fail "info v3.qcow2: virtual size line: $(grep '^virtual' out)"

note "corrupt and dirty flags"
cp v3.qcow2 flagged.qcow2
qcow2_patch flagged.qcow2 "incompatible_features|=3"     # dirty + corrupt
same_as_qemu flagged.qcow2
"$PYTHON" -c '
import json, sys
d = json.load(open(sys.argv[1]))
assert d["dirty-flag"] is True and d["format-specific"]["data"]["corrupt"] is True, d
' "$tmpdir/ours.json" || fail "flags not shown"

note "a chain of depth 3 with relative names across directories"
mkdir -p d1/d2 abs
qemu-img create -q -f raw base.raw 32M
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 \
    -b ../base.raw -F raw d1/l1.qcow2
qemu-img create -q -f qcow2 -o cluster_size=2M -b ../l1.qcow2 -F qcow2 \
    d1/d2/l2.qcow2
qemu-img create -q -f qcow2 -b d1/d2/l2.qcow2 -F qcow2 top.qcow2 64M
qemu-io -c 'write -P 9 0 64k' top.qcow2 >/dev/null
same_as_qemu top.qcow2
same_as_qemu top.qcow2 --backing-chain
same_as_qemu d1/d2/l2.qcow2 --backing-chain
# From another directory, and with an absolute backing name.
(cd d1 && same_as_qemu ../top.qcow2 --backing-chain)
qemu-img create -q -f qcow2 -b "$tmpdir/d1/d2/l2.qcow2" -F qcow2 abs/top.qcow2
same_as_qemu abs/top.qcow2 --backing-chain
same_as_qemu "$tmpdir/top.qcow2" --backing-chain
expect_rc 0 "" info --backing-chain --output=json top.qcow2
"$PYTHON" -c '
import json, sys
chain = json.load(open(sys.argv[1]))
assert [c["format"] for c in chain] == ["qcow2", "qcow2", "qcow2", "raw"], chain
' out || fail "--backing-chain: wrong chain"

note "a missing backing file is an error"
qemu-img create -q -f qcow2 -u -b gone.qcow2 -F qcow2 orphan.qcow2 1M
same_as_qemu orphan.qcow2
expect_rc 1 "^cowchain: .*gone\.qcow2" info --backing-chain orphan.qcow2

note "backing loops: an error, no hang"
qemu-img create -q -f qcow2 b.qcow2 16M
qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 a.qcow2
qemu-img rebase -u -b a.qcow2 -F qcow2 b.qcow2
expect_rc 1 "^cowchain: .*loop" info --backing-chain a.qcow2
expect_rc 1 "^cowchain: .*loop" info --backing-chain --output=json b.qcow2
[ ! -s out ] || fail "a failed --output=json printed something"
qemu-img create -q -f qcow2 self.qcow2 16M
qemu-img rebase -u -b self.qcow2 -F qcow2 self.qcow2
expect_rc 1 "^cowchain: .*loop" info --backing-chain self.qcow2
# Without --backing-chain the names are only shown.
expect_rc 0 "" info a.qcow2
grep -q '^backing file: b.qcow2$' out || fail "info a.qcow2: no backing file line"
# A loop through another name of the same file.
mkdir -p loop && qemu-img create -q -f qcow2 loop/x.qcow2 1M
ln -s x.qcow2 loop/y.qcow2
qemu-img rebase -u -b y.qcow2 -F qcow2 loop/x.qcow2
expect_rc 1 "^cowchain: .*loop" info --backing-chain loop/x.qcow2

note "json: and URL backing names are never followed"
make_random_file secret.raw 65536 5
json_name='json:{"driver":"raw","file":{"driver":"file","filename":"'"$tmpdir"'/secret.raw"}}'
qemu-img create -q -f qcow2 -u -b "$json_name" -F raw j.qcow2 64k
expect_rc 0 "not followed" info --backing-chain --output=json j.qcow2
"$PYTHON" - out "$json_name" <<'EOF' || fail "json: backing name not shown as is"
import json, sys
chain = json.load(open(sys.argv[1]))
assert len(chain) == 1, chain
assert chain[0]["backing-filename"] == sys.argv[2], chain[0]
EOF
qemu-img info --output=json j.qcow2 > qemu.json
"$PYTHON" - qemu.json out <<'EOF' || fail "json: name differs from qemu-img's"
import json, sys
q = json.load(open(sys.argv[1])); o = json.load(open(sys.argv[2]))[0]
assert q["backing-filename"] == o["backing-filename"]
EOF
for name in 'nbd+unix:///?socket=/nonexistent.sock' 'http://example.invalid/x.img' \
            'nbd://example.invalid/x'; do
    qemu-img create -q -f qcow2 -u -b "$name" -F raw url.qcow2 64k
    expect_rc 0 "not followed" info --backing-chain url.qcow2
    grep -q -F "backing file: $name" out || fail "URL backing name not shown: $name"
done

note "at most 64 backing levels"
mkdir deep
qemu-img create -q -f qcow2 deep/c0.qcow2 1M
for i in $(seq 1 65); do
    qemu-img create -q -f qcow2 -u -b "c$((i - 1)).qcow2" -F qcow2 "deep/c$i.qcow2" 1M
done
expect_rc 0 "" info --backing-chain --output=json deep/c64.qcow2
"$PYTHON" -c 'import json, sys; assert len(json.load(open(sys.argv[1]))) == 65' out ||
    fail "a chain of 64 backing levels is not shown whole"
expect_rc 1 "^cowchain: .*64" info --backing-chain deep/c65.qcow2

note "hostile headers: a clear error"
head -c 4096 /dev/zero > bad.qcow2
qcow2_patch bad.qcow2 magic=0x514649fb version=3      # 'QFI\373', 3
expect_rc 1 "^cowchain: bad\.qcow2: " info bad.qcow2
printf 'QFI\373' > short.qcow2
expect_rc 1 "^cowchain: short\.qcow2: " info short.qcow2

note "a backing name of control characters and invalid UTF-8"
qemu-img create -q -f qcow2 -u -b $'bad\x1b[31m\xff\xc2\x85name' -F raw ctl.qcow2 1M
expect_rc 0 "" info --output=json ctl.qcow2
"$PYTHON" - out <<'EOF'
import json, sys
raw = open(sys.argv[1], "rb").read()
v = json.loads(raw.decode("utf-8"))          # strict: valid UTF-8 JSON
assert v["backing-filename"] == "bad\x1b[31m\ufffd\x85name", v
for b in (b"\x1b", b"\xff", b"\xc2\x85"):
    assert b not in raw, "raw %r in the JSON output" % b
EOF
expect_rc 0 "" info ctl.qcow2
grep -q -F 'backing file: bad\u001b[31m\xff\u0085name' out ||
    { cat out; fail "info does not show the backing name escaped"; }
if LC_ALL=C grep -q -P '[\x00-\x09\x0b-\x1f\x7f-\xff]' out; then
    cat -A out >&2
    fail "info printed a raw control or non-ASCII byte"
fi

note "ok"
