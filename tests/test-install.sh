#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# make install and uninstall into a DESTDIR: exactly the plugin (no
# libtool archive) in nbdkit's plugin directory, the tool and the three
# manual pages; the pages pass podchecker and render without a warning
# from man/groff; the installed plugin loads in nbdkit and serves a disk;
# the installed tool runs; every key the plugin accepts is documented in
# its manual page, and the page documents no key the plugin lacks.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit make podchecker man groff qemu-img qemu-io
requires_python_nbd

# From make check (Makefile.am's TESTS_ENVIRONMENT): where configure said
# things go, and the version.
for v in COWCHAIN_PLUGINDIR COWCHAIN_BINDIR COWCHAIN_MANDIR COWCHAIN_VERSION; do
    [ -n "${!v:-}" ] || fail "$v is not set (run through make check)"
done
[ -f "$abs_top_builddir/Makefile" ] ||
    fail "no Makefile in the build directory $abs_top_builddir"

dest=$tmpdir/dest
plugin=$dest$COWCHAIN_PLUGINDIR/nbdkit-cowchain-plugin.so
tool=$dest$COWCHAIN_BINDIR/cowchain
completion=$dest$COWCHAIN_COMPLETIONDIR/cowchain
pages=(
    "$dest$COWCHAIN_MANDIR/man1/cowchain.1"
    "$dest$COWCHAIN_MANDIR/man1/nbdkit-cowchain-plugin.1"
    "$dest$COWCHAIN_MANDIR/man5/cowchain-control.5"
)

# One-shot nbdkit runs (--dump-plugin, --help) of a sanitizer build need
# the ASan runtime preloaded, and have nothing to leak-check.
nbdkit_once ()
{
    env ${server_env[@]+"${server_env[@]}"} \
        ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0" \
        nbdkit "$@"
}

# The make that runs this test shares no jobserver with it.
run_make ()
{
    MAKEFLAGS= MFLAGS= make -C "$abs_top_builddir" "$@"
}

note "make install DESTDIR=..."
run_make install DESTDIR="$dest" > "$tmpdir/install.log" 2>&1 ||
    { cat "$tmpdir/install.log" >&2; fail "make install failed"; }

(cd "$dest" && find . \( -type f -o -type l \) -printf '/%P\n' | sort) \
    > "$tmpdir/installed"
printf '%s\n' "${plugin#"$dest"}" "${tool#"$dest"}" \
    "${completion#"$dest"}" "${pages[@]#"$dest"}" | sort > "$tmpdir/expected"
if ! diff -u "$tmpdir/expected" "$tmpdir/installed" >&2; then
    fail "installed files differ from the expected list (- expected, + installed)"
fi
[ ! -e "$dest$COWCHAIN_PLUGINDIR/nbdkit-cowchain-plugin.la" ] ||
    fail "the libtool archive was installed"
[ -x "$tool" ] || fail "$tool is not executable"

note "podchecker: every docs/*.pod"
npod=0
for pod in "$abs_top_srcdir"/docs/*.pod; do
    npod=$((npod + 1))
    podchecker "$pod" > "$tmpdir/pod.out" 2>&1 ||
        { cat "$tmpdir/pod.out" >&2; fail "podchecker: $pod has errors"; }
    if grep -v -x "$pod pod syntax OK." "$tmpdir/pod.out" >&2; then
        fail "podchecker: $pod has warnings (above)"
    fi
done
[ "$npod" -ge 3 ] || fail "only $npod .pod files in docs/"

note "man -l: the installed pages render without warnings"
for page in "${pages[@]}"; do
    name=$(basename "$page")
    title=$(echo "${name%.*}" | tr a-z A-Z)"(${name##*.})"
    # MANROFFSEQ= : no preprocessors from the page's first line.
    MANROFFSEQ= MANWIDTH=80 man --warnings -l "$page" > "$tmpdir/page.txt" 2> "$tmpdir/page.err" ||
        { cat "$tmpdir/page.err" >&2; fail "man -l $name failed"; }
    if [ -s "$tmpdir/page.err" ]; then
        cat "$tmpdir/page.err" >&2
        fail "man -l $name: warnings (above)"
    fi
    grep -q -F "$title" "$tmpdir/page.txt" ||
        fail "man -l $name: no $title in the rendered page"
    grep -q '^NAME' "$tmpdir/page.txt" ||
        fail "man -l $name: no NAME section"
    grep -q -F "cowchain $COWCHAIN_VERSION" "$tmpdir/page.txt" ||
        fail "man -l $name: the footer does not name cowchain $COWCHAIN_VERSION"
done

note "nbdkit --dump-plugin on the installed plugin"
nbdkit_once --dump-plugin "$plugin" > "$tmpdir/dump" 2> "$tmpdir/dump.err" ||
    { cat "$tmpdir/dump.err" >&2; fail "nbdkit --dump-plugin failed"; }
grep -q -x -F "path=$plugin" "$tmpdir/dump" || fail "--dump-plugin: wrong path"
grep -q -x "name=cowchain" "$tmpdir/dump" || fail "--dump-plugin: no name=cowchain"
grep -q -x "version=$COWCHAIN_VERSION" "$tmpdir/dump" ||
    fail "--dump-plugin: version is not $COWCHAIN_VERSION"
grep -q -x "thread_model=parallel" "$tmpdir/dump" ||
    fail "--dump-plugin: thread model is not parallel"

note "the installed cowchain --version"
"$tool" --version > "$tmpdir/version" 2>&1 ||
    { cat "$tmpdir/version" >&2; fail "cowchain --version failed"; }
[ "$(cat "$tmpdir/version")" = "cowchain $COWCHAIN_VERSION" ] ||
    fail "cowchain --version printed '$(cat "$tmpdir/version")'"

note "the installed plugin serves a disk: write and read one block"
base=$tmpdir/base.raw
make_random_file "$base" $((4 * 1024 * 1024)) 13
base_sum=$(sha256 "$base")
COWCHAIN_PLUGIN=$plugin start_server inst \
    base="$base" overlay="$tmpdir/layer.qcow2"
grep -q -F "$plugin" "/proc/$(server_pid inst)/maps" ||
    fail "the server did not load the installed plugin"
BASE=$base nbdsh -u "$(server_uri inst)" -c - <<'EOF'
import os
base = open(os.environ["BASE"], "rb").read()
block = bytes(range(256)) * 16
assert h.pread(4096, 65536) == base[65536:65536 + 4096], "read != base"
h.pwrite(block, 65536)
h.flush()
assert h.pread(4096, 65536) == block, "read back != written"
assert h.pread(4096, 0) == base[:4096], "an unwritten block changed"
EOF
stop_server inst
[ "$(sha256 "$base")" = "$base_sum" ] || fail "the base was written"
check_image "$tmpdir/layer.qcow2"
# Offline, qemu-io sees the block in the layer (bytes 0, 1 at 65536).
qemu-io -r -f qcow2 -c "read -P 0 65536 1" -c "read -P 1 65537 1" \
    -c "read -P 255 $((65536 + 4095)) 1" \
    "$tmpdir/layer.qcow2" > "$tmpdir/qemu-io.out" 2>&1 ||
    { cat "$tmpdir/qemu-io.out" >&2; fail "qemu-io failed"; }
if grep -q -i 'verification failed\|error' "$tmpdir/qemu-io.out"; then
    cat "$tmpdir/qemu-io.out" >&2
    fail "qemu-io: the layer does not hold the written block"
fi

note "every key of the plugin is an =item of its page, and back"
# The keys the plugin takes, twice: from its --help (config_help) and from
# the strcmp()s of its config code; both must agree.
nbdkit_once "$plugin" --help > "$tmpdir/help" 2> "$tmpdir/help.err" ||
    { cat "$tmpdir/help.err" >&2; fail "nbdkit PLUGIN --help failed"; }
sed -n '/^plugin: cowchain/,$p' "$tmpdir/help" |
    sed -n 's/^\([a-z][a-z0-9-]*\)=.*/\1/p' | sort -u > "$tmpdir/keys.help"
grep -o 'strcmp (key, "[a-z0-9-]*")' "$abs_top_srcdir/plugin/cowchain-plugin.c" |
    sed 's/.*"\(.*\)")/\1/' | sort -u > "$tmpdir/keys.src"
[ "$(wc -l < "$tmpdir/keys.help")" -ge 10 ] ||
    fail "found only $(wc -l < "$tmpdir/keys.help") keys in the plugin's --help"
diff -u "$tmpdir/keys.src" "$tmpdir/keys.help" >&2 ||
    fail "the keys of the config code (-) and of config_help (+) differ"
sed -n 's/^=item B<\([a-z][a-z0-9-]*\)=.*/\1/p' \
    "$abs_top_srcdir/docs/nbdkit-cowchain-plugin.pod" | sort -u > "$tmpdir/keys.pod"
while read -r key; do
    grep -q -x -F "$key" "$tmpdir/keys.pod" ||
        fail "plugin key '$key=' is not an =item of docs/nbdkit-cowchain-plugin.pod"
done < "$tmpdir/keys.help"
while read -r key; do
    grep -q -x -F "$key" "$tmpdir/keys.help" ||
        fail "docs/nbdkit-cowchain-plugin.pod documents '$key=', which the plugin does not accept"
done < "$tmpdir/keys.pod"

note "make uninstall DESTDIR=... removes everything"
run_make uninstall DESTDIR="$dest" > "$tmpdir/uninstall.log" 2>&1 ||
    { cat "$tmpdir/uninstall.log" >&2; fail "make uninstall failed"; }
left=$(cd "$dest" && find . \( -type f -o -type l \) -printf '/%P\n')
[ -z "$left" ] || fail "make uninstall left: $left"

note "ok"
