#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Snapshots and background merges against a live server, checked against
# a model (tests/merge-model.py): random writes, write-zeroes, trims,
# snapshots, reverts, deletes, commits (frozen and active), pulls, clean
# restarts and kill -9, with a guest writing during every merge and
# pauses, refused commands, snapshots, cancels, stops and kills landing
# in the middle of jobs (also at the COWCHAIN_JOB_STOP_AT stages).  After
# every step the disk equals the model and the chain and snapshot names
# are the model's; with the server stopped, every layer passes qemu-img
# check and every snapshot read offline equals the model.
#
# The script owns the server: merge-model.py asks on a FIFO for "start
# STAGE KEY=VALUE...", "stop" or "crash" and waits for "ok".
#
# Fixed seeds in make check; for a longer run, e.g.
#   MERGE_MODEL_SEEDS="$(seq 1 50)" MERGE_MODEL_STEPS=200 \
#       make check TESTS=tests/test-merge-model.sh
# and to replay a failure, the seed and step it printed.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires nbdkit qemu-img
requires_python_nbd

cow=$abs_top_builddir/cowchain
[ -x "$cow" ] || fail "cowchain tool not built: $cow"

# Fewer steps in the (much slower) sanitizer build.
if [ "$COWCHAIN_SANITIZERS" = 1 ]; then
    default_steps=25
else
    default_steps=40
fi
steps=${MERGE_MODEL_STEPS:-$default_steps}
# The seed also picks the disk's layers: 1 has 64K clusters (the
# default), 10 512K clusters in compat 0.10 (no zero clusters: trims do
# nothing), 12 4K clusters; between them they run every kind of step and
# of event during a job.
seeds=${MERGE_MODEL_SEEDS:-"1 10 12"}
# Subclusters (extended L2 entries) are on by default for the new layers
# of seed 1 (64K clusters); seed 5 (512K clusters) runs with them too, and
# seed 1 once more with subclusters=off.  MERGE_MODEL_SUBCLUSTERS=on or
# off runs one variant only (the seeds given, or the default ones).
subclusters=${MERGE_MODEL_SUBCLUSTERS:-"on off"}
if [ -n "${MERGE_MODEL_SEEDS:-}" ]; then
    on_seeds=$seeds off_seeds=$seeds
else
    on_seeds="$seeds 5" off_seeds=1
fi
size=$(( 16 * 1024 * 1024 ))

# serve SEED on|off: run merge-model.py for one seed, doing what it asks.
serve ()
{
    local seed=$1 sc=$2 dir=$tmpdir/seed$1-$2 srv=m$1 cmd arg keys rc=0
    local -a saved_env
    mkdir "$dir"
    make_random_file "$dir/base.raw" "$size" "$seed"
    mkfifo "$dir/req" "$dir/rep"
    "$PYTHON" "$testsdir/merge-model.py" --cowchain "$cow" \
        --uri "$(server_uri "$srv")" --control "$tmpdir/$srv.ctl" \
        --state "$dir/state" --base "$dir/base.raw" --scratch "$dir" \
        --requests "$dir/req" --replies "$dir/rep" \
        --seed "$seed" --steps "$steps" --subclusters "$sc" &
    local model=$!
    # Should it die before opening the FIFOs, the open below would wait
    # for ever: once it is gone, open the request FIFO (read-write, which
    # never blocks) to let it go on and see the end.
    ( while _running "$model"; do sleep 0.2; done; : 1<>"$dir/req" ) &
    local unblock=$!
    exec 3<"$dir/req" 4<>"$dir/rep"
    # The servers must not hold the FIFOs: 3<&- 4>&- on each start.
    while read -r cmd arg keys <&3; do
        case $cmd in
            start)
                saved_env=(${server_env[@]+"${server_env[@]}"})
                [ "$arg" = - ] || server_env+=(COWCHAIN_JOB_STOP_AT="$arg")
                # Every read through the merged map of the frozen layers
                # is also read top down and compared (cow/chain-map.c).
                server_env+=(COWCHAIN_VERIFY_MAP=1)
                # shellcheck disable=SC2086 # keys: words without spaces
                start_server "$srv" base="$dir/base.raw" state="$dir/state" \
                    control="$tmpdir/$srv.ctl" $keys 3<&- 4>&-
                server_env=(${saved_env[@]+"${saved_env[@]}"})
                ;;
            stop)
                # "stop job": a merge may still run, on a thread of its
                # own; stop_server is not to wait for that one to end.
                [ "$arg" != job ] ||
                    server_tasks[$srv]=$(( ${server_tasks[$srv]} + 1 ))
                stop_server "$srv"
                ;;
            crash) crash_server "$srv" ;;
            *) fail "seed $seed: merge-model.py asked for '$cmd'" ;;
        esac
        echo ok >&4
    done
    exec 3<&- 4>&-
    wait "$model" || rc=$?
    wait "$unblock" || :
    [ "$rc" = 0 ] || fail "seed $seed failed (see above)"
    ! server_alive "$srv" || fail "seed $seed: the server is still running"
    rm -rf "$dir"
}

for sc in $subclusters; do
    if [ "$sc" = on ]; then list=$on_seeds; else list=$off_seeds; fi
    for seed in $list; do
        note "seed $seed, subclusters $sc, $steps steps"
        serve "$seed" "$sc"
    done
done
note "pass"
