#!/usr/bin/env bash
# A volume whose backing file was replaced (another inode) is refused at
# start-up with a message that names the way out, and
# `blockrelay run --accept-backing-change NAME` is that way: the site starts,
# keeps the scoreboard, records the new file, and later starts need no flag.
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd qemu-io cmp

br_write_config --size 16MiB
br_start
check "write a pattern" qemu-io -f raw -c "write -P 0x5a 0 1M" -c flush "$BR_URI"
br_stop
assert_eq "the site stops cleanly" 0 "$BR_EXIT"

# The same bytes in a new file (a restore from a copy): another inode.
cp "$BR_IMG" "$BR_IMG.copy" && mv "$BR_IMG.copy" "$BR_IMG"
expect_rc 1 "run refuses a replaced backing file" \
  "$BR_BIN" run --config "$BR_CONFIG"
assert_contains "the refusal says the backing is not the one of the metadata" \
  "is not the one this volume's metadata was made for" "$BR_OUT"
assert_contains "the refusal names the option and the volume" \
  "--accept-backing-change $BR_VOL" "$BR_OUT"
expect_rc 1 "run refuses --accept-backing-change of a volume the config lacks" \
  "$BR_BIN" run --config "$BR_CONFIG" --accept-backing-change nosuch
assert_contains "that refusal names the volume" "nosuch" "$BR_OUT"

BR_RUN_ARGS=(--accept-backing-change "$BR_VOL")
br_start
assert_contains "the log says the change was accepted" "accepted as the same data" "$BR_LOG"
check "the data is still there" qemu-io -f raw -c "read -P 0x5a 0 1M" "$BR_URI"
br_stop
assert_eq "the site stops cleanly" 0 "$BR_EXIT"

BR_RUN_ARGS=()
br_start   # the new file is the recorded one now: no flag needed
br_stop
assert_eq "a later start needs no flag" 0 "$BR_EXIT"
br_finish
