//! `-o io_uring`: FUSE requests served over the kernel's per-CPU io_uring queues (Linux 6.14+,
//! the fuse module's `enable_uring` switch on), and the fallback to /dev/fuse when the switch is
//! off. The switch is machine-wide: each test sets it for its own duration under a lock (other
//! test processes run in parallel) and puts back what was there on every exit path.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;

use crate::common::{BIN, Mount, describe, run};
use crate::posix::{getxattr, listxattr, removexattr, set_xattr};

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";
const LOCK: &str = "/tmp/mmapfs-test-enable-uring.lock";

/// Holds `enable_uring` at one value while it lives; restores the previous value when dropped
/// (also when the test panics). Tests holding one exclude each other through a lock file.
struct EnableUring {
    previous: String,
    _lock: File,
}

impl EnableUring {
    /// `None` (the test is skipped) where the kernel has no FUSE over io_uring or the switch
    /// cannot be written (not root).
    fn set(on: bool) -> Option<EnableUring> {
        if !Path::new(ENABLE_URING).exists() {
            eprintln!("skipped: this kernel has no FUSE over io_uring ({ENABLE_URING})");
            return None;
        }
        let lock = File::create(LOCK).expect("lock file");
        // SAFETY: flock(2) on an open descriptor; released when `lock` closes.
        let r = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(r, 0, "flock: {}", std::io::Error::last_os_error());
        let previous = fs::read_to_string(ENABLE_URING).expect("read enable_uring");
        if let Err(e) = fs::write(ENABLE_URING, if on { "1" } else { "0" }) {
            eprintln!("skipped: cannot write {ENABLE_URING}: {e}");
            return None;
        }
        Some(EnableUring {
            previous: previous.trim().to_string(),
            _lock: lock,
        })
    }
}

impl Drop for EnableUring {
    fn drop(&mut self) {
        if let Err(e) = fs::write(ENABLE_URING, &self.previous) {
            eprintln!("cannot restore {ENABLE_URING} to {}: {e}", self.previous);
        }
    }
}

/// The daemon's live numbers, Prometheus form.
fn prometheus(m: &Mount) -> String {
    let out = run(Command::new(BIN)
        .arg("stats")
        .arg("--prometheus")
        .arg(m.path()));
    assert!(out.status.success(), "stats: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the sample `name` (with its labels) in `text`.
fn sample(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{name} missing:\n{text}")) as u64
}

/// Every request mmapfs counted except FORGET (which the kernel always sends over /dev/fuse).
fn counted_requests(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("mmapfs_requests_total{") && !l.contains("\"forget\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// Number of possible CPUs: the kernel makes one queue per possible CPU.
fn possible_cpus() -> u64 {
    let s = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    s.trim()
        .split(',')
        .filter_map(|r| r.rsplit('-').next()?.parse::<u64>().ok())
        .max()
        .unwrap()
        + 1
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// Stores through a `MAP_SHARED` mapping of `f`'s first `len` bytes, then `msync(MS_SYNC)`.
fn mmap_store(f: &File, len: usize, at: usize, data: &[u8]) {
    // SAFETY: a fresh shared mapping of an open descriptor, unmapped below; `at + data.len()`
    // is checked to lie inside it.
    unsafe {
        assert!(at + data.len() <= len);
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>().add(at), data.len());
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0, "msync");
        assert_eq!(libc::munmap(p, len), 0, "munmap");
    }
}

/// What `exercise` leaves behind, checked after a remount.
fn verify(m: &Mount) {
    assert_eq!(fs::read(m.p("dir/renamed")).unwrap(), pattern(1, 3 << 20));
    let mut mapped = pattern(2, 64 << 10);
    mapped[4096..4096 + 11].copy_from_slice(b"mapped-page");
    assert_eq!(fs::read(m.p("mapped")).unwrap(), mapped);
    assert_eq!(
        getxattr(&m.p("dir/renamed"), "user.kept").ok().as_deref(),
        Some(&pattern(3, 3000)[..])
    );
    assert_eq!(getxattr(&m.p("dir/renamed"), "user.gone").ok(), None);
    let mut names: Vec<String> = fs::read_dir(m.p("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..300).map(|i| format!("entry-{i:04}")).collect();
    want.sort();
    assert_eq!(names, want);
    for t in 0..4u8 {
        assert_eq!(
            fs::read(m.p(&format!("thread-{t}"))).unwrap(),
            pattern(10 + t, 256 << 10)
        );
    }
}

/// Reads, writes (1 MiB requests included), mmap stores with msync, fsync, rename, readdir,
/// xattrs, and four threads at once (so requests come from both CPUs' queues).
fn exercise(m: &Mount) {
    fs::create_dir(m.p("dir")).unwrap();
    let big = pattern(1, 3 << 20);
    {
        let mut f = File::create(m.p("dir/big")).unwrap();
        f.write_all(&big).unwrap();
        f.sync_all().unwrap();
    }
    // Reads past the page cache: O_DIRECT-free, but a fresh open of a large file still sends
    // READs; pread at odd offsets and sizes.
    let f = File::open(m.p("dir/big")).unwrap();
    let mut buf = vec![0u8; 100_000];
    f.read_exact_at(&mut buf, 1_234_567).unwrap();
    assert_eq!(buf, big[1_234_567..1_234_567 + 100_000]);
    drop(f);
    fs::rename(m.p("dir/big"), m.p("dir/renamed")).unwrap();
    assert!(!m.p("dir/big").exists());
    assert_eq!(fs::read(m.p("dir/renamed")).unwrap(), big);

    // MAP_SHARED stores + msync, seen by read().
    {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.p("mapped"))
            .unwrap();
        f.write_all(&pattern(2, 64 << 10)).unwrap();
        mmap_store(&f, 64 << 10, 4096, b"mapped-page");
        f.sync_data().unwrap();
        let mut back = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut back).unwrap();
        assert_eq!(&back[4096..4096 + 11], b"mapped-page");
    }

    // Extended attributes.
    let p = m.p("dir/renamed");
    set_xattr(&p, "user.kept", &pattern(3, 3000));
    set_xattr(&p, "user.gone", b"bye");
    assert_eq!(listxattr(&p), ["user.gone", "user.kept"]);
    assert_eq!(getxattr(&p, "user.gone").ok().as_deref(), Some(&b"bye"[..]));
    removexattr(&p, "user.gone").unwrap();
    assert_eq!(getxattr(&p, "user.gone").ok(), None);

    // A directory listing that takes several READDIR(PLUS) requests.
    fs::create_dir(m.p("many")).unwrap();
    for i in 0..300 {
        File::create(m.p(&format!("many/entry-{i:04}"))).unwrap();
    }
    assert_eq!(fs::read_dir(m.p("many")).unwrap().count(), 300);

    // Threads on both CPUs: each writes and reads back its own file, with fsync.
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let path = m.p(&format!("thread-{t}"));
            s.spawn(move || {
                let data = pattern(10 + t, 256 << 10);
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .unwrap();
                for (i, chunk) in data.chunks(4096).enumerate() {
                    f.write_all_at(chunk, (i * 4096) as u64).unwrap();
                }
                f.sync_all().unwrap();
                let mut back = vec![0u8; data.len()];
                f.read_exact_at(&mut back, 0).unwrap();
                assert_eq!(back, data);
            });
        }
    });
}

/// Asserts that the mount's requests went over the rings: one queue per possible CPU served,
/// no request other than FORGET/INTERRUPT through /dev/fuse, and at least as many requests over
/// io_uring as mmapfs counted.
fn assert_served_by_rings(m: &Mount) {
    let text = prometheus(m);
    assert_eq!(
        sample(&text, "mmapfs_fuse_io_uring_queues"),
        possible_cpus(),
        "{text}\nlog:\n{}",
        m.log()
    );
    let ring = sample(
        &text,
        "mmapfs_fuse_transport_requests_total{transport=\"io_uring\"}",
    );
    let dev = sample(
        &text,
        "mmapfs_fuse_transport_requests_total{transport=\"dev_fuse\"}",
    );
    let counted = counted_requests(&text);
    assert_eq!(dev, 0, "requests went through /dev/fuse:\n{text}");
    assert!(
        counted > 0 && ring >= counted,
        "ring {ring} < counted {counted}:\n{text}"
    );
}

#[test]
fn io_uring_serves_every_request_and_survives_a_remount() {
    let Some(_switch) = EnableUring::set(true) else {
        return;
    };
    let mut m = Mount::with(&["--size", "64M"], &["io_uring"]);
    exercise(&m);
    verify(&m);
    assert_served_by_rings(&m);
    let out = run(Command::new(BIN).arg("stats").arg(m.path()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("transport:    io_uring (") && l.ends_with("/dev/fuse: 0")),
        "{text}"
    );
    m.remount();
    verify(&m);
    assert_served_by_rings(&m);
    m.finish();
}

/// A mount with `-o io_uring` while the kernel's switch is off: one warning that says how to
/// switch it on, and the mount works through /dev/fuse.
#[test]
fn io_uring_falls_back_to_dev_fuse_when_switched_off() {
    let Some(_switch) = EnableUring::set(false) else {
        return;
    };
    let mut m = Mount::with(&["--size", "64M"], &["io_uring"]);
    exercise(&m);
    verify(&m);
    let text = prometheus(&m);
    assert_eq!(sample(&text, "mmapfs_fuse_io_uring_queues"), 0, "{text}");
    assert_eq!(
        sample(
            &text,
            "mmapfs_fuse_transport_requests_total{transport=\"io_uring\"}"
        ),
        0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "mmapfs_fuse_transport_requests_total{transport=\"dev_fuse\"}"
        ) >= counted_requests(&text),
        "{text}"
    );
    let log = m.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("io_uring"))
        .collect();
    assert_eq!(warnings.len(), 1, "log:\n{log}");
    assert!(
        warnings[0].contains("echo 1 > /sys/module/fuse/parameters/enable_uring"),
        "{log}"
    );
    m.remount();
    verify(&m);
    m.finish();
}
