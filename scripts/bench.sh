#!/usr/bin/env bash
# mmapfs vs tmpfs (and the host filesystem) benchmark. See docs/bench.md.
#
#   scripts/bench.sh [--quick] [options]
#
# Mounts a fresh mmapfs image and a fresh tmpfs, and makes a directory on the host filesystem next to the
# image (the physical limit for anything that must reach the disk: fsync). Runs the same workloads on the
# three, interleaved (tmpfs, mmapfs, host, tmpfs, mmapfs, host, ...) for several repetitions, and reports
# medians and the ratios "fraction of tmpfs speed" and "fraction of host speed" (higher is better,
# 1.0 = as fast as the reference) per workload.
# Output: a Markdown table on stdout; results.md, results.json, chart.svg and the raw fio/tool output in
# results/bench-<timestamp>/, copied to results/latest/. Progress goes to stderr.
# Exit status: 0 when every workload ran on every filesystem, 1 when a workload failed, 2 on a setup error.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/bench.sh [options]
  --quick               tiny sizes, 1 repetition, short runtimes, host column only for the fsync rows
                        (about a minute; for CI: checks the bench runs)
  --reps N              repetitions per workload (default 3, --quick: 1)
  --only REGEX          run only the workloads whose name matches REGEX (grep -E)
  --list                list the workloads and exit
  --image-dir DIR       directory of the mmapfs image (default: a new temp dir under /var/tmp)
  --image-size SIZE     mmapfs mkfs --size (default 4G, --quick: 256M)
  --tmpfs-size SIZE     size= of the tmpfs (default 4G, --quick: 512M)
  --threads N           mmapfs mount --threads N
  -o OPTS               mmapfs mount -o OPTS
  --bdi KEY=VALUE       after mounting, write VALUE to /sys/class/bdi/<dev>/KEY of the mmapfs mount
                        (repeatable; e.g. --bdi strict_limit=0 --bdi max_ratio=20 --bdi read_ahead_kb=1024)
  --job-timeout SECS    kill a workload after SECS (default 300, --quick: 60)
  --results DIR         parent of the results folders (default: <repo>/results)
  --no-build            do not run cargo build --release
  --keep                keep the temp dir (image, generated repository) for inspection
  --fs-under-test FS    mmapfs (default) or tmpfs: a second tmpfs stands in for mmapfs (to develop the bench)
  --host MODE           the third column, a plain directory on the filesystem holding the image: run
                        every workload there (all, the default), only the fsync-heavy ones (fsync, the
                        default with --quick), or none
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPERS=$REPO/scripts/bench

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
    log "error: $*"
    exit 2
}

# ---------------------------------------------------------------- options
QUICK=0 REPS="" ONLY="" LIST=0 IMAGE_DIR="" IMAGE_SIZE="" TMPFS_SIZE="" THREADS="" MOUNT_OPTS=""
JOB_TIMEOUT="" BDI_SETTINGS=() RESULTS_BASE=$REPO/results BUILD=1 KEEP=0 FS_UNDER_TEST=mmapfs HOST_MODE=""
while (($#)); do
    case $1 in
    --quick) QUICK=1 ;;
    --reps) REPS=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --list) LIST=1 ;;
    --image-dir) IMAGE_DIR=$2; shift ;;
    --image-size) IMAGE_SIZE=$2; shift ;;
    --tmpfs-size) TMPFS_SIZE=$2; shift ;;
    --threads) THREADS=$2; shift ;;
    -o) MOUNT_OPTS=$2; shift ;;
    --bdi) BDI_SETTINGS+=("$2"); shift ;;
    --job-timeout) JOB_TIMEOUT=$2; shift ;;
    --results) RESULTS_BASE=$2; shift ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    --fs-under-test) FS_UNDER_TEST=$2; shift ;;
    --host) HOST_MODE=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
    esac
    shift
done
[[ $FS_UNDER_TEST == mmapfs || $FS_UNDER_TEST == tmpfs ]] || die "--fs-under-test must be mmapfs or tmpfs"

# Order matters: the sequential jobs leave the big file in place for the random and mmap jobs.
ALL_WORKLOADS=(
    seq-write-cold seq-read-cold seq-read-warm seq-write-warm
    rand-read-cold rand-read rand-write
    mmap-seq-write mmap-seq-read-cold mmap-seq-read mmap-rand-read-cold mmap-rand-read mmap-rand-write
    msync fsync-randwrite fsync-dd fsync-seq-write fsync-rand-write fsync-sqlite-rollback fsync-sqlite-wal
    scale-randrw-1 scale-randrw-2 scale-randrw-4
    meta-1dir meta-100dirs smallfiles sqlite git-checkout
)
# The workloads whose cost is durability: the host filesystem is their reference (also in report.py).
FSYNC_WORKLOADS=(msync fsync-randwrite fsync-dd fsync-seq-write fsync-rand-write fsync-sqlite-rollback fsync-sqlite-wal)
if ((LIST)); then
    printf '%s\n' "${ALL_WORKLOADS[@]}"
    exit 0
fi
WORKLOADS=()
for w in "${ALL_WORKLOADS[@]}"; do
    if [[ -z $ONLY ]] || grep -Eq -- "$ONLY" <<<"$w"; then WORKLOADS+=("$w"); fi
done
((${#WORKLOADS[@]})) || die "--only '$ONLY' matches no workload (see --list)"

if ((QUICK)); then
    : "${REPS:=1}" "${IMAGE_SIZE:=256M}" "${TMPFS_SIZE:=512M}" "${JOB_TIMEOUT:=60}" "${HOST_MODE:=fsync}"
    export BENCH_FILE_SIZE=32m BENCH_SEQ_CAP=5 BENCH_RUNTIME=500ms BENCH_MSYNC_SIZE=4m BENCH_COLD_IO=4m
    export BENCH_META_N=2000 BENCH_SMALL_N=500 BENCH_SQL_ROWS=2000 BENCH_SQL_BATCH=500
    export BENCH_SQL_COMMITS=50 BENCH_DD_MB=64 BENCH_FSYNC_SIZE=4m
    GIT_FILES=200
else
    : "${REPS:=3}" "${IMAGE_SIZE:=4G}" "${TMPFS_SIZE:=4G}" "${JOB_TIMEOUT:=300}" "${HOST_MODE:=all}"
    export BENCH_FILE_SIZE=1g BENCH_SEQ_CAP=20 BENCH_RUNTIME=5s BENCH_MSYNC_SIZE=64m BENCH_COLD_IO=64m
    export BENCH_META_N=100000 BENCH_SMALL_N=20000 BENCH_SQL_ROWS=50000 BENCH_SQL_BATCH=1000
    export BENCH_SQL_COMMITS=300 BENCH_DD_MB=1024 BENCH_FSYNC_SIZE=64m
    GIT_FILES=3000
fi
export BENCH_SQL_MMAP=268435456 BENCH_HELPERS=$HELPERS
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive integer"
[[ $HOST_MODE == all || $HOST_MODE == fsync || $HOST_MODE == none ]] || die "--host must be all, fsync or none"
HOST=1
[[ $HOST_MODE == none ]] && HOST=0
# on_host WORKLOAD: whether the workload runs in the host directory too.
on_host() {
    ((HOST)) || return 1
    [[ $HOST_MODE == all ]] && return 0
    local w
    for w in "${FSYNC_WORKLOADS[@]}"; do [[ $w == "$1" ]] && return 0; done
    return 1
}
HOST_WORKLOADS=()
for w in "${WORKLOADS[@]}"; do
    if on_host "$w"; then HOST_WORKLOADS+=("$w"); fi
done
((${#HOST_WORKLOADS[@]})) || HOST=0 # (no host column at all: the two-column output)

[[ $(id -u) == 0 ]] || die "must run as root (mounts, drop_caches)"

# ---------------------------------------------------------------- tools
need_pkgs=()
command -v fio >/dev/null || need_pkgs+=(fio)
command -v sqlite3 >/dev/null || need_pkgs+=(sqlite3)
command -v git >/dev/null || need_pkgs+=(git)
command -v gcc >/dev/null || need_pkgs+=(gcc)
command -v python3 >/dev/null || need_pkgs+=(python3)
command -v timeout >/dev/null || need_pkgs+=(coreutils)
command -v mountpoint >/dev/null || need_pkgs+=(util-linux)
if [[ $FS_UNDER_TEST == mmapfs ]] && ! command -v fusermount3 >/dev/null; then need_pkgs+=(fuse3); fi
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"; } >&2 ||
        die "could not install ${need_pkgs[*]}"
fi

START_NS=$(date +%s%N)
MMAPFS=$REPO/target/release/mmapfs
if [[ $FS_UNDER_TEST == mmapfs ]]; then
    if ((BUILD)); then
        log "cargo build --release"
        (cd "$REPO" && cargo build --release) >&2 || die "cargo build --release failed"
    fi
    [[ -x $MMAPFS ]] || die "$MMAPFS not found (build failed or --no-build)"
fi

# ---------------------------------------------------------------- temp dirs, mounts, cleanup
TMP="" IMAGE="" IMAGE_DIR_CREATED=0 HOST_DIR=""
FS_NAMES=(tmpfs mmapfs host) # A, B, C: the labels in the results
MNT_A="" MNT_B="" MNT_C=""
SIDES=(A B)
((HOST)) && SIDES+=(C)
MOUNTED_A=0 MOUNTED_B=0 FUSE_CONN="" DAEMON_PID=""
declare -A DEAD=()

# The pid of the mmapfs daemon we started: the process that holds the image open (found once, after mount).
find_daemon_pid() {
    { find /proc/[0-9]*/fd -maxdepth 1 -lname "$IMAGE" 2>/dev/null || true; } | awk -F/ '{ print $3 }' | sort -u | head -n 1
}
daemon_alive() {
    [[ -n $DAEMON_PID && -r /proc/$DAEMON_PID/cmdline ]] && tr '\0' ' ' <"/proc/$DAEMON_PID/cmdline" | grep -qF -- "$IMAGE"
}

# The mount table, read without touching the mounted filesystem (a stat of a hung FUSE mount blocks).
is_mounted() { awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }

# run_bounded SECS CMD...: run CMD, give up after SECS without waiting for it (a process blocked in a
# FUSE request the daemon already read cannot be killed until the connection is aborted). 124 = gave up.
run_bounded() {
    local secs=$1 pid i
    shift
    "$@" >/dev/null 2>&1 &
    pid=$!
    for ((i = 0; i < secs * 10; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid"
            return
        fi
        sleep 0.1
    done
    return 124
}

abort_fuse() {
    if [[ -n $FUSE_CONN && -e /sys/fs/fuse/connections/$FUSE_CONN/abort ]]; then
        log "aborting FUSE connection $FUSE_CONN"
        echo 1 >"/sys/fs/fuse/connections/$FUSE_CONN/abort" || true
    fi
}

unmount_one() {
    local mnt=$1 fuse=$2
    # (the exit status of a background job is not reliable inside an EXIT trap: look at the mount table)
    is_mounted "$mnt" || return 0
    run_bounded 60 umount "$mnt" || true
    is_mounted "$mnt" || return 0
    if ((fuse)); then
        run_bounded 30 fusermount3 -u "$mnt" || true
        is_mounted "$mnt" || return 0
    fi
    log "unmount of $mnt failed; forcing"
    if ((fuse)); then abort_fuse; fi
    run_bounded 30 umount "$mnt" || true
    is_mounted "$mnt" && { run_bounded 30 umount -l "$mnt" || true; }
    return 1
}

CLEANED=0
cleanup() {
    local rc=$?
    ((CLEANED)) && return
    CLEANED=1
    trap - INT TERM
    if ((MOUNTED_A)); then unmount_one "$MNT_A" 0 || true; fi
    if ((MOUNTED_B)); then
        unmount_one "$MNT_B" "$([[ $FS_UNDER_TEST == mmapfs ]] && echo 1 || echo 0)" || true
    fi
    if daemon_alive; then
        local i
        for ((i = 0; i < 40; i++)); do
            daemon_alive || break
            sleep 0.25
        done
        if daemon_alive; then
            log "mmapfs daemon (pid $DAEMON_PID) still running after unmount: killing it"
            kill -CONT "$DAEMON_PID" 2>/dev/null || true
            kill -KILL "$DAEMON_PID" 2>/dev/null || true
        fi
    fi
    if ((KEEP)); then
        log "kept $TMP (image: $IMAGE${HOST_DIR:+, host directory: $HOST_DIR})"
    else
        if [[ -n $IMAGE ]]; then rm -f "$IMAGE"; fi
        if [[ -n $HOST_DIR ]]; then rm -rf "$HOST_DIR"; fi
        if ((IMAGE_DIR_CREATED)); then rmdir "$IMAGE_DIR" 2>/dev/null || true; fi
        if [[ -n $TMP ]]; then rm -rf "$TMP"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

STAMP=$(date -u +%Y%m%d-%H%M%S)
RESULTS=$RESULTS_BASE/bench-$STAMP
RAW=$RESULTS/raw
mkdir -p "$RAW"
TMP=$(mktemp -d /var/tmp/mmapfs-bench.XXXXXX)
if [[ -z $IMAGE_DIR ]]; then
    IMAGE_DIR=$TMP/image
fi
if [[ ! -d $IMAGE_DIR ]]; then
    mkdir -p "$IMAGE_DIR"
    IMAGE_DIR_CREATED=1
fi
IMAGE_DIR=$(cd "$IMAGE_DIR" && pwd)
IMAGE=$IMAGE_DIR/bench-$STAMP.img
if ((HOST)); then
    # The host column: a plain directory next to the image, on the same filesystem and disk.
    HOST_DIR=$IMAGE_DIR/bench-$STAMP.host
    MNT_C=$HOST_DIR
    mkdir -p "$MNT_C/bench"
fi
TOOLS=$TMP/tools
export BENCH_TOOLS=$TOOLS
mkdir -p "$TOOLS" "$TMP/mnt-tmpfs" "$TMP/mnt-fut"
MNT_A=$TMP/mnt-tmpfs
MNT_B=$TMP/mnt-fut


mount -t tmpfs -o "size=$TMPFS_SIZE" tmpfs "$MNT_A"
MOUNTED_A=1
# fusectl (/sys/fs/fuse/connections) lets us abort a hung FUSE connection.
if [[ $FS_UNDER_TEST == mmapfs ]] && ! is_mounted /sys/fs/fuse/connections; then
    mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null || log "warning: could not mount fusectl"
fi
if [[ $FS_UNDER_TEST == mmapfs ]]; then
    log "mkfs $IMAGE --size $IMAGE_SIZE"
    timeout 120 "$MMAPFS" mkfs "$IMAGE" --size "$IMAGE_SIZE" >&2 || die "mmapfs mkfs failed"
    mount_cmd=("$MMAPFS" mount)
    [[ -n $THREADS ]] && mount_cmd+=(--threads "$THREADS")
    [[ -n $MOUNT_OPTS ]] && mount_cmd+=(-o "$MOUNT_OPTS")
    # The daemon's log goes with the results (warnings, damage it found).
    mount_cmd+=(--log-file "$RAW/mmapfs-daemon.log" "$IMAGE" "$MNT_B")
    log "${mount_cmd[*]}"
    MOUNTED_B=1
    timeout 60 "${mount_cmd[@]}" >&2 || die "mmapfs mount failed"
    for ((i = 0; i < 50; i++)); do
        is_mounted "$MNT_B" && break
        sleep 0.1
    done
    is_mounted "$MNT_B" || die "mmapfs mount returned but $MNT_B is not a mount point"
    FSTYPE_B=$(findmnt -n -o FSTYPE "$MNT_B" || echo "?")
    DAEMON_PID=$(find_daemon_pid)
    log "mmapfs daemon pid: ${DAEMON_PID:-not found}"
    FUSE_CONN=$(awk -v m="$MNT_B" '$5 == m { print $3 }' /proc/self/mountinfo | tail -n 1 | cut -d: -f2)
else
    FS_NAMES[1]=tmpfs-standin
    mount -t tmpfs -o "size=$TMPFS_SIZE" tmpfs "$MNT_B"
    MOUNTED_B=1
    FSTYPE_B=tmpfs
fi
mkdir -p "$MNT_A/bench" "$MNT_B/bench"
DEV_B=$(awk -v m="$MNT_B" '$5 == m { print $3 }' /proc/self/mountinfo | tail -n 1)
for kv in "${BDI_SETTINGS[@]}"; do
    [[ $kv =~ ^[a-z_]+=[0-9]+$ ]] || die "--bdi wants KEY=NUMBER, got '$kv'"
    [[ -w /sys/class/bdi/$DEV_B/${kv%%=*} ]] || die "no writable /sys/class/bdi/$DEV_B/${kv%%=*}"
    log "bdi $DEV_B: ${kv%%=*} <- ${kv#*=}"
    echo "${kv#*=}" >"/sys/class/bdi/$DEV_B/${kv%%=*}" || die "could not set bdi ${kv%%=*}=${kv#*=}"
done

# ---------------------------------------------------------------- machine and configuration
META=$RESULTS/meta.txt
{
    echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "mode=$( ((QUICK)) && echo quick || echo full)"
    echo "reps=$REPS"
    echo "fs_a=${FS_NAMES[0]}"
    echo "fs_b=${FS_NAMES[1]}"
    ((HOST)) && echo "fs_c=${FS_NAMES[2]}"
    echo "fs_under_test=$FS_UNDER_TEST"
    echo "git_commit=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "git_dirty=$(if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then echo yes; else echo no; fi)"
    echo "hostname=$(hostname)"
    echo "nproc=$(nproc)"
    echo "kernel=$(uname -r)"
    echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown)"
    echo "mem_total=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "fio_version=$(fio --version)"
    echo "sqlite_version=$(sqlite3 --version | cut -d' ' -f1)"
    echo "git_version=$(git --version | cut -d' ' -f3)"
    echo "tmpfs_size=$TMPFS_SIZE"
    echo "image_dir=$IMAGE_DIR"
    echo "image_dir_fs=$(findmnt -n -o FSTYPE,SOURCE --target "$IMAGE_DIR" | tr -s ' ')"
    if ((HOST)); then
        echo "host_mode=$HOST_MODE"
        echo "host_workloads=${HOST_WORKLOADS[*]}"
        echo "host_dir=$HOST_DIR"
        echo "host_fs=$(findmnt -n -o FSTYPE,SOURCE --target "$HOST_DIR" | tr -s ' ')"
        echo "host_mount_opts=$(findmnt -n -o OPTIONS --target "$HOST_DIR")"
    fi
    echo "image_size=$IMAGE_SIZE"
    echo "mount_threads=${THREADS:-default}"
    echo "mount_opts=${MOUNT_OPTS:-none}"
    echo "fstype_b=$FSTYPE_B"
    echo "mount_b=$(findmnt -n -o OPTIONS "$MNT_B")"
    echo "file_size=$BENCH_FILE_SIZE"
    echo "seq_cap_s=$BENCH_SEQ_CAP"
    echo "runtime=$BENCH_RUNTIME"
    echo "msync_size=$BENCH_MSYNC_SIZE"
    echo "cold_io=$BENCH_COLD_IO"
    echo "meta_n=$BENCH_META_N"
    echo "small_n=$BENCH_SMALL_N"
    echo "sql_rows=$BENCH_SQL_ROWS"
    echo "sql_batch=$BENCH_SQL_BATCH"
    echo "sql_mmap=$BENCH_SQL_MMAP"
    echo "sql_commits=$BENCH_SQL_COMMITS"
    echo "dd_mb=$BENCH_DD_MB"
    echo "fsync_size=$BENCH_FSYNC_SIZE"
    echo "git_files=$GIT_FILES"
    echo "bdi_dev=$DEV_B"
    echo "bdi_set=${BDI_SETTINGS[*]:-none}"
    if [[ -d /sys/class/bdi/$DEV_B ]]; then
        for f in /sys/class/bdi/"$DEV_B"/*; do
            [[ -f $f && -r $f ]] || continue
            echo "bdi.$(basename "$f")=$(tr '\n' ' ' <"$f" 2>/dev/null | sed 's/ *$//')"
        done
    else
        echo "bdi.none=no /sys/class/bdi/$DEV_B (no per-mount backing device)"
    fi
    echo "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "vm.dirty_ratio=$(cat /proc/sys/vm/dirty_ratio)"
    echo "vm.dirty_background_ratio=$(cat /proc/sys/vm/dirty_background_ratio)"
} >"$META"

# ---------------------------------------------------------------- tools: fsops, SQL script, git repository
log "preparing tools in $TOOLS"
gcc -O2 -Wall -o "$TOOLS/fsops" "$HELPERS/fsops.c"
{
    echo "PRAGMA mmap_size=$BENCH_SQL_MMAP;"
    echo "PRAGMA journal_mode=WAL;"
    echo "PRAGMA synchronous=FULL;"
    echo "CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, v BLOB NOT NULL);"
    echo "CREATE INDEX t_k ON t(k);"
    for ((lo = 1; lo <= BENCH_SQL_ROWS; lo += BENCH_SQL_BATCH)); do
        hi=$((lo + BENCH_SQL_BATCH - 1))
        ((hi > BENCH_SQL_ROWS)) && hi=$BENCH_SQL_ROWS
        echo "BEGIN; WITH RECURSIVE c(x) AS (SELECT $lo UNION ALL SELECT x + 1 FROM c WHERE x < $hi)" \
            "INSERT INTO t(id, k, v) SELECT x, (x * 7919) % 100003, randomblob(100) FROM c; COMMIT;"
    done
} >"$TOOLS/insert.sql"
python3 "$HELPERS/mkrepo.py" "$GIT_FILES" "$TOOLS/gitsrc"
(
    cd "$TOOLS/gitsrc"
    git init -q -b main
    git add -A .
    git -c user.name=bench -c user.email=bench@localhost commit -q -m "bench source tree"
    git gc -q
) >&2

# ---------------------------------------------------------------- run
fs_healthy() {
    local mnt=$1 side=$2
    # (the host column is a plain directory, not a mount point)
    [[ $side == C ]] || is_mounted "$mnt" || return 1
    run_bounded 15 stat "$mnt/bench" && run_bounded 15 ls "$mnt/bench"
}

# Write back what the last run left dirty on the disk under the image (the host directory's files and the
# image's pages), untimed, so that no run pays for the previous run's write-back. syncfs of that filesystem
# only: the FUSE mount is not asked to sync.
settle_disk() {
    local rc=0
    run_bounded 120 sync -f "$IMAGE_DIR" || rc=$?
    if ((rc == 124)); then
        log "warning: sync -f $IMAGE_DIR not done after 120 s"
    elif ((rc != 0)); then
        log "warning: sync -f $IMAGE_DIR: exit status $rc"
    fi
}

FAILURES=0
run_one() {
    local wl=$1 side=$2 rep=$3 mnt fs out t0 t1 rc
    case $side in
    A) mnt=$MNT_A fs=${FS_NAMES[0]} ;;
    B) mnt=$MNT_B fs=${FS_NAMES[1]} ;;
    C) mnt=$MNT_C fs=${FS_NAMES[2]} ;;
    esac
    out=$RAW/$wl.$fs.$rep
    if [[ -n ${DEAD[$side]:-} ]]; then
        echo "skipped: $fs is not healthy after an earlier failure (${DEAD[$side]})" >"$out.failed"
        FAILURES=$((FAILURES + 1))
        return
    fi
    t0=$(date +%s%N)
    rc=0
    python3 "$HELPERS/runjob.py" "$JOB_TIMEOUT" "$HELPERS/workload.sh" "$wl" "$mnt/bench" "$out" 2>"$out.log" || rc=$?
    t1=$(date +%s%N)
    local secs
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", (b - a) / 1e9}')
    if ((rc != 0)) || [[ ! -s $out.json ]]; then
        local why="exit status $rc"
        ((rc == 124)) && why="timed out after ${JOB_TIMEOUT}s"
        ((rc == 125)) && why="left processes that cannot be killed"
        {
            echo "$why"
            tail -n 20 "$out.log"
        } >"$out.failed"
        FAILURES=$((FAILURES + 1))
        log "FAILED $wl on $fs (rep $rep): $why; $(tail -n 1 "$out.log" 2>/dev/null)"
        if ! fs_healthy "$mnt" "$side"; then
            DEAD[$side]="$wl rep $rep"
            log "$fs at $mnt is not healthy any more: skipping its remaining workloads"
            # Free the processes blocked in it (they cannot be killed otherwise).
            if [[ $side == B && $FS_UNDER_TEST == mmapfs ]]; then abort_fuse; fi
        fi
    else
        log "$wl on $fs (rep $rep): ${secs}s"
    fi
    if [[ $side != A ]]; then settle_disk; fi
}

log "results: $RESULTS"
log "workloads: ${WORKLOADS[*]} | reps: $REPS | ${FS_NAMES[0]} vs ${FS_NAMES[1]}$( ((HOST)) && echo " vs ${FS_NAMES[2]} ($MNT_C; $HOST_MODE: ${HOST_WORKLOADS[*]:-none of these})")"
for ((rep = 1; rep <= REPS; rep++)); do
    for wl in "${WORKLOADS[@]}"; do
        for side in "${SIDES[@]}"; do
            if [[ $side == C ]] && ! on_host "$wl"; then continue; fi
            run_one "$wl" "$side" "$rep"
        done
    done
done

# Record the bdi values again at the end (they can be changed while mounted).
if [[ -d /sys/class/bdi/$DEV_B ]]; then
    for f in max_ratio strict_limit read_ahead_kb; do
        [[ -r /sys/class/bdi/$DEV_B/$f ]] && echo "bdi_end.$f=$(cat "/sys/class/bdi/$DEV_B/$f")" >>"$META"
    done
fi
BENCH_NS=$(($(date +%s%N) - START_NS))

# Unmount now (not only in the trap) so that the fsck of the image can run.
rm -rf "${MNT_A:?}/bench" || true
if ((HOST)); then rm -rf "${MNT_C:?}/bench" || true; fi
unmount_one "$MNT_A" 0 && MOUNTED_A=0
if [[ $FS_UNDER_TEST == mmapfs ]]; then
    if unmount_one "$MNT_B" 1; then
        MOUNTED_B=0
        for ((i = 0; i < 40; i++)); do
            daemon_alive || break
            sleep 0.25
        done
        if daemon_alive; then
            log "mmapfs daemon (pid $DAEMON_PID) did not exit 10 s after unmount: killing it (fsck then checks crash consistency)"
            echo "daemon_killed=yes" >>"$META"
            kill -CONT "$DAEMON_PID" 2>/dev/null || true
            kill -KILL "$DAEMON_PID" 2>/dev/null || true
            for ((i = 0; i < 40; i++)); do
                daemon_alive || break
                sleep 0.25
            done
            FAILURES=$((FAILURES + 1))
        fi
        echo "image_bytes=$(stat -c %s "$IMAGE")" >>"$META"
        echo "image_disk_bytes=$(($(stat -c %b "$IMAGE") * $(stat -c %B "$IMAGE")))" >>"$META"
        timeout 60 "$MMAPFS" info "$IMAGE" >"$RAW/info.log" 2>&1 || true
        if timeout 300 "$MMAPFS" fsck "$IMAGE" >"$RAW/fsck.log" 2>&1; then
            echo "fsck=ok" >>"$META"
        else
            echo "fsck=FAILED (see raw/fsck.log)" >>"$META"
            log "mmapfs fsck of the image FAILED: $(tail -n 3 "$RAW/fsck.log")"
            FAILURES=$((FAILURES + 1))
        fi
    else
        echo "fsck=not run (unmount failed)" >>"$META"
        FAILURES=$((FAILURES + 1))
    fi
else
    unmount_one "$MNT_B" 0 && MOUNTED_B=0
fi
echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$META"
echo "elapsed_s=$(awk -v n="$BENCH_NS" 'BEGIN {printf "%.1f", n / 1e9}')" >>"$META"

# ---------------------------------------------------------------- report
python3 "$HELPERS/report.py" "$RESULTS" "${WORKLOADS[@]}" || {
    log "report.py found runs with unusable output (or failed itself)"
    FAILURES=$((FAILURES + 1))
}
rm -rf "$RESULTS_BASE/latest"
cp -a "$RESULTS" "$RESULTS_BASE/latest"
log "results in $RESULTS (copied to $RESULTS_BASE/latest); total $(awk -v n="$BENCH_NS" 'BEGIN {printf "%.1f", n / 1e9}')s"
if ((FAILURES)); then
    log "$FAILURES job(s) failed"
    exit 1
fi
