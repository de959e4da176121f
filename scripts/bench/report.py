#!/usr/bin/env python3
"""Turn the raw output of scripts/bench.sh into results.md, results.json and chart.svg.

    report.py RESULTS_DIR WORKLOAD...

RESULTS_DIR holds meta.txt (key=value lines written by bench.sh) and raw/<workload>.<fs>.<rep>.json
(fio JSON output, or the JSON of fsops / the sqlite and git steps) or .failed (why it did not run).
Prints the Markdown table on stdout. Exit status 0, or 1 when a run that exited 0 left output that reports an
error (e.g. fio's per-job "error") or cannot be parsed; the other failures are counted by bench.sh.

Every figure is the median over the repetitions that ran. The ratio is always "fraction of tmpfs speed"
(higher is better, 1.0 = as fast as tmpfs): under_test/tmpfs for throughputs, tmpfs/under_test for
latencies and durations.
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
    reps = int(meta["reps"])
    standin = meta.get("fs_under_test") != "mmapfs"

    metrics, failures = [], []
    unparsable = 0
    for wl in workloads:
        specs = METRICS[wl]
        vals = {fs: [[] for _ in specs] for fs in (fs_a, fs_b)}
        for fs in (fs_a, fs_b):
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
            ratio = None
            if ma is not None and mb is not None and ma > 0 and mb > 0:
                ratio = mb / ma if better == HIGHER else ma / mb
            metrics.append({
                "workload": wl, "metric": label, "unit": unit, "better": better,
                "tmpfs": {"values": a, "median": ma},
                "under_test": {"values": b, "median": mb},
                "ratio": ratio,
            })

    msync = {}
    for m in metrics:
        if m["workload"] == "msync" and m["metric"] == "msync latency p99":
            for key, fs in (("tmpfs", fs_a), ("under_test", fs_b)):
                p99 = m[key]["median"]
                msync.setdefault(fs, {}).update(
                    {"p99_us": p99, "p99_below_1ms": (p99 < 1000.0) if p99 is not None else None})
        if m["workload"] == "msync" and m["metric"] == "msync latency p50":
            for key, fs in (("tmpfs", fs_a), ("under_test", fs_b)):
                msync.setdefault(fs, {})["p50_us"] = m[key]["median"]

    bdi = {k[4:]: v for k, v in meta.items() if k.startswith("bdi.")}
    doc = {
        "meta": meta,
        "tmpfs_name": fs_a,
        "under_test_name": fs_b,
        "under_test_is_standin": standin,
        "ratio_definition": "fraction of tmpfs speed, higher is better, 1.0 = tmpfs speed "
                            "(under_test/tmpfs for throughputs, tmpfs/under_test for latencies and durations)",
        "metrics": metrics,
        "msync": msync,
        "bdi": bdi,
        "failures": failures,
    }
    with open(os.path.join(results, "results.json"), "w") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")

    md = markdown(doc, meta, fs_a, fs_b, standin)
    with open(os.path.join(results, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(results, "chart.svg"), "w") as f:
        f.write(chart(metrics, meta, fs_a, fs_b, standin))
    sys.stdout.write(md)
    if unparsable:
        print(f"report.py: {unparsable} run(s) exited 0 but their output reports an error or cannot be read",
              file=sys.stderr)
        sys.exit(1)


def markdown(doc, meta, fs_a, fs_b, standin):
    out = []
    title = f"# mmapfs benchmark: {fs_b} vs {fs_a}"
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
    ratio_col = f"{fs_b}/{fs_a} speed"
    out.append(f"| workload | metric | {fs_a} | {fs_b} | {ratio_col} |")
    out.append("|---|---|---:|---:|---:|")
    for m in doc["metrics"]:
        unit = m["unit"]
        cells = []
        for key in ("tmpfs", "under_test"):
            s = m[key]
            cell = fmt(s["median"], unit) if s["values"] else "FAILED"
            n = len(s["values"])
            if s["values"] and n < int(meta["reps"]):
                cell += f" ({n}/{meta['reps']} reps)"
            cells.append(cell)
        arrow = "" if m["better"] == HIGHER else " (lower is better)"
        out.append(f"| {m['workload']} | {m['metric']}{arrow} | {cells[0]} | {cells[1]} | {fmt_ratio(m['ratio'])} |")
    out.append("")
    out.append(f"Ratio = fraction of {fs_a} speed: higher is better, 1.00 = as fast as {fs_a} "
               f"({fs_b}/{fs_a} for throughputs, {fs_a}/{fs_b} for latencies and durations).")
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


def chart(metrics, meta, fs_a, fs_b, standin):
    rows = [m for m in metrics]
    label_w, bar_w, row_h, top, bottom = 380, 520, 22, 70, 50
    width = label_w + bar_w + 90
    height = top + row_h * len(rows) + bottom
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
        label = f"{m['workload']}: {m['metric']}"
        s.append(f'<text x="{label_w - 8}" y="{y + row_h * 0.68:.1f}" text-anchor="end">{e(label)}</text>')
        r = m["ratio"]
        if r is None:
            s.append(f'<text x="{label_w + 4}" y="{y + row_h * 0.68:.1f}" fill="#b00">failed / not run</text>')
            continue
        color = "#2e7d32" if r >= 0.8 else ("#f9a825" if r >= 0.3 else "#c62828")
        s.append(f'<rect x="{label_w}" y="{y + 3}" width="{max(x(r) - label_w, 1):.1f}" height="{row_h - 6}" '
                 f'fill="{color}"><title>{e(label)}: {fmt_ratio(r)}</title></rect>')
        s.append(f'<text x="{x(r) + 4:.1f}" y="{y + row_h * 0.68:.1f}">{fmt_ratio(r)}</text>')
    one = x(1.0)
    s.append(f'<line x1="{one:.1f}" y1="{top - 8}" x2="{one:.1f}" y2="{top + row_h * len(rows)}" '
             f'stroke="#000" stroke-dasharray="4 3"/>')
    s.append(f'<text x="{one:.1f}" y="{top - 12}" text-anchor="middle">1.0 = {e(fs_a)}</text>')
    s.append(f'<text x="{label_w}" y="{height - 10}" fill="#555">ratio: {e(fs_b)}/{e(fs_a)} for throughputs, '
             f'{e(fs_a)}/{e(fs_b)} for latencies and durations</text>')
    s.append("</svg>")
    return "\n".join(s) + "\n"


if __name__ == "__main__":
    main()
