#!/usr/bin/python3
# Misbehaving NBD clients against a server, while a well-behaved libnbd
# client stays connected and must keep working after each of them.
# usage: /usr/bin/python3 nbd_abuse.py unix:/path/sock|HOST:PORT EXPORT [READ_ONLY_EXPORT]
# Prints PASS/FAIL lines and "N passed, N failed"; exit 1 on any failure.
# Written for blockrelay; the raw framing follows nbd_raw_probe.py beside it.
import errno, os, socket, struct, sys, time
import nbd

NBDMAGIC, IHAVEOPT, REPMAGIC = 0x4e42444d41474943, 0x49484156454F5054, 0x3e889045565a9
REQ_MAGIC, SIMPLE_MAGIC = 0x25609513, 0x67446698
OPT_GO, OPT_ABORT = 7, 2
CMD_READ, CMD_WRITE, CMD_DISC, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 4, 6

target, export = sys.argv[1], sys.argv[2]
ro_export = sys.argv[3] if len(sys.argv) > 3 else None
passed = failed = 0


def result(ok, name, detail=""):
    global passed, failed
    print(("PASS " if ok else "FAIL ") + name + (f": {detail}" if detail else ""))
    if ok:
        passed += 1
    else:
        failed += 1


def uri(name):
    if target.startswith("unix:"):
        return f"nbd+unix:///{name}?socket={target[5:]}"
    return f"nbd://{target}/{name}"


def connect():
    if target.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(target[5:])
    else:
        host, port = target.rsplit(":", 1)
        s = socket.create_connection((host, int(port)))
    s.settimeout(10)
    return s


def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("server closed the connection")
        b += c
    return b


def handshake(s):
    magic, opt, _flags = struct.unpack(">QQH", recvn(s, 18))
    assert magic == NBDMAGIC and opt == IHAVEOPT, "not fixed newstyle"
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES


def go(s, name):
    n = name.encode()
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 4 + len(n) + 2) +
              struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
    while True:
        m, _o, t, ln = struct.unpack(">QIII", recvn(s, 20))
        recvn(s, ln)
        assert m == REPMAGIC
        if t == 1:
            return True
        if t & 0x80000000:
            return False


def request(s, cmd, off, ln, flags=0, cookie=1, data=b""):
    s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, cookie, off, ln) + data)


def simple_reply(s):
    m, err, cookie = struct.unpack(">IIQ", recvn(s, 16))
    assert m == SIMPLE_MAGIC, "bad reply magic %x" % m
    return err, cookie


def closed_or_error(s):
    """Read what the server does next: ('closed', None) or ('error', errno)."""
    try:
        err, _ = simple_reply(s)
        return ("error", err)
    except (EOFError, ConnectionResetError, BrokenPipeError):
        return ("closed", None)


# The well-behaved client, connected for the whole run.
good = nbd.NBD()
good.connect_uri(uri(export))
size = good.get_size()
marker = os.urandom(65536)
good.pwrite(marker, 0)
good.flush()


def good_still_works(after):
    try:
        ok = good.pread(65536, 0) == marker
        data = os.urandom(4096)
        good.pwrite(data, 1 << 20, nbd.CMD_FLAG_FUA)
        ok = ok and good.pread(4096, 1 << 20) == data
        result(ok, f"good client still works after: {after}")
    except nbd.Error as e:
        result(False, f"good client still works after: {after}", str(e))


def scenario(name, fn):
    try:
        fn()
    except Exception as e:  # a scenario's own failure, reported, not fatal
        result(False, name, f"{type(e).__name__}: {e}")
    good_still_works(name)


def connect_and_close():
    s = connect()
    s.close()
    result(True, "connect and close before the handshake")


def close_mid_handshake():
    s = connect()
    recvn(s, 18)
    s.sendall(b"\x00\x00")  # half of the client flags
    s.close()
    result(True, "close in the middle of the client flags")


def bad_option_magic():
    s = connect()
    handshake(s)
    s.sendall(struct.pack(">QII", 0x1234567812345678, OPT_GO, 0))
    try:
        r = s.recv(1)
        result(r == b"", "bad option magic: server closes", f"got {r!r}")
    except (ConnectionResetError, socket.timeout) as e:
        result(isinstance(e, ConnectionResetError), "bad option magic: server closes", type(e).__name__)


def write_cut_mid_payload():
    s = connect()
    handshake(s)
    assert go(s, export)
    request(s, CMD_WRITE, 2 << 20, 1 << 20, cookie=5, data=b"\xee" * 1000)
    s.close()
    time.sleep(0.2)  # let the server notice before the good client goes on
    result(True, "disconnect in the middle of a WRITE payload")


def oversized_requests():
    # blockrelay advertises a 32 MiB maximum payload and, leniently, still
    # serves up to 64 MiB; anything above must be refused cleanly.
    big = (64 << 20) + 4096
    s = connect()
    handshake(s)
    assert go(s, export)
    request(s, CMD_READ, 0, big, cookie=6)
    kind, err = closed_or_error(s)
    ok = kind == "closed" or err in (errno.EINVAL, errno.EOVERFLOW, errno.ENOMEM)
    result(ok, f"oversized READ ({big} bytes): error reply or disconnect", f"{kind} {err}")
    if kind == "closed":
        return
    # An oversized WRITE with its payload: an error (the payload skipped)
    # or a disconnect; if the connection stays, it must still be in sync.
    try:
        request(s, CMD_WRITE, 0, big, cookie=7, data=b"\xcc" * big)
        kind, err = closed_or_error(s)
    except (BrokenPipeError, ConnectionResetError):
        kind, err = "closed", None
    ok = kind == "closed" or err in (errno.EINVAL, errno.EOVERFLOW, errno.ENOMEM)
    result(ok, f"oversized WRITE ({big} bytes): error reply or disconnect", f"{kind} {err}")
    if kind == "error":
        request(s, CMD_READ, 0, 512, cookie=8)
        err, cookie = simple_reply(s)
        data = recvn(s, 512) if err == 0 else b""
        result(err == 0 and cookie == 8 and data != b"\xcc" * 512,
               "connection still in sync after the oversized WRITE", f"errno {err} cookie {cookie}")
    s.close()


def drain(h, what, limit=30.0):
    """Poll until no command is in flight (bounded)."""
    deadline = time.monotonic() + limit
    while h.aio_in_flight() > 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {h.aio_in_flight()} commands still in flight after {limit}s")
        h.poll(1000)


def many_in_flight():
    h = nbd.NBD()
    h.connect_uri(uri(export))
    n, bs, base = 64, 16384, 4 << 20
    blobs = [os.urandom(bs) for _ in range(n)]
    done = lambda err: 1  # noqa: E731  (returning 1 retires the command)
    for i in range(n):
        h.aio_pwrite(blobs[i], base + i * bs, completion=done)
    drain(h, "writes")
    bufs = [nbd.Buffer(bs) for _ in range(n)]
    for i in range(n):
        h.aio_pread(bufs[i], base + i * bs, completion=done)
    drain(h, "reads")
    ok = all(bufs[i].to_bytearray() == blobs[i] for i in range(n))
    result(ok, f"{n} writes then {n} reads in flight on one connection")
    h.shutdown()


def many_connections():
    hs = []
    for _ in range(16):
        h = nbd.NBD()
        h.connect_uri(uri(export))
        hs.append(h)
    for i, h in enumerate(hs):
        h.pwrite(bytes([i]) * 4096, (8 << 20) + i * 4096)
    hs[0].flush()
    ok = all(hs[-1 - i].pread(4096, (8 << 20) + i * 4096) == bytes([i]) * 4096 for i in range(16))
    result(ok, "16 connections at once, each sees the others' writes")
    for h in hs:
        h.shutdown()


def abandoned_with_requests_in_flight():
    h = nbd.NBD()
    h.connect_uri(uri(export))
    for i in range(32):
        h.aio_pread(nbd.Buffer(65536), i * 65536, completion=lambda err: 1)
    del h  # closes the socket with the replies unread
    result(True, "client closes with 32 reads in flight")


def read_only_export():
    s = connect()
    handshake(s)
    assert go(s, ro_export)
    for cmd, name, data in ((CMD_WRITE, "WRITE", b"x" * 512), (CMD_TRIM, "TRIM", b""),
                            (CMD_WRITE_ZEROES, "WRITE_ZEROES", b"")):
        request(s, cmd, 0, 512, cookie=9, data=data)
        err, cookie = simple_reply(s)
        result(err == errno.EPERM and cookie == 9, f"{name} on the read-only export: EPERM", f"errno {err}")
    request(s, CMD_READ, 0, 512, cookie=10)
    err, _ = simple_reply(s)
    if err == 0:
        recvn(s, 512)
    result(err == 0, "READ on the read-only export works")
    request(s, CMD_DISC, 0, 0)
    s.close()


scenario("connect/close", connect_and_close)
scenario("half handshake", close_mid_handshake)
scenario("bad option magic", bad_option_magic)
scenario("write cut mid-payload", write_cut_mid_payload)
scenario("oversized requests", oversized_requests)
scenario("many in flight", many_in_flight)
scenario("many connections", many_connections)
scenario("abandoned requests", abandoned_with_requests_in_flight)
if ro_export:
    scenario("read-only export", read_only_export)
good.shutdown()
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
