#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The control socket when clients misbehave: no client can hold the
# others up (a trickler, idle connections, one that never reads its
# reply), 64 clients at once are all answered, a connection over the
# bound hears "busy", the tool's --timeout bounds every wait, only the
# allowed uids get in (control-allow-uid), every request and refusal is
# logged, and the server stops at once with clients stuck on it.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img setpriv

cow=$abs_top_builddir/cowchain
[ -x "$cow" ] || fail "cowchain tool not built: $cow"
peers=("$PYTHON" "$testsdir/control-peers.py")
ctl=$tmpdir/ctl
log=$(server_log srv)
qemu-img create -q -f raw "$tmpdir/base.img" 1M

# Snapshots fsync; a state directory on tmpfs, when there is one, keeps
# the hundred of them below quick.
st=$(mktemp -d /dev/shm/cowchain-test-control.XXXXXX 2>/dev/null) ||
    st=$(mktemp -d "$tmpdir/st.XXXXXX")
on_exit rm -rf "$st"

# Times in milliseconds.
now () { echo $(( $(date +%s%N) / 1000000 )); }
elapsed () { echo $(( $(now) - $1 )); }

# wait_file FILE: wait (30 s at most) until FILE exists.
wait_file ()
{
    local i
    for (( i = 0; i < 600; i++ )); do
        [ -e "$1" ] && return 0
        sleep 0.05
    done
    fail "$1 did not appear"
}

# wait_log TEXT: wait (15 s at most) until the server's log has TEXT.
wait_log ()
{
    local i
    for (( i = 0; i < 300; i++ )); do
        grep -q -F -- "$1" "$log" && return 0
        sleep 0.05
    done
    cat "$log" >&2
    fail "the server's log never said: $1"
}

# fast_status: `cowchain status` answers, correctly, in under 2 s.
fast_status ()
{
    local t0 took
    t0=$(now)
    "$cow" status -c "$ctl" > "$tmpdir/status.out" ||
        fail "status failed while $1"
    took=$(elapsed "$t0")
    grep -q " ok .*/st/layer-" "$tmpdir/status.out" ||
        fail "status did not list the disk while $1"
    [ "$took" -lt 2000 ] || fail "status took ${took} ms while $1"
}

start_server srv base="$tmpdir/base.img" state="$st/st" control="$ctl"
[ "$(stat -c %a "$ctl")" = 600 ] || fail "socket mode $(stat -c %a "$ctl")"

note "every request and its outcome is logged"
"$cow" snapshot -c "$ctl" s1 > /dev/null
expect_fail "already exists" "$cow" snapshot -c "$ctl" s1
grep -q -F "control: uid 0: snapshot - s1 -: ok" "$log" ||
    fail "no log line for the snapshot"
grep -q -F "control: uid 0: snapshot - s1 -: error: " "$log" ||
    fail "no log line for the refused snapshot"
grep "control: uid 0: snapshot - s1 -: error: " "$log" |
    grep -q "already exists" || fail "the log line lacks the error"

note "tricklers are cut at their deadline and block nobody"
for i in 1 2 3 4; do
    "${peers[@]}" trickle "$ctl" 1 > "$tmpdir/trickle$i" &
    tricklers[i]=$!
done
sleep 1.5
for i in 1 2 3; do
    fast_status "4 clients trickle a byte a second"
    sleep 0.5
done
for i in 1 2 3 4; do
    wait "${tricklers[i]}"
    read -r took said < "$tmpdir/trickle$i"
    [ "$took" != never ] || fail "a trickler was never cut off"
    [ "$took" -gt 4500 ] && [ "$took" -lt 9000 ] ||
        fail "a trickler was cut off after ${took} ms, not at the 5 s deadline"
    case $said in
        *did%20not%20arrive%20in%20time*) ;;
        *) fail "the trickler was told: $said" ;;
    esac
done
wait_log "no request: the request line did not arrive in time"

note "64 clients at once are all answered"
"${peers[@]}" many "$ctl" 64 list "" > "$tmpdir/many"
[ "$(wc -l < "$tmpdir/many")" = 64 ] || fail "not 64 replies"
if grep -v -x "ok 2" "$tmpdir/many"; then
    fail "some of the 64 clients got a wrong reply (above; want 'ok 2')"
fi

note "a connection over the bound of 64 hears 'busy' at once"
rm -f "$tmpdir/ready"
"${peers[@]}" hold "$ctl" 64 4 "$tmpdir/ready" &
holder=$!
wait_file "$tmpdir/ready"
t0=$(now)
expect_fail "busy" "$cow" status -c "$ctl"
took=$(elapsed "$t0")
[ "$took" -lt 3000 ] || fail "busy took ${took} ms"
wait_log "refused: the control socket is busy"
wait "$holder"
fast_status "64 idle clients just left"

note "a client that never reads its reply blocks nobody"
# A reply larger than the server's socket buffer (208 KiB by default):
# layers with 3 KiB lines, half as many again as fill the buffer.
wmem=$(cat /proc/sys/net/core/wmem_default 2>/dev/null || echo 212992)
layers=$(( wmem * 3 / 2 / 3000 + 1 ))
desc=$(printf '%%%.0s' $(seq 1024))
for i in $(seq 2 "$layers"); do
    # (Only setting up: spare the sanitizer build the leak check of
    # each of these runs.)
    ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0 \
        "$cow" snapshot -c "$ctl" -D "$desc" "s$i" > /dev/null
done
rm -f "$tmpdir/ready"
"${peers[@]}" noread "$ctl" 8 "$tmpdir/ready" list "" &
noreader=$!
wait_file "$tmpdir/ready"
fast_status "a client does not read its reply"
sleep 1
fast_status "a client does not read its reply"
wait_log "control: uid 0: list -: the reply was not taken: timed out"
wait "$noreader"
"$cow" list -c "$ctl" > "$tmpdir/list" || fail "list failed"
[ "$(grep -c '^ s' "$tmpdir/list")" = "$layers" ] ||
    fail "list lacks snapshots"

note "the server stops at once with stuck clients connected"
# One client trickles its request, one does not read its reply: the stop
# must end both waits at once (the log says so), not at their deadlines.
"${peers[@]}" trickle "$ctl" 1 > /dev/null &
trickler=$!
rm -f "$tmpdir/ready"
"${peers[@]}" noread "$ctl" 30 "$tmpdir/ready" list "" &
noreader=$!
wait_file "$tmpdir/ready"
sleep 0.5
t0=$(now)
# Not stop_server: that first waits for the server's extra threads to end.
kill -TERM "$(server_pid srv)"
reap_server srv
took=$(elapsed "$t0")
[ "$exit_status" = 0 ] || fail "the server exited with status $exit_status"
# (Closing a disk of a hundred layers, and the sanitizers' leak check,
# take their time on a busy machine: only a hang fails here.)
[ "$took" -lt 20000 ] || fail "the server took ${took} ms to stop"
grep -q -F "control: uid 0: no request: the server is stopping" "$log" ||
    fail "the trickler was not cut off by the stop"
grep -q -F "control: uid 0: list -: the reply was not taken: Operation canceled" \
    "$log" || fail "the client that does not read was not cut off by the stop"
kill "$noreader"
wait "$trickler" "$noreader" || :
[ ! -e "$ctl" ] || fail "the control socket is left behind"

note "--timeout: a server that accepts and never answers"
"${peers[@]}" silent "$tmpdir/silent.ctl" "$tmpdir/silent.ready" &
silent=$!
on_exit kill "$silent"
wait_file "$tmpdir/silent.ready"
for form in "--timeout 2 status -c $tmpdir/silent.ctl" \
            "status -c $tmpdir/silent.ctl --timeout=2" \
            "list --timeout 2 -c $tmpdir/silent.ctl"; do
    t0=$(now)
    # shellcheck disable=SC2086
    expect_fail "timed out after 2 s waiting for the reply" "$cow" $form
    took=$(elapsed "$t0")
    [ "$took" -gt 1900 ] && [ "$took" -lt 4000 ] ||
        fail "cowchain $form gave up after ${took} ms"
done
t0=$(now)
COWCHAIN_TIMEOUT=1 expect_fail "timed out after 1 s" \
    "$cow" jobs -c "$tmpdir/silent.ctl"
[ "$(elapsed "$t0")" -lt 3000 ] || fail "COWCHAIN_TIMEOUT=1 did not bound jobs"

note "--timeout: a server that never accepts"
"${peers[@]}" full "$tmpdir/full.ctl" "$tmpdir/full.ready" &
full=$!
on_exit kill "$full"
wait_file "$tmpdir/full.ready"
t0=$(now)
expect_fail "waiting for the server to accept the connection" \
    "$cow" --timeout=1 blklist -c "$tmpdir/full.ctl"
[ "$(elapsed "$t0")" -lt 3000 ] || fail "--timeout did not bound connect"

note "--timeout: bad values"
expect_fail "not a whole number of seconds" "$cow" status -c "$ctl" --timeout=1.5
expect_fail "not a whole number of seconds" "$cow" --timeout=-1 status
COWCHAIN_TIMEOUT=x expect_fail "COWCHAIN_TIMEOUT: 'x'" \
    "$cow" list -c "$ctl"

note "control-allow-uid: another uid"
# The socket's directory must be reachable by uid 65534.
pub=$tmpdir/pub
mkdir "$pub"
chmod 755 "$pub"
chmod o+x "$tmpdir"
nobody=(setpriv --reuid 65534 --regid 65534 --clear-groups)
ctl=$pub/ctl

# Nobody else allowed: mode 0600, the kernel refuses uid 65534.
no_leak_check=1 start_server srv state="$st/st" control="$ctl"
[ "$(stat -c %a "$ctl")" = 600 ] || fail "socket mode $(stat -c %a "$ctl")"
expect_fail "control-allow-uid" "${nobody[@]}" "$cow" status -c "$ctl"
stop_server srv

# Another uid allowed: mode 0666, the server refuses uid 65534 and logs it.
no_leak_check=1 start_server srv state="$st/st" control="$ctl" \
    control-allow-uid=65533
[ "$(stat -c %a "$ctl")" = 666 ] || fail "socket mode $(stat -c %a "$ctl")"
expect_fail "uid 65534 is not allowed" "${nobody[@]}" "$cow" status -c "$ctl"
wait_log "control: uid 65534: refused: uid 65534 is not allowed"
# A flood of refused connections is logged at most 10 a second, the rest
# counted.
"${nobody[@]}" "$PYTHON" - "$ctl" <<'EOF'
import socket, sys, time
t = time.monotonic()
n = 0
while time.monotonic() - t < 2.5:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.recv(200)
    s.close()
    n += 1
time.sleep(1.1)
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.recv(200)
s.close()
print(n, file=sys.stderr)
assert n > 100, "only %d connections in 2.5 s" % n
EOF
wait_log "more connections refused within that second, not logged one by one"
n=$(grep -c "uid 65534: refused" "$log")
(( n <= 60 )) || fail "$n refusals logged one by one in about 4 s"
"$cow" status -c "$ctl" > /dev/null || fail "root was refused"
stop_server srv

# uid 65534 allowed: it works, and is logged under its uid.
start_server srv state="$st/st" control="$ctl" control-allow-uid=65534
"${nobody[@]}" "$cow" status -c "$ctl" > "$tmpdir/out" ||
    fail "uid 65534 was refused although allowed"
grep -q "/st/layer-" "$tmpdir/out" || fail "uid 65534: wrong status"
wait_log "control: uid 65534: status: ok"
stop_server srv

note "control=: refuses a file that is not a socket, and a live socket"
echo keep > "$tmpdir/notsock"
expect_start_failure bad state="$st/st" control="$tmpdir/notsock"
grep -q "exists and is not a socket" "$(server_log bad)" ||
    fail "no clear error for a control= path that is a file"
[ "$(cat "$tmpdir/notsock")" = keep ] || fail "the file was changed"
start_server srv base="$tmpdir/base.img" overlay="$tmpdir/o.qcow2" \
    control="$tmpdir/live.ctl"
expect_start_failure bad base="$tmpdir/base.img" overlay="$tmpdir/o2.qcow2" \
    control="$tmpdir/live.ctl"
grep -q "another server is listening" "$(server_log bad)" ||
    fail "no clear error for a control= socket in use"
"$cow" blklist -c "$tmpdir/live.ctl" > /dev/null ||
    fail "the first server lost its control socket"
stop_server srv
expect_start_failure bad base="$tmpdir/base.img" overlay="$tmpdir/o.qcow2" \
    control-allow-uid=65534
grep -q "control-allow-uid needs control=" "$(server_log bad)" ||
    fail "no clear error for control-allow-uid without control="

note "control=: a missing directory stops a server going into the background; a relative path is the start directory's"
bg=( env ${server_env[@]+"${server_env[@]}"} ASAN_OPTIONS=detect_leaks=0
     nbdkit -U "$tmpdir/bg.sock" -P "$tmpdir/bg.pid" "$COWCHAIN_PLUGIN"
     base="$tmpdir/base.img" overlay="$tmpdir/bg.qcow2" )
if "${bg[@]}" control="$tmpdir/nodir/ctl" </dev/null >"$tmpdir/bg.log" 2>&1; then
    [ -s "$tmpdir/bg.pid" ] && kill "$(cat "$tmpdir/bg.pid")"
    fail "a control= socket in a missing directory did not stop the start"
fi
grep -q "nodir/ctl: control socket: cannot be created in" "$tmpdir/bg.log" ||
    { cat "$tmpdir/bg.log" >&2; fail "no clear error for a missing directory"; }
( cd "$tmpdir" && "${bg[@]}" control=rel.ctl </dev/null >"$tmpdir/bg.log" 2>&1 ) ||
    { cat "$tmpdir/bg.log" >&2; fail "the background server did not start"; }
bgpid=$(pidfile_pid "$tmpdir/bg.pid")
on_exit "kill -KILL $bgpid 2>/dev/null"
for (( i = 0; i < 100; i++ )); do [ -S "$tmpdir/rel.ctl" ] && break; sleep 0.05; done
[ -S "$tmpdir/rel.ctl" ] || fail "a relative control= was not made in the start directory"
"$cow" status -c "$tmpdir/rel.ctl" > /dev/null || fail "status on the relative socket failed"
kill "$bgpid"
for (( i = 0; i < 200; i++ )); do kill -0 "$bgpid" 2>/dev/null || break; sleep 0.05; done
