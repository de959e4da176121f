//! Mounting as people do: mount(8), /etc/fstab and mount.fuse3 (the helper form
//! `mmapfs IMAGE MOUNTPOINT -o OPTIONS`), the `fuse.mmapfs` type, read-only and failed mounts
//! that leave the image as it was, `info`/`fsck` of a mounted image, ownership options, mkfs
//! choices, and a normal user's mounts.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::*;

/// Tests that change system files (/usr/local/bin/mmapfs, /etc/fstab, /dev/fuse's mode) run
/// one at a time.
static SYSTEM: Mutex<()> = Mutex::new(());

/// The unprivileged user the tests run commands as.
const NOBODY: u32 = 65534;

fn tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("mmapfs-mnt-")
        .tempdir()
        .unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn mkfs(image: &Path, extra: &[&str]) {
    let out = run(Command::new(BIN)
        .arg("mkfs")
        .arg(image)
        .args(["--size", "16M"])
        .args(extra));
    assert!(out.status.success(), "mkfs: {}", describe(&out));
}

/// Runs a command and returns its output (stdin closed).
fn sh(program: &str, args: &[&str]) -> Output {
    run(Command::new(program).args(args))
}

/// `BIN args...` as user nobody.
fn as_nobody(args: &[&str]) -> Output {
    let ids = NOBODY.to_string();
    run(Command::new("setpriv")
        .args(["--reuid", &ids, "--regid", &ids, "--clear-groups", BIN])
        .args(args))
}

/// `program args...` as user nobody.
fn as_nobody_run(program: &str, args: &[&str]) -> Output {
    let ids = NOBODY.to_string();
    run(Command::new("setpriv")
        .args(["--reuid", &ids, "--regid", &ids, "--clear-groups", program])
        .args(args))
}

/// Unmounts `mnt` if it is mounted (ignoring errors) and waits until the daemon let go of
/// `image`.
fn unmount(mnt: &Path) {
    if is_mountpoint(mnt) {
        let out = sh("umount", &[mnt.to_str().unwrap()]);
        assert!(out.status.success(), "umount: {}", describe(&out));
    }
}

/// Waits until no process holds `image` open (a daemon finishing its unmount).
fn wait_released(image: &Path) {
    let canon = image.canonicalize().unwrap();
    let start = Instant::now();
    while holders(&canon) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn holders(image: &Path) -> bool {
    fs::read_dir("/proc").unwrap().flatten().any(|p| {
        fs::read_dir(p.path().join("fd")).is_ok_and(|fds| {
            fds.flatten()
                .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t == image))
        })
    })
}

/// Lazily unmounts on drop, so a failing assertion leaves no mount behind.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mountpoint(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Puts this build at /usr/local/bin/mmapfs (where mount(8)'s safe PATH finds it) and restores
/// what was there on drop. /etc/fstab is restored too.
struct SystemFiles {
    fstab: Vec<u8>,
    backup: Option<PathBuf>,
}

const INSTALLED: &str = "/usr/local/bin/mmapfs";
const FSTAB: &str = "/etc/fstab";

impl SystemFiles {
    fn install() -> SystemFiles {
        let fstab = fs::read(FSTAB).unwrap_or_default();
        let backup = PathBuf::from(format!("{INSTALLED}.mmapfs-test-backup"));
        let had = fs::symlink_metadata(INSTALLED).is_ok();
        if had {
            fs::rename(INSTALLED, &backup).unwrap();
        }
        fs::create_dir_all("/usr/local/bin").unwrap();
        std::os::unix::fs::symlink(BIN, INSTALLED).unwrap();
        SystemFiles {
            fstab,
            backup: had.then_some(backup),
        }
    }
}

impl Drop for SystemFiles {
    fn drop(&mut self) {
        let _ = fs::write(FSTAB, &self.fstab);
        let _ = fs::remove_file(INSTALLED);
        if let Some(b) = &self.backup {
            let _ = fs::rename(b, INSTALLED);
        }
    }
}

/// The filesystem type and source of the mount at `mnt`, from findmnt.
fn findmnt(mnt: &Path) -> (String, String) {
    let out = sh(
        "findmnt",
        &["-n", "-o", "FSTYPE,SOURCE", mnt.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (t, s) = text.split_once(' ').unwrap_or((&text, ""));
    (t.to_string(), s.trim().to_string())
}

/// mount -t fuse.mmapfs, an /etc/fstab line and mount.fuse3's `mmapfs#IMAGE` all mount; the
/// type is fuse.mmapfs (findmnt -t and df -t find it); remount gives one clear line.
#[test]
fn mount_8_fstab_and_mount_fuse3() {
    let _serial = SYSTEM.lock().unwrap_or_else(|e| e.into_inner());
    let _files = SystemFiles::install();
    let dir = tempdir();
    let image = dir.path().join("img");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    mkfs(&image, &[]);
    let _guard = Unmount(mnt.clone());
    let (img_s, mnt_s) = (image.to_str().unwrap(), mnt.to_str().unwrap());

    // mount(8) with a type and the options an fstab line carries.
    let out = sh(
        "mount",
        &[
            "-t",
            "fuse.mmapfs",
            img_s,
            mnt_s,
            "-o",
            "defaults,nofail,noauto,_netdev,x-systemd.automount,noexec",
        ],
    );
    assert!(out.status.success(), "mount -t: {}", describe(&out));
    assert!(is_mountpoint(&mnt));
    let canon = image.canonicalize().unwrap();
    assert_eq!(
        findmnt(&mnt),
        ("fuse.mmapfs".to_string(), canon.display().to_string())
    );
    let listed = sh("findmnt", &["-n", "-t", "fuse.mmapfs", "-o", "TARGET"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(mnt_s),
        "findmnt -t fuse.mmapfs: {}",
        describe(&listed)
    );
    let df = sh("df", &["-t", "fuse.mmapfs"]);
    assert!(
        String::from_utf8_lossy(&df.stdout).contains(mnt_s),
        "df -t fuse.mmapfs: {}",
        describe(&df)
    );
    fs::write(mnt.join("file"), b"via mount -t").unwrap();

    // Remount: refused with one line that says so; the mount stays.
    let out = sh("mount", &["-o", "remount,ro", mnt_s]);
    assert!(!out.status.success(), "remount: {}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("remount is not supported"), "remount: {err}");
    assert!(!err.contains("not found"), "remount: {err}");
    assert!(is_mountpoint(&mnt));
    unmount(&mnt);
    wait_released(&image);

    // An fstab line, mounted by its mount point.
    let line = format!("{img_s} {mnt_s} fuse.mmapfs defaults,nofail 0 0\n");
    let mut fstab = fs::read(FSTAB).unwrap_or_default();
    fstab.extend_from_slice(line.as_bytes());
    fs::write(FSTAB, fstab).unwrap();
    let out = sh("mount", &[mnt_s]);
    assert!(out.status.success(), "mount (fstab): {}", describe(&out));
    assert_eq!(fs::read(mnt.join("file")).unwrap(), b"via mount -t");
    assert_eq!(findmnt(&mnt).0, "fuse.mmapfs");
    unmount(&mnt);
    wait_released(&image);

    // mount.fuse3 with the old `type#source` form.
    let source = format!("mmapfs#{img_s}");
    let out = sh("mount.fuse3", &[&source, mnt_s, "-o", "rw"]);
    assert!(out.status.success(), "mount.fuse3: {}", describe(&out));
    assert_eq!(findmnt(&mnt).0, "fuse.mmapfs");
    unmount(&mnt);
    wait_released(&image);

    // The helper form directly, in the background.
    let out = run(Command::new(BIN).args([img_s, mnt_s, "-o", "ro"]));
    assert!(out.status.success(), "helper form: {}", describe(&out));
    assert!(is_mountpoint(&mnt));
    unmount(&mnt);
    wait_released(&image);
    fsck(&image);
}

/// Options are checked before the image is opened, a refused option is named, and a read-only
/// mount writes nothing: the image stays byte for byte as it was.
#[test]
fn refused_and_read_only_mounts_leave_the_image_as_it_was() {
    let dir = tempdir();
    let image = dir.path().join("img");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    mkfs(&image, &[]);
    // Give it contents, then unmount cleanly.
    {
        let m_out = run(Command::new(BIN).arg("mount").arg(&image).arg(&mnt));
        assert!(m_out.status.success(), "mount: {}", describe(&m_out));
        let _g = Unmount(mnt.clone());
        fs::write(mnt.join("kept"), b"contents").unwrap();
        unmount(&mnt);
        wait_released(&image);
    }
    let before = fs::read(&image).unwrap();
    for opt in [
        "typo_option",
        "nonempty_typo=1",
        "uid=no-such-user-x",
        "remount",
    ] {
        let out = run(Command::new(BIN)
            .arg("mount")
            .arg(&image)
            .arg(&mnt)
            .args(["-o", opt]));
        assert!(!out.status.success(), "{opt}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{opt}: {err}");
        assert!(err.contains(opt.split('=').next().unwrap()), "{opt}: {err}");
        assert!(!is_mountpoint(&mnt), "{opt}: mounted");
        assert!(fs::read(&image).unwrap() == before, "{opt}: image changed");
    }
    // Read-only: readable, refuses writes, and writes nothing (no mount count, no state).
    let out = run(Command::new(BIN)
        .arg("mount")
        .arg(&image)
        .arg(&mnt)
        .args(["-o", "ro"]));
    assert!(out.status.success(), "mount -o ro: {}", describe(&out));
    {
        let _g = Unmount(mnt.clone());
        assert_eq!(fs::read(mnt.join("kept")).unwrap(), b"contents");
        let err = fs::write(mnt.join("new"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        unmount(&mnt);
        wait_released(&image);
    }
    assert!(
        fs::read(&image).unwrap() == before,
        "a read-only mount changed the image"
    );
    fsck(&image);
}

/// `info` of a mounted image answers at once from the superblock, saying where it is mounted
/// and by which process; `fsck` and a second mount say the same at once.
#[test]
fn info_fsck_and_second_mount_of_a_mounted_image_answer_at_once() {
    let m = Mount::new();
    let pid = m.pid().to_string();
    let mnt = m.path().canonicalize().unwrap().display().to_string();
    let start = Instant::now();
    let out = run(Command::new(BIN).arg("info").arg(m.image()));
    assert!(out.status.success(), "info: {}", describe(&out));
    assert!(start.elapsed() < Duration::from_secs(2), "info waited");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("mounted on {mnt} by process {pid}")),
        "{text}"
    );
    assert!(text.contains("capacity:"), "{text}");

    let start = Instant::now();
    let out = run(Command::new(BIN).arg("fsck").arg(m.image()));
    assert!(!out.status.success(), "fsck: {}", describe(&out));
    assert!(start.elapsed() < Duration::from_secs(2), "fsck waited");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&mnt) && err.contains("mmapfs scrub"), "{err}");
    // --force: the daemon checks the live filesystem (as `mmapfs scrub`).
    let out = run(Command::new(BIN).arg("fsck").arg("--force").arg(m.image()));
    assert!(out.status.success(), "fsck --force: {}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&mnt) && text.ends_with("clean\n"), "{text}");
    let out = run(Command::new(BIN)
        .args(["fsck", "--force", "--repair"])
        .arg(m.image()));
    assert!(
        !out.status.success(),
        "fsck --force --repair: {}",
        describe(&out)
    );

    let other = tempdir();
    let start = Instant::now();
    let out = run(Command::new(BIN)
        .arg("mount")
        .arg(m.image())
        .arg(other.path()));
    assert!(!out.status.success(), "second mount: {}", describe(&out));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "second mount waited"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&mnt) && err.contains(&pid), "{err}");
    m.finish();
}

/// uid=, gid= and umask= change what every file shows (and what permissions are checked
/// against, by the kernel or, with no_default_permissions, by the daemon), not what the image
/// stores.
#[test]
fn ownership_options_show_the_whole_mount_as_asked() {
    for checks in ["default_permissions", "no_default_permissions"] {
        let m = Mount::with(
            &["--size", "16M"],
            &["uid=65534", "gid=65534", "umask=027", checks],
        );
        fs::write(m.p("f"), b"x").unwrap();
        fs::set_permissions(m.p("f"), fs::Permissions::from_mode(0o606)).unwrap();
        for p in [m.path().to_path_buf(), m.p("f")] {
            let md = fs::metadata(&p).unwrap();
            assert_eq!((md.uid(), md.gid()), (NOBODY, NOBODY), "{}", p.display());
            assert_eq!(md.mode() & 0o027, 0, "{}: {:o}", p.display(), md.mode());
        }
        assert_eq!(fs::metadata(m.p("f")).unwrap().mode() & 0o777, 0o600);
        // nobody owns the file as shown, so may write it; a third user may not even read it,
        // which the stored mode (other: rw) would allow.
        let write = |uid: &str| {
            run(Command::new("setpriv")
                .args([uid, "--regid=65534", "--clear-groups", "sh", "-c"])
                .arg(format!("echo y >> {}", m.p("f").display())))
            .status
            .success()
        };
        assert!(
            write("--reuid=65534"),
            "{checks}: the shown owner may write"
        );
        assert!(!write("--reuid=1"), "{checks}: others may not");
        m.finish();
    }
}

/// mkfs: the root directory belongs to the caller (or --owner/--mode); a size the host cannot
/// hold leaves no file behind; sizes say what is wrong with them; info prints dates.
#[test]
fn mkfs_owner_mode_sizes_and_dates() {
    let dir = tempdir();
    let image = dir.path().join("img");
    mkfs(&image, &["--owner", "1234:4321", "--mode", "1777"]);
    let info = run(Command::new(BIN).arg("info").arg(&image));
    let text = String::from_utf8_lossy(&info.stdout);
    let created = text
        .lines()
        .find(|l| l.starts_with("created:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        created.ends_with(" UTC") && created.contains("-") && created.contains(':'),
        "{text}"
    );
    let m = Mount::from_image(&image);
    let md = fs::metadata(m.path()).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (1234, 4321, 0o1777)
    );
    m.finish();

    for (size, want) in [
        ("1E", "too large"),
        ("-5M", "negative"),
        ("12Q", "malformed"),
        ("15T", "do not fit"),
    ] {
        let target = dir.path().join(format!("new-{size}"));
        let out = run(Command::new(BIN)
            .arg("mkfs")
            .arg(&target)
            .args(["--size", size]));
        assert!(!out.status.success(), "{size}: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{size}: {err}");
        assert!(err.contains(want), "{size}: {err}");
        assert!(!target.exists(), "{size}: left {}", target.display());
    }
}

/// Sets /dev/fuse's mode for the life of the guard.
struct DevFuseMode(u32);

impl DevFuseMode {
    fn set(mode: u32) -> DevFuseMode {
        let old = fs::metadata("/dev/fuse").unwrap().mode() & 0o7777;
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(mode)).unwrap();
        DevFuseMode(old)
    }
}

impl Drop for DevFuseMode {
    fn drop(&mut self) {
        let _ = fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(self.0));
    }
}

/// A normal user: mkfs gives them the root directory; without access to /dev/fuse the mount
/// goes through fusermount3 (and a refusal leaves the image as it was); with it they mount,
/// write and unmount; allow_other needs user_allow_other; a read-only image file can still be
/// inspected and mounted read-only.
#[test]
fn a_normal_user_makes_mounts_and_inspects_images() {
    let _serial = SYSTEM.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempdir();
    let home = dir.path().join("home");
    fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    let image = home.join("img");
    let mnt = home.join("mnt");
    let (img_s, mnt_s) = (image.to_str().unwrap(), mnt.to_str().unwrap());
    let out = as_nobody_run("mkdir", &[mnt_s]);
    assert!(out.status.success(), "mkdir: {}", describe(&out));
    let out = as_nobody(&["mkfs", img_s, "--size", "16M"]);
    assert!(out.status.success(), "mkfs: {}", describe(&out));
    let _guard = Unmount(mnt.clone());

    // /dev/fuse closed to the user: the setuid fusermount3 is tried, and its answer named.
    let before = fs::read(&image).unwrap();
    {
        let _mode = DevFuseMode::set(0o600);
        let out = as_nobody(&["mount", img_s, mnt_s]);
        if out.status.success() {
            // This fusermount3 opens the device as root: the mount works.
            unmount(&mnt);
            wait_released(&image);
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("fusermount3"), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(
                fs::read(&image).unwrap() == before,
                "refused mount changed the image"
            );
        }
    }

    let _mode = DevFuseMode::set(0o666);
    let out = as_nobody(&["mount", img_s, mnt_s]);
    assert!(out.status.success(), "user mount: {}", describe(&out));
    assert!(is_mountpoint(&mnt));
    // (root itself may not look into a normal user's mount without allow_root)
    let owner = |p: &Path| {
        let out = as_nobody_run("stat", &["-c", "%u:%g", p.to_str().unwrap()]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let nobody = format!("{NOBODY}:{NOBODY}");
    assert_eq!(owner(&mnt), nobody, "mkfs gave the root away");
    let out = as_nobody_run("touch", &[mnt.join("mine").to_str().unwrap()]);
    assert!(out.status.success(), "touch: {}", describe(&out));
    assert_eq!(findmnt(&mnt).0, "fuse.mmapfs");
    let out = as_nobody_run("fusermount3", &["-u", mnt_s]);
    assert!(out.status.success(), "fusermount3 -u: {}", describe(&out));
    wait_released(&image);

    let conf = fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    let allowed = conf
        .lines()
        .any(|l| l.split('#').next().unwrap_or("").trim() == "user_allow_other");
    if !allowed {
        let out = as_nobody(&["mount", img_s, mnt_s, "-o", "allow_other"]);
        assert!(!out.status.success(), "allow_other: {}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("user_allow_other"), "{err}");
        assert!(!is_mountpoint(&mnt));
    }

    // A read-only image file: info, fsck and a read-only mount work.
    fs::set_permissions(&image, fs::Permissions::from_mode(0o444)).unwrap();
    let before = fs::read(&image).unwrap();
    for args in [vec!["info", img_s], vec!["fsck", img_s]] {
        let out = as_nobody(&args);
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
    }
    let out = as_nobody(&["mount", "-o", "ro", img_s, mnt_s]);
    assert!(out.status.success(), "mount -o ro: {}", describe(&out));
    assert_eq!(owner(&mnt.join("mine")), nobody);
    let out = as_nobody_run("fusermount3", &["-u", mnt_s]);
    assert!(out.status.success(), "fusermount3 -u: {}", describe(&out));
    wait_released(&image);
    assert!(
        fs::read(&image).unwrap() == before,
        "read-only use changed the image"
    );
}

/// The pid of the daemon serving `image`: the `mmapfs mount --foreground` process that holds
/// it open (the daemon of an earlier mount may still be exiting).
fn daemon_pid(image: &Path) -> u32 {
    let canon = image.canonicalize().unwrap();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains("--foreground")
                && fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                    fds.flatten()
                        .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t == canon))
                })
        })
        .expect("daemon process")
}

/// A daemon in the background logs mounts and unmounts to syslog (or `--log-file`), keeps
/// none of its caller's descriptors, and a normal unmount logs nothing alarming.
#[test]
fn background_daemon_logs_and_descriptors() {
    let dir = tempdir();
    let image = dir.path().join("img");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    mkfs(&image, &[]);
    let sock_path = dir.path().join("syslog.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let marker = dir.path().join("inherited");
    let _g = Unmount(mnt.clone());
    // The caller leaves descriptor 7 open (not close-on-exec), as a shell redirection does.
    let script = format!(
        "exec 7>'{}'; exec '{BIN}' mount '{}' '{}'",
        marker.display(),
        image.display(),
        mnt.display()
    );
    let out = run(Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("MMAPFS_SYSLOG_SOCKET", &sock_path));
    assert!(out.status.success(), "mount: {}", describe(&out));
    let pid = daemon_pid(&image);
    let canon_marker = marker.canonicalize().unwrap();
    for fd in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let target = fs::read_link(fd.path()).unwrap_or_default();
        assert_ne!(
            target, canon_marker,
            "the daemon kept the caller's descriptor"
        );
    }
    let mut buf = [0u8; 4096];
    let recv = |buf: &mut [u8]| -> String {
        let n = sock.recv(buf).expect("a syslog line");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.contains("mounted ")) {
        lines.push(recv(&mut buf));
    }
    let line = lines.last().unwrap();
    assert!(
        line.starts_with(&format!("<30>mmapfs[{pid}]: mounted ")),
        "{line}"
    );
    unmount(&mnt);
    loop {
        let l = recv(&mut buf);
        assert!(!l.contains("Failed to umount"), "{l}");
        if l.contains("unmounted ") {
            break;
        }
    }
    wait_released(&image);

    // --log-file
    let log = dir.path().join("daemon.log");
    let out = run(Command::new(BIN)
        .arg("mount")
        .arg("--log-file")
        .arg(&log)
        .arg(&image)
        .arg(&mnt));
    assert!(out.status.success(), "mount --log-file: {}", describe(&out));
    unmount(&mnt);
    wait_released(&image);
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("mounted ") && text.contains("unmounted "),
        "{text}"
    );
    assert!(!text.contains("WARN") && !text.contains("ERROR"), "{text}");
    fsck(&image);
}

/// `mmapfs` alone lists the verbs; `mount --help` lists the options and says how to unmount;
/// `mkfs --help` explains sizes.
#[test]
fn help_lists_verbs_options_and_sizes() {
    let out = run(&mut Command::new(BIN));
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for verb in ["mkfs", "mount", "fsck", "info", "upgrade"] {
        assert!(text.contains(verb), "{verb}: {text}");
    }
    let out = run(Command::new(BIN).args(["mount", "--help"]));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in ["fusermount3 -u", "allow_other", "uid=", "nofail", "commit="] {
        assert!(text.contains(want), "{want}: {text}");
    }
    let out = run(Command::new(BIN).args(["mkfs", "--help"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("MiB") && text.contains("--owner"), "{text}");
}

/// The install step's man pages and completions come from the CLI definitions.
#[test]
fn man_pages_and_completions() {
    let dir = tempdir();
    let out = run(Command::new(BIN).arg("manpages").arg(dir.path()));
    assert!(out.status.success(), "manpages: {}", describe(&out));
    for page in [
        "mmapfs.1",
        "mmapfs-mkfs.1",
        "mmapfs-mount.1",
        "mmapfs-fsck.1",
        "mmapfs-info.1",
    ] {
        let text = fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
    let mount_page = fs::read_to_string(dir.path().join("mmapfs-mount.1")).unwrap();
    assert!(mount_page.contains("fusermount3"), "{mount_page}");
    for shell in ["bash", "zsh", "fish"] {
        let out = run(Command::new(BIN).args(["completions", shell]));
        assert!(out.status.success(), "{shell}: {}", describe(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("mkfs") && text.contains("--foreground"),
            "{shell}"
        );
    }
}

/// `mmapfs stats` reads live numbers from the daemon: the requests, bytes and fsyncs this test
/// made show up, and the image growth; the Prometheus form carries the same.
#[test]
fn stats_of_a_live_mount() {
    let m = Mount::new();
    let data = vec![7u8; 8 << 20];
    {
        let mut f = fs::File::create(m.p("big")).unwrap();
        std::io::Write::write_all(&mut f, &data).unwrap();
        f.sync_all().unwrap();
    }
    let out = run(Command::new(BIN).arg("stats").arg(m.path()));
    assert!(out.status.success(), "stats: {}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key}: {text}"))
            .to_string()
    };
    assert!(line("requests:").contains("create 1"), "{text}");
    assert!(line("written:").contains("8.0 MiB"), "{text}");
    assert!(line("fsyncs:").starts_with("fsyncs:       1,"), "{text}");
    assert!(!line("commits:").starts_with("commits:      0 "), "{text}");
    assert!(line("image:").contains("MiB since the mount"), "{text}");

    let out = run(Command::new(BIN)
        .arg("stats")
        .arg("--prometheus")
        .arg(m.path()));
    let prom = String::from_utf8_lossy(&out.stdout);
    assert!(
        prom.contains("# TYPE mmapfs_requests_total counter"),
        "{prom}"
    );
    assert!(
        prom.contains("mmapfs_requests_total{op=\"create\"} 1"),
        "{prom}"
    );
    assert!(
        prom.contains("mmapfs_written_bytes_total 8388608"),
        "{prom}"
    );
    assert!(prom.contains("mmapfs_fsync_seconds_count 1"), "{prom}");

    let elsewhere = tempdir();
    let out = run(Command::new(BIN).arg("stats").arg(elsewhere.path()));
    assert!(!out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    m.finish();
}

/// As root, `noallow_other` keeps other users out; `auto_unmount` takes the mount away when
/// the daemon dies; a normal `fusermount3 -u` logs nothing alarming.
#[test]
fn noallow_other_auto_unmount_and_quiet_unmount() {
    let dir = tempdir();
    let image = dir.path().join("img");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    mkfs(&image, &["--mode", "755"]);
    let _g = Unmount(mnt.clone());
    let mnt_s = mnt.to_str().unwrap();
    let log = dir.path().join("daemon.log");
    let mount = |opts: &str| {
        let out = run(Command::new(BIN)
            .arg("mount")
            .arg("--log-file")
            .arg(&log)
            .args(["-o", opts])
            .arg(&image)
            .arg(&mnt));
        assert!(out.status.success(), "mount -o {opts}: {}", describe(&out));
    };
    // Default as root: everyone may look; with noallow_other only root.
    mount("rw");
    let out = as_nobody_run("ls", &[mnt_s]);
    assert!(out.status.success(), "ls as nobody: {}", describe(&out));
    let out = sh("fusermount3", &["-u", mnt_s]);
    assert!(out.status.success(), "fusermount3 -u: {}", describe(&out));
    wait_released(&image);
    mount("noallow_other");
    let out = as_nobody_run("ls", &[mnt_s]);
    assert!(!out.status.success(), "ls as nobody with noallow_other");
    unmount(&mnt);
    wait_released(&image);

    // auto_unmount: kill -9 the daemon, the mount goes away by itself.
    mount("auto_unmount");
    let pid = daemon_pid(&image);
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    let start = Instant::now();
    while is_mountpoint(&mnt) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!is_mountpoint(&mnt), "auto_unmount left the mount behind");
    wait_released(&image);
    let text = fs::read_to_string(&log).unwrap();
    assert!(!text.contains("Failed to umount"), "{text}");
    assert!(!text.contains("WARN") && !text.contains("ERROR"), "{text}");
    fsck_repair(&image);
}

/// The backing device of the mount gets the daemon's settings (raised dirty limit, 4 MiB
/// readahead), and `-o` overrides them one by one.
#[test]
fn backing_device_settings_are_applied() {
    let bdi = |m: &Mount, knob: &str| {
        let dev = fs::metadata(m.path()).unwrap().dev();
        let dir = format!("/sys/class/bdi/{}:{}", libc::major(dev), libc::minor(dev));
        fs::read_to_string(format!("{dir}/{knob}"))
            .unwrap()
            .trim()
            .to_string()
    };
    let m = Mount::new();
    assert_eq!(bdi(&m, "read_ahead_kb"), "4096");
    assert_eq!(bdi(&m, "max_ratio"), "40");
    assert_eq!(bdi(&m, "strict_limit"), "0");
    m.finish();
    let m = Mount::with(&["--size", "16M"], &["read_ahead_kb=256", "max_ratio=1"]);
    assert_eq!(bdi(&m, "read_ahead_kb"), "256");
    assert_eq!(bdi(&m, "max_ratio"), "1");
    assert_eq!(bdi(&m, "strict_limit"), "0");
    m.finish();
}
