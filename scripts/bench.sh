#!/usr/bin/env bash
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
# Environment:
#   BENCH_SIZE      virtual disk size, K/M/G suffixes (default 1G)
#   BENCH_RUNTIME   seconds per fio job, time based (default 10)
#   BENCH_RAMP      fio ramp_time seconds, not measured (default 2)
#   BENCH_REPEAT    passes over the servers per row; the table shows the
#                   median (default 1; 3 or 5 steadies a noisy machine)
#   BENCH_CLUSTER   cluster size of both qcow2 overlays (default 64K)
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
    start_nbdkit "$1" "$PLUGIN" base="$BASE" base-format=raw overlay="$2" \
        cluster-size="$BENCH_CLUSTER"
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
            cluster-size="$BENCH_CLUSTER"
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
            qemu-io -f raw -c "write -P $((i % 250)) $(( (i * 7919 % (SIZE_MIB - 1)) ))M 64k" \
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
