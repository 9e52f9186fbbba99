#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The front ends (the nbdkit plugin and the cowchain tool) use the engine
# only through its public API: every symbol of libcow that their objects
# reference is a cow_* name declared in include/cowchain.h.
#
# The objects come from make ($(nbdkit_cowchain_plugin_la_OBJECTS),
# $(cowchain_OBJECTS), $(libcow_la_OBJECTS), passed by TESTS_ENVIRONMENT),
# wherever their sources live.  Each violation is printed as:
#   FRONT-END: OBJECT uses SYMBOL (defined in LIBCOW-OBJECT): REASON
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires nm gcc

header=$abs_top_srcdir/include/cowchain.h
[ -f "$header" ] || fail "$header not found"
: "${COWCHAIN_LIBCOW_OBJECTS:?not set: run through make check}"
: "${COWCHAIN_PLUGIN_OBJECTS:?not set: run through make check}"
: "${COWCHAIN_TOOL_OBJECTS:?not set: run through make check}"

# The public names: every cow_* word of the header.
declare -A public=()
for w in $(grep -oE '\bcow_[A-Za-z0-9_]+' "$header" | sort -u); do
    public[$w]=1
done
[ "${#public[@]}" -gt 0 ] || fail "no cow_ name in $header"

# Where libcow defines each of its symbols.
declare -A libcow=()
# shellcheck disable=SC2086  # a list of words
mapfile -t lib_objs < <(objects_of $COWCHAIN_LIBCOW_OBJECTS)
while read -r sym obj; do
    libcow[$sym]=${obj#"$abs_top_builddir"/}
done < <(defined_symbols "${lib_objs[@]}")
[ "${#libcow[@]}" -gt 0 ] || fail "libcow's objects define no global symbol: wrong object list?"

# check_front_end NAME OBJ...: print every violation; true if none.
check_front_end ()
{
    local name=$1 sym obj bad=0 why
    shift
    while read -r sym obj; do
        [ -n "${libcow[$sym]:-}" ] || continue      # not the engine's
        if [ -n "${public[$sym]:-}" ]; then
            continue
        fi
        case $sym in
            cow_*) why="not declared in include/cowchain.h" ;;
            *) why="private to the engine (not a cow_ name of include/cowchain.h)" ;;
        esac
        echo "$name: ${obj#"$abs_top_builddir"/} uses $sym (defined in ${libcow[$sym]}): $why"
        bad=1
    done < <(undefined_symbols "$@")
    [ "$bad" = 0 ]
}

note "the check catches a planted violation"
# A private engine symbol (one that is not public) and a public one.
private=
for sym in "${!libcow[@]}"; do
    [ -z "${public[$sym]:-}" ] && { private=$sym; break; }
done
pub=
for sym in "${!libcow[@]}"; do
    [ -n "${public[$sym]:-}" ] && { pub=$sym; break; }
done
[ -n "$private" ] && [ -n "$pub" ] || fail "libcow has no private or no public symbol"
cat > "$tmpdir/planted.c" <<C
extern char $private[], $pub[];
char *planted (int i);
char *planted (int i) { return i ? $private : $pub; }
C
gcc -c -o "$tmpdir/planted.o" "$tmpdir/planted.c" || fail "cannot compile the planted object"
if check_front_end planted "$tmpdir/planted.o" > "$tmpdir/planted.out"; then
    fail "planted violation ($private) not found"
fi
cat "$tmpdir/planted.out"
grep -q "^planted: .*planted.o uses $private (defined in ${libcow[$private]}): " "$tmpdir/planted.out" &&
    [ "$(wc -l < "$tmpdir/planted.out")" = 1 ] ||
    fail "the planted violation was not reported as expected"

rc=0
for fe in plugin tool; do
    case $fe in
        plugin) list=$COWCHAIN_PLUGIN_OBJECTS ;;
        tool) list=$COWCHAIN_TOOL_OBJECTS ;;
    esac
    # shellcheck disable=SC2086  # a list of words
    mapfile -t objs < <(objects_of $list)
    [ "${#objs[@]}" -gt 0 ] || fail "no objects for the $fe"
    note "$fe: ${#objs[@]} objects"
    check_front_end "$fe" "${objs[@]}" || rc=1
done
[ "$rc" = 0 ] || fail "a front end reaches past include/cowchain.h (above)"
