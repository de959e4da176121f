#!/usr/bin/env bash
# Where a FUSE round trip's time goes on this machine: mounts a fresh mmapfs image and times
# getxattr round trips (scripts/bench/fuse_rtt.c) with the client free, then with the daemon's
# threads pinned to CPU 0 and the client on CPU 0 (same CPU) and on CPU 1 (another CPU).
#   bash scripts/bench/rtt.sh [REPS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
source "$root/scripts/lib.sh"
reps=${1:-3}
[[ $(id -u) == 0 ]] || { echo "rtt.sh: must run as root (mounts)" >&2; exit 1; }
(($(nproc) >= 2)) || { echo "rtt.sh: needs two CPUs" >&2; exit 1; }
need_fuse
command -v gcc >/dev/null || { echo "rtt.sh: gcc is missing" >&2; exit 1; }

work=$(mktemp -d /var/tmp/mmapfs-rtt.XXXXXX)
mnt=$work/mnt
cleanup() {
    unmount_quietly "$mnt"
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
mkdir "$mnt"
(cd "$root" && cargo build --release --quiet)
bin=$root/target/release/mmapfs
gcc -O2 -o "$work/fuse_rtt" "$here/fuse_rtt.c"
"$bin" mkfs "$work/image" --size 64M >/dev/null
"$bin" mount "$work/image" "$mnt"
touch "$mnt/probe"
pid=$(pgrep -f -- "--foreground.*$work/image" | head -1)
[[ -n $pid ]] || { echo "rtt.sh: daemon not found" >&2; exit 1; }

probe() { "$work/fuse_rtt" "$mnt/probe" 50000; }
echo "FUSE round trip (getxattr), mean µs per call, $reps runs each:"
printf '  %-44s' "client and daemon free:"
for ((i = 0; i < reps; i++)); do printf ' %6s' "$(probe)"; done
echo
for t in /proc/"$pid"/task/*; do taskset -pc 0 "${t##*/}" >/dev/null; done
printf '  %-44s' "daemon on CPU 0, client on CPU 0 (same):"
for ((i = 0; i < reps; i++)); do printf ' %6s' "$(taskset -c 0 "$work/fuse_rtt" "$mnt/probe" 50000)"; done
echo
printf '  %-44s' "daemon on CPU 0, client on CPU 1 (other):"
for ((i = 0; i < reps; i++)); do printf ' %6s' "$(taskset -c 1 "$work/fuse_rtt" "$mnt/probe" 50000)"; done
echo
