#!/usr/bin/env bash
# blockrelay demo: one site with a real ext4 filesystem on its export, then a
# chain of three sites replicating it.
#
#   sudo scripts/demo.sh            (root on Debian 12; takes a few minutes
#                                     the first time, for packages and build)
#   sudo BUILD_DIR=build-demo scripts/demo.sh     (build into another dir)
#
# What it does, step by step:
#   1. installs the Debian packages (scripts/install-deps.sh) and builds
#      blockrelay (scripts/build.sh, into $BUILD_DIR, default build/);
#   2. starts site "a" from config/site-a.json: one volume "data" of 256 MiB,
#      exported over NBD on run/a/nbd.sock and 127.0.0.1:10809;
#   3. attaches the export as a block device: the kernel NBD client
#      (nbd-client -> /dev/nbd0) where the nbd module exists, otherwise
#      nbdfuse (the export as a file) + losetup (that file as /dev/loopN);
#   4. makes an ext4 filesystem, mounts it, writes files, unmounts and
#      detaches, attaches again, checks the filesystem and every file's sha256;
#   5. shows `blockrelay status`, then undoes everything it set up and
#      stops the site with SIGTERM (it flushes and exits 0);
#   6. starts the chain of config/chain/: site a (primary) replicates group
#      "db" (volumes "wal" and "data") synchronously to site b, which pushes
#      it on asynchronously to site c (all on loopback, data in run/chain/);
#   7. puts ext4 and files on a's export "data" and random bytes on "wal",
#      the same way as above, and detaches;
#   8. waits until the chain has caught up (`blockrelay wait` on a for link
#      b, then on b for link c) and shows that every volume's backing file
#      has the same sha256 on a, b and c; attaches c's read-only export and
#      checks every file's sha256 there;
#   9. shows `blockrelay status` of each site and stops the three sites.
# The data stays in run/ until the next run of this script.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

STEP="starting"
step() { STEP=$*; echo; echo "==> $*"; }
info() { echo "    $*"; }

# BUILD_DIR (relative to the repo, or absolute) selects the build directory;
# scripts/build.sh reads the same variable.
export BUILD_DIR=${BUILD_DIR:-build}
case $BUILD_DIR in /*) BIN=$BUILD_DIR/blockrelay ;; *) BIN=$REPO/$BUILD_DIR/blockrelay ;; esac
CONFIG=$REPO/config/site-a.json
CHAIN_SITES=(a b c)
declare -A CHAIN_CONFIG=() CHAIN_PID=()
for s in "${CHAIN_SITES[@]}"; do CHAIN_CONFIG[$s]=$REPO/config/chain/site-$s.json; done
WORK=            # temp dir: mount point, checksums, logs
SITE_PID=
DEV=             # the block device the filesystem lives on
METHOD=          # "nbd-client" or "nbdfuse+losetup"
NBD_DEV=         # set if we connected /dev/nbdX
LOOP=            # set if we created a loop device
FUSE_PID=        # set if we started nbdfuse
MNT=
SITE_EXIT=
STARTED_PID=     # the last site start_site started

# stop_pid PID: SIGTERM, up to 10 s to finish, then SIGKILL. Returns the
# process's exit status.
stop_pid() {
  local pid=$1 rc
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "    pid $pid still running 10 s after SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null
  fi
  rc=0
  wait "$pid" 2>/dev/null || rc=$?
  return "$rc"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "$MNT" ] && mountpoint -q "$MNT"; then
    umount "$MNT" || umount -l "$MNT"
  fi
  [ -n "$NBD_DEV" ] && nbd-client -d "$NBD_DEV" >/dev/null 2>&1
  [ -n "$LOOP" ] && losetup -d "$LOOP"
  if [ -n "$FUSE_PID" ]; then
    mountpoint -q "$WORK/fuse" && fusermount3 -u "$WORK/fuse"
    kill "$FUSE_PID" 2>/dev/null; wait "$FUSE_PID" 2>/dev/null
  fi
  if [ -n "$SITE_PID" ] && kill -0 "$SITE_PID" 2>/dev/null; then
    stop_pid "$SITE_PID"
  fi
  local s
  for s in "${CHAIN_SITES[@]}"; do
    [ -n "${CHAIN_PID[$s]:-}" ] && stop_pid "${CHAIN_PID[$s]}"
  done
  # A site that did not come up (start_site failed).
  [ -n "$STARTED_PID" ] && kill -0 "$STARTED_PID" 2>/dev/null && stop_pid "$STARTED_PID"
  if [ "$rc" -ne 0 ]; then
    echo
    echo "demo FAILED during: $STEP (exit status $rc)"
    for log in site-a chain-a chain-b chain-c; do
      if [ -n "$WORK" ] && [ -s "$WORK/$log.log" ]; then
        echo "---- last lines of $log.log ----"
        tail -n 20 "$WORK/$log.log"
      fi
    done
  fi
  [ -n "$WORK" ] && rm -rf --one-file-system "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: run as root (it installs packages, attaches a block device and mounts it)" >&2
  exit 1
fi

WORK=$(mktemp -d -t blockrelay-demo.XXXXXX)

# ---------------------------------------------------------------------------
step "1/11 Installing Debian packages"
bash scripts/install-deps.sh

step "1/11 Building blockrelay (into $BUILD_DIR)"
bash scripts/build.sh >"$WORK/build.log" 2>&1 || {
  tail -n 30 "$WORK/build.log"; echo "build failed (full output: scripts/build.sh)"; exit 1; }
info "built $BIN ($("$BIN" --version))"

# ---------------------------------------------------------------------------
step "2/11 Starting site a from config/site-a.json"
"$BIN" check-config "$CONFIG"
# Paths in the config are relative to the config file.
cfg_path() { (cd "$(dirname "$2")" && realpath -m "$(jq -r "$1" "$2")"); }
SOCK=$(cfg_path .nbd.unix_socket "$CONFIG")
DATA_DIR=$(cfg_path .data_dir "$CONFIG")
if "$BIN" status --config "$CONFIG" >/dev/null 2>&1; then
  echo "a site is already running from $CONFIG; stop it first" >&2
  exit 1
fi
for s in "${CHAIN_SITES[@]}"; do
  if "$BIN" status --config "${CHAIN_CONFIG[$s]}" >/dev/null 2>&1; then
    echo "a site is already running from ${CHAIN_CONFIG[$s]}; stop it first" >&2
    exit 1
  fi
done
info "removing the previous run's data: $REPO/run"
rm -rf "$REPO/run"

# start_site CONFIG LOG: runs a site in the background (its pid in
# STARTED_PID) and waits until its control socket answers and its NBD socket
# exists.
start_site() {
  local config=$1 log=$2 sock
  sock=$(cfg_path .nbd.unix_socket "$config")
  "$BIN" run --config "$config" >"$log" 2>&1 </dev/null &
  STARTED_PID=$!
  for _ in $(seq 200); do
    kill -0 "$STARTED_PID" 2>/dev/null || { echo "the site of $config exited at start-up"; return 1; }
    "$BIN" status --config "$config" >/dev/null 2>&1 && [ -S "$sock" ] && return 0
    sleep 0.1
  done
  echo "the site of $config did not come up in 20 s"
  return 1
}
start_site "$CONFIG" "$WORK/site-a.log"
SITE_PID=$STARTED_PID
info "site a is running (pid $SITE_PID), data in $DATA_DIR"
info "exports: $(nbdinfo --list --json "nbd+unix:///?socket=$SOCK" | jq -r '[.exports[]["export-name"]] | join(", ")')"

# ---------------------------------------------------------------------------
# attach SOCKET EXPORT [ro]: make an export a block device ($DEV); detach
# undoes it.
attach() {
  local sock=$1 export=$2 ro=${3:-}
  [ -e /dev/nbd0 ] || modprobe nbd 2>/dev/null || true
  if [ -b /dev/nbd0 ] && ! nbd-client -c /dev/nbd0 >/dev/null 2>&1; then
    METHOD="nbd-client"
    nbd-client -unix "$sock" -N "$export" ${ro:+-readonly} /dev/nbd0 >/dev/null
    NBD_DEV=/dev/nbd0
    DEV=/dev/nbd0
  else
    # No kernel nbd module (or /dev/nbd0 busy): nbdfuse shows the export as
    # a file, losetup turns that file into a block device.
    METHOD="nbdfuse+losetup"
    mkdir -p "$WORK/fuse"
    nbdfuse ${ro:+-r} "$WORK/fuse" "nbd+unix:///$export?socket=$sock" >"$WORK/nbdfuse.log" 2>&1 </dev/null &
    FUSE_PID=$!
    for _ in $(seq 100); do [ -e "$WORK/fuse/nbd" ] && break; sleep 0.1; done
    [ -e "$WORK/fuse/nbd" ] || { cat "$WORK/nbdfuse.log"; echo "nbdfuse did not start"; return 1; }
    LOOP=$(losetup -f --show ${ro:+-r} "$WORK/fuse/nbd")
    DEV=$LOOP
  fi
}
detach() {
  if [ -n "$NBD_DEV" ]; then nbd-client -d "$NBD_DEV" >/dev/null; NBD_DEV=; fi
  if [ -n "$LOOP" ]; then losetup -d "$LOOP"; LOOP=; fi
  if [ -n "$FUSE_PID" ]; then
    fusermount3 -u "$WORK/fuse"
    wait "$FUSE_PID" 2>/dev/null || true
    FUSE_PID=
  fi
}

step "3/11 Attaching export \"data\" as a block device"
attach "$SOCK" data
info "attached with $METHOD as $DEV ($(($(blockdev --getsize64 "$DEV") >> 20)) MiB)"

# ---------------------------------------------------------------------------
# write_files SUMS: ext4 on $DEV, mounted on $MNT, files written, their
# sha256 in SUMS; sets FILES and BYTES.
MNT=$WORK/mnt
mkdir -p "$MNT"
write_files() {
  local sums=$1
  mkfs.ext4 -q -F -L blockrelay-demo "$DEV"
  mount "$DEV" "$MNT"
  dd if=/dev/urandom of="$MNT/random-32MiB.bin" bs=1M count=32 status=none
  cp -r "$REPO/src" "$MNT/blockrelay-src"
  cp "$REPO/README.md" "$MNT/" 2>/dev/null || true
  for i in $(seq 1 100); do head -c $((i * 1000)) /dev/urandom >"$MNT/small-$i.bin"; done
  (cd "$MNT" && find . -type f ! -path './lost+found/*' -print0 | sort -z | xargs -0 sha256sum) >"$sums"
  FILES=$(wc -l <"$sums")
  BYTES=$(du -sb --exclude=lost+found "$MNT" | cut -f1)
  sync -f "$MNT"
  info "wrote $FILES files ($((BYTES >> 20)) MiB) to $MNT"
  df -h "$MNT" | sed 's/^/    /'
}

step "4/11 Making an ext4 filesystem and writing files"
write_files "$WORK/sha256sums"

step "5/11 Detaching, attaching again and reading every file back"
# Detaching drops every cache on the client side, so what is read back
# really comes from blockrelay.
umount "$MNT"
detach
read_before=$("$BIN" status --config "$CONFIG" --json | jq '[.groups[].volumes[].bytes_read] | add')
attach "$SOCK" data
info "attached again as $DEV"
e2fsck -fn "$DEV" >"$WORK/fsck.log" 2>&1 || { cat "$WORK/fsck.log"; echo "e2fsck found problems"; exit 1; }
info "e2fsck: clean"
mount -o ro "$DEV" "$MNT"
(cd "$MNT" && sha256sum --quiet -c "$WORK/sha256sums")
read_after=$("$BIN" status --config "$CONFIG" --json | jq '[.groups[].volumes[].bytes_read] | add')
info "all $FILES checksums match ($(((read_after - read_before) >> 20)) MiB read from the site)"
SINGLE_FILES=$FILES SINGLE_BYTES=$BYTES SINGLE_METHOD=$METHOD SINGLE_DEV=$DEV

# ---------------------------------------------------------------------------
step "6/11 blockrelay status"
"$BIN" status --config "$CONFIG" | sed 's/^/    /'

step "6/11 Cleaning up: unmount, detach, stop the site"
umount "$MNT"
detach
SITE_EXIT=0
stop_pid "$SITE_PID" || SITE_EXIT=$?
SITE_PID=
[ "$SITE_EXIT" -eq 0 ] || { echo "the site exited with status $SITE_EXIT after SIGTERM"; exit 1; }
info "site a stopped cleanly (exit 0)"

# ---------------------------------------------------------------------------
# Three-site chain (config/chain/site-{a,b,c}.json):
#   a (primary) --sync--> b (secondary) --async--> c (secondary)
# group "db" with volumes "wal" and "data". Each site is its own process
# with its own data_dir, as it would be on three machines.
step "7/11 Starting the chain a -> b (sync) -> c (async) from config/chain/"
for s in "${CHAIN_SITES[@]}"; do "$BIN" check-config "${CHAIN_CONFIG[$s]}" | sed 's/^/    /'; done
# Downstream first, so that every site finds its downstream listening.
for s in c b a; do
  start_site "${CHAIN_CONFIG[$s]}" "$WORK/chain-$s.log"
  CHAIN_PID[$s]=$STARTED_PID
  info "site $s is running (pid $STARTED_PID), data in $(cfg_path .data_dir "${CHAIN_CONFIG[$s]}")"
done
CHAIN_SOCK=$(cfg_path .nbd.unix_socket "${CHAIN_CONFIG[a]}")
# New volumes: each link's first connection sends everything (all zeroes
# here, so only zero ops go over the wire).
"$BIN" wait db --link b --timeout 60 --config "${CHAIN_CONFIG[a]}" | sed 's/^/    a: /'
"$BIN" wait db --link c --timeout 60 --config "${CHAIN_CONFIG[b]}" | sed 's/^/    b: /'
info "a's exports: $(nbdinfo --list --json "nbd+unix:///?socket=$CHAIN_SOCK" | jq -r '[.exports[]["export-name"]] | join(", ")')"

step "8/11 Writing through site a: ext4 and files on \"data\", 16 MiB on \"wal\""
attach "$CHAIN_SOCK" data
info "attached a's export \"data\" with $METHOD as $DEV"
write_files "$WORK/chain-sha256sums"
umount "$MNT"
detach
head -c 16M /dev/urandom >"$WORK/wal.bin"
nbdcopy "$WORK/wal.bin" "nbd+unix:///wal?socket=$CHAIN_SOCK"
info "copied 16 MiB of random bytes to a's export \"wal\"; unmounted and detached"

step "9/11 Waiting until the chain has caught up"
"$BIN" wait db --link b --timeout 120 --config "${CHAIN_CONFIG[a]}" | sed 's/^/    site a: /'
"$BIN" wait db --link c --timeout 120 --config "${CHAIN_CONFIG[b]}" | sed 's/^/    site b: /'

step "10/11 Site c's volumes are identical to site a's"
for v in wal data; do
  declare -A SUM=()
  for s in "${CHAIN_SITES[@]}"; do
    img=$(cd "$(dirname "${CHAIN_CONFIG[$s]}")" &&
          realpath -m "$(jq -r --arg v "$v" '.groups[0].volumes[] | select(.name == $v) | .path' "${CHAIN_CONFIG[$s]}")")
    SUM[$s]=$(sha256sum "$img" | cut -d' ' -f1)
    info "$(printf '%-4s on site %s: %s  %s' "$v" "$s" "${SUM[$s]}" "${img#"$REPO"/}")"
  done
  if [ "${SUM[a]}" != "${SUM[b]}" ] || [ "${SUM[a]}" != "${SUM[c]}" ]; then
    echo "volume $v differs between the sites"
    exit 1
  fi
done
info "every volume has the same sha256 on a, b and c"
C_SOCK=$(cfg_path .nbd.unix_socket "${CHAIN_CONFIG[c]}")
attach "$C_SOCK" data ro
info "attached c's read-only export \"data\" with $METHOD as $DEV"
e2fsck -fn "$DEV" >"$WORK/fsck.log" 2>&1 || { cat "$WORK/fsck.log"; echo "e2fsck found problems on site c"; exit 1; }
mount -o ro,noload "$DEV" "$MNT"
(cd "$MNT" && sha256sum --quiet -c "$WORK/chain-sha256sums")
info "e2fsck clean and all $FILES files' checksums match on site c"
umount "$MNT"
detach

step "11/11 blockrelay status of each site"
for s in "${CHAIN_SITES[@]}"; do
  echo "    --- site $s ---"
  "$BIN" status --config "${CHAIN_CONFIG[$s]}" | sed 's/^/    /'
done

step "11/11 Cleaning up: stop the sites (a first)"
for s in "${CHAIN_SITES[@]}"; do
  rc=0
  stop_pid "${CHAIN_PID[$s]}" || rc=$?
  CHAIN_PID[$s]=
  [ "$rc" -eq 0 ] || { echo "site $s exited with status $rc after SIGTERM"; exit 1; }
  info "site $s stopped cleanly (exit 0)"
done

echo
echo "demo OK: $SINGLE_FILES files ($((SINGLE_BYTES >> 20)) MiB) written to ext4 on blockrelay export \"data\" ($SINGLE_METHOD, $SINGLE_DEV), read back with matching sha256 after detach + attach; chain a -> b -> c: $FILES files on ext4 written through a, caught up, c's volumes identical to a's (sha256); sites stopped cleanly"
