#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The service recipe in contrib/systemd/ works as shipped: systemd-analyze
# verify accepts the units, and their own ExecStart lines, run the way
# systemd would run them (the example configuration's disks, the unit's
# runtime and state directories), serve the disks: cowchain@.service by
# itself (nbdkit listens and writes the unit's PIDFile), and
# cowchain-activated@.service through socket activation
# (systemd-socket-activate listens on the .socket unit's ListenStream and
# starts nbdkit at the first connection, passing it the socket).  Each
# time: nbdsh writes and reads back over the NBD socket, the cowchain tool
# takes a snapshot over the control socket, and the server stops on
# SIGTERM.
#
# Paths: /run/, /var/lib/, /etc/ and /images/ in the units and the example
# configuration are moved under this test's temporary directory, the
# plugin name `cowchain` becomes the built plugin, and %i becomes vm1.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit systemd-socket-activate systemd-analyze qemu-img
requires_python_nbd
requires_cowchain

units=$abs_top_srcdir/contrib/systemd
root=$tmpdir/root

note "systemd-analyze verify accepts the units"
mkdir "$tmpdir/units"
cp "$units"/*.service "$units"/*.socket "$tmpdir/units/"
for u in cowchain@vm1.service cowchain-activated@vm1.socket \
         cowchain-activated@vm1.service; do
    # --man=no: the manual pages are not installed here.
    if ! systemd-analyze verify --man=no "$tmpdir/units/$u" \
            > "$tmpdir/verify.out" 2>&1 || [ -s "$tmpdir/verify.out" ]; then
        cat "$tmpdir/verify.out"
        fail "systemd-analyze verify $u complained (see above)"
    fi
done

# relocate: the unit's paths under $root, %i = vm1.
relocate ()
{
    sed -e "s|%i|vm1|g" -e "s|/run/|$root/run/|g" \
        -e "s|/var/lib/|$root/var/lib/|g" -e "s|/etc/|$root/etc/|g" \
        -e "s|/images/|$root/images/|g"
}

# unit_value UNIT KEY: the (relocated) value of KEY= in UNIT.
unit_value ()
{
    local v
    v=$(sed -n "s/^$2=//p" "$units/$1" | relocate)
    [ -n "$v" ] || fail "$1 has no $2="
    echo "$v"
}

# exec_argv UNIT: the unit's ExecStart as an argv in the array argv, the
# way systemd expands it: $COWCHAIN_DISKS from the EnvironmentFile split
# at spaces, the plugin by name replaced with the built one.
exec_argv ()
{
    local line envfile w
    line=$(unit_value "$1" ExecStart)
    envfile=$(unit_value "$1" EnvironmentFile)
    [ -f "$envfile" ] || fail "$1: EnvironmentFile $envfile missing"
    # shellcheck disable=SC1090
    COWCHAIN_DISKS=$(sed -n 's/^COWCHAIN_DISKS=//p' "$envfile")
    [ -n "$COWCHAIN_DISKS" ] || fail "no COWCHAIN_DISKS in $envfile"
    argv=()
    for w in $line; do
        case $w in
            '$COWCHAIN_DISKS') for d in $COWCHAIN_DISKS; do argv+=("$d"); done ;;
            cowchain) argv+=("$COWCHAIN_PLUGIN") ;;
            *) argv+=("$w") ;;
        esac
    done
    [ "${argv[0]}" = /usr/bin/nbdkit ] ||
        fail "$1 runs ${argv[0]}, not /usr/bin/nbdkit"
    [ -x "${argv[0]}" ] || fail "${argv[0]} does not exist here"
}

# The images the example configuration names, and /etc/cowchain/vm1.conf.
mkdir -p "$root/images" "$root/etc/cowchain"
qemu-img create -q -f qcow2 "$root/images/golden.qcow2" 16M
truncate -s 8M "$root/images/data.raw"
relocate < "$units/vm.conf.example" > "$root/etc/cowchain/vm1.conf"

# use_disks SOCKET CONTROL PATTERN: write PATTERN to both disks over NBD
# and read it back on a second connection; a snapshot over the control
# socket.
use_disks ()
{
    local sock=$1 ctl=$2 pat=$3 d
    for d in vda vdb; do
        nbdsh -u "nbd+unix:///$d?socket=$sock" \
            -c "h.pwrite(bytes([$pat]) * 65536, 65536); h.flush()" ||
            fail "could not write $d over $sock"
        nbdsh -u "nbd+unix:///$d?socket=$sock" \
            -c "assert h.pread(65536, 65536) == bytes([$pat]) * 65536" ||
            fail "$d did not read back what was written"
    done
    run_cowchain snapshot --control "$ctl" --disk vda "snap-$pat"
    [ "$rc" = 0 ] || fail "snapshot over $ctl failed: $(cat "$tmpdir/err")"
}

# wait_gone PID: until it exits (10 s at most).
wait_gone ()
{
    local i
    for (( i = 0; i < 200; i++ )); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.05
    done
    fail "PID $1 did not exit on SIGTERM"
}

note "cowchain@vm1.service: its ExecStart serves the disks"
exec_argv cowchain@.service
# What systemd does before ExecStart: RuntimeDirectory, StateDirectory.
mkdir -p "$root/run/$(unit_value cowchain@.service RuntimeDirectory)" \
    "$root/var/lib/$(unit_value cowchain@.service StateDirectory)"
pidfile=$(unit_value cowchain@.service PIDFile)
# --log=syslog would hide the server's messages from this test.
env ${server_env[@]+"${server_env[@]}"} "${argv[@]/--log=syslog/--log=stderr}" \
    </dev/null >"$tmpdir/service.log" 2>&1 ||
    { cat "$tmpdir/service.log"; fail "nbdkit (Type=forking) failed to start"; }
# nbdkit writes the pidfile in the child, after the parent has returned,
# and starts the control socket just after: like systemd (which waits for
# a PIDFile= that is not there yet), wait for both.
for (( i = 0; i < 200; i++ )); do
    [ -s "$pidfile" ] && [ -S "$root/run/cowchain/vm1/control.sock" ] && break
    sleep 0.05
done
[ -s "$pidfile" ] || fail "no PIDFile $pidfile 10 s after nbdkit returned"
pid=$(cat "$pidfile")
on_exit "kill -KILL $pid 2>/dev/null"
use_disks "$root/run/cowchain/vm1/nbd.sock" \
    "$root/run/cowchain/vm1/control.sock" 0x11
[ -d "$root/var/lib/cowchain/vm1/vda" ] && [ -d "$root/var/lib/cowchain/vm1/vdb" ] ||
    fail "the state directories are not under /var/lib/cowchain/vm1"
kill -TERM "$pid"
wait_gone "$pid"
check_sanitizer_log "$tmpdir/service.log"
rm -rf "$root/run"

note "cowchain-activated@vm1: socket activation"
listen=$(unit_value cowchain-activated@.socket ListenStream)
[ "$listen" = "$root/run/cowchain/vm1/nbd.sock" ] ||
    fail "the socket unit listens on $listen"
exec_argv cowchain-activated@.service
# Like DirectoryMode= of the socket unit: systemd makes the directory.
mkdir -p "$(dirname "$listen")" \
    "$root/var/lib/$(unit_value cowchain-activated@.service StateDirectory)"
# systemd-socket-activate gives the server only the environment it is
# told to (-E): the sanitizer build's LD_PRELOAD and options.
sa_env=()
for e in ${server_env[@]+"${server_env[@]}"}; do
    sa_env+=(-E "$e")
done
systemd-socket-activate ${sa_env[@]+"${sa_env[@]}"} -l "$listen" "${argv[@]}" \
    </dev/null >"$tmpdir/activated.log" 2>&1 &
pid=$!
on_exit "kill -KILL $pid 2>/dev/null"
for (( i = 0; i < 200; i++ )); do
    [ -S "$listen" ] && break
    kill -0 "$pid" 2>/dev/null || { cat "$tmpdir/activated.log"; fail "systemd-socket-activate exited"; }
    sleep 0.05
done
[ -S "$listen" ] || fail "systemd-socket-activate does not listen on $listen"
# Nothing runs the server until a client connects.
[ ! -e "$root/run/cowchain/vm1/control.sock" ] ||
    fail "the control socket exists before the first connection"
nbdsh -u "nbd+unix:///vda?socket=$listen" \
    -c 'assert h.pread(65536, 65536) == b"\x11" * 65536' ||
    fail "the activated server does not serve the earlier writes"
grep -q "cowchain" /proc/"$pid"/cmdline 2>/dev/null ||
    fail "the first connection did not start nbdkit"
use_disks "$listen" "$root/run/cowchain/vm1/control.sock" 0x22
run_cowchain list --control "$root/run/cowchain/vm1/control.sock" --disk vda
grep -q snap-0x11 "$tmpdir/out" && grep -q snap-0x22 "$tmpdir/out" ||
    fail "the snapshots of both runs are not listed: $(cat "$tmpdir/out")"
kill -TERM "$pid"
wait "$pid" || fail "nbdkit (socket-activated) exited with status $? on SIGTERM"
check_sanitizer_log "$tmpdir/activated.log"

note "the layers are clean qcow2 files"
for layer in "$root"/var/lib/cowchain/vm1/vd?/layer-*.qcow2; do
    check_image "$layer"
done

note "ok"
