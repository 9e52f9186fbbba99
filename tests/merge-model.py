#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# A model-based randomised test of snapshots and background merges
# against a live server.  Driven by tests/test-merge-model.sh, which owns
# the server (start, stop, kill -9: see functions.sh) and does what this
# script asks on a pair of FIFOs: a line "start STAGE KEY=VALUE..."
# (STAGE: a COWCHAIN_JOB_STOP_AT value or "-"; plugin keys), "stop" (or
# "stop job": a merge may be running) or "crash", answered "ok".
#
#   merge-model.py --cowchain PATH --uri URI --control SOCK --state DIR
#                  --base FILE --scratch DIR --requests FIFO
#                  --replies FIFO --seed N --steps N
#
# The seed picks the layers' cluster size (mostly 64K; 4K, 512K, 2M) and
# compat (sometimes 0.10), and the steps.
#
# The model: the disk's bytes (a bytearray, starting as the base), the
# bytes of every snapshot when it was taken, and the chain as it should
# be (layers bottom to top, each with its snapshot name or none; the last
# is the active layer).  Each step is chosen at random from: writes,
# write-zeroes, trims, flush, snapshot, revert, delete, commit of a frozen
# layer, active commit, pull, clean restart and kill -9 + restart.  A
# merge runs in the background while a guest writer (a thread with its
# own NBD connection) keeps writing; each answered write goes into the
# model.  During a job, at random: pause and resume, a snapshot, refused
# commands (EBUSY), cancel, a clean stop or a kill -9 (after a FLUSH; the
# chain must then be the old one or the new one, and a job that did not
# finish is started again by layer file names).  When the server is
# started with COWCHAIN_JOB_STOP_AT, every job stops at that stage, which
# fixes where such events land.
#
# After every step: the disk read over NBD equals the model, the manifest
# is the model's chain, `cowchain list --output=json` names exactly the
# model's snapshots, and the state directory holds no other layer file.
# With the server stopped (every restart, every 12 steps at the latest,
# and at the end): every layer passes qemu-img check (leaked clusters are
# accepted only in files that existed at a kill -9), and every snapshot
# and the current disk, read offline by qemu-img from their layer files,
# equal the model.
#
# Semantics expected (include/cowchain.h, "Background merges"):
#   trim: whole clusters in the range read back as zero, partial clusters
#     at either end are left as they were; in compat 0.10 layers (no zero
#     clusters) a trim changes nothing;
#   commit TOP into BASE: the view at TOP is unchanged, BASE takes TOP's
#     name; the names on BASE and between it and TOP (their states change)
#     go when the job starts, and need --force, as does TOP's name when
#     BASE is the original base (which cannot carry a name); writing the
#     original base needs --allow-base-write;
#   pull [--base B]: the active layer then backs onto B (or onto nothing);
#     the names cut from the chain need --force;
#   delete NAME: the name goes at once, its layer is merged into the one
#     above;
#   one job per disk: revert, delete, commit and pull during a job, and a
#     snapshot during an active commit, fail with EBUSY.
#
# A failure prints the seed and the step, so that it can be replayed with
# MERGE_MODEL_SEEDS=SEED MERGE_MODEL_STEPS=STEP (timing can still make a
# replay take another path after a job that was killed or cancelled).

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402
from cowtest import connect, read_all, describe_diff  # noqa: E402

KiB = 1024
MiB = 1024 * 1024
MAX_LAYERS = 10             # no more snapshots beyond this depth
OFFLINE_EVERY = 12          # steps between offline checks at the latest
STAGES = ["before-copy", "mid-copy", "before-switch", "after-manifest"]
TIMEOUT = 120               # seconds for any one command
STEP_TIMEOUT = 600          # seconds for a step: beyond, a hang
READ_CHUNK = 256 * KiB      # (much faster through libnbd than 4 MiB)


class ModelFailure(Exception):
    pass


def rup(x, a):
    return (x + a - 1) // a * a


def rdown(x, a):
    return x // a * a


class Layer:
    """One layer file of the chain; its file name is learnt from the
    manifest once the server has created it."""
    __slots__ = ("file",)

    def __init__(self, file=None):
        self.file = file

    def __repr__(self):
        return self.file or "(new)"


# A chain is a list of (Layer, snapshot name or None), bottom to top.
ORIG_BASE = "base"          # the disk's original base, as a merge base
NO_BASE = "none"            # pull self-contained


def chain_names(chain):
    return [n for _, n in chain if n]


def chain_index(chain, layer):
    for i, (l, _) in enumerate(chain):
        if l is layer:
            return i
    raise ModelFailure("model: layer %r is not in the chain" % layer)


class Op:
    __slots__ = ("kind", "off", "n", "flags", "data")

    def __init__(self, kind, off, n, flags=0, data=None):
        self.kind, self.off, self.n, self.flags, self.data = \
            kind, off, n, flags, data

    def __repr__(self):
        fl = []
        if self.flags & nbd.CMD_FLAG_FUA:
            fl.append("FUA")
        if self.flags & nbd.CMD_FLAG_NO_HOLE:
            fl.append("NO_HOLE")
        return "%s(%d, %d%s)" % (self.kind, self.off, self.n,
                                 (", " + "|".join(fl)) if fl else "")


class Job:
    """A background merge as the model sees it.

    kind: commit, pull or delete.  commit: top and base (a Layer or
    ORIG_BASE); active: top is the active layer.  pull and delete:
    target (the layer filled) and base (a Layer, ORIG_BASE or NO_BASE);
    delete: deleted, the layer that leaves.  args: the command line that
    starts it; flags: its --force and --allow-base-write; start_drop:
    names that go when it starts."""

    def __init__(self, kind, args, **kw):
        self.kind = kind
        self.args = args
        self.top = kw.get("top")
        self.base = kw.get("base")
        self.target = kw.get("target")
        self.active = kw.get("active", False)
        self.flags = kw.get("flags", [])
        self.start_drop = kw.get("start_drop", [])
        self.deleted = kw.get("deleted")

    def final(self, chain):
        """(new chain, names lost) once the job has switched."""
        ib = -1 if not isinstance(self.base, Layer) \
            else chain_index(chain, self.base)
        if self.kind == "commit" and self.active:
            if isinstance(self.base, Layer):
                return chain[:ib] + [(self.base, None)], \
                    chain_names(chain[ib + 1:])
            return [(Layer(), None)], chain_names(chain)
        if self.kind == "commit":
            it = chain_index(chain, self.top)
            top_name = chain[it][1]
            if isinstance(self.base, Layer):
                return chain[:ib] + [(self.base, top_name)] + chain[it + 1:], \
                    chain_names(chain[ib + 1:it])
            return chain[it + 1:], chain_names(chain[:it + 1])
        ix = chain_index(chain, self.target)
        return chain[:ib + 1] + chain[ix:], chain_names(chain[ib + 1:ix])

    def restart_args(self):
        """The command that starts it again after a crash or a stop, by
        layer file names."""
        def word(b):
            return b.file if isinstance(b, Layer) else "base"
        if self.kind == "commit":
            args = ["commit", "--top",
                    "active" if self.active else self.top.file,
                    "--base", word(self.base)]
            return args + self.flags
        if self.kind == "delete":
            # The name went when it started: the layer is named by file.
            return ["delete", self.deleted.file]
        args = ["pull"]
        if self.base != NO_BASE:
            args += ["--base", word(self.base)]
        return args + self.flags

    def again(self):
        return Job(self.kind, self.restart_args(), top=self.top,
                   base=self.base, target=self.target, active=self.active,
                   flags=self.flags, deleted=self.deleted)


class Writer(threading.Thread):
    """The guest during a job: random writes, zeroes and trims through
    its own connection, each recorded in the model once answered (under
    the model's lock, which also keeps it out of snapshots), and reads,
    which must match the model at every moment of the job."""

    def __init__(self, t, seed):
        super().__init__(daemon=True)
        self.t = t
        self.rng = random.Random(seed)
        self.stop_ev = threading.Event()
        self.h = connect(t.a.uri)
        self.count = 0
        self.error = None

    def run(self):
        try:
            while not self.stop_ev.is_set():
                if self.rng.random() < 0.25:
                    off, n = self.t.rand_range(self.rng, 256 * KiB)
                    with self.t.lock:
                        msg = describe_diff(self.h.pread(n, off),
                                            self.t.disk[off:off + n], off,
                                            "a read during the job")
                    if msg:
                        raise ModelFailure(msg)
                    continue
                op = self.t.random_op(self.rng, small=True)
                with self.t.lock:
                    self.t.execute(self.h, op)
                self.count += 1
                time.sleep(0.001)
        except ModelFailure as e:
            self.error = str(e)
        except Exception:
            self.error = traceback.format_exc()

    def finish(self):
        self.stop_ev.set()
        self.join(TIMEOUT)
        if self.is_alive():
            raise ModelFailure("the guest writer hangs (a write not answered "
                               "within %d s)" % TIMEOUT)
        if self.error:
            raise ModelFailure("guest writer: " + self.error)
        try:
            self.h.shutdown()
        except nbd.Error:
            pass
        self.h = None


class Tester:
    def __init__(self, a):
        self.a = a
        self.rng = random.Random(a.seed)
        with open(a.base, "rb") as f:
            self.disk = bytearray(f.read())
        self.size = len(self.disk)
        # The disk's layers: mostly the defaults.
        self.cs = self.rng.choice([64 * KiB] * 3 + [4 * KiB, 512 * KiB,
                                                    2 * MiB])
        self.compat = "0.10" if self.rng.random() < 0.2 else "1.1"
        # Subclusters (extended L2 entries): on by default where QEMU
        # allows them; trim then releases subclusters.
        self.subclusters = (a.subclusters == "on" and self.compat == "1.1"
                            and self.cs >= 16 * KiB)
        self.trim_unit = self.cs // 32 if self.subclusters else self.cs
        self.snaps = {}             # name -> bytes when taken
        self.chain = []             # learnt from the first manifest
        self.has_base = True
        self.leaky = set()          # files that existed at a kill -9
        self.stage = None           # COWCHAIN_JOB_STOP_AT of the server
        self.h = None               # the main NBD connection
        self.fua = 0                # CMD_FLAG_FUA if the server has it
        # The model's lock: the guest writer holds it over each request
        # and its update of the model, the main thread over a snapshot
        # (and refused commands) during a job, so that a snapshot is
        # never taken with a guest write half recorded.
        self.lock = threading.Lock()
        self.step = 0
        self.last_offline = 0
        self.next_name = 0
        self.history = []           # what the last steps did
        self.stats = {}
        self.dog = None             # the watchdog timer of the step
        self.t0 = time.monotonic()
        self.req = open(a.requests, "w")
        self.rep = open(a.replies, "r")

    # --- reporting --------------------------------------------------------

    def say(self, msg):
        self.history.append("step %d: %s" % (self.step, msg))
        del self.history[:-40]
        print("merge-model: [%.1fs] seed %d step %d: %s" %
              (time.monotonic() - self.t0, self.a.seed, self.step, msg),
              flush=True)

    def count(self, what):
        self.stats[what] = self.stats.get(what, 0) + 1

    # --- the server (through the shell script) ----------------------------

    def ask(self, line):
        self.req.write(line + "\n")
        self.req.flush()
        answer = self.rep.readline()
        if answer.strip() != "ok":
            raise ModelFailure("the test script did not do '%s' (answer %r)"
                               % (line, answer))

    def start(self):
        self.stage = self.rng.choice([None, None] + STAGES)
        # cluster-size and compat only matter for the disk's first layer:
        # later ones are made like the active layer.
        self.ask("start %s cluster-size=%d compat=%s%s" %
                 (self.stage or "-", self.cs, self.compat,
                  "" if self.a.subclusters == "on" else " subclusters=off"))
        self.h = connect(self.a.uri)
        if not self.h.can_trim():
            raise ModelFailure("the server does not advertise trim")
        pref = self.h.get_block_size(nbd.SIZE_PREFERRED)
        if pref != self.cs:
            raise ModelFailure("preferred block size %d, expected the cluster "
                               "size %d" % (pref, self.cs))
        self.fua = nbd.CMD_FLAG_FUA if self.h.can_fua() else 0

    def disconnect(self):
        if self.h is not None:
            try:
                self.h.shutdown()
            except nbd.Error:
                pass
        self.h = None

    def stop(self, job=False):
        self.disconnect()
        # A job's thread may still be running: the script must not wait
        # for the server to drop to its idle thread count first.
        self.ask("stop job" if job else "stop")

    def crash(self):
        """kill -9, after a FLUSH: every write in the model is durable."""
        self.h.flush()
        self.h = None
        self.ask("crash")
        self.leaky |= set(self.layer_files())

    # --- the cowchain tool ----------------------------------------------

    def cow(self, *args, offline=False):
        cmd = [self.a.cowchain] + list(args)
        cmd += ["--state", self.a.state] if offline \
            else ["--control", self.a.control]
        try:
            return subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            raise ModelFailure("'%s' hangs (no answer in %d s)" %
                               (" ".join(cmd), TIMEOUT))

    def cow_ok(self, *args, offline=False):
        r = self.cow(*args, offline=offline)
        if r.returncode != 0:
            raise ModelFailure("'cowchain %s' failed (exit %d): %s" %
                               (" ".join(args), r.returncode,
                                r.stderr.strip()))
        return r.stdout

    def cow_refused(self, text, *args, why=""):
        """The command must fail with a message containing text."""
        r = self.cow(*args)
        if r.returncode == 0:
            raise ModelFailure("'cowchain %s' should have been refused (%s%s) "
                               "but succeeded: %s" %
                               (" ".join(args), text,
                                "; " + why if why else "", r.stdout.strip()))
        if text.lower() not in r.stderr.lower():
            raise ModelFailure("'cowchain %s' failed, but its message does "
                               "not mention '%s': %s" %
                               (" ".join(args), text, r.stderr.strip()))
        self.count("refused")

    def job_info(self):
        v = json.loads(self.cow_ok("jobs", "--output=json"))["jobs"]
        if len(v) != 1:
            raise ModelFailure("cowchain jobs lists %d rows: %r" % (len(v), v))
        return v[0]

    def wait_stopped(self):
        """Wait until the job is paused or over; its state.  (After a
        while at full speed: it may never stop, the stage being one
        that this kind of job does not pass.)"""
        t0 = time.monotonic()
        fast = False
        while True:
            st = self.job_info()["state"]
            if st != "running":
                return st
            if not fast and time.monotonic() - t0 > 0.5:
                fast = True
                r = self.cow("speed", "0")
                if r.returncode != 0 and "no job" not in r.stderr:
                    raise ModelFailure("cowchain speed 0: %s" %
                                       r.stderr.strip())
            if time.monotonic() - t0 > TIMEOUT:
                raise ModelFailure("the job neither paused at stage %s nor "
                                   "ended within %d s" % (self.stage, TIMEOUT))
            time.sleep(0.01)

    # --- the state directory ------------------------------------------

    def read_manifest(self):
        path = os.path.join(self.a.state, "manifest")
        with open(path) as f:
            lines = f.read().splitlines()
        if not lines or lines[0] != "cowchain-manifest 1":
            raise ModelFailure("manifest: bad first line: %r" % lines[:1])
        layers, has_base = [], None
        for line in lines[1:]:
            w = line.split(" ")
            if w[0] == "base":
                has_base = True
            elif w[0] == "nobase":
                has_base = False
            elif w[0] == "layer" and len(w) == 5:
                name = None if w[3] == "-" else urllib.parse.unquote(w[3])
                layers.append((urllib.parse.unquote(w[1]), name))
            elif w[0] == "rebase" and len(w) == 2:
                # A merge's mark of a layer whose header it rewrites next.
                if urllib.parse.unquote(w[1]) not in [l for l, _ in layers]:
                    raise ModelFailure("manifest: %r names no layer" % line)
            else:
                raise ModelFailure("manifest: unexpected line %r" % line)
        return layers, has_base

    def layer_files(self):
        return sorted(f for f in os.listdir(self.a.state)
                      if f.startswith("layer-"))

    @staticmethod
    def matches(layers, chain):
        if len(layers) != len(chain):
            return False
        known = {l.file for l, _ in chain if l.file}
        for (f, n), (l, m) in zip(layers, chain):
            if n != m:
                return False
            if l.file is not None and l.file != f:
                return False
            if l.file is None and f in known:
                return False
        return True

    def check_chain(self, candidates, has_base_candidates=None):
        """The manifest must be one of the candidate chains (the model's
        unless a kill or stop left two possible); adopt it.  Returns the
        index of the one found."""
        layers, has_base = self.read_manifest()
        if has_base_candidates is None:
            has_base_candidates = [self.has_base] * len(candidates)
        for i, chain in enumerate(candidates):
            if has_base_candidates[i] == has_base and \
                    self.matches(layers, chain):
                for (f, _), (l, _) in zip(layers, chain):
                    l.file = f
                self.chain = chain
                self.has_base = has_base
                return i

        def show(chain, hb):
            return "%s%s" % (" < ".join("%s%s" % (f, "[%s]" % n if n else "")
                                        for f, n in chain),
                             "" if hb else " (no base)")
        raise ModelFailure(
            "the manifest's chain is %s; expected %s" %
            (show(layers, has_base),
             " or ".join(show([(l.file or "(new)", n) for l, n in c], hb)
                         for c, hb in zip(candidates, has_base_candidates))))

    # --- checks -------------------------------------------------------

    def check_disk(self, h=None, what="disk"):
        got = read_all(h or self.h, self.size, READ_CHUNK)
        msg = describe_diff(got, self.disk, 0, what)
        if msg:
            raise ModelFailure(msg)

    def check_list(self, offline=False):
        v = json.loads(self.cow_ok("list", "--output=json", offline=offline))["snapshots"]
        got = [(s["name"], os.path.basename(s["file"])) for s in v]
        want = [(n, l.file) for l, n in self.chain if n]
        if got != want:
            raise ModelFailure("cowchain list%s: %s, expected %s" %
                               (" --state" if offline else "", got, want))
        if sorted(self.snaps) != sorted(n for n, _ in want):
            raise ModelFailure("model: snapshots %s but chain names %s" %
                               (sorted(self.snaps), [n for n, _ in want]))

    def check_running(self):
        """After every step, with the server running."""
        self.check_disk()
        self.check_chain([self.chain])
        files = self.layer_files()
        want = sorted(l.file for l, _ in self.chain)
        if files != want:
            raise ModelFailure("the state directory holds %s; the chain is %s"
                               % (files, want))
        self.check_list()
        st = self.job_info()["state"]
        if st in ("running", "paused"):
            raise ModelFailure("a job is still %s after the step" % st)

    def qemu_img_check(self, f, leaks_ok):
        path = os.path.join(self.a.state, f)
        r = subprocess.run(["qemu-img", "check", "-f", "qcow2", path],
                           capture_output=True, text=True, timeout=TIMEOUT)
        if r.returncode == 0 or (r.returncode == 3 and leaks_ok):
            return
        raise ModelFailure("qemu-img check %s: exit %d%s\n%s" %
                           (f, r.returncode,
                            " (leaked clusters, in a layer that no kill -9 "
                            "interrupted)" if r.returncode == 3 else "",
                            (r.stdout + r.stderr).strip()))

    def read_offline(self, f):
        out = os.path.join(self.a.scratch, "layer.raw")
        r = subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                            os.path.join(self.a.state, f), out],
                           timeout=TIMEOUT, capture_output=True, text=True)
        if r.returncode != 0:
            raise ModelFailure("qemu-img convert %s: %s" %
                               (f, r.stderr.strip()))
        with open(out, "rb") as fh:
            data = fh.read()
        os.unlink(out)
        return data

    def check_offline(self):
        """With the server stopped cleanly."""
        self.check_chain([self.chain])
        for l, _ in self.chain:
            self.qemu_img_check(l.file, l.file in self.leaky)
        self.check_list(offline=True)
        for l, n in self.chain:
            if n:
                msg = describe_diff(self.read_offline(l.file), self.snaps[n],
                                    0, "snapshot %s read offline from %s" %
                                    (n, l.file))
                if msg:
                    raise ModelFailure(msg)
        active = self.chain[-1][0].file
        msg = describe_diff(self.read_offline(active), self.disk, 0,
                            "the disk read offline from %s" % active)
        if msg:
            raise ModelFailure(msg)
        self.last_offline = self.step
        self.count("offline checks")

    # --- guest I/O ----------------------------------------------------

    def rand_range(self, rng, maxlen):
        r = rng.random()
        if r < 0.5:
            n = rng.randint(1, 8 * KiB)
        elif r < 0.9:
            n = rng.randint(1, min(3 * self.cs + 1, maxlen))
        else:
            n = rng.randint(1, maxlen)
        r = rng.random()
        nclusters = self.size // self.cs
        if r < 0.3:                     # on a cluster boundary
            off = rng.randrange(nclusters) * self.cs
            if rng.random() < 0.5:
                n = rup(n, self.cs)
        elif r < 0.6:                   # across a cluster boundary
            k = rng.randrange(1, nclusters)
            off = k * self.cs - rng.randint(1, min(n, self.cs))
        else:
            off = rng.randrange(self.size)
        off = max(0, min(off, self.size - 1))
        return off, min(n, self.size - off)

    def random_op(self, rng, small=False):
        off, n = self.rand_range(rng, 256 * KiB if small else 1 * MiB)
        r = rng.random()
        fua = self.fua if rng.random() < 0.1 else 0
        if r < 0.7:
            return Op("write", off, n, fua, rng.randbytes(n))
        if r < 0.85:
            flags = nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.3 else 0
            return Op("zero", off, n, flags | fua)
        return Op("trim", off, n, fua)

    def execute(self, h, op):
        """Run op on h; once answered, apply it to the model."""
        try:
            if op.kind == "write":
                h.pwrite(op.data, op.off, op.flags)
            elif op.kind == "zero":
                h.zero(op.n, op.off, op.flags)
            else:
                h.trim(op.n, op.off, op.flags)
        except nbd.Error as e:
            raise ModelFailure("%r failed: %s" % (op, e))
        end = op.off + op.n
        if op.kind == "write":
            self.disk[op.off:end] = op.data
        elif op.kind == "zero":
            self.disk[op.off:end] = bytes(op.n)
        elif self.compat == "1.1":
            # Whole clusters (subclusters) become zero; partial ones stay.
            # (Without zero clusters, in compat 0.10, a trim does nothing.)
            a, b = rup(op.off, self.trim_unit), rdown(end, self.trim_unit)
            if b > a:
                self.disk[a:b] = bytes(b - a)

    # --- naming layers ------------------------------------------------

    def new_name(self, rng=None):
        self.next_name += 1
        if (rng or self.rng).random() < 0.1:
            return "x.%d_a+b:c@d-e" % self.next_name
        return "s%d" % self.next_name

    def word(self, i):
        """How to name layer i on the command line: its snapshot name or
        its file name (or 'base' for -1)."""
        if i < 0:
            return "base"
        l, n = self.chain[i]
        if n and self.rng.random() < 0.75:
            return n
        return l.file

    # --- steps ----------------------------------------------------------

    def step_io(self, kind):
        ops = []
        for _ in range(self.rng.randint(1, 6)):
            op = self.random_op(self.rng)
            if kind != "write" and self.rng.random() < 0.7:
                op = Op(kind, op.off, op.n, op.flags & nbd.CMD_FLAG_FUA)
            ops.append(op)
        self.say("I/O: %s" % ", ".join(map(repr, ops)))
        for op in ops:
            self.execute(self.h, op)
        if self.rng.random() < 0.3:
            self.h.flush()

    def do_snapshot(self, name):
        """Under the lock when a writer may be running."""
        self.cow_ok("snapshot", name)
        self.snaps[name] = bytes(self.disk)
        active = self.chain[-1][0]
        self.chain = self.chain[:-1] + [(active, name), (Layer(), None)]
        self.count("snapshot")

    def step_snapshot(self):
        name = self.new_name()
        self.say("snapshot %s" % name)
        self.do_snapshot(name)

    def step_revert(self):
        named = [i for i, (_, n) in enumerate(self.chain) if n]
        k = self.rng.choice(named)
        name = self.chain[k][1]
        later = chain_names(self.chain[k + 1:])
        # The model's own NBD connection is open: the disk would change
        # under it, which takes --force too.
        connected = self.h is not None
        force = bool(later) or connected
        if later and self.rng.random() < 0.3:
            self.say("revert %s without --force (must be refused: %s "
                     "would go)" % (name, later))
            self.expect_unchanged(lambda: self.cow_refused(
                "--force", "revert", name))
        if connected and self.rng.random() < 0.3:
            self.say("revert %s without --force (must be refused: an NBD "
                     "client is connected)" % name)
            self.expect_unchanged(lambda: self.cow_refused(
                "1 NBD client is connected", "revert", name))
        self.say("revert %s%s" % ("--force " if force else "", name))
        self.cow_ok("revert", *(["--force"] if force else []), name)
        for n in later:
            del self.snaps[n]
        self.chain = self.chain[:k + 1] + [(Layer(), None)]
        self.disk = bytearray(self.snaps[name])
        self.count("revert")

    def expect_unchanged(self, fn):
        before = open(os.path.join(self.a.state, "manifest")).read()
        fn()
        after = open(os.path.join(self.a.state, "manifest")).read()
        if before != after:
            raise ModelFailure("a refused command changed the manifest:\n"
                               "%s---\n%s" % (before, after))

    def step_delete(self):
        named = [i for i, (_, n) in enumerate(self.chain) if n]
        k = self.rng.choice(named)
        name = self.chain[k][1]
        layer, target = self.chain[k][0], self.chain[k + 1][0]
        base = self.chain[k - 1][0] if k > 0 \
            else ORIG_BASE if self.has_base else NO_BASE
        job = Job("delete", ["delete", name], target=target, base=base,
                  start_drop=[name], deleted=layer)
        self.run_job(job)

    def force_probes(self, args, needs_allow, lost, what):
        """Sometimes first try without the flags that are needed."""
        if needs_allow and self.rng.random() < 0.2:
            bad = [a for a in args if a != "--allow-base-write"]
            self.say("%s without --allow-base-write (must be refused)" % what)
            self.expect_unchanged(lambda: self.cow_refused(
                "allow-base-write", *bad))
        if lost and self.rng.random() < 0.3:
            bad = [a for a in args if a != "--force"]
            why = "it would drop snapshot(s) %s" % ", ".join(lost)
            self.say("%s without --force (must be refused: %s)" % (what, why))
            self.expect_unchanged(lambda: self.cow_refused(
                "--force", *bad, why=why))

    def step_commit(self, active):
        n = len(self.chain)
        lo = -1 if self.has_base else 0
        if active:
            t = n - 1
        else:
            t = self.rng.randrange(max(0, lo + 1), n - 1)
        # Mostly the default base, the layer right under top.
        if self.rng.random() < 0.5 and t - 1 >= lo:
            b = t - 1
        else:
            b = self.rng.randrange(lo, t)
        top, base = self.chain[t][0], \
            self.chain[b][0] if b >= 0 else ORIG_BASE
        args = ["commit", "--top",
                ("active" if self.rng.random() < 0.6 else top.file)
                if active else self.word(t)]
        if b != t - 1 or self.rng.random() < 0.5:
            args += ["--base", self.word(b)]
        needs_allow = b < 0
        # Names that would be lost: on base and between it and top, and
        # top's own when base is the original base (it takes no name).
        lost = chain_names(self.chain[max(b, 0):t])
        if b < 0 and self.chain[t][1]:
            lost.append(self.chain[t][1])
        flags = (["--allow-base-write"] if needs_allow else []) + \
            (["--force"] if lost else [])
        self.force_probes(args + flags, needs_allow, lost, " ".join(args))
        # The names on base and between it and top go when the job starts
        # (the states they name start changing then).
        job = Job("commit", args + flags, top=top, base=base, active=active,
                  flags=flags, start_drop=chain_names(self.chain[max(b, 0):t]))
        self.run_job(job)

    def pull_choices(self):
        n = len(self.chain)
        out = []
        if self.has_base or n > 1:
            out.append(None)                    # self-contained
        if self.has_base and n > 1:
            out.append(-1)                      # onto the original base
        out += range(0, n - 2)                  # onto a layer
        return out

    def step_pull(self):
        n = len(self.chain)
        b = self.rng.choice(self.pull_choices())
        args = ["pull"]
        if b is not None:
            args += ["--base", self.word(b)]
        cut = self.chain[(b if b is not None else -1) + 1:n - 1]
        lost = chain_names(cut)
        flags = ["--force"] if lost else []
        self.force_probes(args + flags, False, lost, " ".join(args))
        base = NO_BASE if b is None else ORIG_BASE if b < 0 \
            else self.chain[b][0]
        job = Job("pull", args + flags, target=self.chain[-1][0], base=base,
                  flags=flags)
        self.run_job(job)

    def step_restart(self):
        self.say("restart (clean stop, offline checks, start)")
        self.stop()
        self.check_offline()
        self.start()
        self.count("restart")

    def step_kill(self):
        self.say("flush, kill -9, restart")
        self.crash()
        self.after_crash_checks()
        self.start()
        self.count("kill -9")

    def after_crash_checks(self):
        # Leaks are allowed; a merge killed after its manifest may still
        # have a stale backing name (repaired at the next open), so the
        # contents are only compared once the server has opened the disk.
        layers, _ = self.read_manifest()
        for f, _ in layers:
            self.qemu_img_check(f, True)

    # --- jobs -----------------------------------------------------------

    def busy_probes(self, job, rng):
        """Commands refused while a job runs; they change nothing."""
        names = chain_names(self.chain)
        probes = [["revert", "--force", rng.choice(names)
                   if names else "nosuch"],
                  ["commit", "--top", "active", "--force",
                   "--allow-base-write"],
                  ["pull", "--force"],
                  ["delete", rng.choice(names) if names else "nosuch"]]
        for args in rng.sample(probes, rng.randint(1, 2)):
            with self.lock:
                self.cow_refused("running", *args)
        if job.active:
            with self.lock:
                self.cow_refused("active commit", "snapshot", "never")

    def run_job(self, job, nested=False):
        # What happens meanwhile.  A snapshot cannot be taken during an
        # active commit (probed in busy_probes instead).
        events = ["none", "pause", "busy", "snapshot", "cancel", "stop",
                  "kill"]
        weights = [30, 10, 15, 15, 10, 8, 12]
        event = "none" if nested else \
            self.rng.choices(events, weights)[0]
        if event == "snapshot" and (job.active or
                                    len(self.chain) >= MAX_LAYERS):
            event = "busy"
        # Slow, so that the events land while it copies; lifted below.
        speed = None if self.rng.random() < 0.2 else \
            self.rng.choice(["2M", "4M", "8M"])
        args = job.args + (["--speed", speed] if speed else [])
        self.say("%s%s (stage %s, event %s)" %
                 ("again: " if nested else "", " ".join(args),
                  self.stage or "-", event))
        self.cow_ok(*args)
        self.count(job.kind + (" active" if job.active else ""))
        for name in job.start_drop:
            del self.snaps[name]
            self.chain = [(l, None if n == name else n)
                          for l, n in self.chain]
        # What depends on timing (did the pause land before the job
        # ended?) draws from a generator of its own, so that the steps
        # stay those of the seed.
        seed = (self.a.seed << 20) + self.step * 2 + (1 if nested else 0)
        writer = Writer(self, seed)
        writer.start()
        try:
            self.job_body(job, event, writer, random.Random(-seed))
        finally:
            if writer.is_alive():
                writer.stop_ev.set()
                writer.join(TIMEOUT)

    def job_body(self, job, event, writer, rng):
        stopped_at = None           # the stage the job stopped at
        paused = False
        if self.stage:
            st = self.wait_stopped()
            if st == "paused":
                stopped_at = paused = self.stage
        elif event in ("pause", "busy", "snapshot"):
            time.sleep(rng.random() * 0.05)
            r = self.cow("pause")
            if r.returncode == 0:
                paused = self.job_info()["state"] == "paused"
            elif "no job" not in r.stderr:
                raise ModelFailure("cowchain pause: %s" % r.stderr.strip())
        # Stopped after the manifest, the job holds the disk's admin lock
        # until it goes on: only jobs, resume, cancel and the server's end
        # work meanwhile.
        admin_free = paused and stopped_at != "after-manifest"
        if paused and rng.random() < 0.5:
            with self.lock:
                self.check_disk(what="the disk while the job is paused%s" %
                                (" at " + stopped_at if stopped_at else ""))
        if event == "busy" and admin_free:
            self.busy_probes(job, rng)
        if event == "snapshot" and admin_free:
            with self.lock:
                name = self.new_name(rng)
                self.say("snapshot %s during the job" % name)
                self.do_snapshot(name)
        if event in ("kill", "stop"):
            if not paused:
                time.sleep(rng.random() * 0.2)
            writer.finish()
            return self.job_interrupted(job, event, stopped_at)
        cancelled = False
        if event == "cancel":
            r = self.cow("cancel")
            if r.returncode != 0 and "no job" not in r.stderr:
                raise ModelFailure("cowchain cancel: %s" % r.stderr.strip())
            cancelled = r.returncode == 0
        if paused:
            r = self.cow("resume")
            if r.returncode != 0 and not cancelled:
                raise ModelFailure("cowchain resume: %s" % r.stderr.strip())
        # Some more guest writes while it copies, then full speed (the
        # job may be over by now: no error expected then).
        time.sleep(rng.random() * 0.3)
        r = self.cow("speed", "0")
        if r.returncode != 0 and "no job" not in r.stderr:
            raise ModelFailure("cowchain speed 0: %s" % r.stderr.strip())
        r = self.cow("wait")
        writer.finish()
        self.stats["guest writes during jobs"] = \
            self.stats.get("guest writes during jobs", 0) + writer.count
        if r.returncode == 0:
            self.job_switched(job)
        elif cancelled and "cancel" in r.stderr:
            # (A cancel that comes once the copy is done may find the job
            # completing anyway; stopped before the copy it may not.)
            self.say("the job was cancelled: chain as it was")
            self.count("cancelled")
        else:
            raise ModelFailure("cowchain wait: exit %d: %s" %
                               (r.returncode, r.stderr.strip()))
        if cancelled and r.returncode == 0 and stopped_at == "before-copy":
            raise ModelFailure("the job completed though it was cancelled "
                               "while stopped at %s" % stopped_at)

    def job_switched(self, job):
        new, lost = job.final(self.chain)
        for n in lost:
            del self.snaps[n]
        if job.kind != "commit" and job.base == NO_BASE:
            self.has_base = False
        self.chain = new

    def job_interrupted(self, job, event, stopped_at):
        """The server went away during the job (kill -9 after a FLUSH, or
        a clean stop, which cancels it): the chain is the old one or the
        new one; an old one takes the job again."""
        old = list(self.chain)
        new, lost = job.final(self.chain)
        new_has_base = self.has_base and not (job.kind != "commit"
                                              and job.base == NO_BASE)
        if event == "kill":
            self.crash()
            self.after_crash_checks()
        else:
            self.stop(job=True)
        # Stopped at a stage, the outcome is known: killed there, the
        # job never got further; a stop cancels it, which a job stopped
        # before its copy cannot survive.  Past the manifest, the new
        # chain is the one recorded.
        if stopped_at == "before-copy" or (stopped_at and
                                          stopped_at != "after-manifest"
                                          and event == "kill"):
            cands = [old]
        elif stopped_at == "after-manifest":
            cands = [new]
        else:
            cands = [old, new]
        hb = [self.has_base if c is old else new_has_base for c in cands]
        found = self.check_chain(cands, hb)
        if cands[found] is new:
            for n in lost:
                del self.snaps[n]
        if event == "stop":
            self.check_offline()
        self.start()
        self.count("job %s" % ("killed" if event == "kill" else "stopped"))
        if cands[found] is new:
            self.say("after the %s: the new chain" % event)
            return
        self.say("after the %s: the old chain; the job again" % event)
        self.check_running()
        self.run_job(job.again(), nested=True)

    # --- the run ----------------------------------------------------------

    def choose_step(self):
        n = len(self.chain)
        named = bool(chain_names(self.chain))
        steps = {
            "write": 10, "zero": 3, "trim": 3, "flush": 2,
            "snapshot": 14 if n < MAX_LAYERS else 0,
            "revert": 6 if named else 0,
            "delete": 8 if named else 0,
            "commit": 10 if n >= 2 and (self.has_base or n >= 3) else 0,
            "commit-active": 6 if n >= 2 or self.has_base else 0,
            "pull": 7 if self.pull_choices() else 0,
            "restart": 3, "kill": 3,
        }
        if self.step - self.last_offline >= OFFLINE_EVERY:
            return "restart"
        names = [k for k, w in steps.items() if w]
        return self.rng.choices(names, [steps[k] for k in names])[0]

    def watchdog(self):
        """A step that never ends (an NBD request or a job that hangs)
        fails the test, naming the step."""
        if self.dog:
            self.dog.cancel()

        def bark(step=self.step):
            print("merge-model: FAIL: seed %d step %d: no progress for %d s "
                  "(a hang); last steps:\n    %s" %
                  (self.a.seed, step, STEP_TIMEOUT,
                   "\n    ".join(self.history[-15:])),
                  file=sys.stderr, flush=True)
            os._exit(1)
        self.dog = threading.Timer(STEP_TIMEOUT, bark)
        self.dog.daemon = True
        self.dog.start()

    def run(self):
        self.watchdog()
        self.say("size %d, cluster size %d, compat %s, subclusters %s, %d "
                 "steps" % (self.size, self.cs, self.compat,
                            "on" if self.subclusters else "off",
                            self.a.steps))
        self.start()
        layers, _ = self.read_manifest()
        self.chain = [(Layer(f), n) for f, n in layers]
        self.check_running()
        for self.step in range(1, self.a.steps + 1):
            self.watchdog()
            kind = self.choose_step()
            if kind in ("write", "zero", "trim"):
                self.step_io(kind)
            elif kind == "flush":
                self.say("flush")
                self.h.flush()
            elif kind == "snapshot":
                self.step_snapshot()
            elif kind == "revert":
                self.step_revert()
            elif kind == "delete":
                self.step_delete()
            elif kind == "commit":
                self.step_commit(False)
            elif kind == "commit-active":
                self.step_commit(True)
            elif kind == "pull":
                self.step_pull()
            elif kind == "restart":
                self.step_restart()
            else:
                self.step_kill()
            self.check_running()
        self.watchdog()
        self.say("end: stop, offline checks")
        self.stop()
        self.check_offline()
        self.dog.cancel()
        print("merge-model: seed %d: %d steps passed; %s" %
              (self.a.seed, self.a.steps,
               ", ".join("%s %d" % kv for kv in sorted(self.stats.items()))),
              flush=True)


def main():
    p = argparse.ArgumentParser()
    for opt in ("cowchain", "uri", "control", "state", "base", "scratch",
                "requests", "replies"):
        p.add_argument("--" + opt, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--subclusters", choices=["on", "off"], default="on")
    a = p.parse_args()
    t = Tester(a)
    try:
        t.run()
    except Exception as e:
        print("merge-model: last steps:", file=sys.stderr)
        for line in t.history[-15:]:
            print("    " + line, file=sys.stderr)
        if not isinstance(e, ModelFailure):
            traceback.print_exc()
        print("merge-model: FAIL: seed %d step %d: %s" %
              (a.seed, t.step, e), file=sys.stderr)
        print("merge-model: replay with MERGE_MODEL_SEEDS=%d "
              "MERGE_MODEL_STEPS=%d" % (a.seed, t.step), file=sys.stderr,
              flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
