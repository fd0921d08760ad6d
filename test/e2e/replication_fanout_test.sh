#!/usr/bin/env bash
# Fan-out replication with three real blockrelay processes on loopback:
#
#   a (primary) --sync--> b (secondary)
#               --async-> c (secondary)
#
# one group "g" with two volumes. fio's nbd engine writes on a (random 4k and
# sequential 1M writes with verify=crc32c, both volumes at once); site c is
# killed with SIGKILL during the random writes. Writes on a must go on (fio
# succeeds, b stays in sync), a's link to c must drop to logging with the
# changed regions in its scoreboard, `blockrelay wait` must time out for c
# only; after c is restarted, a resyncs it, `blockrelay wait` on a reports
# every link caught up, and every volume's backing file has the same sha256
# on a, b and c.
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd sha256sum
command -v fio >/dev/null 2>&1 || skip "fio is not installed"
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"

SITES=(a b c)
VOLS=(v1 v2)
VOL_SIZE=64MiB
source "$BR_E2E_DIR/sites_lib.sh"
# Replication ports of b and c; picked again if taken when a site starts.
pick_ports() { downstream_ports; }
write_configs() {
  write_config c secondary a '[]'
  write_config b secondary a '[]'
  write_config a primary "" "[$(link_json b sync), $(link_json c async)]"
}

# link_filter SITE: jq path of a's downstream link to SITE.
link() { echo ".groups[0].downstream[] | select(.site == \"$1\")"; }
# dirty bytes of a's scoreboard slot for SITE, summed over the volumes.
dirty_for() { jq_status a "[.groups[0].volumes[].links[] | select(.site == \"$1\") | .dirty_bytes] | add"; }
dirty_zero() { [ "$(dirty_for "$1")" = 0 ]; }
written_bytes() { jq_status a '[.groups[0].volumes[].bytes_written] | add'; }

T0=$SECONDS
start_sites

wait_for "a's link to b is replicating" 30 state_is a "$(link b) | .state" replicating
wait_for "a's link to c is replicating" 30 state_is a "$(link c) | .state" replicating
wait_for "b's upstream (a) is connected" 10 state_is b '.groups[0].upstream.state' connected
wait_for "c's upstream (a) is connected" 10 state_is c '.groups[0].upstream.state' connected
assert_eq "a: link b is sync" sync "$(jq_status a "$(link b) | .mode")"
assert_eq "a: link c is async" async "$(jq_status a "$(link c) | .mode")"

# ---- random writes on a; c is killed with SIGKILL while they run.
FIO_OUT=$BR_TMP/fio-randwrite.out
timeout -k 5 90 fio --ioengine=nbd --eta=never \
  --rw=randwrite --bs=4k --iodepth=16 --size=24M --runtime=6 \
  --verify=crc32c --verify_fatal=1 --do_verify=1 \
  --name=r1 --uri="$(uri a v1)" --name=r2 --uri="$(uri a v2)" >"$FIO_OUT" 2>&1 </dev/null &
FIO_PID=$!
# Kill c once a few MiB went through a.
deadline=$((SECONDS + 30))
while [ $SECONDS -lt $deadline ] && kill -0 "$FIO_PID" 2>/dev/null; do
  w=$(written_bytes); [ "${w:-0}" -ge $((8 << 20)) ] && break
  sleep 0.1
done
C_PID=${PID[c]}
site_stop c KILL 2>/dev/null  # (no "Killed" notice from bash)
log "killed site c (pid $C_PID) after $(( $(written_bytes) >> 20 )) MiB written on a"
assert_true "c was killed while fio was still writing on a" kill -0 "$FIO_PID"
wait "$FIO_PID"; rc=$?; FIO_PID=
assert_eq "randwrite 4k QD16 on v1 and v2 (verify=crc32c) succeeds while c dies" 0 "$rc"
[ "$rc" = 0 ] || tail -n 20 "$FIO_OUT" | sed 's/^/   | /'
assert_not_contains "randwrite: no verify failure" "verify failed" "$FIO_OUT"
fio_errors randwrite "$FIO_OUT"

wait_for "a's link to c goes logging" 15 state_is a "$(link c) | .state" logging
assert_eq "a's link to b is still replicating" replicating "$(jq_status a "$(link b) | .state")"

# ---- more writes on a while c is down.
fio_check "write 1M QD4 on v1 and v2 with fsync, c down (verify=crc32c)" \
  --rw=write --bs=1M --iodepth=4 --size=32M --offset=32M --fsync=8 --runtime=6 \
  --verify=crc32c --verify_fatal=1 --do_verify=1 \
  --name=s1 --uri="$(uri a v1)" --name=s2 --uri="$(uri a v2)"
log "fio done after $((SECONDS - T0))s"

assert_eq "a's link to c is logging after the writes" logging "$(jq_status a "$(link c) | .state")"
DIRTY_C=$(dirty_for c)
assert_true "a's scoreboard for c holds the changes (dirty_bytes ${DIRTY_C:-?} >= 16 MiB)" \
  test "${DIRTY_C:-0}" -ge $((16 << 20))
wait_for "a's scoreboard for b is clean while c is down" 10 dirty_zero b
check "blockrelay wait g --link b on a (b stays in sync)" \
  "$BR_BIN" wait g --link b --timeout 30 --config "${CFG[a]}"
expect_rc 1 "blockrelay wait g --link c times out while c is down" \
  "$BR_BIN" wait g --link c --timeout 1 --config "${CFG[a]}"
expect_rc 1 "blockrelay wait g (all links) times out while c is down" \
  "$BR_BIN" wait g --timeout 1 --config "${CFG[a]}"
for v in "${VOLS[@]}"; do
  assert_eq "volume $v: site b's image equals site a's while c is down" \
    "$(sha256sum <"$BR_TMP/a/$v.img")" "$(sha256sum <"$BR_TMP/b/$v.img")"
done

# ---- c comes back: a resyncs it.
site_start c || die "site c did not restart"
check "blockrelay wait g (every link) on a after c restarts" \
  "$BR_BIN" wait g --timeout 60 --config "${CFG[a]}"
log "caught up after $((SECONDS - T0))s"
compare_images

for s in a b c; do status_json "$s" >"$BR_TMP/status-$s.json" || fail "status --json of site $s"; done
sa=$BR_TMP/status-a.json
assert_eq "a: link b is replicating" replicating "$(jq -r "$(link b) | .state" "$sa")"
assert_eq "a: link c is replicating" replicating "$(jq -r "$(link c) | .state" "$sa")"
for s in b c; do
  assert_eq "a: link $s has nothing queued" 0 "$(jq -r "$(link "$s") | .queue_bytes" "$sa")"
done
conn=$(jq -r "$(link c) | .connects" "$sa")
assert_true "a: link c connected again (connects $conn >= 2)" test "$conn" -ge 2
rs=$(jq -r "$(link c) | .resync_bytes_sent" "$sa")
assert_true "a: link c resynced data (resync_bytes_sent $rs > 0)" test "$rs" -gt 0
assert_true "a: link c resent at most what its scoreboard marked (resync_bytes_sent $rs <= dirty_bytes $DIRTY_C)" \
  test "$rs" -le "${DIRTY_C:-0}"
wait_for "a's scoreboard for c is clean" 15 dirty_zero c
wait_for "a's scoreboard for b is clean" 15 dirty_zero b
for s in b c; do
  assert_eq "$s: upstream is site a" a "$(jq -r '.groups[0].upstream.site' "$BR_TMP/status-$s.json")"
  assert_eq "$s: upstream connected" connected "$(jq -r '.groups[0].upstream.state' "$BR_TMP/status-$s.json")"
  assert_eq "$s: no downstream links" 0 "$(jq -r '.groups[0].downstream | length' "$BR_TMP/status-$s.json")"
done
for s in a b c; do
  assert_eq "$s: no volume errors" 0 "$(jq -r '[.groups[0].volumes[].errors] | add' "$BR_TMP/status-$s.json")"
done

for s in a b c; do
  site_stop "$s" TERM
  assert_eq "site $s exits 0 on SIGTERM" 0 "$?"
done
compare_images
log "total $((SECONDS - T0))s"

br_finish
