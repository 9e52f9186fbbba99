#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# cowchain performance measurement (not a test: it never fails on a slow
# result).  In one run, fio's nbd engine drives three servers on UNIX
# sockets in a temporary directory:
#
#   cowchain     nbdkit + the cowchain plugin, qcow2 overlay over a raw base
#   qemu-nbd     qemu-nbd on a qcow2 overlay over the same raw base
#   nbdkit-file  nbdkit's file plugin on a raw copy of the base (the ceiling)
#
# and prints a table of IOPS, MB/s and ratios.  Quote the ratios, not the
# absolute numbers: the machines are shared and noisy.
#
# Rows that print notes under the table instead (each needs cowchain in
# BENCH_SERVERS; the merge rows' own comments say how they are built):
#   snapshot_pause  4k randwrite qd16 latency with and without a
#                   `cowchain snapshot` every second
#   depth_read      4k randread qd16 through 64 layers against 1
#   merge_speed     MB/s of `cowchain commit` of a layer holding BENCH_SIZE
#                   into an empty one, against `qemu-img commit` of a copy
#                   of the same chain and `cp` of a file that size, all
#                   ending in an fsync; ratios cowchain/qemu-img and
#                   cowchain/cp (about 35 s per BENCH_REPEAT pass)
#   merge_iops      4k randread and randwrite qd16 IOPS of the guest with
#                   no job and during a commit kept running (restarted) for
#                   as long as fio runs; their ratio, and the merge's own
#                   MB/s then and alone (about 80 s, plus 50 s per extra
#                   BENCH_REPEAT pass)
#   active_commit   4k randwrite qd16 latency (p99, max) with and without
#                   an active commit (`cowchain commit --top active`) of
#                   BENCH_SIZE running, and whether it completed while fio
#                   ran (about 90 s)
#   memory          peak RSS (VmHWM) of the server for a 1 TiB disk with
#                   2 GiB written scattered over 1 and over 64 layers,
#                   against the metadata cache budget (cache-size=)
# snapshot_pause also runs qemu-storage-daemon (a qcow2 overlay over the
# same base, exported over NBD) with the same fio job, once idle and once
# with QMP blockdev-snapshot-sync every second, when it is installed
# (Debian 12: qemu-system-common).
# One pass of these is one sample on a noisy machine: BENCH_REPEAT=3 or 5.
#
# Environment:
#   BENCH_SIZE      virtual disk size, K/M/G suffixes (default 1G)
#   BENCH_RUNTIME   seconds per fio job, time based (default 10)
#   BENCH_RAMP      fio ramp_time seconds, not measured (default 2)
#   BENCH_REPEAT    passes over the servers per row; the table shows the
#                   median (default 1; 3 or 5 steadies a noisy machine)
#   BENCH_CLUSTER   cluster size of both qcow2 overlays (default 64K)
#   BENCH_COWCHAIN_ARGS  more plugin keys for the cowchain server, e.g.
#                   "subclusters=off" (default none)
#   BENCH_SERVERS   servers to run (default "cowchain qemu-nbd nbdkit-file")
#   BENCH_ROWS      row functions to run, in order (default: all, see ROWS)
#   BENCH_KEEP=1    keep the temporary directory (images, fio JSON)
#   BENCH_RESULTS   also write the results as TSV to this file
#   COWCHAIN_PLUGIN use this plugin .so instead of build/ (built if missing)
#
# Adding a row: write a function row_NAME that calls fio_row (same fio job
# on every server's standing export) or starts its own servers, as
# row_fresh_randwrite does, and calls record for each result; then add
# NAME to ROWS.  Rows whose measure is not IOPS (snapshot pause, merge
# speed) can call note to print a line under the table.
set -euo pipefail

# shellcheck source=scripts/deps.sh
. "$(dirname "${BASH_SOURCE[0]}")/deps.sh"

BENCH_SIZE=${BENCH_SIZE:-1G}
BENCH_RUNTIME=${BENCH_RUNTIME:-10}
BENCH_RAMP=${BENCH_RAMP:-2}
BENCH_REPEAT=${BENCH_REPEAT:-1}
BENCH_CLUSTER=${BENCH_CLUSTER:-64K}
read -r -a SERVERS <<< "${BENCH_SERVERS:-cowchain qemu-nbd nbdkit-file}"
ROWS=(
    randread_4k_qd1 randread_4k_qd16
    randwrite_4k_qd1 randwrite_4k_qd16
    seqread_1m_qd1 seqread_1m_qd16
    seqwrite_1m_qd1 seqwrite_1m_qd16
    fresh_randwrite_4k_qd1 fresh_randwrite_4k_qd16
    snapshot_pause depth_read
    merge_speed merge_iops active_commit memory
)
if [ -n "${BENCH_ROWS:-}" ]; then
    read -r -a ROWS <<< "$BENCH_ROWS"
fi

SIZE_BYTES=$(numfmt --from=iec "${BENCH_SIZE%[bB]}")
SIZE_MIB=$((SIZE_BYTES / 1048576))
if [ "$SIZE_MIB" -lt 16 ]; then
    echo "error: BENCH_SIZE must be at least 16M" >&2
    exit 1
fi

has_server() {
    local s
    for s in "${SERVERS[@]}"; do
        [ "$s" = "$1" ] && return 0
    done
    return 1
}

for s in "${SERVERS[@]}"; do
    case $s in
        cowchain | qemu-nbd | nbdkit-file) ;;
        *) echo "error: unknown server '$s' in BENCH_SERVERS" >&2; exit 1 ;;
    esac
done

cowchain_install_deps

PLUGIN=${COWCHAIN_PLUGIN:-$COWCHAIN_PLUGIN_SO}
if has_server cowchain && [ ! -f "$PLUGIN" ]; then
    cowchain_log "plugin $PLUGIN missing: building it"
    if ! cowchain_build_plugin; then
        echo "error: could not build the cowchain plugin;" \
            "BENCH_SERVERS='qemu-nbd nbdkit-file' runs the peers alone" >&2
        exit 1
    fi
    PLUGIN=$COWCHAIN_PLUGIN_SO
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cowchain-bench.XXXXXX")
BASE=$WORK/base.raw
RESULTS=$WORK/results.tsv
NOTES=$WORK/notes.txt
: > "$RESULTS"
: > "$NOTES"

declare -A SOCK=()    # instance name -> UNIX socket
declare -A PID=()     # instance name -> server PID (ours; stopped in the trap)

cleanup() {
    local rc=$? name
    for name in "${!PID[@]}"; do
        cowchain_stop_pid "${PID[$name]}"
    done
    if [ "${BENCH_KEEP:-0}" = 1 ] || [ "$rc" -ne 0 ]; then
        echo "bench files kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

#----------------------------------------------------------------------
# Servers.  Each instance has a name, a socket $WORK/NAME.sock and a PID.

uri_of() {
    echo "nbd+unix:///?socket=${SOCK[$1]}"
}

# wait_ready NAME: wait for the socket while the server is alive.
wait_ready() {
    local name=$1 tenths=300
    while [ ! -S "${SOCK[$name]}" ]; do
        if ! cowchain_pid_alive "${PID[$name]}"; then
            echo "error: server $name (PID ${PID[$name]}) exited at start" >&2
            unset -v 'PID[$name]'
            return 1
        fi
        if [ "$tenths" -le 0 ]; then
            echo "error: server $name did not open ${SOCK[$name]} in 30 s" >&2
            return 1
        fi
        sleep 0.1
        tenths=$((tenths - 1))
    done
}

# start_nbdkit NAME PLUGIN [KEY=VALUE...]: nbdkit as a daemon; PID from -P.
start_nbdkit() {
    local name=$1
    shift
    SOCK[$name]=$WORK/$name.sock
    rm -f "$WORK/$name.pid"
    nbdkit -U "${SOCK[$name]}" -P "$WORK/$name.pid" "$@"
    PID[$name]=$(cowchain_wait_pidfile "$WORK/$name.pid")
    wait_ready "$name"
}

# start_cowchain NAME OVERLAY: the plugin, overlay created over $BASE.
start_cowchain() {
    # shellcheck disable=SC2086  # BENCH_COWCHAIN_ARGS: words
    start_nbdkit "$1" "$PLUGIN" base="$BASE" base-format=raw overlay="$2" \
        cluster-size="$BENCH_CLUSTER" ${BENCH_COWCHAIN_ARGS:-}
}

# start_qemu_nbd NAME OVERLAY: qemu-nbd on a new qcow2 overlay over $BASE.
start_qemu_nbd() {
    local name=$1 overlay=$2
    SOCK[$name]=$WORK/$name.sock
    qemu-img create -q -f qcow2 -o cluster_size="$BENCH_CLUSTER" \
        -b "$BASE" -F raw "$overlay"
    qemu-nbd -t -e 8 -k "${SOCK[$name]}" -f qcow2 \
        --cache=writeback --aio=threads "$overlay" &
    PID[$name]=$!
    wait_ready "$name"
}

# start_nbdkit_file NAME FILE
start_nbdkit_file() {
    start_nbdkit "$1" file file="$2"
}

stop_server() {
    local name=$1
    if [ -n "${PID[$name]:-}" ]; then
        cowchain_stop_pid "${PID[$name]}"
        unset -v 'PID[$name]'
    fi
    rm -f "${SOCK[$name]}"
}

#----------------------------------------------------------------------
# fio and results.

# run_fio URI JSON-OUT [FIO-OPTION...]: one fio job through the nbd
# engine; prints "IOPS MBPS" (reads plus writes), or "ERR ERR".
run_fio() {
    local uri=$1 out=$2
    shift 2
    if ! fio --name=bench --ioengine=nbd --uri="$uri" \
            --output-format=json --output="$out" "$@" > "$out.stderr" 2>&1; then
        echo "fio failed, see $out.stderr" >&2
        cat "$out.stderr" >&2
        echo "ERR ERR"
        return 0
    fi
    "$COWCHAIN_PYTHON" - "$out" <<'EOF'
import json, sys
with open(sys.argv[1]) as f:
    text = f.read()
# fio may print notes before the JSON document.
data = json.loads(text[text.index("{"):])
job = data["jobs"][0]
if job.get("error"):
    print("ERR ERR")
else:
    iops = job["read"]["iops"] + job["write"]["iops"]
    mbps = (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / 1e6
    print("%.0f %.1f" % (iops, mbps))
EOF
}

# record ROW SERVER IOPS MBPS
record() {
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$RESULTS"
    printf '    %-12s %10s IOPS %10s MB/s\n' "$2" "$3" "$4" >&2
}

# note TEXT: a line printed under the table.
note() {
    printf '%s\n' "$*" >> "$NOTES"
}

# fio_common: options every measured job shares.
fio_common() {
    echo --time_based --runtime="$BENCH_RUNTIME" --ramp_time="$BENCH_RAMP"
}

# json_name LABEL SERVER PASS: where a job's fio JSON goes.
json_name() {
    echo "$WORK/$(printf '%s' "$1-$2-$3" | tr -c 'A-Za-z0-9-' _).json"
}

# fio_row LABEL FIO-OPTION...: the same job on each server's standing
# (prefilled) export, one server after the other, BENCH_REPEAT times.
fio_row() {
    local label=$1 server result pass
    shift
    cowchain_log "$label"
    for pass in $(seq "$BENCH_REPEAT"); do
        for server in "${SERVERS[@]}"; do
            # shellcheck disable=SC2046  # fio_common is a word list
            result=$(run_fio "$(uri_of "$server")" \
                "$(json_name "$label" "$server" "$pass")" $(fio_common) "$@")
            # shellcheck disable=SC2086  # "IOPS MBPS"
            record "$label" "$server" $result
        done
    done
}

#----------------------------------------------------------------------
# Rows.

row_randread_4k_qd1()   { fio_row "4k randread qd1"   --rw=randread  --bs=4k --iodepth=1; }
row_randread_4k_qd16()  { fio_row "4k randread qd16"  --rw=randread  --bs=4k --iodepth=16; }
row_randwrite_4k_qd1()  { fio_row "4k randwrite qd1"  --rw=randwrite --bs=4k --iodepth=1; }
row_randwrite_4k_qd16() { fio_row "4k randwrite qd16" --rw=randwrite --bs=4k --iodepth=16; }
row_seqread_1m_qd1()    { fio_row "1M seqread qd1"    --rw=read      --bs=1M --iodepth=1; }
row_seqread_1m_qd16()   { fio_row "1M seqread qd16"   --rw=read      --bs=1M --iodepth=16; }
row_seqwrite_1m_qd1()   { fio_row "1M seqwrite qd1"   --rw=write     --bs=1M --iodepth=1; }
row_seqwrite_1m_qd16()  { fio_row "1M seqwrite qd16"  --rw=write     --bs=1M --iodepth=16; }

# start_fresh SERVER NAME: an instance of SERVER on a new, empty overlay
# over the base (for nbdkit-file: a new sparse raw file).
start_fresh() {
    local server=$1 name=$2
    case $server in
        cowchain) start_cowchain "$name" "$WORK/$name.qcow2" ;;
        qemu-nbd) start_qemu_nbd "$name" "$WORK/$name.qcow2" ;;
        nbdkit-file)
            truncate -s "$SIZE_BYTES" "$WORK/$name.raw"
            start_nbdkit_file "$name" "$WORK/$name.raw"
            ;;
    esac
}

# stop_fresh NAME: stop the instance and delete its files.
stop_fresh() {
    stop_server "$1"
    rm -f "$WORK/$1.qcow2" "$WORK/$1.raw"
}

# fresh_randwrite QD: 4k random writes into a new, empty overlay per
# server and pass, so that first writes to a cluster allocate.
fresh_randwrite() {
    local qd=$1 label="4k randwrite fresh qd$1" server result pass
    cowchain_log "$label"
    for pass in $(seq "$BENCH_REPEAT"); do
        for server in "${SERVERS[@]}"; do
            start_fresh "$server" "fresh-$server"
            # shellcheck disable=SC2046  # fio_common is a word list
            result=$(run_fio "$(uri_of "fresh-$server")" \
                "$(json_name "$label" "$server" "$pass")" \
                $(fio_common) --rw=randwrite --bs=4k --iodepth="$qd")
            # shellcheck disable=SC2086  # "IOPS MBPS"
            record "$label" "$server" $result
            stop_fresh "fresh-$server"
        done
    done
}
row_fresh_randwrite_4k_qd1()  { fresh_randwrite 1; }
row_fresh_randwrite_4k_qd16() { fresh_randwrite 16; }

# snapshot_pause: the stall a live snapshot imposes on the guest.  fio
# 4k randwrite at qd16 on a state-directory disk, once without snapshots
# and once with `cowchain snapshot` every second; compares the write
# latency (max and p99) of the two runs, and reports the pause the engine
# measured for each snapshot (the exclusive-lock window).
row_snapshot_pause() {
    local label="snapshot pause" out pass mode lat pauses
    local cow=$COWCHAIN_BUILDDIR/cowchain
    cowchain_log "$label"
    for mode in idle snapshots; do
        rm -rf "$WORK/snapstate"
        start_nbdkit snap "$PLUGIN" base="$BASE" base-format=raw \
            state="$WORK/snapstate" control="$WORK/snap.ctl" \
            cluster-size="$BENCH_CLUSTER" ${BENCH_COWCHAIN_ARGS:-}
        out=$(json_name "$label" "$mode" 1)
        : > "$WORK/pauses"
        if [ "$mode" = snapshots ]; then
            (
                i=0
                sleep "$BENCH_RAMP"
                while [ -e "$WORK/snap.ctl" ] && [ ! -e "$WORK/snap.stop" ]; do
                    i=$((i + 1))
                    "$cow" snapshot --control "$WORK/snap.ctl" "bench$i" \
                        >> "$WORK/pauses" 2>&1 || break
                    sleep 1
                done
            ) &
            local snapper=$!
        fi
        # shellcheck disable=SC2046  # fio_common is a word list
        run_fio "$(uri_of snap)" "$out" $(fio_common) --rw=randwrite --bs=4k \
            --iodepth=16 > /dev/null
        if [ "$mode" = snapshots ]; then
            touch "$WORK/snap.stop"
            wait "$snapper" || :
            rm -f "$WORK/snap.stop"
        fi
        lat=$("$COWCHAIN_PYTHON" - "$out" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
c = w["clat_ns"]
print("%.0f %.2f %.2f %.2f" % (w["iops"], c["percentile"]["99.000000"] / 1e6,
                               c["percentile"]["99.990000"] / 1e6, c["max"] / 1e6))
PY
)
        # shellcheck disable=SC2086
        set -- $lat
        note "snapshot pause, 4k randwrite qd16, $mode: $1 IOPS, clat p99 $2 ms," \
            "p99.99 $3 ms, max $4 ms"
        if [ "$mode" = snapshots ]; then
            pauses=$(sed -n 's/.*paused \([0-9.]*\) ms.*/\1/p' "$WORK/pauses" |
                sort -n | awk '{a[NR]=$1} END {if (NR) printf "%d snapshots, engine pause median %.3f ms, max %.3f ms", NR, a[int((NR+1)/2)], a[NR]; else print "no snapshots taken"}')
            note "snapshot pause: $pauses"
        fi
        stop_server snap
    done
    snapshot_pause_qsd
}

# fio_lat JSON: "IOPS P99-MS P99.99-MS MAX-MS" of a fio job's writes.
fio_lat() {
    "$COWCHAIN_PYTHON" - "$1" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
c = w["clat_ns"]
print("%.0f %.2f %.2f %.2f" % (w["iops"], c["percentile"]["99.000000"] / 1e6,
                               c["percentile"]["99.990000"] / 1e6, c["max"] / 1e6))
PY
}

# qmp_snapshots QMP-SOCKET NODE DIR STOPFILE OUT: a small QMP client.
# After the greeting and qmp_capabilities, every second until STOPFILE
# exists: blockdev-snapshot-sync of the current top node (first NODE)
# into DIR/snapN.qcow2, node snapN, which then is the top.  Writes to OUT
# one line per snapshot: the time the command took in ms (QEMU drains
# and flushes the old top inside it, with guest I/O stopped), or
# "error ..." and stops.
qmp_snapshots() {
    "$COWCHAIN_PYTHON" - "$@" <<'PY'
import json, os, socket, sys, time
path, node, dirname, stop, out = sys.argv[1:6]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
f = s.makefile("rw")

def reply():
    while True:
        line = f.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        m = json.loads(line)
        if "return" in m or "error" in m:
            return m

def execute(cmd, **args):
    f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
    f.flush()
    m = reply()
    if "error" in m:
        raise RuntimeError("%s: %s" % (cmd, m["error"].get("desc")))
    return m["return"]

json.loads(f.readline())                  # the greeting
execute("qmp_capabilities")
with open(out, "w") as o:
    i = 0
    while not os.path.exists(stop):
        i += 1
        new = "snap%d" % i
        t0 = time.monotonic()
        try:
            execute("blockdev-snapshot-sync", **{
                "node-name": node, "snapshot-node-name": new,
                "snapshot-file": os.path.join(dirname, new + ".qcow2"),
                "format": "qcow2"})
        except (RuntimeError, OSError) as e:
            o.write("error %s\n" % e)
            break
        o.write("%.3f\n" % ((time.monotonic() - t0) * 1000))
        o.flush()
        node = new
        time.sleep(1)
PY
}

# snapshot_pause_qsd: the snapshot_pause measure for qemu-storage-daemon:
# a qcow2 overlay over $BASE (cluster BENCH_CLUSTER) exported over NBD on
# a UNIX socket, the same fio job once idle and once with QMP
# blockdev-snapshot-sync every second (qmp_snapshots).
snapshot_pause_qsd() {
    local label="snapshot pause qsd" mode out dir snapper lat times
    if ! command -v qemu-storage-daemon > /dev/null; then
        note "snapshot pause, qemu-storage-daemon: not installed (Debian 12:" \
            "qemu-system-common), skipped"
        return 0
    fi
    cowchain_log "$label"
    for mode in idle snapshots; do
        dir=$WORK/qsd
        rm -rf "$dir"
        mkdir "$dir"
        qemu-img create -q -f qcow2 -o cluster_size="$BENCH_CLUSTER" \
            -b "$BASE" -F raw "$dir/top.qcow2"
        SOCK[qsd]=$WORK/qsd.sock
        rm -f "${SOCK[qsd]}" "$WORK/qsd.qmp"
        qemu-storage-daemon \
            --blockdev driver=file,node-name=file0,filename="$dir/top.qcow2" \
            --blockdev driver=qcow2,node-name=top,file=file0 \
            --nbd-server addr.type=unix,addr.path="${SOCK[qsd]}" \
            --export type=nbd,id=exp0,node-name=top,name=disk,writable=on \
            --chardev socket,id=qmp0,path="$WORK/qsd.qmp",server=on,wait=off \
            --monitor chardev=qmp0 > "$WORK/qsd.log" 2>&1 &
        PID[qsd]=$!
        wait_ready qsd
        out=$(json_name "$label" "$mode" 1)
        : > "$WORK/qsd.times"
        if [ "$mode" = snapshots ]; then
            rm -f "$WORK/qsd.stop"
            ( sleep "$BENCH_RAMP"
              qmp_snapshots "$WORK/qsd.qmp" top "$dir" "$WORK/qsd.stop" \
                  "$WORK/qsd.times" ) &
            snapper=$!
        fi
        # shellcheck disable=SC2046  # fio_common is a word list
        run_fio "nbd+unix:///disk?socket=${SOCK[qsd]}" "$out" $(fio_common) \
            --rw=randwrite --bs=4k --iodepth=16 > /dev/null
        if [ "$mode" = snapshots ]; then
            touch "$WORK/qsd.stop"
            wait "$snapper" || :
        fi
        lat=$(fio_lat "$out")
        # shellcheck disable=SC2086
        set -- $lat
        note "snapshot pause, qemu-storage-daemon, 4k randwrite qd16, $mode: $1 IOPS," \
            "clat p99 $2 ms, p99.99 $3 ms, max $4 ms"
        if [ "$mode" = snapshots ]; then
            times=$(grep -v '^error' "$WORK/qsd.times" | sort -n |
                awk '{a[NR]=$1} END {if (NR) printf "%d snapshots, QMP command median %.3f ms, max %.3f ms", NR, a[int((NR+1)/2)], a[NR]; else print "no snapshots taken"}')
            note "snapshot pause, qemu-storage-daemon: $times$(grep '^error' "$WORK/qsd.times" | head -n1 | sed 's/^/; /')"
        fi
        stop_server qsd
        rm -rf "$dir"
    done
}

# depth_read: 4k random reads (qd16) through a chain of 64 layers (63
# snapshots, each layer holding a few written clusters) against the same
# disk at depth 1.  Most reads fall through every layer to the base.
row_depth_read() {
    local label="depth read" cow=$COWCHAIN_BUILDDIR/cowchain depth result i
    cowchain_log "$label"
    for depth in 1 64; do
        rm -rf "$WORK/depthstate"
        start_nbdkit depth "$PLUGIN" base="$BASE" base-format=raw \
            state="$WORK/depthstate" control="$WORK/depth.ctl" \
            cluster-size="$BENCH_CLUSTER"
        for (( i = 1; i < depth; i++ )); do
            qemu-io -f raw -c "write -P $((i % 250)) $(( i * 7919 % (SIZE_MIB - 1) ))M 64k" \
                "$(uri_of depth)" > /dev/null
            "$cow" snapshot --control "$WORK/depth.ctl" "d$i" > /dev/null
        done
        # shellcheck disable=SC2046  # fio_common is a word list
        result=$(run_fio "$(uri_of depth)" "$(json_name "$label" "$depth" 1)" \
            $(fio_common) --rw=randread --bs=4k --iodepth=16)
        # shellcheck disable=SC2086
        set -- $result
        note "depth read, 4k randread qd16 at chain depth $depth: $1 IOPS"
        stop_server depth
    done
}

# memory: the server's peak RSS (VmHWM of the nbdkit process) for a
# BENCH_MEM_SIZE (default 1T) sparse raw base with BENCH_MEM_WRITE
# (default 2G) written as scattered 64k random writes, spread over 1 and
# over 64 layers (a snapshot after each share), then BENCH_RUNTIME seconds
# of 4k random reads over the whole disk; cache-size default (64M).
row_memory() {
    local label="memory" cow=$COWCHAIN_BUILDDIR/cowchain depth i per hwm
    local vsize=${BENCH_MEM_SIZE:-1T} written=${BENCH_MEM_WRITE:-2G} result
    local written_bytes
    written_bytes=$(numfmt --from=iec "$written")
    cowchain_log "$label"
    truncate -s "$vsize" "$WORK/membase.raw"
    for depth in 1 64; do
        rm -rf "$WORK/memstate"
        start_nbdkit mem "$PLUGIN" base="$WORK/membase.raw" base-format=raw \
            state="$WORK/memstate" control="$WORK/mem.ctl" \
            cluster-size="$BENCH_CLUSTER"
        per=$(( written_bytes / depth / 65536 * 65536 ))
        for (( i = 0; i < depth; i++ )); do
            if (( i > 0 )); then
                "$cow" snapshot --control "$WORK/mem.ctl" "m$i" > /dev/null
            fi
            result=$(run_fio "$(uri_of mem)" "$WORK/mem-fill-$depth-$i.json" \
                --rw=randwrite --bs=64k --iodepth=16 --io_size="$per" \
                --randseed=$(( depth * 1000 + i )))
            if [ "$result" = "ERR ERR" ]; then
                echo "error: writing layer $i of the memory row failed" >&2
                return 1
            fi
        done
        # shellcheck disable=SC2046  # fio_common is a word list
        result=$(run_fio "$(uri_of mem)" "$(json_name "$label" "$depth" 1)" \
            $(fio_common) --rw=randread --bs=4k --iodepth=16)
        hwm=$(awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/${PID[mem]}/status")
        # shellcheck disable=SC2086
        set -- $result
        note "memory, $vsize disk, $written scattered over $depth layer(s)," \
            "cache-size 64M: nbdkit peak RSS (VmHWM) $hwm MiB; then 4k randread qd16 $1 IOPS"
        stop_server mem
    done
    rm -f "$WORK/membase.raw"
}

# now_ns: the wall clock in nanoseconds (for spans of seconds).
now_ns() {
    date +%s%N
}

# mbps BYTES NANOSECONDS: the rate in MB/s (10^6 bytes, as fio counts).
mbps() {
    awk -v b="$1" -v ns="$2" 'BEGIN { printf "%.0f", (ns > 0 ? b / (ns / 1e9) / 1e6 : 0) }'
}

# secs NANOSECONDS: in seconds, two places.
secs() {
    awk -v ns="$1" 'BEGIN { printf "%.2f", ns / 1e9 }'
}

# median NUMBER...
median() {
    printf '%s\n' "$@" | sort -g |
        awk '{ a[NR] = $1 } END { print NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# ratio A B: A/B to two places, or "-".
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'
}

# warm_pages: write and delete a scratch file a little larger than the
# disk, then sync the filesystem.  On a virtual machine, page-cache pages
# that were never touched, or that the guest handed back to the host,
# cost several ms per MiB on first use (a 1 GiB commit measured 1.5 s
# right after another file was deleted, 5-6 s without); this leaves the
# same amount of recently freed memory, and no dirty data, before each
# timed operation.
warm_pages() {
    dd if=/dev/zero of="$WORK/warm.tmp" bs=1M count=$((SIZE_MIB + 64)) status=none
    rm -f "$WORK/warm.tmp"
    sync -f "$WORK"
}

# merge_chain NAME: start instance NAME on a new state directory
# $WORK/NAME.state with control socket $WORK/NAME.ctl, and build the chain
#   base <- L1 (snapshot s0, empty) <- L2 (snapshot s1, all BENCH_SIZE
#   written with fio's random buffers) <- L3 (active, empty)
# Sets MERGE_L1 and MERGE_L2 to the paths of L1 and L2.
merge_chain() {
    local name=$1 cow=$COWCHAIN_BUILDDIR/cowchain result
    rm -rf "$WORK/$name.state"
    start_nbdkit "$name" "$PLUGIN" base="$BASE" base-format=raw \
        state="$WORK/$name.state" control="$WORK/$name.ctl" \
        cluster-size="$BENCH_CLUSTER"
    "$cow" snapshot --control "$WORK/$name.ctl" s0 > /dev/null
    result=$(run_fio "$(uri_of "$name")" "$WORK/$name-fill.json" \
        --rw=write --bs=1M --iodepth=16 --size="$SIZE_BYTES")
    if [ "$result" = "ERR ERR" ]; then
        echo "error: filling the layer of $name failed" >&2
        return 1
    fi
    "$cow" snapshot --control "$WORK/$name.ctl" s1 > /dev/null
    # shellcheck disable=SC2046  # two paths without blanks (under $WORK)
    set -- $("$cow" list --control "$WORK/$name.ctl" --output=json |
        "$COWCHAIN_PYTHON" -c '
import json, sys
files = {s["name"]: s["file"] for s in json.load(sys.stdin)["snapshots"]}
print(files["s0"], files["s1"])')
    MERGE_L1=${1:-}
    MERGE_L2=${2:-}
    if [ -z "$MERGE_L2" ]; then
        echo "error: no layer files for s0 and s1 in cowchain list" >&2
        return 1
    fi
}

# merge_speed: how fast a commit merges BENCH_SIZE of data, against
# qemu-img commit of the same chain and cp of a file of that size.  The
# chain is merge_chain's; the timed operations all copy L2's BENCH_SIZE of
# data into a new file or an empty layer:
#   cowchain  `cowchain commit --top s1 --base s0 --force --wait` on the
#             running server (no guest I/O), then `sync L1`; the time
#             includes the tool's start and its 100 ms polling
#   qemu-img  `qemu-img commit -d L2' && sync L1'` on copies L1', L2' of the
#             two layer files (copied and synced before any timing)
#   cp        `cp --reflink=never L2' F && sync F`, on the same filesystem
# Page cache: it is not dropped (that needs root and disturbs everything
# else on a shared machine), so the three start alike instead: every source was freshly written and synced (L2 by
# the fill and the snapshot's flush, L2' by cp and sync), every source is
# fully cached and clean, every destination is new or an empty layer, and
# every timed operation ends with its data on stable storage (the commit
# job flushes L1 before it switches the manifest; qemu-img flushes on
# close; the sync afterwards is there for all three alike), each after
# warm_pages (the same free memory, no dirty data).  Order: cp,
# qemu-img, cowchain.  Rates are BENCH_SIZE / time; median of BENCH_REPEAT
# passes.  On the first pass, qemu-img compare checks that cowchain's
# result reads the same as qemu-img's.
row_merge_speed() {
    local label="merge speed" cow=$COWCHAIN_BUILDDIR/cowchain
    local q=$WORK/merge-qemu pass t0 same=""
    local -a t_cow=() t_qemu=() t_cp=()
    if ! has_server cowchain; then
        note "merge speed: skipped (cowchain is not in BENCH_SERVERS)"
        return 0
    fi
    cowchain_log "$label"
    for pass in $(seq "$BENCH_REPEAT"); do
        merge_chain merge
        # The copies sit next to the state directory so that L1's
        # relative backing name (../base.raw) still finds the base.
        rm -rf "$q"
        mkdir "$q"
        cp --sparse=always --reflink=never "$MERGE_L1" "$q/l1.qcow2"
        cp --sparse=always --reflink=never "$MERGE_L2" "$q/l2.qcow2"
        qemu-img rebase -u -f qcow2 -b l1.qcow2 -F qcow2 "$q/l2.qcow2"
        sync "$q/l1.qcow2" "$q/l2.qcow2"

        warm_pages
        t0=$(now_ns)
        cp --reflink=never "$q/l2.qcow2" "$q/cp.out"
        sync "$q/cp.out"
        t_cp+=($(( $(now_ns) - t0 )))
        rm -f "$q/cp.out"

        warm_pages
        t0=$(now_ns)
        qemu-img commit -q -d -f qcow2 "$q/l2.qcow2"
        sync "$q/l1.qcow2"
        t_qemu+=($(( $(now_ns) - t0 )))

        warm_pages
        t0=$(now_ns)
        "$cow" commit --control "$WORK/merge.ctl" --top s1 --base s0 \
            --force --wait > /dev/null
        sync "$MERGE_L1"
        t_cow+=($(( $(now_ns) - t0 )))
        cowchain_log "$label, pass $pass: cp $(secs "${t_cp[-1]}") s," \
            "qemu-img $(secs "${t_qemu[-1]}") s, cowchain $(secs "${t_cow[-1]}") s"

        if [ "$pass" = 1 ]; then
            same=0
            qemu-img compare -q -U -f qcow2 -F qcow2 \
                "$MERGE_L1" "$q/l1.qcow2" || same=$?
            case $same in
                0) same="reads the same as" ;;
                1) same="does NOT read the same as" ;;
                *) same="could not be compared with" ;;
            esac
        fi
        stop_server merge
        rm -rf "$WORK/merge.state" "$q"
    done
    local cow_r qemu_r cp_r
    cow_r=$(mbps "$SIZE_BYTES" "$(median "${t_cow[@]}")")
    qemu_r=$(mbps "$SIZE_BYTES" "$(median "${t_qemu[@]}")")
    cp_r=$(mbps "$SIZE_BYTES" "$(median "${t_cp[@]}")")
    printf '    %-12s %10s MB/s\n' cowchain "$cow_r" qemu-img "$qemu_r" cp "$cp_r" >&2
    note "merge speed, $BENCH_SIZE layer committed into an empty one: cowchain commit" \
        "$cow_r MB/s, qemu-img commit $qemu_r MB/s, cp $cp_r MB/s;" \
        "cowchain/qemu-img $(ratio "$cow_r" "$qemu_r"), cowchain/cp $(ratio "$cow_r" "$cp_r")"
    note "merge speed: cowchain's merged layer $same qemu-img's (qemu-img compare)"
}

# merge_loop CTL TOP BASE STOPFILE OUT [MAX-STARTS]: keep a commit of
# layer file TOP into layer file BASE running until STOPFILE exists (or
# MAX-STARTS jobs have run): start it, cancel it once it is half done,
# start it again.  A cancelled job leaves the chain's layers as they were
# (BASE's snapshot name goes when the first job starts, hence file
# names); a completed one would end the experiment (TOP leaves the chain).
# An unlimited commit of 1 GiB lasts well under a second here and one run
# of the cowchain tool takes 40-70 ms on a loaded machine, so the loop
# speaks the control protocol (cow/control.h) itself and polls the job
# every 10 ms.  Writes JSON to OUT: seconds, bytes copied (the jobs'
# DONE), starts, the fraction of the time a job was running, and whether
# a job completed (and when) or something failed.
merge_loop() {
    "$COWCHAIN_PYTHON" - "$@" <<'PY'
import json, os, re, socket, sys, time
from urllib.parse import unquote
ctl, top, base, stop, out = sys.argv[1:6]
max_starts = int(sys.argv[6]) if len(sys.argv) > 6 else 0
for w in (top, base):
    if not re.fullmatch(r"[A-Za-z0-9._][A-Za-z0-9._-]*", w):
        sys.exit("merge_loop: layer name %r would need encoding" % w)

def ask(*words):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(ctl)
        s.sendall((" ".join(words) + "\n").encode())
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    lines = data.decode().split("\n")
    if lines[0] != "ok":
        w = lines[0].split(" ")
        raise RuntimeError("%s: %s" % (words[0], unquote(w[-1]) if len(w) > 2 else lines[0]))
    return lines[1:lines.index(".")]

def job():
    """(STATE, DONE, TOTAL, MESSAGE) of the default disk's job."""
    for line in ask("jobs", "-"):
        w = line.split(" ")
        if w[0] == "job" and len(w) >= 14:
            return w[3], int(w[6]), int(w[7]), unquote(w[13])
    raise RuntimeError("jobs: no job line in the reply")

t0 = time.monotonic()
res = {"bytes": 0, "starts": 0, "busy": 0.0, "completed_at": None, "error": None}
try:
    while True:
        ask("commit", "-", top, base, "force", "0")
        t_start = time.monotonic()
        res["starts"] += 1
        cancelled = False
        while True:
            time.sleep(0.01)
            state, done, total, msg = job()
            if state not in ("running", "paused"):
                break
            if not cancelled and (os.path.exists(stop) or 2 * done >= total):
                ask("job-cancel", "-")
                cancelled = True
        res["busy"] += time.monotonic() - t_start
        res["bytes"] += done
        if state == "completed":
            res["completed_at"] = time.monotonic() - t0
            break
        if state != "cancelled":
            raise RuntimeError("the job %s: %s" % (state, msg))
        if os.path.exists(stop) or res["starts"] == max_starts:
            break
except (OSError, RuntimeError, ValueError) as e:
    res["error"] = str(e)
res["seconds"] = time.monotonic() - t0
with open(out, "w") as f:
    json.dump(res, f)
PY
}

# merge_summary OUT: "MB/s STARTS BUSY% STATUS" of a merge_loop, STATUS
# one word (underscores for blanks).
merge_summary() {
    "$COWCHAIN_PYTHON" - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
if r["error"]:
    status = "failed:_" + "_".join(r["error"].split())
elif r["completed_at"] is not None:
    status = "a_job_completed_after_%.1f_s,_no_merge_after_that" % r["completed_at"]
else:
    status = "ran_throughout"
print("%.0f %d %.0f %s" % (r["bytes"] / r["seconds"] / 1e6, r["starts"],
                           100 * r["busy"] / r["seconds"], status))
PY
}

# mio_chain: make sure instance "mio" serves merge_chain's chain with its
# L2 still in place (a completed job removes it), building it again, with
# a warm-up job (below), if not.  Sets MIO_TOP and MIO_BASE (layer file
# names), and MIO_BUILT to 1 if the chain was (re)built, else 0.
mio_chain() {
    local list=""
    MIO_BUILT=0
    if [ -n "${PID[mio]:-}" ]; then
        list=$("$COWCHAIN_BUILDDIR/cowchain" list --control "$WORK/mio.ctl" \
            --output=json) || list=""
        if "$COWCHAIN_PYTHON" -c '
import json, sys
sys.exit(not any(s["file"] == sys.argv[1] for s in json.load(sys.stdin)["snapshots"]))' \
                "$MERGE_L2" <<< "$list" 2> /dev/null; then
            return 0
        fi
        stop_server mio
    fi
    merge_chain mio
    MIO_TOP=$(basename "$MERGE_L2")
    MIO_BASE=$(basename "$MERGE_L1")
    MIO_BUILT=1
    rm -f "$WORK/mio.stop"
    merge_loop "$WORK/mio.ctl" "$MIO_TOP" "$MIO_BASE" "$WORK/mio.stop" \
        "$WORK/mio-warmup.json" 1
}

# mio_prepare RW PASS: mio_chain, and for randwrite fill the active layer
# (on PASS 1, or when the chain was built again).
mio_prepare() {
    local result
    mio_chain
    if [ "$1" = randwrite ] && { [ "$MIO_BUILT" = 1 ] || [ "$2" = 1 ]; }; then
        result=$(run_fio "$(uri_of mio)" "$WORK/mio-prefill.json" \
            --rw=write --bs=1M --iodepth=16 --size="$SIZE_BYTES")
        if [ "$result" = "ERR ERR" ]; then
            echo "error: filling the active layer of mio failed" >&2
            return 1
        fi
    fi
}

# merge_iops: what a running merge costs the guest.  On merge_chain's
# chain, fio 4k randread qd16 and 4k randwrite qd16 (BENCH_RUNTIME s
# each, after BENCH_RAMP s), with no job and then while merge_loop
# commits L2 into L1 over and over (an unlimited BENCH_SIZE commit lasts
# about a second, far less than fio), BENCH_REPEAT such pairs (medians).
# A warm-up job first allocates the clusters of L1 that the loop's jobs
# then overwrite, so that every measured job copies alike, at the copy's
# fastest: the harshest case for the guest.  The reads find the active
# layer empty and read L2, the layer the commit is reading; before the
# randwrite runs the active layer is filled once, so that both randwrite
# runs overwrite allocated clusters.  Every measured run starts after
# `sync -f` (no dirty data left from the run before).  Reports idle and
# during-merge IOPS and their ratio, and the merge's rate (bytes copied /
# time) during fio against the same loop with no guest I/O (run once,
# as long as one fio run); "busy" is the share of the time a job was
# running (the rest is the loop's restarts).  If a job completes anyway,
# a note says when, and the chain is built again for the next run.
row_merge_iops() {
    local label="merge iops" ctl=$WORK/mio.ctl rw pass mode looper out
    local alone_mbps starts busy_pct result i m r warm order mbps n busy status
    local -a idle=() merge=() rate=()
    if ! has_server cowchain; then
        note "merge iops: skipped (cowchain is not in BENCH_SERVERS)"
        return 0
    fi
    cowchain_log "$label"

    mio_chain
    warm=$(merge_summary "$WORK/mio-warmup.json")
    if [ "${warm##* }" != ran_throughout ]; then
        warm=${warm##* }
        note "merge iops: skipped, the warm-up job was not stopped half way" \
            "(${warm//_/ }); a commit of BENCH_SIZE=$BENCH_SIZE may take less" \
            "than the loop's 10 ms poll: use a larger BENCH_SIZE"
        stop_server mio
        rm -rf "$WORK/mio.state"
        return 0
    fi

    # The merge alone, as long as one fio run lasts.
    rm -f "$WORK/mio.stop"
    sync -f "$WORK"
    merge_loop "$ctl" "$MIO_TOP" "$MIO_BASE" "$WORK/mio.stop" "$WORK/mio-alone.json" &
    looper=$!
    sleep $((BENCH_RUNTIME + BENCH_RAMP))
    touch "$WORK/mio.stop"
    wait "$looper"
    read -r alone_mbps n busy status < <(merge_summary "$WORK/mio-alone.json")
    note "merge iops: commit loop with no guest I/O: $alone_mbps MB/s" \
        "($n starts, busy $busy%, ${status//_/ })"

    for rw in randread randwrite; do
        idle=() merge=() rate=() starts=0 busy_pct=100
        for pass in $(seq "$BENCH_REPEAT"); do
            mio_prepare "$rw" "$pass"
            # Odd passes measure idle first, even ones the merge first.
            order="idle merge"
            if [ $((pass % 2)) = 0 ]; then
                order="merge idle"
            fi
            for mode in $order; do
                sync -f "$WORK"
                if [ "$mode" = merge ]; then
                    rm -f "$WORK/mio.stop"
                    out=$WORK/mio-$rw-$pass.json
                    merge_loop "$ctl" "$MIO_TOP" "$MIO_BASE" "$WORK/mio.stop" "$out" &
                    looper=$!
                fi
                # shellcheck disable=SC2046  # fio_common is a word list
                result=$(run_fio "$(uri_of mio)" \
                    "$(json_name "$label" "$rw-$mode" "$pass")" \
                    $(fio_common) --rw="$rw" --bs=4k --iodepth=16)
                if [ "$mode" = idle ]; then
                    idle+=("${result%% *}")
                    continue
                fi
                merge+=("${result%% *}")
                touch "$WORK/mio.stop"
                wait "$looper"
                read -r mbps n busy status < <(merge_summary "$out")
                rate+=("$mbps")
                starts=$((starts + n))
                if [ "$busy" -lt "$busy_pct" ]; then
                    busy_pct=$busy
                fi
                if [ "$status" != ran_throughout ]; then
                    note "merge iops, 4k $rw pass $pass: ${status//_/ }"
                    mio_prepare "$rw" 0     # build it again for what follows
                fi
            done
            printf '    %-12s %10s IOPS idle %10s IOPS during merge (%s MB/s)\n' \
                "$rw" "${idle[-1]}" "${merge[-1]}" "${rate[-1]}" >&2
        done
        i=$(median "${idle[@]}")
        m=$(median "${merge[@]}")
        r=$(median "${rate[@]}")
        note "merge iops, 4k $rw qd16: idle $i IOPS, during merge $m IOPS," \
            "ratio $(ratio "$m" "$i"); merge meanwhile $r MB/s ($starts starts," \
            "busy >= $busy_pct%), $(ratio "$r" "$alone_mbps") of its rate alone"
    done
    stop_server mio
    rm -rf "$WORK/mio.state"
}

# active_commit: what an active commit costs the guest.  On a state
# directory whose active layer holds BENCH_SIZE (fio fills it after a
# snapshot s1), fio 4k randwrite qd16, once with no job and once while
# `cowchain commit --top active --force` merges the active layer into
# s1's (started after BENCH_RAMP s; its final switch holds guest I/O).
# Reports IOPS, p99 and max write latency of both runs, their ratios,
# and whether the commit completed while fio ran (and after how long):
# if not, its final switch was not measured.  Both runs last at least
# 30 s (BENCH_RUNTIME if longer), so that a commit slowed down by the
# guest's writes still ends inside the run.
row_active_commit() {
    local label="active commit" cow=$COWCHAIN_BUILDDIR/cowchain mode out lat
    local -a idle=() busy=()
    local result t0 status waiter runtime=$(( BENCH_RUNTIME > 30 ? BENCH_RUNTIME : 30 ))
    if ! has_server cowchain; then
        note "active commit: skipped (cowchain is not in BENCH_SERVERS)"
        return 0
    fi
    cowchain_log "$label"
    for mode in idle commit; do
        rm -rf "$WORK/ac.state"
        start_nbdkit ac "$PLUGIN" base="$BASE" base-format=raw \
            state="$WORK/ac.state" control="$WORK/ac.ctl" \
            cluster-size="$BENCH_CLUSTER"
        "$cow" snapshot --control "$WORK/ac.ctl" s1 > /dev/null
        result=$(run_fio "$(uri_of ac)" "$WORK/ac-fill.json" \
            --rw=write --bs=1M --iodepth=16 --size="$SIZE_BYTES")
        if [ "$result" = "ERR ERR" ]; then
            echo "error: filling the active layer of ac failed" >&2
            return 1
        fi
        sync -f "$WORK"
        out=$(json_name "$label" "$mode" 1)
        if [ "$mode" = commit ]; then
            rm -f "$WORK/ac.status"
            (
                sleep "$BENCH_RAMP"
                t0=$(now_ns)
                if "$cow" commit --control "$WORK/ac.ctl" --top active --force \
                        > /dev/null 2> "$WORK/ac.err" &&
                        "$cow" wait --control "$WORK/ac.ctl" 2>> "$WORK/ac.err"; then
                    echo "completed in $(secs $(( $(now_ns) - t0 ))) s" > "$WORK/ac.status"
                else
                    echo "FAILED: $(tr '\n' ' ' < "$WORK/ac.err")" > "$WORK/ac.status"
                fi
            ) &
            waiter=$!
        fi
        run_fio "$(uri_of ac)" "$out" --time_based --runtime="$runtime" \
            --ramp_time="$BENCH_RAMP" --rw=randwrite --bs=4k --iodepth=16 > /dev/null
        if [ "$mode" = commit ]; then
            # Done by the end of fio?  Then wait for the verdict.
            if [ -s "$WORK/ac.status" ]; then
                status="$(cat "$WORK/ac.status") (before fio ended)"
            else
                wait "$waiter" || :
                status="$(cat "$WORK/ac.status" 2> /dev/null || echo "no verdict") (after fio ended: its final switch is not in the figures)"
            fi
            wait "$waiter" 2> /dev/null || :
        fi
        lat=$(fio_lat "$out")
        # shellcheck disable=SC2086
        set -- $lat
        if [ "$mode" = idle ]; then
            idle=("$@")
        else
            busy=("$@")
        fi
        stop_server ac
    done
    note "active commit, 4k randwrite qd16, no job: ${idle[0]} IOPS, clat p99" \
        "${idle[1]} ms, max ${idle[3]} ms"
    note "active commit, 4k randwrite qd16, during an active commit of" \
        "$BENCH_SIZE: ${busy[0]} IOPS, clat p99 ${busy[1]} ms, max ${busy[3]} ms;" \
        "ratios IOPS $(ratio "${busy[0]}" "${idle[0]}"), p99" \
        "$(ratio "${busy[1]}" "${idle[1]}"), max $(ratio "${busy[3]}" "${idle[3]}")"
    note "active commit: $status"
    rm -rf "$WORK/ac.state"
}

#----------------------------------------------------------------------
# Table.

print_table() {
    "$COWCHAIN_PYTHON" - "$RESULTS" <<'EOF'
import statistics, sys
rows, res = [], {}
with open(sys.argv[1]) as f:
    for line in f:
        row, server, iops, mbps = line.rstrip("\n").split("\t")
        if row not in rows:
            rows.append(row)
        res.setdefault((row, server), []).append((iops, mbps))

def num(row, server, i):
    """Median over the passes; None if missing or any pass failed."""
    try:
        return statistics.median(float(r[i]) for r in res[row, server])
    except (KeyError, ValueError):
        return None

def show(v, fmt):
    return "-" if v is None else fmt % v

def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b

head = ("row", "cowchain IOPS", "MB/s", "qemu-nbd IOPS", "nbdkit-file IOPS",
        "cow/qemu-nbd", "cow/file")
table = [head]
for row in rows:
    c = num(row, "cowchain", 0)
    q = num(row, "qemu-nbd", 0)
    f = num(row, "nbdkit-file", 0)
    table.append((row, show(c, "%.0f"), show(num(row, "cowchain", 1), "%.1f"),
                  show(q, "%.0f"), show(f, "%.0f"),
                  show(ratio(c, q), "%.2f"), show(ratio(c, f), "%.2f")))
widths = [max(len(r[i]) for r in table) for i in range(len(head))]
for n, r in enumerate(table):
    print("  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i])
                    for i in range(len(r))))
    if n == 0:
        print("  ".join("-" * w for w in widths))
EOF
}

#----------------------------------------------------------------------
# Main.

cowchain_log "bench directory: $WORK"
cowchain_log "base: $BENCH_SIZE of random data"
dd if=/dev/urandom of="$BASE" bs=1M count="$SIZE_MIB" status=none
if [ "$SIZE_BYTES" -ne $((SIZE_MIB * 1048576)) ]; then
    truncate -s "$SIZE_BYTES" "$BASE"
fi

for server in "${SERVERS[@]}"; do
    case $server in
        cowchain) start_cowchain cowchain "$WORK/cowchain.qcow2" ;;
        qemu-nbd) start_qemu_nbd qemu-nbd "$WORK/qemu-nbd.qcow2" ;;
        nbdkit-file)
            cp --reflink=auto "$BASE" "$WORK/file.raw"
            start_nbdkit_file nbdkit-file "$WORK/file.raw"
            ;;
    esac
done

# Prefill: one sequential pass over each overlay, so that the read and
# write rows hit clusters already allocated in the overlay (not the base).
for server in "${SERVERS[@]}"; do
    case $server in
        cowchain | qemu-nbd)
            cowchain_log "prefill $server overlay (${BENCH_SIZE})"
            result=$(run_fio "$(uri_of "$server")" "$WORK/prefill-$server.json" \
                --rw=write --bs=1M --iodepth=16 --size="$SIZE_BYTES")
            if [ "$result" = "ERR ERR" ]; then
                echo "error: prefill of $server failed" >&2
                exit 1
            fi
            ;;
    esac
done

for row in "${ROWS[@]}"; do
    if ! declare -F "row_$row" > /dev/null; then
        echo "error: no such row '$row' (BENCH_ROWS)" >&2
        exit 1
    fi
    "row_$row"
done

echo
echo "cowchain bench: size $BENCH_SIZE, ${BENCH_RUNTIME}s per job (+${BENCH_RAMP}s ramp)," \
    "median of $BENCH_REPEAT pass(es), cluster $BENCH_CLUSTER, $(nproc) CPUs"
echo "versions: $(nbdkit --version | head -n1); $(qemu-nbd --version | head -n1);" \
    "$(fio --version); cowchain $(git -C "$COWCHAIN_SRCDIR" describe --always --dirty 2>/dev/null || echo '?')"
echo "Reads and writes hit clusters already allocated in the overlays (prefilled);"
echo "'fresh' rows write into a new empty overlay (nbdkit-file: a new sparse raw file)."
echo "All files are in the page cache; the numbers measure the servers, not the disk."
echo
print_table
if [ -s "$NOTES" ]; then
    echo
    cat "$NOTES"
fi
if [ -n "${BENCH_RESULTS:-}" ]; then
    cp "$RESULTS" "$BENCH_RESULTS"
fi
