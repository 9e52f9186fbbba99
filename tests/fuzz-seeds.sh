#!/usr/bin/env bash
# Seed corpus for tests/fuzz-qcow2.c: small valid qcow2 images made by
# QEMU's own tools, covering what the reader has to handle.
#
#   tests/fuzz-seeds.sh OUTDIR
#
# compat 0.10 (v2) and 1.1 (v3); cluster sizes 512, 4K and 64K; data,
# compressed clusters (qemu-img convert -c), zero clusters (qemu-io
# write -z), discarded clusters, a backing file name with its format,
# other refcount widths, lazy refcounts, an internal snapshot; and a few
# that must be refused (extended L2, zstd compression, external data
# file).  Virtual sizes are small so that every input reads quickly.
set -e
set -u

out=${1:?usage: $0 OUTDIR}
mkdir -p "$out"
for t in qemu-img qemu-io; do
    command -v "$t" >/dev/null || { echo "$0: $t not found" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/fuzz-seeds.XXXXXX")
trap 'rm -rf "$work"' EXIT

n=0
keep ()                         # keep FILE NAME
{
    cp "$1" "$out/$2.qcow2"
    n=$((n + 1))
}

io ()                           # io FILE qemu-io-commands...
{
    local f=$1 c args=()
    shift
    for c in "$@"; do
        args+=(-c "$c")
    done
    qemu-io -f qcow2 "${args[@]}" "$f" >/dev/null
}

# A raw source with data, a zero run, and a repeated pattern, so that
# compression has something to do.
src=$work/src.raw
qemu-img create -q -f raw "$src" 1M
qemu-io -f raw -c 'write -P 0x5a 0 64k' -c 'write -P 0x11 200k 3k' \
    -c 'write -P 0xa5 512k 100k' -c 'write -P 0x01 1020k 4k' \
    "$src" >/dev/null
base=$work/base.raw
qemu-img create -q -f raw "$base" 1M

for compat in 0.10 1.1; do
    v=v2
    [ "$compat" = 1.1 ] && v=v3
    for cs in 512 4096 65536; do
        tag=$v-c$cs
        img=$work/$tag.qcow2

        # Empty.
        qemu-img create -q -f qcow2 -o compat=$compat,cluster_size=$cs \
            "$img" 1M
        keep "$img" "$tag-empty"

        # Data in several clusters, partly covered ones, two L2 tables
        # for small clusters.
        io "$img" 'write -P 0x61 0 1k' 'write -P 0x62 4000 9000' \
            'write -P 0x63 300k 64k' 'write -P 0x64 1023k 1k'
        keep "$img" "$tag-data"

        # Zero clusters (v3) / zeroes written as data (v2), and a discard.
        io "$img" "write -z 300k $cs" "write -z 0 $((cs * 2))" \
            "discard $((1023 * 1024 / cs * cs)) $cs"
        keep "$img" "$tag-zero"

        # Compressed clusters.
        qemu-img convert -q -c -f raw -O qcow2 \
            -o compat=$compat,cluster_size=$cs "$src" "$img"
        keep "$img" "$tag-compressed"
        # ... with a later write over part of them.
        io "$img" 'write -P 0x77 10k 1k'
        keep "$img" "$tag-compressed-rewritten"

        # A backing file name (and its format, in v3's extension).
        qemu-img create -q -f qcow2 -o compat=$compat,cluster_size=$cs \
            -b "$base" -F raw "$img" 1M
        io "$img" 'write -P 0x42 64k 1k'
        keep "$img" "$tag-backing"
    done
done

# v3 only: other refcount widths, lazy refcounts, an internal snapshot,
# a larger (mostly empty) virtual size.
img=$work/x.qcow2
for bits in 1 8 64; do
    qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=$bits \
        "$img" 1M
    io "$img" 'write -P 0x33 0 16k'
    keep "$img" "v3-refcount$bits"
done
qemu-img create -q -f qcow2 -o cluster_size=4096,lazy_refcounts=on "$img" 1M
io "$img" 'write -P 0x44 8k 8k'
keep "$img" "v3-lazy-refcounts"
qemu-img create -q -f qcow2 -o cluster_size=4096 "$img" 1M
io "$img" 'write -P 0x55 0 8k'
qemu-img snapshot -c snap1 "$img"
io "$img" 'write -P 0x56 4k 8k'
keep "$img" "v3-snapshot"
qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" 1G
io "$img" 'write -P 0x66 900M 64k'
keep "$img" "v3-1G-sparse"

# Images the reader must refuse cleanly.
qemu-img create -q -f qcow2 -o cluster_size=65536,extended_l2=on "$img" 1M \
    2>/dev/null && keep "$img" "v3-extended-l2"
qemu-img create -q -f qcow2 -o cluster_size=4096,compression_type=zstd \
    "$img" 1M 2>/dev/null && keep "$img" "v3-zstd"
qemu-img create -q -f qcow2 -o cluster_size=4096,data_file="$work/data.raw" \
    "$img" 1M 2>/dev/null && keep "$img" "v3-data-file"

echo "$0: $n seeds in $out"
