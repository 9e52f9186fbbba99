#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The crash, fault and power-loss tests with the other subclusters
# setting.  By default they make layers with subclusters (extended L2
# entries) wherever their clusters are large enough (64K: most of them);
# here test-powerloss, test-job-crash and test-fault-sweep run once more
# with COWCHAIN_TEST_SUBCLUSTERS=off (the classic format throughout; fewer
# power-loss iterations, and of the fault sweep the operations that move
# data at 64K clusters), and test-freeze-crash, whose 4K clusters are
# too small for subclusters, with COWCHAIN_TEST_SUBCLUSTERS=on (32K
# clusters with subclusters).
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

# run_variant on|off PROGRAM[:FILTER] [VAR=VALUE...]: FILTER, a cmocka
# test name pattern, picks some of the program's tests.
run_variant ()
{
    local sc=$1 prog=${2%%:*} filter=${2#*:} log
    shift 2
    [ "$filter" != "$prog" ] || filter=
    log=$tmpdir/$prog-$sc${filter:+-$filter}.log
    [ -x "$abs_top_builddir/$prog" ] || fail "$prog is not built"
    note "$prog ${filter:-(all)} with COWCHAIN_TEST_SUBCLUSTERS=$sc"
    if ! env COWCHAIN_TEST_SUBCLUSTERS="$sc" "$@" \
         "$abs_top_builddir/$prog" ${filter:+"$filter"} > "$log" 2>&1; then
        tail -n 40 "$log" >&2
        fail "$prog with subclusters $sc"
    fi
    grep -E '^\[  PASSED  \]' "$log" >&2 || fail "$prog: no test passed"
}

if [ "$COWCHAIN_SANITIZERS" = 1 ]; then
    iterations=6
else
    iterations=12
fi
run_variant off test-powerloss TEST_POWERLOSS_ITERATIONS=$iterations
run_variant off test-job-crash
for t in t_write_cow t_zero t_trim t_commit_frozen t_pull_base; do
    run_variant off "test-fault-sweep:$t"
done
run_variant on test-freeze-crash
note "pass"
