#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Randomised I/O checked against a model (a byte array), for cluster
# sizes 64K (the default), 512, 4K and 2M, each on a fresh overlay (64K
# and 2M with subclusters, the default there, and 64K once more without):
#  1. four connections writing different byte ranges of the same
#     unallocated cluster at the same moment, many times: no write may be
#     lost, and the bytes nobody wrote keep the base's data;
#  2. random writes, write-zeroes (some FAST_ZERO, NO_HOLE, FUA) and trims
#     (whole clusters read back as zero, partial ones are left alone) from
#     four connections at once;
# then qemu-img check, qemu-img compare against the model, the base
# unchanged, and after a restart the export still equals the model.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit qemu-img
requires_python_nbd

# Not a multiple of 2M: at cluster-size=2M the last cluster is short.
size=$(( 16 * 1024 * 1024 + 192 * 1024 ))
base=$tmpdir/base.raw
make_random_file "$base" "$size" 20240601
base_sum=$(sha256 "$base")
driver=("$PYTHON" "$testsdir/random-io.py")
# Less work in the (much slower) sanitizer build.
if [ "$COWCHAIN_SANITIZERS" = 1 ]; then
    batches=100 clusters=50
else
    batches=200 clusters=100
fi

# cluster size in bytes -> the key as given (empty = the default 64K)
declare -A cs_key=(
    [65536]=""
    [512]="cluster-size=512"
    [4096]="cluster-size=4K"
    [2097152]="cluster-size=2M"
)

check_overlay ()
{
    local ov=$1 cs=$2 ref=$3
    check_image "$ov"
    [ "$(img_info "$ov" cluster-size)" = "$cs" ] ||
        fail "$(basename "$ov"): cluster size $(img_info "$ov" cluster-size), expected $cs"
    qemu-img compare -q -f raw -F qcow2 "$ref" "$ov" ||
        fail "qemu-img compare: $(basename "$ov") differs from the model"
    [ "$(sha256 "$base")" = "$base_sum" ] || fail "the base was modified"
}

for variant in 65536 512 4096 2097152 65536:off; do
    cs=${variant%:off}
    sc_key=() tu=$cs
    if [ "$variant" != "$cs" ]; then
        sc_key=(subclusters=off)
    elif [ "$cs" -ge 16384 ]; then
        tu=$(( cs / 32 ))         # trim releases subclusters
    fi
    ov=$tmpdir/overlay-$cs.qcow2
    ref1=$tmpdir/same-$cs.ref
    ref=$tmpdir/random-$cs.ref
    start_server r$cs base="$base" overlay="$ov" ${cs_key[$cs]} ${sc_key[@]+"${sc_key[@]}"}
    uri=$(server_uri r$cs)
    if [ "$tu" != "$cs" ]; then
        [ "$(img_info "$ov" format-specific.data.extended-l2)" = True ] ||
            fail "cluster size $cs: the new overlay has no subclusters"
        "$abs_top_builddir/cowchain" info -U "$ov" | grep -q "extended l2: true" ||
            fail "cluster size $cs: cowchain info does not show extended L2 entries"
    else
        [ "$(img_info "$ov" format-specific.data.extended-l2 2>/dev/null)" != True ] ||
            fail "cluster size $cs ($variant): the overlay has subclusters"
    fi

    note "cluster size $cs: concurrent writers in one unallocated cluster"
    "${driver[@]}" same-cluster --uri "$uri" --base "$base" --ref "$ref1" \
        --seed "$(( cs + 7 ))" --cluster-size "$cs" --clusters "$clusters" ||
        fail "concurrent writes to one cluster at cluster size $cs"

    note "cluster size $cs: random I/O from four connections"
    "${driver[@]}" random --uri "$uri" --base "$ref1" --ref "$ref" \
        --seed "$cs" --cluster-size "$cs" --trim-unit "$tu" \
        --batches "$batches" ||
        fail "random I/O at cluster size $cs"
    stop_server r$cs
    check_overlay "$ov" "$cs" "$ref"

    note "cluster size $cs: after a restart the export still equals the model"
    no_leak_check=1 start_server r$cs base="$base" overlay="$ov"
    "${driver[@]}" verify --uri "$uri" --ref "$ref" ||
        fail "after restart, cluster size $cs"
    stop_server r$cs
    check_overlay "$ov" "$cs" "$ref"
    rm -f "$ov" "$ref" "$ref1"
done

note "pass"
