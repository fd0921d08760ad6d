#!/usr/bin/env bash
# scripts/bench/profile.sh — where does an NBD server spend its time on one
# fio workload? A companion of scripts/bench.sh for the rows where blockrelay
# is slower than a peer. Not a test.
#
# For each server it runs the same fio workload (nbd engine, Unix socket, one
# connection) three times on a fresh server process and reports:
#   1. plain run: IOPS, and per thread of the server the CPU time (user+sys
#      from /proc/PID/task/*/stat) and context switches per request, sampled
#      from 1 s after fio starts to 1 s before it ends (requests in that
#      window = fio's average request rate x the window);
#   2. under `strace -c -w -f`: system calls per request, by name, and the
#      wall-clock time of one call (strace slows the server down; the counts
#      per request, and what blocks, are what matters);
#   3. under `perf record -e cpu-clock -g` (software clock: these VMs have no
#      hardware counters): the hottest symbols, self time.
# Requests = fio's total ios (no ramp time, so the whole run is counted).
# Backing files are prepared as scripts/bench.sh does: buffered 4 KiB fill
# (page cache, 4 KiB folios) for the page-cache servers, an O_DIRECT-filled
# file of its own for qemu-nbd-none.
#
# Usage: bash scripts/bench/profile.sh [--servers blockrelay,nbdkit-file]
#          [--fio "--rw=randwrite --bs=4k --iodepth=32"] [--runtime 8]
#          [--size 1GiB] [--no-perf] [--no-strace] [--build-dir build-bench]
#          [--io-threads N] [--link JSON-MEMBERS] [--keep]
# --keep keeps the work dir (fio JSON, strace and perf data, logs).
# Servers: blockrelay, nbdkit-file, qemu-nbd-wb, qemu-nbd-none, null, and
# blockrelay-async / blockrelay-sync: blockrelay with one async / sync link to
# a second blockrelay process (site b, role secondary, its own backing file
# prepared like the primary's) on loopback TCP, "initial_sync": "none",
# caught up before fio starts, as in scripts/bench.sh. For these, site b's
# threads are reported too, strace and perf cover both processes (strace
# counts per process; perf samples of both, by thread and by process), and
# --link '"group_interval": "100ms"' adds members to the link's JSON.
# Needs a built blockrelay (scripts/bench.sh builds build-bench/).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)

SERVERS=blockrelay,nbdkit-file
FIO_ARGS="--rw=randwrite --bs=4k --iodepth=32"
RUNTIME=8
SIZE=1GiB
DO_PERF=1
DO_STRACE=1
BUILD_DIR=build-bench
IO_THREADS=
LINK_EXTRA=
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --servers) SERVERS=$2; shift 2 ;;
    --fio) FIO_ARGS=$2; shift 2 ;;
    --runtime) RUNTIME=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --no-perf) DO_PERF=0; shift ;;
    --no-strace) DO_STRACE=0; shift ;;
    --build-dir) BUILD_DIR=$2; shift 2 ;;
    --io-threads) IO_THREADS=$2; shift 2 ;;
    --link) LINK_EXTRA=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "profile: unknown option $1" >&2; exit 1 ;;
  esac
done
BR_BIN=$REPO/$BUILD_DIR/blockrelay
[ -x "$BR_BIN" ] || { echo "profile: $BR_BIN missing; run scripts/bench.sh first" >&2; exit 1; }
for t in fio nbdkit qemu-nbd nbdinfo python3 fallocate timeout; do
  command -v "$t" >/dev/null || { echo "profile: $t missing" >&2; exit 1; }
done
[ "$DO_STRACE" = 0 ] || command -v strace >/dev/null || { echo "profile: strace missing (apt-get install strace) or --no-strace" >&2; exit 1; }
if [ "$DO_PERF" = 1 ] && ! perf record -e cpu-clock -o /dev/null -- true >/dev/null 2>&1; then
  echo "profile: perf record -e cpu-clock does not work here; skipping perf (install linux-perf)" >&2
  DO_PERF=0
fi

# The interpreter itself, not a version-manager shim: this script starts
# python many times while the machine is loaded.
PY=$(python3 -c 'import sys; print(sys.executable)')
base=/var/tmp
case "$(findmnt -n -o FSTYPE --target "$base" 2>/dev/null)" in tmpfs|ramfs|"") base=$REPO ;; esac
WORK=$(mktemp -d "$base/blockrelay-profile.XXXXXX")
PIDS=()
forget() { local k=() p; for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || k+=("$p"); done; PIDS=("${k[@]}"); }
stop() {
  local pid=$1 _i
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}
cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  for p in "${PIDS[@]+"${PIDS[@]}"}"; do stop "$p"; done
  if [ "$KEEP" = 1 ]; then echo "profile: work dir kept: $WORK" >&2; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

size_bytes=$(numfmt --from=iec-i "${SIZE%B}")
DISK=$WORK/disk.img
DISK_DIRECT=$WORK/disk-direct.img
fallocate -l "$size_bytes" "$DISK"
timeout 1800 fio --name=precondition --filename="$DISK" --rw=write --bs=4k --ioengine=psync \
  --size="$size_bytes" --end_fsync=1 --output-format=terse >/dev/null
if [[ ,$SERVERS, == *,qemu-nbd-none,* ]]; then
  fallocate -l "$size_bytes" "$DISK_DIRECT"
  timeout 1800 fio --name=precondition --filename="$DISK_DIRECT" --rw=write --bs=1M --direct=1 \
    --ioengine=libaio --iodepth=8 --size="$size_bytes" --output-format=terse >/dev/null
fi
DISK_B=$WORK/disk-b.img
if [[ ,$SERVERS, == *,blockrelay-async,* || ,$SERVERS, == *,blockrelay-sync,* ]]; then
  fallocate -l "$size_bytes" "$DISK_B"
  timeout 1800 fio --name=precondition --filename="$DISK_B" --rw=write --bs=4k --ioengine=psync \
    --size="$size_bytes" --end_fsync=1 --output-format=terse >/dev/null
fi
sync

free_port() {
  "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Site b (secondary) for blockrelay-async/-sync: sets BPID and B_PORT.
start_site_b() {
  local dir=$1/b _i
  mkdir -p "$dir"
  B_PORT=$(free_port)
  cat >"$dir/site.json" <<EOF
{ "site": "b", "data_dir": "$dir/data", "control_socket": "$dir/control.sock",
  "nbd": { "unix_socket": "$dir/nbd.sock" },
  "replication": { "listen": "127.0.0.1:$B_PORT" },
  "groups": [ { "name": "p", "role": "secondary", "upstream": { "site": "profile" },
    "volumes": [ { "name": "data", "path": "$DISK_B", "size": "$size_bytes" } ] } ] }
EOF
  "$BR_BIN" run --config "$dir/site.json" >"$dir/server.log" 2>&1 </dev/null &
  BPID=$!
  PIDS+=("$BPID")
  for _i in $(seq 150); do
    kill -0 "$BPID" 2>/dev/null || { cat "$dir/server.log" >&2; return 1; }
    timeout 5 "$BR_BIN" status --config "$dir/site.json" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

start_server() {  # start_server NAME DIR: sets SPID and URI (and BPID)
  local name=$1 dir=$2 sock=$2/nbd.sock threads="" links=""
  BPID=
  case "$name" in
    blockrelay|blockrelay-async|blockrelay-sync)
      [ -n "$IO_THREADS" ] && threads=", \"io_threads\": $IO_THREADS"
      if [ "$name" != blockrelay ]; then
        start_site_b "$dir" || return 1
        links=", \"downstream\": [ { \"site\": \"b\", \"address\": \"127.0.0.1:$B_PORT\",
      \"mode\": \"${name#blockrelay-}\", \"initial_sync\": \"none\"${LINK_EXTRA:+, $LINK_EXTRA} } ]"
      fi
      cat >"$dir/site.json" <<EOF
{ "site": "profile", "data_dir": "$dir/data", "control_socket": "$dir/control.sock",
  "nbd": { "unix_socket": "$sock"$threads },
  "groups": [ { "name": "p", "role": "primary",
    "volumes": [ { "name": "data", "path": "$DISK", "size": "$size_bytes" } ]$links } ] }
EOF
      "$BR_BIN" run --config "$dir/site.json" >"$dir/server.log" 2>&1 </dev/null &
      URI="nbd+unix:///data?socket=$sock" ;;
    nbdkit-file) nbdkit -f -U "$sock" file file="$DISK" >"$dir/server.log" 2>&1 </dev/null &
      URI="nbd+unix:///?socket=$sock" ;;
    qemu-nbd-wb) qemu-nbd -t -e 16 -f raw --cache=writeback -k "$sock" "$DISK" >"$dir/server.log" 2>&1 </dev/null &
      URI="nbd+unix:///?socket=$sock" ;;
    qemu-nbd-none) qemu-nbd -t -e 16 -f raw --cache=none --aio=native -k "$sock" "$DISK_DIRECT" >"$dir/server.log" 2>&1 </dev/null &
      URI="nbd+unix:///?socket=$sock" ;;
    null) nbdkit -f -U "$sock" null size="$size_bytes" >"$dir/server.log" 2>&1 </dev/null &
      URI="nbd+unix:///?socket=$sock" ;;
    *) echo "profile: unknown server $name" >&2; return 1 ;;
  esac
  SPID=$!
  PIDS+=("$SPID")
  local _i
  for _i in $(seq 150); do
    kill -0 "$SPID" 2>/dev/null || { cat "$dir/server.log" >&2; return 1; }
    if timeout 5 nbdinfo --size "$URI" >/dev/null 2>&1; then
      [ -z "$BPID" ] && return 0
      timeout 90 "$BR_BIN" wait p --config "$dir/site.json" --timeout 60 >/dev/null && return 0
      echo "profile: the link to site b did not catch up" >&2; return 1
    fi
    sleep 0.1
  done
  return 1
}
stop_servers() { stop "$SPID"; [ -z "$BPID" ] || stop "$BPID"; }

# Per-thread snapshot of process $1, one line per thread:
#   tid comm utime+stime(ticks) voluntary nonvoluntary
snapshot() {
  "$PY" - "$1" <<'PY' 2>/dev/null || true
import os, sys, time
base = f"/proc/{sys.argv[1]}/task"
stat = open(f"/proc/{sys.argv[1]}/stat").read().rsplit(")", 1)[1].split()
# Whole process (live and exited threads): utime + stime.
print("time", time.time(), int(stat[11]) + int(stat[12]))
for tid in os.listdir(base):
    try:
        stat = open(f"{base}/{tid}/stat").read()
        status = open(f"{base}/{tid}/status").read().splitlines()
    except OSError:
        continue
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    f = stat[stat.rindex(")") + 2:].split()
    ticks = int(f[11]) + int(f[12])  # utime + stime
    vol = nonvol = 0
    for line in status:
        if line.startswith("voluntary_ctxt_switches"):
            vol = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches"):
            nonvol = int(line.split()[1])
    print(tid, comm.replace(" ", "_"), ticks, vol, nonvol)
PY
}

run_fio() {  # run_fio URI OUT: fio in the background, PID in FIO_PID
  # shellcheck disable=SC2086
  timeout $((RUNTIME + 60)) fio --name=profile --ioengine=nbd --uri="$1" $FIO_ARGS \
    --time_based --runtime="$RUNTIME" --output-format=json >"$2" 2>"$2.err" &
  FIO_PID=$!
  PIDS+=("$FIO_PID")
}
fio_ios() {  # prints: total requests (incl. flushes), data IOPS, requests per second
  "$PY" -c '
import json, sys
t = open(sys.argv[1]).read(); j = json.loads(t[t.index("{"):])["jobs"][0]
n = j["read"]["total_ios"] + j["write"]["total_ios"] + j.get("sync", {}).get("total_ios", 0)
secs = max(j["job_runtime"], 1) / 1000
print(n, round(j["read"]["iops"] + j["write"]["iops"]), round(n / secs))' "$1"
}

HZ=$(getconf CLK_TCK)
echo "# profile: fio $FIO_ARGS, ${RUNTIME} s, Unix socket, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
IFS=, read -r -a SLIST <<<"$SERVERS"
for s in "${SLIST[@]}"; do
  echo
  echo "## $s"
  # 1. plain run with per-thread CPU and context switches.
  dir=$WORK/$s-plain; mkdir -p "$dir"
  start_server "$s" "$dir"
  sync
  snapshots() {  # snapshots NAME: the server (and site b) into $dir/NAME, $dir/b-NAME
    snapshot "$SPID" >"$dir/$1"
    [ -z "$BPID" ] || snapshot "$BPID" >"$dir/b-$1"
  }
  snapshots start
  run_fio "$URI" "$dir/fio.json"
  fio_t0=$(date +%s.%N)
  sleep 1
  snapshots before
  # Second sample 1.5 s before fio ends, while its connection's threads live.
  sleep "$("$PY" -c "import time; print(max(0.5, $fio_t0 + $RUNTIME - 1.5 - time.time()))")"
  snapshots after
  wait "$FIO_PID" || true; forget "$FIO_PID"
  snapshots end
  stop_servers
  read -r ios iops rps < <(fio_ios "$dir/fio.json")
  echo "plain run: $iops IOPS ($rps requests/s incl. flushes)"
  for who in server ${BPID:+site-b}; do
    if [ "$who" = server ]; then pre=; wpid=$SPID; else pre=b-; wpid=$BPID; echo "  site b (downstream process):"; fi
  "$PY" - "$dir" "$ios" "$rps" "$HZ" "$wpid" "$pre" <<'PY'
import sys
d, total_ios, rps, hz, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
d = d + "/" + sys.argv[6]  # file name prefix: "" for the server, "b-" for site b
def load(p):
    threads, t, proc = {}, 0.0, 0
    for line in open(p):
        f = line.split()
        if f[0] == "time":
            t, proc = float(f[1]), int(f[2])
            continue
        tid, comm, ticks, vol, nonvol = f
        threads[tid] = (comm, int(ticks), int(vol), int(nonvol))
    return threads, t, proc
_, _, p0 = load(d + "start")
_, _, p1 = load(d + "end")
print(f"  whole run: server CPU {(p1 - p0) / hz:.2f} s for {total_ios} requests = "
      f"{(p1 - p0) / hz * 1e6 / max(total_ios, 1):.1f} us/request")
b, tb, _ = load(d + "before")
a, ta, _ = load(d + "after")
ios = round((ta - tb) * rps)
print(f"  window of {ta - tb:.1f} s (~{ios} requests):")
tot_cpu = tot_vol = tot_non = 0
rows = []
for tid, (comm, ticks, vol, nonvol) in a.items():
    t0, v0, n0 = b.get(tid, (comm, 0, 0, 0))[1:]
    cpu, dv, dn = ticks - t0, vol - v0, nonvol - n0
    tot_cpu += cpu; tot_vol += dv; tot_non += dn
    rows.append((cpu, tid + ("*" if tid == pid else ""), comm, dv, dn))
rows.sort(reverse=True)
print(f"    threads alive: CPU {tot_cpu / hz:.2f} s = {tot_cpu / hz * 1e6 / max(ios, 1):.1f} us/request; "
      f"context switches {tot_vol / max(ios, 1):.2f} voluntary + {tot_non / max(ios, 1):.2f} involuntary per request")
print("    per thread (tid, * = main thread; comm): CPU s, us/request, voluntary cs/request")
for cpu, tid, comm, dv, dn in rows[:8]:
    if cpu == 0 and dv == 0:
        continue
    print(f"      {tid:>7} {comm:<16} {cpu / hz:6.2f} s {cpu / hz * 1e6 / max(ios, 1):6.1f} us {dv / max(ios, 1):5.2f}")
PY
  done
  # 2. system calls per request.
  if [ "$DO_STRACE" = 1 ]; then
    dir=$WORK/$s-strace; mkdir -p "$dir"
    start_server "$s" "$dir"
    sync
    timeout $((RUNTIME + 60)) strace -c -w -f -q -o "$dir/strace.txt" -p "$SPID" &
    st_pid=$!; PIDS+=("$st_pid")
    stb_pid=
    if [ -n "$BPID" ]; then
      timeout $((RUNTIME + 60)) strace -c -w -f -q -o "$dir/b-strace.txt" -p "$BPID" &
      stb_pid=$!; PIDS+=("$stb_pid")
    fi
    sleep 0.5
    run_fio "$URI" "$dir/fio.json"; wait "$FIO_PID" || true; forget "$FIO_PID"
    for p in $st_pid $stb_pid; do
      kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; forget "$p"
    done
    stop_servers
    read -r ios iops _ < <(fio_ios "$dir/fio.json")
    echo "under strace: $iops IOPS, $ios requests; system calls per request:"
    for f in strace.txt ${stb_pid:+b-strace.txt}; do
      [ "$f" = strace.txt ] || echo "  site b (downstream process):"
    "$PY" - "$dir/$f" "$ios" <<'PY'
import sys
path, ios = sys.argv[1], max(int(sys.argv[2]), 1)
rows, total = [], 0
for line in open(path):
    f = line.split()
    if len(f) < 5 or not f[0][0].isdigit():
        continue
    name = f[-1]
    if name == "total":
        continue
    calls = int(f[3])
    errors = int(f[4]) if len(f) == 6 else 0
    rows.append((calls, name, errors, int(f[2])))
    total += calls
rows.sort(reverse=True)
print(f"  total {total / ios:.2f} per request: " + ", ".join(
    f"{name} {calls / ios:.2f}" + (f" ({errors / ios:.2f} failed)" if errors else "")
    for calls, name, errors, _ in rows if calls / ios >= 0.01))
# strace -w: wall-clock time per call, blocking included (epoll_wait's is
# idle time; fdatasync's is the disk).
print("    wall time per call: " + ", ".join(
    f"{name} {us:,} us" for calls, name, _, us in rows if calls / ios >= 0.01))
PY
    done
  fi
  # 3. perf, self time by symbol and by thread.
  if [ "$DO_PERF" = 1 ]; then
    dir=$WORK/$s-perf; mkdir -p "$dir"
    start_server "$s" "$dir"
    sync
    timeout $((RUNTIME + 60)) perf record -q -e cpu-clock -g -o "$dir/perf.data" -p "$SPID${BPID:+,$BPID}" >/dev/null 2>&1 &
    pf_pid=$!; PIDS+=("$pf_pid")
    sleep 0.5
    run_fio "$URI" "$dir/fio.json"; wait "$FIO_PID" || true; forget "$FIO_PID"
    kill -INT "$pf_pid" 2>/dev/null || true; wait "$pf_pid" 2>/dev/null || true; forget "$pf_pid"
    stop_servers
    read -r ios iops _ < <(fio_ios "$dir/fio.json")
    echo "under perf: $iops IOPS; top symbols by self time (all threads):"
    perf report -i "$dir/perf.data" --stdio --no-children --sort sym -g none 2>/dev/null \
      | grep -E '^ +[0-9]' | head -25 | sed 's/^/  /' || true
    if [ -n "$BPID" ]; then
      # perf 6.1's `report --pid` filter drops samples here; aggregate
      # `--sort pid,sym` (per thread) by process instead, threads mapped to
      # processes with `perf script -F pid,tid`.
      perf script -i "$dir/perf.data" -F pid,tid -G 2>/dev/null | sort -u >"$dir/tids.txt" || true
      perf report -i "$dir/perf.data" --stdio --no-children --sort pid,sym -g none 2>/dev/null \
        | grep -E '^ +[0-9]' >"$dir/pid-sym.txt" || true
      "$PY" - "$dir/tids.txt" "$dir/pid-sym.txt" "$SPID" "$BPID" <<'PY'
import collections, re, sys
tids, report, srv, b = sys.argv[1:5]
proc = {}
for line in open(tids):
    if "/" in line:
        p, t = line.split()[0].split("/")
        proc[t] = p
per = {srv: collections.Counter(), b: collections.Counter()}
for line in open(report):
    m = re.match(r"\s*([0-9.]+)%\s+(\d+):\S*\s+(.*\S)", line)
    if not m:
        continue
    p = proc.get(m.group(2))
    if p in per:
        per[p][m.group(3)] += float(m.group(1))
total = sum(sum(c.values()) for c in per.values()) or 1
for pid, name in ((srv, "server"), (b, "site b")):
    c = per[pid]
    own = sum(c.values()) or 1
    print(f"  {name} (pid {pid}): {own * 100 / total:.1f} % of the samples; its top symbols (% of its own):")
    for sym, pct in c.most_common(12):
        print(f"    {pct * 100 / own:6.2f}%  {sym}")
PY
    fi
    echo "  by thread:"
    perf report -i "$dir/perf.data" --stdio --no-children --sort pid -g none 2>/dev/null \
      | grep -E '^ +[0-9]' | head -8 | sed 's/^/  /' || true
    echo "  by kernel/user (dso):"
    perf report -i "$dir/perf.data" --stdio --no-children --sort dso -g none 2>/dev/null \
      | grep -E '^ +[0-9]' | head -6 | sed 's/^/  /' || true
  fi
done
