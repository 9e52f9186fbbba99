# SPDX-License-Identifier: BSD-3-Clause
# Helpers shared by the Python parts of cowchain's shell tests.
# Run with /usr/bin/python3 (the Python that has libnbd's module).

import nbd

CHUNK = 4 << 20


def connect(uri, strict=True):
    """A libnbd handle connected to uri."""
    h = nbd.NBD()
    if not strict:
        # Send requests libnbd would refuse itself, so that the server
        # has to deal with them.
        h.set_strict_mode(0)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def read_all(h, size=None, chunk=CHUNK):
    """The whole export as bytes."""
    if size is None:
        size = h.get_size()
    out = bytearray()
    off = 0
    while off < size:
        n = min(chunk, size - off)
        out += h.pread(n, off)
        off += n
    return bytes(out)


def describe_diff(actual, expected, base_offset=0, what="data"):
    """None if equal, else a message naming the first difference."""
    if len(actual) != len(expected):
        return "%s: length %d, expected %d" % (what, len(actual), len(expected))
    if actual == expected:
        return None
    # Find the first differing byte quickly: compare 4 KiB blocks first.
    n = len(actual)
    i = 0
    while i < n and actual[i:i + 4096] == expected[i:i + 4096]:
        i += 4096
    while actual[i] == expected[i]:
        i += 1
    j = i
    while j < n and actual[j] != expected[j]:
        j += 1
    return ("%s differs at offset %d (0x%x) for %d byte(s) at least: "
            "got %s..., expected %s..." %
            (what, base_offset + i, base_offset + i, j - i,
             bytes(actual[i:i + 8]).hex(), bytes(expected[i:i + 8]).hex()))


def check_equal(actual, expected, base_offset=0, what="data"):
    msg = describe_diff(actual, expected, base_offset, what)
    if msg is not None:
        raise AssertionError(msg)


def extents(h, size=None, context=nbd.CONTEXT_BASE_ALLOCATION):
    """All extents of the export as a list of (offset, length, flags),
    asking block_status repeatedly until the whole disk is covered."""
    if size is None:
        size = h.get_size()
    out = []
    off = 0
    while off < size:
        got = []

        def cb(metacontext, offset, entries, err, got=got):
            if metacontext == context:
                got.extend(entries)
            return 0

        h.block_status(min(size - off, 1 << 30), off, cb)
        if not got:
            raise AssertionError("block_status at %d returned no extents" % off)
        for i in range(0, len(got), 2):
            length, flags = got[i], got[i + 1]
            if length == 0:
                raise AssertionError("zero-length extent at %d" % off)
            length = min(length, size - off)
            out.append((off, length, flags))
            off += length
            if off >= size:
                break
    return out
