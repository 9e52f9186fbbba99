#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Seed corpora for the fuzz targets (see "Fuzzing" in Makefile.am).
#
#   tests/fuzz-seeds.sh OUTDIR [qcow2|manifest|words|protocol]
#
# manifest: valid manifests (base and nobase, snapshots, descriptions,
# rebase records, escapes) and a few that are refused.  words: words
# and strings with escapes, UTF-8 and control bytes.  protocol: request
# lines of every command the server knows, and a few it refuses.
#
# qcow2 (the default): small valid qcow2 images made by QEMU's own
# tools, covering what the reader has to handle:
# compat 0.10 (v2) and 1.1 (v3); cluster sizes 512, 4K and 64K; data,
# compressed clusters (qemu-img convert -c), zero clusters (qemu-io
# write -z), discarded clusters, a backing file name with its format,
# other refcount widths, lazy refcounts, an internal snapshot, extended
# L2 entries (subclusters: data, zero and unallocated subclusters, a
# compressed cluster, over a backing file); and a few that must be
# refused (zstd compression, external data file).  Virtual sizes are small so that every input reads quickly.
set -e
set -u

out=${1:?usage: $0 OUTDIR [qcow2|manifest|words|protocol]}
target=${2:-qcow2}
mkdir -p "$out"

n=0
seed ()                         # seed NAME TEXT (printf format, no args)
{
    printf "$2" > "$out/$1"
    n=$((n + 1))
}

case $target in
qcow2) ;;
manifest)
    m='cowchain-manifest 1\n'
    seed base "${m}base /var/lib/images/base.raw raw\nlayer layer-000001.qcow2 1700000000 - -\n"
    seed nobase "${m}nobase\nlayer layer-000001.qcow2 0 - -\n"
    seed snapshots "${m}base /b%%20c/d.qcow2 qcow2\nlayer layer-000001.qcow2 1700000000 s1 before%%20upgrade\nlayer layer-000002.qcow2 1700000100 s2.b-c+d:e@f Gr%%C3%%BC%%C3%%9Fe%%09tab\nlayer layer-000003.qcow2 1700000200 - -\n"
    seed rebase "${m}base /b raw\nlayer layer-000001.qcow2 1 s1 -\nlayer layer-000002.qcow2 2 - -\nrebase layer-000002.qcow2\nrebase layer-000001.qcow2\n"
    seed escapes "${m}base %%2D%%25%%0A%%FF raw\nlayer %%2Dx%%20y 9223372036854775807 - %%2D\n\n   \nlayer z 2 - -\n"
    seed refused-dup "${m}base /b raw\nlayer a 1 s -\nlayer a 2 - -\n"
    seed refused-field "${m}base /b raw\nlayer a 1 - - x\n"
    seed refused-snapshot-on-top "${m}nobase\nlayer a 1 s -\n"
    echo "$0: $n seeds in $out"
    exit 0 ;;
words)
    seed plain 'abc-def.ghi_j/k:l@m+n,o=p'
    seed escapes 'a%%20b%%0A%%25%%2D%%ff%%FE'
    seed dash '-'
    seed bad-escape 'a%%2'
    seed nul-escape 'a%%00b'
    seed utf8 'Gr\303\274\303\237e \342\234\223 \360\237\230\200'
    seed controls 'a\033[2Jb\tc\177d\302\205e\342\200\256f'
    seed invalid-utf8 '\300\257\355\240\200\364\220\200\200\377\303'
    echo "$0: $n seeds in $out"
    exit 0 ;;
protocol)
    seed status 'status\n'
    seed blklist 'blklist\n'
    seed list 'list disk0\n'
    seed snapshot 'snapshot - s1 before%%20upgrade\n'
    seed snapshot-atomic 'snapshot-atomic s2 -\n'
    seed revert 'revert disk0 s1 force\n'
    seed commit 'commit disk0 s2 - allow-base-write,force 0\n'
    seed pull 'pull - - - 1048576\n'
    seed delete 'delete disk0 s1 0\n'
    seed jobs 'jobs\n'
    seed job-pause 'job-pause disk0\n'
    seed job-speed 'job-speed %%2Dd 100\n'
    seed max-words 'a b c d e f g h i j k l m n o p\n'
    seed too-many-words 'a b c d e f g h i j k l m n o p q\n'
    seed bad-escape 'list %%zz\n'
    seed spaces '  list   disk0  \n'
    seed no-newline 'status'
    echo "$0: $n seeds in $out"
    exit 0 ;;
*)
    echo "$0: unknown target '$target'" >&2
    exit 1 ;;
esac

# qcow2.
for t in qemu-img qemu-io; do
    command -v "$t" >/dev/null || { echo "$0: $t not found" >&2; exit 1; }
done

work=$(mktemp -d "${TMPDIR:-/tmp}/fuzz-seeds.XXXXXX")
trap 'rm -rf "$work"' EXIT

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
# Extended L2 entries: subclusters of 512 bytes (16K clusters) and 2K.
for cs in 16384 65536; do
    qemu-img create -q -f qcow2 -o cluster_size=$cs,extended_l2=on \
        -b "$(basename "$base")" -F raw "$img" 1M
    io "$img" 'write -P 0x71 1k 3k' 'write -z 40k 2k' 'write -P 0x72 130k 1' \
        'discard 300k 64k' 'write -P 0x73 500k 70k'
    keep "$img" "v3-extended-l2-$cs"
done
qemu-img convert -q -c -O qcow2 -o cluster_size=16384,extended_l2=on \
    -f raw "$src" "$img"
io "$img" 'write -P 0x74 100k 1k' 'write -z 4k 512'
keep "$img" "v3-extended-l2-compressed"

# Images the reader must refuse cleanly.
qemu-img create -q -f qcow2 -o cluster_size=4096,compression_type=zstd \
    "$img" 1M 2>/dev/null && keep "$img" "v3-zstd"
qemu-img create -q -f qcow2 -o cluster_size=4096,data_file="$work/data.raw" \
    "$img" 1M 2>/dev/null && keep "$img" "v3-data-file"

echo "$0: $n seeds in $out"
