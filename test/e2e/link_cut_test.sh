#!/usr/bin/env bash
# A WAN cut and heal under load: a --sync--> b through test/tools/link_proxy
# (which adds delay and can cut the connection on command), one group "g"
# with volumes v1 and v2. fio writes with verify=crc32c on a while the proxy
# cuts the link: writes on a go on (on_sync_failure "logging"), a's link
# drops to logging with the changed regions dirty, and `wait` times out.
# After `heal` the link reconnects by itself (back-off), resyncs only what
# changed, returns to replicating, and every backing file is identical on a
# and b.
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd sha256sum
command -v fio >/dev/null 2>&1 || skip "fio is not installed"
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"

SITES=(a b)
VOLS=(v1 v2)
VOL_SIZE=64MiB
declare -A PID=() PORT=() CFG=() LOGF=()
for s in "${SITES[@]}"; do
  CFG[$s]=$BR_TMP/site-$s.json
  LOGF[$s]=$BR_TMP/site-$s.log
done

# Replication port of b; picked again if taken when a site starts.
pick_ports() { PORT[b]=$(br_free_port); }

# write_config SITE ROLE UPSTREAM DOWNSTREAM-JSON
write_config() {
  local s=$1 role=$2 up=$3 down=$4 vols up_json='{}' listen_json='{}'
  vols=$(for v in "${VOLS[@]}"; do
    jq -n --arg n "$v" --arg p "$BR_TMP/$s/$v.img" --arg sz "$VOL_SIZE" \
      '{name: $n, path: $p, size: $sz}'; done | jq -s .)
  if [ -n "$up" ]; then
    up_json=$(jq -n --arg s "$up" --arg a "${PORT[$up]:+127.0.0.1:${PORT[$up]}}" \
      '{upstream: ({site: $s} + (if $a == "" then {} else {address: $a} end))}')
  fi
  if [ -n "${PORT[$s]:-}" ]; then
    listen_json=$(jq -n --arg l "127.0.0.1:${PORT[$s]}" '{replication: {listen: $l}}')
  fi
  jq -n --arg site "$s" --arg dd "$BR_TMP/$s/data" --arg ctl "$BR_TMP/$s/control.sock" \
    --arg sock "$BR_TMP/$s/nbd.sock" --arg role "$role" --argjson vols "$vols" \
    --argjson down "$down" --argjson up "$up_json" --argjson listen "$listen_json" \
    '{site: $site, data_dir: $dd, control_socket: $ctl, nbd: {unix_socket: $sock}}
     + $listen
     + {groups: [{name: "g", role: $role, region_size: "64KiB", volumes: $vols}
                 + (if ($down | length) > 0 then {downstream: $down} else {} end)
                 + $up]}' >"${CFG[$s]}" || die "could not write ${CFG[$s]}"
}
link_json() { jq -n --arg s "$1" --arg a "127.0.0.1:${PROXY_PORT}" --arg m "$2" \
  '{site: $s, address: $a, mode: $m}'; }
write_configs() {
  write_config b secondary a '[]'
  write_config a primary "" "[$(link_json b sync)]"
}

# Every site's log on failure (lib.sh would show only its one daemon's).
br_dump_daemon_log() {
  [ -z "${BR_LOG_DUMPED:-}" ] || return 0
  BR_LOG_DUMPED=1
  local s
  for s in "${SITES[@]}"; do
    [ -s "${LOGF[$s]}" ] || continue
    echo "---- last lines of site $s's log (${LOGF[$s]}) ----"
    tail -n 30 "${LOGF[$s]}"
  done
  echo "----"
}

site_alive() { [ -n "${PID[$1]:-}" ] && kill -0 "${PID[$1]}" 2>/dev/null; }

# site_start SITE: start it and wait (bounded) until its control socket and
# NBD socket answer. Returns 1 if it exited or did not come up.
site_start() {
  local s=$1
  echo "==== blockrelay run --config ${CFG[$s]} ($(date +%T)) ====" >>"${LOGF[$s]}"
  "$BR_BIN" run --config "${CFG[$s]}" >>"${LOGF[$s]}" 2>&1 </dev/null &
  PID[$s]=$!
  local deadline=$((SECONDS + BR_START_TIMEOUT))
  while [ $SECONDS -lt $deadline ]; do
    if ! site_alive "$s"; then
      wait "${PID[$s]}"; log "site $s exited with status $? at start-up"
      PID[$s]=
      return 1
    fi
    if timeout 5 "$BR_BIN" status --config "${CFG[$s]}" >/dev/null 2>&1 &&
       [ -S "$BR_TMP/$s/nbd.sock" ]; then
      log "site $s: pid ${PID[$s]}${PORT[$s]:+, replication port ${PORT[$s]}}"
      return 0
    fi
    sleep 0.1
  done
  log "site $s (pid ${PID[$s]}) did not serve within ${BR_START_TIMEOUT}s"
  return 1
}

# site_stop SITE [SIGNAL]: stop a site this test started (SIGKILL after
# BR_STOP_TIMEOUT seconds). Returns its exit status.
site_stop() {
  local s=$1 sig=${2:-TERM} pid=${PID[$1]:-} rc
  [ -n "$pid" ] || return 0
  kill -s "$sig" "$pid" 2>/dev/null
  local deadline=$((SECONDS + BR_STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "site $s (pid $pid) still running ${BR_STOP_TIMEOUT}s after SIG$sig: SIGKILL"
    kill -s KILL "$pid" 2>/dev/null
  fi
  { wait "$pid"; } 2>/dev/null  # (no "Killed" notice from bash)
  rc=$?
  PID[$s]=
  return "$rc"
}
stop_all() { local s; for s in a b; do site_stop "$s" TERM; done; }
br_on_exit stop_all

# Start downstream first (b, a). If a replication port was taken in the
# meantime, pick new ports, rewrite the configs and start again.
start_sites() {
  local attempt s
  for attempt in 1 2 3; do
    pick_ports
    write_configs
    local ok=1
    for s in b a; do
      if ! site_start "$s"; then
        ok=0
        break
      fi
    done
    [ "$ok" = 1 ] && return 0
    if [ "$attempt" -lt 3 ] && tail -n 5 "${LOGF[$s]}" | grep -q "Address already in use"; then
      log "port taken by someone else; new ports, try $((attempt + 1))"
      stop_all
      continue
    fi
    break
  done
  die "the sites did not start (see the logs below)"
}

status_json() { timeout 10 "$BR_BIN" status --config "${CFG[$1]}" --json; }
# jq_status SITE FILTER: one value of SITE's status (raw), "" on error.
jq_status() { status_json "$1" 2>/dev/null | jq -r "$2" 2>/dev/null; }

# wait_for NAME SECONDS CMD...: poll CMD until it succeeds.
wait_for() {
  local name=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  while [ $SECONDS -lt $deadline ]; do
    if "$@"; then pass "$name"; return 0; fi
    sleep 0.2
  done
  fail "$name (not within ${secs}s)"; return 1
}
state_is() { [ "$(jq_status "$1" "$2")" = "$3" ]; }

# fio_check NAME FIO-ARGS...: fio must exit 0 and report no job error or
# verify failure.
fio_check() {
  local name=$1; shift
  check "$name" fio --ioengine=nbd --eta=never "$@"
  local out=$BR_OUT
  if grep -qE 'err= *[1-9]' "$out"; then
    fail "$name: a job reported an error"; grep -E 'err=' "$out" | sed 's/^/   | /'
  fi
  assert_not_contains "$name: no verify failure" "verify failed" "$out"
  assert_not_contains "$name: no bad verify header" "bad magic" "$out"
}


PROXY=${LINK_PROXY:-$(dirname "$BR_BIN")/test/tools/link_proxy}
[ -x "$PROXY" ] || die "link_proxy is not built at $PROXY (cmake --build BUILD --target link_proxy)"
command -v jq >/dev/null 2>&1 || skip "jq is not installed"

uri() { echo "nbd+unix:///$2?socket=$BR_TMP/$1/nbd.sock"; }
same_images() {
  local v
  for v in "${VOLS[@]}"; do
    [ "$(sha256sum <"$BR_TMP/a/$v.img")" = "$(sha256sum <"$BR_TMP/b/$v.img")" ] || return 1
  done
}
proxy_cmd() { python3 - "$BR_TMP/proxy.sock" "$1" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
s.sendall((sys.argv[2] + "\n").encode()); print(s.makefile().readline().strip())
PY
}

# The proxy forwards to b's replication port, which start_sites picks: start
# it after the ports are known. Pick b's port first, then the proxy's.
PROXY_PORT=$(br_free_port)
pick_ports
"$PROXY" --listen "127.0.0.1:$PROXY_PORT" --target "127.0.0.1:${PORT[b]}" --delay-ms 2 \
  --control "$BR_TMP/proxy.sock" >"$BR_TMP/proxy.log" 2>&1 &
PROXY_PID=$!
stop_proxy() { kill "$PROXY_PID" 2>/dev/null; wait "$PROXY_PID" 2>/dev/null; }
br_on_exit stop_proxy
for _ in $(seq 100); do [ -S "$BR_TMP/proxy.sock" ] && break; sleep 0.1; done
[ -S "$BR_TMP/proxy.sock" ] || die "link_proxy did not start"
pick_ports() { :; }  # keep the port the proxy forwards to
start_sites

check "b caught up (initial sync through the proxy)" \
  timeout 90 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 80

timeout -k 5 120 fio --ioengine=nbd --eta=never --name=w --uri="$(uri a v1)" \
  --rw=randwrite --bs=4k --iodepth=8 --size=16M --time_based --runtime=6 \
  --verify=crc32c --verify_fatal=1 >"$BR_TMP/fio.out" 2>&1 &
FIO=$!
sleep 1.5
assert_contains "proxy cuts the link" "ok cut" <(proxy_cmd cut)
wait_for "a's link to b drops to logging" 30 \
  bash -c "timeout 10 '$BR_BIN' status --json --config '${CFG[a]}' | jq -e '.groups[0].downstream[0].state == \"logging\"' >/dev/null"
expect_rc 1 "wait times out while the link is cut" \
  timeout 20 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 1
wait "$FIO"; assert_eq "fio on a succeeded while the link was cut" 0 "$?"
DIRTY=$(timeout 10 "$BR_BIN" status --json --config "${CFG[a]}" | jq '[.groups[0].volumes[].links[].dirty_bytes] | add')
assert_true "writes during the cut are dirty in the scoreboard ($DIRTY bytes)" test "${DIRTY:-0}" -gt 0
SENT0=$(timeout 10 "$BR_BIN" status --json --config "${CFG[a]}" | jq '.groups[0].downstream[0].resync_bytes_sent')

assert_contains "proxy heals the link" "ok healed" <(proxy_cmd heal)
check "b caught up after the heal" timeout 90 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 80
SENT1=$(timeout 10 "$BR_BIN" status --json --config "${CFG[a]}" | jq '.groups[0].downstream[0].resync_bytes_sent')
RESYNCED=$((SENT1 - SENT0))
log "dirty before the heal: $DIRTY bytes; resync sent $RESYNCED bytes"
assert_true "the resync moved no more than the dirty bytes" test "$RESYNCED" -le "$DIRTY"
assert_true "backing files identical after the heal" same_images

br_finish
