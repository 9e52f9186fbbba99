# SPDX-License-Identifier: BSD-3-Clause
# cowchain shell test helpers.  Sourced (never run) by tests/test-*.sh:
#
#   . "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
#
# Environment (set by make check's TESTS_ENVIRONMENT; the defaults let a
# test also be run by hand from the build directory):
#   COWCHAIN_PLUGIN      absolute path of the built nbdkit-cowchain-plugin.so
#   abs_top_srcdir       the source tree
#   abs_top_builddir     the build tree
#   COWCHAIN_SANITIZERS  1 in the ASan+UBSan build
#   KEEP_TMPDIR          1 to keep the test's temporary directory
#
# What this gives a test:
#   requires CMD...          fail (not skip) if a tool is missing
#   $tmpdir                  a private temporary directory, removed on exit
#   on_exit CMD...           run CMD at exit (after servers are stopped)
#   start_server NAME [-opt...] [key=value...]
#                            start nbdkit with the plugin on $tmpdir/NAME.sock;
#                            options starting with '-' go to nbdkit, the
#                            rest to the plugin.  Fails the test if the
#                            server does not come up.
#   no_leak_check=1 start_server ...
#                            the same, without LeakSanitizer's check at exit
#                            (it costs 1-2 s a run): for a session that only
#                            reads back what an earlier, checked one wrote
#   expect_start_failure NAME [-opt...] [key=value...]
#                            the same, but the server must refuse to start;
#                            its stderr is left in $tmpdir/NAME.log
#   stop_server NAME         SIGTERM, wait until gone, check exit status and
#                            that no sanitizer report was written
#   crash_server NAME        SIGKILL, wait until gone
#   reap_server NAME         wait for a server something else killed
#   server_alive NAME        true while it runs
#   server_pid NAME, server_uri NAME, server_log NAME
#   pidfile_pid FILE         the PID in a background nbdkit's -P file (waits
#                            for the child to write it)
#   server_env, server_wrapper
#                            arrays: VAR=value settings for nbdkit's
#                            environment, and a command to run it under
#   img_info FILE FIELD      one field of qemu-img info --output=json
#   check_image FILE [leaks-ok]
#                            qemu-img check: exit 0 (or 3 = leaks only,
#                            when leaks-ok); anything else fails the test
#                            (both with -U: a running server holds its
#                            images locked in QEMU's convention)
#   make_random_file FILE SIZE SEED
#   sha256 FILE
#   nbdsh ARGS...            the system nbdsh with the system python3
#   $PYTHON                  /usr/bin/python3 (the one with libnbd's module)
#   fail MSG / skip MSG / note MSG
#   expect_fail TEXT CMD...  CMD fails (any status), stderr mentions TEXT
#   expect_exit STATUS TEXT CMD...
#                            CMD exits with exactly STATUS, stderr
#                            mentions TEXT
#   $cowchain_bin, requires_cowchain
#                            the built tool; fail unless it is built
#   run_cowchain ARGS...     run the tool (time-out $cowchain_timeout s):
#                            $rc, $tmpdir/out, $tmpdir/err
#   qcow2_patch FILE OP...   read or change qcow2 header fields, table
#                            entries, refcounts or raw bytes
#                            (tests/qcow2-patch.py)
#   objects_of, defined_symbols, undefined_symbols
#                            object files and their global symbols
#   requires_python_nbd      fail unless $PYTHON can import nbd

set -e
set -u
set -o pipefail

test_name=$(basename "$0" .sh)

: "${abs_top_srcdir:=$(cd "$(dirname "$0")/.." && pwd)}"
: "${abs_top_builddir:=$(pwd)}"
: "${COWCHAIN_PLUGIN:=$abs_top_builddir/.libs/nbdkit-cowchain-plugin.so}"
: "${COWCHAIN_SANITIZERS:=0}"
testsdir=$abs_top_srcdir/tests
export abs_top_srcdir abs_top_builddir COWCHAIN_PLUGIN testsdir

# libnbd's Python module is installed for the system Python only; a
# python3 earlier in $PATH (pyenv, a venv) would not find it.
PYTHON=/usr/bin/python3
export PYTHONDONTWRITEBYTECODE=1

fail ()
{
    echo "FAIL: $test_name: $*" >&2
    exit 1
}

skip ()
{
    echo "SKIP: $test_name: $*" >&2
    exit 77
}

note ()
{
    echo "== $test_name [${SECONDS}s]: $*"
}

# The tools are installed by scripts/test.sh, so a missing one is a
# failure, not a reason to skip.
requires ()
{
    local cmd
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null 2>&1 ||
            fail "required program '$cmd' not found (scripts/test.sh installs it)"
    done
}

requires_python_nbd ()
{
    [ -x "$PYTHON" ] || fail "$PYTHON not found"
    "$PYTHON" -c 'import nbd' 2>/dev/null ||
        fail "$PYTHON cannot import nbd (install python3-libnbd)"
}

nbdsh ()
{
    "$PYTHON" -m nbd "$@"
}

sha256 ()
{
    sha256sum "$1" | cut -d' ' -f1
}

# make_random_file FILE SIZE SEED: SIZE bytes from a seeded generator, so
# every run of a test sees the same data.
make_random_file ()
{
    "$PYTHON" - "$1" "$2" "$3" <<'EOF'
import random, sys
path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
with open(path, "wb") as f:
    left = size
    while left > 0:
        n = min(left, 4 << 20)
        f.write(rng.randbytes(n))
        left -= n
EOF
}

#----------------------------------------------------------------------
# Temporary directory and cleanup.

tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/cowchain-$test_name.XXXXXX")
declare -a exit_hooks=()
declare -A servers=()          # NAME -> pid of every server still running
declare -A server_tasks=()     # NAME -> its thread count when it was idle

on_exit ()
{
    exit_hooks+=("$*")
}

# A plain nbdkit (never the sanitizer build) serving a remote base,
# read-only, on a UNIX socket: start_base_server SOCKET LOG NBDKIT-ARGS...
# (plugin, filters, parameters).  Sets base_pid; kill_base stops it, and
# runs at exit.
base_pid=
start_base_server ()
{
    local sock=$1 log=$2 i
    shift 2
    rm -f "$sock" "$sock.pid"
    nbdkit -f -r -U "$sock" -P "$sock.pid" "$@" </dev/null >>"$log" 2>&1 &
    base_pid=$!
    for (( i = 0; i < 600; i++ )); do
        kill -0 "$base_pid" 2>/dev/null || fail "the base nbdkit exited"
        [ -s "$sock.pid" ] && [ -S "$sock" ] && return 0
        sleep 0.05
    done
    fail "the base nbdkit did not start"
}

kill_base ()
{
    [ -n "$base_pid" ] || return 0
    kill -KILL "$base_pid" 2>/dev/null || :
    wait "$base_pid" 2>/dev/null || :
    base_pid=
}

cleanup ()
{
    local rc=$? name pid i
    set +e
    for name in "${!servers[@]}"; do
        pid=${servers[$name]}
        kill -KILL "$pid" 2>/dev/null
        wait "${server_waiters[$name]:-}" 2>/dev/null
    done
    for (( i = ${#exit_hooks[@]} - 1; i >= 0; i-- )); do
        eval "${exit_hooks[$i]}"
    done
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ]; then
        for f in "$tmpdir"/*.log; do
            [ -s "$f" ] || continue
            echo "---- last lines of $(basename "$f") ----" >&2
            tail -n 40 "$f" >&2
        done
    fi
    if [ "${KEEP_TMPDIR:-0}" = 1 ]; then
        echo "$test_name: kept $tmpdir" >&2
    else
        rm -rf "$tmpdir"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

#----------------------------------------------------------------------
# Sanitizers.
#
# In the ASan+UBSan build the plugin is instrumented but nbdkit is not, so
# the ASan runtime has to be preloaded into nbdkit (only into nbdkit: the
# client tools are not instrumented and don't need it).
#
# A small library preloaded after libasan works around two problems:
#
# - nbdkit dlclose()s the plugin at exit, before LeakSanitizer runs.  The
#   plugin's globals then no longer count as roots (everything they point
#   to is reported as leaked) and stack frames in the plugin can't be
#   named.  With dlclose a no-op the plugin stays mapped, so leak checking
#   can stay on (detect_leaks=1) with no suppressions.
#
# - With libasan preloaded (gcc 12, glibc 2.36), once anything in the
#   process has called strerror(), exit() hangs for ever: p11-kit's
#   destructor (nbdkit links gnutls) calls freelocale(), which waits on
#   glibc's __libc_setlocale_lock, whose reader count has gone negative.
#   Reproduced without nbdkit or cowchain: a program that calls
#   gnutls_global_init() and strerror(), run with LD_PRELOAD=libasan.so.
#   A freelocale that does nothing avoids it (nothing else in the server
#   frees locales; a locale not freed at exit is no leak).

declare -a server_env=()
if [ "$COWCHAIN_SANITIZERS" = 1 ]; then
    requires gcc
    libasan=$(gcc -print-file-name=libasan.so)
    case $libasan in
        /*) [ -e "$libasan" ] || fail "libasan.so not found ($libasan)" ;;
        *) fail "gcc cannot find libasan.so" ;;
    esac
    cat > "$tmpdir/sanshim.c" <<'EOF'
#include <locale.h>
int dlclose (void *handle);
int dlclose (void *handle) { (void) handle; return 0; }
void freelocale (locale_t l) { (void) l; }
EOF
    gcc -shared -fPIC -o "$tmpdir/sanshim.so" "$tmpdir/sanshim.c" ||
        fail "cannot build the sanitizer shim"
    server_env=(
        LD_PRELOAD="$libasan:$tmpdir/sanshim.so"
        ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=1"
        UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}print_stacktrace=1:halt_on_error=1"
    )
fi

# Sanitizer reports in a server log mean failure, whatever the exit status.
check_sanitizer_log ()
{
    local log=$1
    if grep -E -q 'ERROR: (Address|Leak)Sanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer' "$log" 2>/dev/null
    then
        echo "---- sanitizer report in $(basename "$log") ----" >&2
        cat "$log" >&2
        fail "sanitizer report from the server (see above)"
    fi
}

#----------------------------------------------------------------------
# Servers.
#
# nbdkit runs with -f (in the foreground, as a background child of the
# test), so that its stderr, including runtime errors and sanitizer
# reports, lands in $tmpdir/NAME.log and its exit status can be collected.
# It is stopped by its PID only.
#
# It runs under a small subshell that waits for it and writes its exit
# status to $tmpdir/NAME.status.  The test shell only ever waits for that
# subshell, so a server killed by a signal (on purpose: kill -9) does not
# make bash print "Killed ..." into the test's output; that line goes to
# the server's log instead.

declare -a server_wrapper=()    # a command prefix (e.g. setpriv ...)
declare -A server_waiters=()    # NAME -> pid of the subshell waiting for it
server_start_timeout=${COWCHAIN_START_TIMEOUT:-60}

server_uri ()
{
    echo "nbd+unix:///?socket=$tmpdir/$1.sock"
}

server_log ()
{
    echo "$tmpdir/$1.log"
}

# pidfile_pid FILE: the PID nbdkit -P wrote to FILE.  A server that
# forks into the background writes it in the child, after the nbdkit
# command has returned, so wait for it (10 s at most).
pidfile_pid ()
{
    local i
    for (( i = 0; i < 200; i++ )); do
        [ -s "$1" ] && { cat "$1"; return 0; }
        sleep 0.05
    done
    fail "no PID in $1 10 s after nbdkit went into the background"
}

server_pid ()
{
    echo "${servers[$1]}"
}

# _launch NAME ARGS...: start nbdkit; the waiting subshell's pid is left
# in $launched_waiter.
_launch ()
{
    local name=$1; shift
    local -a opts=() keys=()
    local a
    for a in "$@"; do
        case $a in
            -*) opts+=("$a") ;;
            *) keys+=("$a") ;;
        esac
    done
    [ -e "$COWCHAIN_PLUGIN" ] ||
        fail "plugin not found: $COWCHAIN_PLUGIN (build first, or set COWCHAIN_PLUGIN)"
    rm -f "$tmpdir/$name.sock" "$tmpdir/$name.pid" "$tmpdir/$name.status"
    local -a leak_env=()
    if [ "$COWCHAIN_SANITIZERS" = 1 ] && [ "${no_leak_check:-0}" = 1 ]; then
        leak_env=(ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0")
    fi
    (
        st=0
        # stdin from /dev/null: never let a server read the test's stdin.
        env ${server_env[@]+"${server_env[@]}"} \
            ${leak_env[@]+"${leak_env[@]}"} \
            ${server_wrapper[@]+"${server_wrapper[@]}"} \
            nbdkit -f --log=stderr \
            -U "$tmpdir/$name.sock" -P "$tmpdir/$name.pid" \
            ${opts[@]+"${opts[@]}"} \
            "$COWCHAIN_PLUGIN" ${keys[@]+"${keys[@]}"} \
            </dev/null >>"$tmpdir/$name.log" 2>&1 || st=$?
        echo "$st" > "$tmpdir/$name.status"
    ) 2>>"$tmpdir/$name.log" &
    launched_waiter=$!
}

_running ()
{
    kill -0 "$1" 2>/dev/null && ! _is_zombie "$1"
}

_is_zombie ()
{
    local line
    { read -r line < "/proc/$1/stat"; } 2>/dev/null || return 1
    line=${line##*) }                 # after "pid (comm) "
    [ "${line%% *}" = Z ]
}

# _collect NAME WAITER: wait for the waiting subshell; the server's exit
# status in $exit_status.
_collect ()
{
    wait "$2" 2>/dev/null || :
    exit_status=$(cat "$tmpdir/$1.status" 2>/dev/null) || exit_status=unknown
}

# _wait_ready NAME WAITER: 0 when the server is serving (its pid in
# $launched_pid), 1 if it exited (its exit status in $exit_status).
_wait_ready ()
{
    local name=$1 waiter=$2 i pid
    for (( i = 0; i < server_start_timeout * 20; i++ )); do
        if ! _running "$waiter"; then
            _collect "$name" "$waiter"
            return 1
        fi
        if [ -s "$tmpdir/$name.pid" ] && [ -S "$tmpdir/$name.sock" ]; then
            pid=$(cat "$tmpdir/$name.pid")
            _running "$pid" || fail "$name: pidfile names $pid, not running"
            launched_pid=$pid
            return 0
        fi
        sleep 0.05
    done
    [ -s "$tmpdir/$name.pid" ] && kill -KILL "$(cat "$tmpdir/$name.pid")" 2>/dev/null
    _collect "$name" "$waiter"
    fail "$name: server did not start within ${server_start_timeout}s"
}

start_server ()
{
    local name=$1
    [ -z "${servers[$name]:-}" ] || fail "server $name is already running"
    echo "== $test_name: start $name: nbdkit cowchain ${*:2}" >> "$tmpdir/$name.log"
    _launch "$@"
    if ! _wait_ready "$name" "$launched_waiter"; then
        echo "---- $name.log ----" >&2
        cat "$tmpdir/$name.log" >&2
        fail "server $name failed to start (exit status $exit_status): nbdkit ${*:2}"
    fi
    servers[$name]=$launched_pid
    server_waiters[$name]=$launched_waiter
    server_tasks[$name]=$(_ntasks "$launched_pid")
}

_ntasks ()
{
    local t n=0
    for t in /proc/"$1"/task/*; do
        [ -e "$t" ] && n=$(( n + 1 ))
    done
    echo "$n"
}

# _wait_idle NAME PID: give the server up to 5 s to finish with the
# connections that clients have just closed (until it has no more threads
# than when it started).  nbdkit exits on SIGTERM without waiting for a
# connection thread that is still tearing down, and LeakSanitizer then
# reports that connection's memory (allocated by nbdkit itself) as leaked.
_wait_idle ()
{
    local name=$1 pid=$2 i
    for (( i = 0; i < 100; i++ )); do
        [ "$(_ntasks "$pid")" -le "${server_tasks[$name]:-1}" ] && return 0
        sleep 0.05
    done
    return 0
}

expect_start_failure ()
{
    local name=$1
    : > "$tmpdir/$name.log"
    # LeakSanitizer's check at exit costs 1-2 s per nbdkit run here, too
    # much for the dozens of refused starts; a refused start's leaks die
    # with the process anyway.
    no_leak_check=1 _launch "$@"
    if _wait_ready "$name" "$launched_waiter"; then
        kill -KILL "$launched_pid"
        _collect "$name" "$launched_waiter"
        fail "server $name started but should have refused: nbdkit ${*:2}"
    fi
    [ "$exit_status" != 0 ] ||
        fail "server $name exited with status 0 instead of an error"
    check_sanitizer_log "$tmpdir/$name.log"
}

# _wait_gone NAME: wait (60 s at most) for the server to exit; its status
# in $exit_status.
_wait_gone ()
{
    local name=$1 i
    local pid=${servers[$name]} waiter=${server_waiters[$name]}
    for (( i = 0; i < 1200; i++ )); do
        if ! _running "$pid"; then
            _collect "$name" "$waiter"
            unset 'servers[$name]' 'server_waiters[$name]'
            return 0
        fi
        sleep 0.05
    done
    return 1
}

stop_server ()
{
    local name=$1 pid=${servers[$1]:-}
    [ -n "$pid" ] || fail "stop_server: no server $name"
    _wait_idle "$name" "$pid"
    kill -TERM "$pid" 2>/dev/null || :
    if ! _wait_gone "$name"; then
        kill -KILL "$pid" 2>/dev/null || :
        _wait_gone "$name" || :
        fail "server $name (pid $pid) did not exit within 60 s of SIGTERM"
    fi
    check_sanitizer_log "$tmpdir/$name.log"
    [ "$exit_status" = 0 ] ||
        fail "server $name exited with status $exit_status after SIGTERM"
}

crash_server ()
{
    local name=$1 pid=${servers[$1]:-}
    [ -n "$pid" ] || fail "crash_server: no server $name"
    kill -KILL "$pid" 2>/dev/null || :
    _wait_gone "$name" || fail "server $name (pid $pid) survived SIGKILL"
    check_sanitizer_log "$tmpdir/$name.log"
}

# reap_server NAME: the server was killed by someone else (e.g. a client
# script sent it SIGKILL): collect it.
reap_server ()
{
    local name=$1 pid=${servers[$1]:-}
    [ -n "$pid" ] || fail "reap_server: no server $name"
    _wait_gone "$name" || fail "server $name (pid $pid) is still running"
    check_sanitizer_log "$tmpdir/$name.log"
}

server_alive ()
{
    local pid=${servers[$1]:-}
    [ -n "$pid" ] && _running "$pid"
}

#----------------------------------------------------------------------
# Commands that must fail, and the cowchain tool.

# expect_fail TEXT CMD...: CMD fails (any non-zero exit status), and its
# stderr mentions TEXT (case-insensitive).  Its output is left in
# $tmpdir/out and $tmpdir/err.
expect_fail ()
{
    local text=$1; shift
    if "$@" > "$tmpdir/out" 2> "$tmpdir/err"; then
        fail "should have failed: $*"
    fi
    grep -q -i -- "$text" "$tmpdir/err" ||
        { cat "$tmpdir/err" >&2; fail "error of '$*' does not mention '$text'"; }
}

# expect_exit STATUS TEXT CMD...: CMD exits with exactly STATUS (the
# tool's 1 for a refusal is not a crash's 134), and its stderr mentions
# TEXT (case-insensitive).  Output in $tmpdir/out and $tmpdir/err.
expect_exit ()
{
    local want=$1 text=$2 rc=0; shift 2
    "$@" > "$tmpdir/out" 2> "$tmpdir/err" || rc=$?
    [ "$rc" = "$want" ] ||
        { cat "$tmpdir/out" "$tmpdir/err" >&2; fail "exit status $rc, not $want: $*"; }
    grep -q -i -- "$text" "$tmpdir/err" ||
        { cat "$tmpdir/err" >&2; fail "error of '$*' does not mention '$text'"; }
}

# The built tool.
cowchain_bin=$abs_top_builddir/cowchain

# requires_cowchain: fail unless the tool is built; in the sanitizer
# build, its leaks fail it too.
requires_cowchain ()
{
    [ -x "$cowchain_bin" ] || fail "cowchain not built: $cowchain_bin"
    if [ "$COWCHAIN_SANITIZERS" = 1 ]; then
        export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=1"
    fi
}

# run_cowchain ARGS...: run the tool, never hanging (killed after
# $cowchain_timeout s, default 120: a time-out fails the test), its
# stdout in $tmpdir/out, stderr in $tmpdir/err, exit status in $rc.  A
# sanitizer report fails the test whatever the status.
cowchain_timeout=120
run_cowchain ()
{
    rc=0
    timeout "$cowchain_timeout" "$cowchain_bin" "$@" >"$tmpdir/out" 2>"$tmpdir/err" || rc=$?
    check_sanitizer_log "$tmpdir/err"
    [ "$rc" -ne 124 ] || fail "cowchain $*: timed out"
}

#----------------------------------------------------------------------
# Images.

# check_image FILE [leaks-ok]
check_image ()
{
    local file=$1 leaks_ok=${2:-} rc=0 out
    out=$(qemu-img check -U -f qcow2 "$file" 2>&1) || rc=$?
    case $rc in
        0) ;;
        3)
            if [ "$leaks_ok" = leaks-ok ]; then
                note "qemu-img check $(basename "$file"): leaked clusters only (acceptable here)"
            else
                echo "$out" >&2
                fail "qemu-img check $(basename "$file"): leaked clusters"
            fi
            ;;
        *)
            echo "$out" >&2
            fail "qemu-img check $(basename "$file") exited with $rc"
            ;;
    esac
}

# qcow2_patch FILE OP...: read or change a qcow2 image's header fields,
# table entries, refcounts or raw bytes; see tests/qcow2-patch.py.
qcow2_patch ()
{
    "$PYTHON" "$testsdir/qcow2-patch.py" "$@"
}

# img_info FILE FIELD: one field of `qemu-img info --output=json`, with
# dots for nested keys (format-specific.data.compat).
img_info ()
{
    qemu-img info -U --output=json "$1" |
        "$PYTHON" -c '
import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = v[k]
print(v)' "$2"
}

#----------------------------------------------------------------------
# Symbols of the built objects (tests/test-api-*.sh).

# objects_of LIST...: the object files of make's object lists (paths
# relative to the build tree, as in $(cowchain_OBJECTS)): a libtool .lo
# names its PIC object (and maybe a non-PIC one) beside it in .libs/.
objects_of ()
{
    local o dir f
    for o in "$@"; do
        case $o in
            /*) ;;
            *) o=$abs_top_builddir/$o ;;
        esac
        case $o in
            *.lo)
                [ -f "$o" ] || fail "object list names $o, which is not built"
                dir=$(dirname "$o")
                for f in $(sed -n "s/^\(non_\)\{0,1\}pic_object='\(.*\)'$/\2/p" "$o"); do
                    [ "$f" = none ] || echo "$dir/$f"
                done
                ;;
            *)
                [ -f "$o" ] || fail "object list names $o, which is not built"
                echo "$o"
                ;;
        esac
    done | sort -u
}

# defined_symbols OBJ... / undefined_symbols OBJ...: "SYMBOL OBJECT" lines
# for the global symbols each object defines / references.  Names that
# start with two underscores belong to the compiler or its sanitizers.
defined_symbols ()
{
    local o
    for o in "$@"; do
        nm -g --defined-only "$o" | awk -v o="$o" 'NF == 3 && $3 !~ /^__/ { print $3, o }'
    done
}

undefined_symbols ()
{
    local o
    for o in "$@"; do
        nm -u "$o" | awk -v o="$o" '$NF !~ /^__/ { print $NF, o }'
    done
}
