//! Where the FUSE worker threads run: one per CPU, each pinned to its CPU.
//!
//! Every FUSE request wakes a worker and every reply wakes the client back, so the cost of a
//! wake-up bounds each operation that needs a round trip (create, rename, unlink, a cold read, a
//! write without the writeback cache). Measured on the 2-vCPU VMs this project runs on
//! (`scripts/bench/rtt.sh`): 15-45 µs per round trip when the scheduler placed the workers, which
//! it moves to whichever CPU is idle, and 7-9 µs with one worker pinned to each CPU, wherever the
//! client ran. fuser spawns its workers itself (threads named `fuser-N`), so a short-lived thread
//! finds them in /proc and pins them once they exist.

use std::time::{Duration, Instant};

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// Workers to start when `--threads` is not given: one per CPU this process may use, 1 to 16.
pub fn default_threads() -> u16 {
    allowed_cpus().len().clamp(1, 16) as u16
}

/// The CPUs this process may run on (its affinity mask, e.g. from `taskset` or a cgroup).
fn allowed_cpus() -> Vec<usize> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Pins worker `fuser-N` to the N-th allowed CPU (round robin) once all `threads` workers have
/// started. Pinning is skipped when there are fewer workers than CPUs: a worker pinned away from
/// the CPUs the clients use would only add migrations' worth of distance to every request.
pub fn pin_when_started(threads: usize) {
    let cpus = allowed_cpus();
    if cpus.len() < 2 || threads < cpus.len() {
        log::debug!("not pinning {threads} FUSE workers to {} CPUs", cpus.len());
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("mmapfs-pin".into())
        .spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let workers = fuse_workers();
                if workers.len() >= threads {
                    for (n, tid) in workers {
                        pin(tid, cpus[n % cpus.len()]);
                    }
                    return;
                }
                if Instant::now() > deadline {
                    log::warn!("FUSE workers did not all start; left unpinned");
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the thread that pins FUSE workers: {e}");
    }
}

/// `(N, thread id)` of this process's threads named `fuser-N`.
fn fuse_workers() -> Vec<(usize, i32)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse::<i32>().ok()?;
            let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
            let n = comm
                .trim_end()
                .strip_prefix("fuser-")?
                .parse::<usize>()
                .ok()?;
            Some((n, tid))
        })
        .collect()
}

fn pin(tid: i32, cpu: usize) {
    let mut set = CpuSet::new();
    let result = set
        .set(cpu)
        .and_then(|()| sched_setaffinity(Pid::from_raw(tid), &set));
    match result {
        Ok(()) => log::debug!("FUSE worker thread {tid} pinned to CPU {cpu}"),
        Err(e) => log::warn!("cannot pin FUSE worker thread {tid} to CPU {cpu}: {e}"),
    }
}
