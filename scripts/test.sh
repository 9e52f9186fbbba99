#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Build cowchain and run its whole test suite twice: once in a plain
# out-of-tree build, once in a build with AddressSanitizer and
# UndefinedBehaviorSanitizer (--enable-sanitizers).  Installs missing
# Debian packages first.  This is what CI runs (.ci/run).
#
# Exits non-zero if either build fails, any test fails, or any test is
# skipped (core tests must not skip on CI; set COWCHAIN_ALLOW_SKIP=1 to
# accept skips, e.g. on a machine without some optional tool).
#
# Environment:
#   COWCHAIN_BUILDDIR        plain build dir        (default: build/)
#   COWCHAIN_SAN_BUILDDIR    sanitizer build dir    (default: build-sanitizers/)
#   COWCHAIN_SAN_CC          compiler for the sanitizer build (default: configure's choice)
#   COWCHAIN_JOBS            make -j value          (default: 2)
#   COWCHAIN_CHECK_TIMEOUT   seconds allowed for one `make check` (default: 1200)
#   COWCHAIN_ALLOW_SKIP=1    skipped tests do not fail the run
#   COWCHAIN_LOG_LINES       lines printed from the end of each bad test's log (default: 400)
#   COWCHAIN_ONLY=plain|sanitizers   run only one of the two suites
set -euo pipefail

# shellcheck source=scripts/deps.sh
. "$(dirname "${BASH_SOURCE[0]}")/deps.sh"

SAN_BUILDDIR=${COWCHAIN_SAN_BUILDDIR:-$COWCHAIN_SRCDIR/build-sanitizers}
CHECK_TIMEOUT=${COWCHAIN_CHECK_TIMEOUT:-1200}
ALLOW_SKIP=${COWCHAIN_ALLOW_SKIP:-0}
LOG_LINES=${COWCHAIN_LOG_LINES:-400}
ONLY=${COWCHAIN_ONLY:-}

# Full stack traces from UBSan unless the caller chose otherwise.
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}

SUMMARY=()           # one line per suite, printed at the end
RUN_FAILED=0
ALL_PASS=0 ALL_FAIL=0 ALL_SKIP=0

# Print a test's log, or its last LOG_LINES lines.
show_log() {
    local log=$1 n
    if [ ! -f "$log" ]; then
        echo "(no log file $log)"
        return 0
    fi
    n=$(wc -l < "$log")
    echo "----- $log ($n lines) -----"
    if [ "$n" -gt "$LOG_LINES" ]; then
        echo "[... first $((n - LOG_LINES)) lines left out ...]"
        tail -n "$LOG_LINES" "$log"
    else
        cat "$log"
    fi
    echo "----- end of $log -----"
}

# Value of one "# KEY: N" line of an automake test-suite.log (0 if absent).
count_of() {
    local v
    v=$(sed -n "s/^# $1: *\\([0-9][0-9]*\\).*/\\1/p" "$2" | head -n1)
    echo "${v:-0}"
}

# report NAME BUILDDIR STAMP STATUS: print the totals of one suite and the
# logs of its failed (and skipped) tests; update the run's totals.
report() {
    local name=$1 builddir=$2 stamp=$3 status=$4
    local suite_log=$builddir/test-suite.log
    local total=0 pass=0 skip=0 xfail=0 fail=0 xpass=0 error=0 noresult=0 bad trs result test_name log

    echo
    echo "========== $name suite ($builddir) =========="
    if [ -f "$suite_log" ] && [ "$suite_log" -nt "$stamp" ]; then
        total=$(count_of TOTAL "$suite_log")
        pass=$(count_of PASS "$suite_log")
        skip=$(count_of SKIP "$suite_log")
        xfail=$(count_of XFAIL "$suite_log")
        fail=$(count_of FAIL "$suite_log")
        xpass=$(count_of XPASS "$suite_log")
        error=$(count_of ERROR "$suite_log")
        printf '# TOTAL: %s\n# PASS:  %s\n# SKIP:  %s\n# XFAIL: %s\n# FAIL:  %s\n# XPASS: %s\n# ERROR: %s\n' \
            "$total" "$pass" "$skip" "$xfail" "$fail" "$xpass" "$error"
    else
        echo "no test-suite.log was written: make check did not finish"
        [ "$status" != ok ] || status="no test-suite.log"
        # Count the results of the tests that did finish.
        while IFS= read -r trs; do
            total=$((total + 1))
            case $(sed -n 's/^:global-test-result: *//p' "$trs" | head -n1) in
                PASS) pass=$((pass + 1)) ;;
                SKIP) skip=$((skip + 1)) ;;
                XFAIL) xfail=$((xfail + 1)) ;;
                XPASS) xpass=$((xpass + 1)) ;;
                ERROR) error=$((error + 1)) ;;
                *) fail=$((fail + 1)) ;;
            esac
        done < <(find "$builddir" -name '*.trs' -newer "$stamp" 2>/dev/null)
        echo "finished tests: $total, pass $pass, skip $skip, fail $fail, error $error"
    fi
    bad=$((fail + xpass + error))

    # The .trs files written by this run name each test's result; the
    # .log beside each holds its output.
    while IFS= read -r trs; do
        if grep -Eq '^:test-result: (FAIL|ERROR|XPASS)' "$trs"; then
            result=FAILED
        elif grep -Eq '^:test-result: SKIP' "$trs"; then
            result=SKIPPED
        else
            continue
        fi
        test_name=${trs%.trs}
        echo
        echo "$result: ${test_name#"$builddir"/}"
        show_log "$test_name.log"
    done < <(find "$builddir" -name '*.trs' -newer "$stamp" 2>/dev/null | sort)

    # Tests without a result from this run: they hung or were killed by
    # the timeout (make deletes their partial .log when it is killed).
    if [ -f "$builddir/Makefile" ] && [ "$status" != ok ]; then
        # shellcheck disable=SC2016  # $(TEST_LOGS) is for make
        for log in $(printf 'cowchain-print-test-logs:\n\t@echo $(TEST_LOGS)\n' |
                make -s -C "$builddir" -f Makefile -f - cowchain-print-test-logs 2>/dev/null); do
            test_name=${log%.log}
            if [ ! -f "$builddir/$test_name.trs" ] ||
                [ ! "$builddir/$test_name.trs" -nt "$stamp" ]; then
                echo "NO RESULT: $test_name (did not run or did not finish)"
                noresult=$((noresult + 1))
            fi
        done
    fi

    if [ "$status" = ok ] && [ "$total" -eq 0 ]; then
        status="no tests ran"
    fi
    if [ "$status" = ok ] && [ "$bad" -gt 0 ]; then
        status="$bad test(s) failed"
    fi
    if [ "$status" = ok ] && [ "$skip" -gt 0 ] && [ "$ALLOW_SKIP" != 1 ]; then
        status="$skip test(s) skipped (set COWCHAIN_ALLOW_SKIP=1 to accept skips)"
    fi

    ALL_PASS=$((ALL_PASS + pass + xfail))
    ALL_FAIL=$((ALL_FAIL + bad + noresult))
    ALL_SKIP=$((ALL_SKIP + skip))
    if [ "$status" = ok ]; then
        SUMMARY+=("$name: OK    total $total, pass $pass, skip $skip, xfail $xfail, fail $fail, xpass $xpass, error $error")
    else
        RUN_FAILED=1
        SUMMARY+=("$name: FAILED ($status)    total $total, pass $pass, skip $skip, xfail $xfail, fail $fail, xpass $xpass, error $error, no result $noresult")
    fi
}

# run_suite NAME BUILDDIR [CONFIGURE-ARG...]: configure, build and check.
run_suite() {
    local name=$1 builddir=$2 status=ok stamp start rc
    shift 2
    start=$SECONDS
    mkdir -p "$builddir"
    stamp=$builddir/.test-sh-stamp
    rm -f "$stamp"
    touch "$stamp"
    sleep 1    # so that files written by this run are strictly newer

    cowchain_log "$name suite: configure, build, check in $builddir"
    if ! cowchain_configure "$builddir" "$@"; then
        status="configure failed (see $builddir/config.log)"
    elif ! make -C "$builddir" -j"$COWCHAIN_JOBS"; then
        status="build failed"
    else
        rc=0
        timeout -k 30 "$CHECK_TIMEOUT" \
            make -C "$builddir" -j"$COWCHAIN_JOBS" check || rc=$?
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            status="make check timed out after $CHECK_TIMEOUT s (COWCHAIN_CHECK_TIMEOUT)"
        elif [ "$rc" -ne 0 ]; then
            status="make check failed"
        fi
    fi
    report "$name" "$builddir" "$stamp" "$status"
    SUMMARY[${#SUMMARY[@]}-1]+="    ($((SECONDS - start)) s)"
}

cowchain_install_deps
cd "$COWCHAIN_SRCDIR"
cowchain_autoreconf always

# Both builds with -Werror: a warning fails CI (configure leaves it off by
# default, so that a tarball still builds with a newer compiler).
if [ "$ONLY" != sanitizers ]; then
    run_suite plain "$COWCHAIN_BUILDDIR" --enable-werror
fi
if [ "$ONLY" != plain ]; then
    san_args=(--enable-werror --enable-sanitizers)
    if [ -n "${COWCHAIN_SAN_CC:-}" ]; then
        san_args+=("CC=$COWCHAIN_SAN_CC")
    fi
    run_suite sanitizers "$SAN_BUILDDIR" "${san_args[@]}"
fi

# The fuzzers (the qcow2 reader, the manifest parser, percent-encoding,
# control requests), for a bounded time in all (COWCHAIN_FUZZ_SECONDS,
# default 60, split among them by make fuzz-run; 0 skips them): any
# crash, leak or timeout fails the run.
FUZZ_SECONDS=${COWCHAIN_FUZZ_SECONDS:-60}
if [ "$ONLY" != sanitizers ] && [ "$FUZZ_SECONDS" -gt 0 ]; then
    cowchain_log "fuzzing the qcow2 reader and the text parsers for $FUZZ_SECONDS s"
    if make -C "$COWCHAIN_BUILDDIR" fuzz-run FUZZ_SECONDS="$FUZZ_SECONDS" \
            > "$COWCHAIN_BUILDDIR/fuzz.log" 2>&1; then
        SUMMARY+=("fuzz:       OK    $(awk -F: '/^fuzz-[a-z0-9]+: [0-9]+ s$/ { t = $1 }
            /^stat::number_of_executed_units/ { printf "%s%s%s runs", sep, t, $NF; sep = ", " }' \
            "$COWCHAIN_BUILDDIR/fuzz.log")")
    else
        tail -n 60 "$COWCHAIN_BUILDDIR/fuzz.log"
        SUMMARY+=("fuzz:       FAILED (see $COWCHAIN_BUILDDIR/fuzz.log)")
        RUN_FAILED=1
    fi
fi

echo
echo "========== summary =========="
printf '%s\n' "${SUMMARY[@]}"
if [ "$RUN_FAILED" -ne 0 ]; then
    echo "RESULT: FAILED"
else
    echo "RESULT: OK"
fi
echo "tests: $ALL_PASS passed, $ALL_FAIL failed, $ALL_SKIP skipped"
exit "$RUN_FAILED"
