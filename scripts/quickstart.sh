#!/usr/bin/env bash
# cowchain demo: serve a raw base image through the cowchain nbdkit plugin,
# write to it over NBD, and show that the writes landed in a qcow2 overlay
# while the base stayed byte-for-byte unchanged.
#
# Installs missing Debian packages and builds the plugin (no sanitizers)
# when needed.  All demo files live in a fresh temporary directory, which
# is removed at the end unless COWCHAIN_KEEP_DEMO=1.
#
# Environment:
#   DEMO_SIZE            size of the demo base image (default 256M)
#   COWCHAIN_KEEP_DEMO=1 keep the temporary directory
#   COWCHAIN_PLUGIN      use this plugin .so instead of building build/
set -euo pipefail

# shellcheck source=scripts/deps.sh
. "$(dirname "${BASH_SOURCE[0]}")/deps.sh"

DEMO_SIZE=${DEMO_SIZE:-256M}
KEEP=${COWCHAIN_KEEP_DEMO:-0}

if [ -t 1 ]; then
    BOLD=$(printf '\033[1m') PLAIN=$(printf '\033[0m')
else
    BOLD='' PLAIN=''
fi
step() {
    printf '\n%s### %s%s\n' "$BOLD" "$*" "$PLAIN"
}

cowchain_install_deps
if [ -n "${COWCHAIN_PLUGIN:-}" ]; then
    PLUGIN=$COWCHAIN_PLUGIN
else
    cowchain_build_plugin
    PLUGIN=$COWCHAIN_PLUGIN_SO
fi

DEMO=$(mktemp -d "${TMPDIR:-/tmp}/cowchain-demo.XXXXXX")
BASE=$DEMO/base.img
OVERLAY=$DEMO/layer.qcow2
SOCK=$DEMO/nbd.sock
PIDFILE=$DEMO/nbdkit.pid
URI="nbd+unix:///?socket=$SOCK"
SERVER_PID=

cleanup() {
    local rc=$?
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

step "Demo directory: $DEMO"

BASE_TEXT="cowchain demo: this sentence lives in the read-only base image."
NEW_TEXT="cowchain demo: this sentence was written over NBD into the overlay!"
MID_TEXT="hello from the guest, 100 MiB into the disk"

step "1. Create a $DEMO_SIZE raw base image with recognisable data"
truncate -s "$DEMO_SIZE" "$BASE"
printf '%s' "$BASE_TEXT" | dd of="$BASE" conv=notrunc status=none
# 0x42 ('B') in MiB 1..16, so there is base data the guest never touches.
qemu-io -f raw -c 'write -P 0x42 1M 15M' "$BASE" > /dev/null
ls -l "$BASE"
BASE_SUM_BEFORE=$(sha256sum "$BASE" | cut -d' ' -f1)
echo "sha256 of the base before: $BASE_SUM_BEFORE"

step "2. Serve it: nbdkit + cowchain plugin on $SOCK"
echo "nbdkit -U $SOCK -P $PIDFILE $PLUGIN base=$BASE overlay=$OVERLAY"
nbdkit -U "$SOCK" -P "$PIDFILE" "$PLUGIN" base="$BASE" overlay="$OVERLAY"
SERVER_PID=$(cowchain_wait_pidfile "$PIDFILE")
cowchain_wait_for "$SOCK"
echo "nbdkit is running as PID $SERVER_PID"

step "3. Write through NBD (nbdsh and qemu-io), then FLUSH"
cowchain_nbdsh -u "$URI" -c "
new = b'$NEW_TEXT'
h.pwrite(new, 0)
h.pwrite(b'$MID_TEXT', 100 * 1024 * 1024)
h.flush()
print('nbdsh: wrote %d bytes at offset 0 and %d bytes at 100 MiB, flushed'
      % (len(new), len(b'$MID_TEXT')))
"
# 4 MiB of 0xcd at 32 MiB, written by QEMU's own NBD client.
qemu-io -f raw "$URI" -c 'write -P 0xcd 32M 4M' -c 'flush'

step "4. Read back through NBD"
cowchain_nbdsh -u "$URI" -c "
import sys
size = h.get_size()
print('export size: %d bytes' % size)
checks = [
    ('offset 0 (overwritten)', 0, b'$NEW_TEXT'),
    ('offset 100 MiB (new)', 100 * 1024 * 1024, b'$MID_TEXT'),
    ('offset 1 MiB (base, untouched)', 1024 * 1024, b'B' * 16),
    ('offset 32 MiB (qemu-io)', 32 * 1024 * 1024, b'\xcd' * 16),
]
ok = True
for name, off, want in checks:
    got = h.pread(len(want), off)
    good = got == want
    ok = ok and good
    print('%-32s %s  %r' % (name, 'OK ' if good else 'BAD', bytes(got[:70])))
sys.exit(0 if ok else 1)
"
qemu-io -f raw -r "$URI" -c 'read -P 0xcd 32M 4M'

step "5. Stop the server (by PID $SERVER_PID)"
cowchain_stop_pid "$SERVER_PID"
SERVER_PID=
echo "stopped"

step "6. The overlay is an ordinary qcow2 file whose backing file is the base"
qemu-img info --backing-chain "$OVERLAY"
qemu-img check "$OVERLAY"
ls -ls "$BASE" "$OVERLAY"

step "7. QEMU's own tools read the same data from the files, no server"
qemu-io -f qcow2 -r "$OVERLAY" -c 'read -P 0xcd 32M 4M' -c 'read -P 0x42 1M 15M'

step "8. The base is unchanged"
BASE_SUM_AFTER=$(sha256sum "$BASE" | cut -d' ' -f1)
echo "sha256 before: $BASE_SUM_BEFORE"
echo "sha256 after:  $BASE_SUM_AFTER"
if [ "$BASE_SUM_BEFORE" != "$BASE_SUM_AFTER" ]; then
    echo "ERROR: the base image changed" >&2
    exit 1
fi
echo "base unchanged: every write went to $OVERLAY"

step "Done"
