#!/usr/bin/env python3
"""Generate the source tree of the git-checkout workload: N files (sizes log-uniform between
200 B and 32 KiB, text content, fixed seed) spread over about N/20 directories two levels deep.

    mkrepo.py N DIR
"""
import os
import random
import sys


def main() -> None:
    n, root = int(sys.argv[1]), sys.argv[2]
    rng = random.Random(20261122)
    ndirs = max(1, n // 20)
    words = ["mmap", "page", "fault", "inode", "extent", "journal", "commit", "fuse", "kernel",
             "cache", "dirty", "write", "read", "sync", "lock", "map", "file", "block", "tree"]
    for i in range(n):
        d = i % ndirs
        path = os.path.join(root, f"pkg{d % 10}", f"mod{d}", f"file{i}.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        size = int(200 * (160 ** rng.random()))  # 200 B .. 32 KiB
        out, total = [], 0
        while total < size:
            line = " ".join(rng.choice(words) for _ in range(8)) + f" {rng.getrandbits(32):08x}\n"
            out.append(line)
            total += len(line)
        with open(path, "w") as f:
            f.write("".join(out)[:size])


if __name__ == "__main__":
    main()
