#!/usr/bin/env bash
# Failover and failback with two real blockrelay processes on loopback,
# one group "g" with volumes v1 and v2, a --async--> b:
#   1. unplanned failover: writes on a, caught up, kill -9 a, promote b,
#      writes on b; a comes back still primary (b refuses it), demote a: a
#      reconnects as b's downstream and gets only the union of both sides'
#      dirty regions (reverse resync); a and b byte-identical;
#   2. failback: demote b, promote a, writes on a, identical again;
#   3. promote refused while the upstream is connected, done with --force;
#      the old primary, not demoted, is refused as a stale upstream;
#   4. split brain: both primaries write, a is demoted, b's HELLO is
#      refused naming both generations and nothing is written on either
#      side; `resync --discard-local` on a resolves it and a ends identical
#      to b.
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd sha256sum qemu-io

SITES=(a b)
VOLS=(v1 v2)
VOL_SIZE=16MiB
source "$BR_E2E_DIR/sites_lib.sh"
pick_ports() { PORT[a]=$(br_free_port); PORT[b]=$(br_free_port); }
write_configs() {
  write_config b secondary a '[]'
  write_config a primary "" "[$(link_json b async)]"
}

# put SITE VOL PATTERN OFFSET LENGTH: write a byte pattern through NBD.
put() {
  check "site $1: write 0x$3 at $4+$5 of $2" \
    qemu-io -f raw -c "write -P 0x$3 $4 $5" -c flush "$(uri "$1" "$2")"
}

digest() {
  local v out=
  for v in "${VOLS[@]}"; do out+=$(sha256sum <"$BR_TMP/$1/$v.img" | cut -d' ' -f1); done
  echo "$out"
}
same() { [ "$(digest a)" = "$(digest b)" ]; }
role() { jq_status "$1" '.groups[0].role'; }
gen() { jq_status "$1" '.groups[0].generation'; }
link_is() { [ "$(jq_status "$1" '.groups[0].downstream[0].state')" = "$2" ]; }
up_is() { [ "$(jq_status "$1" '.groups[0].upstream.state')" = "$2" ]; }
up_not_connected() { ! up_is "$1" connected; }
# No region marked dirty in any slot on either site.
all_clean() {
  local s n
  for s in a b; do
    n=$(jq_status "$s" '[.groups[0].volumes[].links[].dirty_bytes] | add // 0')
    [ "$n" = 0 ] || return 1
  done
}

start_sites

# ---- 1. unplanned failover -------------------------------------------------
check "initial sync a -> b" "$BR_BIN" wait g --config "${CFG[a]}" --timeout 80
put a v1 11 0 1M
put a v2 12 3M 512k
check "b caught up with a" "$BR_BIN" wait g --config "${CFG[a]}" --timeout 80
assert_true "a and b identical before the failover" same
G1=$(gen a)
assert_eq "b took a's generation" "$G1" "$(gen b)"

site_stop a KILL
wait_for "b notices its upstream is gone" 30 up_not_connected b
check "promote b" "$BR_BIN" promote g --config "${CFG[b]}"
assert_eq "b is primary" primary "$(role b)"
G2=$(gen b)
assert_true "b has a new generation ($G2)" test "$G2" != "$G1"
assert_eq "b's history starts with a's generation" "$G1" \
  "$(jq_status b '.groups[0].generation_history[0]')"
put b v1 21 4M 256k
put b v2 22 8M 128k

site_start a || die "site a did not restart"
assert_eq "a restarts as primary (its role is kept in data_dir)" primary "$(role a)"
DA=$(digest a)
check "demote a" "$BR_BIN" demote g --config "${CFG[a]}"
assert_eq "a is secondary" secondary "$(role a)"
check "b's new link to a catches up (reverse resync)" \
  "$BR_BIN" wait g --config "${CFG[b]}" --timeout 80
assert_true "a and b identical after the failover" same
wait_for "no region left dirty on either site after the failover" 20 all_clean
RS=$(jq_status b '.groups[0].downstream[0].resync_bytes_sent')
# b wrote 384 KiB; a may add whole 4 MiB intent extents it held hot when it
# was killed. Far below the 32 MiB of the two volumes.
assert_true "the reverse resync sent only the dirty union ($RS bytes)" \
  test "${RS:-0}" -gt 0 -a "${RS:-0}" -le $((12 << 20))
assert_true "a's data changed by the resync" test "$DA" != "$(digest a)"
assert_eq "a took b's generation" "$G2" "$(gen a)"

# ---- 2. failback (planned) ------------------------------------------------
check "demote b" "$BR_BIN" demote g --config "${CFG[b]}"
wait_for "a notices b is gone" 30 up_not_connected a
check "promote a" "$BR_BIN" promote g --config "${CFG[a]}"
assert_eq "a is primary again" primary "$(role a)"
put a v1 31 12M 64k
check "a's link to b catches up" "$BR_BIN" wait g --config "${CFG[a]}" --timeout 80
assert_true "a and b identical after the failback" same
wait_for "no region left dirty on either site after the failback" 20 all_clean
G3=$(gen a)
assert_eq "b took a's new generation" "$G3" "$(gen b)"

# ---- 3. promote refused while the upstream is connected ---------------------
wait_for "b's upstream a is connected" 30 up_is b connected
expect_rc 1 "promote b refused while a is connected" \
  "$BR_BIN" promote g --config "${CFG[b]}"
assert_contains "the refusal names the reason" "is connected and primary" "$BR_OUT"
assert_eq "b is still secondary" secondary "$(role b)"
check "promote --force b" "$BR_BIN" promote g --config "${CFG[b]}" --force
assert_eq "b is primary" primary "$(role b)"
# a is still primary with the generation b left behind: as b's upstream it
# is stale (not demoted after the failover) and refused.
check "demote b while a is still primary" "$BR_BIN" demote g --config "${CFG[b]}"
DB=$(digest b)
wait_for "b refuses a as a stale upstream" 40 up_is b refused
assert_true "the refusal says a was not demoted" \
  grep -qF "not demoted" <<<"$(jq_status b '.groups[0].upstream.last_error')"
assert_eq "nothing written on b by the stale upstream" "$DB" "$(digest b)"
check "promote b again" "$BR_BIN" promote g --config "${CFG[b]}"

# ---- 4. split brain -----------------------------------------------------------
a_link_down() { ! link_is a replicating; }
wait_for "a's link to b is down (b refuses it now)" 30 a_link_down
put a v2 41 1M 64k
put b v1 42 2M 64k
check "demote a" "$BR_BIN" demote g --config "${CFG[a]}"
DA=$(digest a)
DB=$(digest b)
wait_for "b's link to a is refused as split brain" 40 link_is b split_brain
wait_for "a's upstream shows the split brain" 10 up_is a split_brain
ERR=$(jq_status b '.groups[0].downstream[0].last_error')
GA=$(gen a)
GB=$(gen b)
assert_true "the refusal names a's generation ($GA)" grep -qF "$GA" <<<"$ERR"
assert_true "the refusal names b's generation ($GB)" grep -qF "$GB" <<<"$ERR"
assert_true "the refusal names the way out" grep -qF -- "--discard-local" <<<"$ERR"
assert_eq "nothing written on a" "$DA" "$(digest a)"
assert_eq "nothing written on b" "$DB" "$(digest b)"

expect_rc 1 "resync --discard-local refused on a primary" \
  "$BR_BIN" resync g --link a --discard-local --config "${CFG[b]}"
expect_rc 1 "resync --discard-local refused for an unknown site" \
  "$BR_BIN" resync g --link nosuch --discard-local --config "${CFG[a]}"
check "resync --discard-local on a" \
  "$BR_BIN" resync g --link b --discard-local --config "${CFG[a]}"
check "b's link to a catches up" "$BR_BIN" wait g --config "${CFG[b]}" --timeout 80
assert_true "a and b identical after the split brain is resolved" same
wait_for "no region left dirty on either site after the split brain is resolved" 20 all_clean
assert_eq "a took b's generation" "$GB" "$(gen a)"

# ---- usage errors -------------------------------------------------------------
expect_rc 1 "promote of an unknown group fails" "$BR_BIN" promote nosuch --config "${CFG[b]}"
expect_rc 1 "promote of a primary fails" "$BR_BIN" promote g --config "${CFG[b]}"
expect_rc 1 "demote of a secondary fails" "$BR_BIN" demote g --config "${CFG[a]}"
expect_rc 2 "promote without a group is a usage error" "$BR_BIN" promote --config "${CFG[b]}"

for s in a b; do
  site_stop "$s" TERM
  assert_eq "site $s stops cleanly" 0 "$?"
done
br_finish
