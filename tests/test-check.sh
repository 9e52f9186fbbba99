#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# cowchain check against qemu-img check.  Clean images made by qemu-img
# and written by qemu-io (every compat level, cluster size and refcount
# width; compressed, zero and discarded clusters; a grown refcount table)
# pass both.  Then damage is injected into copies with a small poker: the
# same leaks (exit 3), the same errors (exit 2), with the same counts, on
# every image; `-r leaks` repairs leaks so that qemu-img check passes
# after, refuses to touch an image with other errors, and never changes
# guest data.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires qemu-img qemu-io timeout sha256sum
[ -x "$PYTHON" ] || fail "$PYTHON not found"

requires_cowchain

cd "$tmpdir"

# poke CMD FILE ARGS...: the test's short names for single qcow2 metadata
# entries, read and written by qcow2_patch.
poke ()
{
    local cmd=$1 file=$2
    shift 2
    case $cmd in
        cs) qcow2_patch "$file" cluster_size ;;
        getref) qcow2_patch "$file" "refcount[$1]" ;;
        setref) qcow2_patch "$file" "refcount[$1]=$2" ;;
        l1) qcow2_patch "$file" "l1[$1]" ;;
        setl1) qcow2_patch "$file" "l1[$1]=$2" ;;
        l2) qcow2_patch "$file" "l2[$1]" ;;
        setl2) qcow2_patch "$file" "l2[$1]=$2" ;;
        setreft) qcow2_patch "$file" "reftable[$1]=$2" ;;
        # Append $1 clusters, each with refcount 1 (leaks); print the first.
        grow) qcow2_patch "$file" "grow=$1" ;;
        *) fail "poke: unknown command $cmd" ;;
    esac
}

# Host cluster of an L1 entry's L2 table / of guest cluster GC's data.
l2_cluster () { echo $(( ($(poke l1 "$1" "$2") & 0x00fffffffffffe00) / $(poke cs "$1") )); }
data_cluster () { echo $(( ($(poke l2 "$1" "$2") & 0x00fffffffffffe00) / $(poke cs "$1") )); }

# same_verdict IMAGE RC: both tools exit RC on IMAGE and report the same
# counts, in JSON and in the summary lines of the human output.
n_checked=0
same_verdict ()
{
    local img=$1 want=$2 qrc=0
    n_checked=$(( n_checked + 1 ))
    qemu-img check --output=json "$img" > qemu.json 2>qemu.err || qrc=$?
    run_cowchain check --output=json "$img"
    if [ "$qrc" -ne "$want" ] || [ "$rc" -ne "$want" ]; then
        cat qemu.err err >&2
        fail "check $img: qemu-img exits $qrc, cowchain $rc, expected $want"
    fi
    [ "$want" -eq 1 ] && return 0
    cp out ours.json
    "$PYTHON" - qemu.json ours.json "$img" <<'EOF' || fail "check $img: counts differ"
import json, sys
q = json.load(open(sys.argv[1])); o = json.load(open(sys.argv[2]))
for k in ["corruptions", "leaks", "check-errors", "total-clusters",
          "allocated-clusters", "fragmented-clusters", "compressed-clusters",
          "image-end-offset", "corruptions-fixed", "leaks-fixed"]:
    if q.get(k, 0) != o.get(k, 0):
        sys.exit("%s: %s: cowchain %r, qemu-img %r" % (sys.argv[3], k,
                                                      o.get(k), q.get(k)))
EOF
    qemu-img check "$img" > qemu.txt 2>/dev/null || :
    run_cowchain check "$img"
    [ "$rc" -eq "$want" ] || fail "check $img (human): exit status $rc"
    local summary='^(No errors were found|[0-9]+ (errors were|leaked clusters were) found|Data may|This means|[0-9]+/[0-9]+ = |Image end offset)'
    diff <(grep -E "$summary" qemu.txt) <(grep -E "$summary" out) >&2 ||
        fail "check $img: the summary differs from qemu-img's"
}

# damaged NAME FROM: a fresh copy of FROM to damage.
damaged () { cp "$2" "$1"; }

#----------------------------------------------------------------------
note "command line"
run_cowchain check --help
[ "$rc" -eq 0 ] && grep -q 'Exit status' out || fail "check --help"
grep -q -- '-r, --repair=leaks' out || fail "check --help does not show -r"
qemu-img create -q -f qcow2 empty.qcow2 64M
for args in "" "--bogus empty.qcow2" "-r all empty.qcow2" "-r" \
            "--output=xml empty.qcow2" "empty.qcow2 extra"; do
    # shellcheck disable=SC2086
    run_cowchain check $args
    [ "$rc" -eq 1 ] && grep -q '^cowchain: ' err ||
        fail "check $args: exit status $rc, stderr: $(cat err)"
done
qemu-img create -q -f raw plain.raw 1M
run_cowchain check plain.raw
[ "$rc" -eq 1 ] && grep -q '^cowchain: plain.raw: .*qcow2' err || fail "check of a raw file"
run_cowchain check nonexistent.qcow2
[ "$rc" -eq 1 ] && grep -q '^cowchain: nonexistent' err || fail "check of a missing file"
qemu-img create -q -f qcow2 snap.qcow2 1M
qemu-img snapshot -c s1 snap.qcow2
run_cowchain check snap.qcow2
[ "$rc" -eq 1 ] && grep -q 'internal snapshot' err || fail "internal snapshots not refused"

#----------------------------------------------------------------------
note "clean images"
make_random_file random.raw $(( 3 * 1024 * 1024 )) 11
qemu-img create -q -f raw mixed.raw 8M
qemu-io -f raw -c 'write -P 5 0 1M' mixed.raw >/dev/null
dd if=random.raw of=mixed.raw bs=1M seek=4 conv=notrunc status=none

same_verdict empty.qcow2 0
qemu-img create -q -f qcow2 v3.qcow2 64M
qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 40M 64k' -c 'write -z 8M 128k' \
        -c 'write -P 3 16M 256k' -c 'discard 16M 64k' \
        -c 'write -z -u 16M 64k' -c 'write -P 4 70k 3k' v3.qcow2 >/dev/null
same_verdict v3.qcow2 0
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 v2.qcow2 100M
qemu-io -c 'write -P 3 0 300k' -c 'write -P 4 50M 5k' -c 'write -z 1M 64k' v2.qcow2 >/dev/null
same_verdict v2.qcow2 0
qemu-img create -q -f qcow2 -o cluster_size=512 c512.qcow2 64M
qemu-io -c 'write -P 1 0 1M' -c 'write -P 1 32M 1M' -c 'write -P 2 100k 300k' \
        c512.qcow2 >/dev/null
same_verdict c512.qcow2 0
# 12 MiB in 512-byte clusters outgrows the first refcount table.
qemu-img create -q -f qcow2 -o cluster_size=512 grown.qcow2 16M
qemu-io -c 'write -P 7 0 12M' grown.qcow2 >/dev/null
same_verdict grown.qcow2 0
qemu-img create -q -f qcow2 -o cluster_size=2M c2m.qcow2 1G
qemu-io -c 'write -P 1 0 3M' -c 'write -P 2 700M 4k' c2m.qcow2 >/dev/null
same_verdict c2m.qcow2 0
for bits in 1 2 4 8 32 64; do
    qemu-img create -q -f qcow2 -o refcount_bits=$bits,cluster_size=4096 rb$bits.qcow2 16M
    qemu-io -c 'write -P 1 0 100k' -c 'write -P 3 8M 20k' -c 'discard 40k 8k' \
            rb$bits.qcow2 >/dev/null
    same_verdict rb$bits.qcow2 0
done
qemu-img convert -c -O qcow2 -o cluster_size=4096 mixed.raw comp.qcow2
same_verdict comp.qcow2 0
cp comp.qcow2 comp2.qcow2
qemu-io -c 'write -z 0 64k' -c 'write -P 7 2M 8k' -c 'discard 4M 64k' comp2.qcow2 >/dev/null
same_verdict comp2.qcow2 0
qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 32M
qemu-io -c 'write -P 1 0 2M' lazy.qcow2 >/dev/null
same_verdict lazy.qcow2 0
qemu-img create -q -f qcow2 -b v3.qcow2 -F qcow2 top.qcow2
qemu-io -c 'write -P 9 1M 2M' top.qcow2 >/dev/null
same_verdict top.qcow2 0
qemu-img create -q -f qcow2 huge.qcow2 2T
qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 1T 64k' -c 'write -P 3 2047G 1M' huge.qcow2 >/dev/null
same_verdict huge.qcow2 0

#----------------------------------------------------------------------
note "injected leaks: exit 3, the same counts"
damaged leak1.qcow2 v3.qcow2
poke grow leak1.qcow2 1 >/dev/null
same_verdict leak1.qcow2 3
damaged leak3.qcow2 v2.qcow2
poke grow leak3.qcow2 3 >/dev/null
same_verdict leak3.qcow2 3
for bits in 1 2 4 8 32 64; do
    damaged leak-rb$bits.qcow2 rb$bits.qcow2
    poke grow leak-rb$bits.qcow2 2 >/dev/null
    same_verdict leak-rb$bits.qcow2 3
done
# More leaks than the check keeps messages for.
damaged leak-many.qcow2 v2.qcow2
poke grow leak-many.qcow2 300 >/dev/null
same_verdict leak-many.qcow2 3
run_cowchain check leak-many.qcow2
grep -q 'more findings not shown' out || fail "the message limit is not reported"
# A cluster freed by a discard, with its refcount raised again.
qemu-img create -q -f qcow2 -o cluster_size=4096 holes.qcow2 16M
qemu-io -c 'write -P 1 0 100k' -c 'discard 40k 8k' holes.qcow2 >/dev/null
same_verdict holes.qcow2 0
freed=$(( $(data_cluster holes.qcow2 9) + 1 ))
[ "$(poke getref holes.qcow2 $freed)" -eq 0 ] ||
    fail "host cluster $freed was not freed by the discard"
damaged leak-hole.qcow2 holes.qcow2
poke setref leak-hole.qcow2 $freed 1
same_verdict leak-hole.qcow2 3

#----------------------------------------------------------------------
note "injected corruption: exit 2, the same counts"
l2c=$(l2_cluster v3.qcow2 0)
d0=$(data_cluster v3.qcow2 0)
d1=$(data_cluster v3.qcow2 1)
cs=$(poke cs v3.qcow2)

damaged zero-l2.qcow2 v3.qcow2            # refcount of a used L2 table: 0
poke setref zero-l2.qcow2 "$l2c" 0
same_verdict zero-l2.qcow2 2
damaged zero-data.qcow2 v3.qcow2          # refcount of a used data cluster: 0
poke setref zero-data.qcow2 "$d0" 0
same_verdict zero-data.qcow2 2
damaged shared.qcow2 v3.qcow2             # two L2 entries, one cluster
poke setl2 shared.qcow2 1 "$(poke l2 v3.qcow2 0)"
same_verdict shared.qcow2 2
damaged refcount2.qcow2 v3.qcow2          # refcount 2, one reference
poke setref refcount2.qcow2 "$d0" 2
same_verdict refcount2.qcow2 2
damaged l2-is-data.qcow2 v3.qcow2         # an L2 table used as data
poke setl2 l2-is-data.qcow2 1 $(( (1 << 63) | l2c * cs ))
same_verdict l2-is-data.qcow2 2
damaged past-eof.qcow2 v3.qcow2           # data cluster past the end
poke setl2 past-eof.qcow2 0 $(( (1 << 63) | (1 << 40) ))
same_verdict past-eof.qcow2 2
damaged unaligned.qcow2 v3.qcow2          # data cluster not aligned
poke setl2 unaligned.qcow2 0 $(( (1 << 63) | d0 * cs + 512 ))
same_verdict unaligned.qcow2 2
damaged l2-reserved.qcow2 v3.qcow2        # reserved bits in an L2 entry
poke setl2 l2-reserved.qcow2 0 $(( (1 << 63) | (1 << 56) | d0 * cs ))
same_verdict l2-reserved.qcow2 2
damaged l2-reserved-free.qcow2 v3.qcow2   # ... of an unallocated cluster
poke setl2 l2-reserved-free.qcow2 5 2
same_verdict l2-reserved-free.qcow2 2
damaged l1-reserved.qcow2 v3.qcow2        # reserved bits in an L1 entry
poke setl1 l1-reserved.qcow2 0 $(( (1 << 63) | 2 | l2c * cs ))
same_verdict l1-reserved.qcow2 2
damaged l1-past-eof.qcow2 v3.qcow2        # L2 table past the end
poke setl1 l1-past-eof.qcow2 0 $(( (1 << 63) | (1 << 40) ))
same_verdict l1-past-eof.qcow2 2
damaged l1-unaligned.qcow2 v3.qcow2       # L2 table not aligned
poke setl1 l1-unaligned.qcow2 0 $(( (1 << 63) | l2c * cs + 512 ))
same_verdict l1-unaligned.qcow2 2
damaged no-copied.qcow2 v3.qcow2          # COPIED flag missing
poke setl2 no-copied.qcow2 0 $(( d0 * cs ))
same_verdict no-copied.qcow2 2
damaged rb-is-l2.qcow2 v3.qcow2           # refcount block = an L2 table
poke setreft rb-is-l2.qcow2 0 $(( l2c * cs ))
same_verdict rb-is-l2.qcow2 2
damaged rb-past-eof.qcow2 v3.qcow2        # refcount block past the end
poke setreft rb-past-eof.qcow2 0 $(( 1 << 40 ))
same_verdict rb-past-eof.qcow2 2
damaged rb-reserved.qcow2 v3.qcow2        # reserved bits, refcount table
poke setreft rb-reserved.qcow2 0 $(( 2 * cs + 1 ))
same_verdict rb-reserved.qcow2 2
damaged rb-twice.qcow2 v3.qcow2           # one block in two table entries
poke setreft rb-twice.qcow2 1 $(( 2 * cs ))
same_verdict rb-twice.qcow2 2
damaged comp-copied.qcow2 comp.qcow2      # COPIED on a compressed cluster
poke setl2 comp-copied.qcow2 0 $(( $(poke l2 comp.qcow2 0) | (1 << 63) ))
same_verdict comp-copied.qcow2 2
damaged comp-shared.qcow2 comp.qcow2      # two descriptors, one range
poke setl2 comp-shared.qcow2 300 "$(poke l2 comp.qcow2 0)"
same_verdict comp-shared.qcow2 2
damaged rb1-over.qcow2 rb1.qcow2          # 2 references, 1-bit refcounts
poke setl2 rb1-over.qcow2 1 "$(poke l2 rb1.qcow2 0)"
same_verdict rb1-over.qcow2 2
damaged c512-bad.qcow2 c512.qcow2         # damage deep in a big table
poke setl2 c512-bad.qcow2 65600 "$(poke l2 c512.qcow2 100)"
same_verdict c512-bad.qcow2 2

# Where the tools differ in counts (see cow/qcow2-check.c), the verdict
# must still agree.
verdict_only ()
{
    local img=$1 want=$2 qrc=0
    qemu-img check "$img" >/dev/null 2>&1 || qrc=$?
    run_cowchain check "$img"
    [ "$qrc" -eq "$want" ] && [ "$rc" -eq "$want" ] ||
        fail "check $img: qemu-img exits $qrc, cowchain $rc, expected $want"
}
qemu-img create -q -f qcow2 two-l1.qcow2 2G
qemu-io -c 'write -P 1 0 64k' two-l1.qcow2 >/dev/null
poke setl1 two-l1.qcow2 3 "$(poke l1 two-l1.qcow2 0)"
verdict_only two-l1.qcow2 2
damaged garbage-l2.qcow2 v3.qcow2         # an L2 table full of garbage
qcow2_patch garbage-l2.qcow2 "@$(( l2c * cs ))=from:random.raw:$cs"
verdict_only garbage-l2.qcow2 2

# Leak repair is refused on every damaged image, which stays unchanged.
for img in zero-l2 shared l2-is-data past-eof l1-reserved rb-is-l2 garbage-l2; do
    before=$(sha256 $img.qcow2)
    run_cowchain check -r leaks $img.qcow2
    [ "$rc" -eq 2 ] || fail "check -r leaks $img.qcow2: exit status $rc, expected 2"
    [ "$(sha256 $img.qcow2)" = "$before" ] || fail "check -r leaks changed $img.qcow2"
done
grep -q 'leaked clusters were not repaired' out || fail "the refused repair is not explained"
run_cowchain check -r leaks --output=json shared.qcow2
"$PYTHON" -c '
import json, sys
d = json.load(open(sys.argv[1]))
assert d["repair-refused"] is True and d["leaks"] == 1 and "leaks-fixed" not in d, d
' out || fail "check -r leaks --output=json of a damaged image: $(cat out)"

#----------------------------------------------------------------------
note "-r leaks"
for img in leak1 leak3 leak-rb1 leak-rb2 leak-rb4 leak-rb8 leak-rb32 \
           leak-rb64 leak-many leak-hole refcount2; do
    cp $img.qcow2 $img-fixed.qcow2
    run_cowchain check -r leaks --output=json $img-fixed.qcow2
    [ "$rc" -eq 0 ] || fail "check -r leaks $img: exit status $rc: $(cat err)"
    "$PYTHON" -c '
import json, sys
d = json.load(open(sys.argv[1]))
assert d.get("leaks-fixed", 0) > 0 and d.get("leaks", 0) == 0, d
' out || fail "check -r leaks $img: $(cat out)"
    qemu-img check $img-fixed.qcow2 >/dev/null 2>&1 ||
        fail "qemu-img check fails after cowchain check -r leaks $img"
    same_verdict $img-fixed.qcow2 0
    # The guest sees the same disk.
    qemu-img compare -q $img.qcow2 $img-fixed.qcow2 ||
        fail "check -r leaks $img changed guest data"
done
# The human output of a repair, as qemu-img's.
cp leak3.qcow2 leak3-h.qcow2
run_cowchain check -r leaks leak3-h.qcow2
[ "$rc" -eq 0 ] || fail "check -r leaks (human): exit status $rc"
grep -q '^    3 leaked clusters$' out && grep -q '^No errors were found' out ||
    fail "check -r leaks (human): $(cat out)"
# Nothing to repair: nothing written.
before=$(sha256 v3.qcow2)
run_cowchain check -r leaks v3.qcow2
[ "$rc" -eq 0 ] && [ "$(sha256 v3.qcow2)" = "$before" ] || fail "check -r leaks on a clean image"
# An image marked corrupt is not repaired.
cp leak1.qcow2 marked.qcow2
qcow2_patch marked.qcow2 "incompatible_features|=2"     # corrupt
before=$(sha256 marked.qcow2)
run_cowchain check -r leaks marked.qcow2
[ "$rc" -eq 1 ] && grep -q 'corrupt' err || fail "repair of an image marked corrupt: $rc"
[ "$(sha256 marked.qcow2)" = "$before" ] || fail "an image marked corrupt was changed"
same_verdict marked.qcow2 3

note "ok ($n_checked images compared with qemu-img check)"
