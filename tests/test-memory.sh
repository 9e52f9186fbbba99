#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# One metadata cache budget per server (cache-size=) and the merged map
# of the frozen layers, on a live server: two disks of 4K clusters (an L2
# table maps 2 MiB) with scattered writes over eight layers each, under a
# budget of 64 tables; `cowchain status` reports the budget, never
# exceeded (also at its peak), and the merged maps' bytes; every read
# goes through the map and is compared with the top-down read
# (COWCHAIN_VERIFY_MAP=1), and each disk equals a raw copy given the same
# writes (qemu-img compare); then the default budget, 64M.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"
requires qemu-img qemu-io

cow=$abs_top_builddir/cowchain
[ -x "$cow" ] || fail "cowchain tool not built: $cow"
ctl=$tmpdir/ctl
export COWCHAIN_CONTROL=$ctl
budget=$((256 * 1024))
size=$((1 << 30))

truncate -s $size "$tmpdir/base.raw"
server_env+=(COWCHAIN_VERIFY_MAP=1)
start_server srv control="$ctl" cache-size=256K \
    disk=vda base="$tmpdir/base.raw" base-format=raw state="$tmpdir/vda" \
    cluster-size=4096 \
    disk=vdb base="$tmpdir/base.raw" base-format=raw state="$tmpdir/vdb" \
    cluster-size=4096
sock=$(server_uri srv | sed 's/.*socket=//')

# memory FIELD: from the status line "metadata cache: USED of BUDGET
# bytes (peak PEAK); merged maps: MAPS bytes".
memory () {
    local line
    line=$("$cow" status | grep '^metadata cache: ') ||
        fail "cowchain status shows no memory line"
    set -- $(echo "$line" | sed 's/^metadata cache: \([0-9]*\) of \([0-9]*\) bytes (peak \([0-9]*\)); merged maps: \([0-9]*\) bytes$/\1 \2 \3 \4/')
    [ $# = 4 ] || fail "status memory line not understood: $line"
    echo "$@"
}

RANDOM=12
for disk in vda vdb; do
    uri="nbd+unix:///$disk?socket=$sock"
    truncate -s $size "$tmpdir/$disk.ref"
    for layer in 1 2 3 4 5 6 7 8; do
        cmds=()
        for k in $(seq 1 24); do
            # A region of 2 MiB (an L2 table) out of 512, an offset in it.
            off=$(( (RANDOM % 512) * 2097152 + (RANDOM % 500) * 4096 ))
            cmds+=(-c "write -P $(( (layer * 24 + k) % 250 + 1 )) $off 8k")
        done
        qemu-io -f raw "${cmds[@]}" "$uri" > /dev/null ||
            fail "writes to $disk layer $layer"
        qemu-io -f raw "${cmds[@]}" "$tmpdir/$disk.ref" > /dev/null
        "$cow" snapshot --disk "$disk" "s$layer" > /dev/null
    done
done

note "tables held never exceed the budget"
read -r used got peak maps < <(memory)
note "metadata cache: $used of $got bytes, peak $peak; merged maps $maps bytes"
[ "$got" = "$budget" ] || fail "budget $got, not $budget"
[ "$used" -le "$budget" ] || fail "cache holds $used bytes, over the budget"
[ "$peak" -le "$budget" ] || fail "cache held $peak bytes at its peak, over the budget"
[ "$peak" -ge $((budget / 2)) ] || fail "peak $peak: the scattered writes should have filled the cache"

note "reads through the merged maps equal the raw copies"
for disk in vda vdb; do
    qemu-img compare -f raw -F raw "$tmpdir/$disk.ref" \
        "nbd+unix:///$disk?socket=$sock" ||
        fail "$disk differs from its raw copy"
done
read -r used got peak maps < <(memory)
[ "$maps" -gt 0 ] || fail "no merged map after reads of frozen layers"
[ "$peak" -le "$budget" ] || fail "cache held $peak bytes at its peak, over the budget"
grep -q "differs from the top-down read" "$(server_log srv)" &&
    fail "a read through the merged map differed from the top-down read"

note "the default budget is 64M"
stop_server srv
start_server srv control="$ctl" \
    disk=vda base="$tmpdir/base.raw" base-format=raw state="$tmpdir/vda"
read -r used got peak maps < <(memory)
[ "$got" = $((64 << 20)) ] || fail "default budget $got, not 64M"
stop_server srv
