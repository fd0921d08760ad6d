# Shared helpers for blockrelay's end-to-end tests (sourced, not run).
#
# Each test is run by ctest as `bash test/e2e/NAME_test.sh /path/to/blockrelay`
# with BLOCKRELAY_SOURCE_DIR set. A test typically does:
#
#   source "$(dirname "$0")/lib.sh"
#   br_init "$@"                      # temp dir + cleanup trap
#   br_write_config                   # site.json with one volume "vol"
#   br_start                          # daemon in the background, waits until it serves
#   check "nbdinfo works" nbdinfo "$BR_URI"
#   br_finish                         # prints "N passed, N failed", exits 0/1
#
# Everything runs on loopback, inside one mktemp -d directory, and every
# client command is bounded by `timeout`. The EXIT trap runs the test's own
# cleanup hooks (newest first), stops only the daemon this test started
# (SIGTERM, then SIGKILL after a bound) and removes the temp dir.

set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
export LC_ALL=C

BR_PASS=0
BR_FAIL=0
BR_SKIP_RC=77
BR_CMD_TIMEOUT=${BR_CMD_TIMEOUT:-180}   # seconds, for any one client command
BR_START_TIMEOUT=${BR_START_TIMEOUT:-20} # seconds until the daemon must serve
BR_STOP_TIMEOUT=${BR_STOP_TIMEOUT:-20}   # seconds after SIGTERM before SIGKILL
BR_PID=
BR_RUN_ARGS=()   # extra arguments of `blockrelay run` for br_start
BR_EXIT=
BR_CLEANUP=()
BR_TEST_NAME=$(basename "${0%.sh}")
BR_E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BR_SOURCE_DIR=${BLOCKRELAY_SOURCE_DIR:-$(cd "$BR_E2E_DIR/../.." && pwd)}
BR_TOOLS_DIR=$BR_SOURCE_DIR/test/tools

log()  { echo "[$BR_TEST_NAME] $*"; }
pass() { BR_PASS=$((BR_PASS + 1)); echo "PASS $*"; }
fail() { BR_FAIL=$((BR_FAIL + 1)); echo "FAIL $*"; }
# Stop the test here: print why and exit 1 (the trap still cleans up).
die()  { echo "FATAL [$BR_TEST_NAME] $*"; BR_FAIL=$((BR_FAIL + 1)); br_dump_daemon_log; exit 1; }
# A precondition is truly missing (not root, no /dev/fuse...): ctest SKIP.
skip() { echo "SKIP [$BR_TEST_NAME] $*"; exit "$BR_SKIP_RC"; }

need_cmd() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || die "required command '$c' is missing (run scripts/install-deps.sh)"
  done
}

# br_init /path/to/blockrelay
br_init() {
  BR_BIN=${1:-}
  [ -n "$BR_BIN" ] || die "usage: $0 /path/to/blockrelay"
  [ -x "$BR_BIN" ] || die "blockrelay binary '$BR_BIN' is not executable"
  BR_BIN=$(cd "$(dirname "$BR_BIN")" && pwd)/$(basename "$BR_BIN")
  need_cmd timeout python3 jq
  BR_TMP=$(mktemp -d -t "br-$BR_TEST_NAME.XXXXXX") || die "mktemp failed"
  BR_LOG=$BR_TMP/daemon.log
  # Work inside the temp dir, so that files clients leave in their working
  # directory (fio's *-verify.state) go away with it.
  cd "$BR_TMP" || die "cd $BR_TMP failed"
  trap br_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  log "temp dir $BR_TMP, binary $BR_BIN"
}

# Register a cleanup command (a string for eval); run newest first at exit.
br_on_exit() { BR_CLEANUP+=("$1"); }

br_cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  for ((i = ${#BR_CLEANUP[@]} - 1; i >= 0; i--)); do
    eval "${BR_CLEANUP[$i]}" || log "cleanup step failed: ${BR_CLEANUP[$i]}"
  done
  if [ -n "$BR_PID" ]; then
    br_stop >/dev/null 2>&1 || true
  fi
  if [ "$rc" -ne 0 ] && [ "$rc" -ne "$BR_SKIP_RC" ]; then
    br_dump_daemon_log
  fi
  # --one-file-system: never descend into something still mounted in here.
  if [ -n "${BR_TMP:-}" ] && [ -d "$BR_TMP" ]; then
    cd / || true
    rm -rf --one-file-system "$BR_TMP" 2>/dev/null || log "could not remove $BR_TMP completely"
  fi
  exit "$rc"
}

br_dump_daemon_log() {
  if [ -n "${BR_LOG:-}" ] && [ -s "$BR_LOG" ] && [ -z "${BR_LOG_DUMPED:-}" ]; then
    BR_LOG_DUMPED=1
    echo "---- last lines of the daemon log ($BR_LOG) ----"
    tail -n 40 "$BR_LOG"
    echo "----"
  fi
}

# A TCP port on 127.0.0.1 that is free right now (the kernel picks it).
br_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# br_write_config [--size SIZE] [--volume NAME] [--secondary NAME SIZE]
# Writes $BR_CONFIG ($BR_TMP/site.json): site "e2e", one primary group "g"
# with one volume (default "vol", 256MiB, sparse file in the temp dir), NBD
# on a Unix socket and on a free TCP port. --secondary adds a second group
# with role "secondary" (exported read-only) holding volume NAME.
# Sets BR_PORT, BR_SOCK, BR_VOL, BR_IMG, BR_URI (Unix) and BR_URI_TCP.
BR_CONFIG_ARGS=()
br_write_config() {
  BR_CONFIG_ARGS=("$@")
  local size=256MiB vol=vol sec_name= sec_size=
  while [ $# -gt 0 ]; do
    case $1 in
      --size) size=$2; shift 2 ;;
      --volume) vol=$2; shift 2 ;;
      --secondary) sec_name=$2; sec_size=$3; shift 3 ;;
      *) die "br_write_config: unknown option $1" ;;
    esac
  done
  BR_PORT=$(br_free_port)
  BR_SOCK=$BR_TMP/nbd.sock
  BR_CTL=$BR_TMP/control.sock
  BR_VOL=$vol
  BR_IMG=$BR_TMP/$vol.img
  BR_CONFIG=$BR_TMP/site.json
  BR_URI="nbd+unix:///$vol?socket=$BR_SOCK"
  BR_URI_TCP="nbd://127.0.0.1:$BR_PORT/$vol"
  local groups
  groups=$(jq -n --arg v "$vol" --arg p "$BR_IMG" --arg s "$size" \
    '[{name: "g", role: "primary", volumes: [{name: $v, path: $p, size: $s}]}]')
  local repl='{}'
  if [ -n "$sec_name" ]; then
    BR_SEC_VOL=$sec_name
    BR_SEC_IMG=$BR_TMP/$sec_name.img
    BR_SEC_URI="nbd+unix:///$sec_name?socket=$BR_SOCK"
    BR_SEC_URI_TCP="nbd://127.0.0.1:$BR_PORT/$sec_name"
    # A secondary group needs an upstream and this site must listen for
    # replication. Nothing listens at the upstream address: the test only
    # looks at the read-only export.
    local rport uport
    rport=$(br_free_port)
    uport=$(br_free_port)
    repl=$(jq -n --arg l "127.0.0.1:$rport" '{replication: {listen: $l}}')
    groups=$(jq --arg v "$sec_name" --arg p "$BR_SEC_IMG" --arg s "$sec_size" \
      --arg up "127.0.0.1:$uport" \
      '. + [{name: "s", role: "secondary", upstream: {site: "upstream", address: $up},
             volumes: [{name: $v, path: $p, size: $s}]}]' <<<"$groups")
  fi
  jq -n --arg dd "$BR_TMP/data" --arg ctl "$BR_CTL" --arg sock "$BR_SOCK" \
    --arg listen "127.0.0.1:$BR_PORT" --argjson groups "$groups" --argjson repl "$repl" \
    '{site: "e2e", data_dir: $dd, control_socket: $ctl,
      nbd: {unix_socket: $sock, listen: $listen}} + $repl + {groups: $groups}' \
    >"$BR_CONFIG" || die "could not write $BR_CONFIG"
}

br_alive() { [ -n "$BR_PID" ] && kill -0 "$BR_PID" 2>/dev/null; }

# Start the daemon in the background and wait (bounded) until
# `blockrelay status` answers and the NBD socket exists. If the port picked
# by br_write_config was taken in the meantime (by anything on the machine),
# write the config again with new ports and retry, a few times.
br_start() {
  local attempt
  for attempt in 1 2 3; do
    _br_start_once && return 0
    if [ "$attempt" -lt 3 ] && tail -n 5 "$BR_LOG" | grep -q "Address already in use"; then
      log "port taken by someone else; new ports, try $((attempt + 1))"
      br_write_config "${BR_CONFIG_ARGS[@]}"
      continue
    fi
    break
  done
  die "daemon did not start (see its log below)"
}
_br_start_once() {
  [ -z "$BR_PID" ] || die "br_start: daemon already running (pid $BR_PID)"
  echo "==== blockrelay run --config $BR_CONFIG ${BR_RUN_ARGS[*]} ($(date +%T)) ====" >>"$BR_LOG"
  "$BR_BIN" run --config "$BR_CONFIG" "${BR_RUN_ARGS[@]}" >>"$BR_LOG" 2>&1 </dev/null &
  BR_PID=$!
  BR_EXIT=
  local deadline=$((SECONDS + BR_START_TIMEOUT))
  while [ $SECONDS -lt $deadline ]; do
    if ! br_alive; then
      wait "$BR_PID"; local rc=$?
      BR_PID=
      log "daemon exited with status $rc before serving"
      return 1
    fi
    if "$BR_BIN" status --config "$BR_CONFIG" --json >"$BR_TMP/status.json" 2>/dev/null &&
       [ -S "$BR_SOCK" ]; then
      log "daemon pid $BR_PID serving (nbd tcp port $BR_PORT)"
      return 0
    fi
    sleep 0.1
  done
  log "daemon pid $BR_PID did not serve within ${BR_START_TIMEOUT}s"
  return 1
}

# Stop the daemon this test started: SIGTERM (or $1), wait up to
# BR_STOP_TIMEOUT seconds, then SIGKILL. Sets BR_EXIT to its exit status and
# BR_STOP_SECONDS to how long it took. Returns 0 if it exited by itself.
br_stop() {
  local sig=${1:-TERM} pid=$BR_PID
  [ -n "$pid" ] || return 0
  local start=$SECONDS deadline=$((SECONDS + BR_STOP_TIMEOUT)) killed=0
  kill -s "$sig" "$pid" 2>/dev/null
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "daemon pid $pid still running ${BR_STOP_TIMEOUT}s after SIG$sig: SIGKILL"
    kill -s KILL "$pid" 2>/dev/null
    killed=1
  fi
  wait "$pid" 2>/dev/null
  BR_EXIT=$?
  BR_STOP_SECONDS=$((SECONDS - start))
  BR_PID=
  [ "$killed" = 0 ]
}

# The daemon's status as JSON (on stdout).
br_status_json() { timeout 10 "$BR_BIN" status --config "$BR_CONFIG" --json; }

# ---- assertions -----------------------------------------------------------
# check NAME CMD...      CMD must exit 0 (bounded by BR_CMD_TIMEOUT)
# expect_rc RC NAME CMD...   CMD must exit with RC
# On failure the command line and the tail of its output are printed.
# The output of the last command is kept in $BR_OUT (a file).
BR_OUT=/dev/null
_run_logged() {
  BR_OUT=$BR_TMP/last.out
  timeout -k 5 "$BR_CMD_TIMEOUT" "$@" >"$BR_OUT" 2>&1 </dev/null
}
_show_failure() {
  local rc=$1; shift
  echo "   command: $*"
  echo "   exit status: $rc$([ "$rc" = 124 ] && echo " (timed out after ${BR_CMD_TIMEOUT}s)")"
  tail -n 15 "$BR_OUT" | sed 's/^/   | /'
}
check() {
  local name=$1; shift
  _run_logged "$@"; local rc=$?
  if [ "$rc" = 0 ]; then pass "$name"; return 0; fi
  fail "$name"; _show_failure "$rc" "$@"; return 1
}
expect_rc() {
  local want=$1 name=$2; shift 2
  _run_logged "$@"; local rc=$?
  if [ "$rc" = "$want" ]; then pass "$name (exit $rc)"; return 0; fi
  fail "$name: expected exit $want, got $rc"; _show_failure "$rc" "$@"; return 1
}
assert_eq() {
  local name=$1 want=$2 got=$3
  if [ "$want" = "$got" ]; then pass "$name"; return 0; fi
  fail "$name: expected '$want', got '$got'"; return 1
}
# assert_contains NAME NEEDLE FILE   (fixed string)
assert_contains() {
  local name=$1 needle=$2 file=$3
  if grep -qF -- "$needle" "$file"; then pass "$name"; return 0; fi
  fail "$name: '$needle' not found in output:"; tail -n 15 "$file" | sed 's/^/   | /'; return 1
}
assert_not_contains() {
  local name=$1 needle=$2 file=$3
  if ! grep -qiF -- "$needle" "$file"; then pass "$name"; return 0; fi
  fail "$name: unexpected '$needle' in output:"; grep -iF -- "$needle" "$file" | head -n 5 | sed 's/^/   | /'; return 1
}
# assert_true NAME CMD...   like check, for quick predicates (no timeout/log)
assert_true() {
  local name=$1; shift
  if "$@"; then pass "$name"; return 0; fi
  fail "$name: '$*' is false"; return 1
}

# Print the totals and exit 0 if nothing failed, 1 otherwise.
br_finish() {
  if [ -n "$BR_PID" ] && ! br_alive; then
    fail "daemon pid $BR_PID died during the test"
    wait "$BR_PID"; log "daemon exit status $?"; BR_PID=
  fi
  echo "$BR_TEST_NAME: $BR_PASS passed, $BR_FAIL failed"
  [ "$BR_FAIL" = 0 ] && exit 0
  exit 1
}

# Write SIZE bytes of random data at OFFSET (both in MiB) into FILE, without
# truncating it.
br_fill_random() {
  local file=$1 off_mib=$2 len_mib=$3
  dd if=/dev/urandom of="$file" bs=1M seek="$off_mib" count="$len_mib" conv=notrunc status=none
}
