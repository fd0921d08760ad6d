#!/usr/bin/env bash
# A WAN cut and heal under load: a --sync--> b through test/tools/link_proxy
# (which adds delay and can cut the connection on command), one group "g"
# with volumes v1 and v2. fio writes with verify=crc32c on a while the proxy
# cuts the link: writes on a go on (on_sync_failure "logging"), a's link
# drops to logging with the changed regions dirty, and `wait` times out.
# After `heal` the link reconnects by itself (back-off), resyncs only what
# changed, returns to replicating, and every backing file is identical on a
# and b.
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
  write_config a primary "" "[$(link_json b sync)]"
}

PROXY=${LINK_PROXY:-$(dirname "$BR_BIN")/test/tools/link_proxy}
[ -x "$PROXY" ] || die "link_proxy is not built at $PROXY (cmake --build BUILD --target link_proxy)"
command -v jq >/dev/null 2>&1 || skip "jq is not installed"

same_images() {
  local v
  for v in "${VOLS[@]}"; do
    [ "$(sha256sum <"$BR_TMP/a/$v.img")" = "$(sha256sum <"$BR_TMP/b/$v.img")" ] || return 1
  done
}
proxy_cmd() { python3 - "$BR_TMP/proxy.sock" "$1" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
s.sendall((sys.argv[2] + "\n").encode()); print(s.makefile().readline().strip())
PY
}

# The proxy forwards to b's replication port, which start_sites picks: start
# it after the ports are known. Pick b's port first, then the proxy's.
PROXY_PORT=$(br_free_port)
LINK_ADDR[b]=127.0.0.1:$PROXY_PORT
pick_ports
"$PROXY" --listen "127.0.0.1:$PROXY_PORT" --target "127.0.0.1:${PORT[b]}" --delay-ms 2 \
  --control "$BR_TMP/proxy.sock" >"$BR_TMP/proxy.log" 2>&1 &
PROXY_PID=$!
stop_proxy() { kill "$PROXY_PID" 2>/dev/null; wait "$PROXY_PID" 2>/dev/null; }
br_on_exit stop_proxy
for _ in $(seq 100); do [ -S "$BR_TMP/proxy.sock" ] && break; sleep 0.1; done
[ -S "$BR_TMP/proxy.sock" ] || die "link_proxy did not start"
pick_ports() { :; }  # keep the port the proxy forwards to
start_sites

check "b caught up (initial sync through the proxy)" \
  timeout 90 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 80

timeout -k 5 120 fio --ioengine=nbd --eta=never --name=w --uri="$(uri a v1)" \
  --rw=randwrite --bs=4k --iodepth=8 --size=16M --time_based --runtime=6 \
  --verify=crc32c --verify_fatal=1 >"$BR_TMP/fio.out" 2>&1 &
FIO=$!
sleep 1.5
assert_contains "proxy cuts the link" "ok cut" <(proxy_cmd cut)
wait_for "a's link to b drops to logging" 30 \
  bash -c "timeout 10 '$BR_BIN' status --json --config '${CFG[a]}' | jq -e '.groups[0].downstream[0].state == \"logging\"' >/dev/null"
expect_rc 1 "wait times out while the link is cut" \
  timeout 20 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 1
wait "$FIO"; assert_eq "fio on a succeeded while the link was cut" 0 "$?"
DIRTY=$(timeout 10 "$BR_BIN" status --json --config "${CFG[a]}" | jq '[.groups[0].volumes[].links[].dirty_bytes] | add')
assert_true "writes during the cut are dirty in the scoreboard ($DIRTY bytes)" test "${DIRTY:-0}" -gt 0
SENT0=$(timeout 10 "$BR_BIN" status --json --config "${CFG[a]}" | jq '.groups[0].downstream[0].resync_bytes_sent')

assert_contains "proxy heals the link" "ok healed" <(proxy_cmd heal)
check "b caught up after the heal" timeout 90 "$BR_BIN" wait g --config "${CFG[a]}" --timeout 80
SENT1=$(timeout 10 "$BR_BIN" status --json --config "${CFG[a]}" | jq '.groups[0].downstream[0].resync_bytes_sent')
RESYNCED=$((SENT1 - SENT0))
log "dirty before the heal: $DIRTY bytes; resync sent $RESYNCED bytes"
assert_true "the resync moved no more than the dirty bytes" test "$RESYNCED" -le "$DIRTY"
assert_true "backing files identical after the heal" same_images

br_finish
