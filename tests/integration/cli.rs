//! The command line: every failure is one line on stderr, a non-zero exit, no panic, and leaves
//! the image untouched; fsck, info and signals behave.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Asserts a failed run: non-zero exit, exactly one line on stderr, no panic text.
fn assert_clean_failure(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let all = format!("{stderr}{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        !out.status.success(),
        "{what}: succeeded: {}",
        describe(out)
    );
    assert!(
        out.status.code().is_some(),
        "{what}: killed by a signal: {}",
        describe(out)
    );
    assert!(
        !all.contains("panicked") && !all.contains("RUST_BACKTRACE"),
        "{what}: panic: {}",
        describe(out)
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && !lines[0].trim().is_empty(),
        "{what}: expected exactly one line on stderr, got {}:\n{stderr}",
        lines.len()
    );
    stderr
}

fn mkfs(image: &Path, size: &str) {
    let out = run(Command::new(BIN)
        .arg("mkfs")
        .arg(image)
        .args(["--size", size]));
    assert!(out.status.success(), "mkfs: {}", describe(&out));
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mmapfs-cli-")
        .tempdir()
        .unwrap()
}

#[test]
fn mkfs_refuses_existing_file_without_force() {
    let dir = tempdir();
    let img = dir.path().join("img");
    let original = Rng::new(5).bytes(3 << 20);
    fs::write(&img, &original).unwrap();
    let out = run(Command::new(BIN)
        .arg("mkfs")
        .arg(&img)
        .args(["--size", "16M"]));
    assert_clean_failure(&out, "mkfs over a file");
    assert!(fs::read(&img).unwrap() == original, "mkfs touched the file");
    let out = run(Command::new(BIN)
        .arg("mkfs")
        .arg(&img)
        .args(["--size", "16M", "--force"]));
    assert!(out.status.success(), "mkfs --force: {}", describe(&out));
    assert_eq!(fs::metadata(&img).unwrap().len(), 16 << 20);
    fsck(&img);
    // An empty file is fine without --force.
    let empty = dir.path().join("empty");
    fs::write(&empty, b"").unwrap();
    mkfs(&empty, "2M");
    fsck(&empty);
}

#[test]
fn mkfs_rejects_malformed_sizes() {
    let dir = tempdir();
    for size in ["12Q", "abc", "", "-5M", "16MM", "1k", "99999999999T"] {
        let img = dir.path().join("img");
        let out = run(Command::new(BIN)
            .arg("mkfs")
            .arg(&img)
            .args(["--size", size]));
        assert_clean_failure(&out, &format!("mkfs --size {size:?}"));
        assert!(!img.exists() || fs::metadata(&img).unwrap().len() == 0);
    }
}

/// Runs `mmapfs mount IMAGE MNT` (background mode), with a timeout; if it unexpectedly mounts,
/// unmounts again so nothing is left behind.
fn try_mount(image: &Path, mnt: &Path, extra: &[&str]) -> Output {
    let dir = tempdir();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(BIN)
        .arg("mount")
        .args(extra)
        .arg(image)
        .arg(mnt)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&o).unwrap())
        .stderr(fs::File::create(&e).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: fs::read(&o).unwrap(),
        stderr: fs::read(&e).unwrap(),
    }
}

struct Case {
    dir: tempfile::TempDir,
    image: PathBuf,
    mnt: PathBuf,
}

fn case() -> Case {
    let dir = tempdir();
    let image = dir.path().join("image");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    mkfs(&image, "16M");
    Case { dir, image, mnt }
}

/// Mounting must fail cleanly with a message containing `expect`, image unchanged.
fn refused(image: &Path, mnt: &Path, expect: &str, what: &str) {
    let before = fs::read(image).ok();
    let mounts_before = mounts_on(mnt);
    let out = try_mount(image, mnt, &[]);
    let stderr = assert_clean_failure(&out, what);
    assert!(
        stderr.to_lowercase().contains(&expect.to_lowercase()),
        "{what}: expected {expect:?} in {stderr:?}"
    );
    assert!(fs::read(image).ok() == before, "{what}: the image changed");
    assert_eq!(
        mounts_on(mnt),
        mounts_before,
        "{what}: a mount was left on {}",
        mnt.display()
    );
}

/// How many mounts are stacked on `path`.
fn mounts_on(path: &Path) -> usize {
    let Ok(canon) = path.canonicalize() else {
        return 0;
    };
    let target = canon.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(target.as_str()))
        .count()
}

#[test]
fn mount_refuses_bad_images() {
    // Missing image.
    let c = case();
    refused(
        &c.dir.path().join("missing"),
        &c.mnt,
        "missing",
        "missing image",
    );
    // Not an mmapfs image.
    let junk = c.dir.path().join("junk");
    fs::write(&junk, Rng::new(9).bytes(1 << 20)).unwrap();
    refused(&junk, &c.mnt, "not an mmapfs image", "random bytes");
    let tiny = c.dir.path().join("tiny");
    fs::write(&tiny, b"MMAPFS").unwrap();
    refused(&tiny, &c.mnt, "not an mmapfs image", "6-byte file");
    // Bad version (both superblock copies).
    let mut bytes = fs::read(&c.image).unwrap();
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    bytes[4096 + 8..4096 + 12].copy_from_slice(&7u32.to_le_bytes());
    let v = c.dir.path().join("version");
    fs::write(&v, &bytes).unwrap();
    refused(&v, &c.mnt, "version", "bad version");
    // A version-1 image is refused with the command that converts it.
    let mut bytes = fs::read(&c.image).unwrap();
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    bytes[4096 + 8..4096 + 12].copy_from_slice(&1u32.to_le_bytes());
    fs::write(&v, &bytes).unwrap();
    refused(&v, &c.mnt, "mmapfs upgrade", "version 1");
    // Truncated to half.
    let t = c.dir.path().join("truncated");
    fs::copy(&c.image, &t).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&t).unwrap();
    f.set_len(8 << 20).unwrap();
    drop(f);
    refused(&t, &c.mnt, "truncated", "truncated image");
    // A flipped byte in both superblock copies.
    let mut rng = Rng::new(seed("mount_refuses_bad_images"));
    for _ in 0..4 {
        let mut bytes = fs::read(&c.image).unwrap();
        let at = 16 + rng.below(4090 - 16) as usize;
        bytes[at] ^= 1 << rng.below(8);
        bytes[4096 + at] ^= 1 << rng.below(8);
        let s = c.dir.path().join("flipped");
        fs::write(&s, &bytes).unwrap();
        refused(
            &s,
            &c.mnt,
            "checksum",
            &format!("superblock byte {at} flipped in both copies"),
        );
    }
    // Missing mount point.
    refused(
        &c.image,
        &c.dir.path().join("nomnt"),
        "nomnt",
        "missing mount point",
    );
    // A directory as image.
    refused(c.dir.path(), &c.mnt, "", "directory as image");
    // The good image still mounts after all that.
    fsck(&c.image);
}

#[test]
fn mount_refuses_busy_mountpoint_and_image_in_use() {
    let m = Mount::new();
    fs::write(m.p("keep"), b"keep").unwrap();
    // Committed now, so the first daemon has nothing left to write while we compare.
    fs::File::open(m.path()).unwrap().sync_all().unwrap();
    let other = case();
    refused(&other.image, m.path(), "busy", "busy mount point");
    // Compare what a second mount would have changed: the superblocks (state, mount count).
    let superblock = |p: &Path| fs::read(p).unwrap()[..8192].to_vec();
    let before = superblock(m.image());
    let out = try_mount(m.image(), &other.mnt, &[]);
    let stderr = assert_clean_failure(&out, "image in use");
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(!is_mountpoint(&other.mnt));
    assert!(
        superblock(m.image()) == before,
        "second mount changed the superblock"
    );
    // fsck and info refuse a mounted image too, without touching it.
    let out = run(Command::new(BIN).arg("fsck").arg(m.image()));
    assert_clean_failure(&out, "fsck of a mounted image");
    assert_eq!(fs::read(m.p("keep")).unwrap(), b"keep");
    fsck(&other.image);
    m.finish();
}

#[test]
fn background_mount_and_unmount() {
    let c = case();
    let out = try_mount(&c.image, &c.mnt, &["-o", "noatime"]);
    assert!(out.status.success(), "background mount: {}", describe(&out));
    assert!(
        is_mountpoint(&c.mnt),
        "mount returned but nothing is mounted"
    );
    fs::write(c.mnt.join("bg"), b"background").unwrap();
    let out = run(Command::new("fusermount3").arg("-u").arg(&c.mnt));
    assert!(out.status.success(), "{}", describe(&out));
    // The daemon flushes and exits, releasing the image lock.
    let start = Instant::now();
    let text = loop {
        let out = run(Command::new(BIN).arg("info").arg(&c.image));
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "daemon never released the image"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(text.contains("state:        clean"), "{text}");
    fsck(&c.image);
    let m = Mount::from_image(&c.image);
    assert_eq!(fs::read(m.p("bg")).unwrap(), b"background");
    m.finish();
}

#[test]
fn fsck_reports_corruption_without_panicking() {
    let mut m = Mount::new();
    fs::write(m.p("victim-file-name"), pattern(1, 0, 10_000)).unwrap();
    fs::create_dir(m.p("some-directory")).unwrap();
    m.settle();
    let out = run(Command::new(BIN).arg("fsck").arg(m.image()));
    assert!(out.status.success(), "{}", describe(&out));
    let good = fs::read(m.image()).unwrap();

    // Inode 2 is the first file created (docs/format.md: the free list starts at 2).
    let victim = inode_offset(&good, 2);
    let bad_inode = |byte: usize| {
        let mut b = good.clone();
        b[victim + byte] ^= 0x10;
        b
    };
    // A directory entry: the name in the root directory's entry block.
    let name = b"victim-file-name";
    let pos = name_offset(&good, 1, name);
    let mut dirent = good.clone();
    dirent[pos - 16] ^= 0x3; // the entry's inode number
    let mut dirname = good.clone();
    dirname[pos + 3] ^= 0x20; // a byte of the name
    for (what, bytes) in [
        ("inode size", bad_inode(16)),
        ("inode mode", bad_inode(1)),
        ("inode tree", bad_inode(96)),
        ("dirent inode", dirent),
        ("dirent name", dirname),
    ] {
        fs::write(m.image(), &bytes).unwrap();
        let out = run(Command::new(BIN).arg("fsck").arg(m.image()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "fsck missed a flipped {what}: {}",
            describe(&out)
        );
        assert!(
            out.status.code().is_some(),
            "fsck crashed on {what}: {}",
            describe(&out)
        );
        assert!(
            !text.contains("panicked"),
            "fsck panicked on {what}: {text}"
        );
        assert!(
            text.contains("problem"),
            "fsck on {what} lists no problem: {text}"
        );
        assert!(
            fs::read(m.image()).unwrap() == bytes,
            "fsck (report mode) changed the image"
        );
    }
    fs::write(m.image(), &good).unwrap();
    fsck(m.image());
}

#[test]
fn info_and_sigterm() {
    let mut m = Mount::new();
    fs::write(m.p("data"), pattern(2, 0, 2 << 20)).unwrap();
    let status = m.signal(libc::SIGTERM);
    assert!(status.success(), "SIGTERM exit {status}; log:\n{}", m.log());
    assert!(!is_mountpoint(m.path()), "still mounted after SIGTERM");
    let text = info(m.image());
    for key in ["capacity", "used", "free", "inodes", "state"] {
        assert!(
            text.contains(&format!("{key}:")),
            "info lacks {key}:\n{text}"
        );
    }
    assert!(text.contains("state:        clean"), "{text}");
    assert_eq!(
        info_field(&text, "capacity"),
        fs::metadata(m.image()).unwrap().len() / 4096
    );
    let used = info_field(&text, "used");
    let free = info_field(&text, "free");
    assert_eq!(used + free, info_field(&text, "capacity"));
    assert!(used >= 512, "2 MiB written but used = {used}");
    assert!(text.contains("inodes:       2 used"), "{text}");
    fsck(m.image());
    // After a kill -9 the state is dirty, and a mount recovers it.
    m.mount();
    assert_eq!(fs::read(m.p("data")).unwrap(), pattern(2, 0, 2 << 20));
    // A change commits the mounted state (a mount that changes nothing writes nothing).
    fs::write(m.p("more"), b"more").unwrap();
    fs::File::open(m.p("more")).unwrap().sync_all().unwrap();
    m.kill9();
    let text = info(m.image());
    assert!(text.contains("dirty"), "{text}");
    m.mount();
    assert_eq!(fs::read(m.p("data")).unwrap(), pattern(2, 0, 2 << 20));
    m.finish();
}

/// A malformed mount option is refused before the image is opened: the image stays byte for byte
/// as it was (still marked clean), and nothing is mounted.
#[test]
fn mount_refuses_bad_options_without_touching_the_image() {
    let c = case();
    let before = fs::read(&c.image).unwrap();
    for opt in ["max_write=12", "read_ahead_kb=lots", "max_ratio=-1"] {
        let out = try_mount(&c.image, &c.mnt, &["-o", opt]);
        let stderr = assert_clean_failure(&out, opt);
        assert!(
            stderr.contains(opt.split('=').next().unwrap()),
            "{opt}: {stderr}"
        );
        assert!(!is_mountpoint(&c.mnt), "{opt}: mounted");
        assert!(
            fs::read(&c.image).unwrap() == before,
            "{opt}: image changed"
        );
    }
    fsck(&c.image);
}

/// The CPUs each `fuser-N` worker thread of daemon `pid` may run on, as /proc lists them.
fn worker_cpus(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        // The /dev/fuse workers; with -o io_uring the rings' threads (`fuser-uring-N`, always
        // pinned, one per possible CPU) run beside them.
        if !comm.starts_with("fuser-") || comm.starts_with("fuser-uring-") {
            continue;
        }
        let status = fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push((comm.trim().to_string(), cpus));
    }
    out.sort();
    out
}

/// Polls until every worker's CPU list satisfies `ok` (pinning happens just after the mount).
fn wait_for_workers(pid: u32, ok: impl Fn(&[(String, String)]) -> bool) -> Vec<(String, String)> {
    let start = Instant::now();
    loop {
        let w = worker_cpus(pid);
        // Workers start just after the mount: an empty list satisfies nothing yet.
        if (!w.is_empty() && ok(&w)) || start.elapsed() > Duration::from_secs(5) {
            return w;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn workers_are_pinned_one_per_cpu_unless_told_not_to() {
    let ncpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if ncpus < 2 {
        eprintln!("one CPU: nothing to pin");
        return;
    }
    // Default: one worker per CPU (up to 16), each allowed on exactly one CPU, all different.
    let m = Mount::new();
    let w = wait_for_workers(m.pid(), |w| w.iter().all(|(_, c)| !c.contains([',', '-'])));
    assert_eq!(w.len(), ncpus.min(16), "workers: {w:?}");
    let mut cpus: Vec<&str> = w.iter().map(|(_, c)| c.as_str()).collect();
    assert!(
        cpus.iter().all(|c| c.parse::<usize>().is_ok()),
        "not pinned: {w:?}"
    );
    cpus.sort_unstable();
    cpus.dedup();
    assert_eq!(cpus.len(), w.len(), "two workers share a CPU: {w:?}");
    fs::write(m.p("f"), b"pinned").unwrap();
    assert_eq!(fs::read(m.p("f")).unwrap(), b"pinned");
    m.finish();

    // -o no_pin_threads leaves every worker free to run anywhere.
    let m = Mount::with(&["--size", "16M"], &["no_pin_threads"]);
    std::thread::sleep(Duration::from_millis(200));
    let w = worker_cpus(m.pid());
    assert!(!w.is_empty());
    assert!(
        w.iter().all(|(_, c)| c.contains([',', '-'])),
        "pinned despite no_pin_threads: {w:?}"
    );
    m.finish();
}

/// Output into a pipe that is already closed (`mmapfs info IMAGE | head -0`): the command ends
/// quietly (by SIGPIPE, as other tools do) or succeeds, never with a panic.
#[test]
fn output_into_a_closed_pipe_is_no_panic() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempdir();
    let img = dir.path().join("img");
    mkfs(&img, "16M");
    for verb in ["info", "fsck"] {
        let mut child = Command::new(BIN)
            .arg(verb)
            .arg(&img)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{verb}: {err}"
        );
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "{verb}: {}",
            out.status
        );
    }
}
