#!/usr/bin/env bash
# Graceful shutdown: SIGTERM while fio is writing makes the daemon finish the
# requests in flight, flush and exit 0 within a bound; data written and
# flushed before is on disk and reads back after a restart. Also SIGINT with
# an idle client that keeps its connection open.
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd fio nbdcopy cmp
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"
PY=/usr/bin/python3
STOP_BOUND=10   # seconds the daemon may take to exit after a signal
MiB=$((1 << 20))

br_write_config --size 256MiB
br_start

# 1. Known data, flushed before the signal:
#    16 MiB of random bytes at offset 0 (nbdcopy --flush), and 32 MiB at
#    16M written by fio with crc32c verify headers and a final fsync.
KNOWN=$BR_TMP/known.img
br_fill_random "$KNOWN" 0 16
check "write 16 MiB of known data with nbdcopy --flush" nbdcopy --flush "$KNOWN" "$BR_URI"
FIO_VERIFY=(--name=known --ioengine=nbd --rw=write --bs=64k --offset=16M --size=32M
            --iodepth=8 --verify=crc32c --verify_fatal=1 --eta=never)
check "fio writes 32 MiB with verify headers, end_fsync" \
  fio "${FIO_VERIFY[@]}" --uri="$BR_URI_TCP" --do_verify=0 --end_fsync=1

# 2. A writer that keeps going: 2 fio jobs of random writes over 64M..256M.
fio --name=load --ioengine=nbd --uri="$BR_URI_TCP" --rw=randwrite --bs=16k \
  --offset=64M --size=96M --offset_increment=96M --numjobs=2 --iodepth=32 \
  --time_based --runtime=120 --eta=never >"$BR_TMP/fio-load.out" 2>&1 </dev/null &
FIO_PID=$!
br_on_exit "kill $FIO_PID 2>/dev/null; wait $FIO_PID 2>/dev/null; true"
written() { br_status_json | jq '[.groups[].volumes[].bytes_written] | add'; }
before=$(written)
deadline=$((SECONDS + 20))
while [ $SECONDS -lt $deadline ]; do
  now=$(written)
  [ -n "$now" ] && [ "$now" -gt $((before + 32 * MiB)) ] && break
  sleep 0.2
done
assert_true "fio load is writing (bytes_written grew to $now from $before)" \
  test "${now:-0}" -gt $((before + 32 * MiB))
assert_true "fio load still running when the signal comes" kill -0 "$FIO_PID"

# 3. SIGTERM under load.
br_stop TERM
assert_eq "daemon exits 0 after SIGTERM under load" 0 "$BR_EXIT"
assert_true "daemon exited within ${STOP_BOUND}s (took ${BR_STOP_SECONDS}s)" \
  test "$BR_STOP_SECONDS" -le "$STOP_BOUND"
deadline=$((SECONDS + 30))
while kill -0 "$FIO_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
assert_true "fio noticed the server going away and ended" bash -c "! kill -0 $FIO_PID 2>/dev/null"
kill "$FIO_PID" 2>/dev/null
wait "$FIO_PID" 2>/dev/null

# 4. The flushed data is in the backing file, and reads back after a restart.
check "backing file holds the 16 MiB flushed before the signal" \
  cmp -n $((16 * MiB)) "$KNOWN" "$BR_IMG"
br_start
check "read back over NBD after restart" nbdcopy "$BR_URI" "$BR_TMP/back.img"
check "16 MiB of known data read back after restart" \
  cmp -n $((16 * MiB)) "$KNOWN" "$BR_TMP/back.img"
check "fio --verify_only of the 32 MiB written with verify headers" \
  fio "${FIO_VERIFY[@]}" --uri="$BR_URI" --verify_only

# 5. SIGINT while an idle client holds a connection open: the daemon must
#    not wait for the client to leave.
"$PY" -c '
import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pread(4096, 0)
print("connected", flush=True)
time.sleep(120)
' "$BR_URI" >"$BR_TMP/idle.out" 2>&1 </dev/null &
IDLE_PID=$!
br_on_exit "kill $IDLE_PID 2>/dev/null; wait $IDLE_PID 2>/dev/null; true"
deadline=$((SECONDS + 10))
until grep -q connected "$BR_TMP/idle.out" || [ $SECONDS -ge $deadline ]; do sleep 0.1; done
assert_contains "idle client connected" connected "$BR_TMP/idle.out"
clients=$(br_status_json | jq '.nbd_connections')
assert_eq "status shows the idle client" 1 "$clients"
br_stop INT
assert_eq "daemon exits 0 after SIGINT with an idle client" 0 "$BR_EXIT"
assert_true "daemon exited within ${STOP_BOUND}s (took ${BR_STOP_SECONDS}s)" \
  test "$BR_STOP_SECONDS" -le "$STOP_BOUND"
kill "$IDLE_PID" 2>/dev/null
wait "$IDLE_PID" 2>/dev/null

# 6. And it starts again cleanly on the same files and sockets.
br_start
check "serves after the SIGINT restart" cmp -n $((16 * MiB)) "$KNOWN" <(nbdcopy "$BR_URI" -)
br_stop TERM
assert_eq "idle daemon exits 0 after SIGTERM" 0 "$BR_EXIT"

br_finish
