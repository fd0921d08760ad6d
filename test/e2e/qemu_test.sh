#!/usr/bin/env bash
# qemu-img and qemu-io (QEMU's NBD client) against blockrelay: convert a
# reference image with random data and holes into the export, compare,
# pattern writes/reads incl. FUA, write-zeroes, discard, aio + flush, and
# block status through qemu-img map.
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd qemu-img qemu-io

br_write_config --size 64MiB
br_start
SIZE=$((64 << 20))

# Reference image: 64 MiB, random data in a few places, holes in between,
# one region of explicit zeroes (allocated but zero).
REF=$BR_TMP/ref.img
truncate -s "$SIZE" "$REF"
br_fill_random "$REF" 0 3
br_fill_random "$REF" 10 5
br_fill_random "$REF" 40 1
dd if=/dev/zero of="$REF" bs=1M seek=20 count=2 conv=notrunc status=none
br_fill_random "$REF" 63 1

# Dirty the whole export first so that holes in the reference must really be
# written as zeroes by the client and the server.
check "fill the export with 0xff" qemu-io -f raw -c "write -P 0xff 0 $SIZE" -c flush "$BR_URI"

check "qemu-img info" qemu-img info -f raw --output=json "$BR_URI_TCP" &&
  assert_eq "qemu-img sees the size" "$SIZE" "$(jq '.["virtual-size"]' "$BR_OUT")"
check "qemu-img convert -n reference -> export" \
  qemu-img convert -p -n -f raw -O raw "$REF" "$BR_URI_TCP"
check "qemu-img compare reference vs export (tcp)" qemu-img compare -f raw -F raw "$REF" "$BR_URI_TCP" &&
  assert_contains "compare says identical" "Images are identical" "$BR_OUT"
check "qemu-img compare reference vs export (unix)" qemu-img compare -f raw -F raw "$REF" "$BR_URI"
check "qemu-img convert export -> qcow2" \
  qemu-img convert -f raw -O qcow2 "$BR_URI" "$BR_TMP/back.qcow2"
check "qemu-img compare reference vs qcow2 copy" \
  qemu-img compare -f raw -F qcow2 "$REF" "$BR_TMP/back.qcow2"

# A compare must also notice a difference (guards against a vacuous pass).
check "change one byte through qemu-io" qemu-io -f raw -c 'write -P 0x42 5M 1' "$BR_URI"
expect_rc 1 "qemu-img compare notices the changed byte" \
  qemu-img compare -f raw -F raw "$REF" "$BR_URI"

# Pattern I/O: the recipe of nbd-protocol.md section 3 plus a few more.
check "qemu-io pattern writes/reads (FUA, zero, discard, aio, flush)" \
  qemu-io -f raw -t writeback \
  -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' \
  -c 'write -f -P 0x5a 1M 64k' -c 'read -P 0x5a 1M 64k' \
  -c 'write -P 0x11 4097 1000' -c 'read -P 0x11 4097 1000' -c 'read -P 0xab 0 4097' \
  -c 'write -z 2M 1M' -c 'read -P 0 2M 1M' \
  -c 'write -z -u 3M 1M' -c 'read -P 0 3M 1M' \
  -c 'discard 4M 1M' -c 'flush' \
  -c 'aio_write -P 0x22 8M 128k' -c 'aio_write -P 0x33 9M 128k' -c 'aio_flush' \
  -c 'read -P 0x22 8M 128k' -c 'read -P 0x33 9M 128k' \
  -c 'write -f -z 12M 64k' -c 'read -P 0 12M 64k' \
  -c 'write -P 0x77 63M 1M' -c 'read -P 0x77 63M 1M' \
  -c 'writev -P 0x44 16M 4k 8k 4k' -c 'readv -P 0x44 16M 16k' \
  "$BR_URI_TCP"
# qemu-io exits 0 even when a pattern check fails in some versions; look at
# its output too.
assert_not_contains "qemu-io reported no pattern mismatch" "Pattern verification failed" "$BR_OUT"
assert_not_contains "qemu-io reported no failed request" "failed:" "$BR_OUT"

# A separate connection sees everything the previous one wrote.
check "qemu-io reads back on a new connection" qemu-io -f raw \
  -c 'read -P 0xab 0 4097' -c 'read -P 0x5a 1M 64k' -c 'read -P 0x11 4097 1000' \
  -c 'read -P 0 2M 2M' -c 'read -P 0x22 8M 128k' -c 'read -P 0x33 9M 128k' \
  -c 'read -P 0x77 63M 1M' "$BR_URI"
assert_not_contains "no pattern mismatch on the new connection" "Pattern verification failed" "$BR_OUT"

if qemu-io -f raw -c "read -P 0 $SIZE 512" "$BR_URI" >"$BR_TMP/past-end.out" 2>&1 &&
   ! grep -q "failed" "$BR_TMP/past-end.out"; then
  fail "qemu-io read past the end should fail"
else
  pass "qemu-io read past the end fails"
fi

# Block status: the discarded 4M..5M range and the zeroed 2M..4M range
# (unmapping allowed) read as zero; data exists too.
check "qemu-img map --output=json" qemu-img map -f raw --output=json "$BR_URI_TCP"
cp "$BR_OUT" "$BR_TMP/map.json"
assert_eq "map has data extents" true "$(jq 'any(.[]; .data == true)' "$BR_TMP/map.json")"
assert_eq "map has zero extents" true "$(jq 'any(.[]; .zero == true)' "$BR_TMP/map.json")"
assert_eq "map: the discarded range 4M..5M reads as zero" true \
  "$(jq 'any(.[]; .zero == true and .start <= 4194304 and .start + .length >= 5242880)' "$BR_TMP/map.json")"
assert_eq "map: 0..1M is data" true \
  "$(jq 'any(.[]; .data == true and .start <= 0 and .start + .length >= 1048576)' "$BR_TMP/map.json")"
assert_eq "map covers the whole export" "$SIZE" "$(jq '[.[].length] | add' "$BR_TMP/map.json")"
check "qemu-img map (human)" qemu-img map -f raw "$BR_URI"

# Everything must still be there after a restart of the daemon.
check "checksum before restart" bash -c "qemu-img convert -f raw -O raw '$BR_URI' '$BR_TMP/before.img'"
br_stop; assert_eq "daemon exits 0 on SIGTERM" 0 "$BR_EXIT"
br_start
check "qemu-img compare after restart" qemu-img compare -f raw -F raw "$BR_TMP/before.img" "$BR_URI_TCP"

br_finish
