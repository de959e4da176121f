#!/usr/bin/env python3
"""Run one benchmark command with a time limit, and leave no process of it behind.

    runjob.py SECONDS CMD [ARGS...]

`timeout(1)` is not enough here: fio runs its jobs in processes of their own session, which survive when
the shell that started them is killed. This wrapper makes itself a child subreaper (orphans of the command
are re-parented to it), runs the command in a new session, and on timeout, on SIGINT/SIGTERM, or when
the command exits leaving processes behind, sends SIGTERM then SIGKILL to every descendant.

A process blocked in a FUSE request that the daemon has already read cannot be killed at all until the
request is answered or the connection aborted; the wrapper waits a bounded time for them, reports their pids
on stderr and exits anyway (bench.sh then finds the filesystem unhealthy and aborts its FUSE connection).

Exit status: the command's, 124 on timeout, 130 when interrupted.
"""
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


class Interrupted(Exception):
    pass


def on_signal(signum, frame):
    raise Interrupted()


def descendants():
    me = os.getpid()
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
            fields = data.rsplit(")", 1)[1].split()
            state, ppid = fields[0], int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
        if state == "Z":
            continue
        children.setdefault(ppid, []).append(int(d))
    out, stack = [], [me]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_all(grace):
    """SIGTERM every descendant, wait up to `grace` seconds, SIGKILL the rest, wait up to 10 s more."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        left = descendants()
        if not left:
            return []
        for p in left:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reap()
            if not descendants():
                return []
            time.sleep(0.1)
    return descendants()


def main():
    limit = float(sys.argv[1])
    cmd = sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"runjob: timed out after {limit:g}s: {' '.join(cmd)}", file=sys.stderr)
        rc = 124
    except Interrupted:
        rc = 130
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stuck = kill_all(grace=5.0 if rc in (124, 130) else 2.0)
    reap()
    if stuck:
        print(f"runjob: processes that cannot be killed (blocked in the filesystem?): {stuck}", file=sys.stderr)
        if rc == 0:
            rc = 125
    sys.exit(rc)


if __name__ == "__main__":
    main()
