#!/usr/bin/env bash
# link_proxy (test/tools/link_proxy.cc), the WAN stand-in that replication
# tests put between two sites, against a Python echo server on loopback:
# bytes pass intact both ways, --delay-ms adds its delay in each direction
# without capping throughput, --rate limits bandwidth, and the control socket
# cuts, heals, changes delay and rate at run time and answers stats as JSON.
# Peer resets and an unreachable target do not kill it; SIGTERM/SIGINT end
# it with status 0.
#
# The blockrelay binary ($1) only locates the build tree: link_proxy is at
# BUILD/test/tools/link_proxy (or $LINK_PROXY).
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd sha256sum head cmp
PY=/usr/bin/python3
[ -x "$PY" ] || skip "no $PY"
PROXY=${LINK_PROXY:-$(dirname "$BR_BIN")/test/tools/link_proxy}
[ -x "$PROXY" ] || die "link_proxy is not built at $PROXY (cmake --build BUILD --target link_proxy)"
MiB=$((1 << 20))
STOP_BOUND=10   # seconds a proxy may take to exit after a signal

# ---- helpers ----------------------------------------------------------------
# net.py: echo server and the clients. Every socket operation has a timeout.
NET=$BR_TMP/net.py
cat >"$NET" <<'PYEOF'
import os, socket, sys, threading, time

TIMEOUT = 60

def connect(port, timeout=TIMEOUT):
    s = socket.create_connection(("127.0.0.1", int(port)), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("EOF after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf

def echo_server(port_file):
    # Echoes every connection until EOF, then half-closes; ignores resets.
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    with open(port_file + ".tmp", "w") as f:
        f.write("%d\n" % srv.getsockname()[1])
    os.rename(port_file + ".tmp", port_file)
    def serve(c):
        try:
            while True:
                data = c.recv(1 << 16)
                if not data:
                    c.shutdown(socket.SHUT_WR)
                    break
                c.sendall(data)
        except OSError:
            pass
        finally:
            c.close()
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()

def transfer(port, infile, outfile):
    # Sends infile, reads the echo into outfile until EOF; prints seconds.
    data = open(infile, "rb").read()
    start = time.monotonic()
    s = connect(port)
    err = []
    def send():
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            err.append(e)
    t = threading.Thread(target=send)
    t.start()
    with open(outfile, "wb") as out:
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            out.write(chunk)
    t.join()
    s.close()
    if err:
        raise err[0]
    print("%.3f" % (time.monotonic() - start))

def rtt(port, count):
    # Minimum round trip of a 16-byte ping, in milliseconds.
    s = connect(port)
    best = None
    for i in range(int(count)):
        msg = b"ping-%010d\n" % i
        start = time.monotonic()
        s.sendall(msg)
        if recv_exact(s, len(msg)) != msg:
            raise SystemExit("echo mismatch")
        ms = (time.monotonic() - start) * 1000
        best = ms if best is None else min(best, ms)
    s.close()
    print("%.1f" % best)

def ctl_connect(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    return s, s.makefile("rw")

def ctl(path, *commands):
    # One reply line per command, printed as is.
    s, f = ctl_connect(path)
    for c in commands:
        f.write(c + "\n")
        f.flush()
        reply = f.readline()
        if not reply.endswith("\n"):
            raise SystemExit("no reply line to %r" % c)
        print(reply, end="")
    s.close()

def wait_end(s, seconds):
    # What the client sees next on s: eof, reset, timeout or data.
    s.settimeout(seconds)
    try:
        return "data" if s.recv(1 << 16) else "eof"
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        return "timeout"

def cut_check(port, path):
    # A live connection through the proxy ends (EOF or reset) right after
    # "cut". Prints what the client saw.
    s = connect(port)
    s.sendall(b"hello\n")
    if recv_exact(s, 6) != b"hello\n":
        raise SystemExit("echo mismatch before the cut")
    ctl(path, "cut")
    start = time.monotonic()
    seen = wait_end(s, 5)
    print("%s after %.3fs" % (seen, time.monotonic() - start))

def probe(port):
    # Exit 0 and print "ok" if a new connection echoes a ping within 3 s;
    # else exit 1 and print how it failed: refused, eof, reset or timeout.
    try:
        s = connect(port, 3)
        s.sendall(b"probe\n")
        buf = b""
        while len(buf) < 6:
            chunk = s.recv(6 - len(buf))
            if not chunk:
                print("eof"); sys.exit(1)
            buf += chunk
    except ConnectionRefusedError:
        print("refused"); sys.exit(1)
    except (ConnectionResetError, BrokenPipeError):
        print("reset"); sys.exit(1)
    except socket.timeout:
        print("timeout"); sys.exit(1)
    print("ok" if buf == b"probe\n" else "mismatch")
    sys.exit(0 if buf == b"probe\n" else 1)

def reset(port):
    # Sends some data, then aborts the connection (RST) mid-stream.
    s = connect(port)
    s.sendall(os.urandom(256 << 10))
    time.sleep(0.1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    print("reset sent")

cmd, args = sys.argv[1], sys.argv[2:]
try:
    {"echo-server": echo_server, "transfer": transfer, "rtt": rtt, "ctl": ctl,
     "cut-check": cut_check, "probe": probe, "reset": reset}[cmd](*args)
except Exception as e:
    # Exit 1 means "the link failed as expected" for probe only; anything
    # unexpected is exit 3.
    print("%s: %s: %s" % (cmd, type(e).__name__, e))
    sys.exit(3)
PYEOF

# NETX runs net.py as one command, for check/expect_rc (they run it under
# timeout); net() is the same, bounded, for command substitutions.
NETX=$BR_TMP/net
printf '#!/bin/sh\nexec %s %s "$@"\n' "$PY" "$NET" >"$NETX"
chmod +x "$NETX"
net() { timeout -k 5 120 "$NETX" "$@"; }

# stop_pid PID [SIG]: signal a process this test started, wait up to
# STOP_BOUND seconds, then SIGKILL. Sets STOP_RC to its exit status.
stop_pid() {
  local pid=$1 sig=${2:-TERM} deadline=$((SECONDS + STOP_BOUND))
  if kill -s "$sig" "$pid" 2>/dev/null; then
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid still running ${STOP_BOUND}s after SIG$sig: SIGKILL"
      kill -s KILL "$pid" 2>/dev/null
    fi
  fi
  wait "$pid" 2>/dev/null
  STOP_RC=$?
}

# Waits (bounded) until FILE exists and PID is alive.
wait_file() {
  local file=$1 pid=$2 deadline=$((SECONDS + 10))
  while [ ! -s "$file" ] && [ $SECONDS -lt $deadline ]; do
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.05
  done
  [ -s "$file" ]
}

# start_proxy NAME [link_proxy flags...]: listens on a port chosen by the
# kernel (port file), control socket $BR_TMP/NAME.ctl, target the echo
# server unless a --target is given. Sets PX_PID[NAME], PX_PORT[NAME],
# PX_CTL[NAME]; its stderr goes to $BR_TMP/NAME.log.
declare -A PX_PID PX_PORT PX_CTL
start_proxy() {
  local name=$1; shift
  local target=("--target" "127.0.0.1:$ECHO_PORT")
  case " $* " in *" --target "*) target=() ;; esac
  local port_file=$BR_TMP/$name.port
  PX_CTL[$name]=$BR_TMP/$name.ctl
  "$PROXY" --listen 127.0.0.1:0 "${target[@]}" --port-file "$port_file" \
    --control "${PX_CTL[$name]}" "$@" 2>>"$BR_TMP/$name.log" </dev/null &
  PX_PID[$name]=$!
  br_on_exit "stop_pid ${PX_PID[$name]}"
  wait_file "$port_file" "${PX_PID[$name]}" || die "proxy $name did not start: $(tail -n 5 "$BR_TMP/$name.log")"
  PX_PORT[$name]=$(cat "$port_file")
  log "proxy $name pid ${PX_PID[$name]} on port ${PX_PORT[$name]} ($*)"
}

ctl() { local name=$1; shift; net ctl "${PX_CTL[$name]}" "$@"; }
stat_of() { ctl "$1" stats | jq -r "$2"; }
# Waits (bounded) until the proxy has no active connection; prints the count.
wait_idle() {
  local n deadline=$((SECONDS + 10))
  while n=$(stat_of "$1" .active) && [ "$n" != 0 ] && [ $SECONDS -lt $deadline ]; do sleep 0.05; done
  echo "$n"
}
# at_least VALUE BOUND, below VALUE BOUND: numeric tests, decimals allowed
at_least() { awk -v v="$1" -v b="$2" 'BEGIN { exit !(v + 0 >= b + 0) }'; }
below() { awk -v v="$1" -v b="$2" 'BEGIN { exit !(v + 0 < b + 0) }'; }

dump_proxy_logs() {
  [ "$BR_FAIL" -gt 0 ] || return 0
  local f
  for f in "$BR_TMP"/*.log; do
    [ -s "$f" ] || continue
    echo "---- last lines of $(basename "$f") ----"
    tail -n 25 "$f"
  done
}
br_on_exit dump_proxy_logs

# ---- setup ----------------------------------------------------------------
"$PY" "$NET" echo-server "$BR_TMP/echo.port" 2>"$BR_TMP/echo.log" </dev/null &
ECHO_PID=$!
br_on_exit "stop_pid $ECHO_PID"
wait_file "$BR_TMP/echo.port" "$ECHO_PID" || die "echo server did not start"
ECHO_PORT=$(cat "$BR_TMP/echo.port")

expect_rc 2 "link_proxy without --target is a usage error" \
  "$PROXY" --listen 127.0.0.1:0
expect_rc 2 "link_proxy rejects a bad --rate" \
  "$PROXY" --listen 127.0.0.1:0 --target 127.0.0.1:1 --rate fast

start_proxy plain
start_proxy slow --delay-ms 50
start_proxy thin --rate 1000000

head -c $((5 * MiB)) /dev/urandom >"$BR_TMP/5m.bin"
head -c 2000000 /dev/urandom >"$BR_TMP/2m.bin"
head -c 1000000 /dev/urandom >"$BR_TMP/1m.bin"
sum() { sha256sum <"$1" | cut -d' ' -f1; }

# ---- 1. bytes pass intact both ways ---------------------------------------
check "5 MiB through the plain proxy and back" \
  "$NETX" transfer "${PX_PORT[plain]}" "$BR_TMP/5m.bin" "$BR_TMP/5m.plain"
assert_eq "sha256 after the plain proxy round trip" "$(sum "$BR_TMP/5m.bin")" "$(sum "$BR_TMP/5m.plain")"
assert_eq "no connection left after both sides closed" 0 "$(wait_idle plain)"
ctl plain stats >"$BR_TMP/stats.json"
assert_eq "stats: one connection accepted" 1 "$(jq .accepted "$BR_TMP/stats.json")"
assert_eq "stats: bytes client->target" $((5 * MiB)) "$(jq .bytes_client_to_target "$BR_TMP/stats.json")"
assert_eq "stats: bytes target->client" $((5 * MiB)) "$(jq .bytes_target_to_client "$BR_TMP/stats.json")"
assert_eq "stats: not cut" false "$(jq .cut "$BR_TMP/stats.json")"
base_rtt=$(net rtt "${PX_PORT[plain]}" 5)
assert_true "plain proxy round trip is short (${base_rtt} ms < 40 ms)" below "$base_rtt" 40

# ---- 2. --delay-ms 50: 50 ms each way, pipelined ----------------------------
slow_rtt=$(net rtt "${PX_PORT[slow]}" 5)
assert_true "--delay-ms 50: round trip ${slow_rtt} ms >= 100 ms (50 each way)" at_least "$slow_rtt" 100
assert_true "--delay-ms 50: round trip ${slow_rtt} ms < 1000 ms" below "$slow_rtt" 1000
if check "5 MiB through the delaying proxy and back" \
     "$NETX" transfer "${PX_PORT[slow]}" "$BR_TMP/5m.bin" "$BR_TMP/5m.slow"; then
  secs=$(cat "$BR_OUT")
  assert_eq "sha256 after the delayed round trip" "$(sum "$BR_TMP/5m.bin")" "$(sum "$BR_TMP/5m.slow")"
  # One chunk per delay would take >= 80 chunks x 50 ms = 4 s each way.
  assert_true "delay is pipelined: 5 MiB echo took ${secs}s < 3s" below "$secs" 3
fi

# ---- 3. --rate 1000000 -------------------------------------------------------
if check "2 MB through the rate-limited proxy and back" \
     "$NETX" transfer "${PX_PORT[thin]}" "$BR_TMP/2m.bin" "$BR_TMP/2m.thin"; then
  secs=$(cat "$BR_OUT")
  assert_eq "sha256 after the rate-limited round trip" "$(sum "$BR_TMP/2m.bin")" "$(sum "$BR_TMP/2m.thin")"
  assert_true "--rate 1000000: 2 MB took ${secs}s >= 1.5s" at_least "$secs" 1.5
  assert_true "--rate 1000000: 2 MB took ${secs}s < 8s" below "$secs" 8
fi

# ---- 4. control: delay, rate, errors ----------------------------------------
ctl plain "bogus 1" >"$BR_TMP/reply"
assert_eq "unknown command" "error: unknown command bogus" "$(cat "$BR_TMP/reply")"
ctl plain "delay abc" "rate -5" "cut now" "" >"$BR_TMP/reply"
assert_eq "bad arguments get one error line each" 4 "$(grep -c '^error: ' "$BR_TMP/reply")"
ctl plain "delay 30" >"$BR_TMP/reply"
assert_contains "delay 30 accepted" "ok" "$BR_TMP/reply"
rtt30=$(net rtt "${PX_PORT[plain]}" 3)
assert_true "after 'delay 30': round trip ${rtt30} ms >= 60 ms" at_least "$rtt30" 60
ctl plain "delay 0" "rate 1000000" >/dev/null
assert_eq "stats shows delay 0 and the new rate" "0 1000000" "$(stat_of plain '"\(.delay_ms) \(.rate_bps)"')"
if check "1 MB after 'rate 1000000'" "$NETX" transfer "${PX_PORT[plain]}" "$BR_TMP/1m.bin" "$BR_TMP/1m.plain"; then
  secs=$(cat "$BR_OUT")
  assert_true "after 'rate 1000000': 1 MB took ${secs}s >= 0.7s" at_least "$secs" 0.7
fi
ctl plain "rate 0" >/dev/null
if check "2 MB after 'rate 0'" "$NETX" transfer "${PX_PORT[plain]}" "$BR_TMP/2m.bin" "$BR_TMP/2m.plain"; then
  secs=$(cat "$BR_OUT")
  assert_true "after 'rate 0': 2 MB took ${secs}s < 1.5s" below "$secs" 1.5
  assert_eq "sha256 after 'rate 0'" "$(sum "$BR_TMP/2m.bin")" "$(sum "$BR_TMP/2m.plain")"
fi

# ---- 5. cut and heal ---------------------------------------------------------
if check "cut ends a live connection" "$NETX" cut-check "${PX_PORT[plain]}" "${PX_CTL[plain]}"; then
  seen=$(tail -n 1 "$BR_OUT")
  ended_at_once() { [[ $seen =~ ^(eof|reset)\ after\ [0-4]\. ]]; }
  assert_true "client saw EOF or reset at once after cut ($seen)" ended_at_once
fi
assert_eq "after cut: no active connection (target side closed too)" 0 "$(wait_idle plain)"
assert_eq "stats: cut" true "$(stat_of plain .cut)"
expect_rc 1 "while cut: a new connection fails" "$NETX" probe "${PX_PORT[plain]}"
log "while cut the client saw: $(cat "$BR_OUT")"
assert_true "stats: the new connection was refused" test "$(stat_of plain .refused)" -ge 1
assert_contains "proxy log names the cut" "closed with reset (link cut)" "$BR_TMP/plain.log"
ctl plain heal >"$BR_TMP/reply"
assert_contains "heal accepted" "ok" "$BR_TMP/reply"
check "after heal: a new connection works" "$NETX" probe "${PX_PORT[plain]}"
assert_eq "stats: healed" false "$(stat_of plain .cut)"

# ---- 6. resets and an unreachable target do not kill it ---------------------
check "client resets mid-stream" "$NETX" reset "${PX_PORT[plain]}"
assert_eq "after a client reset: no active connection" 0 "$(wait_idle plain)"
check "proxy still works after the reset" "$NETX" probe "${PX_PORT[plain]}"
dead_port=$(br_free_port)
start_proxy nowhere --target "127.0.0.1:$dead_port"
expect_rc 1 "target refuses: the client's connection fails" "$NETX" probe "${PX_PORT[nowhere]}"
assert_eq "stats: one connect failure" 1 "$(stat_of nowhere .connect_failures)"
assert_true "proxy survives an unreachable target" kill -0 "${PX_PID[nowhere]}"

# ---- 7. signals -----------------------------------------------------------------
stop_pid "${PX_PID[plain]}" TERM
assert_eq "plain proxy exits 0 on SIGTERM" 0 "$STOP_RC"
assert_true "control socket removed on exit" test ! -e "${PX_CTL[plain]}"
stop_pid "${PX_PID[slow]}" INT
assert_eq "delaying proxy exits 0 on SIGINT" 0 "$STOP_RC"
assert_contains "log has one line per connection event" "conn 1 accepted from 127.0.0.1:" "$BR_TMP/plain.log"

br_finish
