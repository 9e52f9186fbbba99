#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Image locks that QEMU honours, and state-directory locks:
#   while a server runs, qemu-io cannot write a layer (active or frozen)
#   nor the base; qemu-img info without -U is refused on a layer but works
#   with -U and on the base; cowchain check (-r leaks or not) refuses a
#   live layer; a second server on the same state= or overlay= is refused,
#   naming what holds it; two disks sharing one base (in one server and in
#   two) all serve; a commit into a shared base is refused cleanly; the
#   state directory stays locked when an old 'lock' file is deleted; a
#   read-only tool shares the directory lock; after the servers stop,
#   everything works again.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img qemu-io flock
requires_python_nbd

cow=$abs_top_builddir/cowchain
[ -x "$cow" ] || fail "cowchain tool not built: $cow"
base=$tmpdir/base.raw
truncate -s 4M "$base"
st=$tmpdir/st

# live_layer FILE: what QEMU's tools may and may not do with a layer of a
# running server.
live_layer () {
    local f=$1
    expect_fail 'Failed to get "write" lock' qemu-io -f qcow2 -c 'write 0 512' "$f"
    grep -q 'Is another process using the image' "$tmpdir/err" ||
        fail "qemu-io's refusal of $f is not QEMU's usual one"
    expect_fail 'Failed to get shared "write" lock' qemu-img info "$f"
    qemu-img info -U "$f" > /dev/null || fail "qemu-img info -U $f failed"
    expect_fail "locked by another process" "$cow" check -r leaks "$f"
    expect_fail "locked by another process" "$cow" check "$f"
    expect_fail "locked by another process" "$cow" info "$f"
    "$cow" info -U "$f" > /dev/null || fail "cowchain info -U $f failed"
}

note "state= disk: the active layer, the base"
echo old > "$st.lock-content"
mkdir "$st"
cp "$st.lock-content" "$st/lock"        # as an earlier version left it
start_server a base="$base" state="$st" control="$tmpdir/a.ctl"
export COWCHAIN_CONTROL=$tmpdir/a.ctl
nbdsh -u "$(server_uri a)" -c 'h.pwrite(b"\x11" * 65536, 0); h.flush()'
mapfile -t L < <(cd "$st" && ls layer-*.qcow2)
[ ${#L[@]} = 1 ] || fail "expected one layer, found: ${L[*]}"
live_layer "$st/${L[0]}"
expect_fail 'Failed to get "write" lock' qemu-io -f raw -c 'write 0 512' "$base"
qemu-img info "$base" > /dev/null || fail "qemu-img info on the served base failed"
qemu-io -f raw -r -c 'read 0 512' "$base" > /dev/null ||
    fail "qemu-io could not read the served base"

note "a frozen layer"
"$cow" snapshot s1 > /dev/null
mapfile -t L < <(cd "$st" && ls layer-*.qcow2)
[ ${#L[@]} = 2 ] || fail "expected two layers, found: ${L[*]}"
live_layer "$st/${L[0]}"
live_layer "$st/${L[1]}"

note "a second server, offline tools on the state directory"
expect_start_failure b base="$base" state="$st"
grep -q "in use by another process (pid $(server_pid a), nbdkit)" "$(server_log b)" ||
    { cat "$(server_log b)" >&2; fail "the refusal does not name the server"; }
expect_fail "in use by another process (pid $(server_pid a)" "$cow" list --state "$st"
expect_fail "in use by another process" "$cow" snapshot --state "$st" s2
rm "$st/lock"
expect_start_failure c base="$base" state="$st"
grep -q "in use by another process" "$(server_log c)" ||
    { cat "$(server_log c)" >&2; fail "a deleted lock file let a second server in"; }
[ ! -e "$st/lock" ] || fail "a lock file was created"
stop_server a

note "two disks of one server on one state directory"
expect_start_failure two disk=a base="$base" state="$st" disk=b base="$base" state="$st"
grep -q "another disk of this server already uses this state directory" \
    "$(server_log two)" || { cat "$(server_log two)" >&2; fail "no clear refusal"; }

note "a server gone into the background (nbdkit forks after taking the lock)"
env ${server_env[@]+"${server_env[@]}"} ASAN_OPTIONS=detect_leaks=0 \
    nbdkit -U "$tmpdir/bg.sock" -P "$tmpdir/bg.pid" "$COWCHAIN_PLUGIN" \
    base="$base" state="$st" </dev/null >"$tmpdir/bg.log" 2>&1 ||
    { cat "$tmpdir/bg.log" >&2; fail "the background server did not start"; }
bg=$(pidfile_pid "$tmpdir/bg.pid")
on_exit "kill -KILL $bg 2>/dev/null"
expect_fail "in use by another process (pid $bg, nbdkit)" "$cow" list --state "$st"
kill "$bg"
for (( i = 0; i < 200; i++ )); do kill -0 "$bg" 2>/dev/null || break; sleep 0.05; done
kill -0 "$bg" 2>/dev/null && fail "the background server did not stop"

note "after the server stops"
qemu-img info "$st/${L[1]}" > /dev/null || fail "qemu-img info after stop failed"
"$cow" check -r leaks "$st/${L[1]}" > /dev/null || fail "check -r after stop failed"
"$cow" list --state "$st" > "$tmpdir/list" || fail "list after stop failed"
grep -q s1 "$tmpdir/list" || fail "list does not show s1"
qemu-io -f raw -c 'write -P 0x22 1M 512' "$base" > /dev/null ||
    fail "qemu-io cannot write the base after the server stopped"
[ ! -e "$st/lock" ] || fail "a lock file was created"

note "read-only tools share the directory lock, writers and servers do not"
flock -s "$st" sleep 60 &
holder=$!
on_exit "kill $holder 2>/dev/null"
for _ in $(seq 100); do
    grep -q "FLOCK .* READ  *$holder " /proc/locks && break
    sleep 0.05
done
"$cow" list --state "$st" > /dev/null || fail "list under a shared lock failed"
expect_fail "in use by another process (pid $holder, flock)" \
    "$cow" snapshot --state "$st" s2
expect_start_failure d base="$base" state="$st"
grep -q "in use by another process (pid $holder, flock)" "$(server_log d)" ||
    { cat "$(server_log d)" >&2; fail "the refusal does not name the holder"; }
kill "$holder"; wait "$holder" 2>/dev/null || true

note "overlay= mode"
ov=$tmpdir/ov.qcow2
start_server e base="$base" overlay="$ov"
nbdsh -u "$(server_uri e)" -c 'h.pwrite(b"\x33" * 65536, 0); h.flush()'
live_layer "$ov"
expect_fail 'Failed to get "write" lock' qemu-io -f raw -c 'write 0 512' "$base"
expect_start_failure f base="$base" overlay="$ov"
grep -q "$ov: locked by another process (open in pid $(server_pid e), nbdkit)" "$(server_log f)" ||
    { cat "$(server_log f)" >&2; fail "a second server on one overlay was not refused"; }

note "disks sharing one base: in one server and in two"
start_server g control="$tmpdir/g.ctl" \
    disk=vda base="$base" state="$tmpdir/vda" \
    disk=vdb base="$base" state="$tmpdir/vdb"
for disk in vda vdb; do
    nbdsh -u "nbd+unix:///$disk?socket=$tmpdir/g.sock" \
        -c 'assert h.pread(512, 1048576) == b"\x22" * 512' ||
        fail "$disk does not read the shared base"
done
stop_server e

note "a commit into a shared base is refused, nothing changes"
sum=$(sha256 "$base")
export COWCHAIN_CONTROL=$tmpdir/g.ctl
nbdsh -u "nbd+unix:///vda?socket=$tmpdir/g.sock" -c 'h.pwrite(b"\x44" * 65536, 0); h.flush()'
expect_fail "locked by another process" \
    "$cow" commit --disk vda --top active --base base --allow-base-write --wait
[ "$(sha256 "$base")" = "$sum" ] || fail "a refused commit changed the base"
nbdsh -u "nbd+unix:///vda?socket=$tmpdir/g.sock" \
    -c 'assert h.pread(512, 0) == b"\x44" * 512' ||
    fail "vda lost its data after the refused commit"
expect_fail 'Failed to get "write" lock' qemu-io -f raw -c 'write 0 512' "$base"
stop_server g
qemu-io -f raw -c 'write 0 512' "$base" > /dev/null ||
    fail "qemu-io cannot write the base after every server stopped"

note "a commit into the base takes the write permission only while it runs"
base2=$tmpdir/base2.raw
truncate -s 4M "$base2"
start_server h control="$tmpdir/h.ctl" base="$base2" state="$tmpdir/h-st"
export COWCHAIN_CONTROL=$tmpdir/h.ctl
nbdsh -u "$(server_uri h)" -c 'h.pwrite(b"\x55" * 65536, 0); h.flush()'
"$cow" commit --top active --base base --allow-base-write --force --wait > /dev/null ||
    fail "the commit into an unshared base failed"
cmp -n 65536 "$base2" <(head -c 65536 /dev/zero | tr '\0' '\125') ||
    fail "the commit did not reach the base"
qemu-img info "$base2" > /dev/null || fail "qemu-img info refused the base after the commit"
start_server i base="$base2" state="$tmpdir/i-st"
stop_server i
nbdsh -u "$(server_uri h)" -c 'h.pwrite(b"\x66" * 65536, 0); h.flush()'
"$cow" commit --top active --base base --allow-base-write --force --wait > /dev/null ||
    fail "a second commit into the base failed"
cmp -n 65536 "$base2" <(head -c 65536 /dev/zero | tr '\0' '\146') ||
    fail "the second commit did not reach the base"
expect_fail 'Failed to get "write" lock' qemu-io -f raw -c 'write 0 512' "$base2"
stop_server h
