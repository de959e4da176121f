//! Live numbers of a mounted filesystem: requests per operation, bytes, fsync latency, commits,
//! image size. The daemon counts (relaxed atomics, one per counter) and serves them in the
//! Prometheus text format on an abstract Unix socket named after the mount's device, so
//! `mmapfs stats MOUNTPOINT`, and an exporter, read them without stopping anything.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::engine::Engine;

/// The FUSE requests counted.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Lookup,
    Forget,
    Getattr,
    Setattr,
    Readlink,
    Mknod,
    Mkdir,
    Unlink,
    Rmdir,
    Symlink,
    Rename,
    Link,
    Open,
    Read,
    Write,
    Flush,
    Fsync,
    Opendir,
    Readdir,
    Fsyncdir,
    Statfs,
    Setxattr,
    Getxattr,
    Listxattr,
    Removexattr,
    Create,
    Fallocate,
    Ioctl,
    Lseek,
    CopyFileRange,
    Access,
}

const OP_NAMES: [&str; 31] = [
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "flush",
    "fsync",
    "opendir",
    "readdir",
    "fsyncdir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "create",
    "fallocate",
    "ioctl",
    "lseek",
    "copy_file_range",
    "access",
];

/// Upper bounds of the fsync latency buckets, in microseconds (then +Inf).
const LATENCY_BOUNDS_US: [u64; 12] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 1_000_000,
];

pub struct Stats {
    started: Instant,
    requests: [AtomicU64; OP_NAMES.len()],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// Cumulative per bucket is computed when rendering; these are per-bucket counts.
    fsync_buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    fsync_sum_us: AtomicU64,
    /// How requests reach the daemon (io_uring or /dev/fuse), from the FUSE session.
    transport: OnceLock<Arc<fuser::TransportStats>>,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            started: Instant::now(),
            requests: Default::default(),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            fsync_buckets: Default::default(),
            fsync_sum_us: AtomicU64::new(0),
            transport: OnceLock::new(),
        }
    }
}

impl Stats {
    /// Attaches the session's transport counters (once, when the session exists).
    pub fn set_transport(&self, t: Arc<fuser::TransportStats>) {
        self.transport.set(t).ok();
    }

    pub fn count(&self, op: Op) {
        self.requests[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn read_bytes(&self, n: usize) {
        self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn written_bytes(&self, n: usize) {
        self.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Records one fsync/fsyncdir (and a client's msync) that took `took`.
    pub fn fsync_done(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.fsync_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.fsync_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every counter and of the engine's state.
    pub fn render(&self, engine: &Engine, at_mount: &AtMount) -> String {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
        let mut s = String::new();
        metric(
            &mut s,
            "uptime_seconds",
            "gauge",
            "Seconds since the mount.",
            &[("", format!("{:.3}", self.started.elapsed().as_secs_f64()))],
        );
        let requests: Vec<(String, String)> = OP_NAMES
            .iter()
            .zip(&self.requests)
            .map(|(name, c)| (format!("{{op=\"{name}\"}}"), load(c)))
            .collect();
        let requests: Vec<(&str, String)> = requests
            .iter()
            .map(|(l, v)| (l.as_str(), v.clone()))
            .collect();
        metric(
            &mut s,
            "requests_total",
            "counter",
            "FUSE requests by operation.",
            &requests,
        );
        if let Some(t) = self.transport.get() {
            metric(
                &mut s,
                "fuse_transport_requests_total",
                "counter",
                "FUSE requests by the way they came: io_uring, or /dev/fuse (not counting FORGET \
                 and INTERRUPT, which always come that way).",
                &[
                    (
                        "{transport=\"io_uring\"}",
                        t.io_uring_requests().to_string(),
                    ),
                    (
                        "{transport=\"dev_fuse\"}",
                        t.dev_fuse_requests().to_string(),
                    ),
                ],
            );
            metric(
                &mut s,
                "fuse_io_uring_queues",
                "gauge",
                "FUSE-over-io_uring queues being served (one per possible CPU; 0 without -o io_uring).",
                &[("", t.io_uring_queues().to_string())],
            );
        }
        metric(
            &mut s,
            "read_bytes_total",
            "counter",
            "Bytes read by clients.",
            &[("", load(&self.bytes_read))],
        );
        metric(
            &mut s,
            "written_bytes_total",
            "counter",
            "Bytes written by clients.",
            &[("", load(&self.bytes_written))],
        );
        let _ = writeln!(
            s,
            "# HELP mmapfs_fsync_seconds Latency of fsync and fsyncdir requests.\n\
             # TYPE mmapfs_fsync_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, c) in self.fsync_buckets.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = match LATENCY_BOUNDS_US.get(i) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(s, "mmapfs_fsync_seconds_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.fsync_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(s, "mmapfs_fsync_seconds_sum {sum}");
        let _ = writeln!(s, "mmapfs_fsync_seconds_count {cumulative}");
        let durable = engine.durable_txn();
        metric(
            &mut s,
            "commits_total",
            "counter",
            "Transactions made durable since the mount.",
            &[("", durable.saturating_sub(at_mount.txn).to_string())],
        );
        metric(
            &mut s,
            "transaction",
            "gauge",
            "Number of the newest durable transaction.",
            &[("", durable.to_string())],
        );
        metric(
            &mut s,
            "image_bytes",
            "gauge",
            "Size of the image file.",
            &[("", engine.image().len().to_string())],
        );
        metric(
            &mut s,
            "image_bytes_at_mount",
            "gauge",
            "Size of the image file when mounted.",
            &[("", at_mount.image_bytes.to_string())],
        );
        let used = engine.total_blocks().saturating_sub(engine.free_blocks());
        metric(
            &mut s,
            "used_bytes",
            "gauge",
            "Bytes of the image in use (data and metadata).",
            &[("", (used * crate::format::BLOCK_SIZE).to_string())],
        );
        s
    }
}

/// Appends one metric: its help and type lines, then each `(labels, value)` sample.
fn metric(s: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, String)]) {
    let _ = writeln!(
        s,
        "# HELP mmapfs_{name} {help}\n# TYPE mmapfs_{name} {kind}"
    );
    for (labels, value) in samples {
        let _ = writeln!(s, "mmapfs_{name}{labels} {value}");
    }
}

/// What the engine looked like when the mount started.
pub struct AtMount {
    pub txn: u64,
    pub image_bytes: u64,
}

/// Serves `stats` to every connection on the mount's control socket. The engine is held
/// weakly: the server never keeps an unmounted filesystem alive.
pub fn serve(dev: &str, stats: Arc<Stats>, engine: Weak<Engine>) -> std::io::Result<()> {
    let at_mount = match engine.upgrade() {
        Some(e) => AtMount {
            txn: e.durable_txn(),
            image_bytes: e.image().len(),
        },
        None => return Ok(()),
    };
    crate::control::listen("stats", dev, move |mut conn| {
        let Some(e) = engine.upgrade() else {
            return false;
        };
        let text = stats.render(&e, &at_mount);
        drop(e);
        let _ = conn.write_all(text.as_bytes());
        true
    })
}

/// Reads the live numbers of the mount with device `dev` (the Prometheus text).
pub fn fetch(dev: &str) -> std::io::Result<String> {
    let mut conn = crate::control::connect("stats", dev)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    Ok(text)
}
