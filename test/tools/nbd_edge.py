#!/usr/bin/python3
# Copied unchanged (apart from this note) from the project's shared/tools/nbd_edge.py,
# the client-side NBD checks used while researching the protocol; kept in the
# repo so that tests never depend on shared/ at run time.
# Edge-case probe for an NBD server via python3-libnbd (Debian 12: libnbd 1.14).
# usage: /usr/bin/python3 nbd_edge.py URI      e.g. nbd://127.0.0.1:20820  or 'nbd+unix:///?socket=/tmp/x.sock'
import errno, sys, nbd

uri = sys.argv[1]
fails = 0

ANY = "any"   # outcome unspecified by the spec: success or any error, but no disconnect

def check(name, fn, expect_errno=None):
    """expect_errno=None -> must succeed; ANY -> anything; else must fail with that errno (list allowed)."""
    global fails
    try:
        r = fn()
        ok = expect_errno is None or expect_errno == ANY
        print(("PASS " if ok else "FAIL ") + f"{name}: succeeded" + ("" if ok else f" (expected {expect_errno})"))
    except nbd.Error as e:
        exp = expect_errno if isinstance(expect_errno, (list, tuple)) else [expect_errno]
        ok = expect_errno == ANY or (expect_errno is not None and e.errnum in exp)
        print(("PASS " if ok else "FAIL ") + f"{name}: errno={e.errnum} ({errno.errorcode.get(e.errnum,'?')}) {e.string}")
    if not ok:
        fails += 1

h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
size = h.get_size()
print("size", size, "proto", h.get_protocol(), "SR", h.get_structured_replies_negotiated(),
      "tls", h.get_tls_negotiated())
for f in ("flush", "fua", "trim", "zero", "fast_zero", "cache", "df", "multi_conn"):
    print(f"can_{f} =", getattr(h, "can_" + f)())
print("is_read_only =", h.is_read_only(), "is_rotational =", h.is_rotational())
print("base:allocation =", h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
print("block sizes min/pref/max =", [h.get_block_size(k) for k in
      (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)])

# --- normal operations -------------------------------------------------
check("aligned write+read", lambda: (h.pwrite(b"\xab" * 65536, 0),
      h.pread(65536, 0) == b"\xab" * 65536 or (_ for _ in ()).throw(nbd.Error("data mismatch", errno.EIO))))
check("unaligned write 1000B @4097", lambda: h.pwrite(b"\x11" * 1000, 4097))
check("unaligned read back", lambda: h.pread(1000, 4097) == b"\x11" * 1000 or
      (_ for _ in ()).throw(nbd.Error("data mismatch", errno.EIO)))
check("write FUA", lambda: h.pwrite(b"\x5a" * 4096, 65536, nbd.CMD_FLAG_FUA))
check("flush", lambda: h.flush())
check("read last byte", lambda: h.pread(1, size - 1))
if h.can_trim():
    check("trim 1M @1M", lambda: h.trim(1 << 20, 1 << 20))
    check("trim FUA", lambda: h.trim(4096, 2 << 20, nbd.CMD_FLAG_FUA))
if h.can_zero():
    check("write_zeroes 1M @3M", lambda: h.zero(1 << 20, 3 << 20))
    check("zeroes read back", lambda: h.pread(1 << 20, 3 << 20) == bytes(1 << 20) or
          (_ for _ in ()).throw(nbd.Error("not zero", errno.EIO)))
    check("write_zeroes NO_HOLE", lambda: h.zero(4096, 5 << 20, nbd.CMD_FLAG_NO_HOLE))
    if h.can_fast_zero():
        check("write_zeroes FAST_ZERO (ok or ENOTSUP)", lambda: h.zero(4096, 6 << 20, nbd.CMD_FLAG_FAST_ZERO),
              None)
if h.can_cache():
    check("cache 1M", lambda: h.cache(1 << 20, 0))
if h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
    ext = []
    check("block_status whole disk", lambda: h.block_status(min(size, 1 << 31), 0,
          lambda ctx, off, entries, err: ext.append((ctx, off, entries)) or 0))
    print("   extents:", ext[:1])
    check("block_status REQ_ONE", lambda: h.block_status(1 << 20, 0,
          lambda ctx, off, entries, err: 0, nbd.CMD_FLAG_REQ_ONE))
if h.can_df():
    chunks = []
    check("read with DF 64k (at most one data chunk)", lambda: h.pread_structured(65536, 0,
          lambda buf, off, status, err: chunks.append(status) or 0, nbd.CMD_FLAG_DF))
    print("   chunk types:", chunks)

# --- server-side validation: turn off libnbd's client-side checks --------
h.set_strict_mode(0)
check("read past end (8 bytes over)", lambda: h.pread(512, size - 504), errno.EINVAL)
check("read at offset == size", lambda: h.pread(512, size), errno.EINVAL)
check("write past end", lambda: h.pwrite(b"x" * 512, size - 256), [errno.ENOSPC, errno.EINVAL])
check("trim past end", lambda: h.trim(4096, size), [errno.EINVAL, errno.ENOSPC])
check("write_zeroes past end", lambda: h.zero(4096, size), [errno.ENOSPC, errno.EINVAL])
check("offset+len wraps 2^64", lambda: h.pread(4096, (1 << 64) - 2048), errno.EINVAL)
check("zero-length read (unspecified; must not disconnect)", lambda: h.pread(0, 0), ANY)
check("zero-length write (unspecified)", lambda: h.pwrite(b"", 0), ANY)
check("zero-length trim (unspecified)", lambda: h.trim(0, 0), ANY)
check("unknown command flag on read (0x80)", lambda: h.pread(512, 0, 0x80), errno.EINVAL)
check("NO_HOLE flag on write (invalid for WRITE)", lambda: h.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)
check("still connected after errors", lambda: h.pread(512, 0))
h.shutdown()
print("FAILURES:", fails)
sys.exit(1 if fails else 0)
