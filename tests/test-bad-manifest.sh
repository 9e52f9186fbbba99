#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# State directories a user or a botched restore can leave: each is refused
# with a message that names what is wrong, by the server and by the
# offline tool, never a crash, and nothing stored changes.
#   - layer files but no manifest (it was moved away): refused, not wiped
#   - a manifest listing more layers than a chain may hold (130)
#   - a snapshot name on the active (last) layer's line
#   - a manifest missing a layer line, or saying nobase: refused, not
#     "repaired" (which would cut the forgotten layer out and delete it)
#   - revert to a snapshot whose layer file was removed under the server
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img qemu-io

cow=$abs_top_builddir/cowchain
[ -x "$cow" ] || fail "cowchain tool not built: $cow"
ctl=$tmpdir/ctl
export COWCHAIN_CONTROL=$ctl
st=$tmpdir/st
base=$tmpdir/base.img
make_random_file "$base" $((4 << 20)) 5

write () { qemu-io -f raw -c "write -P $1 $2 $3" "$(server_uri srv)" >/dev/null; }

# dir_sum DIR: a checksum of every file in DIR but the lock.
dir_sum () { (cd "$1" && find . -type f ! -name lock -print0 | sort -z |
                  xargs -0 sha256sum) | sha256sum | cut -d' ' -f1; }

# refused TEXT: the server does not start on $st, the offline tool
# refuses it too, both naming TEXT; nothing in $st changes.
refused () {
    local text=$1 before
    before=$(dir_sum "$st")
    expect_start_failure srv base="$base" state="$st" control="$ctl"
    grep -q -- "$text" "$(server_log srv)" ||
        { cat "$(server_log srv)"; fail "the server's refusal does not say '$text'"; }
    if "$cow" list --state "$st" > "$tmpdir/out" 2> "$tmpdir/err"; then
        fail "cowchain list --state accepted it"
    fi
    grep -q -- "$text" "$tmpdir/err" ||
        { cat "$tmpdir/err"; fail "cowchain list --state: no '$text'"; }
    if "$cow" delete --state "$st" s1 > "$tmpdir/out" 2> "$tmpdir/err"; then
        fail "cowchain delete --state accepted it"
    fi
    [ "$(dir_sum "$st")" = "$before" ] || fail "the state directory changed"
}

note "a disk with two snapshots"
start_server srv base="$base" state="$st" control="$ctl"
write 0x11 0 1M
"$cow" snapshot s1 >/dev/null
write 0x22 512k 1M
"$cow" snapshot s2 >/dev/null
write 0x33 1M 64k
stop_server srv
good_manifest=$(cat "$st/manifest")

note "no manifest, layer files present: refused, nothing deleted"
mv "$st/manifest" "$tmpdir/manifest.saved"
refused "no manifest"
[ "$(ls "$st" | grep -c '^layer-')" = 3 ] || fail "layer files were removed"
mv "$tmpdir/manifest.saved" "$st/manifest"
start_server srv base="$base" state="$st" control="$ctl"
"$cow" list | grep -q '^ s2 ' || fail "s2 lost after restoring the manifest"
stop_server srv

note "a manifest listing 130 layers"
{
    echo "cowchain-manifest 1"
    grep '^base ' "$st/manifest"
    for i in $(seq 1 130); do printf 'layer layer-%06d.qcow2 0 - -\n' $((i + 100)); done
} > "$tmpdir/m130"
cp "$tmpdir/m130" "$st/manifest"
refused "more than 128 layers"

note "a snapshot name on the active layer"
printf '%s\n' "$good_manifest" | sed '$ s/^\(layer [^ ]* [0-9]*\) - /\1 bogus /' > "$st/manifest"
tail -1 "$st/manifest" | grep -q ' bogus ' || fail "test setup: no name on the last line"
refused "carries the snapshot name"
printf '%s\n' "$good_manifest" > "$st/manifest"

# A manifest that lost a line (a botched edit or restore) must not be
# "repaired" as after a crash in a merge: the layer it forgot holds data.
note "a manifest missing the middle layer's line"
printf '%s\n' "$good_manifest" | awk '/^layer /{n++; if (n == 2) next} {print}' > "$st/manifest"
[ "$(grep -c '^layer ' "$st/manifest")" = 2 ] || fail "test setup: not 2 layer lines"
refused "as the manifest records"
note "a manifest missing the bottom layer's line"
printf '%s\n' "$good_manifest" | awk '/^layer /{n++; if (n == 1) next} {print}' > "$st/manifest"
refused "the manifest does not list"
note "a manifest saying nobase for a disk on a base"
printf '%s\n' "$good_manifest" | sed 's/^base .*/nobase/' > "$st/manifest"
refused "self-contained"
note "a bad creation time, an unknown record, a duplicate name: each named"
printf '%s\n' "$good_manifest" | sed '3 s/^\(layer [^ ]*\) [0-9]* /\1 12x /' > "$st/manifest"
refused "creation time '12x'"
{ printf '%s\n' "$good_manifest"; echo "layers x y"; } > "$st/manifest"
refused "unknown record 'layers'"
printf '%s\n' "$good_manifest" | sed 's/ s2 / s1 /' > "$st/manifest"
refused "snapshot name 's1' appears twice"
note "a rebase mark naming no layer"
{ printf '%s\n' "$good_manifest"; echo "rebase layer-000099.qcow2"; } > "$st/manifest"
refused "names no layer"
printf '%s\n' "$good_manifest" > "$st/manifest"

note "revert to a snapshot whose layer file was removed"
start_server srv base="$base" state="$st" control="$ctl"
s1_file=$("$cow" list --output=json | "$PYTHON" -c 'import json,sys; print([s["file"] for s in json.load(sys.stdin)["snapshots"] if s["name"] == "s1"][0])')
mv "$s1_file" "$tmpdir/s1.saved"
before=$(cat "$st/manifest")
if "$cow" revert s1 --force > "$tmpdir/out" 2> "$tmpdir/err"; then
    fail "revert to a snapshot whose file is gone succeeded"
fi
grep -q "is gone" "$tmpdir/err" || { cat "$tmpdir/err"; fail "revert error does not say the file is gone"; }
[ "$(cat "$st/manifest")" = "$before" ] || fail "the manifest changed"
server_alive srv || fail "the server died"
mv "$tmpdir/s1.saved" "$s1_file"
"$cow" revert s1 --force >/dev/null || fail "revert once the file is back"
stop_server srv
start_server srv base="$base" state="$st" control="$ctl"
qemu-io -f raw -r -c "read -P 0x11 0 1M" "$(server_uri srv)" | grep -q "Pattern verification failed" &&
    fail "after the revert the disk is not s1"
stop_server srv
note "pass"
