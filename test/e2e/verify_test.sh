#!/usr/bin/env bash
# Online verify with two real blockrelay processes on loopback: a --async--> b,
# one group "g" with volumes v1 and v2. After a writes random data and b has
# caught up, `blockrelay verify` reports no mismatch (exit 0). One byte of
# b's v2 backing file is then changed behind blockrelay's back, and verify
# must report exactly that region of v2 (exit 1) -- also while fio keeps
# writing to v1 and v2 on a during the compare, so regions being written are
# not false mismatches. `verify --fix` marks it dirty, the link resyncs it,
# and a last verify and the sha256 of every backing file agree.
source "$(dirname "$0")/lib.sh"
br_init "$@"
need_cmd sha256sum
command -v fio >/dev/null 2>&1 || skip "fio is not installed"
fio --enghelp=nbd >/dev/null 2>&1 || skip "this fio has no nbd engine"

SITES=(a b)
VOLS=(v1 v2)
VOL_SIZE=64MiB
source "$BR_E2E_DIR/sites_lib.sh"
# Replication port of b; picked again if taken when a site starts.
pick_ports() { PORT[b]=$(br_free_port); }
write_configs() {
  write_config b secondary a '[]'
  write_config a primary "" "[$(link_json b async)]"
}
same_images() {
  local v
  for v in "${VOLS[@]}"; do
    [ "$(sha256sum <"$BR_TMP/a/$v.img")" = "$(sha256sum <"$BR_TMP/b/$v.img")" ] || return 1
  done
}
verify() { timeout -k 5 120 "$BR_BIN" verify g --link b --config "${CFG[a]}" "$@"; }

start_sites
# New slot for b starts all dirty: the initial resync makes b identical.
for v in "${VOLS[@]}"; do
  check "random data into $v on a" timeout 60 fio --ioengine=nbd --eta=never \
    --name=fill --uri="$(uri a "$v")" --rw=write --bs=1M --iodepth=4 --size=16M
done
check "b caught up" timeout 60 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 50
assert_true "backing files identical after catch-up" same_images

OUT=$BR_TMP/verify.out
verify >"$OUT" 2>&1; rc=$?
assert_eq "verify of identical sites exits 0" 0 "$rc"
assert_contains "verify reports no mismatch" "0 mismatching" "$OUT"

# Change one byte of region 37 of v2 on b (64 KiB regions), behind its back.
REGION=37
printf '\x5a' | dd of="$BR_TMP/b/v2.img" bs=1 seek=$((REGION * 65536 + 1234)) conv=notrunc status=none
cmp -s "$BR_TMP/a/v2.img" "$BR_TMP/b/v2.img" && die "the corruption did not change b's file"

# fio keeps writing on a (both volumes) while verify runs.
timeout -k 5 60 fio --ioengine=nbd --eta=never --name=busy1 --uri="$(uri a v1)" \
  --rw=randwrite --bs=4k --iodepth=8 --size=16M --time_based --runtime=8 --rate=8m \
  >"$BR_TMP/fio-busy1.out" 2>&1 &
FIO1=$!
timeout -k 5 60 fio --ioengine=nbd --eta=never --name=busy2 --uri="$(uri a v2)" \
  --rw=randwrite --bs=4k --iodepth=8 --offset=4M --size=8M --time_based --runtime=8 --rate=8m \
  >"$BR_TMP/fio-busy2.out" 2>&1 &
FIO2=$!
sleep 1
verify --json >"$OUT" 2>"$BR_TMP/verify.err"; rc=$?; cat "$BR_TMP/verify.err" | tail -3; jq -c "del(.mismatches)" "$OUT"
assert_eq "verify with a corrupted byte exits 1" 1 "$rc"
assert_eq "exactly one mismatching region" 1 "$(jq -r .mismatched_regions "$OUT")"
assert_eq "it is v2" v2 "$(jq -r '.mismatches[0].volume' "$OUT")"
assert_eq "it is region $REGION" "$REGION" "$(jq -r '.mismatches[0].region' "$OUT")"
assert_eq "mismatched bytes = one region" 65536 "$(jq -r .mismatched_bytes "$OUT")"
assert_true "fio was still writing during the verify" kill -0 "$FIO1"
wait "$FIO1"; assert_eq "fio on v1 succeeded" 0 "$?"
wait "$FIO2"; assert_eq "fio on v2 succeeded" 0 "$?"

verify --fix >"$OUT" 2>&1; rc=$?
assert_eq "verify --fix exits 0" 0 "$rc"
assert_contains "verify --fix marks the region for resync" "marked dirty" "$OUT"
check "b caught up after the fix" timeout 60 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 50
verify >"$OUT" 2>&1; rc=$?
assert_eq "verify after the fix exits 0" 0 "$rc"
assert_true "backing files identical after the fix" same_images

# Usage errors: unknown link, unknown group.
expect_rc 1 "verify of an unknown link fails" \
  timeout 20 "$BR_BIN" verify g --link nosuch --config "${CFG[a]}"
expect_rc 1 "verify of an unknown group fails" \
  timeout 20 "$BR_BIN" verify nosuch --link b --config "${CFG[a]}"

br_finish
