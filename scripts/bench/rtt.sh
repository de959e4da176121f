#!/usr/bin/env bash
# Where a FUSE round trip's time goes on this machine: mounts a fresh mmapfs image and times
# getxattr round trips (scripts/bench/fuse_rtt.c): with the default placement of the workers (one
# pinned per CPU), then with `-o no_pin_threads`, and with every worker moved to CPU 0 while the
# client runs on CPU 0 (same CPU) or CPU 1 (another CPU).
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

probe() { "$@" "$work/fuse_rtt" "$mnt/probe" 50000; }
row() { # row LABEL COMMAND-PREFIX...
    local label=$1 i
    shift
    printf '  %-58s' "$label"
    for ((i = 0; i < reps; i++)); do printf ' %6s' "$(probe "$@")"; done
    echo
}
echo "FUSE round trip (getxattr), mean µs per call, $reps runs each:"

"$bin" mount "$work/image" "$mnt"
touch "$mnt/probe"
row "default (one worker pinned per CPU), client anywhere:"
row "default, client on CPU 0:" taskset -c 0
row "default, client on CPU 1:" taskset -c 1
fusermount3 -u "$mnt"
sleep 0.5 # the daemon releases the image lock after the unmount returns

"$bin" mount -o no_pin_threads "$work/image" "$mnt"
row "-o no_pin_threads (scheduler places workers):"
pid=$(pgrep -f -- "--foreground.*$work/image" | head -1)
[[ -n $pid ]] || { echo "rtt.sh: daemon not found" >&2; exit 1; }
for t in /proc/"$pid"/task/*; do taskset -pc 0 "${t##*/}" >/dev/null; done
row "all workers moved to CPU 0, client on CPU 0 (same):" taskset -c 0
row "all workers moved to CPU 0, client on CPU 1 (other):" taskset -c 1
