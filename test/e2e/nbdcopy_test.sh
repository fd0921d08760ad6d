#!/usr/bin/env bash
# nbdcopy (libnbd) round trips through blockrelay: file -> export -> file,
# single and multi-connection (-C 4, which nbdcopy uses only when the server
# advertises CAN_MULTI_CONN), over the Unix socket and TCP.
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd nbdcopy nbdinfo sha256sum cmp

br_write_config --size 128MiB
br_start
SIZE=$((128 << 20))

# Source images: random data with holes (nbdcopy sends holes as zeroes or
# trims), different content each so that a stale export cannot pass.
SRC1=$BR_TMP/src1.img
SRC2=$BR_TMP/src2.img
truncate -s "$SIZE" "$SRC1" "$SRC2"
br_fill_random "$SRC1" 0 4;  br_fill_random "$SRC1" 20 4; br_fill_random "$SRC1" 127 1
br_fill_random "$SRC2" 1 7;  br_fill_random "$SRC2" 33 9; br_fill_random "$SRC2" 100 20

check "nbdcopy --flush file -> export (unix)" nbdcopy --flush "$SRC1" "$BR_URI"
check "nbdcopy export -> file (tcp)" nbdcopy "$BR_URI_TCP" "$BR_TMP/out1.img"
check "round trip is byte-identical" cmp "$SRC1" "$BR_TMP/out1.img"
check "nbdcopy --synchronous export -> file" nbdcopy --synchronous "$BR_URI" "$BR_TMP/out1s.img"
check "synchronous copy is byte-identical" cmp "$SRC1" "$BR_TMP/out1s.img"

expect_rc 0 "server advertises multi-conn" nbdinfo --can multi-conn "$BR_URI"
check "nbdcopy -C 4 -R 16 1MiB requests --flush file -> export (tcp)" \
  nbdcopy -C 4 -R 16 --request-size=1048576 --flush "$SRC2" "$BR_URI_TCP"
check "nbdcopy -C 4 export -> file (unix)" nbdcopy -C 4 "$BR_URI" "$BR_TMP/out2.img"
check "multi-conn round trip is byte-identical" cmp "$SRC2" "$BR_TMP/out2.img"

want=$(sha256sum <"$SRC2" | cut -d' ' -f1)
got=$(timeout "$BR_CMD_TIMEOUT" nbdcopy "$BR_URI_TCP" - | sha256sum | cut -d' ' -f1)
assert_eq "sha256 of the export streamed to stdout matches" "$want" "$got"
check "nbdcopy export -> null:" nbdcopy "$BR_URI" null:

# Small request size and many requests in flight on several connections.
check "nbdcopy -C 2 -R 64 64KiB requests file -> export" \
  nbdcopy -C 2 -R 64 --request-size=65536 --flush "$SRC1" "$BR_URI"
got=$(timeout "$BR_CMD_TIMEOUT" nbdcopy -C 3 "$BR_URI" - | sha256sum | cut -d' ' -f1)
assert_eq "sha256 after the small-request copy matches" "$(sha256sum <"$SRC1" | cut -d' ' -f1)" "$got"

# The backing file holds exactly what was copied once the daemon has stopped.
br_stop
assert_eq "daemon exits 0 on SIGTERM" 0 "$BR_EXIT"
check "backing file equals the last source" cmp "$SRC1" "$BR_IMG"

br_finish
