//! Command line: `mkfs`, `mount`, `fsck`, `info`, `upgrade`. Every failure is one line on
//! stderr and a non-zero exit; nothing here panics on bad input.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::engine::{Engine, OpenMode, RootDir, check};
use crate::format::*;
use crate::mount;

#[derive(Parser)]
#[command(
    name = "mmapfs",
    version,
    about = "A persistent FUSE filesystem in one memory-mapped image file",
    arg_required_else_help = true,
    after_help = "As a mount helper (mount -t fuse.mmapfs, /etc/fstab): mmapfs IMAGE MOUNTPOINT [-o OPTIONS]"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Verb,
}

const SIZE_HELP: &str = "\
Sizes are bytes, or a number with a binary suffix: K (KiB), M (MiB), G (GiB), T (TiB), P, E;
a trailing B or iB is accepted (16M = 16MiB = 16777216). The minimum is 1M.";

#[derive(Subcommand)]
enum Verb {
    /// Create and format an image file.
    #[command(after_help = SIZE_HELP)]
    Mkfs {
        /// The image file to create.
        image: PathBuf,
        /// Initial size, e.g. 16M, 4G (the image grows on demand).
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        size: u64,
        /// Overwrite an existing non-empty file.
        #[arg(long)]
        force: bool,
        /// Owner of the root directory, UID:GID [default: the caller's].
        #[arg(long, value_parser = parse_owner)]
        owner: Option<(u32, u32)>,
        /// Permission bits of the root directory, in octal.
        #[arg(long, value_parser = parse_mode, default_value = "755")]
        mode: u32,
    },
    /// Mount an image. Returns once the mount is live unless --foreground.
    #[command(after_help = mount::options::HELP)]
    Mount {
        /// Stay in the foreground until unmounted.
        #[arg(short = 'f', long)]
        foreground: bool,
        /// FUSE worker threads [default: one per CPU, at most 16]. With at least one per CPU,
        /// each is pinned to a CPU (-o no_pin_threads to leave them to the scheduler).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        threads: Option<u16>,
        /// Mount options, comma separated (listed below).
        #[arg(short = 'o')]
        options: Vec<String>,
        /// Append the daemon's log to this file [default: syslog when in the background,
        /// stderr with --foreground].
        #[arg(long, value_name = "PATH")]
        log_file: Option<PathBuf>,
        /// The image file.
        image: PathBuf,
        /// An existing directory to mount it on.
        mountpoint: PathBuf,
    },
    /// Check every invariant of the image; exit 0 when consistent.
    Fsck {
        /// The image file (not mounted).
        image: PathBuf,
        /// Repair what can be repaired (what a mount does after a crash).
        #[arg(long)]
        repair: bool,
        /// Check a mounted image anyway: its daemon checks the live filesystem read-only, as
        /// `mmapfs scrub MOUNTPOINT` does (not with --repair).
        #[arg(long, conflicts_with = "repair")]
        force: bool,
    },
    /// Show the superblock, capacity, usage and state (also of a mounted image).
    Info {
        /// The image file.
        image: PathBuf,
    },
    /// Live numbers of a mounted filesystem: requests per operation, bytes read and written,
    /// fsyncs and their latency, commits, image size and growth.
    Stats {
        /// Where the filesystem is mounted.
        mountpoint: PathBuf,
        /// Print the Prometheus text format (what an exporter would serve).
        #[arg(long)]
        prometheus: bool,
    },
    /// Check a mounted filesystem without unmounting it: the checks of `fsck` (checksums,
    /// trees, reachability, space map), read-only, run by its daemon. Operations wait while it
    /// runs. Exit status 1 when it finds damage (then unmount and run `fsck --repair`).
    Scrub {
        /// Where the filesystem is mounted.
        mountpoint: PathBuf,
    },
    /// Print a shell completion script (install: scripts/install.sh).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (mmapfs.1 and one per verb) into DIR.
    #[command(hide = true)]
    Manpages {
        /// An existing directory.
        dir: PathBuf,
    },
    /// Convert a format-version-1 image to the current format, in place; the original is kept
    /// as IMAGE.v1.
    Upgrade {
        /// The version-1 image file.
        image: PathBuf,
        /// Do not keep the version-1 image.
        #[arg(long)]
        no_backup: bool,
    },
}

/// The arguments (without the program name), in the verb form: the mount-helper form
/// `mmapfs IMAGE MOUNTPOINT [-o OPTIONS]` that mount(8) and mount.fuse3 use becomes
/// `mmapfs mount IMAGE MOUNTPOINT [-o OPTIONS]`.
pub fn args() -> Vec<OsString> {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let verbs: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .chain(["help".to_string()])
        .collect();
    if let Some(first) = args.first().and_then(|a| a.to_str())
        && !first.starts_with('-')
        && !verbs.iter().any(|v| v == first)
    {
        args.insert(0, "mount".into());
    }
    args
}

/// Parses `16M`, `4G`, `512k`, `1T`, `4096`, with optional `B`/`iB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("size {s:?} is negative"));
    }
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
        Some('p') => (&stripped[..stripped.len() - 1], 50),
        Some('e') => (&stripped[..stripped.len() - 1], 60),
        _ => (stripped, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("malformed size {s:?} (expected e.g. 16M, 4G)"))?;
    let max = crate::image::MAX_IMAGE_SIZE;
    let bytes = n
        .checked_mul(1u64 << shift)
        .filter(|&b| b <= max)
        .ok_or_else(|| format!("size {s:?} is too large (at most {}T)", max >> 40))?;
    if bytes < MIN_IMAGE_SIZE {
        return Err(format!("size {s:?} is below the minimum of 1M"));
    }
    Ok(bytes)
}

/// Parses `UID:GID` (numbers).
fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s
        .split_once(':')
        .ok_or_else(|| format!("owner {s:?}: expected UID:GID, e.g. 1000:1000"))?;
    match (u.parse(), g.parse()) {
        (Ok(u), Ok(g)) => Ok((u, g)),
        _ => Err(format!("owner {s:?}: expected UID:GID, e.g. 1000:1000")),
    }
}

/// Parses permission bits in octal (`755`, `0700`, `1777`).
fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!(
            "mode {s:?}: expected octal permission bits, e.g. 755"
        )),
    }
}

impl Cli {
    /// Where this command logs, and whether it is a mount (which logs at info by default).
    pub fn log_target(&self) -> (crate::logging::Target, bool) {
        use crate::logging::Target;
        match &self.command {
            Verb::Mount { log_file, .. } => {
                let target = match log_file {
                    Some(p) => Target::File(p.clone()),
                    None if std::env::var_os(crate::logging::DAEMON_ENV).is_some() => {
                        Target::Syslog
                    }
                    None => Target::Stderr,
                };
                (target, true)
            }
            _ => (Target::Stderr, false),
        }
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("mmapfs: {msg}");
    ExitCode::FAILURE
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Verb::Mkfs {
            image,
            size,
            force,
            owner,
            mode,
        } => {
            let (uid, gid) = owner.unwrap_or_else(mount::ids);
            let root = RootDir { uid, gid, mode };
            match Engine::mkfs_with(&image, size, force, root) {
                Ok(()) => {
                    println!(
                        "formatted {} ({} bytes)",
                        image.display(),
                        size / BLOCK_SIZE * BLOCK_SIZE
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Verb::Mount {
            foreground,
            threads,
            options,
            image,
            mountpoint,
            log_file: _,
        } => {
            let threads = threads.unwrap_or_else(crate::workers::default_threads);
            mount::run(&image, &mountpoint, foreground, threads, &options)
        }
        Verb::Fsck {
            image,
            repair,
            force,
        } => fsck(&image, repair, force),
        Verb::Info { image } => info(&image),
        Verb::Upgrade { image, no_backup } => upgrade(&image, !no_backup),
        Verb::Stats {
            mountpoint,
            prometheus,
        } => stats(&mountpoint, prometheus),
        Verb::Scrub { mountpoint } => scrub(&mountpoint),
        Verb::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "mmapfs", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Verb::Manpages { dir } => match clap_mangen::generate_to(Cli::command(), &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("{}: {e}", dir.display())),
        },
    }
}

fn fsck(image: &Path, repair: bool, force: bool) -> ExitCode {
    if let Some(holder) = mount::mounted_at(image) {
        if let (true, Some(mp)) = (force, &holder.mountpoint) {
            println!(
                "{}: mounted at {}; its daemon checks the live filesystem",
                image.display(),
                mp.display()
            );
            return scrub(mp);
        }
        return fail(format!(
            "{}: image is {holder}; unmount it first, or check it live with `mmapfs scrub \
             MOUNTPOINT` (`fsck --force`)",
            image.display()
        ));
    }
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
            // A damaged orphan list is rebuilt by the check below.
            Err(crate::error::Error::Corrupt(why)) => {
                println!("recovery: unlinked files not freed: {why}")
            }
            Err(e) => return fail(format!("{}: freeing unlinked files: {e}", image.display())),
        }
    } else if rec.needed() && (rec.state != STATE_ERRORS || rec.orphans > 0) {
        // An image marked as damaged may have been unmounted cleanly: the mark hides it.
        let unclean = match rec.state {
            STATE_ERRORS => "",
            _ => "not cleanly unmounted; ",
        };
        let orphans = match rec.orphans {
            0 => String::new(),
            n => format!(", freeing {n} unlinked files left open"),
        };
        println!(
            "needs recovery: {unclean}the next mount (or fsck --repair) uses transaction {}{orphans}",
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
            for f in &report.found {
                println!("found: {f}");
            }
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
    // A mounted image is locked by its daemon: answer from the superblock at once.
    if let Some(holder) = mount::mounted_at(image) {
        let sb = match crate::engine::peek_superblock(image) {
            Ok(sb) => sb,
            Err(e) => return fail(e),
        };
        print_identity(image, &sb);
        println!("state:        {holder} (figures as of its last commit)");
        println!("transaction:  {}", sb.txn);
        print_usage(&sb);
        return ExitCode::SUCCESS;
    }
    let engine = match Engine::open(image, OpenMode::Inspect) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let sb = engine.superblock();
    let rec = engine.recovery();
    print_identity(image, &sb);
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
    print_usage(&sb);
    if rec.orphans > 0 {
        println!("orphans:      {} (freed at the next mount)", rec.orphans);
    }
    ExitCode::SUCCESS
}

/// The reply of the daemon serving `mountpoint` to `request` (given the mount's device), or
/// the exit of a command that could not get one (`what` says what is missing).
fn from_daemon(
    mountpoint: &Path,
    what: &str,
    request: fn(&str) -> std::io::Result<String>,
) -> Result<String, ExitCode> {
    mount::device_of(mountpoint)
        .and_then(|dev| request(&dev))
        .map_err(|e| {
            fail(format!(
                "{}: {what} ({e}); is it an mmapfs mount point?",
                mountpoint.display()
            ))
        })
}

fn scrub(mountpoint: &Path) -> ExitCode {
    let text = match from_daemon(mountpoint, "cannot reach the daemon", crate::scrub::request) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let last = text.lines().last().unwrap_or("");
    if last == crate::scrub::CLEAN {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    if last == crate::scrub::DAMAGED {
        print!("{text}");
        let problems = text.lines().filter(|l| l.starts_with("problem:")).count();
        eprintln!(
            "mmapfs: {}: {problems} problem(s) found; unmount it and run `mmapfs fsck --repair` on \
             its image",
            mountpoint.display()
        );
        return ExitCode::FAILURE;
    }
    // "refused: ..." or "error: ...", or nothing when the daemon went away.
    let why = if last.is_empty() {
        "the daemon closed the connection"
    } else {
        last
    };
    fail(format!("{}: scrub {why}", mountpoint.display()))
}

fn stats(mountpoint: &Path, prometheus: bool) -> ExitCode {
    let text = match from_daemon(mountpoint, "no live statistics", crate::stats::fetch) {
        Ok(t) => t,
        Err(code) => return code,
    };
    if prometheus {
        print!("{text}");
        return ExitCode::SUCCESS;
    }
    // name{labels} -> value
    let samples: Vec<(&str, f64)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.strip_prefix("mmapfs_")?, v.parse().ok()?))
        })
        .collect();
    let get = |k: &str| {
        samples
            .iter()
            .find(|(n, _)| *n == k)
            .map_or(0.0, |(_, v)| *v)
    };
    let mib = |b: f64| b / (1u64 << 20) as f64;
    println!("mount:        {}", mountpoint.display());
    println!("uptime:       {:.0} s", get("uptime_seconds"));
    let mut requests: Vec<(&str, f64)> = samples
        .iter()
        .filter_map(|(k, v)| {
            let op = k
                .strip_prefix("requests_total{op=\"")?
                .strip_suffix("\"}")?;
            (*v > 0.0).then_some((op, *v))
        })
        .collect();
    requests.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = requests.iter().map(|r| r.1).sum();
    let list: Vec<String> = requests.iter().map(|(op, n)| format!("{op} {n}")).collect();
    println!("requests:     {total} ({})", list.join(", "));
    let queues = get("fuse_io_uring_queues");
    let dev = get("fuse_transport_requests_total{transport=\"dev_fuse\"}");
    if queues > 0.0 {
        println!(
            "transport:    io_uring ({queues} queues): {} requests; /dev/fuse: {dev}",
            get("fuse_transport_requests_total{transport=\"io_uring\"}")
        );
    } else {
        println!("transport:    /dev/fuse: {dev} requests");
    }
    println!("read:         {:.1} MiB", mib(get("read_bytes_total")));
    println!("written:      {:.1} MiB", mib(get("written_bytes_total")));
    let fsyncs = get("fsync_seconds_count");
    if fsyncs > 0.0 {
        // The smallest bucket bound that holds half (and 99%) of the fsyncs.
        let bound = |q: f64| {
            samples
                .iter()
                .filter_map(|(k, v)| {
                    let le = k
                        .strip_prefix("fsync_seconds_bucket{le=\"")?
                        .strip_suffix("\"}")?;
                    (*v >= q * fsyncs).then_some(le)
                })
                .next()
                .map_or("?".to_string(), |le| match le.parse::<f64>() {
                    Ok(s) => format!("{:.0} µs", s * 1e6),
                    Err(_) => "more".to_string(),
                })
        };
        println!(
            "fsyncs:       {fsyncs}, mean {:.0} µs, p50 <= {}, p99 <= {}",
            get("fsync_seconds_sum") / fsyncs * 1e6,
            bound(0.5),
            bound(0.99)
        );
    } else {
        println!("fsyncs:       0");
    }
    println!(
        "commits:      {} (transaction {})",
        get("commits_total"),
        get("transaction")
    );
    println!(
        "image:        {:.1} MiB ({:+.1} MiB since the mount), {:.1} MiB in use",
        mib(get("image_bytes")),
        mib(get("image_bytes") - get("image_bytes_at_mount")),
        mib(get("used_bytes"))
    );
    ExitCode::SUCCESS
}

fn print_identity(image: &Path, sb: &Superblock) {
    let uuid: String = sb.uuid.iter().map(|b| format!("{b:02x}")).collect();
    println!("image:        {}", image.display());
    println!("format:       mmapfs version {}", sb.version);
    let mut features = Vec::new();
    if sb.incompat.get() & INCOMPAT_XATTR_INDEXED != 0 {
        features.push("large_xattrs");
    }
    if !features.is_empty() {
        println!("features:     {}", features.join(" "));
    }
    println!("uuid:         {uuid}");
}

fn print_usage(sb: &Superblock) {
    let total = sb.total_blocks.get();
    let free = sb.free_blocks.get().min(total);
    let mib = |blocks: u64| blocks as f64 * BLOCK_SIZE as f64 / (1 << 20) as f64;
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
    println!("created:      {}", utc_date(sb.created_sec.get()));
    println!("mount count:  {}", sb.mount_count);
    if sb.last_mount_sec.get() != 0 {
        println!("last mount:   {}", utc_date(sb.last_mount_sec.get()));
    }
}

/// `2026-11-29 01:23:45 UTC` for seconds since the epoch (days to civil date: H. Hinnant).
fn utc_date(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

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
        assert!(parse_size("1E").unwrap_err().contains("too large"));
        assert!(parse_size("-5M").unwrap_err().contains("negative"));
        assert_eq!(parse_size("16T"), Ok(16 << 40));
    }

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_date(1_795_894_927), "2026-11-28 19:42:07 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_date(-1), "1969-12-31 23:59:59 UTC");
    }
}
