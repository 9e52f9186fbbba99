#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Hostile bases: the server refuses, or fails only the affected reads with
# EIO, naming the file and what was wrong; it never follows a crafted
# backing name out of the base's directory, never loops, never crashes,
# and never writes to the base.
#   refused at start: backing names that are absolute host paths, that
#   climb out with ../, json: specifications, URLs; backing loops (two
#   files, and a file naming itself); chains deeper than the limit; a
#   backing file without a recorded format.
#   EIO at read time (server stays up, other reads fine): an L2 entry with
#   reserved bits, one pointing past the end of the file, an L1 entry that
#   is not cluster aligned, a compressed-cluster descriptor out of bounds,
#   a corrupt deflate stream; with extended L2 entries (subclusters), a
#   bitmap with a subcluster both allocated and zero, allocated
#   subclusters without a host cluster, a bitmap on a compressed cluster
#   (cowchain check reports each of these as qemu-img check does).
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img qemu-io
requires_python_nbd
requires_cowchain

d=$tmpdir/img
mkdir -p "$d"
truncate -s 1M "$d/plain.raw"

refuse () {                 # refuse NAME TEXT BASE [KEY=VALUE...]
    local name=$1 text=$2 base=$3; shift 3
    expect_start_failure "$name" base="$base" overlay="$tmpdir/$name.qcow2" "$@"
    grep -q -i -- "$text" "$(server_log "$name")" ||
        { cat "$(server_log "$name")" >&2; fail "$name: error does not mention '$text'"; }
    [ ! -e "$tmpdir/$name.qcow2" ] || fail "$name: an overlay was created"
    note "refused $name: $(grep -i error "$(server_log "$name")" | head -n1)"
}

qemu-img create -q -f qcow2 -u -b /etc/passwd -F raw "$d/abs.qcow2" 1M
refuse abs "outside the base's directory" "$d/abs.qcow2"
qemu-img create -q -f qcow2 -u -b ../../../../../../etc/passwd -F raw "$d/climb.qcow2" 1M
refuse climb "outside the base's directory" "$d/climb.qcow2"
qemu-img create -q -f qcow2 -u -b 'json:{"file":{"driver":"file","filename":"/etc/passwd"}}' \
    -F raw "$d/json.qcow2" 1M
refuse json "json:" "$d/json.qcow2"
qemu-img create -q -f qcow2 -u -b 'nbd://127.0.0.1:10809/x' -F raw "$d/url.qcow2" 1M
refuse url "URL" "$d/url.qcow2"
qemu-img create -q -f qcow2 -u -b loopb.qcow2 -F qcow2 "$d/loopa.qcow2" 1M
qemu-img create -q -f qcow2 -u -b loopa.qcow2 -F qcow2 "$d/loopb.qcow2" 1M
refuse loop "loop" "$d/loopa.qcow2"
qemu-img create -q -f qcow2 -u -b self.qcow2 -F qcow2 "$d/self.qcow2" 1M
refuse self "loop" "$d/self.qcow2"
qemu-img create -q -f qcow2 -u -b plain.raw "$d/nofmt.qcow2" 1M 2>/dev/null ||
    { qemu-img create -q -f qcow2 "$d/nofmt.qcow2" 1M &&
      # Point the backing name at plain.raw by hand: no format extension.
      qcow2_patch "$d/nofmt.qcow2" "@$(( 65536 - 64 ))=str:plain.raw" \
          backing_file_offset=$(( 65536 - 64 )) backing_file_size=9
    }
refuse nofmt "no recorded format" "$d/nofmt.qcow2"
prev=plain.raw; pfmt=raw
for i in $(seq 1 130); do
    qemu-img create -q -f qcow2 -u -b "$prev" -F "$pfmt" "$d/deep$i.qcow2" 1M
    prev=deep$i.qcow2; pfmt=qcow2
done
refuse deep "deeper than" "$d/deep130.qcow2"
# The allow list lets an absolute name through (and only that one).
start_server allowed base="$d/abs.qcow2" overlay="$tmpdir/allowed.qcow2" allow-backing=/etc/passwd
stop_server allowed

note "corrupt metadata in the base: EIO on the affected reads only"
make_random_file "$tmpdir/data.raw" $((4 << 20)) 5
qemu-img convert -q -O qcow2 "$tmpdir/data.raw" "$d/good.qcow2"
# Compressible data, so that qemu-img convert -c really compresses.
"$PYTHON" -c 'import sys; sys.stdout.buffer.write(b"".join(b"cowchain block %08d\n" % i for i in range((4 << 20) // 24)).ljust(4 << 20, b"."))' > "$tmpdir/text.raw"
qemu-img convert -q -c -O qcow2 "$tmpdir/text.raw" "$d/comp.qcow2"
qemu-img check "$d/comp.qcow2" | grep -q -E '[1-9][0-9.]*% compressed' ||
    fail "qemu-img convert -c did not compress"
qemu-img convert -q -O qcow2 -o extended_l2=on "$tmpdir/data.raw" "$d/goodx.qcow2"
qemu-img convert -q -c -O qcow2 -o extended_l2=on "$tmpdir/text.raw" "$d/compx.qcow2"

# patch FILE KIND: damage the first cluster's mapping or data.
patch () {
    local path=$1 kind=$2 cbits e x
    if [ "$kind" = l1-unaligned ]; then
        qcow2_patch "$path" "l1[0]|=0x200"
        return
    fi
    cbits=$(qcow2_patch "$path" cluster_bits)
    e=$(qcow2_patch "$path" "l2[0]")
    # The host offset field of a compressed cluster's L2 entry.
    x=$(( 62 - (cbits - 8) ))
    case $kind in
        bm-both)                # subcluster 0 allocated and zero
            qcow2_patch "$path" "l2bm[0]|=$(( 1 << 32 ))"
            return
            ;;
        bm-no-host)             # allocated subclusters, no host cluster
            qcow2_patch "$path" "l2[0]=0"
            return
            ;;
        bm-compressed)          # a bitmap on a compressed cluster
            qcow2_patch "$path" "l2bm[0]=1"
            return
            ;;
        l2-reserved) e=$(( e | (1 << 57) )) ;;
        l2-past-eof) e=$(( (1 << 63) | (1 << 45) )) ;;
        comp-oob) e=$(( (e & ~((1 << x) - 1)) | ((1 << 40) + 0x1234) )) ;;
        comp-garbage)
            qcow2_patch "$path" "@$(( e & ((1 << x) - 1) ))=$(printf 'ff%.0s' {1..256})"
            return
            ;;
    esac
    qcow2_patch "$path" "l2[0]=$e"
}
for kind in l2-reserved l2-past-eof l1-unaligned comp-oob comp-garbage \
            bm-both bm-no-host bm-compressed; do
    case $kind in
        comp-*) src=comp; ref=$tmpdir/text.raw ;;
        bm-compressed) src=compx; ref=$tmpdir/text.raw ;;
        bm-*) src=goodx; ref=$tmpdir/data.raw ;;
        *) src=good; ref=$tmpdir/data.raw ;;
    esac
    cp "$d/$src.qcow2" "$d/$kind.qcow2"
    patch "$d/$kind.qcow2" "$kind"
    sum=$(sha256 "$d/$kind.qcow2")
    start_server "$kind" base="$d/$kind.qcow2" overlay="$tmpdir/$kind.ov.qcow2"
    "$PYTHON" - "$(server_uri "$kind")" "$ref" "$kind" <<'PY'
import errno, sys, nbd
uri, ref, kind = sys.argv[1:]
h = nbd.NBD(); h.connect_uri(uri)
try:
    h.pread(4096, 0)
    sys.exit("%s: reading the damaged cluster did not fail" % kind)
except nbd.Error as e:
    assert e.errnum == errno.EIO, (kind, e)
# Far from the damaged mapping (another L2 table for the plain image,
# other clusters for the compressed one), reads still work.
want = open(ref, "rb").read()
off = 3 << 20
if kind != "l1-unaligned":
    assert h.pread(65536, off) == want[off:off + 65536], kind
# A partial write over the damaged cluster needs its old data: EIO too.
try:
    h.pwrite(b"z" * 512, 512)
    sys.exit("%s: copy-on-write over the damaged cluster did not fail" % kind)
except nbd.Error as e:
    assert e.errnum == errno.EIO, (kind, e)
PY
    grep -q -i -E "corrupt|inflate|out of bounds|past the end|reserved|subcluster" "$(server_log "$kind")" ||
        { cat "$(server_log "$kind")" >&2; fail "$kind: the log does not say what was wrong"; }
    stop_server "$kind"
    [ "$(sha256 "$d/$kind.qcow2")" = "$sum" ] || fail "$kind: the base was written"
    case $kind in
        bm-*)
            # The checker agrees with qemu-img check: corrupt (exit 2).
            run_cowchain check "$d/$kind.qcow2"
            q=0
            qemu-img check "$d/$kind.qcow2" > /dev/null 2>&1 || q=$?
            [ "$rc" = 2 ] && [ "$q" = 2 ] ||
                { cat "$tmpdir/out" "$tmpdir/err" >&2;
                  fail "$kind: cowchain check exit $rc, qemu-img check exit $q (both must be 2)"; }
            grep -q -i "subcluster" "$tmpdir/out" ||
                { cat "$tmpdir/out" >&2; fail "$kind: cowchain check does not name the bitmap"; }
            ;;
    esac
    check_image "$tmpdir/$kind.ov.qcow2"
    note "$kind: EIO, $(grep -i -m1 -E 'corrupt|inflate' "$(server_log "$kind")" | sed 's/.*error: //' | cut -c1-120)"
done
