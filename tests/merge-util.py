# SPDX-License-Identifier: BSD-3-Clause
"""Helpers of tests/test-merge.sh (background merges through a server).

usage: merge-util.py COMMAND ARGS...

  compare URI FILE WHAT
      the whole export, read over NBD, equals FILE byte for byte
  writer URI MODEL STOPFILE SEED
      a guest that keeps writing (random offsets and lengths, not aligned
      to clusters) until STOPFILE exists, and at least 100 times; MODEL (a
      raw file of the disk's contents) is updated to match, then FLUSH.
      STOPFILE.started is created after the first write.
  wait-job COWCHAIN STATE [SECONDS]
      poll `cowchain jobs --output=json` (control socket from
      $COWCHAIN_CONTROL) until the job's state is STATE; fail if it ends
      in another state or the time runs out (default 60 s)
  job-field COWCHAIN FIELD
      one field of the (only) job of `cowchain jobs --output=json`
  fill URI OFFSET LENGTH REQUEST SEED MODEL
      write LENGTH seeded random bytes at OFFSET in REQUEST-byte writes,
      then FLUSH; the same into the raw file MODEL
  trim URI OFFSET LENGTH MODEL
      trim, FLUSH; zeroes into MODEL (a trimmed range reads zeroes)
  check-chain STATEDIR
      the chain that `qemu-img info --backing-chain` finds from the
      manifest's active layer is the manifest's chain (layers top down,
      then the base unless the disk was pulled self-contained), and the
      directory holds no layer file that the manifest does not name;
      prints the number of images in the chain
  layers STATEDIR
      the manifest's layer files, bottom to top, one a line
"""
import json
import os
import random
import subprocess
import sys
import time
import urllib.parse

sys.path.insert(0, os.environ.get("testsdir", os.path.dirname(__file__)))
from cowtest import connect, read_all, describe_diff  # noqa: E402


def die(msg):
    sys.exit("merge-util: " + msg)


def compare(uri, path, what):
    h = connect(uri)
    got = read_all(h, chunk=256 << 10)    # faster than big reads here
    h.shutdown()
    with open(path, "rb") as f:
        want = f.read()
    msg = describe_diff(got, want, 0, what)
    if msg is not None:
        die(msg)


def writer(uri, model_path, stopfile, seed):
    rng = random.Random(seed)
    with open(model_path, "rb") as f:
        model = bytearray(f.read())
    size = len(model)
    h = connect(uri)
    n = 0
    while n < 100 or not os.path.exists(stopfile):
        off = rng.randrange(size - 1)
        length = min(rng.randint(1, 128 << 10), size - off)
        data = rng.randbytes(length)
        h.pwrite(data, off)
        model[off:off + length] = data
        n += 1
        if n == 1:
            open(stopfile + ".started", "w").close()
    h.flush()
    h.shutdown()
    with open(model_path + ".tmp", "wb") as f:
        f.write(model)
    os.rename(model_path + ".tmp", model_path)
    print(n)


def update_model(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def fill(uri, offset, length, request, seed, model):
    data = random.Random(seed).randbytes(length)
    h = connect(uri)
    for o in range(0, length, request):
        h.pwrite(data[o:o + request], offset + o)
    h.flush()
    h.shutdown()
    update_model(model, offset, data)


def trim(uri, offset, length, model):
    h = connect(uri)
    h.trim(length, offset)
    h.flush()
    h.shutdown()
    update_model(model, offset, bytes(length))


def jobs(cow):
    out = subprocess.run([cow, "jobs", "--output=json"], check=True,
                         stdout=subprocess.PIPE).stdout
    v = json.loads(out)["jobs"]
    if len(v) != 1:
        die("expected one disk in cowchain jobs, got %r" % v)
    return v[0]


def wait_job(cow, state, seconds):
    end = time.monotonic() + seconds
    while True:
        j = jobs(cow)
        if j["state"] == state:
            print(json.dumps(j))
            return
        if j["state"] not in ("running", "paused"):
            die("job ended as %s, not %s: %r" % (j["state"], state, j))
        if time.monotonic() > end:
            die("job not %s after %g s: %r" % (state, seconds, j))
        time.sleep(0.02)


def manifest(statedir):
    base, layers = None, []
    with open(os.path.join(statedir, "manifest")) as f:
        for line in f:
            w = line.split()
            if w[0] == "base":
                base = urllib.parse.unquote(w[1])
            elif w[0] == "layer":
                layers.append(urllib.parse.unquote(w[1]))
    return base, layers


def real(name):
    return name if "://" in name else os.path.realpath(name)


def check_chain(statedir):
    base, layers = manifest(statedir)
    on_disk = sorted(f for f in os.listdir(statedir) if f.startswith("layer-"))
    if on_disk != sorted(layers):
        die("%s: layer files %s, but the manifest names %s"
            % (statedir, on_disk, layers))
    active = os.path.join(statedir, layers[-1])
    out = subprocess.run(["qemu-img", "info", "-U", "--backing-chain",
                          "--output=json", active], check=True,
                         stdout=subprocess.PIPE).stdout
    got = [real(i["filename"]) for i in json.loads(out)]
    want = [real(os.path.join(statedir, f)) for f in reversed(layers)]
    if base is not None:
        want.append(real(base))
    if got != want:
        die("qemu-img info --backing-chain %s:\n  got  %s\n  want %s"
            % (active, got, want))
    print(len(got))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "compare":
        compare(*args)
    elif cmd == "writer":
        writer(args[0], args[1], args[2], int(args[3]))
    elif cmd == "wait-job":
        wait_job(args[0], args[1], float(args[2]) if len(args) > 2 else 60)
    elif cmd == "job-field":
        print(jobs(args[0])[args[1]])
    elif cmd == "fill":
        fill(args[0], *(int(a) for a in args[1:5]), args[5])
    elif cmd == "trim":
        trim(args[0], int(args[1]), int(args[2]), args[3])
    elif cmd == "check-chain":
        check_chain(args[0])
    elif cmd == "layers":
        for f in manifest(args[0])[1]:
            print(f)
    else:
        die("unknown command " + cmd)


if __name__ == "__main__":
    main()
