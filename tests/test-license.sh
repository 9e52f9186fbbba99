#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Every source file of the project says its license in an SPDX line near
# its top, and that license is the one LICENSE holds (BSD-3-Clause).
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

license=$abs_top_srcdir/LICENSE
[ -f "$license" ] || fail "LICENSE is missing"
grep -q 'Redistribution and use in source and binary forms' "$license" ||
    fail "LICENSE does not hold the BSD-3-Clause text"

want='SPDX-License-Identifier: BSD-3-Clause'
checked=0 bad=0
cd "$abs_top_srcdir" || fail "cannot enter $abs_top_srcdir"
while IFS= read -r -d '' f; do
    checked=$((checked + 1))
    if ! head -n 5 "$f" | grep -qF "$want"; then
        echo "$f: no '$want' line in its first 5 lines" >&2
        bad=$((bad + 1))
    fi
done < <(find cow cli plugin include tests scripts contrib .ci configure.ac Makefile.am \
              -path tests/fuzz-crashes -prune -o \
              -type f \( -name '*.c' -o -name '*.h' -o -name '*.sh' -o -name '*.py' \
                         -o -name '*.am' -o -name '*.ac' -o -name run \
                         -o -path 'contrib/bash-completion/*' \) -print0 2>/dev/null)
[ "$checked" -gt 50 ] || fail "only $checked source files found under $abs_top_srcdir"
[ "$bad" = 0 ] || fail "$bad of $checked source files lack the SPDX line"
note "$checked source files carry '$want'"
