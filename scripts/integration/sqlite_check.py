#!/usr/bin/env python3
"""SQLite on the mount, with the database file memory-mapped (PRAGMA mmap_size) and in WAL mode
(the -shm index is a MAP_SHARED mapping of a file on the mount).

    sqlite_check.py write DIR    create DIR/test.db, 40,000 rows in transactions, updates, deletes
    sqlite_check.py verify DIR   integrity_check, row count and content checksum (after remount)
    sqlite_check.py reader DIR   (internal) concurrent reader started by `write` during the inserts

Rows are derived from their id, so the expected count and checksum are recomputed, not stored.
Prints one line and exits 1 on the first failed check."""
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys

ROWS = 40_000
BATCH = 1_000
MMAP_SIZE = 256 << 20


def fail(msg):
    print(f"sqlite: {msg}", file=sys.stderr)
    sys.exit(1)


def payload(i, generation):
    seed = hashlib.sha256(f"{i}:{generation}".encode()).digest()
    return seed * (1 + i % 7)


def expected_rows():
    """(id, name, payload) of every row the write phase leaves behind."""
    for i in range(ROWS):
        if i % 10 == 3:
            continue  # deleted
        generation = 1 if i % 5 == 0 else 0  # updated
        yield i, f"row-{i}-{generation}", payload(i, generation)


def digest(rows):
    h = hashlib.sha256()
    count = 0
    for i, name, blob in rows:
        h.update(f"{i}|{name}|".encode())
        h.update(blob)
        count += 1
    return count, h.hexdigest()


def mapped_paths():
    with open("/proc/self/maps") as maps:
        return {line.split(None, 5)[5].strip() for line in maps if len(line.split(None, 5)) == 6}


def connect(path):
    db = sqlite3.connect(path, isolation_level=None)
    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        fail(f"journal_mode=WAL returned {mode!r}")
    db.execute(f"PRAGMA mmap_size={MMAP_SIZE}")
    got = db.execute("PRAGMA mmap_size").fetchone()[0]
    if got != MMAP_SIZE:
        fail(f"PRAGMA mmap_size is {got}, expected {MMAP_SIZE} (mmap disabled in this SQLite build?)")
    return db


def check_mapped(path):
    real = os.path.realpath(path)
    maps = mapped_paths()
    for needed in (real, real + "-shm"):
        if needed not in maps:
            fail(f"{needed} is not memory-mapped by this process (/proc/self/maps)")


def check(db, path, when):
    result = db.execute("PRAGMA integrity_check").fetchall()
    if result != [("ok",)]:
        fail(f"integrity_check {when}: {result[:5]}")
    found = digest(db.execute("SELECT id, name, payload FROM t ORDER BY id"))
    want = digest(expected_rows())
    if found != want:
        fail(f"{when}: (row count, sha256) is {found}, expected {want}")
    indexed = db.execute("SELECT count(*) FROM t INDEXED BY t_name WHERE name LIKE 'row-%'").fetchone()[0]
    if indexed != want[0]:
        fail(f"{when}: index scan found {indexed} rows, expected {want[0]}")
    check_mapped(path)


def write(directory):
    path = os.path.join(directory, "test.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    db = connect(path)
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL, payload BLOB NOT NULL)")
    db.execute("CREATE INDEX t_name ON t(name)")
    # Another process reads concurrently through its own mappings of the database and -shm.
    stop = os.path.join(directory, "reader.stop")
    if os.path.exists(stop):
        os.remove(stop)
    reader = subprocess.Popen([sys.executable, os.path.abspath(__file__), "reader", directory])
    for start in range(0, ROWS, BATCH):
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO t VALUES (?, ?, ?)",
            ((i, f"row-{i}-0", payload(i, 0)) for i in range(start, min(start + BATCH, ROWS))),
        )
        db.execute("COMMIT")
        if reader.poll() is not None:
            fail(f"concurrent reader exited early with status {reader.returncode}")
    open(stop, "w").close()
    try:
        status = reader.wait(timeout=60)
    except subprocess.TimeoutExpired:
        reader.kill()
        fail("concurrent reader did not stop within 60 s")
    if status != 0:
        fail(f"concurrent reader exited with status {status}")
    os.remove(stop)
    db.execute("BEGIN")
    db.executemany("UPDATE t SET name = ?, payload = ? WHERE id = ?",
                   ((f"row-{i}-1", payload(i, 1), i) for i in range(0, ROWS, 5)))
    db.execute("COMMIT")
    db.execute("BEGIN")
    db.executemany("DELETE FROM t WHERE id = ?", ((i,) for i in range(3, ROWS, 10)))
    db.execute("COMMIT")
    # A second connection reads through its own mappings while the first still holds the WAL.
    other = connect(path)
    check(other, path, "from a second connection")
    other.close()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    check(db, path, "after checkpoint")
    db.close()


def reader(directory):
    """Until told to stop: every snapshot holds whole insert transactions with the right data."""
    path = os.path.join(directory, "test.db")
    stop = os.path.join(directory, "reader.stop")
    db = connect(path)
    snapshots = 0
    while True:
        stopping = os.path.exists(stop)
        db.execute("BEGIN")
        count, top = db.execute("SELECT count(*), coalesce(max(id), -1) FROM t").fetchone()
        if count % BATCH != 0 or top != count - 1:
            fail(f"concurrent reader saw a torn transaction: {count} rows, max id {top}")
        if count:
            i = (snapshots * 7919) % count
            row = db.execute("SELECT name, payload FROM t WHERE id = ?", (i,)).fetchone()
            if row != (f"row-{i}-0", payload(i, 0)):
                fail(f"concurrent reader: wrong contents for row {i}")
        db.execute("COMMIT")
        snapshots += 1
        if stopping:
            break
    check_mapped(path)
    db.close()
    if snapshots < 2:
        fail(f"concurrent reader only took {snapshots} snapshots")


def verify(directory):
    path = os.path.join(directory, "test.db")
    if not os.path.exists(path):
        fail(f"{path} missing")
    db = connect(path)
    check(db, path, "after remount")
    db.close()
    # An independent reader: the sqlite3 command-line shell, also with mmap enabled.
    shell = shutil.which("sqlite3")
    if shell:
        want = sum(1 for _ in expected_rows())
        sql = f"PRAGMA mmap_size={MMAP_SIZE}; PRAGMA integrity_check; SELECT count(*) FROM t;"
        run = subprocess.run([shell, "-batch", path, sql], capture_output=True, text=True)
        lines = run.stdout.split()
        if run.returncode != 0 or lines[-2:] != ["ok", str(want)]:
            fail(f"sqlite3 shell: exit {run.returncode}, output {run.stdout.strip()!r} {run.stderr.strip()!r},"
                 f" expected integrity 'ok' and {want} rows")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "verify", "reader"):
        fail("usage: sqlite_check.py write|verify DIR")
    {"write": write, "verify": verify, "reader": reader}[sys.argv[1]](sys.argv[2])
