#!/usr/bin/env bash
# Recovery time against a clean mount, on an image holding many files.
#   scripts/recovery_time.sh [--files N] [--dir DIR] [--rounds R]
# Makes an image, creates N files (default 1,000,000) in 1,000 directories, unmounts cleanly and
# times R mounts of the clean image (until the mount is live). Then, R times: mounts, keeps
# changing the image (creates, writes, files unlinked while held open), kill -9s the daemon in the
# middle, and times the mount that recovers. Also times the first change after each mount (a
# create and its fsync): after a crash the first commit writes back what the dead daemon left in
# the page cache. Every image must pass fsck. Prints medians and the ratio crashed/clean.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_fuse || exit 1

files=1000000
rounds=3
base=${TMPDIR:-/var/tmp}
while [ $# -gt 0 ]; do
    case $1 in
    --files) files=$2; shift 2 ;;
    --dir) base=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "usage: $0 [--files N] [--dir DIR] [--rounds R]" >&2; exit 2 ;;
    esac
done

cargo build --release -q
bin=$PWD/target/release/mmapfs
work=$(mktemp -d "$base/mmapfs-recovery.XXXXXX")
img=$work/img
mnt=$work/mnt
mkdir -p "$mnt"
cleanup() {
    unmount_quietly "$mnt"
    rm -rf "$work"
}
trap cleanup EXIT

now_ms() { date +%s%3N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Mounts in the background; prints the milliseconds until the mount was live.
timed_mount() {
    local t0
    t0=$(now_ms)
    "$bin" mount "$img" "$mnt"
    echo $(($(now_ms) - t0))
}

# The first change after a mount: a create and its fsync (the first commit of the mount).
first_change_ms() {
    python3 - "$mnt" <<'EOF'
import os, sys, time
t = time.perf_counter()
fd = os.open(os.path.join(sys.argv[1], "first-change-%d" % time.time_ns()), os.O_CREAT | os.O_WRONLY, 0o644)
os.write(fd, b"x")
os.fsync(fd)
os.close(fd)
print(int((time.perf_counter() - t) * 1000))
EOF
}

daemon_pid() { pgrep -f "mmapfs mount .*$img" | head -1; }

"$bin" mkfs "$img" --size 64M >/dev/null
"$bin" mount "$img" "$mnt"
echo "creating $files files in 1000 directories ..."
t0=$(now_ms)
python3 - "$mnt" "$files" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for d in range(1000):
    os.mkdir(os.path.join(root, "d%03d" % d))
for i in range(n):
    fd = os.open(os.path.join(root, "d%03d" % (i % 1000), "f%07d" % i), os.O_CREAT | os.O_WRONLY, 0o644)
    if i % 100 == 0:
        os.write(fd, b"x" * 4096)
    os.close(fd)
fd = os.open(root, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
EOF
echo "created in $(( ($(now_ms) - t0) / 1000 )) s"
fusermount3 -u "$mnt"
while [ -n "$(daemon_pid)" ]; do sleep 0.1; done
"$bin" fsck "$img" | tail -1
ls -l "$img" | awk '{print "image: " $5 " bytes"}'

clean=()
clean_first=()
for _ in $(seq "$rounds"); do
    clean+=("$(timed_mount)")
    clean_first+=("$(first_change_ms)")
    fusermount3 -u "$mnt"
    while [ -n "$(daemon_pid)" ]; do sleep 0.1; done
done

crashed=()
crashed_first=()
for r in $(seq "$rounds"); do
    "$bin" mount "$img" "$mnt"
    # Changes in flight at the kill: creates, writes, and files unlinked while held open.
    python3 - "$mnt" "$r" <<'EOF' &
import os, sys, time
root, r = sys.argv[1], sys.argv[2]
held = []
try:
    for i in range(10**9):
        p = os.path.join(root, "d%03d" % (i % 1000), "crash%s-%d" % (r, i))
        fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"y" * 8192)
        if i % 50 == 0:
            os.unlink(p)
            held.append(fd)
        else:
            os.close(fd)
except OSError:
    pass
EOF
    load=$!
    sleep 3
    kill -9 "$(daemon_pid)"
    wait "$load" || true
    fusermount3 -u "$mnt" 2>/dev/null || umount -l "$mnt"
    "$bin" fsck "$img" | head -3
    crashed+=("$(timed_mount)")
    crashed_first+=("$(first_change_ms)")
    fusermount3 -u "$mnt"
    while [ -n "$(daemon_pid)" ]; do sleep 0.1; done
    "$bin" fsck "$img" | tail -1
done

c=$(printf '%s\n' "${clean[@]}" | median)
k=$(printf '%s\n' "${crashed[@]}" | median)
cf=$(printf '%s\n' "${clean_first[@]}" | median)
kf=$(printf '%s\n' "${crashed_first[@]}" | median)
echo "files: $files; mounts until live (ms): clean ${clean[*]}, after kill -9 ${crashed[*]}"
echo "first change after the mount (ms): clean ${clean_first[*]}, after kill -9 ${crashed_first[*]}"
echo "median mount: clean $c ms, after kill -9 $k ms; ratio $(awk -v a="$k" -v b="$c" 'BEGIN {printf "%.2f", a / b}')"
echo "median first change: clean $cf ms, after kill -9 $kf ms"
