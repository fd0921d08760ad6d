#!/usr/bin/python3
# Copied unchanged (apart from this note) from the project's shared/tools/nbd_raw_probe.py,
# the client-side NBD checks used while researching the protocol; kept in the
# repo so that tests never depend on shared/ at run time.
# Raw-socket NBD probe for things libnbd refuses to send. usage: nbd_raw_probe.py HOST PORT [EXPORT]
#                                                          or:  nbd_raw_probe.py unix:/path/sock [EXPORT]
import socket, struct, sys
NBDMAGIC, IHAVEOPT, REPMAGIC = 0x4e42444d41474943, 0x49484156454F5054, 0x3e889045565a9
REQ_MAGIC, SIMPLE, STRUCT = 0x25609513, 0x67446698, 0x668e33ef
REP = {1: "ACK", 2: "SERVER", 3: "INFO", 4: "META_CONTEXT", 2**31+1: "ERR_UNSUP", 2**31+2: "ERR_POLICY",
       2**31+3: "ERR_INVALID", 2**31+4: "ERR_PLATFORM", 2**31+5: "ERR_TLS_REQD", 2**31+6: "ERR_UNKNOWN",
       2**31+7: "ERR_SHUTDOWN", 2**31+8: "ERR_BLOCK_SIZE_REQD", 2**31+9: "ERR_TOO_BIG"}

def connect():
    if sys.argv[1].startswith("unix:"):
        s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1][5:]); rest = sys.argv[2:]
    else:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2]))); rest = sys.argv[3:]
    s.settimeout(5)
    return s, (rest[0] if rest else "")

def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError("server closed connection")
        b += c
    return b

def handshake(s, cflags=3):
    magic, opt, hflags = struct.unpack(">QQH", recvn(s, 18))
    assert magic == NBDMAGIC and opt == IHAVEOPT, "not fixed-newstyle"
    s.sendall(struct.pack(">I", cflags))
    return hflags

def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
    out = []
    while True:
        m, o, t, ln = struct.unpack(">QIII", recvn(s, 20)); payload = recvn(s, ln)
        assert m == REPMAGIC and o == opt, "bad option reply"
        out.append((REP.get(t, hex(t)), payload))
        if t != 2 and t != 3 and t != 4: return out   # ACK or error ends the reply

def go(s, name, infos=(3,)):
    n = name.encode()
    return option(s, 7, struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) +
                  b"".join(struct.pack(">H", i) for i in infos))

def request(s, cmd, off=0, ln=0, flags=0, cookie=1, data=b"", magic=REQ_MAGIC):
    s.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, off, ln) + data)

def reply(s):
    (m,) = struct.unpack(">I", recvn(s, 4))
    if m == SIMPLE:
        err, cookie = struct.unpack(">IQ", recvn(s, 12)); return ("simple", err, cookie)
    if m == STRUCT:
        fl, ty, cookie, ln = struct.unpack(">HHQI", recvn(s, 16)); p = recvn(s, ln)
        err = struct.unpack(">I", p[:4])[0] if ty & 0x8000 else 0
        return ("structured type=%d flags=%d" % (ty, fl), err, cookie)
    return ("BAD MAGIC %x" % m, None, None)

s, name = connect()
print("handshake flags", handshake(s))
print("unknown option 0x7654321  ->", [r[0] for r in option(s, 0x7654321, b"abcd")])
print("NBD_OPT_LIST              ->", [r[0] for r in option(s, 3)])
# NB: nbd-server 3.24 answers LIST-with-data with ERR_INVALID *and then* the list, without consuming
# the data -> stream desync. Probe it on a separate connection:
s2, _ = connect(); handshake(s2)
print("NBD_OPT_LIST with data    ->", [r[0] for r in option(s2, 3, b"junk")]); s2.close()
for r in go(s, name):
    if r[0] == "INFO":
        it = struct.unpack(">H", r[1][:2])[0]
        if it == 0: print("  INFO_EXPORT size=%d tflags=0x%x" % struct.unpack(">QH", r[1][2:12]))
        elif it == 3: print("  INFO_BLOCK_SIZE min/pref/max = %d/%d/%d" % struct.unpack(">III", r[1][2:14]))
        else: print("  INFO type", it)
    else: print("GO ->", r[0])
request(s, 0x42, 0, 512, cookie=7);  print("unknown command 0x42      ->", reply(s))
request(s, 0, 0, 512, cookie=8);     r = reply(s); print("READ 512 (simple)         ->", r); recvn(s, 512) if r[1] == 0 else None
request(s, 3, 0, 0, cookie=9);       print("FLUSH                     ->", reply(s))
request(s, 0, 0, 512, cookie=10, magic=0xdeadbeef)
try:
    print("bad request magic         ->", reply(s))
    request(s, 0, 0, 512, cookie=11); print("  READ after bad magic    ->", reply(s), "(server kept the connection)")
except (EOFError, ConnectionResetError, socket.timeout) as e:
    print("bad request magic         -> connection closed/timeout:", type(e).__name__)
