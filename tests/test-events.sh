#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Logs, debug areas and the events stream (cowchain-control(5)).
#
# Two disks served with control=: `cowchain events --output=json` and a
# text reader follow the server while the test takes a snapshot, a
# refused one, reverts, runs a commit to its end (with its milestones), a
# delete whose final switch fails, and a snapshot whose manifest cannot
# be saved (the disk degrades): the events arrive in that order with
# their documented fields, one disk's stream sees only that disk, and
# `cowchain wait` exits as the jobs ended.  A reader that never reads
# does not slow snapshots or I/O and gets "lost" (or is cut off); the
# number of subscribers is bounded and requests still get through; the
# server's stop ends every stream with exit 0, and so does SIGINT.  With
# -v the events are in nbdkit's log, and -D cowchain.AREA=1 adds debug
# lines; without -v only the failures are.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img
requires_python_nbd
requires_cowchain

cow=$cowchain_bin
peers=("$PYTHON" "$testsdir/events-peers.py")
ctl=$tmpdir/ctl
log=$(server_log srv)
size=$((16 << 20))
# Refused snapshots in a burst: more events than a stalled reader's
# socket buffer and queue hold.
burst=2000
make_random_file "$tmpdir/a.img" "$size" 1
make_random_file "$tmpdir/b.img" "$size" 2

# wait_log COUNT TEXT: wait (30 s at most) until the log has TEXT COUNT
# times.
wait_log ()
{
    local i
    for (( i = 0; i < 600; i++ )); do
        [ "$(grep -c -F -- "$2" "$log" || :)" -ge "$1" ] && return 0
        sleep 0.05
    done
    fail "the server's log never said $1 times: $2"
}

# write_mib DISK OFFSET-MIB MIB SEED: write and flush through NBD.
write_mib ()
{
    nbdsh -u "nbd+unix:///$1?socket=$tmpdir/srv.sock" -c "
import random
h.pwrite(random.Random($4).randbytes($3 << 20), $2 << 20)
h.flush()" || fail "writing to $1"
}

# job_state DISK: the state word of the disk's job (control protocol).
job_state ()
{
    "${peers[@]}" ctl "$ctl" jobs "$1" | awk '{ print $4 }'
}

wait_job_state ()
{
    local i
    for (( i = 0; i < 600; i++ )); do
        [ "$(job_state "$1")" = "$2" ] && return 0
        sleep 0.05
    done
    fail "the job of $1 never became $2 (it is $(job_state "$1"))"
}

#----------------------------------------------------------------------
note "server with -v and every debug area; two readers of all events, one of vdb"
# Every job stops before its final switch (the test's hook), so that the
# test can make the switch fail.
server_env+=(COWCHAIN_JOB_STOP_AT=before-switch)
start_server srv -v -Dcowchain.snapshot=1 -Dcowchain.job=1 \
    -Dcowchain.control=1 -Dcowchain.events=1 -Dcowchain.sync=1 \
    disk=vda base="$tmpdir/a.img" base-format=raw state="$tmpdir/sta" \
    disk=vdb base="$tmpdir/b.img" base-format=raw state="$tmpdir/stb" \
    sync=200 control="$ctl"
"$cow" events -c "$ctl" --output=json > "$tmpdir/all.json" 2> "$tmpdir/all.err" &
all_pid=$!
"$cow" events -c "$ctl" > "$tmpdir/all.txt" 2> "$tmpdir/txt.err" &
txt_pid=$!
"$cow" events -c "$ctl" --disk=vdb --output=json > "$tmpdir/vdb.json" 2> "$tmpdir/vdb.err" &
vdb_pid=$!
wait_log 2 "events: ok (a stream)"
wait_log 1 "events vdb: ok (a stream)"

note "snapshot, a refused snapshot, another, a revert"
write_mib vda 0 8 11
run_cowchain snapshot -c "$ctl" -d vda s1
[ "$rc" = 0 ] || fail "snapshot s1: $(cat "$tmpdir/err")"
run_cowchain snapshot -c "$ctl" -d vda s1
[ "$rc" = 1 ] || fail "a second s1 was not refused"
write_mib vda 8 2 12
run_cowchain snapshot -c "$ctl" -d vda s2
[ "$rc" = 0 ] || fail "snapshot s2: $(cat "$tmpdir/err")"
run_cowchain revert -c "$ctl" -d vda --force s1
[ "$rc" = 0 ] || fail "revert: $(cat "$tmpdir/err")"
run_cowchain snapshot -c "$ctl" -d vdb t1
[ "$rc" = 0 ] || fail "snapshot t1 of vdb: $(cat "$tmpdir/err")"

note "a commit to its end: start, 25/50/75 %, end ok; cowchain wait exits 0"
write_mib vda 0 8 13
run_cowchain snapshot -c "$ctl" -d vda s3
[ "$rc" = 0 ] || fail "snapshot s3: $(cat "$tmpdir/err")"
run_cowchain commit -c "$ctl" -d vda --top s3 --force
[ "$rc" = 0 ] || fail "commit: $(cat "$tmpdir/err")"
wait_job_state vda paused
"$cow" wait -c "$ctl" -d vda > "$tmpdir/wait.out" 2> "$tmpdir/wait.err" &
wait_pid=$!
sleep 0.5
kill -0 "$wait_pid" 2>/dev/null || fail "cowchain wait returned while the job was paused"
run_cowchain resume -c "$ctl" -d vda
[ "$rc" = 0 ] || fail "resume: $(cat "$tmpdir/err")"
wait "$wait_pid" || fail "cowchain wait: exit $? after a job that completed: $(cat "$tmpdir/wait.err")"

note "a delete whose final switch fails: end failed; cowchain wait exits 1"
run_cowchain delete -c "$ctl" -d vda s3
[ "$rc" = 0 ] || fail "delete: $(cat "$tmpdir/err")"
wait_job_state vda paused
mkdir "$tmpdir/sta/.manifest.tmp"
run_cowchain resume -c "$ctl" -d vda
[ "$rc" = 0 ] || fail "resume: $(cat "$tmpdir/err")"
run_cowchain wait -c "$ctl" -d vda
[ "$rc" = 1 ] || fail "cowchain wait: exit $rc after a failed job"
grep -q "failed" "$tmpdir/err" || fail "cowchain wait did not say the job failed"

note "a snapshot whose manifest cannot be saved: degraded, snapshot-failed"
run_cowchain snapshot -c "$ctl" -d vda s4
[ "$rc" = 1 ] || fail "snapshot s4 should fail (no manifest can be saved)"
rmdir "$tmpdir/sta/.manifest.tmp"
write_mib vda 0 1 14       # its FLUSH saves the manifest: healthy again

note "a reader that never reads: snapshots and I/O go on; it gets lost or is cut off"
"${peers[@]}" stall "$ctl" "$tmpdir/stall.ready" "$tmpdir/stall.go" "$tmpdir/stall.out" &
stall_pid=$!
for (( i = 0; i < 200; i++ )); do [ -e "$tmpdir/stall.ready" ] && break; sleep 0.05; done
[ -e "$tmpdir/stall.ready" ] || fail "the stalled reader did not subscribe"
read -r burst_errors burst_slowest < <("${peers[@]}" burst "$ctl" vdb t1 $burst)
[ "$burst_errors" = "$burst" ] || fail "burst: $burst_errors of $burst refused snapshots"
note "$burst refused snapshots with a stalled reader: slowest reply $burst_slowest ms"
t0=$(date +%s%N)
run_cowchain snapshot -c "$ctl" -d vdb t2
[ "$rc" = 0 ] || fail "snapshot t2 with a stalled reader: $(cat "$tmpdir/err")"
took=$(( ($(date +%s%N) - t0) / 1000000 ))
note "a snapshot with a stalled reader took $took ms: $(cat "$tmpdir/out")"
[ "$took" -lt 5000 ] || fail "a snapshot took $took ms with a stalled reader"
write_mib vdb 0 4 15
touch "$tmpdir/stall.go"
wait "$stall_pid" || fail "the stalled reader failed"
note "the stalled reader: $(cat "$tmpdir/stall.out")"
read -r _ lines _ lost _ end < "$tmpdir/stall.out"
if [ "$lost" -gt 0 ]; then
    [ "$end" = open ] || fail "a reader that got 'lost' was also cut off: $(cat "$tmpdir/stall.out")"
    wait_log 1 "events: stream ended: the client went away"
elif [ "$end" = cut ]; then
    wait_log 1 "events: stream ended: the client took nothing for too long"
else
    fail "the stalled reader neither lost events nor was cut off: $(cat "$tmpdir/stall.out")"
fi

note "subscribers are bounded, and requests still get through"
# cowchain wait with every stream taken looks at the jobs instead, and
# says the same as with a stream: the last job of vda failed (above).
"$cow" wait -c "$ctl" > /dev/null 2>&1 && wait_rc=0 || wait_rc=$?
[ "$wait_rc" = 1 ] || fail "cowchain wait exited $wait_rc, not 1, after vda's failed job"
"${peers[@]}" limit "$ctl" "$cow" wait -c "$ctl" > "$tmpdir/limit.out" ||
    fail "limit probe failed"
cat "$tmpdir/limit.out"
# 16 in all: the three cowchain events readers hold three.
grep -q "^subscribed 13 error 16 too%20many%20event%20subscribers" "$tmpdir/limit.out" ||
    fail "the 17th subscriber was not refused with EBUSY"
grep -q "^status ok$" "$tmpdir/limit.out" || fail "status failed while 16 streams were open"
grep -q "^command $wait_rc$" "$tmpdir/limit.out" ||
    fail "cowchain wait did not exit $wait_rc while 16 streams were open"

note "SIGINT ends cowchain events with exit 0"
streams=$(grep -c -F -- "events: ok (a stream)" "$log" || :)
"$cow" events -c "$ctl" > "$tmpdir/int.txt" 2>&1 &
int_pid=$!
# Once it has subscribed (its handler is set by then: a background job
# of this shell ignores SIGINT until it sets one).
wait_log $((streams + 1)) "events: ok (a stream)"
kill -INT "$int_pid"
wait "$int_pid" || fail "cowchain events exited $? on SIGINT"

note "the server's stop ends every stream: exit 0"
stop_server srv
wait "$all_pid" || fail "cowchain events (json) exited $?: $(cat "$tmpdir/all.err")"
wait "$txt_pid" || fail "cowchain events (text) exited $?: $(cat "$tmpdir/txt.err")"
wait "$vdb_pid" || fail "cowchain events --disk vdb exited $?: $(cat "$tmpdir/vdb.err")"

note "the events, in order, with their fields"
# vda's and vdb's, as they happened; the refused snapshots of vdb
# are all there (a reader that reads loses nothing).
"$PYTHON" - "$tmpdir/all.json" "$tmpdir/vda.json" "$burst" <<'EOF' || fail "vdb's events in the reader of all disks"
import json, sys
evs = [json.loads(l) for l in open(sys.argv[1])]
vda = [e for e in evs if e["disk"] == "vda"]
vdb = [e for e in evs if e["disk"] == "vdb"]
open(sys.argv[2], "w").write("".join(json.dumps(e) + "\n" for e in vda))
kinds = [e["event"] for e in vdb]
want = ["snapshot"] + ["snapshot-failed"] * int(sys.argv[3]) + ["snapshot"]
if kinds != want:
    sys.exit("vdb's events: %d, not the %d expected (lost: %s)"
             % (len(kinds), len(want), [e for e in evs if e["event"] == "lost"]))
EOF
"${peers[@]}" check "$tmpdir/vda.json" \
    snapshot snapshot-failed snapshot revert snapshot \
    job-start job-progress job-progress job-progress job-end \
    job-start 'job-progress*' job-end \
    degraded snapshot-failed ||
    fail "vda's events are not as documented (above)"
"$PYTHON" - "$tmpdir/vda.json" <<'EOF' || fail "vda's event fields"
import json, sys
e = [json.loads(l) for l in open(sys.argv[1])]
def want(i, **kw):
    for k, v in kw.items():
        if e[i][k] != v:
            sys.exit("event %d (%s): %s is %r, not %r" % (i, e[i]["event"], k, e[i][k], v))
want(0, name="s1")
want(1, name="s1", errno=17)
want(2, name="s2")
want(3, name="s1", dropped=2)
want(4, name="s3")
want(5, job="commit", total=8 << 20, speed=0)
want(6, job="commit", percent=25)
want(8, job="commit", percent=75)
want(9, job="commit", result="ok", done=8 << 20, total=8 << 20)
want(10, job="delete", top="s3")
want(len(e) - 3, job="delete", result="failed")
want(len(e) - 1, name="s4")
if "manifest" not in e[-2]["error"] or "Is a directory" not in e[-3]["error"]:
    sys.exit("errors do not say why: %s / %s" % (e[-3]["error"], e[-2]["error"]))
EOF
"${peers[@]}" check "$tmpdir/vdb.json" snapshot $(printf 'snapshot-failed %.0s' $(seq "$burst")) snapshot ||
    fail "the vdb reader's events"

note "text lines: TIME DISK EVENT KEY=VALUE..., as many as JSON ones"
[ "$(wc -l < "$tmpdir/all.txt")" = "$(wc -l < "$tmpdir/all.json")" ] ||
    fail "text and JSON readers saw different numbers of events"
grep -E -q '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z vda snapshot name=s1 layer=layer-[0-9]+\.qcow2 pause-ns=[0-9]+ duration-ms=[0-9.]+$' "$tmpdir/all.txt" ||
    fail "no text line for snapshot s1"
grep -E -q ' vda snapshot-failed name=s1 errno=17 error="[^"]*already exists" duration-ms=' "$tmpdir/all.txt" ||
    fail "no text line for the refused snapshot"
grep -E -q ' vda job-end job=delete top=s3 base=[^ ]+ result=failed done=[0-9]+ total=[0-9]+ duration-ms=[0-9.]+ errno=[0-9]+ error="' "$tmpdir/all.txt" ||
    fail "no text line for the failed job"

note "the log (-v): every event; and the debug areas' lines"
for want in "event: vda snapshot name=s1 layer=" \
            "event: vda snapshot-failed name=s1 errno=17" \
            "event: vda revert name=s1 dropped=2" \
            "event: vda job-start job=commit" \
            "event: vda job-progress job=commit top=layer-" \
            " percent=50 done=" \
            "event: vda job-end job=commit top=layer-" \
            " result=ok done=8388608 total=8388608 duration-ms=" \
            "event: vda job-end job=delete top=s3" \
            "event: vda degraded errno=" \
            "snapshot: 's1': switched; guest I/O paused" \
            "frozen layer flushed in" \
            "job: $tmpdir/sta: commit copied" \
            "job: $tmpdir/sta: final switch done" \
            "control: uid 0: 'snapshot' ran in" \
            "events: subscriber" \
            "sync: $tmpdir/stb: interval flush done"; do
    grep -q -F -- "$want" "$log" || fail "the log lacks: $want"
done

note "without -v: failures only"
: > "$log"
start_server srv disk=vda base="$tmpdir/a.img" base-format=raw \
    state="$tmpdir/sta" control="$ctl"
run_cowchain snapshot -c "$ctl" -d vda s9
[ "$rc" = 0 ] || fail "snapshot s9: $(cat "$tmpdir/err")"
run_cowchain snapshot -c "$ctl" -d vda s9
[ "$rc" = 1 ] || fail "a second s9 was not refused"
run_cowchain revert -c "$ctl" -d vda nosuch
[ "$rc" = 1 ] || fail "a revert to nosuch was not refused"
stop_server srv
grep -q -F "event: vda snapshot-failed name=s9 errno=17" "$log" ||
    fail "the refused snapshot is not in the log without -v"
grep -q -F "event: vda revert-failed name=nosuch errno=2" "$log" ||
    fail "the refused revert is not in the log without -v"
if grep -q -F "event: vda snapshot name=s9" "$log"; then
    fail "a snapshot that went as planned is in the log without -v"
fi
if grep -q "debug:" "$log"; then
    fail "debug lines without -v"
fi
note "ok"
