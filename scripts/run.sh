#!/usr/bin/env bash
# The main job, as a new user runs it: build, make an image, mount it, use it, unmount, check.
#   scripts/run.sh [--keep] [IMAGE] [MOUNTPOINT]
# --keep leaves the filesystem mounted (unmount later with: fusermount3 -u MOUNTPOINT).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

keep=0
if [ "${1:-}" = "--keep" ]; then keep=1; shift; fi
image=${1:-$PWD/demo.img}
mnt=${2:-$PWD/demo-mnt}

need_fuse
echo "== building"
cargo build --release --quiet
bin=$PWD/target/release/mmapfs

cleanup() { [ "$keep" = 1 ] || unmount_quietly "$mnt"; }
trap cleanup EXIT INT TERM

echo "== mkfs $image (16 MiB; it grows on demand)"
"$bin" mkfs "$image" --size 16M --force
mkdir -p "$mnt"
unmount_quietly "$mnt"
echo "== mount $image on $mnt"
"$bin" mount "$image" "$mnt"

echo "== use it"
mkdir -p "$mnt/docs"
echo "hello from mmapfs" >"$mnt/docs/hello.txt"
ln -s docs/hello.txt "$mnt/link"
dd if=/dev/urandom of="$mnt/random.bin" bs=1M count=64 status=none
sum=$(md5sum <"$mnt/random.bin")
python3 - "$mnt/shared.bin" <<'PY'
import mmap, os, sys
path = sys.argv[1]
with open(path, "w+b") as f:
    f.truncate(1 << 20)
    m = mmap.mmap(f.fileno(), 1 << 20, mmap.MAP_SHARED)
    m[:16] = b"written via mmap"
    m.flush()
    m.close()
print("mmap write:", open(path, "rb").read(16).decode())
PY
ls -la "$mnt" "$mnt/docs"
cat "$mnt/link"
df -h "$mnt"

echo "== unmount, remount, verify"
fusermount3 -u "$mnt"
"$bin" mount "$image" "$mnt"
[ "$(md5sum <"$mnt/random.bin")" = "$sum" ] && echo "random.bin intact after remount"
grep -q "written via mmap" "$mnt/shared.bin" && echo "mmap write intact after remount"
if [ "$keep" = 1 ]; then
    echo "== left mounted on $mnt (fusermount3 -u $mnt to unmount)"
    exit 0
fi
fusermount3 -u "$mnt"
echo "== fsck"
"$bin" fsck "$image"
"$bin" info "$image"
