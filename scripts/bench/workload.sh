#!/usr/bin/env bash
# Runs ONE benchmark workload in ONE directory; called by scripts/bench.sh under `timeout`.
#
#   workload.sh WORKLOAD DIR OUT
#
# Writes OUT.json (fio JSON output, or the JSON of fsops/sqlite/dd/git timings) and logs to stderr.
# Configuration comes from the environment (exported by bench.sh):
#   BENCH_FILE_SIZE   size of the big file for sequential/random jobs (fio syntax, e.g. 1g)
#   BENCH_SEQ_CAP     runtime cap of the sequential jobs, seconds
#   BENCH_RUNTIME     runtime of the time-based jobs (fio syntax, e.g. 5s or 500ms)
#   BENCH_MSYNC_SIZE  size of the file of the msync job
#   BENCH_COLD_IO     bytes read by the cold random-read jobs (bounded, so that they stay cold)
#   BENCH_META_N      number of files of the metadata jobs
#   BENCH_SMALL_N     number of files of the small-file job
#   BENCH_SQL_ROWS / BENCH_SQL_BATCH   SQLite rows and rows per transaction
#   BENCH_SQL_MMAP    PRAGMA mmap_size in bytes
#   BENCH_SQL_COMMITS number of autocommit inserts of the fsync-sqlite-* jobs
#   BENCH_DD_MB       MiB written by the fsync-dd job
#   BENCH_FSYNC_SIZE  size of the laid-out file of the fsync-randwrite job (fio syntax)
#   BENCH_TOOLS       directory holding fsops, the SQL scripts and the git source repository
#   BENCH_HELPERS     directory of the helper scripts (sqlite_commits.py); default: this script's directory
set -euo pipefail

wl=$1
dir=$2
out=$3

: "${BENCH_FILE_SIZE:?}" "${BENCH_SEQ_CAP:?}" "${BENCH_RUNTIME:?}" "${BENCH_MSYNC_SIZE:?}" "${BENCH_COLD_IO:?}"
: "${BENCH_META_N:?}" "${BENCH_SMALL_N:?}" "${BENCH_SQL_ROWS:?}" "${BENCH_SQL_BATCH:?}"
: "${BENCH_SQL_MMAP:?}" "${BENCH_TOOLS:?}" "${BENCH_SQL_COMMITS:?}" "${BENCH_DD_MB:?}" "${BENCH_FSYNC_SIZE:?}"
: "${BENCH_HELPERS:=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"

now_ns() { date +%s%N; }

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# fio_run NAME ARGS... : one fio job, JSON output in $out.json.
# invalidate=0 everywhere: the cold jobs drop the caches explicitly before fio starts.
fio_run() {
    local name=$1
    shift
    fio --output-format=json --output="$out.json" \
        --name="$name" --ioengine=psync --direct=0 --invalidate=0 --fallocate=none \
        --randrepeat=1 --norandommap --group_reporting --unlink=0 "$@"
}

big=$dir/seq.dat
big_bytes=$(numfmt --from=iec "${BENCH_FILE_SIZE^^}")

# The jobs other than seq-write-cold expect the big file fully written (the sequential jobs leave it in
# place); when it is missing or short (a subset run with --only, an earlier failure), write it, untimed.
ensure_big() {
    if [[ ! -f $big || $(stat -c %s "$big") -lt $big_bytes ]]; then
        echo "writing $big ($BENCH_FILE_SIZE) first" >&2
        rm -f "$big"
        fio --output=/dev/null --name=prepare --filename="$big" --size="$BENCH_FILE_SIZE" --rw=write --bs=1m \
            --ioengine=psync --fallocate=none >&2
    fi
}
seq_args=(--filename="$big" --size="$BENCH_FILE_SIZE" --runtime="$BENCH_SEQ_CAP")
rand_args=(--filename="$big" --size="$BENCH_FILE_SIZE" --time_based --runtime="$BENCH_RUNTIME")
# Cold random reads read a bounded amount (not time based): a time-based job would warm the cache as it runs.
cold_rand_args=(--filename="$big" --size="$BENCH_FILE_SIZE" --io_size="$BENCH_COLD_IO" --runtime="$BENCH_SEQ_CAP")

case $wl in
seq-write-cold | msync | fsync-* | meta-* | smallfiles | sqlite | git-checkout) ;;
*) ensure_big ;;
esac

case $wl in
# ---- sequential, 1 MiB blocks, psync, on one file of BENCH_FILE_SIZE ----
seq-write-cold)
    rm -f "$big"
    drop_caches
    fio_run "$wl" "${seq_args[@]}" --rw=write --bs=1m
    ;;
seq-read-cold)
    drop_caches
    fio_run "$wl" "${seq_args[@]}" --rw=read --bs=1m
    ;;
seq-read-warm)
    fio_run "$wl" "${seq_args[@]}" --rw=read --bs=1m --pre_read=1
    ;;
seq-write-warm)
    fio_run "$wl" "${seq_args[@]}" --rw=write --bs=1m --pre_read=1
    ;;
# ---- random 4 KiB, psync, same file: cold (caches dropped, bounded) and warm (time based) ----
rand-read-cold)
    drop_caches
    fio_run "$wl" "${cold_rand_args[@]}" --rw=randread --bs=4k
    ;;
rand-read)
    fio_run "$wl" "${rand_args[@]}" --rw=randread --bs=4k --pre_read=1
    ;;
rand-write)
    fio_run "$wl" "${rand_args[@]}" --rw=randwrite --bs=4k
    ;;
# ---- the same patterns through mmap (fio ioengine=mmap: memcpy to/from a MAP_SHARED mapping) ----
mmap-seq-write)
    fio_run "$wl" "${seq_args[@]}" --ioengine=mmap --rw=write --bs=1m
    ;;
mmap-seq-read-cold)
    drop_caches
    fio_run "$wl" "${seq_args[@]}" --ioengine=mmap --rw=read --bs=1m
    ;;
mmap-seq-read)
    fio_run "$wl" "${seq_args[@]}" --ioengine=mmap --rw=read --bs=1m --pre_read=1
    ;;
mmap-rand-read-cold)
    drop_caches
    fio_run "$wl" "${cold_rand_args[@]}" --ioengine=mmap --rw=randread --bs=4k
    ;;
mmap-rand-read)
    fio_run "$wl" "${rand_args[@]}" --ioengine=mmap --rw=randread --bs=4k --pre_read=1
    ;;
mmap-rand-write)
    fio_run "$wl" "${rand_args[@]}" --ioengine=mmap --rw=randwrite --bs=4k
    ;;
# ---- msync-heavy: every 4 KiB store into the mapping is followed by msync(MS_SYNC) ----
msync)
    fio_run "$wl" --filename="$dir/msync.dat" --size="$BENCH_MSYNC_SIZE" --time_based \
        --runtime="$BENCH_RUNTIME" --ioengine=mmap --rw=randwrite --bs=4k --fsync=1
    ;;
# ---- fsync-heavy: durability at the price of the disk (compare with the host filesystem column) ----
# 4 KiB random writes (psync), each followed by fsync, on a file laid out and fsynced first (untimed)
# ---- the psync write jobs again, each ending in fsync (fio counts the final fsync in its time) ----
fsync-seq-write)
    rm -f "$big"
    fio_run "$wl" "${seq_args[@]}" --rw=write --bs=1m --end_fsync=1
    ;;
fsync-rand-write)
    ensure_big
    fio_run "$wl" "${rand_args[@]}" --rw=randwrite --bs=4k --end_fsync=1
    ;;
fsync-randwrite)
    f=$dir/fsync.dat
    rm -f "$f"
    fio --output=/dev/null --name=prepare --filename="$f" --size="$BENCH_FSYNC_SIZE" --rw=write --bs=1m \
        --ioengine=psync --fallocate=none --end_fsync=1 >&2
    fio_run "$wl" --filename="$f" --size="$BENCH_FSYNC_SIZE" --time_based --runtime="$BENCH_RUNTIME" \
        --rw=randwrite --bs=4k --fsync=1
    rm -f "$f"
    ;;
# dd of a new file, 1 MiB blocks, conv=fsync: timed from the start of dd to the end of its final fsync
fsync-dd)
    f=$dir/dd.dat
    rm -f "$f"
    t0=$(now_ns)
    dd if=/dev/zero of="$f" bs=1M count="$BENCH_DD_MB" conv=fsync
    t1=$(now_ns)
    bytes=$(stat -c %s "$f")
    if ((bytes != BENCH_DD_MB * 1048576)); then
        echo "dd: $f has $bytes bytes, want $((BENCH_DD_MB * 1048576))" >&2
        exit 1
    fi
    printf '{"write": {"bytes": %s, "ns": %s}}\n' "$bytes" "$((t1 - t0))" >"$out.json"
    rm -f "$f"
    ;;
# SQLite, every INSERT its own transaction (autocommit), synchronous=FULL; rollback journal or WAL
fsync-sqlite-rollback | fsync-sqlite-wal)
    mode=delete
    [[ $wl == fsync-sqlite-wal ]] && mode=wal
    python3 "$BENCH_HELPERS/sqlite_commits.py" "$dir/commits.sqlite" "$mode" full "$BENCH_SQL_COMMITS" \
        >"$out.json.tmp"
    mv "$out.json.tmp" "$out.json"
    ;;
# ---- scale: 1, 2, 4 concurrent jobs, 4 KiB random read/write 50/50 on one shared file ----
scale-randrw-1 | scale-randrw-2 | scale-randrw-4)
    fio_run "$wl" "${rand_args[@]}" --rw=randrw --rwmixread=50 --bs=4k --numjobs="${wl##*-}"
    ;;
# ---- metadata: create/stat/rename/unlink of BENCH_META_N empty files, in 1 or 100 directories ----
meta-1dir | meta-100dirs)
    ndirs=1
    [[ $wl == meta-100dirs ]] && ndirs=100
    mkdir -p "$dir/meta"
    "$BENCH_TOOLS/fsops" meta "$dir/meta" "$BENCH_META_N" "$ndirs" >"$out.json.tmp"
    mv "$out.json.tmp" "$out.json"
    rmdir "$dir/meta"
    ;;
# ---- small files (4 KiB, in 100 directories): write, read back warm, read back after drop_caches, delete ----
smallfiles)
    mkdir -p "$dir/small"
    "$BENCH_TOOLS/fsops" small "$dir/small" "$BENCH_SMALL_N" 4096 100 1 >"$out.json.tmp"
    mv "$out.json.tmp" "$out.json"
    rmdir "$dir/small"
    ;;
# ---- SQLite with PRAGMA mmap_size and WAL: inserts in transactions, then a full scan ----
sqlite)
    db=$dir/bench.sqlite
    rm -f "$db" "$db-wal" "$db-shm"
    t0=$(now_ns)
    sqlite3 "$db" <"$BENCH_TOOLS/insert.sql" >/dev/null
    t1=$(now_ns)
    res=$(sqlite3 "$db" "PRAGMA mmap_size=$BENCH_SQL_MMAP;" "SELECT count(*), sum(length(v)) FROM t;" | tail -n 1)
    t2=$(now_ns)
    check=$(sqlite3 "$db" "PRAGMA integrity_check;")
    rows=${res%%|*}
    if [[ $rows != "$BENCH_SQL_ROWS" || $check != ok ]]; then
        echo "sqlite: rows=$rows (want $BENCH_SQL_ROWS) integrity_check=$check" >&2
        exit 1
    fi
    printf '{"insert": {"ops": %s, "ns": %s}, "scan": {"ops": %s, "ns": %s}}\n' \
        "$rows" "$((t1 - t0))" "$rows" "$((t2 - t1))" >"$out.json"
    rm -f "$db" "$db-wal" "$db-shm"
    ;;
# ---- git: checkout of the generated repository (clone --no-checkout untimed), then git status ----
git-checkout)
    dst=$dir/repo
    rm -rf "$dst"
    git clone -q --no-checkout --no-hardlinks "$BENCH_TOOLS/gitsrc" "$dst"
    t0=$(now_ns)
    git -C "$dst" checkout -q -f main
    t1=$(now_ns)
    st=$(git -C "$dst" status --porcelain)
    t2=$(now_ns)
    if [[ -n $st ]]; then
        echo "git status not clean after checkout:" >&2
        echo "$st" | head >&2
        exit 1
    fi
    files=$(git -C "$dst" ls-files | wc -l)
    printf '{"checkout": {"ops": %s, "ns": %s}, "status": {"ops": %s, "ns": %s}}\n' \
        "$files" "$((t1 - t0))" "$files" "$((t2 - t1))" >"$out.json"
    rm -rf "$dst"
    ;;
*)
    echo "unknown workload: $wl" >&2
    exit 2
    ;;
esac
