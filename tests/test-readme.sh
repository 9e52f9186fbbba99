#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Every ```sh example of README.md runs as written.
#
# The blocks run in README order, in one bash session with `set -e` (so a
# server one block starts serves the next, as for a reader following the
# README), in a directory that looks like the top of the source tree:
# build/ is the build directory and scripts/ the source tree's.  What the
# examples assume of the machine is made inside a temporary directory T:
#
#   - /run/, /images/ and /var/lib/ in a block become T/run/, T/images/
#     and T/var/lib/ (T/images/golden.qcow2 and T/images/data.raw exist,
#     as does base.img in the working directory);
#   - `cowchain` is the built tool, and nbdkit's plugin named `cowchain`
#     is the built plugin (nbdkit finds an installed one by that name);
#   - qemu-system-x86_64 and qemu-kvm (no VM here) are stand-ins that open
#     each `-drive file=...` with qemu-io, QEMU's own block layer, and
#     read from it: the drive strings are checked, not the emulator.
#
# A block that cannot run here is preceded by a marker line
#     <!-- test-readme: skip: REASON -->
# and listed with its reason.  Any other `test-readme:` marker, or one
# without a reason, fails the test.  scripts/quickstart.sh (the first
# block's demo) runs on its own at the end, with the built plugin.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit nbdinfo qemu-img qemu-io
requires_python_nbd
requires_cowchain

readme=$abs_top_srcdir/README.md
T=$tmpdir/t
work=$T/work
mkdir -p "$T/bin" "$T/run" "$T/images" "$T/var/lib/cowchain" "$work"
ln -s "$abs_top_builddir" "$work/build"
ln -s "$abs_top_srcdir/scripts" "$work/scripts"

# Every nbdkit the examples start forks into the background with -P: the
# wrapper notes the pidfile so that the test stops it (by PID) at exit.
cat > "$T/bin/nbdkit" <<EOF
#!/usr/bin/env bash
args=() prev=
for a in "\$@"; do
    [ "\$prev" = -P ] && echo "\$a" >> "$T/pidfiles"
    case \$a in
        cowchain) args+=("$COWCHAIN_PLUGIN") ;;
        *) args+=("\$a") ;;
    esac
    prev=\$a
done
exec env ${server_env[*]+${server_env[*]}} $(command -v nbdkit) "\${args[@]}"
EOF
cat > "$T/bin/cowchain" <<EOF
#!/bin/sh
exec "$cowchain_bin" "\$@"
EOF
cat > "$T/bin/qemu-system-x86_64" <<'EOF'
#!/usr/bin/env bash
# Stand-in for a VM: open every -drive's file= (with its format= and
# cache= if given) with qemu-io and read its first sector.
n=0 prev=
for a in "$@"; do
    if [ "$prev" = -drive ]; then
        file= fmt= cache=
        IFS=, read -ra opts <<< "$a"
        for o in "${opts[@]}"; do
            case $o in
                file=*) file=${o#file=} ;;
                format=*) fmt=${o#format=} ;;
                cache=*) cache=${o#cache=} ;;
            esac
        done
        [ -n "$file" ] || { echo "stand-in: -drive without file=: $a" >&2; exit 1; }
        qemu-io ${fmt:+-f "$fmt"} ${cache:+-t "$cache"} -r "$file" \
                -c 'read 0 512' > /dev/null ||
            { echo "stand-in: qemu-io cannot open -drive $a" >&2; exit 1; }
        echo "($(basename "$0") stand-in: -drive $a opens and reads)"
        n=$((n + 1))
    fi
    prev=$a
done
[ "$n" -gt 0 ] || { echo "stand-in: no -drive given" >&2; exit 1; }
EOF
cp "$T/bin/qemu-system-x86_64" "$T/bin/qemu-kvm"
chmod +x "$T/bin"/*

# SIGTERM each server an example left running, by the PID in its
# pidfile; SIGKILL after 10 s.
stop_readme_servers ()
{
    local f pid i
    [ -f "$T/pidfiles" ] || return 0
    while read -r f; do
        pid=$(cat "$f" 2>/dev/null) || continue
        [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || continue
        for (( i = 0; i < 100; i++ )); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || :
    done < "$T/pidfiles"
    rm -f "$T/pidfiles"
    return 0
}
on_exit stop_readme_servers

# The files the examples take as given.
truncate -s 64M "$work/base.img"
qemu-img create -q -f qcow2 "$T/images/golden.qcow2" 64M
truncate -s 32M "$T/images/data.raw"

note "extract the sh blocks of README.md"
"$PYTHON" - "$readme" "$T" "$tmpdir/session.sh" "$tmpdir/skipped" <<'EOF' ||
import re, sys
readme, T, out, skipped = sys.argv[1:]
lines = open(readme, encoding="utf-8").read().split("\n")
marker = re.compile(r"^<!-- test-readme: (.*?) -->$")
blocks, skips, i = [], [], 0
while i < len(lines):
    m = marker.match(lines[i])
    if m:
        if not re.match(r"skip: \S", m.group(1)):
            sys.exit("README.md:%d: unknown test-readme marker %r (want "
                     "'skip: REASON')" % (i + 1, m.group(1)))
        if i + 1 >= len(lines) or lines[i + 1] != "```sh":
            sys.exit("README.md:%d: the marker is not right above a ```sh "
                     "block" % (i + 1))
    if lines[i] == "```sh":
        start = i + 1
        j = start
        while j < len(lines) and lines[j] != "```":
            j += 1
        if j == len(lines):
            sys.exit("README.md:%d: unterminated ```sh block" % (i + 1))
        body = "\n".join(lines[start:j])
        prev = marker.match(lines[i - 1]) if i else None
        if prev:
            skips.append("README.md:%d: %s" % (i + 1, prev.group(1)[6:]))
        else:
            blocks.append((i + 1, body))
        i = j
    i += 1
path = re.compile(r"(?<![\w.\-/])/(run|images|var/lib)/")
with open(out, "w") as f:
    f.write("set -e -o pipefail\n")
    f.write("trap 'echo \"FAILED in the block at README.md:$readme_line\" >&2' ERR\n")
    for line, body in blocks:
        body = path.sub(lambda m: "%s/%s/" % (T, m.group(1)), body)
        f.write("printf '\\n== README.md:%d\\n'\n" % line)
        f.write("readme_line=%d\n%s\n" % (line, body))
open(skipped, "w").write("".join(s + "\n" for s in skips))
print("%d blocks to run, %d skipped" % (len(blocks), len(skips)))
if len(blocks) < 5:
    sys.exit("only %d runnable blocks: the extraction is broken" % len(blocks))
EOF
    fail "could not extract the README's blocks"
cat "$tmpdir/skipped"

note "run them in one session"
rc=0
# A bash of its own: set -e is off in a subshell on the left of ||.
cd "$work"
PATH="$T/bin:$PATH" env -u COWCHAIN_CONTROL -u COWCHAIN_TIMEOUT \
    timeout 600 bash "$tmpdir/session.sh" > "$tmpdir/session.log" 2>&1 || rc=$?
cd "$tmpdir"
cat "$tmpdir/session.log"
[ "$rc" = 0 ] || fail "a README example failed (exit $rc), see above"
stop_readme_servers
check_sanitizer_log "$tmpdir/session.log"

note "scripts/quickstart.sh"
rc=0
PATH="$T/bin:$PATH" COWCHAIN_PLUGIN=$COWCHAIN_PLUGIN COWCHAIN_TOOL=$cowchain_bin \
    TMPDIR=$tmpdir timeout 300 "$abs_top_srcdir/scripts/quickstart.sh" \
    > "$tmpdir/quickstart.log" 2>&1 || rc=$?
if [ "$rc" != 0 ]; then
    cat "$tmpdir/quickstart.log"
    fail "scripts/quickstart.sh failed (exit $rc)"
fi
check_sanitizer_log "$tmpdir/quickstart.log"
for want in "guest I/O paused" "Images are identical." "Content mismatch" \
        "deleted and its layer merged" "Reverted to snapshot before-upgrade" \
        "base unchanged" "overlapped 'cowchain snapshot before-upgrade'"; do
    grep -qF "$want" "$tmpdir/quickstart.log" || {
        cat "$tmpdir/quickstart.log"
        fail "the quickstart did not show '$want'"
    }
done
tail -n 3 "$tmpdir/quickstart.log"

note "ok"
