# SPDX-License-Identifier: BSD-3-Clause
"""Snapshots under a live writer, checked against a log of the writes.

One writer writes numbered 4 KiB blocks, alternating between the disks
given, one write at a time, and logs when each write started and ended.
Meanwhile snapshots are taken with the cowchain tool (atomically across
the disks when there are several), logging when each was requested and
acknowledged.  Afterwards every snapshot's frozen layers are read offline
with qemu-img and must hold exactly the writes up to one cut point P: for
each block, the last write to it with a sequence number <= P, and nothing
later; P must include every write finished before the request and no
write started after the acknowledgement.

usage: snapshot-writer.py COWCHAIN CONTROL URI... -- SECONDS SNAPSHOTS
"""
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time

import nbd

BLOCK = 4096
NBLOCKS = 512

sep = sys.argv.index("--")
cow, control = sys.argv[1], sys.argv[2]
uris = sys.argv[3:sep]
seconds, nsnaps = float(sys.argv[sep + 1]), int(sys.argv[sep + 2])
disks = [u.split("/")[3].split("?")[0] for u in uris]   # export names

handles = []
for u in uris:
    h = nbd.NBD()
    h.connect_uri(u)
    handles.append(h)

log = []            # (seq, disk index, block, t_start, t_end)
stop = threading.Event()
rng = random.Random(1234)


def writer():
    seq = 0
    while not stop.is_set():
        seq += 1
        d = seq % len(handles)
        b = rng.randrange(NBLOCKS)
        data = struct.pack("<QQ", seq, b) * (BLOCK // 16)
        t0 = time.monotonic()
        handles[d].pwrite(data, b * BLOCK)
        log.append((seq, d, b, t0, time.monotonic()))


snaps = []          # (name, t_request, t_ack)
t = threading.Thread(target=writer)
t.start()
env = dict(os.environ, COWCHAIN_CONTROL=control)
for i in range(nsnaps):
    time.sleep(seconds / nsnaps)
    name = "live%d" % i
    args = [cow, "snapshot", name] + (["--atomic"] if len(disks) > 1 else [])
    t0 = time.monotonic()
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)
    snaps.append((name, t0, time.monotonic()))
stop.set()
t.join()
for h in handles:
    h.flush()
print("%d writes, %d snapshots" % (len(log), len(snaps)))


def frozen_files(disk):
    out = subprocess.run([cow, "list", "--disk", disk, "--output=json"],
                         check=True, env=env, capture_output=True).stdout
    return {s["name"]: s["file"] for s in json.loads(out)["snapshots"]}


files = [frozen_files(d) for d in disks]
tmp = tempfile.mkdtemp()
for name, t_req, t_ack in snaps:
    seen = []       # per disk: block -> seq (0 = never written)
    for di in range(len(disks)):
        raw = os.path.join(tmp, "snap.raw")
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", files[di][name],
                        raw], check=True)
        with open(raw, "rb") as f:
            img = f.read(NBLOCKS * BLOCK)
        os.unlink(raw)
        blocks = {}
        for b in range(NBLOCKS):
            seq, bb = struct.unpack_from("<QQ", img, b * BLOCK)
            if bb == b and seq > 0 and img[b*BLOCK:(b+1)*BLOCK] == \
                    struct.pack("<QQ", seq, b) * (BLOCK // 16):
                blocks[b] = seq
            else:
                blocks[b] = 0
        seen.append(blocks)
    cut = max([0] + [s for blocks in seen for s in blocks.values()])
    expect = [dict.fromkeys(range(NBLOCKS), 0) for _ in disks]
    for seq, d, b, t0, t1 in log:
        if seq <= cut:
            expect[d][b] = seq
        if t1 < t_req and seq > cut:
            sys.exit("%s: write %d finished before the snapshot was requested "
                     "but is missing (cut %d)" % (name, seq, cut))
        if t0 > t_ack and seq <= cut:
            sys.exit("%s: write %d started after the snapshot was "
                     "acknowledged but is in it" % (name, seq))
    for di in range(len(disks)):
        if seen[di] != expect[di]:
            bad = [b for b in range(NBLOCKS) if seen[di][b] != expect[di][b]]
            sys.exit("%s: disk %s is not the state at cut %d (blocks %s: "
                     "found %s, expected %s)" % (
                         name, disks[di], cut, bad[:5],
                         [seen[di][b] for b in bad[:5]],
                         [expect[di][b] for b in bad[:5]]))
print("every snapshot is a consistent cut")
