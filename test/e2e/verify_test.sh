#!/usr/bin/env bash
# Online verify with two real blockrelay processes on loopback: a --async--> b,
# one group "g" with volumes v1 and v2. After a writes random data and b has
# caught up, `blockrelay verify` reports no mismatch (exit 0). One byte of
# b's v2 backing file is then changed behind blockrelay's back, and verify
# must report exactly that region of v2 (exit 1) -- also while fio keeps
# writing to v1 and v2 on a during the compare, so regions being written are
# not false mismatches. `verify --fix` marks it dirty, the link resyncs it,
# and a last verify and the sha256 of every backing file agree.
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
link_json() { jq -n --arg s "$1" --arg a "127.0.0.1:${PORT[$1]}" --arg m "$2" \
  '{site: $s, address: $a, mode: $m}'; }
write_configs() {
  write_config b secondary a '[]'
  write_config a primary "" "[$(link_json b async)]"
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

uri() { echo "nbd+unix:///$2?socket=$BR_TMP/$1/nbd.sock"; }
same_images() {
  local v
  for v in "${VOLS[@]}"; do
    [ "$(sha256sum <"$BR_TMP/a/$v.img")" = "$(sha256sum <"$BR_TMP/b/$v.img")" ] || return 1
  done
}
verify() { timeout -k 5 120 "$BR_BIN" verify g --link b --config "${CFG[a]}" "$@"; }

start_sites
# New slot for b starts all dirty: the initial resync makes b identical.
for v in "${VOLS[@]}"; do
  check "random data into $v on a" timeout 60 fio --ioengine=nbd --eta=never \
    --name=fill --uri="$(uri a "$v")" --rw=write --bs=1M --iodepth=4 --size=16M
done
check "b caught up" timeout 60 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 50
assert_true "backing files identical after catch-up" same_images

OUT=$BR_TMP/verify.out
verify >"$OUT" 2>&1; rc=$?
assert_eq "verify of identical sites exits 0" 0 "$rc"
assert_contains "verify reports no mismatch" "0 mismatching" "$OUT"

# Change one byte of region 37 of v2 on b (64 KiB regions), behind its back.
REGION=37
printf '\x5a' | dd of="$BR_TMP/b/v2.img" bs=1 seek=$((REGION * 65536 + 1234)) conv=notrunc status=none
cmp -s "$BR_TMP/a/v2.img" "$BR_TMP/b/v2.img" && die "the corruption did not change b's file"

# fio keeps writing on a (both volumes) while verify runs.
timeout -k 5 60 fio --ioengine=nbd --eta=never --name=busy1 --uri="$(uri a v1)" \
  --rw=randwrite --bs=4k --iodepth=8 --size=16M --time_based --runtime=8 --rate=8m \
  >"$BR_TMP/fio-busy1.out" 2>&1 &
FIO1=$!
timeout -k 5 60 fio --ioengine=nbd --eta=never --name=busy2 --uri="$(uri a v2)" \
  --rw=randwrite --bs=4k --iodepth=8 --offset=4M --size=8M --time_based --runtime=8 --rate=8m \
  >"$BR_TMP/fio-busy2.out" 2>&1 &
FIO2=$!
sleep 1
verify --json >"$OUT" 2>"$BR_TMP/verify.err"; rc=$?; cat "$BR_TMP/verify.err" | tail -3; jq -c "del(.mismatches)" "$OUT"
assert_eq "verify with a corrupted byte exits 1" 1 "$rc"
assert_eq "exactly one mismatching region" 1 "$(jq -r .mismatched_regions "$OUT")"
assert_eq "it is v2" v2 "$(jq -r '.mismatches[0].volume' "$OUT")"
assert_eq "it is region $REGION" "$REGION" "$(jq -r '.mismatches[0].region' "$OUT")"
assert_eq "mismatched bytes = one region" 65536 "$(jq -r .mismatched_bytes "$OUT")"
assert_true "fio was still writing during the verify" kill -0 "$FIO1"
wait "$FIO1"; assert_eq "fio on v1 succeeded" 0 "$?"
wait "$FIO2"; assert_eq "fio on v2 succeeded" 0 "$?"

verify --fix >"$OUT" 2>&1; rc=$?
assert_eq "verify --fix exits 0" 0 "$rc"
assert_contains "verify --fix marks the region for resync" "marked dirty" "$OUT"
check "b caught up after the fix" timeout 60 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 50
verify >"$OUT" 2>&1; rc=$?
assert_eq "verify after the fix exits 0" 0 "$rc"
assert_true "backing files identical after the fix" same_images

# Usage errors: unknown link, unknown group.
expect_rc 1 "verify of an unknown link fails" \
  timeout 20 "$BR_BIN" verify g --link nosuch --config "${CFG[a]}"
expect_rc 1 "verify of an unknown group fails" \
  timeout 20 "$BR_BIN" verify nosuch --link b --config "${CFG[a]}"

br_finish
