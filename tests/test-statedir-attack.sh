#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# A state directory cannot be turned against the host:
#   symbolic links planted under every name the engine creates (the next
#   layer files, .manifest.tmp, lock) leave the files they point at
#   untouched and uncreated, and are themselves left alone; a layer file
#   replaced by a symbolic link or a FIFO, and a layer file removed, are
#   refused with the file's name, nothing deleted; so is a manifest
#   replaced by a symbolic link or a FIFO; a FIFO as the base or
#   as a qcow2 base's backing file is refused, never waited on (server,
#   cowchain info --backing-chain); a read-only command on a path with no
#   disk creates nothing.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img timeout
requires_python_nbd

cow=$abs_top_builddir/cowchain
[ -x "$cow" ] || fail "cowchain tool not built: $cow"
base=$tmpdir/base.raw
truncate -s 4M "$base"
st=$tmpdir/st
out=$tmpdir/outside
mkdir "$out"
echo "precious" > "$out/victim"
echo "precious too" > "$out/victim2"
victim_sum=$(sha256 "$out/victim")
victim2_sum=$(sha256 "$out/victim2")

untouched () {
    [ "$(sha256 "$out/victim")" = "$victim_sum" ] || fail "$1: victim changed"
    [ "$(sha256 "$out/victim2")" = "$victim2_sum" ] || fail "$1: victim2 changed"
    local extra
    extra=$(cd "$out" && ls -A | grep -v -x -e victim -e victim2 -e 'moved.*' || true)
    [ -z "$extra" ] || fail "$1: files appeared outside the state directory: $extra"
}

write () {                      # write NAME BYTE OFFSET
    nbdsh -u "$(server_uri "$1")" -c "h.pwrite(bytes([$2]) * 65536, $3); h.flush()"
}

note "symbolic links under the names the engine creates"
start_server a base="$base" state="$st" control="$tmpdir/a.ctl"
write a 0x11 0
stop_server a
ln -s "$out/victim" "$st/layer-000002.qcow2"     # an existing file
ln -s "$out/new-layer" "$st/layer-000003.qcow2"  # a dangling link
ln -s "$out/victim2" "$st/.manifest.tmp"
ln -sfn "$out/lockfile" "$st/lock"      # replaces an older version's lock file
mkfifo "$st/layer-000004.qcow2"
start_server a base="$base" state="$st" control="$tmpdir/a.ctl"
COWCHAIN_CONTROL=$tmpdir/a.ctl "$cow" snapshot s1 > /dev/null
write a 0x22 65536
stop_server a
untouched "after a snapshot"
[ -L "$st/layer-000002.qcow2" ] && [ -L "$st/layer-000003.qcow2" ] &&
    [ -L "$st/lock" ] && [ -p "$st/layer-000004.qcow2" ] ||
    fail "planted files were removed or replaced"
[ -f "$st/layer-000005.qcow2" ] && [ ! -L "$st/layer-000005.qcow2" ] ||
    { ls -la "$st"; fail "the new layer is not the regular file layer-000005.qcow2"; }
grep -q "layer-000005.qcow2" "$st/manifest" || fail "the manifest does not name the new layer"
"$cow" list --state "$st" | grep -q s1 || fail "list does not show s1"
rm "$st/layer-000002.qcow2" "$st/layer-000003.qcow2" "$st/layer-000004.qcow2" \
    "$st/lock"; rm -f "$st/.manifest.tmp"

snapshot_dir () { (cd "$st" && ls -la --time-style=+ | sha256sum); }

note "a layer file replaced by a symbolic link"
mv "$st/layer-000001.qcow2" "$out/moved.qcow2"
moved_sum=$(sha256 "$out/moved.qcow2")
ln -s "$out/moved.qcow2" "$st/layer-000001.qcow2"
before=$(snapshot_dir)
expect_start_failure b base="$base" state="$st"
grep -q "layer-000001.qcow2: is a symbolic link" "$(server_log b)" ||
    { cat "$(server_log b)" >&2; fail "the symbolic link was not refused by name"; }
expect_fail "layer-000001.qcow2: is a symbolic link" "$cow" list --state "$st"
expect_fail "layer-000001.qcow2: is a symbolic link" "$cow" snapshot --state "$st" s2
[ "$(snapshot_dir)" = "$before" ] || fail "the state directory changed"
[ "$(sha256 "$out/moved.qcow2")" = "$moved_sum" ] || fail "the link's target changed"
rm "$st/layer-000001.qcow2"

note "a layer file replaced by a FIFO"
mkfifo "$st/layer-000001.qcow2"
before=$(snapshot_dir)
expect_start_failure c base="$base" state="$st"
grep -q "layer-000001.qcow2: is a FIFO" "$(server_log c)" ||
    { cat "$(server_log c)" >&2; fail "the FIFO layer was not refused by name"; }
[ "$(snapshot_dir)" = "$before" ] || fail "the state directory changed"
rm "$st/layer-000001.qcow2"

note "a layer file removed"
before=$(snapshot_dir)
expect_start_failure d base="$base" state="$st"
grep -q "layer-000001.qcow2: cannot open: No such file" "$(server_log d)" ||
    { cat "$(server_log d)" >&2; fail "the missing layer was not named"; }
expect_fail "layer-000001.qcow2: cannot open" "$cow" list --state "$st"
[ "$(snapshot_dir)" = "$before" ] || fail "the state directory changed"
mv "$out/moved.qcow2" "$st/layer-000001.qcow2"

note "the manifest replaced by a symbolic link, or by a FIFO"
mv "$st/manifest" "$out/moved.manifest"
ln -s "$out/moved.manifest" "$st/manifest"
before=$(snapshot_dir)
expect_start_failure i base="$base" state="$st"
grep -q "manifest: is a symbolic link" "$(server_log i)" ||
    { cat "$(server_log i)" >&2; fail "a symbolic link as the manifest was not refused"; }
expect_fail "manifest: is a symbolic link" "$cow" list --state "$st"
[ "$(snapshot_dir)" = "$before" ] || fail "the state directory changed"
rm "$st/manifest"
mkfifo "$st/manifest"
expect_start_failure j base="$base" state="$st"
grep -q "manifest: is not a regular file" "$(server_log j)" ||
    { cat "$(server_log j)" >&2; fail "a FIFO as the manifest was not refused"; }
rm "$st/manifest"
mv "$out/moved.manifest" "$st/manifest"
start_server e base="$base" state="$st"
nbdsh -u "$(server_uri e)" -c '
assert h.pread(512, 0) == b"\x11" * 512
assert h.pread(512, 65536) == b"\x22" * 512' || fail "the disk lost data"
stop_server e
untouched "after the layer attacks"

note "a FIFO as the base, and as a qcow2 base's backing file"
mkfifo "$tmpdir/fifo"
expect_start_failure f base="$tmpdir/fifo" overlay="$tmpdir/f.qcow2"
grep -q "fifo: is a FIFO" "$(server_log f)" ||
    { cat "$(server_log f)" >&2; fail "a FIFO base was not refused"; }
expect_start_failure g base="$tmpdir/fifo" base-format=raw state="$tmpdir/g"
grep -q "fifo: is a FIFO" "$(server_log g)" ||
    { cat "$(server_log g)" >&2; fail "a FIFO base (raw, state=) was not refused"; }
qemu-img create -q -f qcow2 -u -b fifo -F raw "$tmpdir/over-fifo.qcow2" 4M
expect_start_failure h base="$tmpdir/over-fifo.qcow2" overlay="$tmpdir/h.qcow2"
grep -q "fifo: is a FIFO" "$(server_log h)" ||
    { cat "$(server_log h)" >&2; fail "a FIFO backing file was not refused"; }
expect_fail "fifo: is a FIFO" timeout 30 "$cow" info --backing-chain "$tmpdir/over-fifo.qcow2"
expect_fail "fifo: is a FIFO" timeout 30 "$cow" info "$tmpdir/fifo"
[ ! -e "$tmpdir/f.qcow2" ] && [ ! -e "$tmpdir/h.qcow2" ] || fail "an overlay was created"

note "read-only commands create nothing"
expect_fail "no-such" "$cow" list --state "$tmpdir/no-such"
[ ! -e "$tmpdir/no-such" ] || fail "list created the state directory"
mkdir "$tmpdir/empty"
expect_fail "no manifest" "$cow" list --state "$tmpdir/empty"
[ -z "$(ls -A "$tmpdir/empty")" ] || fail "list created files in an empty directory"
