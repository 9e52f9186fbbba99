#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Errors lose nothing: a restart matrix.
#
#   base     raw file | qcow2 with its own backing chain (qcow2 -> qcow2
#            -> raw, built by qemu-img) | remote NBD export (a second,
#            plain nbdkit serving a raw file read-only)
# x state    no snapshot | two snapshots | after commit --top | after
#            pull --base | after delete | after a revert | after offline
#            (--state) delete, commit, snapshot, pull, revert | after an
#            active commit | after pull without --base (self-contained)
# x stop     clean (SIGTERM by PID, wait for exit) | kill -9
#
# Each (base, stop) pair is one disk that goes through the states in that
# order, its jobs run to their end (--wait).  Every state ends with guest
# writes, flushed, then a few that are not, then the stop.  After each
# stop, on the stopped state directory:
#   - the manifest names the base, exactly the layer files of the
#     directory, and the expected snapshots;
#   - cowchain list --state (JSON, table, tree) lists those snapshots on
#     the manifest's files;
#   - qemu-img check and cowchain check pass on every layer and agree
#     (exit 0; exit 3, leaked clusters only, accepted after kill -9);
#   - qemu-img info --backing-chain of the active layer is the manifest's
#     chain, then the base's own chain; cowchain info --backing-chain
#     finds the same files (it stops at a URL);
#   - qemu-img convert of the active layer equals the model of the disk
#     (a raw file given the same writes): after SIGTERM every write, after
#     kill -9 every flushed write, and each unflushed one all there or not
#     at all;
#   - qemu-img convert of each snapshot's frozen layer equals the model
#     saved when the snapshot was taken.
# (A layer file, or a snapshot's chain of files, unchanged since it was
# last checked is not checked again.)  Then the disk restarts (after
# SIGTERM with the same command line, after kill -9 with state= alone) and
# must read over NBD exactly as the model; cowchain list, status and
# blklist agree with the manifest, and no job runs.  The NBD base server
# stays up throughout, so qemu-img can open the chains that end in it.
# Last, no base file was written.
#
# The NBD rows cover a disk on a remote base reopened with snapshots (once
# a SIGSEGV at open), by the server and by the offline list, delete,
# commit, snapshot, pull and revert.
. "${abs_top_srcdir:-$(dirname "$0")/..}/tests/functions.sh"

requires nbdkit qemu-img qemu-io
requires_python_nbd

cow=$abs_top_builddir/cowchain
[ -x "$cow" ] || fail "cowchain tool not built: $cow"
size=$(( 8 << 20 ))

#----------------------------------------------------------------------
# The helper: guest writes, offline and online checks.

cat > "$tmpdir/rm.py" <<'EOF'
import json, os, re, subprocess, sys, urllib.parse
sys.path.insert(0, os.environ["testsdir"])
# libnbd's module (and cowtest, which imports it) only where needed: the
# offline checks run without it, a little faster.

COW = os.environ["COW"]


def die(msg):
    sys.exit("restart-matrix: " + msg)


def connect(uri):
    import cowtest
    return cowtest.connect(uri)


def describe_diff(*args):
    import cowtest
    return cowtest.describe_diff(*args)


def patch(path, off, data):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def pread(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


# same_files A B WHAT: byte for byte, 1 MiB at a time (large buffers are
# slow to allocate in some VMs); else fail naming the first difference.
def same_files(a, b, what):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                die(describe_diff(x, y, off, what) or
                    "%s: lengths differ at %d" % (what, off))
            if not x:
                return
            off += len(x)


# run ARGV: its exit status must be in OK.  In the sanitizer build the
# cowchain tool's LeakSanitizer check at exit doubles the cost of each of
# the several hundred inspection commands here: it is left on (leaks=True)
# for the first offline open of each state, off for the others.
def run(argv, ok=(0,), env=None, leaks=False):
    if argv[0] == COW and not leaks:
        env = dict(env if env is not None else os.environ)
        env["ASAN_OPTIONS"] = (env["ASAN_OPTIONS"] + ":" if env.get("ASAN_OPTIONS")
                               else "") + "detect_leaks=0"
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, env=env)
    if argv[0] == COW and re.search(r"runtime error:|ERROR: \w+Sanitizer",
                                    p.stderr):
        die("%s: sanitizer report:\n%s" % (" ".join(argv), p.stderr))
    if p.returncode not in ok:
        how = ("killed by signal %d" % -p.returncode if p.returncode < 0
               else "exit status %d" % p.returncode)
        die("%s: %s\n--- stdout\n%s--- stderr\n%s"
            % (" ".join(argv), how, p.stdout, p.stderr))
    return p


# write URI MODEL SEED [PENDING]: guest writes (random offsets and lengths,
# a whole cluster, a write-zeroes), FLUSH; the model gets the same.  With
# PENDING: then a few writes that are never flushed, each inside one 4K
# page, recorded (offset, old, new) in PENDING for `offline` to resolve.
def write(uri, model_path, seed, pending=None):
    import random
    size = os.path.getsize(model_path)
    rng = random.Random(seed)
    h = connect(uri)
    # Written to the model only once the disk has them all: a failed
    # write leaves the model as it was.
    done = []
    for _ in range(4):
        off = rng.randrange(size - 1)
        n = min(rng.randint(1, 150000), size - off)
        data = rng.randbytes(n)
        h.pwrite(data, off)
        done.append((off, data))
    off = rng.randrange(size >> 16) << 16
    data = bytes([seed % 251 + 1]) * 65536
    h.pwrite(data, off)
    done.append((off, data))
    off = rng.randrange(size - 200000)
    n = rng.randint(1, 200000)
    h.zero(n, off)
    done.append((off, bytes(n)))
    h.flush()
    for off, data in done:
        patch(model_path, off, data)
    if pending:
        pages, recs = set(), []
        while len(recs) < 4:
            page = rng.randrange(size // 4096)
            if page in pages:
                continue
            pages.add(page)
            lo = rng.randrange(4096)
            hi = rng.randint(lo + 1, 4096)
            off = page * 4096 + lo
            data = rng.randbytes(hi - lo)
            h.pwrite(data, off)
            recs.append([off, pread(model_path, off, len(data)).hex(),
                         data.hex()])
        with open(pending, "w") as f:
            json.dump(recs, f)
    h.shutdown()


def manifest(statedir):
    base, fmt, nobase, layers = None, None, False, []
    with open(os.path.join(statedir, "manifest")) as f:
        for line in f:
            w = line.split()
            if not w:
                continue
            if w[0] == "base":
                base, fmt = urllib.parse.unquote(w[1]), w[2]
            elif w[0] == "nobase":
                nobase = True
            elif w[0] == "layer":
                name = urllib.parse.unquote(w[3])
                layers.append((urllib.parse.unquote(w[1]),
                               None if name == "-" else name))
    return base, fmt, nobase, layers


def same_nbd(a, b):
    ua, ub = urllib.parse.urlsplit(a), urllib.parse.urlsplit(b)
    return (ua.scheme == ub.scheme and ua.netloc == ub.netloc
            and ua.path.lstrip("/") == ub.path.lstrip("/")
            and urllib.parse.parse_qs(ua.query) == urllib.parse.parse_qs(ub.query))


def same_file(a, b):
    if "://" in a or "://" in b:
        return "://" in a and "://" in b and same_nbd(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def list_json(args, env=None, leaks=False):
    return json.loads(run([COW, "list", "--output=json"] + args, env=env,
                          leaks=leaks).stdout)["snapshots"]


# What was checked already, by the identity of the files it depends on
# (inode, size, mtime, ctime): a frozen layer that did not change since
# the last cell is not checked again.
class Cache:
    def __init__(self, path):
        self.path = path
        try:
            with open(path) as f:
                self.done = set(json.load(f))
        except FileNotFoundError:
            self.done = set()

    @staticmethod
    def key(what, files):
        ids = []
        for f in files:
            if "://" in f:
                ids.append(f)
            else:
                st = os.stat(f)
                ids.append("%s:%d:%d:%d:%d" % (os.path.realpath(f), st.st_ino,
                                               st.st_size, st.st_mtime_ns,
                                               st.st_ctime_ns))
        return what + "|" + "|".join(ids)

    def save(self):
        with open(self.path + ".tmp", "w") as f:
            json.dump(sorted(self.done), f)
        os.rename(self.path + ".tmp", self.path)


# list_forms STATEDIR NAMES: the table and the tree of list --state.
def list_forms(statedir, names):
    where = statedir + ": "
    table = run([COW, "list", "--state", statedir]).stdout
    rows = [l.split()[0] for l in table.splitlines()[2:] if l.strip()]
    if rows != names:
        die(where + "list --state table rows %s, expected %s:\n%s" % (rows, names, table))
    tree = run([COW, "list", "--tree", "--state", statedir]).stdout
    for n in names + ["(current)"]:
        if not re.search(r"(^|\s)" + re.escape(n) + r"$", tree, re.M):
            die(where + "list --tree --state lacks %s:\n%s" % (n, tree))


# offline STATEDIR MODEL SNAPDIR PENDING STRICT LEAKS_OK FORMS BASE BASEFMT
#         BASECHAIN NAMES...
# Every offline check of a stopped disk (see the top of the test).
# BASECHAIN: the base and the files under it, comma-separated.
def offline(statedir, model_path, snapdir, pending, strict, leaks_ok,
            forms, want_base, want_fmt, base_chain, names):
    base, fmt, nobase, layers = manifest(statedir)
    files = [f for f, _ in layers]
    where = statedir + ": "

    # The manifest: its base, its layer files, its names.
    if nobase:
        base_chain = []
        if base is not None:
            die(where + "manifest has both nobase and a base")
    elif base is None:
        die(where + "the manifest names no base")
    elif not same_file(base, want_base) or fmt != want_fmt:
        die(where + "manifest base %s (%s), expected %s (%s)"
            % (base, fmt, want_base, want_fmt))
    on_disk = sorted(f for f in os.listdir(statedir) if f.startswith("layer-"))
    if on_disk != sorted(files):
        die(where + "layer files %s, the manifest names %s" % (on_disk, files))
    got_names = [n for _, n in layers if n is not None]
    if got_names != names:
        die(where + "manifest snapshots %s, expected %s" % (got_names, names))
    if layers[-1][1] is not None:
        die(where + "the active layer has a snapshot name")

    # cowchain list --state: JSON, table, tree.
    v = list_json(["--state", statedir], leaks=True)
    if [s["name"] for s in v] != names:
        die(where + "list --state: %s, expected %s" % ([s["name"] for s in v], names))
    byname = {n: f for f, n in layers if n is not None}
    for s in v:
        if not same_file(s["file"], os.path.join(statedir, byname[s["name"]])):
            die(where + "list --state: %s on %s, the manifest says %s"
                % (s["name"], s["file"], byname[s["name"]]))
    if forms:
        list_forms(statedir, names)

    # qemu-img check and cowchain check of every layer.
    cache = Cache(os.path.join(os.path.dirname(snapdir), "checked.json"))
    allowed = (0, 3) if leaks_ok else (0,)
    for f in files:
        path = os.path.join(statedir, f)
        key = Cache.key("check%r" % (allowed,), [path])
        if key in cache.done:
            continue
        q = run(["qemu-img", "check", "-f", "qcow2", path], ok=allowed)
        c = run([COW, "check", path], ok=allowed)
        if q.returncode != c.returncode:
            die("%s: qemu-img check exit %d, cowchain check exit %d\n%s%s%s%s"
                % (path, q.returncode, c.returncode, q.stdout, q.stderr,
                   c.stdout, c.stderr))
        cache.done.add(key)

    # The chain, as qemu-img and as cowchain info see it.
    active = os.path.join(statedir, files[-1])
    chain = json.loads(run(["qemu-img", "info", "--backing-chain",
                            "--output=json", active]).stdout)
    got = [i["filename"] for i in chain]
    want = [os.path.join(statedir, f) for f in reversed(files)] + base_chain
    if len(got) != len(want) or not all(map(same_file, got, want)):
        die("qemu-img info --backing-chain %s:\n  got  %s\n  want %s"
            % (active, got, want))
    for i, img in enumerate(chain[:len(files)]):
        want_bfmt = ("qcow2" if i < len(files) - 1
                     else None if nobase else fmt)
        if img.get("backing-filename-format") != want_bfmt:
            die("%s: backing format %s, expected %s"
                % (img["filename"], img.get("backing-filename-format"), want_bfmt))
        if img["virtual-size"] != os.path.getsize(model_path):
            die("%s: virtual size %d" % (img["filename"], img["virtual-size"]))
    cinfo = json.loads(run([COW, "info", "--backing-chain", "--output=json",
                            active]).stdout)
    cgot = [i["filename"] for i in cinfo]
    # cowchain info never opens URLs: with an NBD base it stops at the
    # layer naming it.
    cwant = [w for w in want if "://" not in w]
    if len(cgot) != len(cwant) or not all(map(same_file, cgot, cwant)):
        die("cowchain info --backing-chain %s:\n  got  %s\n  want %s"
            % (active, cgot, cwant))

    # The disk, read by qemu-img, is the model (unflushed writes resolved).
    raw = statedir + ".convert.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", active, raw])
    if os.path.exists(pending):
        with open(pending) as f:
            recs = json.load(f)
        for off, old, new in recs:
            old, new = bytes.fromhex(old), bytes.fromhex(new)
            now = pread(raw, off, len(new))
            if now == new:
                patch(model_path, off, new)
            elif now != old or strict:
                die("%s: unflushed write at %d (%d bytes) is %s after the stop: %s"
                    % (active, off, len(new),
                       "lost" if now == old else "neither old nor new",
                       describe_diff(now, new, off)))
        os.unlink(pending)
    same_files(raw, model_path, "qemu-img convert of the active layer %s" % active)
    os.unlink(raw)

    # Each snapshot's frozen layer holds the disk as it was then.
    local_base = [b for b in base_chain if "://" not in b]
    for i, (f, n) in enumerate(layers):
        if n is None:
            continue
        path = os.path.join(statedir, f)
        snapmodel = os.path.join(snapdir, n + ".raw")
        key = Cache.key("snapshot", [snapmodel] + local_base +
                        [os.path.join(statedir, g) for g, _ in layers[:i + 1]])
        if key in cache.done:
            continue
        run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw])
        same_files(raw, snapmodel,
                   "snapshot %s (qemu-img convert of %s)" % (n, path))
        os.unlink(raw)
        cache.done.add(key)
    cache.save()


# online URI MODEL STATEDIR CONTROL NAMES...: the running disk reads as
# the model; list, status and blklist agree with the manifest; no job.
def online(uri, model_path, statedir, control, names):
    h = connect(uri)
    size = h.get_size()
    if size != os.path.getsize(model_path):
        die("the disk's size is %d, expected %d" % (size, os.path.getsize(model_path)))
    with open(model_path, "rb") as f:
        for off in range(0, size, 1 << 20):
            n = min(1 << 20, size - off)
            got, want = h.pread(n, off), f.read(n)
            if got != want:
                die(describe_diff(got, want, off,
                                  "the disk read over NBD after the restart"))
    h.shutdown()
    env = dict(os.environ, COWCHAIN_CONTROL=control)
    base, fmt, nobase, layers = manifest(statedir)
    active = os.path.join(statedir, layers[-1][0])
    v = list_json([], env)
    if [s["name"] for s in v] != names:
        die("cowchain list: %s, expected %s" % ([s["name"] for s in v], names))
    # Disk, Layers, [State,] Active layer, Base.
    st = run([COW, "status"], env=env).stdout
    head = [l.split() for l in st.splitlines() if l.startswith(" Disk ")]
    rows = [l.split() for l in st.splitlines() if l.startswith(" (default)")]
    if len(head) != 1 or len(rows) != 1 or rows[0][1] != str(len(layers)) \
            or not any(same_file(w, active) for w in rows[0][2:]):
        die("cowchain status does not show %d layers, active %s:\n%s"
            % (len(layers), active, st))
    if "State" in head[0] and rows[0][head[0].index("State")] != "ok":
        die("cowchain status: the disk's state is not ok:\n%s" % st)
    if not nobase and not same_file(rows[0][-1], base):
        die("cowchain status does not show the base %s:\n%s" % (base, st))
    bl = run([COW, "blklist"], env=env).stdout
    rows = [l.split() for l in bl.splitlines() if l.startswith("(default)")
            or l.startswith(" (default)")]
    if len(rows) != 1 or not same_file(rows[0][1], active):
        die("cowchain blklist does not show the active layer %s:\n%s" % (active, bl))
    jobs = json.loads(run([COW, "jobs", "--output=json"], env=env).stdout)["jobs"]
    if any(j.get("state") not in ("none", None) for j in jobs):
        die("a job after the restart: %r" % jobs)


def dispatch(cmd, a):
    if cmd == "write":
        write(a[0], a[1], int(a[2]), a[3] if len(a) > 3 else None)
    elif cmd == "offline":
        offline(a[0], a[1], a[2], a[3], a[4] == "1", a[5] == "1", a[6] == "1",
                a[7], a[8], [x for x in a[9].split(",") if x], a[10:])
    elif cmd == "online":
        online(a[0], a[1], a[2], a[3], a[4:])
    else:
        die("unknown command " + cmd)


# serve: run commands read from stdin, one a line, arguments separated by
# \x1f; answer each with a line "ok" or "fail" (the reason on stderr).
# One process for the whole test instead of one for each of some 250
# calls: Python's start-up was a third of the test's CPU time.
def serve():
    import traceback
    for line in sys.stdin:
        args = line.rstrip("\n").split("\x1f")
        if args[-1] == "":
            args.pop()
        try:
            dispatch(args[0], args[1:])
            reply = "ok"
        except SystemExit as e:
            print(e.code, file=sys.stderr)
            reply = "fail"
        except Exception:
            traceback.print_exc()
            reply = "fail"
        sys.stderr.flush()
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()


if sys.argv[1] == "serve":
    serve()
else:
    dispatch(sys.argv[1], sys.argv[2:])
EOF
export COW=$cow
coproc RMPY { exec "$PYTHON" "$tmpdir/rm.py" serve; }

# rmpy COMMAND ARGS...: one command of the helper; false if it failed.
rmpy ()
{
    local reply
    { printf '%s\x1f' "$@"; printf '\n'; } >&"${RMPY[1]}"
    read -r reply <&"${RMPY[0]}" || fail "the Python helper died"
    [ "$reply" = ok ]
}

#----------------------------------------------------------------------
# The bases.

# (a) raw.
make_random_file "$tmpdir/base.raw" "$size" 21

# (b) qcow2 over qcow2 over raw, relative backing names, data and zero
# clusters in each qcow2 level.
qb=$tmpdir/qbase
mkdir "$qb"
make_random_file "$qb/q0.raw" "$size" 22
qemu-img create -q -f qcow2 -b q0.raw -F raw "$qb/q1.qcow2"
qemu-io -f qcow2 -c "write -P 0x5a 1M 300k" -c "write -z 3M 128k" \
    -c "write -P 0x5b 7000k 70000" "$qb/q1.qcow2" >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4096 -b q1.qcow2 -F qcow2 "$qb/q2.qcow2"
qemu-io -f qcow2 -c "write -P 0x6c 1200k 100k" -c "write -z 5M 64k" \
    -c "write -P 0x6d 333333 4444" "$qb/q2.qcow2" >/dev/null
qemu-img convert -f qcow2 -O raw "$qb/q2.qcow2" "$tmpdir/qbase.raw"

# (c) a remote NBD export of a raw file.
make_random_file "$tmpdir/nbd.raw" "$size" 23
nbd_uri="nbd+unix:///?socket=$tmpdir/nbdbase.sock"
nbd_pid=
start_nbd_base ()
{
    local i
    rm -f "$tmpdir/nbdbase.sock" "$tmpdir/nbdbase.pid"
    nbdkit -f -r -U "$tmpdir/nbdbase.sock" -P "$tmpdir/nbdbase.pid" \
        file "$tmpdir/nbd.raw" </dev/null >>"$tmpdir/nbdbase.log" 2>&1 &
    nbd_pid=$!
    for (( i = 0; i < 600; i++ )); do
        kill -0 "$nbd_pid" 2>/dev/null || fail "the NBD base server exited"
        [ -s "$tmpdir/nbdbase.pid" ] && [ -S "$tmpdir/nbdbase.sock" ] && return 0
        sleep 0.05
    done
    fail "the NBD base server did not start"
}
stop_nbd_base ()
{
    [ -n "$nbd_pid" ] || return 0
    kill "$nbd_pid" 2>/dev/null || :
    wait "$nbd_pid" 2>/dev/null || :
    nbd_pid=
}
on_exit stop_nbd_base
start_nbd_base

declare -A base_sums=()
for f in "$tmpdir/base.raw" "$qb/q0.raw" "$qb/q1.qcow2" "$qb/q2.qcow2" "$tmpdir/nbd.raw"; do
    base_sums[$f]=$(sha256 "$f")
done

#----------------------------------------------------------------------
# One disk: its base kind, how its server stops, and the state it is in.
# $srv, $d, $st, $model, $uri, $ctl, $names (the expected snapshots,
# oldest first), $seed.

# gw [pending]: guest writes, flushed; with "pending", then unflushed ones.
gw ()
{
    rmpy write "$uri" "$model" "$seed" ${1:+"$d/pending.json"} ||
        fail "$cell: guest writes failed"
    seed=$(( seed + 1 ))
}

# snap NAME: a snapshot through the server; its model saved.
snap ()
{
    "$cow" snapshot "$1" > "$d/cmd.out" 2>&1 ||
        { cat "$d/cmd.out" >&2; fail "$cell: snapshot $1 failed"; }
    check_sanitizer_log "$d/cmd.out"
    cp "$model" "$d/snaps/$1.raw"
    names+=("$1")
}

drop_name ()
{
    local n new=()
    for n in "${names[@]}"; do
        [ "$n" = "$1" ] || new+=("$n")
    done
    names=(${new[@]+"${new[@]}"})
}

# job ARGS...: a job through the server, to its end.
job ()
{
    "$cow" "$@" --wait > "$d/cmd.out" 2>&1 ||
        { cat "$d/cmd.out" >&2; fail "$cell: cowchain $* failed"; }
    check_sanitizer_log "$d/cmd.out"
}

# offjob ARGS...: a cowchain command on the stopped state directory.
offjob ()
{
    "$cow" "$@" --state "$st" > "$d/cmd.out" 2>&1 ||
        { cat "$d/cmd.out" >&2; fail "$cell: cowchain $* --state failed"; }
    check_sanitizer_log "$d/cmd.out"
}

start_disk ()
{
    local -a keys=(state="$st" control="$ctl")
    # After kill -9 the disk restarts from its state directory alone
    # (base= may be left out once it exists); else with the first
    # command line.
    [ "$how" = kill ] && [ "${1:-}" = restart ] || keys=(base="$base_arg" "${keys[@]}")
    start_server "$srv" "${keys[@]}"
}

# offline_check [WHAT]: the offline checks; WHAT names the offline
# command just run (then without the table and tree forms of list, which
# the check right after the stop did).
offline_check ()
{
    local strict=1 leaks=0 forms=1
    [ "$how" = kill ] && { strict=0; leaks=1; }
    [ -z "${1:-}" ] || forms=0
    rmpy offline "$st" "$model" "$d/snaps" "$d/pending.json" \
        "$strict" "$leaks" "$forms" "$base_want" "$base_fmt" "$base_chain" \
        ${names[@]+"${names[@]}"} ||
        fail "$cell: offline check of the stopped disk"
}

# stop_and_check [OFFLINE-HOOK]: unflushed writes, the stop, the offline
# checks, the hook (offline commands, each followed by the checks), the
# restart and the online checks.
stop_and_check ()
{
    gw pending
    case $how in
        term) stop_server "$srv" ;;
        kill) crash_server "$srv" ;;
    esac
    offline_check
    [ -z "${1:-}" ] || "$1"
    start_disk restart
    rmpy online "$uri" "$model" "$st" "$ctl" ${names[@]+"${names[@]}"} ||
        fail "$cell: online check after the restart"
}

# The offline commands, on the stopped disk (layers s2 s5 s7 active).
offline_jobs ()
{
    cell="$kind/$how: offline delete s5"
    offjob delete s5;                       drop_name s5; offline_check "$cell"
    cell="$kind/$how: offline commit --top s7"
    offjob commit --top s7 --force;         drop_name s2; offline_check "$cell"
    cell="$kind/$how: offline snapshot s8"
    offjob snapshot s8; cp "$model" "$d/snaps/s8.raw"; names+=(s8)
    offline_check "$cell"
    cell="$kind/$how: offline pull --base s7"
    offjob pull --base s7 --force;          drop_name s8; offline_check "$cell"
    cell="$kind/$how: offline revert s7"
    offjob revert s7;           cp "$d/snaps/s7.raw" "$model"; offline_check "$cell"
    cell="$kind/$how: restart after the offline commands"
}

run_disk ()
{
    kind=$1 how=$2 disk_no=$3
    srv=$kind-$how
    d=$tmpdir/$srv
    st=$d/state
    model=$d/model.raw
    ctl=$d/ctl
    names=()
    seed=$(( disk_no * 1000 ))
    mkdir -p "$d/snaps"
    case $kind in
        raw)   base_arg=$tmpdir/base.raw; base_fmt=raw
               base_chain=$base_arg; cp "$base_arg" "$model" ;;
        qcow2) base_arg=$qb/q2.qcow2; base_fmt=qcow2
               base_chain=$qb/q2.qcow2,$qb/q1.qcow2,$qb/q0.raw
               cp "$tmpdir/qbase.raw" "$model" ;;
        nbd)   base_arg=$nbd_uri; base_fmt=raw
               base_chain=$nbd_uri; cp "$tmpdir/nbd.raw" "$model" ;;
    esac
    base_want=$base_arg
    uri=$(server_uri "$srv")
    export COWCHAIN_CONTROL=$ctl

    start_disk

    cell="$kind/$how: no snapshot"; note "$cell"
    stop_and_check

    cell="$kind/$how: two snapshots"; note "$cell"
    gw; snap s1; gw; snap s2
    stop_and_check

    cell="$kind/$how: after commit --top s2"; note "$cell"
    job commit --top s2 --force;           drop_name s1
    stop_and_check

    cell="$kind/$how: after pull --base s3"; note "$cell"
    snap s3; gw; snap s4; gw
    job pull --base s3 --force;            drop_name s4
    stop_and_check

    cell="$kind/$how: after delete s3"; note "$cell"
    snap s5; gw
    job delete s3;                         drop_name s3
    stop_and_check

    cell="$kind/$how: after revert s5"; note "$cell"
    snap s6; gw
    "$cow" revert --force s5 > "$d/cmd.out" 2>&1 ||
        { cat "$d/cmd.out" >&2; fail "$cell: revert failed"; }
    check_sanitizer_log "$d/cmd.out"
    drop_name s6; cp "$d/snaps/s5.raw" "$model"
    stop_and_check

    cell="$kind/$how: offline delete, commit, snapshot, pull, revert"; note "$cell"
    snap s7
    stop_and_check offline_jobs

    cell="$kind/$how: after commit --top active --base s9"; note "$cell"
    snap s9; gw
    job commit --top active --base s9 --force;  drop_name s9
    stop_and_check

    cell="$kind/$how: after pull without --base"; note "$cell"
    snap s10; gw
    job pull --force;                      names=()
    stop_and_check

    case $how in
        term) stop_server "$srv" ;;
        kill) crash_server "$srv" ;;
    esac
}

# COWCHAIN_MATRIX_BASES / COWCHAIN_MATRIX_STOPS: a part of the matrix, to
# reproduce one cell faster (default: all of it).
n=0
for kind in raw qcow2 nbd; do
    for how in term kill; do
        n=$(( n + 1 ))
        case " ${COWCHAIN_MATRIX_BASES:-raw qcow2 nbd} " in *" $kind "*) ;; *) continue ;; esac
        case " ${COWCHAIN_MATRIX_STOPS:-term kill} " in *" $how "*) ;; *) continue ;; esac
        run_disk "$kind" "$how" "$n"
    done
done

for f in "${!base_sums[@]}"; do
    [ "$(sha256 "$f")" = "${base_sums[$f]}" ] || fail "the base file $f was modified"
done
note "pass"
