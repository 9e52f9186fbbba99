#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Bases built by QEMU's own tools, served by cowchain: qcow2 v2 and v3 at
# cluster sizes 512 B, 4 KiB, 64 KiB and 2 MiB, compressed or not, with
# zero clusters, in chains of depth 1, 3 and 8 over a raw or a qcow2
# bottom.  What cowchain serves must be byte-identical to
# `qemu-img convert -O raw` of the same chain, before and after writes
# through cowchain (the writes applied to the reference with qemu-io).
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img qemu-io nbdcopy
requires_python_nbd

size=$((8 << 20))
make_random_file "$tmpdir/seed.raw" $size 11

# build_chain DIR COMPAT CLUSTER COMPRESSED DEPTH BOTTOM: the chain's top
# image in $top.
build_chain ()
{
    local d=$1 compat=$2 cs=$3 comp=$4 depth=$5 bottom=$6 i prev fmt
    mkdir -p "$d"
    if [ "$bottom" = raw ]; then
        cp "$tmpdir/seed.raw" "$d/l0.img"; fmt=raw
    else
        qemu-img convert -q -O qcow2 ${comp:+-c} -o compat="$compat",cluster_size="$cs" \
            "$tmpdir/seed.raw" "$d/l0.img"
        fmt=qcow2
    fi
    prev=l0.img
    for (( i = 1; i <= depth; i++ )); do
        qemu-img create -q -f qcow2 -o compat="$compat",cluster_size="$cs" \
            -b "$prev" -F "$fmt" "$d/l$i.img"
        # Data, zero clusters (v3) or zeroed data (v2), a discard.
        qemu-io -f qcow2 -c "write -P $((i * 7 % 250 + 1)) $((i * 300))k 200k" \
            -c "write -z $((i * 512))k 128k" -c "write -P 0x5$((i % 10)) $((size - 70000)) 70000" \
            "$d/l$i.img" >/dev/null
        if [ -n "$comp" ] && [ "$i" = 1 ]; then
            # A compressed layer in the middle of the chain too.
            qemu-img convert -q -c -O qcow2 -o compat="$compat",cluster_size="$cs" \
                -B "$prev" -F "$fmt" "$d/l$i.img" "$d/l$i.c.img"
            mv "$d/l$i.c.img" "$d/l$i.img"
        fi
        prev=l$i.img; fmt=qcow2
    done
    top=$d/$prev
}

n=0
for compat in 0.10 1.1; do
    for cs in 512 4096 65536 2M; do
        n=$((n + 1))
        case $((n % 3)) in 0) depth=1 ;; 1) depth=3 ;; 2) depth=8 ;; esac
        if [ $((n % 2)) = 0 ]; then comp=c; else comp=; fi
        if [ $((n % 4)) -lt 2 ]; then bottom=raw; else bottom=qcow2; fi
        label="compat=$compat cluster=$cs depth=$depth bottom=$bottom${comp:+ compressed}"
        note "$label"
        d=$tmpdir/m$n
        build_chain "$d" "$compat" "$cs" "$comp" "$depth" "$bottom"
        qemu-img convert -O raw "$top" "$d/expect.raw"
        start_server m$n base="$top" overlay="$d/ov.qcow2" cluster-size=4K
        uri=$(server_uri m$n)
        nbdcopy "$uri" "$d/got.raw"
        cmp -s "$d/expect.raw" "$d/got.raw" || fail "$label: served disk differs from qemu-img convert"
        for cmd in "write -P 0xc1 1000 5000" "write -P 0xc2 $((3 << 20)) 300k" \
                   "write -z 64k 256k" "write -P 0xc3 $((size - 1)) 1"; do
            qemu-io -f raw -c "$cmd" "$uri" >/dev/null
            qemu-io -f raw -c "$cmd" "$d/expect.raw" >/dev/null
        done
        stop_server m$n
        check_image "$d/ov.qcow2"
        qemu-img compare -q -f raw -F qcow2 "$d/expect.raw" "$d/ov.qcow2" ||
            fail "$label: after writes, the overlay chain differs from the reference"
        for f in "$d"/l*.img; do
            [ "$(qemu-img info --output=json "$f" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["format"])')" = raw ] ||
                check_image "$f"
        done
        rm -rf "$d"
    done
done
