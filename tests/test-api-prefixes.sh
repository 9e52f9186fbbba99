#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Every global symbol the engine library (libcow) defines carries its
# module's prefix from the list below, and none lives in libnbd's nbd_ or
# nbdkit's nbdkit_ namespace (a libnbd that adds a function of the same
# name breaks the build, as nbd_is_uri did with libnbd 1.22).
#
# The objects come from make ($(libcow_la_OBJECTS), passed by
# TESTS_ENVIRONMENT), wherever their sources live.  Each violation is
# printed as: libcow: SYMBOL (defined in OBJECT): REASON.
#
# A new engine module adds its prefix here.
#
# Also: no call cycles between the engine's files (scripts/nm-cycles.py:
# file A -> B when A uses a symbol B defines), so each file can be read,
# tested and replaced from the bottom up.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires nm gcc python3

prefixes="cow qcow2 chain io manifest job control image text word utf8 layer"
prefixes+=" raw remote backing statedir events"

: "${COWCHAIN_LIBCOW_OBJECTS:?not set: run through make check, or set it to \$(libcow_la_OBJECTS)}"

# check_prefixes OBJ...: print every violation; true if there is none.
check_prefixes ()
{
    local sym obj p ok bad=0
    while read -r sym obj; do
        case $sym in
            nbd_*|nbdkit_*)
                echo "libcow: $sym (defined in ${obj#"$abs_top_builddir"/}): in the ${sym%%_*}_ namespace of lib${sym%%_*}; use the module's prefix"
                bad=1
                continue
                ;;
        esac
        ok=0
        for p in $prefixes; do
            case $sym in "$p"_*) ok=1; break ;; esac
        done
        if [ "$ok" = 0 ]; then
            echo "libcow: $sym (defined in ${obj#"$abs_top_builddir"/}): no module prefix (one of: $prefixes)"
            bad=1
        fi
    done < <(defined_symbols "$@")
    [ "$bad" = 0 ]
}

# shellcheck disable=SC2086  # a list of words
mapfile -t objs < <(objects_of $COWCHAIN_LIBCOW_OBJECTS)
[ "${#objs[@]}" -gt 0 ] || fail "no libcow objects"
n=$(defined_symbols "${objs[@]}" | wc -l)
[ "$n" -gt 0 ] || fail "libcow's objects define no global symbol: wrong object list?"

note "the check catches a planted violation"
cat > "$tmpdir/planted.c" <<'C'
int nbd_is_uri (const char *s);
int nbd_is_uri (const char *s) { return s != 0; }
int cow_fine (void);
int cow_fine (void) { return 0; }
int link_chain;
int link_chain = 1;
C
gcc -c -o "$tmpdir/planted.o" "$tmpdir/planted.c" || fail "cannot compile the planted object"
if check_prefixes "$tmpdir/planted.o" > "$tmpdir/planted.out"; then
    fail "planted violations not found"
fi
cat "$tmpdir/planted.out"
grep -q "^libcow: nbd_is_uri (defined in .*planted.o): in the nbd_ namespace" "$tmpdir/planted.out" &&
    grep -q "^libcow: link_chain (defined in .*planted.o): no module prefix" "$tmpdir/planted.out" &&
    ! grep -q cow_fine "$tmpdir/planted.out" &&
    [ "$(wc -l < "$tmpdir/planted.out")" = 2 ] ||
    fail "the planted violations were not reported as expected"

note "libcow: $n global symbols in ${#objs[@]} objects"
check_prefixes "${objs[@]}" || fail "libcow defines symbols outside its module prefixes (above)"

note "no call cycles between the engine's files"
cat > "$tmpdir/libcow_la-ping.c" <<'C'
int pong_fn (void);
int ping_fn (void);
int ping_fn (void) { return pong_fn (); }
C
cat > "$tmpdir/libcow_la-pong.c" <<'C'
int ping_fn (void);
int pong_fn (void);
int pong_fn (void) { return ping_fn (); }
C
gcc -c -o "$tmpdir/libcow_la-ping.o" "$tmpdir/libcow_la-ping.c" &&
    gcc -c -o "$tmpdir/libcow_la-pong.o" "$tmpdir/libcow_la-pong.c" ||
    fail "cannot compile the planted cycle"
if python3 "$abs_top_srcdir/scripts/nm-cycles.py" "$tmpdir/libcow_la-ping.o" \
       "$tmpdir/libcow_la-pong.o" > "$tmpdir/cycle.out"; then
    fail "a planted cycle was not found"
fi
grep -q "^cycles: \[\['p[io]ng', 'p[io]ng'\]\]" "$tmpdir/cycle.out" ||
    fail "the planted cycle was not reported: $(cat "$tmpdir/cycle.out")"
python3 "$abs_top_srcdir/scripts/nm-cycles.py" "${objs[@]}" > "$tmpdir/edges.out" || {
    cat "$tmpdir/edges.out"
    fail "the engine's files call each other in a cycle (above)"
}
note "$(wc -l < "$tmpdir/edges.out") call edges between files, $(tail -1 "$tmpdir/edges.out")"

