#!/usr/bin/python3
# Copied unchanged (apart from this note) from the project's shared/tools/nbd_multiconn.py,
# the client-side NBD checks used while researching the protocol; kept in the
# repo so that tests never depend on shared/ at run time.
# Multi-conn flush-consistency check (pattern from qemu iotest tests/nbd-multiconn).
# usage: /usr/bin/python3 nbd_multiconn.py URI [NCONN]
import os, sys, nbd
uri, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
hs = []
for i in range(n):
    h = nbd.NBD(); h.connect_uri(uri); hs.append(h)
if not hs[0].can_multi_conn():
    print("server does not advertise CAN_MULTI_CONN; consistency not promised"); sys.exit(2)
bad = 0
for rnd in range(50):
    data = os.urandom(65536); off = (rnd * 65536) % (hs[0].get_size() - 65536)
    w, f, r = hs[rnd % n], hs[(rnd + 1) % n], hs[(rnd + 2) % n]
    w.pwrite(data, off)          # write on conn A, wait for reply
    f.flush()                    # flush on conn B, wait for reply
    if r.pread(65536, off) != data:   # read on conn C must see it
        bad += 1
    # FUA variant: a FUA write must be visible on other connections once replied
    data2 = os.urandom(4096); w.pwrite(data2, off, nbd.CMD_FLAG_FUA)
    if r.pread(4096, off) != data2:
        bad += 1
for h in hs: h.shutdown()
print("multi-conn consistency:", "OK" if bad == 0 else f"{bad} stale reads"); sys.exit(1 if bad else 0)
