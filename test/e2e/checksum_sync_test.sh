#!/usr/bin/env bash
# "initial_sync": "checksum": a downstream restored from a copy gets only the
# regions that differ.
#
#   a (primary) --async, initial_sync checksum--> b (secondary)
#
# Before either site ever ran, a's image is filled with random data and
# copied to b (cp), then 3 regions are changed on a and 1 on b. At the
# first start a's new slot for b is all dirty; the link compares the
# regions' digests with b and sends only the 4 that differ: b must end
# byte-identical to a with resync_bytes_sent = 4 regions (a full sync would
# send the whole 64 MiB). Then `resync --full` still sends every region, and
# a restart does not compare again.
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd sha256sum
need_cmd jq

SITES=(a b)
VOLS=(v1)
VOL_SIZE=64MiB
source "$BR_E2E_DIR/sites_lib.sh"
REGION=$((64 << 10))
VOL_BYTES=$((64 << 20))
pick_ports() { PORT[b]=$(br_free_port); }
write_configs() {
  write_config b secondary a '[]'
  write_config a primary "" "[$(link_json b async | jq -c '. + {initial_sync: "checksum"}')]"
}

same_images() {
  local sa sb
  sa=$(sha256sum "$BR_TMP/a/v1.img" | cut -d' ' -f1)
  sb=$(sha256sum "$BR_TMP/b/v1.img" | cut -d' ' -f1)
  assert_eq "$1: b's image equals a's (sha256 ${sa:0:16}...)" "$sa" "$sb"
}
# change_region FILE REGION: one region of random bytes.
change_region() {
  dd if=/dev/urandom of="$1" bs=$REGION seek="$2" count=1 conv=notrunc status=none
}
link() { jq_status a ".groups[0].downstream[0]$1"; }

T0=$SECONDS
mkdir -p "$BR_TMP/a" "$BR_TMP/b"
br_fill_random "$BR_TMP/a/v1.img" 0 64
cp "$BR_TMP/a/v1.img" "$BR_TMP/b/v1.img"
change_region "$BR_TMP/a/v1.img" 0       # first region
change_region "$BR_TMP/a/v1.img" 517
change_region "$BR_TMP/a/v1.img" 1023    # last region
change_region "$BR_TMP/b/v1.img" 300     # b changed behind a's back
cmp -s "$BR_TMP/a/v1.img" "$BR_TMP/b/v1.img" && die "the images should differ before the sync"

start_sites
check "blockrelay wait g --link b on a (compare, then resync of what differs)" \
  "$BR_BIN" wait g --link b --timeout 60 --config "${CFG[a]}"
same_images "after the checksum initial sync"
status_json a >"$BR_TMP/status-1.json" || fail "status --json of a"
l='.groups[0].downstream[0]'
assert_eq "the link is replicating" replicating "$(jq -r "$l.state" "$BR_TMP/status-1.json")"
assert_eq "the compare ran to the end" false "$(jq -r "$l.checksum_compare.running" "$BR_TMP/status-1.json")"
assert_eq "no compare is pending any more" false "$(jq -r "$l.checksum_compare.pending" "$BR_TMP/status-1.json")"
assert_eq "every region was compared" 1024 "$(jq -r "$l.checksum_compare.regions_done" "$BR_TMP/status-1.json")"
assert_eq "4 regions differed" 4 "$(jq -r "$l.checksum_compare.differing_regions" "$BR_TMP/status-1.json")"
assert_eq "1020 regions matched" 1020 "$(jq -r "$l.checksum_compare.matched_regions" "$BR_TMP/status-1.json")"
sent=$(jq -r "$l.resync_bytes_sent" "$BR_TMP/status-1.json")
assert_eq "resync sent exactly the 4 differing regions ($sent bytes)" $((4 * REGION)) "$sent"
assert_eq "the data sent is the resync's (bytes_sent)" $((4 * REGION)) "$(jq -r "$l.bytes_sent" "$BR_TMP/status-1.json")"
assert_true "a's log says what the compare found" \
  grep -q "digest compare finished: 1024 of 1024 region(s) compared, 1020 match" "${LOGF[a]}"

# ---- resync --full still sends every region.
check "blockrelay resync g --link b --full" "$BR_BIN" resync g --link b --full --config "${CFG[a]}"
check "blockrelay wait after the full resync" \
  "$BR_BIN" wait g --link b --timeout 60 --config "${CFG[a]}"
sent=$(link .resync_bytes_sent)
assert_true "resync --full sent the whole volume again ($sent bytes >= $((VOL_BYTES + 4 * REGION)))" \
  test "$sent" -ge $((VOL_BYTES + 4 * REGION))
same_images "after resync --full"

# ---- a restart does not compare again: the slot is not new any more.
site_stop a TERM
assert_eq "a exits 0 on SIGTERM" 0 "$?"
site_start a || die "a did not restart"
check "blockrelay wait after a's restart" \
  "$BR_BIN" wait g --link b --timeout 30 --config "${CFG[a]}"
assert_eq "no compare after a restart" null "$(link .checksum_compare)"
assert_eq "nothing resynced after a clean restart" 0 "$(link .resync_bytes_sent)"
same_images "after a's restart"
log "total $((SECONDS - T0))s"

br_finish
