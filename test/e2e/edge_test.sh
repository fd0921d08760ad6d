#!/usr/bin/env bash
# Protocol edge cases through python3-libnbd and raw sockets:
#   test/tools/nbd_edge.py       libnbd edge cases (bounds, flags, DF, block status)
#   test/tools/nbd_multiconn.py  flush/FUA visibility across connections
#   test/tools/nbd_raw_probe.py  options and requests libnbd refuses to send
#   test/tools/nbd_abuse.py      misbehaving clients while a good one keeps working
# python3-libnbd is a Debian package for /usr/bin/python3, so that is the
# interpreter used whatever python3 comes first in PATH.
source "$(dirname "$0")/lib.sh"
br_init "$@"
PY=/usr/bin/python3
[ -x "$PY" ] || die "$PY is missing"
"$PY" -c 'import nbd' 2>/dev/null || die "python3-libnbd is missing for $PY (run scripts/install-deps.sh)"

br_write_config --size 128MiB --secondary ro 16MiB
br_start

for uri in "$BR_URI_TCP" "$BR_URI"; do
  check "nbd_edge.py ($uri)" "$PY" "$BR_TOOLS_DIR/nbd_edge.py" "$uri" &&
    assert_contains "nbd_edge.py: FAILURES: 0" "FAILURES: 0" "$BR_OUT"
done
check "nbd_multiconn.py, 3 connections (tcp)" "$PY" "$BR_TOOLS_DIR/nbd_multiconn.py" "$BR_URI_TCP" 3 &&
  assert_contains "multi-conn consistency OK (3)" "multi-conn consistency: OK" "$BR_OUT"
check "nbd_multiconn.py, 4 connections (unix)" "$PY" "$BR_TOOLS_DIR/nbd_multiconn.py" "$BR_URI" 4 &&
  assert_contains "multi-conn consistency OK (4)" "multi-conn consistency: OK" "$BR_OUT"

for target in "127.0.0.1 $BR_PORT" "unix:$BR_SOCK"; do
  # shellcheck disable=SC2086 # $target is "HOST PORT" or "unix:PATH"
  check "nbd_raw_probe.py ($target)" "$PY" "$BR_TOOLS_DIR/nbd_raw_probe.py" $target vol
  out=$BR_TMP/probe.out; cp "$BR_OUT" "$out"
  assert_contains "unknown option -> ERR_UNSUP" "unknown option 0x7654321  -> ['ERR_UNSUP']" "$out"
  assert_contains "OPT_LIST -> one SERVER reply per export, ACK" "NBD_OPT_LIST              -> ['SERVER', 'SERVER', 'ACK']" "$out"
  assert_contains "OPT_LIST with data -> ERR_INVALID" "NBD_OPT_LIST with data    -> ['ERR_INVALID']" "$out"
  assert_contains "GO -> ACK" "GO -> ACK" "$out"
  assert_contains "INFO_EXPORT size" "INFO_EXPORT size=134217728" "$out"
  assert_contains "unknown command -> EINVAL" "unknown command 0x42      -> ('simple', 22, 7)" "$out"
  assert_contains "READ after it works" "READ 512 (simple)         -> ('simple', 0, 8)" "$out"
  assert_contains "FLUSH works" "FLUSH                     -> ('simple', 0, 9)" "$out"
  assert_contains "bad request magic -> disconnect" "bad request magic         -> connection closed" "$out"
done

check "nbd_abuse.py (tcp)" "$PY" "$BR_TOOLS_DIR/nbd_abuse.py" "127.0.0.1:$BR_PORT" vol ro
check "nbd_abuse.py (unix)" "$PY" "$BR_TOOLS_DIR/nbd_abuse.py" "unix:$BR_SOCK" vol ro

# After all of that the daemon still serves and stops cleanly.
expect_rc 0 "daemon still answers status" "$BR_BIN" status --config "$BR_CONFIG"
check "a fresh client still works" nbdinfo --size "$BR_URI_TCP"
br_status_json >"$BR_TMP/st.json"
assert_eq "no NBD connections left open" 0 "$(jq '.nbd_connections' "$BR_TMP/st.json")"
br_stop
assert_eq "daemon exits 0 on SIGTERM" 0 "$BR_EXIT"

br_finish
