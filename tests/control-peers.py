#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Misbehaving peers of a control socket, for test-control.sh.

  trickle SOCKET INTERVAL
      connect and send one byte (never a newline) every INTERVAL seconds
      until the server ends the connection; print the milliseconds that took
      and the server's last words ("never" after 60 s)
  hold SOCKET N SECONDS READY
      open N connections that send nothing, create the file READY once
      all are connected, keep them SECONDS, then close them
  noread SOCKET SECONDS READY WORD...
      send the request WORD... and never read the reply; create READY
      once sent, keep the connection SECONDS
  many SOCKET N WORD...
      connect N clients, then let each send the request WORD... and read
      its reply, all at once; print each reply's first line and its
      number of lines ("ok 3"), one line per client
  silent SOCKET READY
      listen on SOCKET, accept every connection and never answer; create
      READY once listening; run until killed
  full SOCKET READY
      listen on SOCKET and never accept, with the listen queue filled by
      our own connections; run until killed
"""

import os
import select
import socket
import sys
import threading
import time


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def touch(path):
    with open(path, "w"):
        pass


def encode(word):
    if word == "":
        return "-"
    out = []
    for i, ch in enumerate(word.encode()):
        c = chr(ch)
        if c.isascii() and (c.isalnum() or c in "._/:@+,=" or
                            (c == "-" and i > 0)):
            out.append(c)
        else:
            out.append("%%%02X" % ch)
    return "".join(out)


def request(words):
    return (" ".join(encode(w) for w in words) + "\n").encode()


def read_all(s, limit):
    """What the server still sends until it closes (at most limit s)."""
    data = b""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        r, _, _ = select.select([s], [], [], 0.2)
        if not r:
            continue
        try:
            b = s.recv(65536)
        except ConnectionResetError:
            break
        if not b:
            break
        data += b
    return data


def trickle(path, interval):
    s = connect(path)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        r, _, _ = select.select([s], [], [], interval)
        if r:
            break
        try:
            s.send(b"s")
        except (BrokenPipeError, ConnectionResetError):
            break
    else:
        print("never")
        return
    took = time.monotonic() - t0
    said = read_all(s, 5).decode(errors="replace").split("\n")[0]
    print("%d %s" % (took * 1000, said))


def hold(path, n, seconds, ready):
    socks = [connect(path) for _ in range(n)]
    touch(ready)
    time.sleep(seconds)
    for s in socks:
        s.close()


def noread(path, seconds, ready, words):
    s = connect(path)
    s.sendall(request(words))
    touch(ready)
    time.sleep(seconds)
    s.close()


def many(path, n, words):
    socks = [connect(path) for _ in range(n)]
    replies = [None] * n
    go = threading.Barrier(n)

    def client(i):
        go.wait()
        socks[i].sendall(request(words))
        socks[i].shutdown(socket.SHUT_WR)
        replies[i] = read_all(socks[i], 30)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in replies:
        lines = r.decode(errors="replace").split("\n")
        complete = len(lines) >= 3 and lines[-2] == "." and lines[-1] == ""
        print("%s %d" % (lines[0], len(lines) - 3 if complete else -1))


def silent(path, ready):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    touch(ready)
    held = []
    while True:
        c, _ = srv.accept()
        held.append(c)


def full(path, ready):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(0)
    held = []
    # Fill the queue: connect without blocking until the kernel refuses.
    while True:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect(path)
        except BlockingIOError:
            c.close()
            break
        held.append(c)
    touch(ready)
    while True:
        time.sleep(60)


def main(argv):
    cmd, path = argv[1], argv[2]
    if cmd == "trickle":
        trickle(path, float(argv[3]))
    elif cmd == "hold":
        hold(path, int(argv[3]), float(argv[4]), argv[5])
    elif cmd == "noread":
        noread(path, float(argv[3]), argv[4], argv[5:])
    elif cmd == "many":
        many(path, int(argv[3]), argv[4:])
    elif cmd == "silent":
        silent(path, argv[3])
    elif cmd == "full":
        full(path, argv[3])
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main(sys.argv)
