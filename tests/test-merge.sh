#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Background merges through a running server, driven by the cowchain tool:
#  1. commit of a frozen snapshot into the layer below: same contents, the
#     layer file gone, names and the qemu-img chain one shorter;
#  2. delete of a middle snapshot: the others still read as they were;
#  3. active commit while a guest keeps writing: every write is kept;
#  4. commit into the original base: refused without --allow-base-write,
#     then the raw base file itself holds the data;
#  5. pull without --base: the active layer needs no backing file, and
#     the disk restarts without its base (local and remote NBD base);
#  6. refused commands (exit 1, a message naming the problem) change
#     nothing; pause, resume, speed, cancel; a cancelled job leaves the
#     chain as it was and runs to the end when started again; wait
#     --progress off a terminal prints nothing but the verdict;
#  7. kill -9 at each stage of a commit and of a pull
#     (COWCHAIN_JOB_STOP_AT): the restarted disk reads the same, every
#     layer passes qemu-img check, no stray layer files; the old chain
#     takes the job again, the one killed after the manifest is the new
#     chain (backing names repaired);
#  8. trim punches holes in the active layer and the freed clusters are
#     reused.
# Every chain is checked against qemu-img: `info --backing-chain` of the
# active layer is the manifest's chain, `check` passes on every layer,
# `compare` of the active layer with a raw model of the disk.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires nbdkit qemu-img qemu-io
requires_python_nbd

cow=$abs_top_builddir/cowchain
[ -x "$cow" ] || fail "cowchain tool not built: $cow"
util=("$PYTHON" "$testsdir/merge-util.py")
M=$(( 1 << 20 ))
size=$(( 8 * M ))

make_random_file "$tmpdir/base.img" "$size" 3
base=$tmpdir/base.img
base_sum=$(sha256 "$base")

#----------------------------------------------------------------------
# Helpers.  $uri, $model (a raw file: what the disk must read) and
# $COWCHAIN_CONTROL are those of the server in use.

# write_both PATTERN OFFSET LENGTH: to the disk and to the model.
write_both ()
{
    qemu-io -f raw -c "write -P $1 $2 $3" "$uri" >/dev/null
    qemu-io -f raw -c "write -P $1 $2 $3" "$model" >/dev/null
}

# same_content WHAT: the disk, read over NBD, equals the model.
same_content ()
{
    "${util[@]}" compare "$uri" "$model" "$1" || fail "$1: disk differs from its model"
}

# check_layers DIR [leaks-ok]: qemu-img check of every layer file.
check_layers ()
{
    local f
    for f in "$1"/layer-*.qcow2; do check_image "$f" ${2:+"$2"}; done
}

# expect_chain DIR N: qemu-img's chain from the active layer is the
# manifest's, N images long, and DIR holds no other layer file.
expect_chain ()
{
    local n
    n=$("${util[@]}" check-chain "$1") || fail "$1: chain differs from the manifest"
    [ "$n" = "$2" ] || fail "$1: chain of $n images, expected $2"
}

active_of ()
{
    echo "$1/$("${util[@]}" layers "$1" | tail -n 1)"
}

# compare_offline DIR: qemu-img compare of the model and the active chain.
compare_offline ()
{
    qemu-img compare -U -q -f raw -F qcow2 "$model" "$(active_of "$1")" ||
        fail "$1: qemu-img compare: the active chain differs from the model"
}

snapshot_names ()
{
    "$cow" list --output=json |
        "$PYTHON" -c 'import json,sys; print(" ".join(s["name"] for s in json.load(sys.stdin)["snapshots"]))'
}

expect_names ()
{
    local got
    got=$(snapshot_names)
    [ "$got" = "$*" ] || fail "snapshots are '$got', expected '$*'"
}

snapshot_file ()
{
    "$cow" list --output=json |
        "$PYTHON" -c 'import json,sys
for s in json.load(sys.stdin)["snapshots"]:
    if s["name"] == sys.argv[1]: print(s["file"])' "$1"
}

# expect_snapshot NAME MODEL: the snapshot's layer, read by qemu-img,
# holds MODEL.
expect_snapshot ()
{
    local f
    f=$(snapshot_file "$1")
    [ -f "$f" ] || fail "snapshot $1 has no layer file ('$f')"
    qemu-img compare -U -q -f raw -F qcow2 "$2" "$f" ||
        fail "snapshot $1 ($f) differs from its model"
}

job_field ()
{
    "${util[@]}" job-field "$cow" "$1"
}

wait_job ()
{
    "${util[@]}" wait-job "$cow" "$1" > /dev/null || fail "job never became $1"
}

# use_server NAME: point the helpers at server NAME.
use_server ()
{
    uri=$(server_uri "$1")
    export COWCHAIN_CONTROL=$tmpdir/$1.ctl
}

#----------------------------------------------------------------------
note "commit of a frozen snapshot into the layer below"
st=$tmpdir/st1
model=$tmpdir/model1
cp "$base" "$model"
start_server one base="$base" state="$st" control="$tmpdir/one.ctl"
use_server one
write_both 0x11 0 1M;       cp "$model" "$tmpdir/m1"; "$cow" snapshot s1 >/dev/null
write_both 0x22 512k 1M;    cp "$model" "$tmpdir/m2"; "$cow" snapshot s2 >/dev/null
write_both 0x33 3M 1M;      cp "$model" "$tmpdir/m3"; "$cow" snapshot s3 >/dev/null
write_both 0x44 6M 512k
mapfile -t L < <("${util[@]}" layers "$st")          # L[0..3]: s1 s2 s3 active
expect_chain "$st" 5
cp "$st/manifest" "$tmpdir/manifest.before"
expect_exit 1 "--force" "$cow" commit --top s2
grep -q "s1" "$tmpdir/err" || fail "the refusal does not name the snapshot s1"
cmp -s "$tmpdir/manifest.before" "$st/manifest" || fail "a refused commit changed the manifest"
"$cow" commit --top s2 --force --wait > "$tmpdir/out" || fail "commit --top s2 failed"
grep -q "Commit completed" "$tmpdir/out" || fail "commit --wait did not report completion"
[ "$(job_field state)" = completed ] || fail "the commit is not reported completed"
[ ! -e "$st/${L[1]}" ] || fail "the committed layer ${L[1]} was not removed"
expect_names s2 s3
[ "$(snapshot_file s2)" = "$st/${L[0]}" ] || fail "s2 did not move to the layer below (${L[0]})"
expect_chain "$st" 4
same_content "after commit --top s2"
expect_snapshot s2 "$tmpdir/m2"
expect_snapshot s3 "$tmpdir/m3"

note "delete of a middle snapshot"
write_both 0x55 5M 256k;    cp "$model" "$tmpdir/m4"; "$cow" snapshot s4 >/dev/null
expect_chain "$st" 5
"$cow" delete s3 --wait > "$tmpdir/out" || fail "delete s3 failed"
expect_names s2 s4
[ ! -e "$st/${L[2]}" ] || fail "the layer of deleted s3 (${L[2]}) was not removed"
expect_chain "$st" 4
expect_exit 1 "no snapshot or layer named 's3'" "$cow" commit --top s3
same_content "after delete s3"
expect_snapshot s2 "$tmpdir/m2"
expect_snapshot s4 "$tmpdir/m4"

note "active commit while the guest writes"
write_both 0x66 1M 3M                 # something for the job to copy
s4file=$(snapshot_file s4)
rm -f "$tmpdir/stop" "$tmpdir/stop.started"
"${util[@]}" writer "$uri" "$model" "$tmpdir/stop" 42 > "$tmpdir/writes" &
writer=$!
for (( i = 0; i < 600; i++ )); do
    [ -e "$tmpdir/stop.started" ] && break
    kill -0 "$writer" 2>/dev/null || break
    sleep 0.05
done
[ -e "$tmpdir/stop.started" ] || fail "the writer did not start"
expect_exit 1 "--force" "$cow" commit --top active     # s4 would go
"$cow" commit --top active --force --speed 1M > /dev/null
[ "$(job_field state)" = running ] || fail "the active commit is not running"
kill -0 "$writer" 2>/dev/null || fail "the writer stopped before the job"
sleep 0.3
"$cow" speed 0 > /dev/null || fail "cannot lift the speed limit of the active commit"
touch "$tmpdir/stop"
wait "$writer" || fail "the writer failed"
"$cow" wait || fail "the active commit did not complete"
note "the writer wrote $(cat "$tmpdir/writes") times"
same_content "after the active commit"
[ "$("$cow" blklist | awk '$1 == "(default)" {print $2}')" = "$s4file" ] ||
    fail "the active layer is not s4's former layer $s4file"
expect_names s2
expect_chain "$st" 3
write_both 0x77 7M 64k                # the new active layer takes writes
same_content "write after the active commit"
stop_server one
check_layers "$st"
expect_chain "$st" 3
compare_offline "$st"
no_leak_check=1 start_server one state="$st" control="$tmpdir/one.ctl"
same_content "restart after the merges"
expect_snapshot s2 "$tmpdir/m2"
stop_server one

#----------------------------------------------------------------------
note "commit into the original base"
base3=$tmpdir/base3.img
cp "$base" "$base3"
st=$tmpdir/st3
model=$tmpdir/model3
cp "$base" "$model"
start_server three base="$base3" state="$st" control="$tmpdir/three.ctl"
use_server three
write_both 0x61 2M 1M;      cp "$model" "$tmpdir/m31"; "$cow" snapshot s1 >/dev/null
write_both 0x62 4M 64k
cp "$st/manifest" "$tmpdir/manifest.before"
expect_exit 1 "--allow-base-write" "$cow" commit --top s1
expect_exit 1 "--allow-base-write" "$cow" commit --top active --base base --force
cmp -s "$tmpdir/manifest.before" "$st/manifest" || fail "a refused commit changed the manifest"
cmp -s "$base" "$base3" || fail "a refused commit changed the base"
# The original base carries no name: s1's would be lost.
expect_exit 1 "would drop snapshot 's1'" "$cow" commit --top s1 --allow-base-write
cmp -s "$tmpdir/manifest.before" "$st/manifest" || fail "a refused commit changed the manifest"
"$cow" commit --top s1 --allow-base-write --force --wait > /dev/null || fail "commit into the base failed"
cmp -s "$tmpdir/m31" "$base3" || fail "the raw base does not hold the committed snapshot"
expect_names ""
expect_chain "$st" 2
same_content "after commit into the base"
note "active commit into the original base"
"$cow" commit --top active --base base --allow-base-write --wait > /dev/null ||
    fail "active commit into the base failed"
cmp -s "$model" "$base3" || fail "the raw base does not hold the whole disk after the active commit"
expect_chain "$st" 2
same_content "after the active commit into the base"
write_both 0x63 0 4k
same_content "write after the active commit into the base"
stop_server three
check_layers "$st"
compare_offline "$st"

#----------------------------------------------------------------------
note "pull without --base: self-contained"
base4=$tmpdir/base4.img
cp "$base" "$base4"
st=$tmpdir/st4
model=$tmpdir/model4
cp "$base" "$model"
start_server four base="$base4" state="$st" control="$tmpdir/four.ctl"
use_server four
write_both 0x71 0 64k
write_both 0x72 100k 300k
"$cow" snapshot s1 >/dev/null
write_both 0x73 5M 1M
cp "$st/manifest" "$tmpdir/manifest.before"
expect_exit 1 "--force" "$cow" pull
cmp -s "$tmpdir/manifest.before" "$st/manifest" || fail "a refused pull changed the manifest"
"$cow" pull --force --wait > "$tmpdir/out" || fail "pull failed"
grep -q "Pull completed" "$tmpdir/out" || fail "pull --wait did not report completion"
active=$(active_of "$st")
qemu-img info -U --output=json "$active" > "$tmpdir/info.json"
"$PYTHON" -c 'import json,sys; v = json.load(open(sys.argv[1])); assert "backing-filename" not in v, v' \
    "$tmpdir/info.json" || fail "the pulled active layer still has a backing file"
grep -q '^nobase$' "$st/manifest" || fail "the manifest still records a base"
expect_chain "$st" 1
expect_names ""
same_content "after pull"
expect_exit 1 "no base" "$cow" commit --top active --base base --allow-base-write
stop_server four
check_layers "$st"
compare_offline "$st"
note "restart with the same command line, then without the base file"
start_server four base="$base4" state="$st" control="$tmpdir/four.ctl"
same_content "restart after pull"
write_both 0x74 6M 64k
stop_server four
mv "$base4" "$base4.gone"
no_leak_check=1 start_server four state="$st" control="$tmpdir/four.ctl"
same_content "restart after pull, base file gone"
stop_server four
check_layers "$st"
compare_offline "$st"

note "pull from a remote NBD base"
rm -f "$tmpdir/rb.sock" "$tmpdir/rb.pid"
nbdkit -f -r -U "$tmpdir/rb.sock" -P "$tmpdir/rb.pid" file "$base" \
    </dev/null >>"$tmpdir/rb.log" 2>&1 &
rb_pid=$!
on_exit "kill $rb_pid 2>/dev/null; wait $rb_pid 2>/dev/null"
for (( i = 0; i < 600; i++ )); do
    [ -S "$tmpdir/rb.sock" ] && [ -s "$tmpdir/rb.pid" ] && break
    kill -0 "$rb_pid" 2>/dev/null || fail "the base nbdkit exited"
    sleep 0.05
done
st=$tmpdir/st5
model=$tmpdir/model5
cp "$base" "$model"
rb_uri="nbd+unix:///?socket=$tmpdir/rb.sock"
start_server five base="$rb_uri" state="$st" control="$tmpdir/five.ctl"
use_server five
write_both 0x81 1M 64k
"$cow" snapshot r1 >/dev/null
write_both 0x82 3M 100k
"$cow" pull --force --wait > /dev/null || fail "pull from the remote base failed"
expect_chain "$st" 1
kill "$rb_pid"
wait "$rb_pid" 2>/dev/null || :
same_content "after pull, remote base gone"
stop_server five
check_layers "$st"
start_server five base="$rb_uri" state="$st" control="$tmpdir/five.ctl"
same_content "restart after pull, remote base gone"
stop_server five
compare_offline "$st"

#----------------------------------------------------------------------
note "refused commands; pause, resume, speed, cancel"
st=$tmpdir/st6
model=$tmpdir/model6
cp "$base" "$model"
start_server six base="$base" state="$st" control="$tmpdir/six.ctl"
use_server six
write_both 0x91 0 2M;       cp "$model" "$tmpdir/m61"; "$cow" snapshot s1 >/dev/null
write_both 0x92 2M 4M;      "$cow" snapshot s2 >/dev/null
write_both 0x93 0 64k
cp "$st/manifest" "$tmpdir/manifest.before"
expect_exit 1 "no snapshot or layer named 'nosuch'" "$cow" commit --top nosuch
expect_exit 1 "no snapshot or layer named 'nosuch'" "$cow" commit --top s2 --base nosuch
expect_exit 1 "no snapshot or layer named 'nosuch'" "$cow" pull --base nosuch
expect_exit 1 "no snapshot or layer named 'nosuch'" "$cow" delete nosuch
expect_exit 1 "not below" "$cow" commit --top s1 --base s2
expect_exit 1 "not below" "$cow" commit --top s1 --base s1
expect_exit 1 "base cannot be the top" "$cow" commit --top base
expect_exit 1 "missing --top" "$cow" commit
expect_exit 1 "active layer" "$cow" pull --base active
expect_exit 1 "nothing to pull" "$cow" pull --base s2
expect_exit 1 "not a snapshot" "$cow" delete active
for c in pause resume cancel; do
    expect_exit 1 "no job is running" "$cow" "$c"
done
expect_exit 1 "no job is running" "$cow" speed 1M
expect_exit 1 "not a rate" "$cow" commit --top s2 --speed fast
expect_exit 1 "not a rate" "$cow" speed -- -1
expect_exit 1 "not a rate" "$cow" speed 10X
expect_exit 1 "not a rate" "$cow" speed ""
expect_exit 1 "too large" "$cow" speed 99999999999999999999
expect_exit 1 "too large" "$cow" speed 99999999999G
expect_exit 1 "--progress goes with --wait" "$cow" pull --force --progress
cmp -s "$tmpdir/manifest.before" "$st/manifest" || fail "a refused command changed the manifest"
[ "$(job_field state)" = none ] || fail "a refused command left a job"

note "a job runs: a second one, revert and snapshot-changing commands wait"
# After its first 1 MiB chunk the job waits 16 s per MiB: it is still
# running whatever the load of the machine.
"$cow" pull --base s1 --force --speed 64K > /dev/null
[ "$(job_field state)" = running ] || fail "the pull is not running"
expect_exit 1 "running" "$cow" commit --top s2 --force
expect_exit 1 "running" "$cow" pull --force
expect_exit 1 "running" "$cow" delete s1
expect_exit 1 "running" "$cow" revert --force s1
"$cow" speed 512K > /dev/null
[ "$(job_field speed)" = 524288 ] || fail "the speed limit is $(job_field speed), not 512K"
"$cow" pause > /dev/null
[ "$(job_field state)" = paused ] || fail "the job is not paused"
done1=$(job_field done)
sleep 0.3
[ "$(job_field done)" = "$done1" ] || fail "a paused job went on copying"
expect_exit 1 "running" "$cow" commit --top s2 --force
"$cow" resume > /dev/null
wait_job running
"$cow" speed 1K > /dev/null         # no end before the cancel
"$cow" cancel > /dev/null
rc=0
"$cow" wait --progress > "$tmpdir/out" 2> "$tmpdir/err" || rc=$?
[ "$rc" = 1 ] || fail "wait after a cancel exited $rc, not 1"
[ ! -s "$tmpdir/out" ] || fail "wait printed on stdout: $(cat "$tmpdir/out")"
grep -q "cancelled" "$tmpdir/err" || fail "wait did not say the job was cancelled"
[ "$(wc -l < "$tmpdir/err")" = 1 ] && ! grep -q $'\r' "$tmpdir/err" ||
    { cat -A "$tmpdir/err" >&2; fail "wait --progress off a terminal printed more than its verdict"; }
[ "$(job_field state)" = cancelled ] || fail "the job is not reported cancelled"
expect_exit 1 "no job is running" "$cow" cancel
cmp -s "$tmpdir/manifest.before" "$st/manifest" || fail "a cancelled pull changed the manifest"
expect_names s1 s2
expect_chain "$st" 4
same_content "after a cancelled pull"
stop_server six
check_layers "$st"
expect_chain "$st" 4
compare_offline "$st"

note "the cancelled job, started again, completes"
start_server six base="$base" state="$st" control="$tmpdir/six.ctl"
"$cow" pull --base s1 --force --wait > /dev/null || fail "the pull started again failed"
expect_names s1
expect_chain "$st" 3
same_content "after the pull started again"
expect_snapshot s1 "$tmpdir/m61"
note "wait --progress off a terminal, success"
"$cow" delete s1 > /dev/null
rc=0
"$cow" wait --progress > "$tmpdir/out" 2> "$tmpdir/err" || rc=$?
[ "$rc" = 0 ] || { cat "$tmpdir/err" >&2; fail "wait after a delete exited $rc"; }
[ ! -s "$tmpdir/out" ] && [ ! -s "$tmpdir/err" ] ||
    { cat -A "$tmpdir/out" "$tmpdir/err" >&2; fail "wait --progress off a terminal printed something"; }
[ "$(job_field state)" = completed ] || fail "the delete is not reported completed"
expect_names ""
expect_chain "$st" 2
same_content "after delete s1"
stop_server six
check_layers "$st"
compare_offline "$st"

#----------------------------------------------------------------------
note "kill -9 at each stage of a commit and of a pull"
tpl=$tmpdir/tpl
model=$tmpdir/model7
cp "$base" "$model"
start_server seven base="$base" state="$tpl" control="$tmpdir/seven.ctl"
use_server seven
write_both 0xa1 0 2M;       "$cow" snapshot s1 >/dev/null
write_both 0xa2 1M 3M;      cp "$model" "$tmpdir/m72"; "$cow" snapshot s2 >/dev/null
write_both 0xa3 3M 64k
stop_server seven
expect_chain "$tpl" 4

saved_env=(${server_env[@]+"${server_env[@]}"})
for kind in commit pull; do
    for stage in before-copy mid-copy before-switch after-manifest; do
        note "kill -9: $kind at $stage"
        st=$tmpdir/$kind-$stage
        cp -a "$tpl" "$st"
        name=k-$kind-$stage
        case $kind in
            commit) job=(commit --top s2 --force) ;;
            pull) job=(pull --force) ;;
        esac
        server_env=(${saved_env[@]+"${saved_env[@]}"} COWCHAIN_JOB_STOP_AT=$stage)
        start_server "$name" base="$base" state="$st" control="$tmpdir/$name.ctl"
        server_env=(${saved_env[@]+"${saved_env[@]}"})
        use_server "$name"
        "$cow" "${job[@]}" > /dev/null
        "${util[@]}" wait-job "$cow" paused > "$tmpdir/job.json" ||
            fail "$kind did not stop at $stage"
        if [ "$stage" = mid-copy ]; then
            "$PYTHON" -c '
import json, sys
j = json.load(open(sys.argv[1]))
assert 0 < j["done"] < j["total"], j' "$tmpdir/job.json" || fail "mid-copy: the job is not half done"
        fi
        crash_server "$name"
        check_layers "$st" leaks-ok
        no_leak_check=1 start_server "$name" base="$base" state="$st" control="$tmpdir/$name.ctl"
        same_content "$kind killed at $stage, restarted"
        [ "$(job_field state)" = none ] || fail "a job runs after the restart"
        if [ "$stage" != after-manifest ]; then
            # The old chain; the commit had dropped its base's name.
            expect_chain "$st" 4
            case $kind in
                commit) expect_names s2 ;;
                pull) expect_names s1 s2 ;;
            esac
            "$cow" "${job[@]}" --wait > /dev/null ||
                fail "$kind killed at $stage: started again, it failed"
        fi
        case $kind in
            commit) expect_chain "$st" 3; expect_names s2
                    expect_snapshot s2 "$tmpdir/m72" ;;
            pull) expect_chain "$st" 1; expect_names "" ;;
        esac
        stop_server "$name"
        check_layers "$st" leaks-ok
        compare_offline "$st"
        rm -rf "$st"
    done
done

#----------------------------------------------------------------------
note "trim punches holes; rewritten clusters are reused"
st=$tmpdir/st9
model=$tmpdir/model9
cp "$base" "$model"
start_server nine base="$base" state="$st" control="$tmpdir/nine.ctl"
use_server nine
active=$(active_of "$st")
alloc () { echo $(( $(stat -c %b "$active") * $(stat -c %B "$active") )); }
fill () { "${util[@]}" fill "$uri" $M $(( 6 * M )) "$1" 9 "$model"; }
trim () { "${util[@]}" trim "$uri" $M $(( 6 * M )) "$model"; }

fill $(( 256 << 10 ))
same_content "6 MiB written"
alloc1=$(alloc); size1=$(stat -c %s "$active")
trim
same_content "6 MiB trimmed"
alloc2=$(alloc)
note "allocated: $alloc1 bytes written, $alloc2 after trim"
[ $(( alloc1 - alloc2 )) -ge $(( 5 * M )) ] ||
    fail "trim of 6 MiB freed only $(( alloc1 - alloc2 )) bytes of the active layer"
# The clusters are 64K: single-cluster and multi-cluster allocations.
for req in 65536 262144; do
    fill $req
    same_content "6 MiB rewritten in $req-byte writes after a trim"
    alloc3=$(alloc); size3=$(stat -c %s "$active")
    note "rewritten in $req-byte writes: file size $size1 -> $size3, allocated $alloc1 -> $alloc3"
    [ "$size3" -le "$size1" ] ||
        fail "rewriting trimmed clusters in $req-byte writes grew the active layer from $size1 to $size3 bytes: freed clusters not reused"
    [ "$alloc3" -le $(( alloc1 + 256 * 1024 )) ] ||
        fail "rewriting trimmed clusters in $req-byte writes grew the allocation from $alloc1 to $alloc3 bytes"
    trim
    same_content "trimmed again"
done
stop_server nine
check_layers "$st"
compare_offline "$st"

[ "$(sha256 "$base")" = "$base_sum" ] || fail "the base was modified"
note "pass"
