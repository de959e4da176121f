//! Command line: `mkfs`, `mount`, `fsck`, `info`. Every failure is one line on stderr and a
//! non-zero exit; nothing here panics on bad input.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use clap::{Parser, Subcommand};

use crate::engine::{Engine, OpenMode, check};
use crate::format::*;
use crate::fs::Fs;
use crate::fuse::{FuseAdapter, KernelOptions};

/// Test hook: a file that receives exactly what a power loss is guaranteed to leave (the
/// flushed state), through the crash simulator (`image::sim`).
const SHADOW_ENV: &str = "MMAPFS_POWERLOSS_SHADOW";

/// Line the background daemon prints once the mount is live.
const READY_LINE: &str = "mmapfs: mount is live";

#[derive(Parser)]
#[command(
    name = "mmapfs",
    version,
    about = "A persistent FUSE filesystem in one memory-mapped image file"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Create and format an image file.
    Mkfs {
        image: PathBuf,
        /// Initial size, e.g. 16M, 4G (the image grows on demand).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Overwrite an existing non-empty file.
        #[arg(long)]
        force: bool,
    },
    /// Mount an image. Returns once the mount is live unless --foreground.
    Mount {
        /// Stay in the foreground until unmounted.
        #[arg(long)]
        foreground: bool,
        /// FUSE worker threads [default: one per CPU, at most 16]. With at least one per CPU,
        /// each is pinned to a CPU (-o no_pin_threads to leave them to the scheduler).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        threads: Option<u16>,
        /// Mount options: commit=SECONDS (between commits when nothing calls fsync; default
        /// 5), ro, noexec, nosuid, nodev, noatime, writeback_cache,
        /// no_writeback_cache, no_readdirplus, no_clone_fd, no_pin_threads, max_write=BYTES, fsname=NAME,
        /// read_ahead_kb=N, max_ratio=N,
        /// strict_limit=0|1, max_bytes=N (backing-device settings), or any kernel FUSE option.
        #[arg(short = 'o', value_delimiter = ',')]
        options: Vec<String>,
        image: PathBuf,
        mountpoint: PathBuf,
    },
    /// Check every invariant of the image; exit 0 when consistent.
    Fsck {
        image: PathBuf,
        /// Repair what can be repaired (what a mount does after a crash).
        #[arg(long)]
        repair: bool,
    },
    /// Show the superblock, capacity, usage and state.
    Info { image: PathBuf },
    /// Convert a format-version-1 image to the current format, in place; the original is kept
    /// as IMAGE.v1.
    Upgrade {
        image: PathBuf,
        /// Do not keep the version-1 image.
        #[arg(long)]
        no_backup: bool,
    },
}

/// Parses `16M`, `4G`, `512k`, `1T`, `4096`, with optional `B`/`iB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("malformed size {s:?} (expected e.g. 16M, 4G)"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    if bytes < MIN_IMAGE_SIZE {
        return Err(format!("size {s:?} is below the minimum of 1M"));
    }
    Ok(bytes)
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("mmapfs: {msg}");
    ExitCode::FAILURE
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Verb::Mkfs { image, size, force } => match Engine::mkfs(&image, size, force) {
            Ok(()) => {
                println!(
                    "formatted {} ({} bytes)",
                    image.display(),
                    size / BLOCK_SIZE * BLOCK_SIZE
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Verb::Mount {
            foreground,
            threads,
            options,
            image,
            mountpoint,
        } => {
            if foreground {
                let threads = threads.unwrap_or_else(crate::workers::default_threads);
                mount_foreground(&image, &mountpoint, threads, &options)
            } else {
                mount_background()
            }
        }
        Verb::Fsck { image, repair } => fsck(&image, repair),
        Verb::Info { image } => info(&image),
        Verb::Upgrade { image, no_backup } => upgrade(&image, !no_backup),
    }
}

fn fsck(image: &Path, repair: bool) -> ExitCode {
    // Repair opens the image as a mount does: recovery runs first, and fixes are transactions.
    let open_mode = if repair {
        OpenMode::Mount
    } else {
        OpenMode::Inspect
    };
    let engine = match Engine::open(image, open_mode) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let rec = engine.recovery().clone();
    if let Some(why) = &rec.rolled_back {
        println!("recovery: {why}");
    }
    if let Some(why) = &rec.other_slot {
        println!("note: {why}");
    }
    if repair {
        match engine.free_orphans() {
            Ok(0) => {}
            Ok(n) => println!("recovery: freed {n} unlinked files left open"),
            Err(e) => return fail(format!("{}: freeing unlinked files: {e}", image.display())),
        }
    } else if rec.needed() {
        let orphans = match rec.orphans {
            0 => String::new(),
            n => format!(", freeing {n} unlinked files left open"),
        };
        println!(
            "needs recovery: not cleanly unmounted; the next mount (or fsck --repair) uses \
             transaction {}{orphans}",
            rec.txn
        );
    }
    let mode = if repair {
        check::Mode::Repair
    } else {
        check::Mode::Report
    };
    match check::run(&engine, mode) {
        Ok(report) => {
            for r in &report.repaired {
                println!("repaired: {r}");
            }
            if repair && report.problems.is_empty() {
                engine.clear_errors();
                if let Err(e) = engine.close_clean() {
                    return fail(format!("{}: {e}", image.display()));
                }
            }
            for p in &report.problems {
                println!("problem: {p}");
            }
            println!(
                "{}: {} inodes, {} directories, {} blocks used",
                image.display(),
                report.inodes,
                report.directories,
                report.blocks_used,
            );
            if report.problems.is_empty() {
                println!("clean");
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "mmapfs: {}: {} problem(s) found",
                    image.display(),
                    report.problems.len()
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => fail(format!("{}: {e}", image.display())),
    }
}

fn upgrade(image: &Path, keep_backup: bool) -> ExitCode {
    match crate::upgrade::upgrade(image, keep_backup) {
        Ok(s) => {
            for line in &s.skipped {
                println!("skipped: {line}");
            }
            println!(
                "upgraded {} to format version {FORMAT_VERSION}: {} files, {} directories, {} \
                 bytes of data{}",
                image.display(),
                s.files,
                s.directories,
                s.bytes,
                match &s.backup {
                    Some(b) => format!("; the version-1 image is kept as {}", b.display()),
                    None => String::new(),
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn info(image: &Path) -> ExitCode {
    let engine = match Engine::open(image, OpenMode::Inspect) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let sb = engine.superblock();
    let rec = engine.recovery();
    let total = sb.total_blocks.get();
    let free = sb.free_blocks.get();
    let mib = |blocks: u64| blocks as f64 * BLOCK_SIZE as f64 / (1 << 20) as f64;
    let uuid: String = sb.uuid.iter().map(|b| format!("{b:02x}")).collect();
    println!("image:        {}", image.display());
    println!("format:       mmapfs version {}", sb.version);
    println!("uuid:         {uuid}");
    let state = match rec.state {
        STATE_CLEAN => "clean",
        STATE_ERRORS => "damage was found: run `mmapfs fsck --repair`",
        _ => "dirty (not cleanly unmounted: the next mount recovers it)",
    };
    println!("state:        {state}");
    println!(
        "transaction:  {} (superblock {}{})",
        rec.txn,
        rec.slot,
        if rec.rolled_back.is_some() {
            "; the newest commit was incomplete"
        } else {
            ""
        }
    );
    println!("block size:   {BLOCK_SIZE}");
    println!("capacity:     {total} blocks ({:.1} MiB)", mib(total));
    println!(
        "used:         {} blocks ({:.1} MiB)",
        total - free,
        mib(total - free)
    );
    println!("free:         {free} blocks ({:.1} MiB)", mib(free));
    println!(
        "inodes:       {} used, {} slots",
        sb.used_inodes, sb.itab_slots
    );
    if rec.orphans > 0 {
        println!("orphans:      {} (freed at the next mount)", rec.orphans);
    }
    println!("created:      {} (unix time)", sb.created_sec);
    println!("mount count:  {}", sb.mount_count);
    ExitCode::SUCCESS
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
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let target = mp.to_string_lossy();
    info.lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .filter(|f| f.get(4).map(|m| unescape_mountinfo(m)).as_deref() == Some(&*target))
        .filter_map(|f| f.get(2).map(|d| d.to_string()))
        .next_back()
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn mount_foreground(image: &Path, mountpoint: &Path, threads: u16, options: &[String]) -> ExitCode {
    let mp = match check_mountpoint(mountpoint) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    // Writeback cache stays opt-in: with it, SEEK_DATA/SEEK_HOLE and st_blocks only see data the
    // kernel has written back, and the kernel's mtime can differ from the one persisted
    // (integration tests data::fallocate_modes_and_seek_data_hole, data::sparse_file_at_one_tib,
    // posix::chmod_chown_and_nanosecond_times fail with it on).
    let mut kopts = KernelOptions {
        writeback_cache: false,
        readdirplus: true,
        max_write: crate::fuse::MAX_WRITE,
    };
    let mut clone_fd = true;
    let mut pin_threads = true;
    let mut commit_interval = crate::engine::DEFAULT_COMMIT_INTERVAL;
    // The kernel holds every FUSE mount to a strict 1% share of the dirty-page limit, which
    // throttles writes through mappings (mmap sequential writes: 490 -> 1323 MB/s without it, 1 GiB
    // fio on 2 cores). The limit guards against daemons that cannot make progress on writeback;
    // this one copies into its own mapping of a file on another device. `-o max_ratio=1,
    // strict_limit=1` restores the kernel's settings.
    let mut bdi: Vec<(&'static str, String)> = DEFAULT_BDI
        .iter()
        .map(|(k, v)| (*k, v.to_string()))
        .collect();
    let canon_image = image.canonicalize().unwrap_or_else(|_| image.to_path_buf());
    let mut mount_options = vec![
        fuser::MountOption::FSName(format!("mmapfs:{}", canon_image.display())),
        fuser::MountOption::Subtype("mmapfs".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    for o in options.iter().filter(|o| !o.is_empty()) {
        match o.as_str() {
            "writeback_cache" => kopts.writeback_cache = true,
            "no_writeback_cache" => kopts.writeback_cache = false,
            "no_readdirplus" => kopts.readdirplus = false,
            "no_clone_fd" => clone_fd = false,
            "no_pin_threads" => pin_threads = false,
            "ro" => mount_options.push(fuser::MountOption::RO),
            "rw" => mount_options.push(fuser::MountOption::RW),
            "exec" => mount_options.push(fuser::MountOption::Exec),
            "noexec" => mount_options.push(fuser::MountOption::NoExec),
            "suid" => mount_options.push(fuser::MountOption::Suid),
            "nosuid" => mount_options.push(fuser::MountOption::NoSuid),
            "dev" => mount_options.push(fuser::MountOption::Dev),
            "nodev" => mount_options.push(fuser::MountOption::NoDev),
            "atime" => mount_options.push(fuser::MountOption::Atime),
            "noatime" => mount_options.push(fuser::MountOption::NoAtime),
            "allow_other" | "default_permissions" => {}
            other => {
                if let Some(name) = other.strip_prefix("fsname=") {
                    mount_options[0] = fuser::MountOption::FSName(name.into());
                    continue;
                }
                if let Some(value) = other.strip_prefix("commit=") {
                    match value.parse::<u64>() {
                        Ok(n) if (1..=86_400).contains(&n) => {
                            commit_interval = std::time::Duration::from_secs(n)
                        }
                        _ => {
                            return fail(format!(
                                "mount option {other}: expected seconds between commits, 1..=86400"
                            ));
                        }
                    }
                    continue;
                }
                if let Some(value) = other.strip_prefix("max_write=") {
                    match value.parse::<u32>() {
                        Ok(n) if (4096..=crate::fuse::MAX_WRITE).contains(&n) => {
                            kopts.max_write = n
                        }
                        _ => {
                            return fail(format!(
                                "mount option {other}: expected 4096..={}",
                                crate::fuse::MAX_WRITE
                            ));
                        }
                    }
                    continue;
                }
                if let Some((key, value)) = other.split_once('=')
                    && let Some(&knob) = BDI_KNOBS.iter().find(|k| **k == key)
                {
                    if value.parse::<u64>().is_err() {
                        return fail(format!("mount option {other}: expected a number"));
                    }
                    bdi.retain(|(k, _)| *k != knob);
                    bdi.push((knob, value.to_string()));
                    continue;
                }
                mount_options.push(fuser::MountOption::CUSTOM(other.into()));
            }
        }
    }
    // Options are all checked above: only now is the image opened (and marked mounted).
    let mut engine = match Engine::open(image, OpenMode::Mount) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    engine.set_commit_interval(commit_interval);
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
    config.mount_options = mount_options;
    // allow_other when root: integration clients run as other users (pjdfstest, sudo -u).
    config.acl = if is_root() {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(usize::from(threads));
    config.clone_fd = clone_fd;
    let fs = Fs::new(engine);
    let adapter = FuseAdapter::new(fs, kopts);
    let notifier_slot = adapter.notifier_slot();
    let session = match fuser::Session::new(adapter, &mp, &config) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot mount on {}: {e}", mp.display())),
    };
    // Before any request is served: workers start in session.run() below.
    notifier_slot.set(session.notifier()).ok();
    if let Err(e) = tune_bdi(&mp, &bdi) {
        log::warn!("cannot apply backing-device settings: {e}");
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
    if pin_threads {
        crate::workers::pin_when_started(usize::from(threads));
    }
    log::info!("mounted {} on {}", image.display(), mp.display());
    println!("{READY_LINE}");
    std::io::stdout().flush().ok();
    match session.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!(
            "session on {} ended with an error: {e}",
            mp.display()
        )),
    }
}

/// Per-mount backing-device settings the `-o` options may set (files in /sys/class/bdi/DEV/):
/// readahead size, and the dirty-page limit the kernel imposes on FUSE mounts (a strict 1%).
const BDI_KNOBS: [&str; 4] = ["read_ahead_kb", "max_ratio", "strict_limit", "max_bytes"];
/// What the daemon sets unless told otherwise (see `mount_foreground`).
const DEFAULT_BDI: [(&str, &str); 2] = [("max_ratio", "40"), ("strict_limit", "0")];

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
        log::info!("{path} = {value}");
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

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
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
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // Insert --foreground right after the verb.
    let verb_pos = args.iter().position(|a| a == "mount").unwrap_or(0);
    args.insert(verb_pos + 1, "--foreground".into());
    let child = Command::new(exe)
        .args(&args)
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

use std::os::unix::process::CommandExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("2048k"), Ok(2 << 20));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("abc").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("4k").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
