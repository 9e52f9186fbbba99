#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# A snapshot whose manifest cannot be saved (DESIGN.md invariant 7).
#
# The snapshot is taken in memory (the guest writes into the new layer at
# once) but the manifest on disk still names the old chain: the disk is
# degraded.  Then FLUSH and FUA must fail, `cowchain status` must say why
# (exit 1), other chain changes are refused, and nothing acknowledged may
# be lost by a kill -9.  Once the cause is gone, the next FLUSH saves the
# manifest and succeeds, and a restart finds the snapshot and every
# acknowledged write.  Two causes: `.manifest.tmp` made a directory, and a
# full file system (the state directory on a small tmpfs).
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img
requires_python_nbd

cow=$abs_top_builddir/cowchain
[ -x "$cow" ] || fail "cowchain tool not built: $cow"
ctl=$tmpdir/ctl
export COWCHAIN_CONTROL=$ctl
size=$((8 << 20))
make_random_file "$tmpdir/base.img" "$size" 3

# guest STEP...: run guest steps against the server, with the model in
# $tmpdir/model (the disk as acknowledged writes left it) and $tmpdir/cur
# (as the guest should read it now).  Steps:
#   write:OFF:LEN:SEED   a write (not yet acknowledged)
#   flush-ok             FLUSH must succeed (acknowledges)
#   flush-fails          FLUSH must fail, with EIO
#   fua-fails:OFF:LEN:SEED  a FUA write must fail
#   write-fails:OFF:LEN:SEED  a plain write must fail (sync=MS, degraded)
#   read-cur             the disk reads as cur
#   read-model           the disk reads as model (after a restart)
guest () {
    "$PYTHON" - "$(server_uri srv)" "$tmpdir" "$@" <<'EOF'
import errno, os, random, sys
sys.path.insert(0, os.environ["testsdir"])
import nbd
from cowtest import connect, read_all, check_equal
uri, d, steps = sys.argv[1], sys.argv[2], sys.argv[3:]
cur_p, model_p = d + "/cur", d + "/model"
cur = bytearray(open(cur_p, "rb").read())
model = bytearray(open(model_p, "rb").read())
h = connect(uri)
def data(ln, seed):
    return random.Random(int(seed)).randbytes(int(ln))
for s in steps:
    f = s.split(":")
    if f[0] == "write":
        off, ln = int(f[1]), int(f[2])
        b = data(ln, f[3])
        h.pwrite(b, off)
        cur[off:off + ln] = b
    elif f[0] == "flush-ok":
        h.flush()
        model[:] = cur
    elif f[0] == "flush-fails":
        try:
            h.flush()
        except nbd.Error as e:
            if e.errnum != errno.EIO:
                sys.exit("FLUSH failed with %s, expected EIO" % e)
        else:
            sys.exit("FLUSH succeeded on a degraded disk")
    elif f[0] == "fua-fails":
        off, ln = int(f[1]), int(f[2])
        b = data(ln, f[3])
        try:
            h.pwrite(b, off, nbd.CMD_FLAG_FUA)
        except nbd.Error as e:
            if e.errnum != errno.EIO:
                sys.exit("FUA write failed with %s, expected EIO" % e)
            # The data went to the disk; only its durability failed.
            cur[off:off + ln] = h.pread(ln, off)
        else:
            sys.exit("FUA write succeeded on a degraded disk")
    elif f[0] == "write-fails":
        off, ln = int(f[1]), int(f[2])
        b = data(ln, f[3])
        try:
            h.pwrite(b, off)
        except nbd.Error as e:
            if e.errnum != errno.EIO:
                sys.exit("write failed with %s, expected EIO" % e)
            cur[off:off + ln] = h.pread(ln, off)
        else:
            sys.exit("a write under sync=MS succeeded on a degraded disk")
    elif f[0] == "read-cur":
        check_equal(read_all(h), cur, 0, "disk vs what the guest wrote")
    elif f[0] == "read-model":
        check_equal(read_all(h), model, 0, "disk vs acknowledged writes")
        cur[:] = model
    else:
        sys.exit("bad step " + s)
h.shutdown()
open(cur_p, "wb").write(cur)
open(model_p, "wb").write(model)
EOF
}

# The snapshot's frozen layer, read offline, equals a saved state.
snapshot_equals () {   # NAME FILE
    local layer
    layer=$("$cow" list --state "$tmpdir/st" --output=json |
        "$PYTHON" -c 'import json,sys; n=sys.argv[1]; print([s["file"] for s in json.load(sys.stdin)["snapshots"] if s["name"] == n][0])' "$1") ||
        fail "no snapshot $1 offline"
    qemu-img convert -O raw "$layer" "$tmpdir/snap.raw"
    cmp -s "$tmpdir/snap.raw" "$2" || fail "snapshot $1 does not hold its state"
}


status_degraded () {        # status_degraded TEXT: degraded, reason has TEXT
    if "$cow" status > "$tmpdir/status"; then
        cat "$tmpdir/status"; fail "status exits 0 on a degraded disk"
    fi
    grep -q ' degraded ' "$tmpdir/status" &&
        grep -q -i -- "$1" "$tmpdir/status" ||
        { cat "$tmpdir/status"; fail "status does not show degraded: $1"; }
}

status_ok () {
    "$cow" status > "$tmpdir/status" || { cat "$tmpdir/status"; fail "status"; }
    grep -q ' ok ' "$tmpdir/status" || { cat "$tmpdir/status"; fail "status not ok"; }
}

layer_files_in () { ls "$1" | grep '^layer-' | sort | tr '\n' ' '; }

#----------------------------------------------------------------------
note "manifest save refused (.manifest.tmp is a directory), then kill -9"
cp "$tmpdir/base.img" "$tmpdir/cur"; cp "$tmpdir/base.img" "$tmpdir/model"
start_server srv base="$tmpdir/base.img" state="$tmpdir/st" control="$ctl"
guest write:0:1048576:1 write:3000000:70000:2 flush-ok
"$cow" snapshot s0 >/dev/null
cp "$tmpdir/model" "$tmpdir/s0.state"
guest write:65536:200000:3 flush-ok
cp "$tmpdir/st/manifest" "$tmpdir/manifest.before"
mkdir "$tmpdir/st/.manifest.tmp"
expect_fail "disk is degraded" "$cow" snapshot s1
cp "$tmpdir/model" "$tmpdir/s1.state"
cmp -s "$tmpdir/st/manifest" "$tmpdir/manifest.before" ||
    fail "the manifest changed although its save failed"
status_degraded "manifest"
# Guest I/O goes on into the new layer, but nothing is acknowledged.
guest write:100000:300000:4 read-cur flush-fails fua-fails:5000000:4096:5 \
      write:7000000:65536:6 read-cur flush-fails
expect_fail "disk is degraded" "$cow" snapshot s2
expect_fail "disk is degraded" "$cow" delete s0
expect_fail "disk is degraded" "$cow" revert s0 --force
crash_server srv
start_server srv base="$tmpdir/base.img" state="$tmpdir/st" control="$ctl"
guest read-model
"$cow" list > "$tmpdir/list"
grep -q '^ s0 ' "$tmpdir/list" || { cat "$tmpdir/list"; fail "s0 lost"; }
grep -q '^ s1 ' "$tmpdir/list" && fail "s1 is listed though never saved"
# The restart cannot save either while .manifest.tmp is a directory, but
# it does not need to: the old chain is whole.
status_ok

#----------------------------------------------------------------------
note "the cause goes away: the next FLUSH saves the manifest"
expect_fail "manifest" "$cow" snapshot s1
status_degraded "manifest"
guest write:2000000:50000:7 flush-fails
rmdir "$tmpdir/st/.manifest.tmp"
guest write:2500000:50000:8 flush-ok read-cur
status_ok
"$cow" list | grep -q '^ s1 ' || fail "s1 not listed after the retry"
"$cow" snapshot s2 >/dev/null
cp "$tmpdir/model" "$tmpdir/s2.state"
guest write:0:4096:9 flush-ok
crash_server srv
start_server srv base="$tmpdir/base.img" state="$tmpdir/st" control="$ctl"
guest read-model
stop_server srv
for s in s0 s1 s2; do snapshot_equals $s "$tmpdir/$s.state"; done
for f in $(layer_files_in "$tmpdir/st"); do check_image "$tmpdir/st/$f" leaks-ok; done

#----------------------------------------------------------------------
note "sync=MS: a degraded disk acknowledges no write, then recovers"
rm -rf "$tmpdir/st"
cp "$tmpdir/base.img" "$tmpdir/cur"; cp "$tmpdir/base.img" "$tmpdir/model"
start_server srv base="$tmpdir/base.img" state="$tmpdir/st" control="$ctl" sync=100
guest write:0:65536:21 flush-ok
mkdir "$tmpdir/st/.manifest.tmp"
expect_fail "disk is degraded" "$cow" snapshot m1
guest write-fails:4096:4096:22 write-fails:3000000:65536:23 read-cur
sleep 0.3
guest write-fails:8192:4096:24 flush-fails
crash_server srv
start_server srv base="$tmpdir/base.img" state="$tmpdir/st" control="$ctl" sync=100
guest read-model
# Once the cause is gone the next write saves the manifest and works.
expect_fail "disk is degraded" "$cow" snapshot m1
rmdir "$tmpdir/st/.manifest.tmp"
guest write:12288:4096:25 flush-ok read-cur
status_ok
stop_server srv

#----------------------------------------------------------------------
note "a FIFO or a symlink planted as .manifest.tmp is replaced, not used"
start_server srv base="$tmpdir/base.img" state="$tmpdir/st" control="$ctl"
mkfifo "$tmpdir/st/.manifest.tmp"
timeout 60 "$cow" snapshot p1 > /dev/null || fail "snapshot with a FIFO as .manifest.tmp"
echo "precious" > "$tmpdir/victim"
ln -s "$tmpdir/victim" "$tmpdir/st/.manifest.tmp"
"$cow" snapshot p2 > /dev/null || fail "snapshot with a symlink as .manifest.tmp"
[ "$(cat "$tmpdir/victim")" = precious ] || fail "the symlink's target was written"
[ -f "$tmpdir/st/manifest" ] && [ ! -L "$tmpdir/st/manifest" ] ||
    fail "the manifest is not a plain file"
ln -s "$tmpdir/nowhere" "$tmpdir/st/.manifest.tmp"
"$cow" snapshot p3 > /dev/null || fail "snapshot with a dangling symlink as .manifest.tmp"
[ -e "$tmpdir/nowhere" ] && fail "a dangling symlink's target was created"
"$cow" list | grep -q '^ p3 ' || fail "p3 not listed"
status_ok
stop_server srv

#----------------------------------------------------------------------
note "a full state file system (tmpfs): snapshot, FLUSH, then space freed"
[ "$(id -u)" = 0 ] || skip "needs root to mount a small tmpfs"
requires mount umount
small=$tmpdir/small
mkdir "$small"
mount -t tmpfs -o size=16M tmpfs "$small" || fail "cannot mount a tmpfs"
on_exit "umount '$small'"
rm -rf "$tmpdir/st"
cp "$tmpdir/base.img" "$tmpdir/cur"; cp "$tmpdir/base.img" "$tmpdir/model"
start_server srv base="$tmpdir/base.img" state="$small/st" control="$ctl"
guest write:0:1048576:11 flush-ok
# Fill the file system, then give back one page at a time and try a
# snapshot each time: while the new layer does not fit, the snapshot
# fails and changes nothing; at the page where the layer just fits, the
# manifest finds no room: degraded.
"$PYTHON" - "$small" <<'EOF'
import os, sys
fd = os.open(sys.argv[1] + "/filler", os.O_WRONLY | os.O_CREAT, 0o644)
for bs in (1 << 20, 4096):
    try:
        while True:
            os.write(fd, b"\1" * bs)
    except OSError:
        pass
os.close(fd)
EOF
files_before=$(layer_files_in "$small/st")
freed=no
# A new layer takes some 64 pages of 4 KiB here: start a little below.
truncate -s -$((40 * 4096)) "$small/filler"
for (( pages = 41; pages <= 400; pages++ )); do
    truncate -s -4096 "$small/filler"
    if "$cow" snapshot f$pages > "$tmpdir/out" 2> "$tmpdir/err"; then
        fail "snapshot f$pages succeeded with only $pages free pages"
    fi
    if grep -q -i "disk is degraded" "$tmpdir/err"; then freed=yes; break; fi
    grep -q -i "No space" "$tmpdir/err" ||
        { cat "$tmpdir/err"; fail "snapshot on a full file system: unexpected error"; }
    status_ok
    [ "$(layer_files_in "$small/st")" = "$files_before" ] ||
        fail "a failed snapshot left a layer file behind"
done
[ "$freed" = yes ] || fail "no page count let the layer fit without the manifest"
note "degraded with $pages free pages"
status_degraded "space"
guest read-cur flush-fails
crash_server srv
rm -f "$small/filler"
start_server srv base="$tmpdir/base.img" state="$small/st" control="$ctl"
guest read-model
"$cow" list | grep -q '^ f' && fail "a snapshot never saved is listed"
stop_server srv

note "pass"
