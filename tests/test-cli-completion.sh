#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The bash completion of cowchain (contrib/bash-completion/cowchain),
# sourced into this shell: COMPREPLY for commands, options, option values,
# disk names of a running server and snapshot names.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img
requires_cowchain
cow=$cowchain_bin
unset COWCHAIN_CONTROL COWCHAIN_TIMEOUT

# The completion uses `complete` and `compopt`, bash builtins that exist
# only with programmable completion: an interactive-like setup is not
# needed, only the builtins.
. "$abs_top_srcdir/contrib/bash-completion/cowchain"
complete -p cowchain | grep -q -- "-F _cowchain" || fail "the completion is not registered for cowchain"

# completes WANT WORD...: completing the last WORD of "cowchain WORD..."
# gives exactly WANT (space-separated, sorted).
completes ()
{
    local want=$1 got; shift
    COMP_WORDS=("$cow" "$@")
    COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
    COMP_LINE="${COMP_WORDS[*]}"
    COMP_POINT=${#COMP_LINE}
    COMPREPLY=()
    _cowchain
    got=$(printf '%s\n' "${COMPREPLY[@]+"${COMPREPLY[@]}"}" | sort | tr '\n' ' ')
    got=${got% }
    [ "$got" = "$want" ] || fail "completing 'cowchain $*': got '$got', expected '$want'"
}

note "commands and options"
completes "snapshot speed status" s
completes "cancel check commit" c
completes "help" he
completes "resume revert" help re
completes "--control= --help --output= --state= --timeout= --version" --
completes "--control= --details --help --output= --timeout=" blklist --
completes "--atomic --control= --description= --disk= --help --state= --timeout=" snapshot --
completes "--allow-base-write --base= --control= --disk= --force --help --progress --speed= --state= --timeout= --top= --wait" commit --
completes "--repair=" check --r
completes "leaks" check -r ""
completes "json text" list --output ""
completes "json" list --output = j
completes "json text" --output = ""
# After a global option and its value, the command.
completes "list" --timeout 5 li
completes "list" -c /x/y li

note "disk and snapshot names from a running server"
qemu-img create -q -f raw "$tmpdir/base.img" 4M
ctl=$tmpdir/ctl
start_server srv control="$ctl" \
    disk=vda base="$tmpdir/base.img" base-format=raw state="$tmpdir/st-a" \
    disk=vdb base="$tmpdir/base.img" base-format=raw state="$tmpdir/st-b"
"$cow" --control "$ctl" snapshot --disk vda before-upgrade >/dev/null
"$cow" --control "$ctl" snapshot --disk vda nightly >/dev/null
"$cow" --control "$ctl" snapshot --disk vdb other >/dev/null
completes "vda vdb" --control "$ctl" list --disk ""
completes "vdb" list --control "$ctl" --disk vdb
completes "vda vdb" -c "$ctl" status --disk = ""
completes "before-upgrade nightly" --control "$ctl" revert --disk vda ""
completes "nightly" --control "$ctl" delete --disk vda n
completes "other" --control = "$ctl" revert --disk = vdb ""
completes "active base before-upgrade nightly" --control "$ctl" commit --disk vda --top ""
COWCHAIN_CONTROL=$ctl completes "vda vdb" list --disk ""
# No server named on the line: no names, and no error.
completes "" list --disk ""
completes "" revert ""
stop_server srv
# Offline: snapshot names from the state directory.
completes "before-upgrade nightly" --state "$tmpdir/st-a" revert ""
note "ok"
