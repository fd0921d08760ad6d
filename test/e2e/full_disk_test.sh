#!/usr/bin/env bash
# A full disk on the downstream: site b's volume lives on a 16 MiB tmpfs
# (the volume is 64 MiB, sparse), so applying a's stream of 48 MiB runs out
# of space. b closes the connection and then refuses the group, naming the
# full disk; a's writes go on, its link logs them in the scoreboard, nothing
# is lost. Each reconnect of a makes b try to open the group again (its
# journal replayed): that fails while the disk is full, and works once the
# operator makes room (the tmpfs grows), without a restart of b. The link
# then resyncs what changed and both sites hold the same bytes.
# Needs root (mount); skipped (77) otherwise.
source "$(dirname "$0")/lib.sh"
br_init "$@"
[ "$(id -u)" = 0 ] || skip "needs root (mount -t tmpfs)"
need_cmd sha256sum nbdcopy mount umount

SITES=(a b)
VOLS=(v)
VOL_SIZE=64MiB
source "$BR_E2E_DIR/sites_lib.sh"

VOL_DIR_B=$BR_TMP/b-volume
IMG_B=$VOL_DIR_B/v.img
pick_ports() { PORT[b]=$(br_free_port); }
write_configs() {
  write_config b secondary a '[]'
  # b's volume on the small tmpfs; its data_dir (journal) stays on disk.
  jq --arg p "$IMG_B" '.groups[0].volumes[0].path = $p' "${CFG[b]}" >"${CFG[b]}.new" &&
    mv "${CFG[b]}.new" "${CFG[b]}" || die "could not edit ${CFG[b]}"
  write_config a primary "" "[$(link_json b async)]"
}

mkdir -p "$VOL_DIR_B"
mount -t tmpfs -o size=16m tmpfs "$VOL_DIR_B" || skip "cannot mount a tmpfs here"
# The sites first: b keeps its volume open on the tmpfs.
br_on_exit "stop_all; umount '$VOL_DIR_B'"

start_sites
check "b caught up (initial sync)" timeout 90 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 80

br_fill_random "$BR_TMP/data.bin" 0 48
check "nbdcopy of 48 MiB into a succeeds while b's disk fills" \
  timeout 120 nbdcopy "$BR_TMP/data.bin" "$(uri a v)"

b_log_has() { grep -q -- "$1" "${LOGF[b]}"; }
wait_for "b fails applying to its volume: the disk is full" 60 \
  b_log_has "pwrite $IMG_B at [0-9]*: No space left on device"
wait_for "b tries to open the group again and fails while the disk is full" 60 \
  b_log_has "group g: still cannot apply writes: No space"
wait_for "a's link is logging, with b's reason" 30 \
  bash -c "timeout 10 '$BR_BIN' status --json --config '${CFG[a]}' | jq -e '
    .groups[0].downstream[0].state == \"logging\" and
    (.groups[0].downstream[0].last_error | test(\"No space left on device\"))' >/dev/null"
DIRTY=$(jq_status a '[.groups[0].volumes[].links[].dirty_bytes] | add')
assert_true "a keeps what b lacks dirty in its scoreboard ($DIRTY bytes)" test "${DIRTY:-0}" -gt 0
expect_rc 1 "wait times out while b's disk is full" \
  timeout 20 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 2

# The operator makes room: at a's next reconnect b opens the group.
mount -o remount,size=128m "$VOL_DIR_B" || die "cannot grow the tmpfs"
check "b caught up once its disk has room" timeout 120 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 100
assert_true "b is the process the test started (not restarted)" site_alive b
assert_contains "b's log says it opened the group again" "group g: opened again" "${LOGF[b]}"
assert_eq "b's group is consistent" true "$(jq_status b '.groups[0].upstream.consistent')"
stop_all
assert_eq "b's volume equals a's" "$(sha256sum <"$BR_TMP/a/v.img")" "$(sha256sum <"$IMG_B")"

br_finish
