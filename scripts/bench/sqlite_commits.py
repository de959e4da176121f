#!/usr/bin/env python3
"""SQLite autocommit inserts: every INSERT is its own transaction, so every row pays a full commit.

    sqlite_commits.py DB JOURNAL_MODE SYNCHRONOUS N

JOURNAL_MODE is a PRAGMA journal_mode (delete, wal, ...), SYNCHRONOUS a PRAGMA synchronous (full, normal).
The database is created fresh (DB, DB-journal, DB-wal and DB-shm removed first, and again at the end); the
schema is the one of the batched sqlite workload (id, indexed integer, 100-byte blob). Creating it is not
timed; the N inserts are, one at a time. In rollback mode (delete) with synchronous=FULL a commit writes and
fsyncs the journal (and, the first time, its directory), writes and fsyncs the database, and deletes the
journal; in WAL mode it appends to the WAL and fsyncs it.

Prints one JSON object on stdout:
  {"commit": {"ops": N, "ns": total, "lat_us": {"p50": .., "p90": .., "p99": .., "max": ..}},
   "journal_mode": .., "synchronous": .., "sqlite_version": ..}
Exit status 1 when the mode could not be set, the row count is wrong or integrity_check fails.
"""
import json
import os
import sqlite3
import sys
import time


def pct(sorted_vals, p):
    return sorted_vals[min(len(sorted_vals) - 1, int(len(sorted_vals) * p / 100.0))]


def main():
    db, journal_mode, synchronous, n = sys.argv[1], sys.argv[2].lower(), sys.argv[3].lower(), int(sys.argv[4])
    side = [db + s for s in ("", "-journal", "-wal", "-shm")]
    for f in side:
        if os.path.exists(f):
            os.unlink(f)
    con = sqlite3.connect(db, isolation_level=None)  # autocommit: no implicit BEGIN
    got = con.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0]
    if got.lower() != journal_mode:
        print(f"sqlite_commits: journal_mode={journal_mode} not set (got {got})", file=sys.stderr)
        sys.exit(1)
    con.execute(f"PRAGMA synchronous={synchronous}")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, v BLOB NOT NULL)")
    con.execute("CREATE INDEX t_k ON t(k)")
    lat = []
    t0 = time.perf_counter_ns()
    for i in range(1, n + 1):
        a = time.perf_counter_ns()
        con.execute("INSERT INTO t(id, k, v) VALUES (?, ?, randomblob(100))", (i, (i * 7919) % 100003))
        lat.append(time.perf_counter_ns() - a)
    total = time.perf_counter_ns() - t0
    if con.in_transaction:
        print("sqlite_commits: a transaction is open after the inserts (not autocommit?)", file=sys.stderr)
        sys.exit(1)
    rows = con.execute("SELECT count(*) FROM t").fetchone()[0]
    check = con.execute("PRAGMA integrity_check").fetchone()[0]
    con.close()
    if rows != n or check != "ok":
        print(f"sqlite_commits: rows={rows} (want {n}) integrity_check={check}", file=sys.stderr)
        sys.exit(1)
    for f in side:
        if os.path.exists(f):
            os.unlink(f)
    lat.sort()
    us = [v / 1000.0 for v in lat]
    doc = {
        "commit": {"ops": n, "ns": total,
                   "lat_us": {"p50": pct(us, 50), "p90": pct(us, 90), "p99": pct(us, 99), "max": us[-1]}},
        "journal_mode": journal_mode,
        "synchronous": synchronous,
        "sqlite_version": sqlite3.sqlite_version,
    }
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
