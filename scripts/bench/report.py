#!/usr/bin/env python3
"""Turn the raw output of scripts/bench.sh into results.md, results.json and chart.svg.

    report.py RESULTS_DIR WORKLOAD...

RESULTS_DIR holds meta.txt (key=value lines written by bench.sh) and raw/<workload>.<fs>.<rep>.json
(fio JSON output, or the JSON of fsops / the sqlite, dd and git steps) or .failed (why it did not run).
Prints the Markdown table on stdout. Exit status 0, or 1 when a run that exited 0 left output that reports an
error (e.g. fio's per-job "error") or cannot be parsed; the other failures are counted by bench.sh.

Every figure is the median over the repetitions that ran. The ratio is always "fraction of tmpfs speed"
(higher is better, 1.0 = as fast as tmpfs): under_test/tmpfs for throughputs, tmpfs/under_test for
latencies and durations. When meta.txt names a third filesystem (fs_c: the host filesystem under the image,
absent in results of older versions and with --no-host), each metric also gets its host figures and
ratio_host, the "fraction of host speed" defined the same way (under_test/host, host/under_test), and the
fsync-heavy rows are listed against the target of issue 8: within 1.5x of the host (ratio_host >= 1/1.5).
"""
import html
import json
import os
import statistics
import sys


def load_meta(path):
    meta = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" in line:
                k, v = line.split("=", 1)
                meta[k] = v
    return meta


def load_json(path):
    with open(path) as f:
        text = f.read()
    # fio may print notes before the JSON document
    start = text.find("{")
    if start < 0:
        raise ValueError(f"{path}: no JSON object")
    return json.loads(text[start:])


MIB = 1024 * 1024


def fio_job(doc):
    jobs = doc.get("jobs") or []
    if not jobs:
        raise ValueError("fio output has no jobs")
    job = jobs[0]
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']}")
    return job


def fio_bw(direction):
    def get(doc):
        return fio_job(doc)[direction]["bw_bytes"] / MIB
    return get


def fio_iops(*directions):
    def get(doc):
        job = fio_job(doc)
        return sum(job[d]["iops"] for d in directions)
    return get


def fio_sync_pct(pct):
    def get(doc):
        lat = fio_job(doc)["sync"]["lat_ns"]
        if not lat.get("N"):
            raise ValueError("no sync operations recorded")
        return lat["percentile"][pct] / 1000.0
    return get


def tool_rate(phase):
    def get(doc):
        p = doc[phase]
        if "ops_per_s" in p:
            return p["ops_per_s"]
        return p["ops"] / (p["ns"] / 1e9)
    return get


def tool_bw(phase):
    def get(doc):
        p = doc[phase]
        return p["bytes"] / MIB / (p["ns"] / 1e9)
    return get


def tool_secs(phase, scale=1.0):
    def get(doc):
        p = doc[phase]
        secs = p["secs"] if "secs" in p else p["ns"] / 1e9
        return secs * scale
    return get


# workload -> list of (metric label, unit, better, extractor)
HIGHER, LOWER = "higher", "lower"
METRICS = {
    "seq-write-cold": [("write 1 MiB psync, caches dropped", "MiB/s", HIGHER, fio_bw("write"))],
    "seq-read-cold": [("read 1 MiB psync, caches dropped", "MiB/s", HIGHER, fio_bw("read"))],
    "seq-read-warm": [("read 1 MiB psync, cached", "MiB/s", HIGHER, fio_bw("read"))],
    "seq-write-warm": [("overwrite 1 MiB psync, cached", "MiB/s", HIGHER, fio_bw("write"))],
    "rand-read-cold": [("read 4 KiB psync, caches dropped", "IOPS", HIGHER, fio_iops("read"))],
    "rand-read": [("read 4 KiB psync, cached", "IOPS", HIGHER, fio_iops("read"))],
    "rand-write": [("write 4 KiB psync", "IOPS", HIGHER, fio_iops("write"))],
    "mmap-seq-write": [("write 1 MiB mmap", "MiB/s", HIGHER, fio_bw("write"))],
    "mmap-seq-read-cold": [("read 1 MiB mmap, caches dropped", "MiB/s", HIGHER, fio_bw("read"))],
    "mmap-seq-read": [("read 1 MiB mmap, cached", "MiB/s", HIGHER, fio_bw("read"))],
    "mmap-rand-read-cold": [("read 4 KiB mmap, caches dropped", "IOPS", HIGHER, fio_iops("read"))],
    "mmap-rand-read": [("read 4 KiB mmap, cached", "IOPS", HIGHER, fio_iops("read"))],
    "mmap-rand-write": [("write 4 KiB mmap", "IOPS", HIGHER, fio_iops("write"))],
    "msync": [
        ("4 KiB mmap write + msync", "ops/s", HIGHER, fio_iops("write")),
        ("msync latency p50", "µs", LOWER, fio_sync_pct("50.000000")),
        ("msync latency p99", "µs", LOWER, fio_sync_pct("99.000000")),
    ],
    "fsync-randwrite": [
        ("4 KiB random write + fsync, laid-out file", "IOPS", HIGHER, fio_iops("write")),
        ("fsync latency p50", "µs", LOWER, fio_sync_pct("50.000000")),
        ("fsync latency p99", "µs", LOWER, fio_sync_pct("99.000000")),
    ],
    "fsync-dd": [("dd bs=1M conv=fsync, new file", "MiB/s", HIGHER, tool_bw("write"))],
    "fsync-seq-write": [("write 1 MiB psync + final fsync", "MiB/s", HIGHER, fio_bw("write"))],
    "fsync-rand-write": [("write 4 KiB psync + final fsync", "IOPS", HIGHER, fio_iops("write"))],
    # (journal_mode=DELETE or WAL: the workload's name says which)
    "fsync-sqlite-rollback": [("autocommit insert, synchronous=FULL", "commits/s", HIGHER, tool_rate("commit"))],
    "fsync-sqlite-wal": [("autocommit insert, synchronous=FULL", "commits/s", HIGHER, tool_rate("commit"))],
    "scale-randrw-1": [("4 KiB randrw 50/50, 1 job", "IOPS", HIGHER, fio_iops("read", "write"))],
    "scale-randrw-2": [("4 KiB randrw 50/50, 2 jobs", "IOPS", HIGHER, fio_iops("read", "write"))],
    "scale-randrw-4": [("4 KiB randrw 50/50, 4 jobs", "IOPS", HIGHER, fio_iops("read", "write"))],
    "meta-1dir": [(f"{p}, 1 dir", "ops/s", HIGHER, tool_rate(p)) for p in ("create", "stat", "rename", "unlink")],
    "meta-100dirs": [(f"{p}, 100 dirs", "ops/s", HIGHER, tool_rate(p))
                     for p in ("create", "stat", "rename", "unlink")],
    "smallfiles": [
        ("write 4 KiB files", "files/s", HIGHER, tool_rate("write")),
        ("read back, cached", "files/s", HIGHER, tool_rate("read_warm")),
        ("read back, caches dropped", "files/s", HIGHER, tool_rate("read_cold")),
        ("delete", "files/s", HIGHER, tool_rate("delete")),
    ],
    "sqlite": [
        ("insert (WAL, mmap_size, 1 txn per batch)", "rows/s", HIGHER, tool_rate("insert")),
        ("full scan (mmap)", "rows/s", HIGHER, tool_rate("scan")),
    ],
    "git-checkout": [
        ("git checkout", "ms", LOWER, tool_secs("checkout", 1000.0)),
        ("git status after checkout", "ms", LOWER, tool_secs("status", 1000.0)),
    ],
}

# The rows whose cost is durability (fsync/msync reaching the disk): their reference is the host filesystem,
# and issue 8's target is mmapfs within 1.5x of it.
FSYNC_WORKLOADS = (
    "msync",
    "fsync-randwrite",
    "fsync-dd",
    "fsync-seq-write",
    "fsync-rand-write",
    "fsync-sqlite-rollback",
    "fsync-sqlite-wal",
)
HOST_TARGET = 1 / 1.5


def speed_ratio(under_test, reference, better):
    """Fraction of the reference's speed: under_test/reference for throughputs, the inverse for latencies."""
    if under_test is None or reference is None or under_test <= 0 or reference <= 0:
        return None
    return under_test / reference if better == HIGHER else reference / under_test


def fmt(v, unit=""):
    if v is None:
        return "—"
    a = abs(v)
    if a >= 1e6:
        s = f"{v / 1e6:.2f} M"
    elif a >= 1e4:
        s = f"{v / 1e3:.1f} k"
    elif a >= 100:
        s = f"{v:.0f} "
    elif a >= 10:
        s = f"{v:.1f} "
    else:
        s = f"{v:.3g} "
    return (s + unit).strip()


def fmt_ratio(r):
    if r is None:
        return "—"
    return f"{r:.2f}" if r >= 0.1 else f"{r:.2g}"


def main():
    results, workloads = sys.argv[1], sys.argv[2:]
    raw = os.path.join(results, "raw")
    meta = load_meta(os.path.join(results, "meta.txt"))
    fs_a, fs_b = meta["fs_a"], meta["fs_b"]
    fs_c = meta.get("fs_c")  # the host filesystem, or None
    # the workloads that ran on the host (bench.sh --host fsync runs only the fsync-heavy ones there)
    host_wls = set(meta["host_workloads"].split()) if "host_workloads" in meta else set(workloads)
    reps = int(meta["reps"])
    standin = meta.get("fs_under_test") != "mmapfs"

    metrics, failures = [], []
    unparsable = 0
    for wl in workloads:
        specs = METRICS[wl]
        on_host = bool(fs_c) and wl in host_wls
        all_fs = (fs_a, fs_b, fs_c) if on_host else (fs_a, fs_b)
        vals = {fs: [[] for _ in specs] for fs in all_fs}
        for fs in all_fs:
            for rep in range(1, reps + 1):
                base = os.path.join(raw, f"{wl}.{fs}.{rep}")
                if os.path.exists(base + ".failed"):
                    with open(base + ".failed") as f:
                        failures.append({"workload": wl, "fs": fs, "rep": rep, "reason": f.read().strip()})
                    continue
                try:
                    doc = load_json(base + ".json")
                    got = [spec[3](doc) for spec in specs]
                except (OSError, ValueError, KeyError, ZeroDivisionError, TypeError) as e:
                    failures.append({"workload": wl, "fs": fs, "rep": rep, "reason": f"unparsable output: {e!r}"})
                    unparsable += 1
                    continue
                for i, v in enumerate(got):
                    vals[fs][i].append(v)
        for i, (label, unit, better, _) in enumerate(specs):
            a, b = vals[fs_a][i], vals[fs_b][i]
            ma = statistics.median(a) if a else None
            mb = statistics.median(b) if b else None
            m = {
                "workload": wl, "metric": label, "unit": unit, "better": better,
                "tmpfs": {"values": a, "median": ma},
                "under_test": {"values": b, "median": mb},
                "ratio": speed_ratio(mb, ma, better),
                "host": None,
                "ratio_host": None,
            }
            if on_host:
                c = vals[fs_c][i]
                mc = statistics.median(c) if c else None
                m["host"] = {"values": c, "median": mc}
                m["ratio_host"] = speed_ratio(mb, mc, better)
            metrics.append(m)

    msync = {}
    sides = (("tmpfs", fs_a), ("under_test", fs_b)) + ((("host", fs_c),) if fs_c else ())
    for m in metrics:
        if m["workload"] == "msync" and m["metric"] == "msync latency p99":
            for key, fs in sides:
                if m[key] is None:
                    continue
                p99 = m[key]["median"]
                msync.setdefault(fs, {}).update(
                    {"p99_us": p99, "p99_below_1ms": (p99 < 1000.0) if p99 is not None else None})
        if m["workload"] == "msync" and m["metric"] == "msync latency p50":
            for key, fs in sides:
                if m[key] is not None:
                    msync.setdefault(fs, {})["p50_us"] = m[key]["median"]

    fsync = []
    if fs_c:
        for m in metrics:
            if m["workload"] in FSYNC_WORKLOADS and m["host"] is not None:
                r = m["ratio_host"]
                fsync.append({
                    "workload": m["workload"], "metric": m["metric"], "unit": m["unit"], "better": m["better"],
                    "tmpfs": m["tmpfs"]["median"], "under_test": m["under_test"]["median"],
                    "host": m["host"]["median"], "ratio_host": r, "target_ratio_host": HOST_TARGET,
                    "within_target": (r >= HOST_TARGET) if r is not None else None,
                })

    bdi = {k[4:]: v for k, v in meta.items() if k.startswith("bdi.")}
    doc = {
        "meta": meta,
        "tmpfs_name": fs_a,
        "under_test_name": fs_b,
        "under_test_is_standin": standin,
        "host_name": fs_c,
        "host_fs": meta.get("host_fs") if fs_c else None,
        "ratio_definition": "fraction of tmpfs speed, higher is better, 1.0 = tmpfs speed "
                            "(under_test/tmpfs for throughputs, tmpfs/under_test for latencies and durations)",
        "ratio_host_definition": "fraction of host speed, higher is better, 1.0 = host speed "
                                 "(under_test/host for throughputs, host/under_test for latencies and durations); "
                                 "null without a host column",
        "metrics": metrics,
        "msync": msync,
        "fsync": fsync,
        "bdi": bdi,
        "failures": failures,
    }
    with open(os.path.join(results, "results.json"), "w") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")

    md = markdown(doc, meta, fs_a, fs_b, fs_c, standin)
    with open(os.path.join(results, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(results, "chart.svg"), "w") as f:
        f.write(chart(metrics, meta, fs_a, fs_b, fs_c, standin))
    sys.stdout.write(md)
    if unparsable:
        print(f"report.py: {unparsable} run(s) exited 0 but their output reports an error or cannot be read",
              file=sys.stderr)
        sys.exit(1)


def markdown(doc, meta, fs_a, fs_b, fs_c, standin):
    out = []
    title = f"# mmapfs benchmark: {fs_b} vs {fs_a}" + (f" and {fs_c}" if fs_c else "")
    out.append(title)
    out.append("")
    if standin:
        out.append(f"**NOTE: `{fs_b}` is a second tmpfs standing in for mmapfs (`--fs-under-test tmpfs`); "
                   "these are NOT mmapfs figures.**")
        out.append("")
    out.append(f"{meta.get('date')} · mode {meta.get('mode')} · {meta.get('reps')} repetition(s), medians · "
               f"commit {meta.get('git_commit', '?')[:12]}{' (dirty)' if meta.get('git_dirty') == 'yes' else ''} · "
               f"elapsed {meta.get('elapsed_s')} s")
    out.append("")
    out.append(f"Machine: {meta.get('cpu')}, {meta.get('nproc')} CPUs, {meta.get('mem_total')}, "
               f"kernel {meta.get('kernel')}, {meta.get('fio_version')}, sqlite {meta.get('sqlite_version')}, "
               f"git {meta.get('git_version')}. Load average at start {meta.get('loadavg_start')}, "
               f"at end {meta.get('loadavg_end')} (other processes on the machine skew the figures).")
    out.append("")
    out.append(f"mmapfs image in `{meta.get('image_dir')}` ({meta.get('image_dir_fs')}), mkfs --size "
               f"{meta.get('image_size')}; mount threads {meta.get('mount_threads')}, -o {meta.get('mount_opts')}; "
               f"tmpfs size {meta.get('tmpfs_size')}. Big file {meta.get('file_size')}, time-based jobs "
               f"{meta.get('runtime')}.")
    out.append("")
    if fs_c:
        which = ""
        if meta.get("host_mode") == "fsync":
            which = " Only the fsync-heavy workloads ran there (`--host fsync`, the default of `--quick`)."
        out.append(f"`{fs_c}`: a plain directory on the filesystem that holds the image, `{meta.get('host_dir')}` "
                   f"({meta.get('host_fs')}, {meta.get('host_mount_opts')}), the physical limit for anything that "
                   f"must reach the disk.{which}")
        out.append("")
    ratio_col = f"{fs_b}/{fs_a} speed"
    head = f"| workload | metric | {fs_a} | {fs_b} | {ratio_col} |"
    rule = "|---|---|---:|---:|---:|"
    if fs_c:
        head += f" {fs_c} | {fs_b}/{fs_c} speed |"
        rule += "---:|---:|"
    out.append(head)
    out.append(rule)
    for m in doc["metrics"]:
        unit = m["unit"]
        cells = []
        for key in ("tmpfs", "under_test") + (("host",) if fs_c else ()):
            s = m[key]
            if s is None:
                cells.append("not run")
                continue
            cell = fmt(s["median"], unit) if s["values"] else "FAILED"
            n = len(s["values"])
            if s["values"] and n < int(meta["reps"]):
                cell += f" ({n}/{meta['reps']} reps)"
            cells.append(cell)
        arrow = "" if m["better"] == HIGHER else " (lower is better)"
        row = f"| {m['workload']} | {m['metric']}{arrow} | {cells[0]} | {cells[1]} | {fmt_ratio(m['ratio'])} |"
        if fs_c:
            row += f" {cells[2]} | {fmt_ratio(m['ratio_host'])} |"
        out.append(row)
    out.append("")
    out.append(f"Ratio = fraction of {fs_a} speed: higher is better, 1.00 = as fast as {fs_a} "
               f"({fs_b}/{fs_a} for throughputs, {fs_a}/{fs_b} for latencies and durations).")
    if fs_c:
        out.append(f"The last column is the same against {fs_c}: the fraction of {fs_c} speed "
                   f"({fs_b}/{fs_c} for throughputs, {fs_c}/{fs_b} for latencies and durations).")
    out.append("")
    if doc["fsync"]:
        out.append(f"fsync-heavy rows against {fs_c} (target: {fs_b} within 1.5x of {fs_c}, "
                   f"i.e. {fs_b}/{fs_c} speed >= {HOST_TARGET:.2f}):")
        out.append("")
        for f in doc["fsync"]:
            r = f["ratio_host"]
            verdict = "n/a" if r is None else ("yes" if f["within_target"] else "no")
            arrow = "" if f["better"] == HIGHER else " (lower is better)"
            out.append(f"- {f['workload']}, {f['metric']}{arrow}: {fs_c} {fmt(f['host'], f['unit'])}, "
                       f"{fs_b} {fmt(f['under_test'], f['unit'])}, {fs_b}/{fs_c} speed {fmt_ratio(r)}, "
                       f"within 1.5x: **{verdict}**")
        out.append("")
    if doc["msync"]:
        out.append("msync (every 4 KiB store followed by msync(MS_SYNC)), fio sync latency:")
        out.append("")
        for fs, v in doc["msync"].items():
            below = v.get("p99_below_1ms")
            verdict = "yes" if below else ("no" if below is not None else "n/a")
            out.append(f"- {fs}: p50 {fmt(v.get('p50_us'), 'µs')}, p99 {fmt(v.get('p99_us'), 'µs')}, "
                       f"p99 < 1 ms: **{verdict}**")
        out.append("")
    bdi = doc["bdi"]
    if bdi:
        keys = [k for k in ("max_ratio", "strict_limit", "read_ahead_kb", "min_ratio", "max_bytes", "min_bytes")
                if k in bdi] or sorted(bdi)
        out.append(f"Backing device of the {fs_b} mount ({meta.get('bdi_dev')}): " +
                   ", ".join(f"{k}={bdi[k]}" for k in keys) +
                   f"; vm.dirty_ratio={meta.get('vm.dirty_ratio')}, "
                   f"vm.dirty_background_ratio={meta.get('vm.dirty_background_ratio')}.")
        out.append("")
    if meta.get("bdi_set", "none") != "none":
        out.append(f"bdi settings changed by --bdi for this run: {meta['bdi_set']}.")
        out.append("")
    if "image_bytes" in meta:
        out.append(f"mmapfs image after the run: {int(meta['image_bytes']) / MIB:.0f} MiB "
                   f"({int(meta['image_disk_bytes']) / MIB:.0f} MiB allocated on disk).")
        out.append("")
    if meta.get("daemon_killed") == "yes":
        out.append("**The mmapfs daemon did not exit after unmount and was killed (SIGKILL) before fsck.**")
        out.append("")
    if "fsck" in meta:
        out.append(f"fsck of the image after unmount: {meta['fsck']}.")
        out.append("")
    if doc["failures"]:
        out.append(f"## Failures ({len(doc['failures'])})")
        out.append("")
        for f in doc["failures"]:
            reason = " ".join(f["reason"].split())[:300]
            out.append(f"- {f['workload']} on {f['fs']}, rep {f['rep']}: {reason}")
        out.append("")
    return "\n".join(out)


def chart(metrics, meta, fs_a, fs_b, fs_c, standin):
    rows = [m for m in metrics]
    label_w, bar_w, row_h, top, bottom = 380, 520, 22, 70, 50
    if fs_c:
        row_h, bottom = 30, 66
    width = label_w + bar_w + 90
    height = top + row_h * len(rows) + bottom
    # (the axis follows the tmpfs ratios only; a longer host bar is cut at the edge, its label gives the value)
    ratios = [m["ratio"] for m in rows if m["ratio"] is not None]
    xmax = max([1.0] + ratios) * 1.08
    # round the axis up to a nice value
    for nice in (1.1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100):
        if xmax <= nice:
            xmax = nice
            break

    def x(v):
        return label_w + bar_w * min(v, xmax) / xmax

    e = html.escape
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
         f'<rect width="{width}" height="{height}" fill="white"/>']
    title = f"{fs_b} speed as a fraction of {fs_a} (higher is better, 1.0 = {fs_a})"
    s.append(f'<text x="10" y="22" font-size="15" font-weight="bold">{e(title)}</text>')
    sub = (f"{meta.get('date')} · {meta.get('mode')} · median of {meta.get('reps')} · kernel {meta.get('kernel')} · "
           f"{meta.get('nproc')} CPUs · commit {meta.get('git_commit', '?')[:12]}")
    if standin:
        sub = "STAND-IN: second tmpfs, not mmapfs · " + sub
    s.append(f'<text x="10" y="42" fill="#555">{e(sub)}</text>')
    # grid
    step = xmax / 5
    for i in range(6):
        v = step * i
        gx = x(v)
        s.append(f'<line x1="{gx:.1f}" y1="{top - 8}" x2="{gx:.1f}" y2="{top + row_h * len(rows)}" stroke="#ddd"/>')
        s.append(f'<text x="{gx:.1f}" y="{top + row_h * len(rows) + 16}" text-anchor="middle" fill="#555">'
                 f'{v:.2g}</text>')
    for i, m in enumerate(rows):
        y = top + i * row_h
        ty = y + 22 * 0.68  # text baseline of the tmpfs bar (bar: 16 px high, 3 px below the row's top)
        label = f"{m['workload']}: {m['metric']}"
        s.append(f'<text x="{label_w - 8}" y="{ty:.1f}" text-anchor="end">{e(label)}</text>')
        r = m["ratio"]
        if r is None:
            s.append(f'<text x="{label_w + 4}" y="{ty:.1f}" fill="#b00">failed / not run</text>')
        else:
            color = "#2e7d32" if r >= 0.8 else ("#f9a825" if r >= 0.3 else "#c62828")
            s.append(f'<rect x="{label_w}" y="{y + 3}" width="{max(x(r) - label_w, 1):.1f}" height="16" '
                     f'fill="{color}"><title>{e(label)}: {fmt_ratio(r)}</title></rect>')
            s.append(f'<text x="{x(r) + 4:.1f}" y="{ty:.1f}">{fmt_ratio(r)}</text>')
        if fs_c and m["host"] is not None:
            rh = m["ratio_host"]
            if rh is None:
                s.append(f'<text x="{label_w + 4}" y="{y + 27:.1f}" font-size="9" fill="#b00">'
                         f'{e(fs_c)}: failed / not run</text>')
                continue
            s.append(f'<rect x="{label_w}" y="{y + 21}" width="{max(x(rh) - label_w, 1):.1f}" height="6" '
                     f'fill="#1565c0"><title>{e(label)}: {e(fs_b)}/{e(fs_c)} {fmt_ratio(rh)}</title></rect>')
            s.append(f'<text x="{x(rh) + 4:.1f}" y="{y + 28:.1f}" font-size="9" fill="#1565c0">'
                     f'{fmt_ratio(rh)}{" ▸" if rh > xmax else ""}</text>')
    one = x(1.0)
    s.append(f'<line x1="{one:.1f}" y1="{top - 8}" x2="{one:.1f}" y2="{top + row_h * len(rows)}" '
             f'stroke="#000" stroke-dasharray="4 3"/>')
    s.append(f'<text x="{one:.1f}" y="{top - 12}" text-anchor="middle">1.0 = {e(fs_a)}</text>')
    s.append(f'<text x="{label_w}" y="{height - 10}" fill="#555">ratio: {e(fs_b)}/{e(fs_a)} for throughputs, '
             f'{e(fs_a)}/{e(fs_b)} for latencies and durations</text>')
    if fs_c:
        s.append(f'<text x="{label_w}" y="{height - 28}" fill="#1565c0">thin blue bars: {e(fs_b)}/{e(fs_c)} '
                 f'(fraction of {e(fs_c)} speed, same axis; ▸ = beyond the axis)</text>')
    s.append("</svg>")
    return "\n".join(s) + "\n"


if __name__ == "__main__":
    main()
