#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
# qcow2-patch.py FILE OP...: read or damage a qcow2 image, for the tests
# (the one byte-patcher they share; shell tests call it as qcow2_patch,
# from tests/functions.sh).  The operations run in order; each read
# prints its value on a line of its own (decimal).
#
#   FIELD              read a header field (names as in QEMU's
#                      docs/interop/qcow2.txt: magic, version,
#                      backing_file_offset, backing_file_size,
#                      cluster_bits, size, crypt_method, l1_size,
#                      l1_table_offset, refcount_table_offset,
#                      refcount_table_clusters, nb_snapshots,
#                      snapshots_offset, incompatible_features,
#                      compatible_features, autoclear_features,
#                      refcount_order, header_length), or cluster_size
#   FIELD=VALUE        write it (big-endian, at its width)
#   FIELD|=VALUE       set bits in it
#   l1[I], l1[I]=V     L1 entry I
#   l2[GC], l2[GC]=V   the L2 entry that maps guest cluster GC (with
#                      extended L2 entries: its descriptor)
#   l2bm[GC], l2bm[GC]=V
#                      the subcluster bitmap of that entry (extended L2
#                      entries only)
#   reftable[I], reftable[I]=V
#                      refcount table entry I
#   refcount[C], refcount[C]=V
#                      the refcount of host cluster C (any refcount width)
#   ENTRY|=V           for any of the above: set bits
#   grow=N             append N clusters, each with refcount 1 (leaked),
#                      in existing refcount blocks; print the first one
#   @OFFSET=HEX        write raw bytes (hex digits) at OFFSET
#   @OFFSET=str:TEXT   write TEXT's bytes at OFFSET
#   @OFFSET=from:PATH:LENGTH
#                      write the first LENGTH bytes of PATH at OFFSET
#
# Numbers may be decimal or 0x hex; values are taken modulo 2^64 (bash
# arithmetic is signed).  Header fields are read from the header and
# written alone, so a file that is not (yet) a qcow2 image can be given a
# header field by field; table operations read the header first.

import os
import re
import struct
import sys

# name: (offset, size in bytes)
FIELDS = {
    "magic": (0, 4),
    "version": (4, 4),
    "backing_file_offset": (8, 8),
    "backing_file_size": (16, 4),
    "cluster_bits": (20, 4),
    "size": (24, 8),
    "crypt_method": (32, 4),
    "l1_size": (36, 4),
    "l1_table_offset": (40, 8),
    "refcount_table_offset": (48, 8),
    "refcount_table_clusters": (56, 4),
    "nb_snapshots": (60, 4),
    "snapshots_offset": (64, 8),
    "incompatible_features": (72, 8),
    "compatible_features": (80, 8),
    "autoclear_features": (88, 8),
    "refcount_order": (96, 4),
    "header_length": (100, 4),
}

# Offset bits of an L1 or L2 entry (standard cluster).
OFFSET_MASK = 0x00fffffffffffe00


def number(s):
    return int(s, 0) & (2**64 - 1)


class Image:
    def __init__(self, path):
        self.path = path
        self.f = open(path, "r+b")
        self._parsed = False

    def read(self, off, n):
        self.f.seek(off)
        b = self.f.read(n)
        if len(b) != n:
            sys.exit("qcow2-patch: %s: short read at %d" % (self.path, off))
        return b

    def write(self, off, data):
        self.f.seek(off)
        self.f.write(data)

    def get(self, off, n):
        return int.from_bytes(self.read(off, n), "big")

    def put(self, off, n, v):
        self.write(off, (v & ((1 << (8 * n)) - 1)).to_bytes(n, "big"))

    def field(self, name):
        return self.get(*FIELDS[name])

    def parse(self):
        if self._parsed:
            return
        self.version = self.field("version")
        self.cluster_bits = self.field("cluster_bits")
        self.cs = 1 << self.cluster_bits
        self.l1_offset = self.field("l1_table_offset")
        self.reftable_offset = self.field("refcount_table_offset")
        # Version 2 has no refcount_order: 16-bit refcounts.
        self.order = self.field("refcount_order") if self.version >= 3 else 4
        self.bits = 1 << self.order
        self.per_block = self.cs * 8 // self.bits
        # Extended L2 entries (incompatible feature bit 4): 16 bytes each.
        self.l2e = 16 if (self.version >= 3 and
                          self.field("incompatible_features") & 16) else 8
        self._parsed = True

    # Where an entry lives: (offset, size in bytes).
    def l1_slot(self, i):
        self.parse()
        return self.l1_offset + 8 * i, 8

    def l2_slot(self, gc):
        self.parse()
        per = self.cs // self.l2e
        l2 = self.get(self.l1_offset + 8 * (gc // per), 8) & OFFSET_MASK
        if not l2:
            sys.exit("qcow2-patch: no L2 table for guest cluster %d" % gc)
        return l2 + self.l2e * (gc % per), 8

    def l2bm_slot(self, gc):
        off, n = self.l2_slot(gc)
        if self.l2e != 16:
            sys.exit("qcow2-patch: no subcluster bitmaps without extended "
                     "L2 entries")
        return off + 8, 8

    def reftable_slot(self, i):
        self.parse()
        return self.reftable_offset + 8 * i, 8

    def block(self, cluster):
        self.parse()
        rb = self.get(self.reftable_offset + 8 * (cluster // self.per_block), 8)
        rb &= ~0x1ff
        if not rb:
            sys.exit("qcow2-patch: no refcount block for cluster %d" % cluster)
        return rb, cluster % self.per_block

    def getref(self, cluster):
        rb, i = self.block(cluster)
        bit = i * self.bits
        raw = self.get(rb + bit // 8, max(1, self.bits // 8))
        if self.bits < 8:
            return (raw >> (bit % 8)) & ((1 << self.bits) - 1)
        return raw

    def setref(self, cluster, v):
        rb, i = self.block(cluster)
        bit = i * self.bits
        if self.bits < 8:
            old = self.read(rb + bit // 8, 1)[0]
            mask = ((1 << self.bits) - 1) << (bit % 8)
            new = (old & ~mask) | ((v << (bit % 8)) & mask)
            self.write(rb + bit // 8, bytes([new]))
        else:
            self.put(rb + bit // 8, self.bits // 8, v)

    def grow(self, n):
        self.parse()
        size = os.path.getsize(self.path)
        first = (size + self.cs - 1) // self.cs
        os.truncate(self.path, (first + n) * self.cs)
        for c in range(first, first + n):
            self.setref(c, 1)
        return first


def raw_bytes(spec):
    if spec.startswith("str:"):
        return spec[4:].encode()
    if spec.startswith("from:"):
        path, length = spec[5:].rsplit(":", 1)
        with open(path, "rb") as f:
            data = f.read(number(length))
        if len(data) != number(length):
            sys.exit("qcow2-patch: %s is shorter than %s bytes" % (path, length))
        return data
    return bytes.fromhex(spec)


OP = re.compile(r"^(?:@(?P<raw>\w+)=(?P<bytes>.*)"
                r"|(?P<name>[a-z_0-9]+)(?:\[(?P<index>\w+)\])?"
                r"(?:(?P<op>\|?=)(?P<value>.*))?)$", re.S)


def run(img, spec):
    m = OP.match(spec)
    if not m:
        sys.exit("qcow2-patch: cannot parse %r" % spec)
    if m["raw"] is not None:
        img.write(number(m["raw"]), raw_bytes(m["bytes"]))
        return
    name, op = m["name"], m["op"]
    value = number(m["value"]) if op else None
    if m["index"] is not None:
        i = number(m["index"])
        if name == "refcount":
            if op == "=":
                img.setref(i, value)
            elif op == "|=":
                img.setref(i, img.getref(i) | value)
            else:
                print(img.getref(i))
            return
        slots = {"l1": img.l1_slot, "l2": img.l2_slot, "l2bm": img.l2bm_slot,
                 "reftable": img.reftable_slot}
        if name not in slots:
            sys.exit("qcow2-patch: no table %r" % name)
        off, n = slots[name](i)
    elif name == "cluster_size" and not op:
        img.parse()
        print(img.cs)
        return
    elif name == "grow" and op == "=":
        print(img.grow(value))
        return
    elif name in FIELDS:
        off, n = FIELDS[name]
    else:
        sys.exit("qcow2-patch: no header field %r" % name)
    if op == "=":
        img.put(off, n, value)
    elif op == "|=":
        img.put(off, n, img.get(off, n) | value)
    else:
        print(img.get(off, n))


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: qcow2-patch.py FILE OP...")
    img = Image(sys.argv[1])
    for spec in sys.argv[2:]:
        run(img, spec)
        img.f.flush()


if __name__ == "__main__":
    main()
