#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# fio's nbd engine, queue depth 16, several connections at once, with
# crc32c verification, over a fresh overlay (so that most writes
# copy-on-write from the base):
#  - four writer jobs (one connection each, each on its own 16 MiB) doing
#    random writes of 512 B..128 KiB at 512-byte alignment (so across
#    and inside clusters), verifying what they wrote while they write
#    (verify_backlog: reads and writes interleaved) and again at the end;
#  - at the same time two reader jobs doing random reads all over the
#    disk (including the ranges being copied-on-write);
# at 64K and 512-byte clusters.  Then a write pass, a restart, and
# fio --verify_only: what fio wrote survived.  qemu-img check after each.
#
# Note: fio's verification is only reliable when no block is written
# twice with different sizes, so the writers are size-based (each block
# written once, fio's random map), not time-based, and rw=randwrite with
# verify_backlog rather than rw=randrw (which, with verify and wrapping
# around, reports false errors even against nbdkit's file plugin).
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit fio qemu-img

size=$(( 64 * 1024 * 1024 ))
base=$tmpdir/base.raw
make_random_file "$base" "$size" 13
base_sum=$(sha256 "$base")

# Each writer's share of the disk (less in the slower sanitizer build).
if [ "$COWCHAIN_SANITIZERS" = 1 ]; then job_size=8M; else job_size=16M; fi

# run_fio LABEL URI WRITER-OPTIONS...: the writers' job, with the same
# job name every time (--verify_only must replay the write pass exactly).
run_fio ()
{
    local label=$1 uri=$2; shift 2
    # Global options first; fio's engine option --uri must follow --ioengine.
    # In $tmpdir: fio leaves its verify state files in the current directory.
    if ! (cd "$tmpdir" && fio --output="$tmpdir/$label.fio" \
         --ioengine=nbd --uri="$uri" --iodepth=16 --group_reporting \
         --name=writers --numjobs=4 --size=$job_size --offset_increment=16M \
         --bsrange=512-128k --blockalign=512 --rw=randwrite \
         --verify=crc32c --verify_fatal=1 --exitall_on_error=1 \
         "$@" 2> "$tmpdir/$label.err")
    then
        cat "$tmpdir/$label.err" "$tmpdir/$label.fio" >&2
        fail "fio $label"
    fi
    if grep -q -E 'verify:|bad magic|bad header' "$tmpdir/$label.err" "$tmpdir/$label.fio"; then
        cat "$tmpdir/$label.err" "$tmpdir/$label.fio" >&2
        fail "fio $label: verification errors"
    fi
    grep -E '^ *(READ|WRITE):' "$tmpdir/$label.fio" || :
}
readers=(--name=readers --numjobs=2 --rw=randread --size=64M --offset=0
         --offset_increment=0 --bsrange=4k-64k --blockalign=512 --verify=0
         --io_size=$job_size)

for cs in 64K 512; do
    ov=$tmpdir/rw-$cs.qcow2
    note "concurrent writers (with verification) and readers, cluster size $cs"
    start_server fio base="$base" overlay="$ov" cluster-size=$cs
    run_fio rw-$cs "$(server_uri fio)" --randseed=1 --verify_backlog=64 \
        "${readers[@]}"
    stop_server fio
    check_image "$ov"
    rm -f "$ov"
done

note "write pass, restart, verify only"
ov=$tmpdir/verify.qcow2
start_server fio base="$base" overlay="$ov"
run_fio write "$(server_uri fio)" --randseed=2 --do_verify=0
stop_server fio
check_image "$ov"
start_server fio base="$base" overlay="$ov"
run_fio verify "$(server_uri fio)" --randseed=2 --verify_only
stop_server fio
check_image "$ov"
[ "$(sha256 "$base")" = "$base_sum" ] || fail "the base was modified"
note "pass"
