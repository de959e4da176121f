#!/usr/bin/env python3
"""LMDB on the mount (python3-lmdb). LMDB reads everything through a shared memory map of
data.mdb; one environment writes with write() (default), a second with writemap=True (stores
straight into a MAP_SHARED writable mapping, msync on commit).

    lmdb_check.py write DIR    fill DIR/plain and DIR/writemap, read back
    lmdb_check.py verify DIR   read both back (after remount)

Values are derived from their key, so the expected contents are recomputed, not stored.
Prints one line and exits 1 on the first failed check."""
import hashlib
import os
import shutil
import subprocess
import sys

import lmdb

KEYS = 20_000
MAP_SIZE = 128 << 20
ENVS = {"plain": False, "writemap": True}


def fail(msg):
    print(f"lmdb: {msg}", file=sys.stderr)
    sys.exit(1)


def key(i):
    return b"key-%08d" % i


def value(i):
    # Sizes from 16 bytes to ~9 KiB, so some values need overflow pages.
    chunk = hashlib.sha256(b"%d" % i).digest()
    return chunk * (1 + (i * 7919) % 300) if i % 50 == 0 else chunk[: 16 + i % 17]


def expected():
    return {key(i): value(i) for i in range(KEYS) if i % 9 != 4}


def check(env, name, when):
    want = expected()
    found = 0
    with env.begin() as txn:
        stat = txn.stat()
        if stat["entries"] != len(want):
            fail(f"{name} {when}: {stat['entries']} entries, expected {len(want)}")
        for k, v in txn.cursor():
            if want.get(k) != v:
                fail(f"{name} {when}: wrong value for {k!r} ({len(v)} bytes)")
            found += 1
    if found != len(want):
        fail(f"{name} {when}: cursor saw {found} entries, expected {len(want)}")


def open_env(path, writemap):
    return lmdb.open(path, map_size=MAP_SIZE, writemap=writemap, subdir=True, max_dbs=0)


def write(directory):
    for name, writemap in ENVS.items():
        path = os.path.join(directory, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        env = open_env(path, writemap)
        for start in range(0, KEYS, 2_000):
            with env.begin(write=True) as txn:
                for i in range(start, min(start + 2_000, KEYS)):
                    txn.put(key(i), value(i))
        with env.begin(write=True) as txn:
            for i in range(4, KEYS, 9):
                if not txn.delete(key(i)):
                    fail(f"{name}: delete of {key(i)!r} found nothing")
        env.sync(True)
        check(env, name, "in the writing process")
        env.close()
        env = open_env(path, writemap)
        check(env, name, "after reopening")
        env.close()


def verify(directory):
    for name, writemap in ENVS.items():
        path = os.path.join(directory, name)
        if not os.path.exists(os.path.join(path, "data.mdb")):
            fail(f"{path}/data.mdb missing")
        env = open_env(path, writemap)
        check(env, name, "after remount")
        env.close()
        # An independent reader: the C library's own mdb_stat tool (lmdb-utils).
        tool = shutil.which("mdb_stat")
        if tool:
            run = subprocess.run([tool, path], capture_output=True, text=True)
            entries = [l.split()[-1] for l in run.stdout.splitlines() if l.strip().startswith("Entries:")]
            if run.returncode != 0 or entries != [str(len(expected()))]:
                fail(f"mdb_stat {path}: exit {run.returncode}, entries {entries}, expected {len(expected())}"
                     f" ({run.stderr.strip()!r})")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "verify"):
        fail("usage: lmdb_check.py write|verify DIR")
    {"write": write, "verify": verify}[sys.argv[1]](sys.argv[2])
