#!/usr/bin/env bash
# Replication along a chain of three real blockrelay processes on loopback:
#
#   a (primary) --sync--> b (secondary) --async--> c (secondary)
#
# one group "g" with two volumes. fio's nbd engine writes on a (random 4k and
# sequential 1M writes with verify=crc32c, on both volumes at once), then
# `blockrelay wait` on a (link b) and on b (link c) must report caught up,
# and every volume's backing file must have the same sha256 on a, b and c.
# Each site's `status --json` must show the expected link and upstream states.
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
write_configs() { write_chain_configs sync async; }

T0=$SECONDS
start_sites

# ---- links come up: a -> b replicating (after the initial resync of b's
# all-dirty slot, all zeroes), b -> c replicating, upstreams connected.
wait_for "a's link to b is replicating" 30 state_is a '.groups[0].downstream[0].state' replicating
wait_for "b's link to c is replicating" 30 state_is b '.groups[0].downstream[0].state' replicating
wait_for "b's upstream (a) is connected" 10 state_is b '.groups[0].upstream.state' connected
wait_for "c's upstream (b) is connected" 10 state_is c '.groups[0].upstream.state' connected

# ---- writes on a, verified by fio (reads come from a).
fio_check "randwrite 4k QD16 on v1 and v2 (verify=crc32c, ~4s)" \
  --rw=randwrite --bs=4k --iodepth=16 --size=24M --runtime=4 \
  --verify=crc32c --verify_fatal=1 --do_verify=1 \
  --name=r1 --uri="$(uri a v1)" --name=r2 --uri="$(uri a v2)"
fio_check "write 1M QD4 on v1 and v2 with fsync (verify=crc32c, ~4s)" \
  --rw=write --bs=1M --iodepth=4 --size=32M --offset=32M --fsync=8 --runtime=4 \
  --verify=crc32c --verify_fatal=1 --do_verify=1 \
  --name=s1 --uri="$(uri a v1)" --name=s2 --uri="$(uri a v2)"
log "fio done after $((SECONDS - T0))s"

# ---- caught up along the chain.
check "blockrelay wait g --link b on a" \
  "$BR_BIN" wait g --link b --timeout 30 --config "${CFG[a]}"
check "blockrelay wait g --link c on b" \
  "$BR_BIN" wait g --link c --timeout 30 --config "${CFG[b]}"
compare_images
log "caught up and compared after $((SECONDS - T0))s"

# ---- status of each site.
for s in a b c; do status_json "$s" >"$BR_TMP/status-$s.json" || fail "status --json of site $s"; done
sa=$BR_TMP/status-a.json sb=$BR_TMP/status-b.json sc=$BR_TMP/status-c.json
assert_eq "a: group g is primary" primary "$(jq -r '.groups[0].role' "$sa")"
assert_eq "a: one downstream link, to b" b "$(jq -r '[.groups[0].downstream[].site] | join(",")' "$sa")"
assert_eq "a: link b is sync" sync "$(jq -r '.groups[0].downstream[0].mode' "$sa")"
assert_eq "a: link b is replicating" replicating "$(jq -r '.groups[0].downstream[0].state' "$sa")"
assert_eq "a: link b has nothing queued" 0 "$(jq -r '.groups[0].downstream[0].queue_bytes' "$sa")"
assert_eq "a: link b has no lag" 0 "$(jq -r '.groups[0].downstream[0].lag_bytes' "$sa")"
sent=$(jq -r '.groups[0].downstream[0].bytes_sent' "$sa")
assert_true "a: link b sent the fio data (bytes_sent $sent >= 16 MiB)" test "$sent" -ge $((16 << 20))
assert_eq "a: no upstream" null "$(jq -c '.groups[0].upstream' "$sa")"
assert_eq "b: group g is secondary" secondary "$(jq -r '.groups[0].role' "$sb")"
assert_eq "b: upstream is site a" a "$(jq -r '.groups[0].upstream.site' "$sb")"
assert_eq "b: upstream connected" connected "$(jq -r '.groups[0].upstream.state' "$sb")"
rcvd=$(jq -r '.groups[0].upstream.bytes_received' "$sb")
assert_true "b: received what a sent (bytes_received $rcvd >= 16 MiB)" test "$rcvd" -ge $((16 << 20))
# Caught up means durable there, and a group is durable only once applied.
assert_eq "b: nothing received is left to apply" 0 "$(jq -r '.groups[0].upstream.unapplied_bytes' "$sb")"
assert_eq "b: counts receive waits" number "$(jq -r '.groups[0].upstream.receive_waits | type' "$sb")"
assert_eq "b: one downstream link, to c" c "$(jq -r '[.groups[0].downstream[].site] | join(",")' "$sb")"
assert_eq "b: link c is async" async "$(jq -r '.groups[0].downstream[0].mode' "$sb")"
assert_eq "b: link c is replicating" replicating "$(jq -r '.groups[0].downstream[0].state' "$sb")"
assert_eq "b: link c has nothing queued" 0 "$(jq -r '.groups[0].downstream[0].queue_bytes' "$sb")"
sent=$(jq -r '.groups[0].downstream[0].bytes_sent' "$sb")
assert_true "b: link c forwarded the fio data (bytes_sent $sent >= 16 MiB)" test "$sent" -ge $((16 << 20))
assert_eq "c: group g is secondary" secondary "$(jq -r '.groups[0].role' "$sc")"
assert_eq "c: upstream is site b" b "$(jq -r '.groups[0].upstream.site' "$sc")"
assert_eq "c: upstream connected" connected "$(jq -r '.groups[0].upstream.state' "$sc")"
assert_eq "c: no downstream links" 0 "$(jq -r '.groups[0].downstream | length' "$sc")"
for s in b c; do
  assert_eq "$s: exports are read-only" true \
    "$(jq -r '[.groups[0].volumes[].read_only] | all' "$BR_TMP/status-$s.json")"
done
for s in a b c; do
  assert_eq "$s: no volume errors" 0 "$(jq -r '[.groups[0].volumes[].errors] | add' "$BR_TMP/status-$s.json")"
done

# ---- every site stops cleanly (upstream first), and after the restart of
# nothing the images are still equal (the daemons flushed on SIGTERM).
for s in a b c; do
  site_stop "$s" TERM
  assert_eq "site $s exits 0 on SIGTERM" 0 "$?"
done
compare_images
log "total $((SECONDS - T0))s"

br_finish
