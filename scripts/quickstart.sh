#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# cowchain demo, the headline in under a minute: a guest-like writer keeps
# writing over NBD while the disk takes live snapshots (each prints how
# long guest I/O paused), QEMU's own tools read the frozen layers while
# the server runs, a snapshot is merged away in the background with a
# progress bar, and the disk is reverted to an earlier snapshot.  The
# base image is never written.
#
# Installs missing Debian packages and builds the plugin and the tool (no
# sanitizers) when needed.  All demo files live in a fresh temporary
# directory, which is removed at the end unless COWCHAIN_KEEP_DEMO=1.
#
# Environment:
#   DEMO_SIZE            size of the demo base image (default 256M, at
#                        least 256M)
#   DEMO_WRITE_SECONDS   how long the writer runs at most (default 30)
#   COWCHAIN_KEEP_DEMO=1 keep the temporary directory
#   COWCHAIN_PLUGIN      use this plugin .so instead of building build/
#   COWCHAIN_TOOL        with COWCHAIN_PLUGIN: use this cowchain tool
#                        (default: cowchain next to the plugin's build)
set -euo pipefail

# shellcheck source=scripts/deps.sh
. "$(dirname "${BASH_SOURCE[0]}")/deps.sh"

DEMO_SIZE=${DEMO_SIZE:-256M}
DEMO_WRITE_SECONDS=${DEMO_WRITE_SECONDS:-30}
KEEP=${COWCHAIN_KEEP_DEMO:-0}

if [ -t 1 ]; then
    BOLD=$(printf '\033[1m') PLAIN=$(printf '\033[0m')
else
    BOLD='' PLAIN=''
fi
step() {
    printf '\n%s### %s%s\n' "$BOLD" "$*" "$PLAIN"
}
# show CMD...: print a command as a user would type it, then run it.
show() {
    local a line='$'
    for a in "$@"; do
        a=${a//$DEMO\//}
        case $a in
            *[!A-Za-z0-9_./:=+@%,-]*) line+=" '$a'" ;;
            *) line+=" $a" ;;
        esac
    done
    printf '%s\n' "$line"
    "$@"
}
# snapshot NAME ARGS...: cowchain snapshot, with the wall-clock window
# around it noted for the writer's report.
snapshot() {
    local t0
    t0=$(date +%s.%N)
    show cowchain snapshot "$@"
    echo "$1 $t0 $(date +%s.%N)" >> "$DEMO/snapshot-windows"
}

cowchain_install_deps
if [ -n "${COWCHAIN_PLUGIN:-}" ]; then
    PLUGIN=$COWCHAIN_PLUGIN
    TOOL=${COWCHAIN_TOOL:-$(dirname "$(dirname "$PLUGIN")")/cowchain}
else
    cowchain_build_plugin
    PLUGIN=$COWCHAIN_PLUGIN_SO
    TOOL=$COWCHAIN_BUILDDIR/cowchain
fi
if [ ! -x "$TOOL" ]; then
    echo "error: the cowchain tool is not at $TOOL (set COWCHAIN_TOOL)" >&2
    exit 1
fi
cowchain() {
    "$TOOL" "$@"
}

DEMO=$(mktemp -d "${TMPDIR:-/tmp}/cowchain-demo.XXXXXX")
BASE=$DEMO/base.img
STATE=$DEMO/vm1-vda
SOCK=$DEMO/vm1.sock
PIDFILE=$DEMO/vm1.pid
URI="nbd+unix:///?socket=$SOCK"
export COWCHAIN_CONTROL=$DEMO/vm1.ctl
SERVER_PID=
WRITER_PID=

cleanup() {
    local rc=$?
    if [ -n "$WRITER_PID" ]; then
        kill "$WRITER_PID" 2>/dev/null || true
        wait "$WRITER_PID" 2>/dev/null || true
    fi
    if [ -n "$SERVER_PID" ]; then
        cowchain_stop_pid "$SERVER_PID"
        SERVER_PID=
    fi
    if [ "$KEEP" = 1 ] || [ "$rc" -ne 0 ]; then
        echo "Demo files kept in $DEMO"
    else
        rm -rf "$DEMO"
        echo "Removed $DEMO (set COWCHAIN_KEEP_DEMO=1 to keep it)"
    fi
    if [ "$rc" -ne 0 ]; then
        echo "quickstart FAILED (exit $rc)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "Demo directory: $DEMO (paths below are relative to it)"
cd "$DEMO"

step "1. A $DEMO_SIZE raw base image: the golden image, never written"
truncate -s "$DEMO_SIZE" "$BASE"
# 0x42 ('B') in MiB 1..16, so there is base data nobody overwrites.
qemu-io -f raw -c 'write -P 0x42 1M 15M' "$BASE" > /dev/null
BASE_SUM_BEFORE=$(sha256sum "$BASE" | cut -d' ' -f1)
echo "base.img: $DEMO_SIZE, sha256 $BASE_SUM_BEFORE"

step "2. Serve it: nbdkit + the cowchain plugin, a state directory, a control socket"
show nbdkit -U "$SOCK" -P "$PIDFILE" "$PLUGIN" \
    base="$BASE" base-format=raw state="$STATE" control="$COWCHAIN_CONTROL"
SERVER_PID=$(cowchain_wait_pidfile "$PIDFILE")
cowchain_wait_for "$SOCK"
cowchain_wait_for "$COWCHAIN_CONTROL"
show nbdinfo --list "$URI" | grep -E '^export|description'

step "3. A writer: 64 KiB writes over NBD, one after another, until told to stop"
# Like a guest: it writes MiB 64..192 of the disk, flushes every 64
# writes, and at the end says how many writes it did, the slowest one,
# and the slowest one that overlapped each `cowchain snapshot`.
"$COWCHAIN_PYTHON" - "$URI" "$DEMO/writer.stop" "$DEMO_WRITE_SECONDS" \
    "$DEMO/snapshot-windows" > "$DEMO/writer.out" 2>&1 <<'PY' &
import os, sys, time
import nbd
uri, stop, seconds, windows = sys.argv[1:5]
h = nbd.NBD()
h.connect_uri(uri)
block, lo, n = 65536, 64 << 20, 2048
buf = bytearray(block)
log = []                                # (start, end) of every write
t0 = time.time()
while not os.path.exists(stop) and time.time() - t0 < float(seconds):
    buf[0:8] = len(log).to_bytes(8, "little")
    t = time.time()
    h.pwrite(bytes(buf), lo + (len(log) * 7919 % n) * block)
    log.append((t, time.time()))
    if len(log) % 64 == 0:
        h.flush()
h.flush()
h.shutdown()
took = time.time() - t0
ms = lambda w: (w[1] - w[0]) * 1000
print("writer: %d writes of 64 KiB in %.1f s (%.0f/s), no error; "
      "slowest write %.1f ms" % (len(log), took, len(log) / took,
                                 max(map(ms, log))))
for line in open(windows) if os.path.exists(windows) else []:
    name, a, b = line.split()
    during = [w for w in log if w[1] >= float(a) and w[0] <= float(b)]
    print("  %d writes overlapped 'cowchain snapshot %s' (%.0f ms in all), "
          "the slowest took %.1f ms"
          % (len(during), name, (float(b) - float(a)) * 1000,
             max(map(ms, during), default=0)))
PY
WRITER_PID=$!
sleep 1
kill -0 "$WRITER_PID" || { cat "$DEMO/writer.out"; exit 1; }
echo "writer running (PID $WRITER_PID)"

step "4. Live snapshot while the writer runs (the tool prints the pause)"
qemu-io -f raw "$URI" -c 'write -P 0xaa 0 64M' > /dev/null
echo "the disk's first 64 MiB now hold 0xaa: version 1 of the guest's data"
snapshot before-upgrade --description "version 1"
qemu-io -f raw "$URI" -c 'write -P 0xbb 0 64M' > /dev/null
echo "the 'upgrade' overwrote them with 0xbb"
snapshot after-upgrade --description "version 2"
show cowchain list
show cowchain list --tree
show cowchain status

step "5. QEMU's tools read the frozen layers while the server runs (-U)"
# The frozen layer of a snapshot: its "file" in cowchain list's JSON.
snapshot_file() {
    cowchain list --output=json | "$COWCHAIN_PYTHON" -c '
import json, sys
def walk(x):
    if isinstance(x, dict):
        if x.get("name") == sys.argv[1] and "file" in x:
            yield x["file"]
        for v in x.values():
            yield from walk(v)
    elif isinstance(x, list):
        for v in x:
            yield from walk(v)
print(next(walk(json.load(sys.stdin))))' "$1"
}
# The active layer: the source cowchain blklist shows (like virsh domblklist).
active_layer() {
    cowchain blklist | tail -n 1 | awk '{ print $NF }'
}
LAYER1=$(snapshot_file before-upgrade)
show qemu-img info -U --backing-chain "$(active_layer)" |
    grep -E '^(image|file format|virtual size|disk size|backing file):'
show qemu-io -f qcow2 -r -U "$LAYER1" -c 'read -P 0xaa 0 64M'
echo "the frozen layer still reads version 1, while the server serves version 2:"
show qemu-io -f raw -r "$URI" -c 'read -P 0xbb 0 64M'
if show qemu-img compare -U -f qcow2 -F raw "$LAYER1" "$URI"; then
    echo "ERROR: the frozen layer should differ from the live disk" >&2
    exit 1
fi

step "6. Merge a snapshot away in the background (the writer keeps going)"
show cowchain delete after-upgrade --wait --progress
show cowchain jobs
show cowchain list --tree

step "7. Stop the writer"
touch "$DEMO/writer.stop"
wait "$WRITER_PID"
WRITER_PID=
cat "$DEMO/writer.out"
ACTIVE=$(active_layer)
echo "QEMU reading the chain's files sees exactly what the server serves:"
show qemu-img compare -U -f qcow2 -F raw "$ACTIVE" "$URI"

step "8. Revert to before-upgrade (no client is connected now)"
show cowchain revert before-upgrade
show qemu-io -f raw -r "$URI" -c 'read -P 0xaa 0 64M'
show cowchain list --tree
ACTIVE=$(active_layer)

step "9. Stop the server (SIGTERM to PID $SERVER_PID): every layer is plain qcow2"
cowchain_stop_pid "$SERVER_PID"
SERVER_PID=
show qemu-img info --backing-chain "$ACTIVE" | grep -E '^(image|backing file):'
for layer in "$STATE"/layer-*.qcow2; do
    qemu-img check -q "$layer"
done
echo "qemu-img check: every layer clean"
show qemu-io -f qcow2 -r "$ACTIVE" -c 'read -P 0xaa 0 64M' -c 'read -P 0x42 64M 0' \
    -c 'read -P 0x42 1M 15M' > /dev/null && echo "QEMU reads version 1 and the base's data"

step "10. The base is unchanged"
BASE_SUM_AFTER=$(sha256sum "$BASE" | cut -d' ' -f1)
echo "sha256 before: $BASE_SUM_BEFORE"
echo "sha256 after:  $BASE_SUM_AFTER"
if [ "$BASE_SUM_BEFORE" != "$BASE_SUM_AFTER" ]; then
    echo "ERROR: the base image changed" >&2
    exit 1
fi
echo "base unchanged: every write went to the layers in $(basename "$STATE")/"

step "Done"
