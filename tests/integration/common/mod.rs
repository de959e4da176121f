//! Test harness: one mounted mmapfs instance per test, each in its own temp dir, so tests run
//! in parallel. A [`Mount`] unmounts on `Drop` (falling back to a lazy unmount) and reaps its
//! daemon, so a failing test never leaves a mount or a process behind.

#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The filesystem binary under test (built by cargo for this test target).
pub const BIN: &str = env!("CARGO_BIN_EXE_mmapfs");

/// Extra `-o` options for every mount the harness makes, after the test's own: runs the whole
/// suite in another configuration, e.g. `MMAPFS_TEST_MOUNT_OPTIONS=io_uring` (with
/// /sys/module/fuse/parameters/enable_uring set to 1 for the run).
pub const EXTRA_OPTIONS_ENV: &str = "MMAPFS_TEST_MOUNT_OPTIONS";

/// How long a mount may take to appear or a daemon to exit.
const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Mount {
    dir: tempfile::TempDir,
    image: PathBuf,
    mnt: PathBuf,
    options: Vec<String>,
    child: Option<Child>,
    /// A killed daemon's mount is still listed.
    dead: bool,
    /// Extra environment for the daemon (test hooks).
    env: Vec<(String, String)>,
}

impl Mount {
    /// A fresh 16 MiB image, mounted.
    pub fn new() -> Mount {
        Mount::with(&["--size", "16M"], &[])
    }

    /// A fresh image made with `mkfs_args`, mounted with `-o options`.
    pub fn with(mkfs_args: &[&str], options: &[&str]) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("mmapfs-it-")
            .tempdir()
            .expect("tempdir");
        // Unprivileged test users must be able to reach the mount point.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let image = dir.path().join("image");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).expect("mkdir mnt");
        let out = run(Command::new(BIN).arg("mkfs").arg(&image).args(mkfs_args));
        assert!(out.status.success(), "mkfs failed: {}", describe(&out));
        let mut m = Mount {
            dir,
            image,
            mnt,
            options: options.iter().map(|s| s.to_string()).collect(),
            child: None,
            dead: false,
            env: Vec::new(),
        };
        m.mount();
        m
    }

    /// Sets an environment variable for the daemon from the next `mount()` on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_string(), value.to_string()));
    }

    /// Mounts a copy of an existing image.
    pub fn from_image(src: &Path) -> Mount {
        let mut m = Mount::new();
        m.unmount();
        fs::copy(src, &m.image).expect("copy image");
        m.mount();
        m
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// `path()` joined with `rel`.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The temp dir holding the image, the mount point and the daemon's log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_mounted(&self) -> bool {
        self.child.is_some()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("not mounted").id()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// The daemon's stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts `mmapfs mount --foreground` and waits until the mount is live.
    pub fn mount(&mut self) {
        assert!(self.child.is_none(), "already mounted");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = Command::new(BIN);
        cmd.arg("mount").arg("--foreground");
        let mut options = self.options.clone();
        if let Some(extra) = std::env::var_os(EXTRA_OPTIONS_ENV) {
            options.push(extra.to_string_lossy().into_owned());
        }
        if !options.is_empty() {
            cmd.arg("-o").arg(options.join(","));
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.arg(&self.image)
            .arg(&self.mnt)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        let mut child = cmd.spawn().expect("spawn mmapfs mount");
        let start = Instant::now();
        loop {
            if is_mountpoint(&self.mnt) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("mount exited early with {status}; log:\n{}", self.log());
            }
            if start.elapsed() > TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mount not live after {TIMEOUT:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The mount point appears before the daemon has answered the kernel's INIT: a stat
        // waits for that, so an unmount right after cannot cut the handshake short.
        let _ = fs::metadata(&self.mnt);
        self.child = Some(child);
    }

    /// `fusermount3 -u` (retried while busy), then waits for the daemon: it must exit 0.
    pub fn unmount(&mut self) {
        let mut child = self.child.take().expect("not mounted");
        let start = Instant::now();
        loop {
            let out = run(Command::new("fusermount3").arg("-u").arg(&self.mnt));
            if out.status.success() {
                break;
            }
            if start.elapsed() > TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                lazy_unmount(&self.mnt);
                panic!("fusermount3 -u failed: {}", describe(&out));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = wait_timeout(&mut child, TIMEOUT);
        assert!(
            status.is_some_and(|s| s.success()),
            "daemon exit status {status:?} after unmount; log:\n{}",
            self.log()
        );
    }

    /// Unmount then mount the same image again.
    pub fn remount(&mut self) {
        self.unmount();
        self.mount();
    }

    /// Simulates a crash: SIGKILL the daemon, then clear the dead mount.
    pub fn kill9(&mut self) {
        self.kill_daemon();
        self.clear_dead_mount();
    }

    /// SIGKILLs the daemon and reaps it; the mount stays listed (requests fail with
    /// ENOTCONN) until [`Mount::clear_dead_mount`].
    pub fn kill_daemon(&mut self) {
        let mut child = self.child.take().expect("not mounted");
        let _ = child.kill();
        let _ = child.wait();
        self.dead = true;
    }

    /// Removes the mount left by a killed daemon.
    pub fn clear_dead_mount(&mut self) {
        let out = run(Command::new("fusermount3").arg("-u").arg(&self.mnt));
        if !out.status.success() {
            lazy_unmount(&self.mnt);
        }
        self.dead = false;
        assert!(!is_mountpoint(&self.mnt), "dead mount still listed");
    }

    /// Sends `sig` to the daemon and waits for it to exit (the mount is then gone).
    pub fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("not mounted");
        // SAFETY: plain kill(2) of our own child.
        let r = unsafe { libc::kill(child.id() as i32, sig) };
        assert_eq!(r, 0);
        let status = wait_timeout(&mut child, TIMEOUT);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            lazy_unmount(&self.mnt);
        }
        status.unwrap_or_else(|| panic!("daemon ignored signal {sig}; log:\n{}", self.log()))
    }

    /// Leaves the image unmounted with a newest commit that wrote no blocks (a mount and an
    /// unmount that change nothing): damage a test then does to the image is damage, not
    /// what a torn last commit looks like.
    pub fn settle(&mut self) {
        if self.is_mounted() {
            self.unmount();
        }
        self.mount();
        self.unmount();
    }

    /// Unmounts and checks the image: the last step of every test that writes.
    pub fn finish(mut self) {
        if self.is_mounted() {
            self.unmount();
        }
        fsck(&self.image);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.dead {
            lazy_unmount(&self.mnt);
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        let out = run(Command::new("fusermount3").arg("-u").arg(&self.mnt));
        if !out.status.success() {
            lazy_unmount(&self.mnt);
        }
        if wait_timeout(&mut child, Duration::from_secs(5)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn lazy_unmount(mnt: &Path) {
    let _ = Command::new("umount")
        .arg("-l")
        .arg(mnt)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn wait_timeout(child: &mut Child, t: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if start.elapsed() < t => std::thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// Whether `/proc/self/mountinfo` lists `path` as a mount point.
pub fn is_mountpoint(path: &Path) -> bool {
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let target = canon.to_string_lossy().replace(' ', "\\040");
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

pub fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `mmapfs fsck IMAGE` and asserts it reports the image consistent.
pub fn fsck(image: &Path) {
    let out = run(Command::new(BIN).arg("fsck").arg(image));
    assert!(out.status.success(), "fsck failed: {}", describe(&out));
}

/// Runs `mmapfs fsck --repair IMAGE` and asserts it ends with a consistent image.
pub fn fsck_repair(image: &Path) -> String {
    let out = run(Command::new(BIN).arg("fsck").arg("--repair").arg(image));
    assert!(
        out.status.success(),
        "fsck --repair failed: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Byte offset of the newest superblock slot in an image (docs/format.md: slots at blocks 0
/// and 1, `txn` at byte 64; a slot without the magic is ignored).
pub fn newest_slot(image: &[u8]) -> usize {
    let txn = |slot: usize| {
        let b = &image[slot * 4096..slot * 4096 + 72];
        (b[..8] == *b"MMAPFS\0\x1a").then(|| u64::from_le_bytes(b[64..72].try_into().unwrap()))
    };
    match (txn(0), txn(1)) {
        (Some(a), Some(b)) if b > a => 4096,
        (None, Some(_)) => 4096,
        _ => 0,
    }
}

/// Image block that tree block `fblock` of the packed tree `packed` maps to (docs/format.md:
/// root block in bits 0..56, height above; 510 pointers per node).
pub fn tree_block(image: &[u8], packed: u64, fblock: u64) -> u64 {
    let (mut node, height) = (packed & ((1 << 56) - 1), (packed >> 56) as u32);
    for level in (0..height).rev() {
        let idx = (fblock / 510u64.pow(level)) % 510;
        let at = node as usize * 4096 + idx as usize * 8;
        node = u64::from_le_bytes(image[at..at + 8].try_into().unwrap());
    }
    node
}

/// Byte offset of inode `ino`'s record in an image: the newest superblock's inode-table tree
/// (`itab_tree` at byte 104), 15 records of 256 bytes per leaf.
pub fn inode_offset(image: &[u8], ino: u64) -> usize {
    let sb = newest_slot(image);
    let packed = u64::from_le_bytes(image[sb + 104..sb + 112].try_into().unwrap());
    tree_block(image, packed, ino / 15) as usize * 4096 + (ino % 15) as usize * 256
}

/// Overwrites bytes of inode `ino`'s record (at `field_offset` in it) and reseals the record
/// and its inode-table block, as a buggy tool that recomputes checksums would leave them.
pub fn patch_inode(image: &Path, ino: u64, field_offset: usize, value: &[u8]) {
    let mut bytes = fs::read(image).unwrap();
    let at = inode_offset(&bytes, ino);
    bytes[at + field_offset..at + field_offset + value.len()].copy_from_slice(value);
    // The record's CRC is its last 4 bytes; the block's trailer CRC the block's last 4.
    let c = crc32c::crc32c(&bytes[at..at + 252]);
    bytes[at + 252..at + 256].copy_from_slice(&c.to_le_bytes());
    let block = at / 4096 * 4096;
    let t = crc32c::crc32c(&bytes[block..block + 4092]);
    bytes[block + 4092..block + 4096].copy_from_slice(&t.to_le_bytes());
    fs::write(image, &bytes).unwrap();
}

/// Byte offset of `name` in the first entry block of directory `dir` (the live copy: older
/// copies of a block stay in free space).
pub fn name_offset(image: &[u8], dir: u64, name: &[u8]) -> usize {
    let rec = inode_offset(image, dir);
    let packed = u64::from_le_bytes(image[rec + 96..rec + 104].try_into().unwrap());
    let block = tree_block(image, packed, 0) as usize * 4096;
    block
        + image[block..block + 4080]
            .windows(name.len())
            .position(|w| w == name)
            .expect("name not in the directory's first block")
}

/// Output of `mmapfs info IMAGE` (asserts success).
pub fn info(image: &Path) -> String {
    let out = run(Command::new(BIN).arg("info").arg(image));
    assert!(out.status.success(), "info failed: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number after `key:` in `mmapfs info` output, e.g. `capacity` -> blocks.
pub fn info_field(info: &str, key: &str) -> u64 {
    let line = info
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in info:\n{info}"));
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {key} in {line:?}"))
}

// ----- libc helpers ------------------------------------------------------------------------------

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in path")
}

pub fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The errno of a failed std::io call (panics if it succeeded).
pub fn err_of<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.raw_os_error().unwrap_or_else(|| panic!("no errno: {e}")),
    }
}

/// Checks a libc return value: `Ok(v)` or `Err(errno)`.
pub fn check<T: PartialOrd + Default>(ret: T) -> Result<T, i32> {
    if ret < T::default() {
        Err(errno())
    } else {
        Ok(ret)
    }
}

pub fn lstat(p: &Path) -> libc::stat {
    let c = cpath(p);
    // SAFETY: stat is plain old data and lstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a valid out pointer.
    let r = unsafe { libc::lstat(c.as_ptr(), &mut st) };
    assert_eq!(
        r,
        0,
        "lstat {}: {}",
        p.display(),
        io::Error::last_os_error()
    );
    st
}

pub fn statfs(p: &Path) -> libc::statfs {
    try_statfs(p).unwrap_or_else(|e| panic!("statfs: {e}"))
}

/// statfs(2); it always reaches the daemon (the kernel caches no statfs result), so it also
/// tells whether the daemon behind a mount is alive.
pub fn try_statfs(p: &Path) -> io::Result<libc::statfs> {
    let c = cpath(p);
    // SAFETY: statfs is plain old data.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if r == 0 {
        Ok(st)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Free blocks (f_bfree) of the filesystem at `p`.
pub fn free_blocks(p: &Path) -> u64 {
    statfs(p).f_bfree
}

/// A deterministic byte pattern: byte at absolute offset `off` of a file tagged `seed`.
pub fn pattern_byte(seed: u64, off: u64) -> u8 {
    let x = off
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
    ((x >> 29) ^ (x >> 47) ^ off) as u8
}

pub fn pattern(seed: u64, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern_byte(seed, off + i))
        .collect()
}

/// A seed from the environment (`MMAPFS_SEED`) or the clock; always printed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("MMAPFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {s} (rerun with MMAPFS_SEED={s})");
    s
}

/// A small seeded generator (splitmix64): deterministic across rand versions, so a printed
/// seed always replays the same run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}
