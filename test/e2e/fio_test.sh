#!/usr/bin/env bash
# fio's nbd engine (libnbd, one connection per job) against blockrelay:
# random writes verified with crc32c by several jobs at once, random r/w
# load, trims, and writes with fsync (-> NBD FLUSH).
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd fio qemu-io
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"

br_write_config --size 256MiB
br_start

# fio_check NAME FIO-ARGS...: fio must exit 0 and report no error or
# verify failure for any job.
fio_check() {
  local name=$1; shift
  check "$name" fio --ioengine=nbd --eta=never "$@"
  local out=$BR_OUT
  if grep -qE 'err= *[1-9]' "$out"; then
    fail "$name: a job reported an error"; grep -E 'err=' "$out" | sed 's/^/   | /'
  fi
  assert_not_contains "$name: no verify failure" "verify failed" "$out"
  assert_not_contains "$name: no bad verify header" "bad magic" "$out"
  assert_not_contains "$name: no verify error" "verify: bad" "$out"
}

# 1. Two jobs, each random-writing its own 64 MiB with crc32c headers, then
#    reading everything back and verifying (verify_fatal: stop at the first
#    bad block). Over TCP, and over the Unix socket with another block size.
fio_check "randwrite 4k QD16 x2 jobs, verify=crc32c (tcp)" \
  --name=vw1 --uri="$BR_URI_TCP" --rw=randwrite --bs=4k --size=64M \
  --iodepth=16 --numjobs=2 --offset_increment=64M \
  --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting
fio_check "randwrite 16k QD32 x2 jobs, verify=crc32c (unix)" \
  --name=vw2 --uri="$BR_URI" --rw=randwrite --bs=16k --size=32M \
  --iodepth=32 --numjobs=2 --offset=128M --offset_increment=32M \
  --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting
# Mixed block sizes, unaligned to the preferred block size.
fio_check "randwrite 512B..64k mixed, verify=crc32c" \
  --name=vw3 --uri="$BR_URI" --rw=randwrite --bsrange=512-64k --bs_unaligned=1 \
  --size=16M --offset=192M --iodepth=8 \
  --verify=crc32c --verify_fatal=1 --do_verify=1

# 2. Random read/write load on two connections for a few seconds.
fio_check "randrw 64k QD32 x2 jobs, 5s" \
  --name=rw --uri="$BR_URI_TCP" --rw=randrw --bs=64k --size=128M \
  --iodepth=32 --numjobs=2 --time_based --runtime=5 --group_reporting

# 3. Trims: fill 64 MiB at 128M with data, then trim every 64 KiB block of it
#    in random order. blockrelay punches holes, so the range reads as zeroes.
check "fill 128M..192M with 0x6b" qemu-io -f raw -c 'write -P 0x6b 128M 64M' -c flush "$BR_URI"
fio_check "randtrim 64k QD8 over 64 MiB" \
  --name=trim --uri="$BR_URI" --rw=randtrim --bs=64k --offset=128M --size=64M --iodepth=8
check "trimmed range reads as zeroes" qemu-io -f raw -c 'read -P 0 128M 64M' "$BR_URI_TCP"
assert_not_contains "trimmed range: no pattern mismatch" "Pattern verification failed" "$BR_OUT"

# 4. Sequential writes with an fsync (NBD FLUSH) every 4 writes, verified.
fio_check "write 64k QD8 fsync=4, verify=crc32c" \
  --name=fsync --uri="$BR_URI_TCP" --rw=write --bs=64k --size=16M --offset=224M \
  --iodepth=8 --fsync=4 --verify=crc32c --verify_fatal=1 --do_verify=1
# (fio's nbd engine supports fsync but not fdatasync, which fails with EINVAL
# inside fio before anything is sent.)
fio_check "randwrite 4k QD1 fsync=1, verify=crc32c" \
  --name=fsync1 --uri="$BR_URI" --rw=randwrite --bs=4k --size=4M --offset=240M \
  --iodepth=1 --fsync=1 --verify=crc32c --verify_fatal=1 --do_verify=1

br_status_json >"$BR_TMP/st.json"
flushes=$(jq '[.groups[].volumes[] | select(.name == "vol") | .flushes][0] // 0' "$BR_TMP/st.json")
assert_true "status counts the flushes (got $flushes)" test "$flushes" -gt 0
errors=$(jq '[.groups[].volumes[] | select(.name == "vol") | .errors][0] // 0' "$BR_TMP/st.json")
assert_eq "status counts no volume errors" 0 "$errors"

br_finish
