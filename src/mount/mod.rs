//! Mounting an image: the foreground daemon, the launcher that leaves it in the background, and
//! what the mount table says about an image (for `info`, `fsck` and a second mount).

pub mod options;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use crate::engine::{Engine, OpenMode};
use crate::fs::{Atime, Fs};
use crate::fuse::FuseAdapter;
use options::{Access, Settings};

/// Test hook: a file that receives exactly what a power loss is guaranteed to leave (the
/// flushed state), through the crash simulator (`image::sim`).
const SHADOW_ENV: &str = "MMAPFS_POWERLOSS_SHADOW";

/// Line the background daemon prints once the mount is live.
const READY_LINE: &str = "mmapfs: mount is live";

/// The filesystem type the kernel shows: `fuse.mmapfs` (what `findmnt -t`, `df -t` and fstab use).
pub const SUBTYPE: &str = "mmapfs";

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("mmapfs: {msg}");
    ExitCode::FAILURE
}

/// Who holds an image: where it is mounted and by which process.
#[derive(Debug, Default)]
pub struct Holder {
    pub mountpoint: Option<PathBuf>,
    pub pid: Option<u32>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.mountpoint, self.pid) {
            (Some(m), Some(p)) => write!(f, "mounted on {} by process {p}", m.display()),
            (Some(m), None) => write!(f, "mounted on {}", m.display()),
            (None, Some(p)) => write!(f, "held open by process {p}"),
            (None, None) => write!(f, "in use"),
        }
    }
}

/// Where `image` is mounted, if a live mmapfs mount of it is in this process's mount table, and
/// which process serves it. `None` when it is not mounted (a daemon that is just finishing an
/// unmount holds the image a moment longer; the engine's lock waits for that).
pub fn mounted_at(image: &Path) -> Option<Holder> {
    let canon = image.canonicalize().ok()?;
    let fstype = format!("fuse.{SUBTYPE}");
    let mountpoint = mount_table()
        .into_iter()
        .find(|m| m.fstype == fstype && Path::new(&m.source) == canon)?
        .mountpoint;
    Some(Holder {
        mountpoint: Some(mountpoint),
        pid: holder_pid(&canon),
    })
}

/// A process (other than this one) with `image` open, found in /proc/*/fd.
pub fn holder_pid(image: &Path) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .find(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == image))
            })
        })
}

/// Validates the mount point: it must exist, be a directory and not already be mounted.
fn check_mountpoint(mp: &Path) -> Result<PathBuf, String> {
    let canon = mp
        .canonicalize()
        .map_err(|e| format!("mount point {}: {e}", mp.display()))?;
    if !canon.is_dir() {
        return Err(format!("mount point {} is not a directory", mp.display()));
    }
    if mount_device(&canon).is_some() {
        return Err(format!(
            "mount point {} is busy (already mounted)",
            mp.display()
        ));
    }
    Ok(canon)
}

/// The device (`MAJOR:MINOR`) of the topmost mount at `mp`, from /proc/self/mountinfo; `None` if
/// nothing is mounted there (or the table cannot be read).
fn mount_device(mp: &Path) -> Option<String> {
    mount_table()
        .into_iter()
        .filter(|m| m.mountpoint == mp)
        .map(|m| m.device)
        .next_back()
}

/// One line of /proc/self/mountinfo.
struct MountEntry {
    device: String,
    mountpoint: PathBuf,
    fstype: String,
    source: String,
}

/// This process's mount table, in mount order (empty if it cannot be read).
fn mount_table() -> Vec<MountEntry> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| {
            // ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE ...
            let (left, right) = l.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            Some(MountEntry {
                device: left.get(2)?.to_string(),
                mountpoint: PathBuf::from(unescape_mountinfo(left.get(4)?)),
                fstype: right.next()?.to_string(),
                source: unescape_mountinfo(right.next()?),
            })
        })
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// `MAJOR:MINOR` of the filesystem holding `path` (stat, so for a mount point: the mount).
pub fn device_of(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path)?.dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    Ok(format!("{major}:{minor}"))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    ids().0 == 0
}

/// The effective user and group ids of this process (from /proc/self/status).
pub fn ids() -> (u32, u32) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| -> Option<u32> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(2)?.parse().ok()
    };
    (
        field("Uid:").unwrap_or(u32::MAX),
        field("Gid:").unwrap_or(u32::MAX),
    )
}

/// Whether /etc/fuse.conf lets normal users pass allow_other/allow_root.
fn user_allow_other() -> bool {
    std::fs::read_to_string("/etc/fuse.conf").is_ok_and(|t| {
        t.lines()
            .any(|l| l.split('#').next().unwrap_or("").trim() == "user_allow_other")
    })
}

/// Checks what can be checked before the image is opened, so that a refused mount leaves the
/// image exactly as it was.
fn preflight(settings: &Settings, root: bool) -> Result<fuser::SessionACL, String> {
    let access = settings.access.unwrap_or(if root {
        Access::Everyone
    } else {
        Access::Owner
    });
    if !root && access != Access::Owner && !user_allow_other() {
        return Err(format!(
            "mount option {}: a normal user needs `user_allow_other` in /etc/fuse.conf",
            if access == Access::Everyone {
                "allow_other"
            } else {
                "allow_root"
            }
        ));
    }
    if settings.auto_unmount && access == Access::Owner {
        return Err("mount option auto_unmount: needs allow_other or allow_root as well".into());
    }
    Ok(match access {
        Access::Owner => fuser::SessionACL::Owner,
        Access::OwnerAndRoot => fuser::SessionACL::RootAndOwner,
        Access::Everyone => fuser::SessionACL::All,
    })
}

/// The options handed to the kernel (or to fusermount3).
fn kernel_mount_options(s: &Settings, source: String) -> Vec<fuser::MountOption> {
    use fuser::MountOption as M;
    // The kernel splits its option string at commas and has no escape for them: a path with
    // a comma (or a space, which /proc/mounts would show escaped) is named by the type alone.
    let source = if source.contains(|c: char| c == ',' || c.is_whitespace()) {
        SUBTYPE.to_string()
    } else {
        source
    };
    let mut v = vec![
        M::FSName(s.fsname.clone().unwrap_or(source)),
        // A kernel option rather than fuser's `Subtype`, which only fusermount3 understands.
        M::CUSTOM(format!("subtype={SUBTYPE}")),
        if s.read_only { M::RO } else { M::RW },
        if s.exec { M::Exec } else { M::NoExec },
        if s.suid { M::Suid } else { M::NoSuid },
        if s.dev { M::Dev } else { M::NoDev },
    ];
    if s.kernel.default_permissions {
        v.push(M::DefaultPermissions);
    }
    if s.kernel.atime == Atime::Never {
        v.push(M::NoAtime);
    }
    if s.sync {
        v.push(M::Sync);
    }
    if s.dirsync {
        v.push(M::DirSync);
    }
    if s.auto_unmount {
        v.push(M::AutoUnmount);
    }
    v
}

/// `mmapfs mount`: checks the options, then either serves the mount in this process
/// (`foreground`) or starts the daemon and returns once the mount is live.
pub fn run(
    image: &Path,
    mountpoint: &Path,
    foreground: bool,
    threads: u16,
    options: &[String],
) -> ExitCode {
    let settings = match Settings::parse(options) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if let Some(holder) = mounted_at(image) {
        return fail(format!(
            "{}: image is already in use ({holder})",
            image.display()
        ));
    }
    if foreground {
        mount_foreground(image, mountpoint, threads, settings)
    } else {
        mount_background()
    }
}

fn mount_foreground(image: &Path, mountpoint: &Path, threads: u16, settings: Settings) -> ExitCode {
    let mp = match check_mountpoint(mountpoint) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let root = is_root();
    let acl = match preflight(&settings, root) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let canon_image = image.canonicalize().unwrap_or_else(|_| image.to_path_buf());
    let mode = if settings.read_only {
        OpenMode::Inspect
    } else {
        OpenMode::Mount
    };
    // Options are all checked above: only now is the image opened. Nothing is written to it
    // before the kernel's first request (see `FuseAdapter::init`).
    let mut engine = match Engine::open(image, mode) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let rec = engine.recovery();
    if rec.needed() {
        log::warn!(
            "{}: was not cleanly unmounted; recovered the state of transaction {}",
            image.display(),
            rec.txn
        );
    }
    engine.set_commit_interval(settings.commit_interval);
    if let Some(shadow) = std::env::var_os(SHADOW_ENV) {
        let attached = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&shadow)
            .and_then(|f| engine.attach_crash_sim(Some(f)));
        if let Err(e) = attached {
            return fail(format!("{SHADOW_ENV}: {e}"));
        }
    }
    let mut config = fuser::Config::default();
    config.mount_options =
        kernel_mount_options(&settings, canon_image.to_string_lossy().into_owned());
    config.acl = acl;
    config.n_threads = Some(usize::from(threads));
    config.clone_fd = settings.clone_fd;
    let adapter = FuseAdapter::new(Fs::new_idle(engine), settings.kernel);
    let notifier_slot = adapter.notifier_slot();
    let (stats, stats_engine) = (adapter.stats(), adapter.engine_weak());
    // A normal user who may not open /dev/fuse mounts through the setuid fusermount3, as every
    // libfuse filesystem does; fuser would stop at the open.
    let mut helper = None;
    let session = if !root && !can_open_dev_fuse() {
        match mount_with_fusermount(&mp, &settings, &config) {
            Ok((fd, h)) => {
                helper = Some(h);
                fuser::Session::from_fd(adapter, fd, config.acl, config.clone())
            }
            Err(e) => return fail(format!("cannot mount on {}: {e}", mp.display())),
        }
    } else {
        fuser::Session::new(adapter, &mp, &config)
    };
    let session = match session {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot mount on {}: {e}", mp.display())),
    };
    // Before any request is served: workers start in session.run() below.
    notifier_slot.set(session.notifier()).ok();
    stats.set_transport(session.transport_stats());
    if session.io_uring() {
        log::info!("serving FUSE requests over io_uring (one queue per possible CPU)");
    }
    match mount_device(&mp) {
        Some(dev) => {
            if let Err(e) = crate::scrub::serve(&dev, stats_engine.clone()) {
                log::warn!("online scrub unavailable: {e}");
            }
            if let Err(e) = crate::stats::serve(&dev, stats, stats_engine) {
                log::warn!("live statistics unavailable: {e}");
            }
        }
        None => log::warn!("live statistics and scrub unavailable: mount not found"),
    }
    if let Err(e) = tune_bdi(&mp, &settings.bdi) {
        if root {
            log::warn!("cannot apply backing-device settings: {e}");
        } else {
            log::info!("backing-device settings need root; left at the kernel's defaults");
        }
    }
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]);
    match signals {
        Ok(mut signals) => {
            let mp = mp.clone();
            std::thread::spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    log::info!("signal {sig}: unmounting");
                    unmount_on_signal(&mp);
                }
            });
        }
        Err(e) => log::warn!("cannot install signal handlers: {e}"),
    }
    if settings.pin_threads {
        crate::workers::pin_when_started(usize::from(threads));
    }
    log::info!("mounted {} on {}", image.display(), mp.display());
    println!("{READY_LINE}");
    std::io::stdout().flush().ok();
    if std::env::var_os(crate::logging::DAEMON_ENV).is_some()
        && let Err(e) = crate::sys::detach_std_streams()
    {
        log::warn!("cannot detach from the launcher's output: {e}");
    }
    let result = session.run();
    if let Some(h) = helper {
        h.finish();
    }
    if result.is_ok() {
        log::info!("unmounted {} from {}", image.display(), mp.display());
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!(
            "session on {} ended with an error: {e}",
            mp.display()
        )),
    }
}

fn can_open_dev_fuse() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_ok()
}

/// The fusermount3 that made a mount: with auto_unmount it waits on the socket and unmounts
/// when it closes, so both live as long as the session.
struct Fusermount {
    socket: std::os::unix::net::UnixStream,
    child: std::process::Child,
}

impl Fusermount {
    fn finish(mut self) {
        drop(self.socket);
        self.child.wait().ok();
    }
}

/// Mounts through the setuid fusermount3 (libfuse's protocol): it opens /dev/fuse, mounts, and
/// passes the descriptor back over the socket named by `_FUSE_COMMFD`.
fn mount_with_fusermount(
    mp: &Path,
    s: &Settings,
    config: &fuser::Config,
) -> Result<(std::os::fd::OwnedFd, Fusermount), String> {
    use std::os::fd::AsRawFd;
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    crate::sys::inheritable(&theirs).map_err(|e| format!("socketpair: {e}"))?;
    let mut opts = vec![
        format!("subtype={SUBTYPE}"),
        (if s.read_only { "ro" } else { "rw" }).to_string(),
        "nosuid".to_string(),
        "nodev".to_string(),
    ];
    for o in config.mount_options.iter() {
        if let fuser::MountOption::FSName(name) = o {
            opts.push(format!("fsname={name}"));
        }
    }
    for (on, name) in [
        (s.kernel.default_permissions, "default_permissions"),
        (!s.exec, "noexec"),
        (s.kernel.atime == Atime::Never, "noatime"),
        (s.sync, "sync"),
        (s.dirsync, "dirsync"),
        (s.auto_unmount, "auto_unmount"),
        (config.acl != fuser::SessionACL::Owner, "allow_other"),
    ] {
        if on {
            opts.push(name.to_string());
        }
    }
    let mut child = Command::new("fusermount3")
        .arg("-o")
        .arg(opts.join(","))
        .arg("--")
        .arg(mp)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run fusermount3: {e}"))?;
    drop(theirs);
    match crate::sys::recv_fd(&ours) {
        Ok(fd) => Ok((
            fd,
            Fusermount {
                socket: ours,
                child,
            },
        )),
        Err(_) => {
            drop(ours);
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).ok();
            }
            child.wait().ok();
            let first = err.lines().next().unwrap_or("").trim();
            Err(match first.strip_prefix("fusermount3: ") {
                Some(why) => format!("fusermount3: {why}"),
                None if first.is_empty() => "fusermount3 failed".to_string(),
                None => format!("fusermount3: {first}"),
            })
        }
    }
}

/// Writes backing-device settings of the mount at `mp`. The device is found in
/// /proc/self/mountinfo, not by stat(), which would wait for this very daemon to answer.
fn tune_bdi(mp: &Path, settings: &[(&str, String)]) -> Result<(), String> {
    if settings.is_empty() {
        return Ok(());
    }
    let dev = mount_device(mp).ok_or("mount not found in /proc/self/mountinfo")?;
    for (knob, value) in settings {
        let path = format!("/sys/class/bdi/{dev}/{knob}");
        std::fs::write(&path, value).map_err(|e| format!("{path}: {e}"))?;
        log::debug!("{path} = {value}");
    }
    Ok(())
}

/// Unmounts after SIGTERM/SIGINT/SIGHUP. A mount can be busy for a moment (the kernel releases a
/// just-closed file asynchronously), so this retries for a while, then detaches it lazily: the
/// session then ends when the last user lets go.
fn unmount_on_signal(mp: &Path) {
    let fusermount = |lazy: bool| {
        let mut cmd = Command::new("fusermount3");
        cmd.arg("-u").arg("-q");
        if lazy {
            cmd.arg("-z");
        }
        cmd.arg("--")
            .arg(mp)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd.status().is_ok_and(|s| s.success())
    };
    for _ in 0..50 {
        if fusermount(false) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    log::warn!("{} stayed busy; detaching it", mp.display());
    if !fusermount(true) {
        log::error!("cannot unmount {}", mp.display());
    }
}

/// Runs this program again with `--foreground` in a new process group, relays its messages
/// until it reports the mount live, then returns, leaving it in the background.
fn mount_background() -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find own executable: {e}")),
    };
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot create pipe: {e}")),
    };
    let writer2 = match writer.try_clone() {
        Ok(w) => w,
        Err(e) => return fail(format!("cannot create pipe: {e}")),
    };
    // The same arguments in the verb form, with --foreground right after the verb.
    let mut args = crate::cli::args();
    args.insert(1, "--foreground".into());
    let child = Command::new(exe)
        .args(&args)
        .env(crate::logging::DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer2)
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the daemon: {e}")),
    };
    let reader = BufReader::new(reader);
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if line == READY_LINE {
            return ExitCode::SUCCESS;
        }
        eprintln!("{line}");
    }
    match child.wait() {
        Ok(status) if status.success() => fail("the daemon exited before the mount was live"),
        Ok(_) => ExitCode::FAILURE,
        Err(e) => fail(format!("waiting for the daemon: {e}")),
    }
}
