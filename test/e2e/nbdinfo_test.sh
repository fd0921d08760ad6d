#!/usr/bin/env bash
# nbdinfo (libnbd) and nbd-client -l against a running blockrelay site:
# export listing, sizes, block status map, advertised capabilities, and the
# read-only export of a secondary group.
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd nbdinfo qemu-io

br_write_config --size 64MiB --secondary ro 16MiB
br_start

for uri in "$BR_URI" "$BR_URI_TCP"; do
  check "nbdinfo --list ($uri)" nbdinfo --list "$uri" &&
    { assert_contains "list shows export vol" 'export="vol"' "$BR_OUT"
      assert_contains "list shows export ro" 'export="ro"' "$BR_OUT"; }
done

check "nbdinfo --size vol" nbdinfo --size "$BR_URI" &&
  assert_eq "vol size is 64MiB" 67108864 "$(cat "$BR_OUT")"
check "nbdinfo --size ro" nbdinfo --size "$BR_SEC_URI_TCP" &&
  assert_eq "ro size is 16MiB" 16777216 "$(cat "$BR_OUT")"
check "nbdinfo --json" nbdinfo --json "$BR_URI_TCP" &&
  assert_eq "json names the export" vol "$(jq -r '.exports[0]["export-name"]' "$BR_OUT")"
check "base:allocation context offered" nbdinfo --json "$BR_URI" &&
  assert_eq "json lists base:allocation" true \
    "$(jq '[.exports[0].contexts[]] | index("base:allocation") != null' "$BR_OUT")"

# --- block status: write 2 MiB at 1 MiB and 1 MiB at 8 MiB, then map ------
check "write data with qemu-io" qemu-io -f raw \
  -c 'write -P 0x5a 1M 2M' -c 'write -P 0xa5 8M 1M' -c flush "$BR_URI"
check "nbdinfo --map" nbdinfo --map "$BR_URI_TCP"
cp "$BR_OUT" "$BR_TMP/map.txt"
echo "   map:"; sed 's/^/   | /' "$BR_TMP/map.txt"
# Lines: "START LENGTH TYPE DESCRIPTION", e.g. "1048576 2097152 0 data".
covered() { # is [lo,hi) inside one extent whose description matches $3?
  awk -v lo="$1" -v hi="$2" -v want="$3" \
    '$4 ~ want && $1 <= lo && $1 + $2 >= hi { ok = 1 } END { exit !ok }' "$BR_TMP/map.txt"
}
assert_true "map: [1M,3M) is data" covered 1048576 3145728 '^data'
assert_true "map: [8M,9M) is data" covered 8388608 9437184 '^data'
assert_true "map: [4M,8M) is a hole" covered 4194304 8388608 '^hole'
assert_true "map: the tail [32M,64M) is a hole" covered 33554432 67108864 '^hole'
total=$(awk '{ s += $2 } END { print s }' "$BR_TMP/map.txt")
assert_eq "map covers the whole export" 67108864 "$total"
check "nbdinfo --map --totals" nbdinfo --map --totals "$BR_URI" &&
  assert_contains "totals has a data line" data "$BR_OUT"

# --- capabilities -----------------------------------------------------------
for cap in flush fua trim zero multi-conn fast-zero cache df structured-reply write; do
  expect_rc 0 "nbdinfo --can $cap (vol)" nbdinfo --can "$cap" "$BR_URI"
done
expect_rc 2 "nbdinfo --is read-only (primary volume)" nbdinfo --is read-only "$BR_URI_TCP"
expect_rc 0 "nbdinfo --is read-only (secondary volume)" nbdinfo --is read-only "$BR_SEC_URI_TCP"
expect_rc 2 "nbdinfo --can write (secondary volume)" nbdinfo --can write "$BR_SEC_URI"
expect_rc 2 "nbdinfo --can trim (secondary volume)" nbdinfo --can trim "$BR_SEC_URI"
expect_rc 2 "nbdinfo --is rotational" nbdinfo --is rotational "$BR_URI"
if qemu-io -f raw -c 'write -P 0x11 0 4k' "$BR_SEC_URI" >"$BR_TMP/ro-write.out" 2>&1; then
  fail "a write to the secondary's read-only export succeeded"
else
  pass "a write to the secondary's read-only export is refused"
fi

check "nbdinfo on a missing export fails" bash -c "! nbdinfo --size 'nbd://127.0.0.1:$BR_PORT/nosuch'"

# --- nbd-client -l (NBD_OPT_LIST; needs no kernel module) ---------------------
if command -v nbd-client >/dev/null 2>&1; then
  check "nbd-client -l" nbd-client -l 127.0.0.1 "$BR_PORT" &&
    { assert_contains "nbd-client lists vol" "vol: " "$BR_OUT"
      assert_contains "nbd-client lists ro" "ro: " "$BR_OUT"; }
else
  log "nbd-client not installed: skipping nbd-client -l"
fi

# The status counters saw the writes.
br_status_json >"$BR_TMP/st.json"
written=$(jq '[.groups[].volumes[] | select(.name == "vol") | .bytes_written][0]' "$BR_TMP/st.json")
assert_true "status: bytes_written of vol >= 3MiB (got $written)" test "$written" -ge 3145728

br_finish
