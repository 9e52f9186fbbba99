#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# Usage: scripts/nm-cycles.py build/cow/.libs/libcow_la-*.o (after make):
# which engine object file calls which, and any call cycles between them.
# Call graph between the engine's object files from nm: file A -> B when A
# uses a symbol B defines.  Prints edges among the given files and cycles;
# exits 1 if there is a cycle (tests/test-api-prefixes.sh runs it).
import subprocess, sys, itertools
objs = sys.argv[1:]
defs, undefs = {}, {}
for o in objs:
    name = o.split('libcow_la-')[-1].rsplit('/', 1)[-1].replace('.o', '')
    out = subprocess.run(['nm', o], capture_output=True, text=True).stdout
    defs[name] = {l.split()[-1] for l in out.splitlines() if len(l.split()) == 3 and l.split()[1] in 'TDBR'}
    undefs[name] = {l.split()[-1] for l in out.splitlines() if l.split()[0] == 'U'}
edges = {a: {b for b in defs if b != a and undefs[a] & defs[b]} for a in defs}
for a in sorted(edges):
    for b in sorted(edges[a]):
        print(f'{a} -> {b}: {" ".join(sorted(undefs[a] & defs[b]))}')
# cycles: strongly connected components
idx, low, st, on, sccs, c = {}, {}, [], set(), [], [0]
def strong(v):
    idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
    for w in edges[v]:
        if w not in idx: strong(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        s = []
        while True:
            w = st.pop(); on.discard(w); s.append(w)
            if w == v: break
        if len(s) > 1: sccs.append(s)
for v in edges:
    if v not in idx: strong(v)
print('cycles:', sccs if sccs else 'none')
sys.exit(1 if sccs else 0)
