#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Control-socket peers and checks for test-events.sh.

  ctl SOCKET WORD...
      one request; print the payload lines as they come (encoded words),
      or "error ERRNO MESSAGE" and exit 1
  stall SOCKET READY GO OUT
      subscribe to every disk's events, read "ok", create READY, then read
      nothing until the file GO exists; then read what is there until the
      end line, the end of the connection or 3 s of silence, and write to
      OUT: "lines N lost COUNT end dot|cut|open"
  burst SOCKET DISK NAME N
      N snapshot requests of DISK named NAME, one after the other (NAME
      exists: each fails, each is a snapshot-failed event); print the
      number of error replies and the slowest reply in ms
  limit SOCKET
      subscribe until the server refuses; print "subscribed K error
      ERRNO MESSAGE", then whether a status request still gets its reply
      ("status ok"), then close them all
  check JSONL KIND...
      the events of the JSON Lines file, in order, are exactly KIND...
      (a KIND "job-progress*" stands for any number of them, percents
      rising); each has the fields the protocol documents, typed
"""

import json
import os
import re
import socket
import subprocess
import sys
import time


def enc(w):
    """A word as the protocol sends it (percent-encoded; "" is "-")."""
    if w == "":
        return "-"
    out = ""
    for i, b in enumerate(w.encode()):
        c = chr(b)
        if (c.isascii() and c.isalnum()) or c in "._/:@+,=" \
           or (c == "-" and i > 0):
            out += c
        else:
            out += "%%%02X" % b
    return out


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def send_request(s, words):
    s.sendall((" ".join(enc(w) for w in words) + "\n").encode())


def read_line(f):
    line = f.readline()
    return line.decode().rstrip("\n") if line else None


def ctl(path, words):
    s = connect(path)
    send_request(s, words)
    f = s.makefile("rb")
    first = read_line(f)
    if first is None or first.startswith("error "):
        print(first)
        sys.exit(1)
    while True:
        line = read_line(f)
        if line is None or line == ".":
            break
        print(line, flush=True)


def stall(path, ready, go, out):
    s = connect(path)
    send_request(s, ["events"])
    f = s.makefile("rb", buffering=0)
    first = b""
    while not first.endswith(b"\n"):
        c = s.recv(1)
        if not c:
            break
        first += c
    if first != b"ok\n":
        sys.exit("stall: the subscription was refused: %r" % first)
    open(ready, "w").close()
    for _ in range(2400):
        if os.path.exists(go):
            break
        time.sleep(0.05)
    s.settimeout(3)
    data = b""
    end = "open"
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                end = "cut"
                break
            data += chunk
            if data.endswith(b"\n.\n"):
                end = "dot"
                break
    except socket.timeout:
        pass
    except ConnectionResetError:
        end = "cut"
    lines = [l for l in data.decode().split("\n") if l and l != "."]
    lost = 0
    for l in lines:
        w = l.split(" ")
        if len(w) >= 4 and w[2] == "lost":
            lost += int(w[3].split("=", 1)[1])
    with open(out, "w") as o:
        o.write("lines %d lost %d end %s\n" % (len(lines), lost, end))


def burst(path, disk, name, n):
    errors = 0
    slowest = 0.0
    for _ in range(n):
        t0 = time.monotonic()
        s = connect(path)
        send_request(s, ["snapshot", disk, name, ""])
        f = s.makefile("rb")
        first = read_line(f)
        s.close()
        slowest = max(slowest, (time.monotonic() - t0) * 1000)
        if first and first.startswith("error "):
            errors += 1
    print("%d %.0f" % (errors, slowest))


def limit(path, *cmd):
    subs = []
    refusal = None
    for _ in range(64):
        s = connect(path)
        send_request(s, ["events"])
        f = s.makefile("rb")
        first = read_line(f)
        if first == "ok":
            subs.append((s, f))
            continue
        refusal = first
        s.close()
        break
    print("subscribed %d %s" % (len(subs), refusal))
    s = connect(path)
    send_request(s, ["status"])
    f = s.makefile("rb")
    print("status %s" % read_line(f))
    s.close()
    if cmd:
        # A command run while every stream is taken (cowchain wait falls
        # back to looking at the jobs at intervals).
        rc = subprocess.run(list(cmd), timeout=30).returncode
        print("command %d" % rc)
    for s, f in subs:
        s.close()


ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FIELDS = {
    "snapshot": {"name": str, "layer": str, "pause-ns": int,
                 "duration-ms": (int, float)},
    "snapshot-failed": {"name": str, "errno": int, "error": str,
                        "duration-ms": (int, float)},
    "revert": {"name": str, "dropped": int, "layer": str,
               "duration-ms": (int, float)},
    "revert-failed": {"name": str, "errno": int, "error": str,
                      "duration-ms": (int, float)},
    "job-start": {"job": str, "top": str, "base": str, "total": int,
                  "speed": int},
    "job-progress": {"job": str, "top": str, "base": str, "percent": int,
                     "done": int, "total": int},
    "job-end": {"job": str, "top": str, "base": str, "result": str,
                "done": int, "total": int, "duration-ms": (int, float)},
    "degraded": {"errno": int, "error": str},
    "lost": {"count": int},
}


def check(path, kinds):
    evs = [json.loads(l) for l in open(path)]
    got = [e["event"] for e in evs]
    # Match KIND... against got, "job-progress*" taking any number.
    i = 0
    for k in kinds:
        if k.endswith("*"):
            while i < len(got) and got[i] == k[:-1]:
                i += 1
            continue
        if i >= len(got) or got[i] != k:
            sys.exit("check: event %d is %s, expected %s\nall: %s"
                     % (i, got[i] if i < len(got) else "(none)", k, got))
        i += 1
    if i != len(got):
        sys.exit("check: more events than expected: %s" % got[i:])
    last_pct = 0
    for e in evs:
        if e.get("version") != 1 or not ISO.match(e.get("time", "")) \
           or not isinstance(e.get("disk"), str):
            sys.exit("check: bad envelope: %s" % e)
        want = dict(FIELDS[e["event"]])
        if e["event"] == "job-end" and e["result"] != "ok":
            want.update({"errno": int, "error": str})
        for k, t in want.items():
            if k not in e or not isinstance(e[k], t) or isinstance(e[k], bool):
                sys.exit("check: %s lacks %s (%s): %s"
                         % (e["event"], k, t, e))
        extra = set(e) - set(want) - {"version", "time", "disk", "event"}
        if extra:
            sys.exit("check: %s has undocumented fields %s" % (e["event"],
                                                               extra))
        if e["event"] == "job-start":
            last_pct = 0
        if e["event"] == "job-progress":
            if e["percent"] not in (25, 50, 75) or e["percent"] <= last_pct:
                sys.exit("check: progress out of order: %s" % e)
            last_pct = e["percent"]
    print("%d events as expected" % len(evs))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "ctl":
        ctl(args[0], args[1:])
    elif cmd == "stall":
        stall(args[0], args[1], args[2], args[3])
    elif cmd == "burst":
        burst(args[0], args[1], args[2], int(args[3]))
    elif cmd == "limit":
        limit(args[0], *args[1:])
    elif cmd == "check":
        check(args[0], args[1:])
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
