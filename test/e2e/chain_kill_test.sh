#!/usr/bin/env bash
# kill -9 of the middle site of a chain during writes:
#
#   a (primary) --sync--> b (secondary) --async--> c (secondary)
#
# fio's nbd engine writes random 4k blocks on both volumes of a for ~10 s.
# Meanwhile b is killed with SIGKILL: a's sync link must drop to logging
# (writes on a go on), and c loses its upstream. b is started again while
# fio still writes; without any operator command a resyncs b and b resyncs
# c (b's own scoreboard for c, rebuilt from its intent log). After fio ends,
# `blockrelay wait` on a (link b) and on b (link c) must report caught up,
# and every volume's backing file must be byte-identical on a, b and c.
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd sha256sum
command -v fio >/dev/null 2>&1 || skip "fio is not installed"
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"

SITES=(a b c)
VOLS=(v1 v2)
VOL_SIZE=64MiB
source "$BR_E2E_DIR/sites_lib.sh"
pick_ports() { downstream_ports; }
write_configs() { write_chain_configs sync async; }

T0=$SECONDS
start_sites
wait_for "a's link to b is replicating" 30 state_is a '.groups[0].downstream[0].state' replicating
wait_for "b's link to c is replicating" 30 state_is b '.groups[0].downstream[0].state' replicating

# ---- writes on a for ~10 s, in the background.
timeout -k 5 120 fio --ioengine=nbd --eta=never --rw=randwrite --bs=4k --iodepth=16 \
  --time_based --runtime=10 --size=64M --randrepeat=0 \
  --name=w1 --uri="$(uri a v1)" --name=w2 --uri="$(uri a v2)" >"$BR_TMP/fio.out" 2>&1 &
FIO_PID=$!
wait_for "fio's writes reach b (a's link sent > 2 MiB)" 30 bytes_sent_over a $((2 << 20))
wait_for "... and c (b's link sent > 1 MiB)" 30 bytes_sent_over b $((1 << 20))

# ---- kill -9 of the middle site.
site_stop b KILL
log "b killed after $((SECONDS - T0))s"
wait_for "a's link to b drops to logging" 10 state_is a '.groups[0].downstream[0].state' logging
dirty() { [ "$(jq_status a '.groups[0].volumes[0].links[0].dirty_bytes')" -gt 0 ] 2>/dev/null; }
wait_for "writes on a go on, marked dirty for b" 10 dirty
assert_true "fio is still writing when b restarts" kill -0 "$FIO_PID"

# ---- b comes back; nobody tells anyone to resync.
site_start b || die "b did not restart after kill -9"
wait "$FIO_PID"; rc=$?; FIO_PID=
assert_eq "fio exits 0 (writes on a never failed)" 0 "$rc"
fio_errors fio "$BR_TMP/fio.out"
log "fio done after $((SECONDS - T0))s"

check "blockrelay wait g --link b on a" \
  "$BR_BIN" wait g --link b --timeout 60 --config "${CFG[a]}"
check "blockrelay wait g --link c on b" \
  "$BR_BIN" wait g --link c --timeout 60 --config "${CFG[b]}"
compare_images
for s in a b; do
  assert_eq "$s: its link is replicating" replicating "$(jq_status "$s" '.groups[0].downstream[0].state')"
done
assert_eq "c: upstream connected again" connected "$(jq_status c '.groups[0].upstream.state')"
resynced=$(jq_status a '.groups[0].downstream[0].resync_bytes_sent')
assert_true "a resynced b (resync_bytes_sent $resynced > 0)" test "$resynced" -gt 0
for s in a b c; do
  assert_eq "$s: no volume errors" 0 "$(jq_status "$s" '[.groups[0].volumes[].errors] | add')"
done
log "total $((SECONDS - T0))s"

br_finish
