#!/usr/bin/env bash
# A full disk on the downstream: site b's data_dir is a small tmpfs, so its
# journal runs out of space while a streams writes to it (async link).
# b closes the connection and refuses the group with an error naming the
# journal and the full disk; the writes on a go on, its link logs them in
# the scoreboard, nothing is lost. At a's next reconnect b opens the group
# again, without a restart (its journal's groups applied and the journal
# emptied, so it has room again; the operator also grows the disk): the
# link resyncs what changed and both sites hold the same bytes.
# Needs root (mount); skipped (77) otherwise.
source "$(dirname "$0")/lib.sh"
br_init "$@"
[ "$(id -u)" = 0 ] || skip "needs root (mount -t tmpfs)"
need_cmd sha256sum nbdcopy mount umount

SITES=(a b)
VOLS=(v)
VOL_SIZE=64MiB
source "$BR_E2E_DIR/sites_lib.sh"
pick_ports() { PORT[b]=$(br_free_port); }
write_configs() {
  write_config b secondary a '[]'
  write_config a primary "" "[$(link_json b async)]"
}

DATA_B=$BR_TMP/b/data
mkdir -p "$DATA_B"
mount -t tmpfs -o size=8m tmpfs "$DATA_B" || skip "cannot mount a tmpfs here"
# The sites first: b keeps files open on the tmpfs.
br_on_exit "stop_all; umount '$DATA_B'"

start_sites
check "b caught up (initial sync)" timeout 90 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 80

# 48 MiB of random data: far more than b's 8 MiB of journal space.
br_fill_random "$BR_TMP/data.bin" 0 48
check "nbdcopy of 48 MiB into a succeeds while b's disk fills" \
  timeout 120 nbdcopy "$BR_TMP/data.bin" "$(uri a v)"

# b's journal hit the full disk: it sent a the reason and closed the
# connection, and a logged in its scoreboard meanwhile (by now b may have
# taken the group back already: below).
assert_contains "b's log names the journal and the full disk" \
  "No space left on device" "${LOGF[b]}"
assert_true "b's log says which journal" grep -q "journal $DATA_B/journal-g.log" "${LOGF[b]}"
assert_contains "a's link dropped to logging" "link to b: replicating -> logging" "${LOGF[a]}"
assert_true "a's log carries b's reason" \
  grep -q "site b .*reported an error: .*No space left on device" "${LOGF[a]}"

# The operator makes room. b reopens the group at a's next reconnect (its
# journal replayed and emptied), without a restart, and a resyncs the rest.
mount -o remount,size=256m "$DATA_B" || die "cannot grow the tmpfs"
check "b caught up once its disk has room" timeout 120 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 100
assert_true "b is the process the test started (not restarted)" site_alive b
assert_contains "b's log says it opened the group again" "group g: opened again" "${LOGF[b]}"
assert_eq "b's group is consistent" true "$(jq_status b '.groups[0].upstream.consistent')"
stop_all
compare_images

br_finish
