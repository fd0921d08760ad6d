#!/usr/bin/env bash
# A real filesystem on a blockrelay export, without the kernel nbd module:
# nbdfuse exposes the export as a file, losetup makes it a block device,
# then mkfs.ext4, mount, write files, sync, fstrim, umount, e2fsck, remount
# and compare checksums; then restart the daemon (SIGTERM) and check again.
# Needs root, /dev/fuse and loop devices; skipped (77) otherwise.
source "$(dirname "$0")/lib.sh"
br_init "$@"

[ "$(id -u)" = 0 ] || skip "needs root (losetup, mount)"
[ -c /dev/fuse ] || skip "/dev/fuse is missing"
[ -e /dev/loop-control ] || skip "/dev/loop-control is missing (no loop devices)"
need_cmd nbdfuse fusermount3 losetup mkfs.ext4 e2fsck fstrim mount umount mountpoint sha256sum

br_write_config --size 256MiB
br_start

FUSE_DIR=$BR_TMP/fuse   # nbdfuse mounts its single file "nbd" here
MNT=$BR_TMP/mnt
mkdir -p "$FUSE_DIR" "$MNT"
FUSE_PID=
LOOP=

# Everything below is undone in reverse order by the exit trap, and only
# what this test created: our mount point, our loop device, our FUSE mount.
teardown_mount() {
  if mountpoint -q "$MNT"; then
    umount "$MNT" 2>/dev/null || { sleep 1; umount "$MNT" 2>/dev/null; } || umount -l "$MNT"
  fi
}
teardown_loop() {
  if [ -n "$LOOP" ]; then
    losetup -d "$LOOP" 2>/dev/null || { sleep 1; losetup -d "$LOOP"; }
    LOOP=
  fi
}
teardown_fuse() {
  if mountpoint -q "$FUSE_DIR"; then
    fusermount3 -u "$FUSE_DIR" 2>/dev/null || { sleep 1; fusermount3 -u "$FUSE_DIR" 2>/dev/null; } ||
      fusermount3 -uz "$FUSE_DIR"
  fi
  if [ -n "$FUSE_PID" ]; then
    local deadline=$((SECONDS + 10))
    while kill -0 "$FUSE_PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill "$FUSE_PID" 2>/dev/null
    wait "$FUSE_PID" 2>/dev/null
    FUSE_PID=
  fi
}
teardown_all() { teardown_mount; teardown_loop; teardown_fuse; }
br_on_exit teardown_all

# attach: nbdfuse + losetup; sets LOOP.
attach() {
  nbdfuse -P "$BR_TMP/nbdfuse.pid" "$FUSE_DIR" "$BR_URI" >>"$BR_TMP/nbdfuse.log" 2>&1 </dev/null &
  FUSE_PID=$!
  local deadline=$((SECONDS + 20))
  until [ -e "$FUSE_DIR/nbd" ] || [ $SECONDS -ge $deadline ]; do
    kill -0 "$FUSE_PID" 2>/dev/null || break
    sleep 0.1
  done
  [ -e "$FUSE_DIR/nbd" ] || { cat "$BR_TMP/nbdfuse.log"; die "nbdfuse did not expose $FUSE_DIR/nbd"; }
  LOOP=$(losetup -f --show "$FUSE_DIR/nbd") || die "losetup failed"
  log "attached $BR_URI as $LOOP through nbdfuse (pid $FUSE_PID)"
  assert_eq "loop device has the export's size" $((256 << 20)) "$(blockdev --getsize64 "$LOOP")"
}
detach() { teardown_mount; teardown_loop; teardown_fuse; }

attach
check "mkfs.ext4" mkfs.ext4 -q -F -E nodiscard "$LOOP"
check "mount" mount "$LOOP" "$MNT"

# Files: a big random one, a tree of small ones, a sparse one, a symlink.
dd if=/dev/urandom of="$MNT/big.bin" bs=1M count=48 status=none
mkdir -p "$MNT/tree/a/b"
for i in $(seq 1 200); do
  head -c $((RANDOM * 3 + i)) /dev/urandom >"$MNT/tree/a/b/f$i"
done
truncate -s 100M "$MNT/sparse.bin"
echo "hello from blockrelay" | dd of="$MNT/sparse.bin" bs=1 seek=$((50 << 20)) conv=notrunc status=none
ln -s tree/a/b/f1 "$MNT/link"
dd if=/dev/urandom of="$MNT/doomed.bin" bs=1M count=64 status=none
check "sync" sync -f "$MNT"
sums() { (cd "$MNT" && find . -type f ! -name doomed.bin -print0 | sort -z | xargs -0 sha256sum); }
sums >"$BR_TMP/sums.before"
assert_eq "202 files checksummed" 202 "$(wc -l <"$BR_TMP/sums.before")"

# fstrim after deleting 64 MiB: blockrelay punches holes, so the backing
# file must shrink on disk.
rm "$MNT/doomed.bin"
check "sync after delete" sync -f "$MNT"
alloc_before=$(( $(stat -c %b "$BR_IMG") * $(stat -c %B "$BR_IMG") ))
check "fstrim" fstrim -v "$MNT"
cat "$BR_OUT"
sync
alloc_after=$(( $(stat -c %b "$BR_IMG") * $(stat -c %B "$BR_IMG") ))
assert_true "fstrim shrank the backing file's allocation ($alloc_before -> $alloc_after bytes)" \
  test "$alloc_after" -lt $((alloc_before - (32 << 20)))

check "umount" umount "$MNT"
check "e2fsck -fn is clean" e2fsck -fn "$LOOP"
check "remount" mount "$LOOP" "$MNT"
sums >"$BR_TMP/sums.remount"
check "checksums match after remount" cmp "$BR_TMP/sums.before" "$BR_TMP/sums.remount"
assert_eq "symlink survives" "tree/a/b/f1" "$(readlink "$MNT/link")"
assert_eq "sparse file content" "hello from blockrelay" \
  "$(dd if="$MNT/sparse.bin" bs=1 skip=$((50 << 20)) count=21 status=none)"

# Restart the daemon with the filesystem unmounted and detached.
detach
assert_true "everything detached" bash -c "! mountpoint -q '$MNT' && ! mountpoint -q '$FUSE_DIR'"
br_stop TERM
assert_eq "daemon exits 0 on SIGTERM" 0 "$BR_EXIT"
br_start
attach
check "e2fsck -fn is clean after the daemon restart" e2fsck -fn "$LOOP"
check "mount after the daemon restart" mount "$LOOP" "$MNT"
sums >"$BR_TMP/sums.restart"
check "checksums match after the daemon restart" cmp "$BR_TMP/sums.before" "$BR_TMP/sums.restart"
# And it is still writable.
check "write after the restart" dd if=/dev/urandom of="$MNT/after.bin" bs=1M count=8 conv=fsync status=none
detach

br_finish
