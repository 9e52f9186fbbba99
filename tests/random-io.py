#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# Randomised I/O against a cowchain export, checked byte for byte against
# a model (a bytearray that starts as a copy of the base).  Used by
# tests/test-random.sh.
#
#   random-io.py random --uri URI --base BASE --ref OUT --seed N
#                --cluster-size CS [--batches N] [--conns N]
#       random writes, write-zeroes (some FAST_ZERO, some NO_HOLE, some
#       FUA), trims and reads from several connections at once, then the
#       model is written to OUT (for qemu-img compare).
#
#   random-io.py same-cluster --uri URI --base BASE --ref OUT --seed N
#                --cluster-size CS [--clusters N] [--conns N]
#       on a fresh overlay: again and again, every connection writes a
#       different byte range of the same unallocated cluster at the same
#       moment; no writer may lose data, and the bytes nobody wrote must
#       still be the base's.
#
#   random-io.py verify --uri URI --ref REF [--conns N]
#       the export must equal REF.
#
# --base names what the export holds when the driver starts: the base
# image on a fresh overlay, or the --ref output of an earlier run.
#
# Concurrency and determinism: the requests sent at the same time never
# overlap byte-wise (they may share clusters, which is the point), so the
# model's result does not depend on the order the server runs them in.
#
# Semantics expected of the server (the plugin's spec):
#   write-zeroes: the range reads back as zero (whole clusters become qcow2
#     zero clusters, partial clusters get real zeroes);
#   trim: whole clusters (--trim-unit: subclusters) inside the range read
#     back as zero, the partial parts at either end are left as they were.  A trim that
#     covers a short last cluster up to the end of the disk may either
#     zero it or leave it: that one case is read back and either result
#     accepted.

import argparse
import os
import random
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd  # noqa: E402
from cowtest import connect, read_all, describe_diff  # noqa: E402

KiB = 1024
MiB = 1024 * 1024


def die(msg):
    print("random-io: FAIL: " + msg, file=sys.stderr, flush=True)
    sys.exit(1)


def info(msg):
    print("random-io: " + msg, flush=True)


def rup(x, a):
    return (x + a - 1) // a * a


def rdown(x, a):
    return x // a * a


class Op:
    __slots__ = ("kind", "off", "n", "flags", "data")

    def __init__(self, kind, off, n, flags=0, data=None):
        self.kind, self.off, self.n, self.flags, self.data = \
            kind, off, n, flags, data

    def end(self):
        return self.off + self.n

    def __repr__(self):
        fl = []
        if self.flags & nbd.CMD_FLAG_FUA:
            fl.append("FUA")
        if self.flags & nbd.CMD_FLAG_FAST_ZERO:
            fl.append("FAST_ZERO")
        if self.flags & nbd.CMD_FLAG_NO_HOLE:
            fl.append("NO_HOLE")
        return "%s(offset=%d, count=%d%s)" % (
            self.kind, self.off, self.n,
            (", " + "|".join(fl)) if fl else "")


class Tester:
    def __init__(self, args):
        self.args = args
        self.handles = [connect(args.uri) for _ in range(args.conns)]
        self.h0 = self.handles[0]
        self.size = self.h0.get_size()
        self.cs = args.cluster_size
        # The unit trim releases: the subcluster with extended L2 entries.
        self.tu = args.trim_unit or args.cluster_size
        self.rng = random.Random(args.seed)
        self.pool = ThreadPoolExecutor(max_workers=args.conns)
        self.model = None
        self.log = []           # the last operations, for failure reports

    def close(self):
        for h in self.handles:
            h.shutdown()
        self.pool.shutdown()

    def load_model(self, path):
        with open(path, "rb") as f:
            self.model = bytearray(f.read())
        if len(self.model) != self.size:
            die("export size %d, but %s has %d bytes" %
                (self.size, path, len(self.model)))

    # --- running operations ---------------------------------------------

    @staticmethod
    def execute(h, op, barrier=None):
        if barrier is not None:
            barrier.wait()
        if op.kind == "write":
            h.pwrite(op.data, op.off, op.flags)
        elif op.kind == "zero":
            h.zero(op.n, op.off, op.flags)
        elif op.kind == "trim":
            h.trim(op.n, op.off, op.flags)
        elif op.kind == "read":
            return h.pread(op.n, op.off)
        else:
            raise ValueError(op.kind)
        return None

    def run_batch(self, ops, together=False):
        """Run ops at the same time, op i on connection i; then apply them
        to the model."""
        assert len(ops) <= len(self.handles)
        self.log.append(ops)
        del self.log[:-20]
        barrier = threading.Barrier(len(ops)) if together and len(ops) > 1 \
            else None
        futs = [self.pool.submit(self.execute, self.handles[i], op, barrier)
                for i, op in enumerate(ops)]
        results = []
        for op, fut in zip(ops, futs):
            try:
                results.append(fut.result())
            except nbd.Error as e:
                self.fail("%r failed: %s (errno %s)" % (op, e, e.errno))
        ambiguous = []
        for op, res in zip(ops, results):
            if op.kind == "read":
                msg = describe_diff(res, self.model[op.off:op.end()], op.off,
                                    "read %r" % op)
                if msg:
                    self.fail(msg)
            else:
                a = self.apply(op)
                if a:
                    ambiguous.append(a)
        for (start, end) in ambiguous:
            got = self.h0.pread(end - start, start)
            if got != bytes(end - start) and got != self.model[start:end]:
                self.fail("after a trim to the end of the disk, the short "
                          "last cluster [%d, %d) is neither zero nor "
                          "unchanged: %s" %
                          (start, end,
                           describe_diff(got, self.model[start:end], start)))
            self.model[start:end] = got

    def apply(self, op):
        m = self.model
        if op.kind == "write":
            m[op.off:op.end()] = op.data
        elif op.kind == "zero":
            m[op.off:op.end()] = bytes(op.n)
        elif op.kind == "trim":
            a = rup(op.off, self.tu)
            b = rdown(op.end(), self.tu)
            if b > a:
                m[a:b] = bytes(b - a)
            tail = rdown(self.size, self.tu)
            if op.end() == self.size and tail != self.size and op.off <= tail:
                return (tail, self.size)
        return None

    def fail(self, msg):
        print("random-io: last batches (op i on connection i):",
              file=sys.stderr)
        for ops in self.log[-10:]:
            print("   ", ops, file=sys.stderr)
        die(msg)

    def check_all(self, h=None, what="export"):
        h = h or self.h0
        got = read_all(h, self.size)
        msg = describe_diff(got, self.model, 0, what)
        if msg:
            self.fail(msg)

    # --- generating operations --------------------------------------------

    def rand_len(self):
        r = self.rng.random()
        if r < 0.45:
            return self.rng.randint(1, 8 * KiB)
        if r < 0.85:
            return self.rng.randint(1, min(3 * self.cs + 1, 256 * KiB))
        return self.rng.randint(1, 1 * MiB)

    def rand_range(self):
        n = self.rand_len()
        r = self.rng.random()
        nclusters = rup(self.size, self.cs) // self.cs
        if r < 0.3:                     # starts on a cluster boundary
            off = self.rng.randrange(nclusters) * self.cs
        elif r < 0.6:                   # crosses a cluster boundary
            k = self.rng.randrange(1, nclusters)
            off = k * self.cs - self.rng.randint(1, min(n, self.cs))
        else:
            off = self.rng.randrange(self.size)
        off = max(0, min(off, self.size - 1))
        n = min(n, self.size - off)
        return off, n

    def aligned_range(self):
        """Whole clusters, not touching the short last cluster."""
        full = rdown(self.size, self.cs) // self.cs
        k = self.rng.randint(1, max(1, min(4, (2 * MiB) // self.cs)))
        k = min(k, full)
        first = self.rng.randrange(0, full - k + 1)
        return first * self.cs, k * self.cs

    def rand_op(self):
        r = self.rng.random()
        if r < 0.55:
            off, n = self.rand_range()
            flags = nbd.CMD_FLAG_FUA if self.rng.random() < 0.1 else 0
            return Op("write", off, n, flags, self.rng.randbytes(n))
        if r < 0.68:
            off, n = self.rand_range()
            flags = nbd.CMD_FLAG_NO_HOLE if self.rng.random() < 0.4 else 0
            if self.rng.random() < 0.1:
                flags |= nbd.CMD_FLAG_FUA
            return Op("zero", off, n, flags)
        if r < 0.75:
            off, n = self.aligned_range()
            flags = nbd.CMD_FLAG_FAST_ZERO if self.fast_zero else 0
            return Op("zero", off, n, flags)
        if r < 0.90:
            if self.rng.random() < 0.5:
                off, n = self.aligned_range()
            else:
                off, n = self.rand_range()
            return Op("trim", off, n)
        off, n = self.rand_range()
        return Op("read", off, n)

    def rand_batch(self):
        ops = []
        want = self.rng.randint(1, len(self.handles))
        tries = 0
        while len(ops) < want and tries < 20:
            tries += 1
            op = self.rand_op()
            if any(op.off < o.end() and o.off < op.end() for o in ops):
                continue
            ops.append(op)
        return ops

    # --- the modes --------------------------------------------------------

    def fixed_cases(self):
        """The cases the spec names, whatever the cluster size."""
        cs, size, rng = self.cs, self.size, self.rng
        cases = [
            Op("write", 65535, 1, 0, b"\x5a"),
            # 100 KiB from 300 KiB: three clusters at 64K.
            Op("write", 300 * KiB, 100 * KiB, 0, rng.randbytes(100 * KiB)),
            Op("write", 0, 1, 0, b"\x01"),
            Op("write", size - 1, 1, 0, b"\xfe"),
            Op("write", size - 100000, 99999, nbd.CMD_FLAG_FUA,
               rng.randbytes(99999)),
            Op("zero", 3 * 65536 + 5, 1, 0),
            Op("zero", 5 * cs + 17, cs, 0),          # straddles two clusters
            Op("trim", 7 * 65536 + 10, 100, 0),     # inside one cluster
            Op("trim", 9 * cs, cs, 0),               # exactly one cluster
            Op("trim", 12 * cs - 1, cs + 2, 0),      # one cluster + 1 byte
                                                     # either side
            Op("zero", 16 * cs, cs,
               nbd.CMD_FLAG_FAST_ZERO if self.fast_zero else 0),
            Op("trim", rdown(size - 1, cs) - cs, size - rdown(size - 1, cs) + cs, 0),
        ]
        for op in cases:
            if op.end() <= size:
                self.run_batch([op])
        self.check_all(what="export after the fixed cases")

    def mode_random(self):
        a = self.args
        self.load_model(a.base)
        self.fast_zero = self.h0.can_fast_zero()
        info("size %d, cluster size %d, %d connections, fast zero %s" %
             (self.size, self.cs, len(self.handles), self.fast_zero))
        pref = self.h0.get_block_size(nbd.SIZE_PREFERRED)
        if pref != self.cs and not a.ignore_hints:
            die("preferred block size %d, expected the cluster size %d" %
                (pref, self.cs))
        self.fixed_cases()
        for i in range(a.batches):
            self.run_batch(self.rand_batch())
            if i % 50 == 49:
                # Spot checks through every connection.
                for h in self.handles:
                    off, n = self.rand_range()
                    msg = describe_diff(h.pread(n, off),
                                        self.model[off:off + n], off,
                                        "spot check")
                    if msg:
                        self.fail(msg)
        self.check_all(self.h0, "export via connection 0")
        self.check_all(self.handles[-1], "export via the last connection")
        self.h0.flush()
        with open(a.ref, "wb") as f:
            f.write(self.model)
        info("%d batches done, model written to %s" % (a.batches, a.ref))

    def mode_same_cluster(self):
        a = self.args
        self.load_model(a.base)
        cs, rng, conns = self.cs, self.rng, len(self.handles)
        nclusters = rdown(self.size, cs) // cs
        chosen = rng.sample(range(nclusters), min(a.clusters, nclusters))
        for c in chosen:
            start = c * cs
            # 2*conns pieces; writer k gets piece 2k, or 2k and 2k+1 when
            # there are no gaps.  Gaps must keep the base's bytes.
            cuts = sorted(rng.sample(range(1, cs), 2 * conns - 1))
            bounds = [0] + cuts + [cs]
            gaps = rng.random() < 0.5
            ops = []
            for k in range(conns):
                lo = bounds[2 * k]
                hi = bounds[2 * k + 1] if gaps else bounds[2 * k + 2]
                off, n = start + lo, hi - lo
                if rng.random() < 0.2:
                    ops.append(Op("zero", off, n, 0))
                else:
                    ops.append(Op("write", off, n, 0, rng.randbytes(n)))
            self.run_batch(ops, together=True)
            got = self.h0.pread(cs, start)
            msg = describe_diff(got, self.model[start:start + cs], start,
                                "cluster %d after concurrent writes %r" %
                                (c, ops))
            if msg:
                die(msg)
        self.check_all(what="export after the concurrent writes")
        self.h0.flush()
        with open(a.ref, "wb") as f:
            f.write(self.model)
        info("%d clusters written by %d connections at once" %
             (len(chosen), conns))

    def mode_verify(self):
        self.load_model(self.args.ref)
        # Split the disk between the connections, read in parallel.
        conns = len(self.handles)
        part = rup(rup(self.size, conns) // conns, 4096)

        def check_part(k):
            lo = k * part
            hi = min(self.size, lo + part)
            off = lo
            while off < hi:
                n = min(4 * MiB, hi - off)
                msg = describe_diff(self.handles[k].pread(n, off),
                                    self.model[off:off + n], off,
                                    "export vs %s" % self.args.ref)
                if msg:
                    return msg
                off += n
            return None

        for msg in self.pool.map(check_part,
                                 [k for k in range(conns) if k * part < self.size]):
            if msg:
                die(msg)
        info("export equals %s" % self.args.ref)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["random", "same-cluster", "verify"])
    p.add_argument("--uri", required=True)
    p.add_argument("--base")
    p.add_argument("--ref", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cluster-size", type=int, default=65536)
    p.add_argument("--trim-unit", type=int, default=0,
                   help="what trim releases (default: the cluster size)")
    p.add_argument("--batches", type=int, default=400)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--conns", type=int, default=4)
    # For trying the driver against another server (qemu-nbd).
    p.add_argument("--ignore-hints", action="store_true")
    args = p.parse_args()
    t = Tester(args)
    try:
        if args.mode == "random":
            t.mode_random()
        elif args.mode == "same-cluster":
            t.mode_same_cluster()
        else:
            t.mode_verify()
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        die("unexpected exception")
    t.close()


if __name__ == "__main__":
    main()
