#!/usr/bin/env bash
# kill -9 of the primary during writes, restart, automatic resync:
#
#   a (primary) --async--> b (secondary)
#
# fio's nbd engine writes random 4k blocks over the first 48 MiB of a
# 256 MiB volume on a; a is killed with SIGKILL while it writes. Before a
# restarts, `blockrelay inspect` reads its metadata: the dirty bound for
# link b is the slot's dirty bytes plus every intent extent still in the
# log (the recovered dirty set is their union). After the restart a resyncs
# b by itself; once `blockrelay wait` reports caught up, a and b are
# byte-identical, and the link resent no more than the dirty bound (far
# less than the volume: resync stays proportional to the change).
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd sha256sum
command -v fio >/dev/null 2>&1 || skip "fio is not installed"
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"

SITES=(a b)
VOLS=(v1)
VOL_SIZE=256MiB
source "$BR_E2E_DIR/sites_lib.sh"
pick_ports() { PORT[b]=$(br_free_port); }
write_configs() {
  write_config b secondary a '[]'
  write_config a primary "" "[$(link_json b async)]"
}
digest() { sha256sum <"$BR_TMP/$1/v1.img" | cut -d' ' -f1; }

start_sites
check "initial sync a -> b" "$BR_BIN" wait g --config "${CFG[a]}" --timeout 80

timeout -k 5 120 fio --ioengine=nbd --eta=never --rw=randwrite --bs=4k --iodepth=16 \
  --time_based --runtime=20 --size=48M --randrepeat=0 \
  --name=w --uri="$(uri a v1)" >"$BR_TMP/fio.out" 2>&1 &
FIO_PID=$!
wait_for "fio's writes reach b (a's link sent > 4 MiB)" 30 bytes_sent_over a $((4 << 20))
site_stop a KILL
log "a killed while fio was writing"
wait "$FIO_PID" 2>/dev/null; FIO_PID=   # fails: its server died under it

check "inspect a's metadata with a stopped" \
  "$BR_BIN" inspect --config "${CFG[a]}" --json
INSPECT=$BR_TMP/inspect.json
cp "$BR_OUT" "$INSPECT"
SLOT_DIRTY=$(jq -r '.volumes[0].slots[] | select(.site == "b") | .dirty_bytes' "$INSPECT")
EXTENTS=$(jq -r '.volumes[0].intent_extents_in_use' "$INSPECT")
EXTENT_BYTES=$(jq -r '.volumes[0].intent_extent_bytes' "$INSPECT")
BOUND=$((SLOT_DIRTY + EXTENTS * EXTENT_BYTES))
log "dirty bound for b: $SLOT_DIRTY bytes in the bitmap + $EXTENTS intent extent(s) of $EXTENT_BYTES = $BOUND"
assert_true "a's metadata says something is dirty for b" test "$BOUND" -gt 0

site_start a || die "a did not restart after kill -9"
check "a resyncs b by itself: blockrelay wait" \
  "$BR_BIN" wait g --link b --timeout 80 --config "${CFG[a]}"
assert_eq "a and b byte-identical" "$(digest a)" "$(digest b)"
RS=$(jq_status a '.groups[0].downstream[0].resync_bytes_sent')
assert_true "the resync sent something ($RS bytes)" test "${RS:-0}" -gt 0
assert_true "the resync sent no more than the dirty bound ($RS <= $BOUND bytes)" \
  test "${RS:-0}" -le "$BOUND"
# The recovered dirty set may count whole intent extents that were hot at
# the crash, so the bound can pass the volume size; what was resent did not.
assert_true "the resync sent less than half the 256 MiB volume ($RS bytes)" \
  test "${RS:-0}" -le $((128 << 20))
assert_eq "a's link is replicating" replicating "$(jq_status a '.groups[0].downstream[0].state')"
br_finish
