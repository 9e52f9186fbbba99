#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The conventions every cowchain command keeps (issue 13): --help, -h and
# `cowchain help CMD` with the same sections (Usage, a description,
# Options, Exit status, Example); each command and each of its options
# documented in docs/cowchain.pod; the global options before the command
# meaning what they mean after it; every cowchain-specific JSON output
# valid and carrying "version": 1.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img
requires_cowchain
cow=$cowchain_bin
pod=$abs_top_srcdir/docs/cowchain.pod
[ -f "$pod" ] || fail "no $pod"
unset COWCHAIN_CONTROL COWCHAIN_TIMEOUT

#----------------------------------------------------------------------
note "the commands of cowchain --help"
run_cowchain --help
[ "$rc" = 0 ] || fail "cowchain --help exited $rc"
mapfile -t commands < <(sed -n '/^Commands:/,/^$/s/^  \([a-z][a-z-]*\) .*/\1/p' "$tmpdir/out")
[ "${#commands[@]}" -ge 16 ] || fail "cowchain --help lists ${#commands[@]} commands: ${commands[*]}"
for section in "^Usage: cowchain " "^Commands:" "^Global options" "^Exit status:" "^Example:"; do
    grep -q "$section" "$tmpdir/out" || fail "cowchain --help lacks '$section'"
done
# The global options are documented in the page's own section.
for opt in control state output timeout; do
    grep -q "^=item .*B<--$opt>" "$pod" || fail "the global option --$opt is not an =item of cowchain.pod"
done

for cmd in "${commands[@]}"; do
    run_cowchain "$cmd" --help
    [ "$rc" = 0 ] || fail "cowchain $cmd --help exited $rc"
    [ ! -s "$tmpdir/err" ] || fail "cowchain $cmd --help wrote to stderr: $(cat "$tmpdir/err")"
    cp "$tmpdir/out" "$tmpdir/help.$cmd"
    head -n 1 "$tmpdir/help.$cmd" | grep -q "^Usage: cowchain $cmd " ||
        fail "$cmd --help does not start with its Usage line"
    # The description: the line after the Usage lines is text.
    sed -n '2,3p' "$tmpdir/help.$cmd" | grep -q '^[A-Z][a-z]' ||
        fail "$cmd --help has no description under its Usage line"
    for section in "^Options:" "^Exit status:" "^Example"; do
        grep -q "$section" "$tmpdir/help.$cmd" || fail "cowchain $cmd --help lacks '$section'"
    done
    grep -q "^  cowchain .*$cmd" "$tmpdir/help.$cmd" ||
        fail "the example of $cmd --help does not run cowchain $cmd"
    run_cowchain "$cmd" -h
    cmp -s "$tmpdir/out" "$tmpdir/help.$cmd" || fail "cowchain $cmd -h differs from --help"
    run_cowchain help "$cmd"
    [ "$rc" = 0 ] && cmp -s "$tmpdir/out" "$tmpdir/help.$cmd" ||
        fail "cowchain help $cmd differs from cowchain $cmd --help"
    # Documented in the page: the command, and each of its options.
    grep -q "^=item B<$cmd>" "$pod" || fail "command $cmd is not an =item of cowchain.pod"
    sed -n '/^Options:/,/^$/s/^ \{1,\}\(-[a-zA-Z], \)\{0,1\}--\([a-z][a-z-]*\).*/\2/p' \
        "$tmpdir/help.$cmd" > "$tmpdir/opts.$cmd"
    [ -s "$tmpdir/opts.$cmd" ] || fail "no options found in $cmd --help"
    while read -r opt; do
        grep -q -F "B<--$opt>" "$pod" ||
            fail "option --$opt of $cmd is not in cowchain.pod (as B<--$opt>)"
    done < "$tmpdir/opts.$cmd"
done
note "${#commands[@]} commands: help sections, pod entries and options checked"

if command -v podchecker >/dev/null; then
    podchecker "$pod" >/dev/null 2>&1 || { podchecker "$pod" >&2; fail "podchecker: $pod"; }
fi

#----------------------------------------------------------------------
note "global options: the same as after the command, for every command that talks to a server"
qemu-img create -q -f raw "$tmpdir/base.img" 4M
ctl=$tmpdir/ctl
st=$tmpdir/st
start_server srv disk=vda base="$tmpdir/base.img" base-format=raw \
    state="$st" control="$ctl" \
    disk=vdb base="$tmpdir/base.img" base-format=raw state="$tmpdir/st2"

# same_both ARGS...: cowchain --control CTL CMD ARGS... and cowchain CMD
# --control CTL ARGS... (CMD the first of ARGS) exit alike and print the
# same.
same_both ()
{
    local cmd=$1 a b; shift
    run_cowchain --control "$ctl" "$cmd" "$@"; a=$rc
    cp "$tmpdir/out" "$tmpdir/before.out"; cp "$tmpdir/err" "$tmpdir/before.err"
    run_cowchain "$cmd" --control "$ctl" "$@"; b=$rc
    [ "$a" = "$b" ] || fail "cowchain --control S $cmd $*: exit $a; cowchain $cmd --control S $*: exit $b"
    cmp -s "$tmpdir/before.out" "$tmpdir/out" ||
        { diff "$tmpdir/before.out" "$tmpdir/out" >&2; fail "$cmd $*: the two forms print different things"; }
    cmp -s "$tmpdir/before.err" "$tmpdir/err" ||
        { diff "$tmpdir/before.err" "$tmpdir/err" >&2; fail "$cmd $*: the two forms say different things"; }
}

"$cow" --control "$ctl" snapshot --disk vda s1 >/dev/null || fail "global --control: snapshot"
"$cow" snapshot --control "$ctl" --disk vda s2 >/dev/null || fail "snapshot --control"
same_both list --disk vda
grep -q '^ s1 ' "$tmpdir/out" && grep -q '^ s2 ' "$tmpdir/out" || fail "list lacks s1 and s2"
same_both list --disk vda --tree
same_both list --disk vda --output=json
same_both blklist
grep -q "vdb" "$tmpdir/out" || fail "blklist lacks vdb"
same_both blklist --details
same_both status
same_both jobs
same_both jobs --disk vdb --output=json
same_both wait --disk vda
same_both info --disk vda
same_both pause --disk vda        # no job: refused alike
[ "$rc" = 1 ] || fail "pause with no job: exit $rc"
same_both resume --disk vda
same_both cancel --disk vda
same_both speed --disk vda 1M
same_both revert --disk vda s9    # no such snapshot: refused alike
grep -q "s9" "$tmpdir/err" || fail "revert of a missing snapshot does not name it"
# The changing commands once in each form.
for form in before after; do
    if [ $form = before ]; then pre=(--control "$ctl"); post=(); else pre=(); post=(--control "$ctl"); fi
    run_cowchain "${pre[@]}" revert "${post[@]}" --disk vdb --force s-none
    [ "$rc" = 1 ] || fail "revert to a missing snapshot ($form): exit $rc"
    run_cowchain "${pre[@]}" snapshot "${post[@]}" --disk vdb "b-$form"
    [ "$rc" = 0 ] || fail "snapshot with --control $form the command: $(cat "$tmpdir/err")"
    run_cowchain "${pre[@]}" delete "${post[@]}" --disk vdb --wait "b-$form"
    [ "$rc" = 0 ] || fail "delete with --control $form the command: $(cat "$tmpdir/err")"
    run_cowchain "${pre[@]}" snapshot "${post[@]}" --disk vdb "c-$form"
    run_cowchain "${pre[@]}" snapshot "${post[@]}" --disk vdb "d-$form"
    run_cowchain "${pre[@]}" pull "${post[@]}" --disk vdb --base "c-$form" --force --wait
    [ "$rc" = 0 ] || fail "pull with --control $form the command: $(cat "$tmpdir/err")"
    run_cowchain "${pre[@]}" commit "${post[@]}" --disk vdb --top active --base "c-$form" --force --wait
    [ "$rc" = 0 ] || fail "commit with --control $form the command: $(cat "$tmpdir/err")"
done
run_cowchain --control "$ctl" revert --disk vda --force s1
[ "$rc" = 0 ] || fail "global --control: revert: $(cat "$tmpdir/err")"
# --timeout and --output as global options.
run_cowchain --timeout 5 --output json --control "$ctl" list --disk vda
[ "$rc" = 0 ] || fail "global --timeout --output: $(cat "$tmpdir/err")"
"$PYTHON" -c 'import json,sys; v = json.load(open(sys.argv[1])); assert v["version"] == 1 and [s["name"] for s in v["snapshots"]] == ["s1"], v' "$tmpdir/out" ||
    fail "global --output=json: $(cat "$tmpdir/out")"
# The environment stands for --control too.
COWCHAIN_CONTROL=$ctl run_cowchain list --disk vda --output=json
[ "$rc" = 0 ] || fail "COWCHAIN_CONTROL: $(cat "$tmpdir/err")"
# Given before and after: refused as twice, whatever the values.
run_cowchain --control "$ctl" list --control "$ctl"
[ "$rc" = 1 ] && grep -q "option '--control' given twice" "$tmpdir/err" ||
    fail "--control before and after the command: $(cat "$tmpdir/err")"
run_cowchain --output=json list --output=text --control "$ctl"
[ "$rc" = 1 ] && grep -q "option '--output' given twice ('json', then 'text')" "$tmpdir/err" ||
    fail "--output before and after the command: $(cat "$tmpdir/err")"
# A global option a command does not take is refused, naming both.
run_cowchain --state "$st" blklist
[ "$rc" = 1 ] && grep -q "blklist: the global option --state=$st does not apply" "$tmpdir/err" ||
    fail "--state before blklist: $(cat "$tmpdir/err")"
run_cowchain --output=json --control "$ctl" snapshot --disk vda s3
[ "$rc" = 1 ] && grep -q "snapshot: the global option --output=json does not apply: it prints no data" "$tmpdir/err" ||
    fail "--output=json before snapshot: $(cat "$tmpdir/err")"
run_cowchain --control "$ctl" list --disk vda
grep -q '^ s3 ' "$tmpdir/out" && fail "the refused snapshot s3 was taken"
run_cowchain --timeout 5 check "$tmpdir/base.img"
[ "$rc" = 1 ] && grep -q "check: the global option --timeout=5 does not apply" "$tmpdir/err" ||
    fail "--timeout before check: $(cat "$tmpdir/err")"
run_cowchain --control "$ctl"
[ "$rc" = 1 ] && grep -q "missing COMMAND" "$tmpdir/err" || fail "global options and no command: $(cat "$tmpdir/err")"

#----------------------------------------------------------------------
note "JSON outputs parse and carry version 1"
json_v1 ()   # WHAT KEY: $tmpdir/out is {"version": 1, KEY: [...]}
{
    "$PYTHON" - "$tmpdir/out" "$2" <<'PY' || fail "$1: not JSON with version 1 and a list '$2': $(cat "$tmpdir/out")"
import json, sys
v = json.loads(open(sys.argv[1], "rb").read().decode("utf-8"))
assert isinstance(v, dict) and v.get("version") == 1, v
assert isinstance(v[sys.argv[2]], list), v
PY
}
run_cowchain --control "$ctl" list --disk vda --output=json;   json_v1 list snapshots
run_cowchain --control "$ctl" jobs --output=json;              json_v1 jobs jobs
"$PYTHON" -c 'import json,sys; v = json.load(open(sys.argv[1])); assert sorted(j["disk"] for j in v["jobs"]) == ["vda", "vdb"], v' "$tmpdir/out" ||
    fail "jobs JSON: $(cat "$tmpdir/out")"
run_cowchain --control "$ctl" blklist --output=json;           json_v1 blklist disks
"$PYTHON" -c 'import json,sys; v = json.load(open(sys.argv[1])); assert [d["name"] for d in v["disks"]] == ["vda", "vdb"] and all(d["source"].endswith(".qcow2") for d in v["disks"]), v' "$tmpdir/out" ||
    fail "blklist JSON: $(cat "$tmpdir/out")"
run_cowchain --control "$ctl" status --output=json;            json_v1 status disks
"$PYTHON" -c 'import json,sys; v = json.load(open(sys.argv[1])); d = v["disks"][0]; assert d["name"] == "vda" and d["state"] == "ok" and d["reason"] is None and d["clients"] == 0 and d["layers"] == 2, v' "$tmpdir/out" ||
    fail "status JSON: $(cat "$tmpdir/out")"
run_cowchain --control "$ctl" status --output=text
grep -q '^ vda ' "$tmpdir/out" || fail "status --output=text: $(cat "$tmpdir/out")"
# info and check keep qemu-img's shapes: no version there.
run_cowchain --control "$ctl" info --disk vda --output=json
"$PYTHON" -c 'import json,sys; v = json.load(open(sys.argv[1])); assert "version" not in v and v["format"] == "qcow2", v' "$tmpdir/out" ||
    fail "info JSON: $(cat "$tmpdir/out")"
stop_server srv
run_cowchain --state "$st" list --output=json;                 json_v1 "list --state" snapshots
run_cowchain check --output=json "$st/$(basename "$(ls "$st"/layer-*.qcow2 | head -n 1)")"
"$PYTHON" -c 'import json,sys; v = json.load(open(sys.argv[1])); assert "version" not in v and v["check-errors"] == 0, v' "$tmpdir/out" ||
    fail "check JSON: $(cat "$tmpdir/out")"
note "ok"
