#!/usr/bin/env bash
# scripts/bench.sh — benchmark blockrelay against peer NBD servers with fio.
#
# This is a benchmark, not a test: ctest never runs it. It measures, it does
# not pass or fail (it exits non-zero only when it cannot measure at all).
#
# What it does
#   1. scripts/install-deps.sh when present (else: checks the tools exist and
#      names what is missing), then builds blockrelay (RelWithDebInfo) in its
#      own build dir, build-bench/ (--no-build skips this).
#   2. mktemp -d a work dir on a real file system (/var/tmp by default, or the
#      repository's file system; never tmpfs) and creates the backing files,
#      each of --size (default 4GiB), with fallocate, then fills each
#      completely once with fio (fio's random buffer contents, then fsync), so
#      no server ever reads holes or writes into unwritten extents:
#        disk.img         shared by every page-cache server (blockrelay*,
#                         nbdkit-file, qemu-nbd-wb): filled with buffered 4 KiB
#                         sequential writes, so the whole file sits in the page
#                         cache in 4 KiB folios for the entire benchmark;
#        disk-direct.img  for qemu-nbd-none (O_DIRECT): filled with O_DIRECT
#                         1 MiB writes, never in the page cache.
#      Why two files and 4 KiB folios: on this kernel (Linux 6.18, ext4 with
#      large folios) a 4 KiB buffered write into a page-cache folio made by a
#      large write or by readahead costs ~10x more (walks every buffer head
#      of the folio: 15k vs 157k IOPS for fio psync straight on the file),
#      and a folio keeps its size until evicted. O_DIRECT writes evict the
#      cached pages they cover, so a shared file would change size classes
#      behind the other servers' backs and each row would measure the page
#      cache's history instead of the server. `fincore` of disk.img is
#      logged before every run to show it stayed cached.
#   3. For each round, each row (workload), each server (order rotated per
#      round): `sync`, start the server fresh on its own Unix socket (or
#      loopback TCP with --transport tcp), wait until it answers, run fio's
#      nbd engine (--ioengine=nbd --uri=...) for --runtime seconds after a
#      --ramp second warm-up, stop the server by PID (SIGTERM, then SIGKILL
#      after 10 s). Nothing else is dropped between runs (no drop_caches).
#   4. Medians per (row, server) over the rounds, printed as a markdown
#      section ("## Latest run") with the machine description and the exact
#      command line; --write-doc replaces that section in docs/benchmarks.md
#      and keeps everything above it (the hand-written header) and every later
#      "## " section (hand-written analysis). Variants of blockrelay
#      (-logging, -async, -sync) are also compared round by round with
#      blockrelay's run of the same row and round ("per round": median and
#      range of those paired ratios), which shows how far the noise alone
#      moves a ratio.
#
# Servers (name -> start function; see SERVERS below):
#   blockrelay           this tree's daemon, one volume, no downstream link
#   blockrelay-logging   the same plus one downstream link to a closed
#                        loopback port, slot starting clean (issue 3:
#                        logging mode, writes dirty the scoreboard)
#   blockrelay-async     the same plus a second blockrelay process on loopback
#                        TCP as site "b" (role secondary) behind an async link
#   blockrelay-sync      the same with a sync link (issue 4 rows; see below)
#   nbdkit-file          nbdkit file plugin (page cache, default threads)
#   qemu-nbd-none        qemu-nbd -f raw --cache=none --aio=native -t -e 16
#   qemu-nbd-wb          qemu-nbd -f raw --cache=writeback -t -e 16
#   null                 nbdkit null: stores nothing, the floor (not a peer)
# "best peer" on a row = the best of nbdkit-file, qemu-nbd-none, qemu-nbd-wb.
#
# Issue 4 (replication to a second process on the same 2 cores):
#   blockrelay-async / blockrelay-sync start site "b" first (its own backing
#   file disk-b.img, filled once like disk.img and reused by every run; fresh
#   data_dir per run), then site "bench" with one link
#     {"site": "b", "address": "127.0.0.1:<port>", "mode": "async"|"sync",
#      "initial_sync": "none"}
#   and wait (`blockrelay wait`) until the link is replicating and caught up
#   before fio starts. Both processes are stopped by PID after the run. The
#   link's status (state, connects, bytes sent) is saved after every run, so a
#   link that fell back to logging during a run shows up in the report; then
#   `blockrelay wait` is timed (at most 300 s): how long after fio the link
#   was caught up, which is what a link that overflowed and waited for the
#   writers to slow down (docs/replication.md, "Congestion") owes.
#   Goals, shown next to the ratios against "blockrelay" (no link):
#   async >= 0.85x IOPS on every row; sync: randwrite-4k-qd1 mean latency
#   <= 2x, >= 0.7x IOPS on the QD32 rows.
#   Wire rows (--wire): fio 4 KiB random writes that overwrite the same 1 MiB
#   (--size=1M) at QD32 and QD1 on blockrelay-async, once with the default
#   group_interval (10 ms) and once with "group_interval": "100ms"; from the
#   primary's `status --json` before and after (after `blockrelay wait`):
#   wire_bytes_sent / bytes_written. Goal <= 0.2x.
#
# Resync rows (issue 5; --resync-rows adds them, --resync-only runs only
#   them): two blockrelay processes on loopback as above, own backing files
#   of --size (resync-a.img / resync-b.img, init-a.img, init-b.img).
#   outage-1pct: resync-a.img filled with data (buffered 4 KiB writes) and
#     copied to resync-b.img; primary and b start with "initial_sync": "none"
#     (identical files) and catch up; `blockrelay pause` drops the link;
#     fio writes 1% of the volume as random 4 KiB blocks (--number_ios, no
#     block twice); the scoreboard's dirty_bytes for b is read; `blockrelay
#     resume` and `blockrelay wait` are timed. Reported: resync_bytes_sent /
#     dirty_bytes (goal <= 1.1x) and resync time / baseline (goal <= 2x).
#     Baseline: moving dirty_bytes over the same loopback with nbdcopy
#     --flush from a file into an nbdkit file server on 127.0.0.1 TCP (a
#     file with real blocks): file read + loopback TCP + file write + flush,
#     the same shape of work as the resync, minus blockrelay's scattered
#     64 KiB regions and its downstream journal. Both daemons are stopped
#     and the two files compared (cmp) after each round.
#   initial-half-zero: init-a.img's first half random data, second half a
#     hole; a fresh downstream (init-b.img created by site b, sparse) with
#     "initial_sync": "full"; timed from the primary's start until
#     `blockrelay wait` returns. Baseline (goal <= 1x): nbdcopy --flush of
#     the non-zero half (a file of --size/2) into a fresh sparse file behind
#     nbdkit on 127.0.0.1 TCP.
#   With --write-doc they replace the "## Latest resync run" section of
#   docs/benchmarks.md (the other rows' "## Latest run" only when they ran).
#
# Usage: bash scripts/bench.sh [options]      (as root)
#   --rounds N        rounds (default 3)
#   --runtime S       measured seconds per run (default 10)
#   --ramp S          warm-up seconds per run, not measured (default 1)
#   --quick           --rounds 1 --runtime 3
#   --rows A,B        only these rows (see --list)
#   --servers A,B     only these servers (see --list)
#   --transport T     unix (default) or tcp (127.0.0.1)
#   --size SIZE       backing file size for fallocate (default 4GiB)
#   --io-threads N    blockrelay nbd.io_threads, both sites (default: the daemon's own)
#   --poll-us N       blockrelay nbd.poll_us, both sites (default: the daemon's own)
#   --poll-us-b N     site b's nbd.poll_us only (default: as --poll-us)
#   --workdir-base D  where to mktemp -d the work dir (default /var/tmp)
#   --build-dir D     build dir (default build-bench; relative to the repo
#                     or absolute); the binary is D/blockrelay, or
#                     $BLOCKRELAY_BIN when set (implies --no-build)
#   --no-build        use the existing binary in the build dir
#   --wire A,B|none   wire-efficiency rows on blockrelay-async (see --list;
#                     default: all of them when blockrelay-async is among the
#                     servers, else none)
#   --resync-rows     also run the resync rows (see above; each round runs
#                     both, --rounds times)
#   --resync-only     only the resync rows (no fio rows, servers or wire rows)
#   --write-doc       also write the "## Latest run" section to docs/benchmarks.md
#   --keep            keep the work dir (fio JSON, server logs) and say where
#   --report-from D   measure nothing: build the report (and with --write-doc
#                     the doc section) again from the kept work dir D of an
#                     earlier run, e.g. after changing the report code
#   --list            list rows and servers and exit
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CMDLINE="bash scripts/bench.sh"
for a in "$@"; do
  if [[ $a =~ ^[A-Za-z0-9_./,:=+-]+$ ]]; then CMDLINE+=" $a"; else CMDLINE+=" $(printf '%q' "$a")"; fi
done

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- rows ----
# name|fio arguments|direction measured (read/write)
ROW_DEFS=(
  "randwrite-4k-qd1|--rw=randwrite --bs=4k --iodepth=1|write"
  "randwrite-4k-qd32|--rw=randwrite --bs=4k --iodepth=32|write"
  "randread-4k-qd32|--rw=randread --bs=4k --iodepth=32|read"
  "seqwrite-1m-qd8|--rw=write --bs=1M --iodepth=8|write"
  "seqread-1m-qd8|--rw=read --bs=1M --iodepth=8|read"
  "randwrite-4k-qd32-fsync32|--rw=randwrite --bs=4k --iodepth=32 --fsync=32|write"
  "randwrite-4k-qd1-fsync32|--rw=randwrite --bs=4k --iodepth=1 --fsync=32|write"
)
row_names() { local d; for d in "${ROW_DEFS[@]}"; do echo "${d%%|*}"; done; }
row_field() {  # row_field NAME INDEX(1=args,2=dir)
  local d; for d in "${ROW_DEFS[@]}"; do
    if [ "${d%%|*}" = "$1" ]; then
      local _n args dir
      IFS='|' read -r _n args dir <<<"$d"
      if [ "$2" = 1 ]; then echo "$args"; else echo "$dir"; fi
      return 0
    fi
  done
  return 1
}

# Wire-efficiency rows (issue 4), run on blockrelay-async only:
# name|fio arguments|extra link settings (JSON members, may be empty)
WIRE_DEFS=(
  "overwrite-1m-qd32|--rw=randwrite --bs=4k --iodepth=32 --size=1M|"
  "overwrite-1m-qd1|--rw=randwrite --bs=4k --iodepth=1 --size=1M|"
  "overwrite-1m-qd32-gi100ms|--rw=randwrite --bs=4k --iodepth=32 --size=1M|\"group_interval\": \"100ms\""
  "overwrite-1m-qd1-gi100ms|--rw=randwrite --bs=4k --iodepth=1 --size=1M|\"group_interval\": \"100ms\""
)
wire_names() { local d; for d in "${WIRE_DEFS[@]}"; do echo "${d%%|*}"; done; }
wire_field() {  # wire_field NAME INDEX(1=fio args,2=link settings)
  local d; for d in "${WIRE_DEFS[@]}"; do
    if [ "${d%%|*}" = "$1" ]; then
      local _n args link
      IFS='|' read -r _n args link <<<"$d"
      if [ "$2" = 1 ]; then echo "$args"; else echo "$link"; fi
      return 0
    fi
  done
  return 1
}

# ------------------------------------------------------------- servers ----
# name|start function|kind (blockrelay, variant, peer, floor)
SERVER_DEFS=(
  "blockrelay|start_blockrelay|blockrelay"
  "blockrelay-logging|start_blockrelay_logging|variant"
  "blockrelay-async|start_blockrelay_async|variant"
  "blockrelay-sync|start_blockrelay_sync|variant"
  "nbdkit-file|start_nbdkit_file|peer"
  "qemu-nbd-none|start_qemu_nbd_none|peer"
  "qemu-nbd-wb|start_qemu_nbd_wb|peer"
  "null|start_null|floor"
)
server_names() { local d; for d in "${SERVER_DEFS[@]}"; do echo "${d%%|*}"; done; }
server_field() {  # server_field NAME INDEX(1=function,2=kind)
  local d; for d in "${SERVER_DEFS[@]}"; do
    if [ "${d%%|*}" = "$1" ]; then
      local _n fn kind
      IFS='|' read -r _n fn kind <<<"$d"
      if [ "$2" = 1 ]; then echo "$fn"; else echo "$kind"; fi
      return 0
    fi
  done
  return 1
}

# ------------------------------------------------------------- options ----
ROUNDS=3
RUNTIME=10
RAMP=1
TRANSPORT=unix
SIZE=4GiB
IO_THREADS=
POLL_US=
POLL_US_B=
WORKDIR_BASE=/var/tmp
BUILD_DIR=build-bench
DO_BUILD=1
WRITE_DOC=0
KEEP=0
REPORT_FROM=
ROWS=$(row_names | paste -sd, -)
# Default: everything that is implemented (TODO variants are skipped anyway,
# listing them keeps the "not implemented yet" visible in every run).
SERVERS=$(server_names | paste -sd, -)
WIRE=default
RESYNC=0

while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --runtime) RUNTIME=$2; shift 2 ;;
    --ramp) RAMP=$2; shift 2 ;;
    --quick) ROUNDS=1; RUNTIME=3; shift ;;
    --rows) ROWS=$2; shift 2 ;;
    --servers) SERVERS=$2; shift 2 ;;
    --transport) TRANSPORT=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --io-threads) IO_THREADS=$2; shift 2 ;;
    --poll-us) POLL_US=$2; shift 2 ;;
    --poll-us-b) POLL_US_B=$2; shift 2 ;;
    --workdir-base) WORKDIR_BASE=$2; shift 2 ;;
    --build-dir) BUILD_DIR=$2; shift 2 ;;
    --no-build) DO_BUILD=0; shift ;;
    --wire) WIRE=$2; shift 2 ;;
    --write-doc) WRITE_DOC=1; shift ;;
    --resync-rows) RESYNC=1; shift ;;
    --resync-only) RESYNC=2; shift ;;
    --keep) KEEP=1; shift ;;
    --report-from) REPORT_FROM=$2; shift 2 ;;
    --list)
      echo "rows:"; for d in "${ROW_DEFS[@]}"; do IFS='|' read -r n a _ <<<"$d"; printf '  %-28s fio %s\n' "$n" "$a"; done
      echo "servers:"; for d in "${SERVER_DEFS[@]}"; do IFS='|' read -r n _ k <<<"$d"; printf '  %-20s %s\n' "$n" "$k"; done
      echo "resync rows (--resync-rows, --resync-only): outage-1pct, initial-half-zero (see --help)"
      echo "wire rows (blockrelay-async; --wire):"
      for d in "${WIRE_DEFS[@]}"; do IFS='|' read -r n a l <<<"$d"; printf '  %-28s fio %s%s\n' "$n" "$a" "${l:+; link: $l}"; done
      exit 0 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds: expected a positive integer"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "--runtime: expected a positive integer"
[[ $RAMP =~ ^[0-9]+$ ]] || die "--ramp: expected an integer"
[ "$TRANSPORT" = unix ] || [ "$TRANSPORT" = tcp ] || die "--transport: unix or tcp"
[ -z "$IO_THREADS" ] || [[ $IO_THREADS =~ ^[1-9][0-9]*$ ]] || die "--io-threads: expected a positive integer"
[ -z "$POLL_US" ] || [[ $POLL_US =~ ^[0-9]+$ ]] || die "--poll-us: expected a whole number of microseconds"
[ -z "${POLL_US_B:-}" ] || [[ $POLL_US_B =~ ^[0-9]+$ ]] || die "--poll-us-b: expected a whole number of microseconds"
if [ "$RESYNC" = 2 ]; then ROWS=; SERVERS=; WIRE=none; fi
IFS=, read -r -a ROW_LIST <<<"$ROWS"
IFS=, read -r -a SERVER_LIST <<<"$SERVERS"
# The fio rows (and their report section) run unless --resync-only.
MAIN_PART=1
[ "$RESYNC" = 2 ] && MAIN_PART=0
for r in "${ROW_LIST[@]}"; do row_field "$r" 1 >/dev/null || die "unknown row '$r' (see --list)"; done
for s in "${SERVER_LIST[@]}"; do server_field "$s" 1 >/dev/null || die "unknown server '$s' (see --list)"; done
if [ "$WIRE" = default ]; then
  if [[ ,$SERVERS, == *,blockrelay-async,* ]]; then WIRE=$(wire_names | paste -sd, -); else WIRE=none; fi
fi
WIRE_LIST=()
if [ "$WIRE" != none ] && [ -n "$WIRE" ]; then IFS=, read -r -a WIRE_LIST <<<"$WIRE"; fi
for r in "${WIRE_LIST[@]+"${WIRE_LIST[@]}"}"; do wire_field "$r" 1 >/dev/null || die "unknown wire row '$r' (see --list)"; done
# Servers whose runs need site b's backing file.
NEED_DISK_B=0
[[ ,$SERVERS, == *,blockrelay-async,* || ,$SERVERS, == *,blockrelay-sync,* ]] && NEED_DISK_B=1
[ ${#WIRE_LIST[@]} -gt 0 ] && NEED_DISK_B=1
[ "$(id -u)" -eq 0 ] || log "warning: not root; sync and the build may still work, the numbers were taken as root"

if [ -n "$REPORT_FROM" ]; then
  [ -f "$REPORT_FROM/machine.txt" ] && [ -f "$REPORT_FROM/results/runs.tsv" ] \
    || die "--report-from: $REPORT_FROM is not a kept work dir (no machine.txt or results/runs.tsv)"
  WORK=$(cd "$REPORT_FROM" && pwd)
  RESULTS=$WORK/results; TSV=$RESULTS/runs.tsv; WIRE_TSV=$RESULTS/wire.tsv; MACHINE=$WORK/machine.txt
  RESYNC_TSV=$RESULTS/resync.tsv
  log "report from the kept work dir $WORK (nothing measured)"
else
# ------------------------------------------------------- deps and build ----
if [ -x scripts/install-deps.sh ] || [ -f scripts/install-deps.sh ]; then
  log "scripts/install-deps.sh"
  bash scripts/install-deps.sh >&2 || die "scripts/install-deps.sh failed"
else
  log "scripts/install-deps.sh not found: only checking that the tools exist"
fi
missing=()
for t in fio nbdkit qemu-nbd nbdinfo python3 cmake ninja g++ fallocate timeout git; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
if [ ${#missing[@]} -gt 0 ]; then
  die "missing tools: ${missing[*]} (Debian 12: fio nbdkit qemu-utils libnbd-bin python3 cmake ninja-build g++ util-linux coreutils git)"
fi
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (Debian's fio has it)"
nbdkit --dump-plugin file >/dev/null 2>&1 || die "nbdkit file plugin missing"
nbdkit --dump-plugin null >/dev/null 2>&1 || die "nbdkit null plugin missing"

case "$BUILD_DIR" in /*) ;; *) BUILD_DIR=$REPO/$BUILD_DIR ;; esac
BR_BIN=$BUILD_DIR/blockrelay
if [ -n "${BLOCKRELAY_BIN:-}" ]; then
  BR_BIN=$BLOCKRELAY_BIN; DO_BUILD=0
  log "using \$BLOCKRELAY_BIN=$BR_BIN (no build)"
fi
# What the binary is built from: HEAD, and whether src/, include/ or
# CMakeLists.txt differ from it. Others edit and commit on this machine, so
# it is taken before and after the build: if it changed meanwhile, the
# binary's source is not known exactly, and the report says so.
git_state() {
  local c; c=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  if [ -n "$(git status --porcelain -- src include CMakeLists.txt 2>/dev/null)" ]; then
    c="$c (built from a working tree with uncommitted changes under src/, include/ or CMakeLists.txt)"
  fi
  echo "$c"
}
if [ "$DO_BUILD" = 1 ]; then
  log "building blockrelay in $BUILD_DIR (RelWithDebInfo)"
  state_before=$(git_state)
  timeout 3600 cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >&2 \
    || die "cmake failed"
  timeout 3600 ninja -C "$BUILD_DIR" -j"$(nproc)" blockrelay >&2 || die "build failed"
  state_after=$(git_state)
  if [ "$state_before" = "$state_after" ]; then
    echo "$state_after" >"$BR_BIN.build-info"
  else
    log "warning: HEAD or the working tree changed during the build ($state_before -> $state_after)"
    echo "unknown: the tree changed during the build ($state_before -> $state_after)" >"$BR_BIN.build-info"
  fi
fi
[ -x "$BR_BIN" ] || die "$BR_BIN missing (build it, or drop --no-build)"
# The build's git_state is kept next to the binary (blockrelay.build-info,
# one line), because with --no-build the working tree may have changed since.
# A binary built by hand gets one with the same content (see git_state).
if [ -f "$BR_BIN.build-info" ] && [ ! "$BR_BIN" -nt "$BR_BIN.build-info" ]; then
  BUILD_INFO=$(head -1 "$BR_BIN.build-info")
else
  # Named relative to the repository: the report goes into docs/, which
  # must not name a path of the machine it ran on.
  BUILD_INFO="unknown: ${BR_BIN#"$REPO"/} was not built by bench.sh (HEAD now: $(git_state))"
fi

# ------------------------------------------------------------ work dir ----
fs_type() {
  findmnt -n -o FSTYPE --target "$1" 2>/dev/null || stat -f -c %T "$1" 2>/dev/null || echo unknown
}
is_memfs() { case "$(fs_type "$1")" in tmpfs|ramfs) return 0 ;; *) return 1 ;; esac; }
if [ ! -d "$WORKDIR_BASE" ] || is_memfs "$WORKDIR_BASE"; then
  log "$WORKDIR_BASE is missing or in memory ($(fs_type "$WORKDIR_BASE")); using the repository's file system"
  WORKDIR_BASE=$REPO
fi
is_memfs "$WORKDIR_BASE" && die "no disk-backed directory for the work dir (both candidates are tmpfs)"
WORK=$(mktemp -d "$WORKDIR_BASE/blockrelay-bench.XXXXXX")

# PIDs we started and have not reaped yet: the only processes we ever signal.
STARTED_PIDS=()
forget_pid() {
  local keep=() p
  for p in "${STARTED_PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  STARTED_PIDS=("${keep[@]}")
}
cleanup() {
  local rc=$? pid i
  trap - EXIT INT TERM
  for pid in "${STARTED_PIDS[@]+"${STARTED_PIDS[@]}"}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  if [ "$KEEP" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Stops one process we started: SIGTERM, up to 10 s, then SIGKILL; reaps it.
stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; forget_pid "$pid"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "warning: pid $pid ignored SIGTERM for 10 s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}

# A loopback port nothing listens on right now (bound, then closed).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

size_num=${SIZE%B}
case "$size_num" in
  *i) SIZE_BYTES=$(numfmt --from=iec-i "$size_num" 2>/dev/null) || SIZE_BYTES= ;;
  *) SIZE_BYTES=$(numfmt --from=iec "$size_num" 2>/dev/null) || SIZE_BYTES= ;;
esac
[[ $SIZE_BYTES =~ ^[0-9]+$ ]] && [ $((SIZE_BYTES % 1048576)) = 0 ] && [ "$SIZE_BYTES" -gt 0 ] \
  || die "--size: expected a whole number of MiB like 4GiB or 512MiB, got '$SIZE'"
DISK=$WORK/disk.img
DISK_DIRECT=$WORK/disk-direct.img
log "work dir $WORK ($(fs_type "$WORK"), $(df -h --output=source,size,avail "$WORK" | tail -1 | tr -s ' '))"
if [ "$MAIN_PART" = 1 ]; then
log "backing files: fallocate $SIZE each; disk.img filled with buffered 4k writes (page cache, 4 KiB folios), disk-direct.img with O_DIRECT 1M writes"
fallocate -l "$SIZE_BYTES" "$DISK"
timeout 1800 fio --name=precondition --filename="$DISK" --rw=write --bs=4k --ioengine=psync \
  --size="$SIZE_BYTES" --end_fsync=1 --output-format=terse >/dev/null \
  || die "preconditioning $DISK failed"
fi
if [[ ,$SERVERS, == *,qemu-nbd-none,* ]]; then
  fallocate -l "$SIZE_BYTES" "$DISK_DIRECT"
  timeout 1800 fio --name=precondition --filename="$DISK_DIRECT" --rw=write --bs=1M --direct=1 \
    --ioengine=libaio --iodepth=8 --size="$SIZE_BYTES" --output-format=terse >/dev/null \
    || die "preconditioning $DISK_DIRECT failed"
fi
# Site b's backing file for blockrelay-async/-sync and the wire rows: one
# file, filled once exactly like disk.img (buffered 4 KiB writes: real
# blocks, page cache in 4 KiB folios) and reused by every run, like disk.img
# is. Not a sparse file: the downstream would then allocate blocks on its
# first write to each 4 KiB (ext4 block allocation and extent-tree growth on
# the 2 cores the primary uses too), which a replica of a real volume does
# not pay, and its cost would shrink from run to run as the file fills up.
# Not a new file per run: filling 4 GiB costs ~1 min per run. The two files
# do not hold the same bytes (and disk.img is rewritten by every server);
# "initial_sync": "none" only skips the initial resync, and nothing ever
# reads site b's data.
DISK_B=$WORK/disk-b.img
if [ "$NEED_DISK_B" = 1 ]; then
  log "disk-b.img (site b of blockrelay-async/-sync): fallocate $SIZE, filled like disk.img"
  fallocate -l "$SIZE_BYTES" "$DISK_B"
  timeout 1800 fio --name=precondition --filename="$DISK_B" --rw=write --bs=4k --ioengine=psync \
    --size="$SIZE_BYTES" --end_fsync=1 --output-format=terse >/dev/null \
    || die "preconditioning $DISK_B failed"
fi
sync
# Percentage of a file (default disk.img) in the page cache (fincore), or "?".
cached_pct() {
  local res
  res=$(fincore -b -n -o RES "${1:-$DISK}" 2>/dev/null | tr -d ' ') || res=
  if [[ $res =~ ^[0-9]+$ ]]; then echo $((res * 100 / SIZE_BYTES)); else echo "?"; fi
}

# ------------------------------------------------------- start functions ----
# Contract: start_X RUN_DIR starts one server process in the background on a
# fresh endpoint, appends its PID to STARTED_PIDS, and sets SERVER_PID and
# SERVER_URI. Return 0 when started, 2 when the server is not implemented
# (it is then skipped for the whole run), anything else on failure. The
# caller waits for the server to answer and stops it by PID afterwards.

# Endpoint for this run: sets EP_SOCK (unix) or EP_PORT (tcp).
new_endpoint() {
  if [ "$TRANSPORT" = unix ]; then EP_SOCK=$1/nbd.sock; EP_PORT=
  else EP_PORT=$(free_port); EP_SOCK=; fi
}
uri_for() {  # uri_for EXPORT_NAME
  if [ "$TRANSPORT" = unix ]; then echo "nbd+unix:///$1?socket=$EP_SOCK"
  else echo "nbd://127.0.0.1:$EP_PORT/$1"; fi
}
launch() {  # launch LOGFILE CMD...: background, record PID
  local logf=$1; shift
  "$@" >"$logf" 2>&1 </dev/null &
  SERVER_PID=$!
  STARTED_PIDS+=("$SERVER_PID")
}

# Writes a blockrelay site config for this run. $2 = JSON array of downstream
# links (or empty for none).
write_blockrelay_config() {
  local dir=$1 downstream=$2 nbd links=""
  if [ "$TRANSPORT" = unix ]; then nbd="\"unix_socket\": \"$EP_SOCK\""
  else nbd="\"listen\": \"127.0.0.1:$EP_PORT\""; fi
  if [ -n "$IO_THREADS" ]; then nbd="$nbd, \"io_threads\": $IO_THREADS"; fi
  if [ -n "$POLL_US" ]; then nbd="$nbd, \"poll_us\": $POLL_US"; fi
  if [ -n "$downstream" ]; then links=",
      \"downstream\": $downstream"; fi
  cat >"$dir/site.json" <<EOF
{
  "site": "bench",
  "data_dir": "$dir/data",
  "control_socket": "$dir/control.sock",
  "nbd": { $nbd },
  "groups": [
    {
      "name": "bench",
      "role": "primary",
      "volumes": [ { "name": "data", "path": "$DISK", "size": "$SIZE_BYTES" } ]$links
    }
  ]
}
EOF
  "$BR_BIN" check-config "$dir/site.json" >"$dir/check-config.log" 2>&1 || {
    log "blockrelay refused the generated config:"; cat "$dir/check-config.log" >&2; return 1; }
}

start_blockrelay() {
  new_endpoint "$1"
  write_blockrelay_config "$1" "" || return 1
  launch "$1/server.log" "$BR_BIN" run --config "$1/site.json"
  SERVER_URI=$(uri_for data)
}

# Issue 3 rows: one downstream link that can never connect (a closed loopback
# port), so the volume runs in logging mode: every write must have its
# region's scoreboard bit durable before it reaches the disk. The link says
# "initial_sync": "none" so its slot starts clean; without it a new slot
# starts all dirty and no write would ever dirty anything (the cheapest case,
# not the one to measure). The data_dir is fresh for every run.
start_blockrelay_logging() {
  new_endpoint "$1"
  local closed_port; closed_port=$(free_port)
  write_blockrelay_config "$1" \
    "[ { \"site\": \"b\", \"address\": \"127.0.0.1:$closed_port\", \"mode\": \"async\", \"initial_sync\": \"none\" } ]" || return 1
  launch "$1/server.log" "$BR_BIN" run --config "$1/site.json"
  SERVER_URI=$(uri_for data)
}

# Issue 4 rows: site b, a second blockrelay process, is the downstream on
# loopback TCP. start_blockrelay_link MODE DIR [EXTRA-LINK-JSON-MEMBERS]:
# starts b (role secondary, replication.listen on a free port, backing file
# disk-b.img, fresh data_dir), waits until its control socket answers, starts
# the primary with one link to b ("initial_sync": "none": both slots start
# clean, no resync), then waits with `blockrelay wait` until the link is
# replicating with nothing queued. b's PID goes to AUX_PIDS (the caller stops
# it after the primary); both are in STARTED_PIDS.
BR_CONFIG=   # the primary's config of the current blockrelay-async/-sync run
AUX_PIDS=()  # other processes of the current run (site b)
start_blockrelay_link() {
  local mode=$1 dir=$2 extra=${3:-} bdir=$2/b port attempt i ok bpid
  mkdir -p "$bdir"
  new_endpoint "$dir"
  local bnbd="\"unix_socket\": \"$bdir/nbd.sock\""
  if [ -n "$IO_THREADS" ]; then bnbd="$bnbd, \"io_threads\": $IO_THREADS"; fi
  if [ -n "${POLL_US_B:-$POLL_US}" ]; then bnbd="$bnbd, \"poll_us\": ${POLL_US_B:-$POLL_US}"; fi
  for attempt in 1 2 3; do
    port=$(free_port)
    cat >"$bdir/site.json" <<EOF
{
  "site": "b",
  "data_dir": "$bdir/data",
  "control_socket": "$bdir/control.sock",
  "nbd": { $bnbd },
  "replication": { "listen": "127.0.0.1:$port" },
  "groups": [
    {
      "name": "bench",
      "role": "secondary",
      "upstream": { "site": "bench" },
      "volumes": [ { "name": "data", "path": "$DISK_B", "size": "$SIZE_BYTES" } ]
    }
  ]
}
EOF
    "$BR_BIN" check-config "$bdir/site.json" >"$bdir/check-config.log" 2>&1 || {
      log "blockrelay refused site b's generated config:"; cat "$bdir/check-config.log" >&2; return 1; }
    "$BR_BIN" run --config "$bdir/site.json" >"$bdir/server.log" 2>&1 </dev/null &
    bpid=$!
    AUX_PIDS+=("$bpid"); STARTED_PIDS+=("$bpid")
    ok=0
    for i in $(seq 150); do
      kill -0 "$bpid" 2>/dev/null || break
      if timeout 5 "$BR_BIN" status --config "$bdir/site.json" >/dev/null 2>&1; then ok=1; break; fi
      sleep 0.1
    done
    [ "$ok" = 1 ] && break
    stop_pid "$bpid"; AUX_PIDS=()
    if [ "$attempt" -lt 3 ] && grep -qi "address already in use" "$bdir/server.log"; then
      log "site b: port $port was taken meanwhile; trying another"; continue
    fi
    log "site b did not start; its log:"; tail -20 "$bdir/server.log" >&2
    return 1
  done
  local link="{ \"site\": \"b\", \"address\": \"127.0.0.1:$port\", \"mode\": \"$mode\", \"initial_sync\": \"${LINK_INITIAL_SYNC:-none}\"${extra:+, $extra} }"
  write_blockrelay_config "$dir" "[ $link ]" || return 1
  BR_CONFIG=$dir/site.json
  LINK_STARTED_AT=$(date +%s.%N)
  launch "$dir/server.log" "$BR_BIN" run --config "$dir/site.json"
  SERVER_URI=$(uri_for data)
  wait_ready || return 1
  # LINK_NO_WAIT=1: the caller times the catch-up itself (resync rows).
  [ "${LINK_NO_WAIT:-0}" = 1 ] && return 0
  if ! timeout 90 "$BR_BIN" wait bench --config "$dir/site.json" --timeout 60 >"$dir/wait.log" 2>&1; then
    log "the link to site b did not catch up within 60 s:"; cat "$dir/wait.log" >&2
    return 1
  fi
}
start_blockrelay_async() { start_blockrelay_link async "$1"; }
start_blockrelay_sync() { start_blockrelay_link sync "$1"; }

# The primary's `status --json` of the current blockrelay-async/-sync run.
save_status() {  # save_status FILE
  [ -n "$BR_CONFIG" ] || return 0
  timeout 15 "$BR_BIN" status --json --config "$BR_CONFIG" >"$1" 2>/dev/null || echo '{}' >"$1"
}

# Seconds until the link of the current blockrelay-async/-sync run is caught
# up, into FILE ("timeout" if not within 300 s).
time_catch_up() {  # time_catch_up FILE
  [ -n "$BR_CONFIG" ] || return 0
  local t0 t1
  t0=$(date +%s.%N)
  if timeout 330 "$BR_BIN" wait bench --link b --config "$BR_CONFIG" --timeout 300 \
      >"$1.log" 2>&1; then
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f\n", b - a }' >"$1"
  else
    echo timeout >"$1"
  fi
}

start_nbdkit_file() {
  new_endpoint "$1"
  if [ "$TRANSPORT" = unix ]; then
    launch "$1/server.log" nbdkit -f -U "$EP_SOCK" file file="$DISK"
  else
    launch "$1/server.log" nbdkit -f -i 127.0.0.1 -p "$EP_PORT" file file="$DISK"
  fi
  SERVER_URI=$(uri_for "")
}

start_qemu_nbd() {  # start_qemu_nbd DIR FILE CACHE-ARGS...
  local dir=$1 file=$2; shift 2
  new_endpoint "$dir"
  local ep
  if [ "$TRANSPORT" = unix ]; then ep=(-k "$EP_SOCK"); else ep=(-b 127.0.0.1 -p "$EP_PORT"); fi
  # -t: keep serving after fio's probe connection ends; -e 16: connections.
  launch "$dir/server.log" qemu-nbd -t -e 16 -f raw "$@" "${ep[@]}" "$file"
  SERVER_URI=$(uri_for "")
}
# O_DIRECT: its own file (see the header: it would evict disk.img's pages).
start_qemu_nbd_none() { start_qemu_nbd "$1" "$DISK_DIRECT" --cache=none --aio=native; }
start_qemu_nbd_wb() { start_qemu_nbd "$1" "$DISK" --cache=writeback; }

start_null() {
  new_endpoint "$1"
  if [ "$TRANSPORT" = unix ]; then
    launch "$1/server.log" nbdkit -f -U "$EP_SOCK" null size="$SIZE_BYTES"
  else
    launch "$1/server.log" nbdkit -f -i 127.0.0.1 -p "$EP_PORT" null size="$SIZE_BYTES"
  fi
  SERVER_URI=$(uri_for "")
}

# Waits (at most 15 s) until the server answers an NBD handshake.
wait_ready() {
  local i
  for i in $(seq 150); do
    kill -0 "$SERVER_PID" 2>/dev/null || return 1
    if timeout 5 nbdinfo --size "$SERVER_URI" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  return 1
}

# ----------------------------------------------------------------- runs ----
RESULTS=$WORK/results
mkdir -p "$RESULTS"
TSV=$RESULTS/runs.tsv
printf 'round\trow\tserver\tjson\tload_before\tload_after\tstatus\tcached_pct\tcached_b_pct\n' >"$TSV"
declare -A SKIPPED=()
MACHINE=$WORK/machine.txt

{
  echo "nproc=$(nproc)"
  echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "memory_kib=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
  echo "memory=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "kernel=$(uname -srm)"
  echo "workdir_fs=$(fs_type "$WORK") on $(df --output=source "$WORK" | tail -1)"
  echo "fio=$(fio --version)"
  echo "nbdkit=$(nbdkit --version | head -1)"
  echo "qemu_nbd=$(qemu-nbd --version | head -1)"
  echo "libnbd=$(nbdinfo --version 2>/dev/null | sed -n 2p)"
  echo "blockrelay=$("$BR_BIN" --version 2>&1 | head -1)"
  echo "commit=$BUILD_INFO"
  echo "transport=$TRANSPORT"
  echo "size=$SIZE ($SIZE_BYTES bytes)"
  echo "io_threads=${IO_THREADS:-daemon default}"
  echo "poll_us=${POLL_US:-daemon default}"
  [ -z "$POLL_US_B" ] || echo "poll_us_b=$POLL_US_B"
  echo "rounds=$ROUNDS"
  echo "runtime=$RUNTIME"
  echo "ramp=$RAMP"
  echo "cmdline=$CMDLINE"
  echo "started=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$MACHINE"

loadavg1() { cut -d' ' -f1 /proc/loadavg; }
# Stops the current run's other processes (site b), after the primary.
stop_aux() {
  local p
  for p in "${AUX_PIDS[@]+"${AUX_PIDS[@]}"}"; do stop_pid "$p"; done
  AUX_PIDS=()
}
nservers=${#SERVER_LIST[@]}
total=$((ROUNDS * ${#ROW_LIST[@]} * nservers)); n=0
log "$ROUNDS round(s) x ${#ROW_LIST[@]} row(s) x $nservers server(s), ${RAMP}+${RUNTIME} s per run, transport $TRANSPORT"
for ((round = 1; round <= ROUNDS; round++)); do
  for row in "${ROW_LIST[@]}"; do
    row_args=$(row_field "$row" 1)
    for ((i = 0; i < nservers; i++)); do
      server=${SERVER_LIST[$(((i + round - 1) % nservers))]}
      n=$((n + 1))
      [ -n "${SKIPPED[$server]:-}" ] && continue
      run_dir=$WORK/run
      rm -rf "$run_dir"; mkdir -p "$run_dir"
      timeout 600 sync || log "warning: sync took over 600 s"
      fn=$(server_field "$server" 1)
      SERVER_PID=; SERVER_URI=; BR_CONFIG=; AUX_PIDS=()
      set +e; "$fn" "$run_dir"; rc=$?; set -e
      if [ "$rc" = 2 ]; then SKIPPED[$server]=1; continue; fi
      if [ "$rc" != 0 ] || ! wait_ready; then
        log "warning: $server did not start (round $round, $row); its log:"
        tail -20 "$run_dir/server.log" >&2 2>/dev/null || true
        [ -n "$SERVER_PID" ] && stop_pid "$SERVER_PID"
        stop_aux
        printf '%s\t%s\t%s\t-\t-\t-\tstart-failed\t-\t-\n' "$round" "$row" "$server" >>"$TSV"
        continue
      fi
      json=$RESULTS/r$round-$row-$server.json
      cached=$(cached_pct)
      cached_b=-
      [ ${#AUX_PIDS[@]} -gt 0 ] && cached_b=$(cached_pct "$DISK_B")
      lb=$(loadavg1)
      log "[$n/$total] round $round $row $server"
      # shellcheck disable=SC2086  # row_args is a list of fio options
      timeout $((RUNTIME + RAMP + 120)) fio --name="$row" --ioengine=nbd --uri="$SERVER_URI" \
        $row_args --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --lat_percentiles=1 --output-format=json >"$json" 2>"$json.err" &
      fio_pid=$!; STARTED_PIDS+=("$fio_pid")
      set +e; wait "$fio_pid"; frc=$?; set -e
      forget_pid "$fio_pid"
      la=$(loadavg1)
      save_status "$json.status.json"
      time_catch_up "$json.catchup"
      stop_pid "$SERVER_PID"
      stop_aux
      status=ok
      if [ "$frc" != 0 ]; then
        status=fio-failed-$frc
        log "warning: fio failed ($frc) on $server $row:"; tail -5 "$json.err" >&2 || true
      fi
      cp "$run_dir/server.log" "$RESULTS/r$round-$row-$server.server.log" 2>/dev/null || true
      cp "$run_dir/b/server.log" "$RESULTS/r$round-$row-$server.site-b.log" 2>/dev/null || true
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$row" "$server" "$json" "$lb" "$la" "$status" "$cached" "$cached_b" >>"$TSV"
    done
  done
done
# Wire-efficiency rows (issue 4): blockrelay-async, fio overwriting the same
# 1 MiB; the primary's status before fio and after `blockrelay wait` (so the
# last group is sent and counted) gives bytes_written and wire_bytes_sent.
WIRE_TSV=$RESULTS/wire.tsv
printf 'round\twire_row\tjson\tstatus_before\tstatus_after\tload_before\tload_after\tstatus\n' >"$WIRE_TSV"
if [ ${#WIRE_LIST[@]} -gt 0 ]; then
  wtotal=$((ROUNDS * ${#WIRE_LIST[@]})); wn=0
  log "wire rows: $ROUNDS round(s) x ${#WIRE_LIST[@]} on blockrelay-async"
  for ((round = 1; round <= ROUNDS; round++)); do
    for wrow in "${WIRE_LIST[@]}"; do
      wn=$((wn + 1))
      run_dir=$WORK/run
      rm -rf "$run_dir"; mkdir -p "$run_dir"
      timeout 600 sync || log "warning: sync took over 600 s"
      SERVER_PID=; SERVER_URI=; BR_CONFIG=; AUX_PIDS=()
      set +e; start_blockrelay_link async "$run_dir" "$(wire_field "$wrow" 2)"; rc=$?; set -e
      if [ "$rc" != 0 ]; then
        log "warning: blockrelay-async did not start (round $round, wire row $wrow); its log:"
        tail -20 "$run_dir/server.log" >&2 2>/dev/null || true
        [ -n "$SERVER_PID" ] && stop_pid "$SERVER_PID"
        stop_aux
        printf '%s\t%s\t-\t-\t-\t-\t-\tstart-failed\n' "$round" "$wrow" >>"$WIRE_TSV"
        continue
      fi
      json=$RESULTS/wire-r$round-$wrow.json
      save_status "$json.before.json"
      lb=$(loadavg1)
      log "[wire $wn/$wtotal] round $round $wrow"
      # shellcheck disable=SC2086  # a list of fio options
      timeout $((RUNTIME + RAMP + 120)) fio --name="$wrow" --ioengine=nbd --uri="$SERVER_URI" \
        $(wire_field "$wrow" 1) --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" \
        --output-format=json >"$json" 2>"$json.err" &
      fio_pid=$!; STARTED_PIDS+=("$fio_pid")
      set +e; wait "$fio_pid"; frc=$?; set -e
      forget_pid "$fio_pid"
      la=$(loadavg1)
      status=ok
      if [ "$frc" != 0 ]; then
        status=fio-failed-$frc
        log "warning: fio failed ($frc) on wire row $wrow:"; tail -5 "$json.err" >&2 || true
      elif ! timeout 90 "$BR_BIN" wait bench --config "$BR_CONFIG" --timeout 60 >"$json.wait.log" 2>&1; then
        status=not-caught-up
        log "warning: the link did not catch up within 60 s after wire row $wrow"
      fi
      save_status "$json.after.json"
      stop_pid "$SERVER_PID"
      stop_aux
      cp "$run_dir/server.log" "$json.server.log" 2>/dev/null || true
      cp "$run_dir/b/server.log" "$json.site-b.log" 2>/dev/null || true
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$wrow" "$json" "$json.before.json" \
        "$json.after.json" "$lb" "$la" "$status" >>"$WIRE_TSV"
    done
  done
fi
# Resync rows (issue 5): see the header. One TSV line per row and round.
RESYNC_TSV=$RESULTS/resync.tsv
printf 'round\trow\tstatus\tdirty_bytes\twritten_bytes\tresync_bytes\twire_bytes\tseconds\tbaseline_seconds\tidentical\tload_before\tload_after\n' >"$RESYNC_TSV"
if [ "$RESYNC" != 0 ]; then
  RA=$WORK/resync-a.img RB=$WORK/resync-b.img
  IA=$WORK/init-a.img IB=$WORK/init-b.img HALF=$WORK/init-half.img
  HALF_BYTES=$((SIZE_BYTES / 2))
  # 1% of the volume in 4 KiB writes (10,485 for 4 GiB).
  OUTAGE_IOS=$((SIZE_BYTES / 100 / 4096))
  fill_file() {  # fill_file FILE BYTES: data in every block, page cache in 4 KiB folios
    timeout 1800 fio --name=fill --filename="$1" --rw=write --bs=4k --ioengine=psync \
      --size="$2" --end_fsync=1 --output-format=terse >/dev/null || die "filling $1 failed"
  }
  log "resync rows: resync-a.img ($SIZE, filled) copied to resync-b.img; init-a.img (first half data, second half a hole)"
  fallocate -l "$SIZE_BYTES" "$RA"
  fill_file "$RA" "$SIZE_BYTES"
  cp "$RA" "$RB"
  truncate -s "$SIZE_BYTES" "$IA"
  fill_file "$IA" "$HALF_BYTES"
  dd if="$IA" of="$HALF" bs=1M count=$((HALF_BYTES >> 20)) status=none
  sync
  now() { date +%s.%N; }
  secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
  jlink() { jq -r "($2) // 0" "$1" 2>/dev/null || echo 0; }  # jlink STATUS-FILE FILTER
  LINK_J='.groups[0].downstream[0]'
  # copy_baseline SRC DST: sets BASE_SECS to the seconds nbdcopy --flush
  # takes from SRC into DST served by nbdkit on loopback TCP ("" on failure).
  copy_baseline() {
    local src=$1 dst=$2 port i t0 t1 ok=0
    BASE_SECS=
    port=$(free_port)
    launch "$WORK/run/nbdkit-baseline.log" nbdkit -f -i 127.0.0.1 -p "$port" file file="$dst"
    local npid=$SERVER_PID
    for i in $(seq 100); do
      timeout 5 nbdinfo --size "nbd://127.0.0.1:$port/" >/dev/null 2>&1 && { ok=1; break; }
      sleep 0.1
    done
    if [ "$ok" = 1 ]; then
      timeout 600 sync
      t0=$(now)
      if timeout 1800 nbdcopy --flush "$src" "nbd://127.0.0.1:$port/" 2>"$WORK/run/nbdcopy.err"; then
        t1=$(now); BASE_SECS=$(secs "$t0" "$t1")
      else
        log "warning: nbdcopy failed: $(head -3 "$WORK/run/nbdcopy.err")"
      fi
    else
      log "warning: nbdkit for the baseline did not start"
    fi
    stop_pid "$npid"
  }
  resync_line() {  # resync_line ROUND ROW STATUS DIRTY WRITTEN RESYNC WIRE SECS BASE IDENT LB LA
    local IFS=$'\t'; echo "$*" >>"$RESYNC_TSV"
  }
  for ((round = 1; round <= ROUNDS; round++)); do
    # ---- outage-1pct
    run_dir=$WORK/run
    rm -rf "$run_dir"; mkdir -p "$run_dir"
    timeout 600 sync || true
    SERVER_PID=; SERVER_URI=; BR_CONFIG=; AUX_PIDS=()
    lb=$(loadavg1)
    log "[resync round $round] outage-1pct: start, pause, $OUTAGE_IOS random 4k writes, resume"
    set +e; DISK=$RA DISK_B=$RB start_blockrelay_link async "$run_dir"; rc=$?; set -e
    st=ok
    if [ "$rc" != 0 ]; then
      st=start-failed
    else
      "$BR_BIN" pause bench --link b --config "$BR_CONFIG" >"$run_dir/pause.log" 2>&1 || st=pause-failed
      timeout 300 fio --name=outage --ioengine=nbd --uri="$SERVER_URI" --rw=randwrite --bs=4k \
        --iodepth=32 --size="$SIZE_BYTES" --number_ios="$OUTAGE_IOS" --randrepeat=0 \
        --output-format=json >"$RESULTS/resync-r$round-fio.json" 2>"$run_dir/fio.err" || st=fio-failed
      save_status "$RESULTS/resync-r$round-outage.before.json"
      t0=$(now)
      "$BR_BIN" resume bench --link b --config "$BR_CONFIG" >"$run_dir/resume.log" 2>&1 || st=resume-failed
      timeout 1900 "$BR_BIN" wait bench --link b --config "$BR_CONFIG" --timeout 1800 \
        >"$run_dir/wait.log" 2>&1 || st=not-caught-up
      t1=$(now)
      save_status "$RESULTS/resync-r$round-outage.after.json"
    fi
    la=$(loadavg1)
    [ -n "$SERVER_PID" ] && stop_pid "$SERVER_PID"
    stop_aux
    cp "$run_dir/server.log" "$RESULTS/resync-r$round-outage.server.log" 2>/dev/null || true
    cp "$run_dir/b/server.log" "$RESULTS/resync-r$round-outage.site-b.log" 2>/dev/null || true
    if [ "$st" = ok ]; then
      b=$RESULTS/resync-r$round-outage.before.json a=$RESULTS/resync-r$round-outage.after.json
      dirty=$(jlink "$b" '[.groups[0].volumes[0].links[] | select(.site == "b") | .dirty_bytes] | first')
      written=$(( $(jlink "$a" '.groups[0].volumes[0].bytes_written') ))
      resynced=$(( $(jlink "$a" "$LINK_J.resync_bytes_sent") - $(jlink "$b" "$LINK_J.resync_bytes_sent") ))
      wire=$(( $(jlink "$a" "$LINK_J.wire_bytes_sent") - $(jlink "$b" "$LINK_J.wire_bytes_sent") ))
      ident=no; cmp -s "$RA" "$RB" && ident=yes
      # The same number of bytes, moved with nbdcopy over loopback.
      dd if="$RA" of="$run_dir/base-src.img" bs=64K count=$((dirty / 65536)) status=none
      cp "$run_dir/base-src.img" "$run_dir/base-dst.img"  # real blocks, like resync-b.img
      copy_baseline "$run_dir/base-src.img" "$run_dir/base-dst.img"
      resync_line "$round" outage-1pct ok "$dirty" "$written" "$resynced" "$wire" \
        "$(secs "$t0" "$t1")" "${BASE_SECS:--}" "$ident" "$lb" "$la"
      # A failed round would leave the files different for the next one.
      [ "$ident" = yes ] || cp "$RA" "$RB"
    else
      log "warning: outage-1pct round $round: $st"; tail -5 "$run_dir/server.log" >&2 2>/dev/null || true
      resync_line "$round" outage-1pct "$st" - - - - - - - "$lb" "$la"
      cp "$RA" "$RB"
    fi

    # ---- initial-half-zero
    rm -rf "$run_dir"; mkdir -p "$run_dir"
    rm -f "$IB"
    timeout 600 sync || true
    SERVER_PID=; SERVER_URI=; BR_CONFIG=; AUX_PIDS=()
    lb=$(loadavg1)
    log "[resync round $round] initial-half-zero: full initial sync to a fresh downstream"
    set +e
    LINK_INITIAL_SYNC=full LINK_NO_WAIT=1 DISK=$IA DISK_B=$IB start_blockrelay_link async "$run_dir"
    rc=$?
    set -e
    st=ok
    if [ "$rc" != 0 ]; then
      st=start-failed
    else
      timeout 1900 "$BR_BIN" wait bench --link b --config "$BR_CONFIG" --timeout 1800 \
        >"$run_dir/wait.log" 2>&1 || st=not-caught-up
      t1=$(now)
      save_status "$RESULTS/resync-r$round-initial.after.json"
    fi
    la=$(loadavg1)
    [ -n "$SERVER_PID" ] && stop_pid "$SERVER_PID"
    stop_aux
    cp "$run_dir/server.log" "$RESULTS/resync-r$round-initial.server.log" 2>/dev/null || true
    cp "$run_dir/b/server.log" "$RESULTS/resync-r$round-initial.site-b.log" 2>/dev/null || true
    if [ "$st" = ok ]; then
      a=$RESULTS/resync-r$round-initial.after.json
      resynced=$(jlink "$a" "$LINK_J.resync_bytes_sent")
      wire=$(jlink "$a" "$LINK_J.wire_bytes_sent")
      ident=no; cmp -s "$IA" "$IB" && ident=yes
      rm -f "$run_dir/half-dst.img"; truncate -s "$HALF_BYTES" "$run_dir/half-dst.img"
      copy_baseline "$HALF" "$run_dir/half-dst.img"
      resync_line "$round" initial-half-zero ok "$SIZE_BYTES" "$HALF_BYTES" "$resynced" "$wire" \
        "$(secs "$LINK_STARTED_AT" "$t1")" "${BASE_SECS:--}" "$ident" "$lb" "$la"
    else
      log "warning: initial-half-zero round $round: $st"; tail -5 "$run_dir/server.log" >&2 2>/dev/null || true
      resync_line "$round" initial-half-zero "$st" - - - - - - - "$lb" "$la"
    fi
    rm -f "$IB"
  done
fi
rm -rf "$WORK/run"
echo "finished=$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$MACHINE"
echo "skipped=$(printf '%s ' "${!SKIPPED[@]}")" >>"$MACHINE"
echo "servers=$SERVERS" >>"$MACHINE"
echo "rows=$ROWS" >>"$MACHINE"
echo "wire=${WIRE_LIST[*]+${WIRE_LIST[*]}}" >>"$MACHINE"
echo "resync_ios=${OUTAGE_IOS:-}" >>"$MACHINE"

fi  # not --report-from

# --------------------------------------------------------------- report ----
REPORT=$WORK/report.md
REGENERATED=
[ -n "$REPORT_FROM" ] && REGENERATED="$(date -u +%Y-%m-%dT%H:%M:%SZ) with \`$CMDLINE\`"
: >"$REPORT"
# The fio rows' section only when some fio or wire run was made.
if [ "$(wc -l <"$TSV")" -gt 1 ] || [ "$(wc -l <"$WIRE_TSV" 2>/dev/null || echo 0)" -gt 1 ]; then
python3 - "$TSV" "$MACHINE" "$REPORT" "$WIRE_TSV" "$REGENERATED" <<'PY'
import json, re, statistics, sys

tsv, machine_path, out_path, wire_tsv, regenerated = sys.argv[1:6]
machine = {}
for line in open(machine_path):
    k, _, v = line.rstrip("\n").partition("=")
    machine[k] = v
rows_order = machine["rows"].split(",")
servers_order = machine["servers"].split(",")
skipped = machine.get("skipped", "").split()
PEERS = ["nbdkit-file", "qemu-nbd-none", "qemu-nbd-wb"]
READ_ROWS = {"randread-4k-qd32", "seqread-1m-qd8"}
LINK_SERVERS = {"blockrelay-async", "blockrelay-sync"}

def goal(server, row):
    """(metric, op, bound, text) of the variant's goal on this row, or None.
    metric: "iops" (IOPS ratio) or "lat" (mean latency ratio)."""
    if server == "blockrelay-logging":
        return ("iops", ">=", 0.95, ">= 0.95x IOPS (issue 3)")
    if server == "blockrelay-async":
        return ("iops", ">=", 0.85, ">= 0.85x IOPS")
    if server == "blockrelay-sync":
        if row == "randwrite-4k-qd1":
            return ("lat", "<=", 2.0, "mean latency <= 2x")
        if "-qd32" in row:
            return ("iops", ">=", 0.7, ">= 0.7x IOPS")
    return None

def link_of(status_path):
    """The first downstream link in a saved `status --json`, or {}."""
    try:
        st = json.load(open(status_path))
        return st["groups"][0]["downstream"][0]
    except Exception:  # noqa: BLE001
        return {}

def load_fio(path):
    text = open(path, errors="replace").read()
    i = text.find("{")  # fio's nbd engine prints a line before the JSON
    if i < 0:
        raise ValueError("no JSON")
    return json.loads(text[i:])

samples = {}   # (row, server) -> list of dicts
loads, failures, cached_pcts, cached_b_pcts, link_problems = [], [], [], [], []
with open(tsv) as f:
    next(f)
    for line in f:
        rnd, row, server, path, lb, la, status, cached, cached_b = line.rstrip("\n").split("\t")
        if cached.isdigit():
            cached_pcts.append(int(cached))
        if cached_b.isdigit():
            cached_b_pcts.append(int(cached_b))
        if status != "ok":
            why = ""
            try:
                errs = [l.strip() for l in open(path + ".err") if l.strip().startswith("fio:")
                        and "connected to NBD server" not in l]
                why = f" (`{errs[0]}`)" if errs else ""
            except OSError:
                pass
            failures.append(f"round {rnd} {row} {server}: {status}{why}")
            continue
        loads += [float(lb), float(la)]
        try:
            job = load_fio(path)["jobs"][0]
        except Exception as e:  # noqa: BLE001
            failures.append(f"round {rnd} {row} {server}: unreadable fio JSON ({e})")
            continue
        d = job["read" if row in READ_ROWS else "write"]
        lat = d["lat_ns"]
        s = {
            "iops": d["iops"],
            "mbs": d["bw_bytes"] / 1e6,
            "lat_us": lat["mean"] / 1e3,
            "p99_us": lat.get("percentile", {}).get("99.000000", 0) / 1e3,
            "wpf": None,
        }
        sync_ios = job.get("sync", {}).get("total_ios", 0)
        if sync_ios:
            s["wpf"] = d["total_ios"] / sync_ios
        if job.get("error"):
            failures.append(f"round {rnd} {row} {server}: fio error {job['error']}")
        if server in LINK_SERVERS:
            # The link must have stayed up for the whole run: one connect, still
            # replicating when fio ended. Otherwise the row measured logging mode.
            link = link_of(path + ".status.json")
            s["link_ok"] = link.get("state") == "replicating" and link.get("connects") == 1
            s["connects"] = link.get("connects")
            s["link_state"] = link.get("state", "unknown")
            s["last_error"] = link.get("last_error", "")
            s["congestion_holds"] = link.get("congestion_holds", 0)
            try:
                s["catchup"] = open(path + ".catchup").read().strip()
            except OSError:
                s["catchup"] = None
            if not s["link_ok"]:
                link_problems.append((row, server, s))
        s["round"] = rnd
        samples.setdefault((row, server), []).append(s)

def med(key, xs):
    vals = [x[key] for x in xs if x[key] is not None]
    return statistics.median(vals) if vals else None

def fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"

out = []
w = out.append
w("## Latest run")
w("")
w(f"Started {machine['started']}, finished {machine.get('finished', '?')} (UTC). "
  f"Command: `{machine['cmdline']}`"
  + (f". Report regenerated from that run's kept results at {regenerated}." if regenerated else ""))
w("")
w("| machine | |")
w("| --- | --- |")
for key, label in [("nproc", "cores (nproc)"), ("cpu", "CPU"), ("memory", "memory"),
                   ("kernel", "kernel"), ("workdir_fs", "work dir file system"),
                   ("fio", "fio"), ("libnbd", "libnbd"), ("nbdkit", "nbdkit"),
                   ("qemu_nbd", "qemu-nbd"), ("blockrelay", "blockrelay"),
                   ("commit", "git commit")]:
    w(f"| {label} | {machine.get(key, '?')} |")
if loads:
    w(f"| load average (1 min) during the runs | min {min(loads):.2f}, "
      f"median {statistics.median(loads):.2f}, max {max(loads):.2f} |")
w("")
w(f"Setup: transport {machine['transport']}; backing files of {machine['size']} "
  "(fallocate, then filled completely once with data, so no holes or unwritten extents): "
  "one shared by the page-cache servers, filled with buffered 4 KiB writes so it is cached in 4 KiB folios"
  + (f" (before each run {min(cached_pcts)}-{max(cached_pcts)} % of it was in the page cache)" if cached_pcts else "")
  + ", and one for qemu-nbd-none, filled with O_DIRECT writes (see the header of scripts/bench.sh for why); "
  "each server started fresh for every run and stopped by PID after it; "
  f"{machine['rounds']} round(s), {machine['ramp']} s warm-up + {machine['runtime']} s measured per run; "
  "servers interleaved within each row, order rotated per round; `sync` before every run; "
  f"blockrelay nbd.io_threads: {machine['io_threads']}, nbd.poll_us: {machine.get('poll_us', 'daemon default')}"
  + (f" (site b: {machine['poll_us_b']})" if 'poll_us_b' in machine else "") + ". "
  "Numbers are medians over the rounds (each column separately). "
  "Latency is fio's total latency (submission + completion) of the row's reads or writes. "
  "spread = (max - min) / median of IOPS over the rounds. "
  "x best peer = IOPS / the best IOPS of "
  + (", ".join(p for p in PEERS if p in servers_order) or "the peers (none ran)")
  + " on that row; "
  "null (nbdkit null plugin, stores nothing) is the floor, not a peer.")
w("")
w("| row | server | IOPS | MB/s | mean lat (us) | p99 lat (us) | spread | writes/flush | x best peer |")
w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
summary, variant_lines = [], []
for row in rows_order:
    peer_iops = [med("iops", samples[(row, p)]) for p in PEERS if (row, p) in samples]
    best = max(peer_iops) if peer_iops else None
    best_name = None
    for p in PEERS:
        if (row, p) in samples and med("iops", samples[(row, p)]) == best:
            best_name = p
    base = med("iops", samples[(row, "blockrelay")]) if (row, "blockrelay") in samples else None
    for server in servers_order:
        xs = samples.get((row, server))
        if not xs:
            continue
        iops = med("iops", xs)
        spread = (max(x["iops"] for x in xs) - min(x["iops"] for x in xs)) / iops * 100 if iops else 0
        ratio = f"{iops / best:.2f}x" if best else "-"
        label = server + (" (floor)" if server == "null" else "")
        if server == "blockrelay":
            label = "**blockrelay**"
            ratio = f"**{ratio}**"
            if best:
                summary.append((row, iops / best, best_name))
        if server.startswith("blockrelay-") and base:
            base_lat = med("lat_us", samples[(row, "blockrelay")])
            lat = med("lat_us", xs)
            variant_lines.append((row, server, iops / base, lat / base_lat if base_lat else None))
        w(f"| {row} | {label} | {fmt(iops)} | {fmt(med('mbs', xs), 1)} | "
          f"{fmt(med('lat_us', xs), 1)} | {fmt(med('p99_us', xs))} | {spread:.0f}% | "
          f"{fmt(med('wpf', xs), 2)} | {ratio} |")
w("")
if summary:
    below = [f"{r} ({x:.2f}x of {b})" for r, x, b in summary if x < 1.0]
    w(f"blockrelay at or above 1.0x the best peer on {len(summary) - len(below)} of {len(summary)} rows."
      + (f" Below on: {'; '.join(below)}." if below else ""))
    w("")
goal_results = []  # (server, row, text, value, met)
if variant_lines:
    ran = {v[1] for v in variant_lines}
    w("Variants against blockrelay without a link, same run: x blockrelay = median IOPS / blockrelay's "
      "median IOPS; lat x blockrelay = median mean latency / blockrelay's. "
      + ("blockrelay-logging: one downstream link to a closed port, its scoreboard slot starting clean "
         "(`initial_sync: none`), so writes dirty regions and pay for the scoreboard (issue 3). "
         if "blockrelay-logging" in ran else "")
      + ("blockrelay-async / blockrelay-sync: one async / sync link to a second blockrelay process "
         "(site b, role secondary) on loopback TCP, sharing the 2 cores with the primary and fio; "
         "`initial_sync: none`, link replicating and caught up before fio starts (issue 4). "
         "link kept = runs whose link stayed up (see the notes)."
         if ran & LINK_SERVERS else ""))
    w("")
    w("Per round = the variant's IOPS / blockrelay's IOPS in the same round (the two ran minutes "
      "apart at most), median and range over the rounds: the spread of these paired ratios shows "
      "how much of a difference this machine's noise alone makes.")
    w("")
    w("| row | variant | x blockrelay | per round | lat x blockrelay | goal | met | link kept |")
    w("| --- | --- | ---: | ---: | ---: | --- | --- | --- |")
    for row, server, x, lx in variant_lines:
        base_by_round = {v["round"]: v["iops"] for v in samples[(row, "blockrelay")] if v["iops"]}
        paired = sorted(v["iops"] / base_by_round[v["round"]] for v in samples[(row, server)]
                        if v["iops"] is not None and v["round"] in base_by_round)
        per_round = (f"{statistics.median(paired):.2f}x ({paired[0]:.2f}-{paired[-1]:.2f})"
                     if paired else "-")
        kept = "-"
        if server in LINK_SERVERS:
            xs = samples[(row, server)]
            ok = sum(1 for v in xs if v.get("link_ok"))
            kept = f"{ok}/{len(xs)}"
            if ok < len(xs):
                conns = [v["connects"] for v in xs if isinstance(v.get("connects"), int)]
                span = f"{min(conns)}" if conns and min(conns) == max(conns) else (
                    f"{min(conns)}-{max(conns)}" if conns else "")
                kept = f"**{kept}**" + (f" ({span} connects)" if span else "")
        g = goal(server, row)
        gtext, met = "-", "-"
        if g:
            metric, op, bound, gtext = g
            v = x if metric == "iops" else lx
            if v is not None:
                ok = v >= bound if op == ">=" else v <= bound
                met = "yes" if ok else "**no**"
                goal_results.append((server, row, gtext, v, ok))
        lxs = f"{lx:.2f}x" if lx is not None else "-"
        w(f"| {row} | {server} | {x:.2f}x | {per_round} | {lxs} | {gtext} | {met} | {kept} |")
    w("")
    for server in sorted({r[0] for r in goal_results}):
        mine = [r for r in goal_results if r[0] == server]
        missed = [f"{r[1]} ({r[3]:.2f}x)" for r in mine if not r[4]]
        w(f"{server}: goal met on {len(mine) - len(missed)} of {len(mine)} rows"
          + (f"; missed on {', '.join(missed)}." if missed else "."))
        w("")

# ---- wire efficiency (issue 4): overwrite the same 1 MiB on blockrelay-async.
wire = {}  # wire row -> list of dicts
wire_failures = []
try:
    wf = open(wire_tsv)
    next(wf)
except (OSError, StopIteration):
    wf = []
for line in wf:
    rnd, wrow, path, before, after, lb, la, status = line.rstrip("\n").split("\t")
    if status != "ok":
        wire_failures.append(f"round {rnd} {wrow}: {status}")
        continue
    loads += [float(lb), float(la)]
    try:
        b = json.load(open(before))["groups"][0]
        a = json.load(open(after))["groups"][0]
        job = load_fio(path)["jobs"][0]
    except Exception as e:  # noqa: BLE001
        wire_failures.append(f"round {rnd} {wrow}: unreadable JSON ({e})")
        continue
    vb, va = b["volumes"][0], a["volumes"][0]
    lb_, la_ = b["downstream"][0], a["downstream"][0]
    x = {
        "iops": job["write"]["iops"],
        "written": va["bytes_written"] - vb["bytes_written"],
        "writes": va["writes"] - vb["writes"],
        "sent": la_["bytes_sent"] - lb_["bytes_sent"],
        "wire": la_["wire_bytes_sent"] - lb_["wire_bytes_sent"],
        "groups": la_["groups_sent"] - lb_["groups_sent"],
        "interval": "",
    }
    if la_.get("state") != "replicating" or la_.get("connects") != 1:
        link_problems.append((wrow, "blockrelay-async", {
            "connects": la_.get("connects"), "link_state": la_.get("state", "unknown"),
            "last_error": la_.get("last_error", "")}))
    if x["written"] <= 0:
        wire_failures.append(f"round {rnd} {wrow}: nothing written")
        continue
    x["ratio"] = x["wire"] / x["written"]
    x["sent_ratio"] = x["sent"] / x["written"]
    x["per_group"] = x["writes"] / x["groups"] if x["groups"] else None
    wire.setdefault(wrow, []).append(x)
if wire or wire_failures:
    w("Bytes on the wire vs bytes written (issue 4; goal <= 0.2x): blockrelay-async, fio 4 KiB random "
      "writes over the same 1 MiB (`--size=1M`, 256 blocks, overwritten again and again) for "
      f"{machine['ramp']} s + {machine['runtime']} s; counters from the primary's `status --json` "
      "before fio and after `blockrelay wait` (fresh daemons per run). written = the volume's "
      "bytes_written; data sent = the link's bytes_sent (write data in WRITE_GROUP frames); "
      "wire = wire_bytes_sent (whole frames: headers, operation records, data); "
      "writes/group = the volume's writes / groups_sent. Medians over the rounds.")
    w("")
    w("| wire row | group_interval | IOPS | written (MB) | data sent (MB) | wire (MB) | writes/group | "
      "data sent / written | wire / written | goal | met |")
    w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for wrow in machine.get("wire", "").split():
        xs = wire.get(wrow)
        if not xs:
            continue
        gi = "100 ms (set)" if wrow.endswith("-gi100ms") else "10 ms (default)"
        r = med("ratio", xs)
        ok = r <= 0.2
        goal_results.append(("blockrelay-async (wire)", wrow, "wire <= 0.2x written", r, ok))
        w(f"| {wrow} | {gi} | {fmt(med('iops', xs))} | {fmt(med('written', xs) / 1e6, 1)} | "
          f"{fmt(med('sent', xs) / 1e6, 1)} | {fmt(med('wire', xs) / 1e6, 1)} | "
          f"{fmt(med('per_group', xs), 1)} | {med('sent_ratio', xs):.3f}x | {r:.3f}x | <= 0.2x | "
          f"{'yes' if ok else '**no**'} |")
    w("")
w("Notes:")
w("- randwrite-4k-qd32-fsync32: fio 3.33 keeps issuing flushes at iodepth > 1 until the first one "
  "completes (fixed in fio 3.38), so the real flush rate depends on each server's flush latency: "
  "see writes/flush (write ios / flush ios from fio's JSON). It is not the same workload for every "
  "server; randwrite-4k-qd1-fsync32 is the exact one (32.00 writes per flush).")
size_bytes = int(machine["size"].split("(")[1].split()[0])
fits = size_bytes < int(machine.get("memory_kib", "0")) * 1024 // 2
if "qemu-nbd-none" in servers_order:
    w("- qemu-nbd-none opens the file with O_DIRECT: its reads and writes go to the disk; the others "
      "use the page cache" + (" (the backing file fits in memory, so their reads rarely touch the disk)"
                              if fits else "") + ".")
if skipped:
    w(f"- Not implemented yet, skipped: {', '.join(sorted(skipped))}.")
if failures:
    w("- Failed runs (not in the medians): " + "; ".join(failures) + ".")
if cached_b_pcts:
    w(f"- Site b's backing file (disk-b.img, one file for all blockrelay-async/-sync runs, filled "
      f"like disk.img): {min(cached_b_pcts)}-{max(cached_b_pcts)} % in the page cache before each run.")
if link_problems:
    # Grouped per row and server; a dropped link reconnects by itself and
    # resyncs from the scoreboard, so such a run measured streaming, logging
    # and resync in turn. Such runs are in the medians: it is what a user
    # with these settings gets.
    by = {}
    for row, server, v in link_problems:
        by.setdefault((row, server), []).append(v)
    parts = []
    for (row, server), vs in by.items():
        conns = [v["connects"] for v in vs if isinstance(v.get("connects"), int)]
        span = (f"{min(conns)}" if min(conns) == max(conns) else f"{min(conns)}-{max(conns)}") if conns else ""
        parts.append(f"{row} {server}: {len(vs)} run(s), "
                     + (f"{span} connects, " if span else "")
                     + "state when fio ended: " + ", ".join(v["link_state"] for v in vs))
    errors = {}
    for _, _, v in link_problems:
        if v.get("last_error"):
            errors.setdefault(re.sub(r"[0-9]+", "N", v["last_error"]), v["last_error"])
    holds = sum(v.get("congestion_holds") or 0 for _, _, v in link_problems)
    w("- The link did not stay up in every run (`link kept` above; one connect and `replicating` "
      "when fio ended is kept). A dropped link reconnects by itself and resyncs from the scoreboard; "
      "after a queue overflow it first waits while the writers outrun it (docs/replication.md, "
      f"\"Congestion\"; {holds} such wait(s) in these runs), so such a run measured streaming, "
      "logging and resync in turn, and a link still waiting when fio ended resyncs afterwards "
      "(catch-up times below); it is in the medians (it is what these settings give). "
      + "; ".join(parts) + "."
      + (" Last errors, e.g.: " + "; ".join(f"`{e}`" for e in errors.values()) + "." if errors else ""))
elif any(s in LINK_SERVERS for s in servers_order) or wire:
    w("- Every blockrelay-async/-sync run kept its link: one connect, `replicating` when fio ended.")
catch_parts = []
for (row, server), xs in samples.items():
    vals = [v.get("catchup") for v in xs if server in LINK_SERVERS and v.get("catchup")]
    if not vals:
        continue
    nums = sorted(float(v) for v in vals if v != "timeout")
    timeouts = len(vals) - len(nums)
    part = f"{row} {server}: "
    if nums:
        part += f"{statistics.median(nums):.1f} s ({nums[0]:.1f}-{nums[-1]:.1f})"
    if timeouts:
        part += (", " if nums else "") + f"{timeouts} not within 300 s"
    catch_parts.append(part)
if catch_parts:
    w("- Caught up after fio ended (`blockrelay wait` right after the run, seconds, median and "
      "range): " + "; ".join(catch_parts) + ".")
if wire_failures:
    w("- Failed wire runs (not in the medians): " + "; ".join(wire_failures) + ".")
w("")
open(out_path, "w").write("\n".join(out))
PY
fi
if [ -f "${RESYNC_TSV:-}" ] && [ "$(wc -l <"$RESYNC_TSV")" -gt 1 ]; then
python3 - "$RESYNC_TSV" "$MACHINE" "$REPORT" "$REGENERATED" <<'PY'
import statistics, sys

tsv, machine_path, out_path, regenerated = sys.argv[1:5]
machine = {}
for line in open(machine_path):
    k, _, v = line.rstrip("\n").partition("=")
    machine[k] = v
runs, failures, loads = {}, [], []
with open(tsv) as f:
    next(f)
    for line in f:
        (rnd, row, status, dirty, written, resynced, wire, secs, base, ident,
         lb, la) = line.rstrip("\n").split("\t")
        loads += [float(lb), float(la)]
        if status != "ok":
            failures.append(f"round {rnd} {row}: {status}")
            continue
        x = {"dirty": int(dirty), "written": int(written), "resynced": int(resynced),
             "wire": int(wire), "secs": float(secs), "ident": ident,
             "base": float(base) if base not in ("", "-") else None}
        if ident != "yes":
            failures.append(f"round {rnd} {row}: the two sites' files differ after the run")
        runs.setdefault(row, []).append(x)

def med(xs, key):
    vals = [x[key] for x in xs if x[key] is not None]
    return statistics.median(vals) if vals else None

out = []
w = out.append
w("## Latest resync run")
w("")
w(f"Started {machine['started']}, finished {machine.get('finished', '?')} (UTC). "
  f"Command: `{machine['cmdline']}`"
  + (f". Report regenerated from that run's kept results at {regenerated}." if regenerated else ""))
w("")
w(f"Machine: {machine.get('nproc', '?')} cores, {machine.get('memory', '?')}, {machine.get('kernel', '?')}, "
  f"work dir on {machine.get('workdir_fs', '?')}; blockrelay {machine.get('commit', '?')}; "
  f"nbdcopy from libnbd {machine.get('libnbd', '?')}, {machine.get('nbdkit', '?')}. "
  f"Volume {machine['size']}; {machine['rounds']} round(s), medians"
  + (f"; load average (1 min) min {min(loads):.2f}, median {statistics.median(loads):.2f}, "
     f"max {max(loads):.2f}" if loads else "") + ".")
w("")
w("Two blockrelay processes on loopback TCP (site b secondary, async link), fresh data_dirs per run "
  "(see the header of scripts/bench.sh). **outage-1pct**: identical files, link paused, "
  f"{machine.get('resync_ios', '?')} random 4 KiB writes (1% of the volume, no block twice) on the "
  "primary, then `resume` and `blockrelay wait` timed; dirty = the scoreboard's dirty_bytes for b "
  "before the resume (64 KiB regions); resynced = the link's resync_bytes_sent. "
  "**initial-half-zero**: first half data, second half a hole, fresh sparse downstream, "
  "`initial_sync: full`, timed from the primary's start to `blockrelay wait`. "
  "Baseline: `nbdcopy --flush` of the same number of data bytes (dirty bytes; the non-zero half) "
  "from a file into nbdkit's file plugin on 127.0.0.1 TCP — the same work (file read, loopback "
  "TCP, file write, flush) without replication. identical = `cmp` of the two sites' files after "
  "both daemons stopped.")
w("")
w("| row | data (MB) | resynced (MB) | wire (MB) | resynced / data | time (s) | baseline (s) | time / baseline | goal | met | identical |")
w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |")
for row in ["outage-1pct", "initial-half-zero"]:
    xs = runs.get(row)
    if not xs:
        continue
    data_key = "dirty" if row == "outage-1pct" else "written"
    data = med(xs, data_key)
    resynced, wire, secs, base = med(xs, "resynced"), med(xs, "wire"), med(xs, "secs"), med(xs, "base")
    bytes_ratio = resynced / data if data else None
    time_ratio = secs / base if base else None
    goals = []
    if row == "outage-1pct":
        if bytes_ratio is not None:
            goals.append(("bytes <= 1.1x dirty", bytes_ratio <= 1.1))
        if time_ratio is not None:
            goals.append(("time <= 2x baseline", time_ratio <= 2.0))
    elif time_ratio is not None:
        goals.append(("time <= 1x nbdcopy of the data half", time_ratio <= 1.0))
    ident = ", ".join(sorted({x["ident"] for x in xs}))
    w(f"| {row} | {data / 1e6:,.1f} | {resynced / 1e6:,.1f} | {wire / 1e6:,.1f} | "
      f"{bytes_ratio:.3f}x | {secs:.2f} | {base if base is None else f'{base:.2f}'} | "
      f"{'-' if time_ratio is None else f'{time_ratio:.2f}x'} | "
      f"{'; '.join(g for g, _ in goals) or '-'} | "
      f"{'; '.join('yes' if ok else '**no**' for _, ok in goals) or '-'} | {ident} |")
w("")
if "outage-1pct" in runs:
    xs = runs["outage-1pct"]
    w(f"outage-1pct: the writes themselves were {med(xs, 'written') / 1e6:,.1f} MB; each dirtied its "
      "whole 64 KiB region, so dirty bytes are about 16x the bytes written.")
    w("")
if failures:
    w("Failed or unequal runs (not in the medians unless equal-but-noted): " + "; ".join(failures) + ".")
    w("")
with open(out_path, "a") as f:
    if f.tell() > 0:
        f.write("\n")
    f.write("\n".join(out))
PY
fi

cat "$REPORT"

if [ "$WRITE_DOC" = 1 ]; then
  DOC=docs/benchmarks.md
  mkdir -p docs
  python3 - "$DOC" "$REPORT" <<'PY'
import os, sys
doc, report = sys.argv[1:3]
if os.path.exists(doc):
    lines = open(doc).read().splitlines(keepends=True)
else:
    lines = ["# Benchmarks\n", "\n", "Written by scripts/bench.sh --write-doc.\n", "\n"]
# The report's sections ("## Latest run", "## Latest resync run"): each
# replaces the doc's section of the same heading; a new one goes after the
# last of them (or "## Latest run") already in the doc, else at the end of
# the header.
sections, cur = [], None
for l in open(report).read().splitlines(keepends=True):
    if l.startswith("## "):
        cur = [l.rstrip("\n"), []]
        sections.append(cur)
    if cur:
        cur[1].append(l)
def span(heading):
    start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == heading), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return start, end
def body(text_lines):
    t = "".join(text_lines).rstrip("\n") + "\n"
    return [t, "\n"]
for heading, text_lines in sections:
    s = span(heading)
    if s is not None:
        lines[s[0]:s[1]] = body(text_lines)
        continue
    at = None
    for other in ["## Latest run"] + [h for h, _ in sections]:
        o = span(other)
        if o is not None:
            at = o[1]
    if at is None:
        at = next((i for i, l in enumerate(lines) if l.startswith("## ")), len(lines))
    if at > 0 and lines[at - 1].strip():
        lines.insert(at, "\n")
        at += 1
    lines[at:at] = body(text_lines)
text = "".join(lines).rstrip("\n") + "\n"
open(doc, "w").write(text)
PY
  log "wrote the report's section(s) of $DOC: $(grep '^## ' "$REPORT" | paste -sd, -)"
fi
