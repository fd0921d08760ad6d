# Shared helpers for the multi-site end-to-end tests (sourced after lib.sh).
#
# The test sets, before sourcing:
#   SITES=(a b ...)   site names, upstream first (started in reverse order)
#   VOLS=(v1 ...)     volume names of group "g"; VOL_SIZE=64MiB
# and defines, before calling start_sites:
#   pick_ports        sets PORT[site] for every site that listens for replication
#                     (downstream_ports: every site but the first)
#   write_configs     calls write_config SITE ROLE UPSTREAM DOWNSTREAM-JSON per site
#                     (write_chain_configs MODE...: the sites as a chain)
# LINK_ADDR[site] overrides the address upstreams use for a site (a proxy).
# Every site gets its own config, log and directory under $BR_TMP; stop_all
# (registered as an exit hook) stops only the sites this test started.

declare -A PID=() PORT=() CFG=() LOGF=()
declare -A LINK_ADDR=()  # site -> "host:port" its upstream links to (default: its own port)
for s in "${SITES[@]}"; do
  CFG[$s]=$BR_TMP/site-$s.json
  LOGF[$s]=$BR_TMP/site-$s.log
done

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
link_json() { jq -n --arg s "$1" --arg a "${LINK_ADDR[$1]:-127.0.0.1:${PORT[$1]}}" --arg m "$2" \
  '{site: $s, address: $a, mode: $m}'; }

# downstream_ports: a free replication port for every site but the first
# (the primary, which listens for none).
downstream_ports() { local s; for s in "${SITES[@]:1}"; do PORT[$s]=$(br_free_port); done; }

# write_chain_configs MODE...: the sites in SITES order as a chain, each
# replicating to the next one with the next MODE:
#   ${SITES[0]} (primary) --MODE1--> ${SITES[1]} (secondary) --MODE2--> ...
write_chain_configs() {
  local modes=("$@") n=${#SITES[@]} i down
  [ ${#modes[@]} -eq $((n - 1)) ] || die "write_chain_configs: $n sites need $((n - 1)) modes"
  for ((i = n - 1; i >= 0; i--)); do
    down='[]'
    [ "$i" -lt $((n - 1)) ] && down="[$(link_json "${SITES[i + 1]}" "${modes[i]}")]"
    if [ "$i" -eq 0 ]; then
      write_config "${SITES[i]}" primary "" "$down"
    else
      write_config "${SITES[i]}" secondary "${SITES[i - 1]}" "$down"
    fi
  done
}

# uri SITE VOLUME: the NBD URI of VOLUME on SITE's Unix socket.
uri() { echo "nbd+unix:///$2?socket=$BR_TMP/$1/nbd.sock"; }

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
stop_all() { local s; for s in "${SITES[@]}"; do site_stop "$s" TERM; done; }
br_on_exit stop_all

# Start downstream first (SITES in reverse order). If a replication port was taken in the
# meantime, pick new ports, rewrite the configs and start again.
start_sites() {
  local attempt s
  for attempt in 1 2 3; do
    pick_ports
    write_configs
    local ok=1
    for s in $(printf '%s\n' "${SITES[@]}" | tac); do
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
# bytes_sent_over SITE N: SITE's first downstream link has sent more than N bytes.
bytes_sent_over() { [ "$(jq_status "$1" '.groups[0].downstream[0].bytes_sent')" -gt "$2" ] 2>/dev/null; }

# compare_images: every volume's backing file has the same sha256 on every
# site as on the first one (the test needs sha256sum).
compare_images() {
  local v s first=${SITES[0]} sum_first sum
  for v in "${VOLS[@]}"; do
    sum_first=$(sha256sum "$BR_TMP/$first/$v.img" | cut -d' ' -f1)
    for s in "${SITES[@]:1}"; do
      sum=$(sha256sum "$BR_TMP/$s/$v.img" | cut -d' ' -f1)
      assert_eq "volume $v: site $s's image equals site $first's (sha256 ${sum_first:0:16}...)" "$sum_first" "$sum"
    done
  done
}

# A fio the test runs in the background sets FIO_PID (and clears it once it
# has waited for it); at exit it is killed if it still runs.
FIO_PID=
stop_fio() { [ -z "$FIO_PID" ] || kill "$FIO_PID" 2>/dev/null || true; }
br_on_exit stop_fio

# fio_errors NAME OUT: fail NAME if fio's output OUT shows a job error.
fio_errors() {
  if grep -qE 'err= *[1-9]' "$2"; then
    fail "$1: a job reported an error"; grep -E 'err=' "$2" | sed 's/^/   | /'
  fi
}

# fio_check NAME FIO-ARGS...: fio must exit 0 and report no job error or
# verify failure.
fio_check() {
  local name=$1; shift
  check "$name" fio --ioengine=nbd --eta=never "$@"
  local out=$BR_OUT
  fio_errors "$name" "$out"
  assert_not_contains "$name: no verify failure" "verify failed" "$out"
  assert_not_contains "$name: no bad verify header" "bad magic" "$out"
}

