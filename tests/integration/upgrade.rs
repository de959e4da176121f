//! `mmapfs upgrade`: the version-1 fixture (`tests/fixtures/v1-sample.img.gz`, made by
//! `make_v1_fixture.sh` with the v1 binary) converted to version 2 and checked, object by
//! object, against its manifest through a real mount; refusals (already version 2, a backup in
//! the way, the image in use, two upgrades at once); damaged version-1 images (objects skipped
//! or a clean refusal, never a panic or a hang).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::posix::{getxattr, listxattr};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/v1-sample.img.gz"
);
const MANIFEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/v1-sample.manifest"
);

/// How long one `mmapfs` command may run (an upgrade of the fixture takes well under a second).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

// ----- the manifest (format: header of tests/fixtures/make_v1_fixture.sh) -------------------

/// One manifest line: its fields, and its xattrs (name -> hex value).
#[derive(Debug)]
struct Line {
    f: HashMap<String, String>,
    xattrs: BTreeMap<String, String>,
}

impl Line {
    fn get(&self, key: &str) -> &str {
        self.f
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("manifest line without {key}: {self:?}"))
    }

    fn num<T: std::str::FromStr>(&self, key: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        self.get(key).parse().unwrap()
    }
}

/// The manifest: path (relative to the root, "." for the root) -> line.
fn manifest() -> BTreeMap<String, Line> {
    let text = fs::read_to_string(MANIFEST).unwrap();
    let mut out = BTreeMap::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let mut line = Line {
            f: HashMap::new(),
            xattrs: BTreeMap::new(),
        };
        for field in l.split('\t') {
            let (k, v) = field.split_once('=').unwrap();
            match k.strip_prefix("xattr:") {
                Some(name) => line.xattrs.insert(name.to_string(), v.to_string()),
                None => line.f.insert(k.to_string(), v.to_string()),
            };
        }
        let path = line.get("path").to_string();
        assert!(out.insert(path.clone(), line).is_none(), "{path} twice");
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02x}")).collect()
}

/// The parent of a manifest path ("." for top-level names).
fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or(".", |(p, _)| p)
}

/// Whether `path` is `gone` or lies under it.
fn under(path: &str, gone: &str) -> bool {
    path == gone
        || path
            .strip_prefix(gone)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Data regions of the sparse files (byte offset, length), within their size: what the v1
/// reader's tests found in the fixture (src/v1/tests.rs), clipped to the size. Every other
/// regular file is data from 0 to its size.
fn sparse_layout(path: &str) -> Option<Vec<(u64, u64)>> {
    const MIB: u64 = 1 << 20;
    Some(match path {
        "files/holes.bin" => vec![
            (0, 4096),
            (24 * 4096, 4096),
            (3 * MIB, 3 * 4096),
            (9 * MIB, 4096),
        ],
        "files/tail-only.bin" => vec![(5 * MIB, 4096)],
        // 16 blocks allocated, only 5000 bytes inside the size (KEEP_SIZE).
        "files/prealloc.bin" => vec![(0, 5000)],
        _ => return None,
    })
}

// ----- running the command ----------------------------------------------------------------

fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("mmapfs-upgrade-")
        .tempdir()
        .unwrap();
    fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir
}

/// The fixture, gunzipped to `dir/image`.
fn fixture(dir: &Path) -> PathBuf {
    let img = dir.join("image");
    let status = Command::new("gzip")
        .arg("-dc")
        .arg(FIXTURE)
        .stdout(File::create(&img).unwrap())
        .status()
        .expect("run gzip");
    assert!(status.success(), "gzip -dc {FIXTURE}");
    img
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Runs `mmapfs ARGS` with output to files (no pipe to fill), killing it after
/// [`COMMAND_TIMEOUT`]: a hang fails the test instead of stalling the suite.
fn mmapfs(args: &[&std::ffi::OsStr]) -> Output {
    let out_dir = tempfile::tempdir().unwrap();
    let (o, e) = (out_dir.path().join("out"), out_dir.path().join("err"));
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&o).unwrap())
        .stderr(File::create(&e).unwrap())
        .spawn()
        .expect("spawn mmapfs");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mmapfs {args:?} still running after {COMMAND_TIMEOUT:?}; stderr:\n{}",
                fs::read_to_string(&e).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: fs::read(&o).unwrap(),
        stderr: fs::read(&e).unwrap(),
    }
}

fn upgrade(image: &Path, no_backup: bool) -> Output {
    let mut args = vec![std::ffi::OsStr::new("upgrade"), image.as_os_str()];
    if no_backup {
        args.push("--no-backup".as_ref());
    }
    mmapfs(&args)
}

fn assert_no_panic(out: &Output, what: &str) {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
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
}

/// Asserts a failed run: non-zero exit, exactly one `mmapfs: ` line on stderr, nothing on
/// stdout, no panic. Returns the line.
fn assert_clean_failure(out: &Output, what: &str) -> String {
    assert_no_panic(out, what);
    assert!(
        !out.status.success(),
        "{what}: succeeded: {}",
        describe(out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("mmapfs: "),
        "{what}: expected one `mmapfs: ` line on stderr: {}",
        describe(out)
    );
    assert!(out.stdout.is_empty(), "{what}: {}", describe(out));
    lines[0].to_string()
}

/// Asserts a successful upgrade: exit 0, nothing on stderr, stdout is `skipped: ` lines then
/// one `upgraded ` line (naming version 2). Returns the skipped lines (without the prefix).
fn assert_upgraded(out: &Output, what: &str) -> Vec<String> {
    assert_no_panic(out, what);
    assert!(
        out.status.success(),
        "{what}: upgrade failed: {}",
        describe(out)
    );
    assert!(out.stderr.is_empty(), "{what}: {}", describe(out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let (last, skipped) = lines.split_last().expect("no output");
    assert!(
        last.starts_with("upgraded ") && last.contains("to format version 2"),
        "{what}: last line {last:?}"
    );
    skipped
        .iter()
        .map(|l| {
            l.strip_prefix("skipped: ")
                .unwrap_or_else(|| panic!("{what}: unexpected line {l:?}"))
                .to_string()
        })
        .collect()
}

/// Everything in `dir` and beside it, with contents: what a refused upgrade must not change.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let data = fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

/// Gunzips the fixture into `dir`, upgrades it (keeping the backup) and checks the result as a
/// file: the backup is the original byte for byte, nothing is left over, fsck is clean, `info`
/// says format version 2 and counts exactly the manifest's inodes.
fn upgraded_fixture(dir: &Path) -> PathBuf {
    let img = fixture(dir);
    let original = fs::read(&img).unwrap();
    let out = upgrade(&img, false);
    let skipped = assert_upgraded(&out, "upgrade of the fixture");
    assert!(skipped.is_empty(), "skipped: {skipped:?}");
    // The summary counts the manifest's regular files (inodes) and directories.
    let man = manifest();
    let count = |kind: &str| {
        let inos: BTreeSet<u64> = man
            .values()
            .filter(|l| l.get("type") == kind)
            .map(|l| l.num("ino"))
            .collect();
        inos.len()
    };
    let summary = format!("{} files, {} directories,", count("reg"), count("dir"));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&summary),
        "{summary:?} not in {}",
        describe(&out)
    );
    assert!(
        fs::read(with_suffix(&img, ".v1")).unwrap() == original,
        "IMAGE.v1 differs from the version-1 image"
    );
    assert!(!with_suffix(&img, ".upgrading").exists());
    check_v2(&img, &man, &[]);
    img
}

/// `fsck` clean, `info` says version 2, no orphans, and as many inodes as the manifest lists
/// (less those under `gone`).
fn check_v2(img: &Path, man: &BTreeMap<String, Line>, gone: &[&str]) {
    fsck(img);
    let info = info(img);
    let format = info
        .lines()
        .find(|l| l.starts_with("format:"))
        .unwrap_or_else(|| panic!("no format line in info:\n{info}"));
    assert!(format.ends_with("version 2"), "{format}");
    assert!(!info.contains("orphans:"), "{info}");
    let inodes: BTreeSet<u64> = man
        .iter()
        .filter(|(p, _)| !gone.iter().any(|g| under(p, g)))
        .map(|(_, l)| l.num("ino"))
        .collect();
    assert_eq!(info_field(&info, "inodes"), inodes.len() as u64, "{info}");
}

/// Mounts a copy of `img` with noatime (reads change nothing the checks look at).
fn mount_copy(img: &Path) -> Mount {
    let mut m = Mount::with(&["--size", "1M"], &["noatime"]);
    m.unmount();
    fs::copy(img, m.image()).unwrap();
    m.mount();
    m
}

// ----- checking a mount against the manifest -----------------------------------------------

/// Every path under `root` (relative, "." for the root) -> its entry count if a directory.
fn walk(root: &Path) -> BTreeMap<String, Option<usize>> {
    fn visit(root: &Path, rel: &str, out: &mut BTreeMap<String, Option<usize>>) {
        let dir = if rel == "." {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let mut n = 0;
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            n += 1;
            let name = e.file_name().into_string().expect("UTF-8 name");
            let p = if rel == "." {
                name
            } else {
                format!("{rel}/{name}")
            };
            if e.file_type().unwrap().is_dir() {
                visit(root, &p, out);
            } else {
                out.insert(p, None);
            }
        }
        out.insert(rel.to_string(), Some(n));
    }
    let mut out = BTreeMap::new();
    visit(root, ".", &mut out);
    out
}

fn ts(sec: i64, nsec: i64) -> String {
    format!("{sec}.{nsec:09}")
}

/// The data regions of an open file, by SEEK_DATA / SEEK_HOLE.
fn data_regions(f: &File) -> Vec<(u64, u64)> {
    let seek = |off: u64, whence| {
        // SAFETY: valid descriptor.
        check(unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) }).map(|o| o as u64)
    };
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let data = match seek(pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(libc::ENXIO) => return out,
            Err(e) => panic!("SEEK_DATA at {pos}: errno {e}"),
        };
        let hole = seek(data, libc::SEEK_HOLE).unwrap();
        assert!(hole > data, "SEEK_HOLE {hole} after SEEK_DATA {data}");
        out.push((data, hole - data));
        pos = hole;
    }
}

/// sha256 of each regular file of `paths` (relative to `root`), one `sha256sum` run for all.
fn sha256_all(root: &Path, paths: &[&str]) -> BTreeMap<String, String> {
    let out = Command::new("sha256sum")
        .arg("-z")
        .arg("--")
        .args(paths)
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum: {}", describe(&out));
    out.stdout
        .split(|&b| b == 0)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let l = String::from_utf8(l.to_vec()).unwrap();
            let (hash, path) = l.split_once("  ").unwrap();
            (path.to_string(), hash.to_string())
        })
        .collect()
}

/// Checks the mounted filesystem at `mnt` against every manifest line, less the objects under
/// the paths in `gone` (skipped by a damaged upgrade): the names are exactly the manifest's,
/// and each object has its type, mode (set-ID bits included), owner, size, times to the
/// nanosecond (ctime too), link count (hard links share an inode), entry count, content,
/// data layout (holes, blocks kept past the end), symlink target, device number and extended
/// attributes (none for the paths in `no_xattrs`, whose attributes were unreadable).
fn verify(mnt: &Path, man: &BTreeMap<String, Line>, gone: &[&str], no_xattrs: &[&str]) {
    let kept: BTreeMap<&str, &Line> = man
        .iter()
        .filter(|(p, _)| !gone.iter().any(|g| under(p, g)))
        .map(|(p, l)| (p.as_str(), l))
        .collect();
    // Names: nothing missing, nothing extra (the unlinked files of the fixture among them).
    let found = walk(mnt);
    assert_eq!(
        found.keys().map(String::as_str).collect::<Vec<_>>(),
        kept.keys().copied().collect::<Vec<_>>(),
        "the names differ from the manifest's"
    );
    for doomed in ["doomed", "gone-too"] {
        assert!(fs::symlink_metadata(mnt.join(doomed)).is_err(), "{doomed}");
    }
    // Expected link counts from the names kept: a directory has 2 plus its subdirectories,
    // anything else one per name.
    let mut names_of: HashMap<u64, usize> = HashMap::new();
    let mut subdirs: HashMap<&str, u32> = HashMap::new();
    for (path, l) in &kept {
        *names_of.entry(l.num("ino")).or_default() += 1;
        if l.get("type") == "dir" && *path != "." {
            *subdirs.entry(parent(path)).or_default() += 1;
        }
    }
    let mut ino_map: HashMap<u64, u64> = HashMap::new();
    let mut regular = Vec::new();
    for (&path, l) in &kept {
        let p = if path == "." {
            mnt.to_path_buf()
        } else {
            mnt.join(path)
        };
        let st = lstat(&p);
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => "dir",
            libc::S_IFREG => "reg",
            libc::S_IFLNK => "lnk",
            libc::S_IFIFO => "fifo",
            libc::S_IFCHR => "chr",
            libc::S_IFBLK => "blk",
            libc::S_IFSOCK => "sock",
            _ => "?",
        };
        assert_eq!(kind, l.get("type"), "{path}: type");
        let mode = u32::from_str_radix(l.get("mode"), 8).unwrap();
        assert_eq!(
            format!("{:o}", st.st_mode & 0o7777),
            format!("{mode:o}"),
            "{path}: mode"
        );
        assert_eq!(st.st_uid, l.num::<u32>("uid"), "{path}: uid");
        assert_eq!(st.st_gid, l.num::<u32>("gid"), "{path}: gid");
        if kind != "dir" {
            // Directory sizes are the format's business (version 1 kept 0).
            assert_eq!(st.st_size as u64, l.num::<u64>("size"), "{path}: size");
        }
        assert_eq!(
            ts(st.st_atime, st.st_atime_nsec),
            l.get("atime"),
            "{path}: atime"
        );
        assert_eq!(
            ts(st.st_mtime, st.st_mtime_nsec),
            l.get("mtime"),
            "{path}: mtime"
        );
        assert_eq!(
            ts(st.st_ctime, st.st_ctime_nsec),
            l.get("ctime"),
            "{path}: ctime"
        );
        let want_links = if kind == "dir" {
            2 + subdirs.get(path).copied().unwrap_or(0)
        } else {
            names_of[&l.num("ino")] as u32
        };
        if gone.is_empty() {
            assert_eq!(want_links, l.num::<u32>("nlink"), "{path}: manifest nlink");
        }
        assert_eq!(st.st_nlink as u32, want_links, "{path}: nlink");
        // Hard links: the same manifest inode is the same mounted inode, and only then.
        let old = l.num::<u64>("ino");
        match ino_map.get(&old) {
            Some(&new) => assert_eq!(st.st_ino, new, "{path}: not linked to its other names"),
            None => {
                assert!(
                    !ino_map.values().any(|&n| n == st.st_ino),
                    "{path}: shares inode {} with another object",
                    st.st_ino
                );
                ino_map.insert(old, st.st_ino);
            }
        }
        match kind {
            "dir" => {
                let want = l.num::<usize>("entries")
                    - man
                        .keys()
                        .filter(|c| c.as_str() != "." && parent(c) == path)
                        .filter(|c| !kept.contains_key(c.as_str()))
                        .count();
                assert_eq!(found[path], Some(want), "{path}: entries");
            }
            "reg" => {
                regular.push(path);
                let f = File::open(&p).unwrap();
                let size = l.num::<u64>("size");
                let want = sparse_layout(path)
                    .unwrap_or_else(|| if size > 0 { vec![(0, size)] } else { vec![] });
                assert_eq!(data_regions(&f), want, "{path}: data regions");
                let allocated = st.st_blocks as u64 * 512;
                match path {
                    // 64 KiB preallocated past the end (fallocate KEEP_SIZE) stay allocated.
                    "files/prealloc.bin" => {
                        assert!(allocated >= 65536, "{path}: {allocated} bytes allocated")
                    }
                    "files/holes.bin" | "files/tail-only.bin" => {
                        let data: u64 = want.iter().map(|r| r.1).sum();
                        assert!(
                            allocated < data + (64 << 10),
                            "{path}: {allocated} bytes allocated for {data} of data"
                        )
                    }
                    _ => assert!(allocated >= size, "{path}: {allocated} bytes allocated"),
                }
            }
            "lnk" => {
                let target = fs::read_link(&p).unwrap();
                assert_eq!(
                    hex(target.as_os_str().as_bytes()),
                    l.get("target"),
                    "{path}: target"
                );
            }
            "chr" | "blk" => {
                let rdev = format!("{}:{}", libc::major(st.st_rdev), libc::minor(st.st_rdev));
                assert_eq!(rdev, l.get("rdev"), "{path}: rdev");
            }
            _ => assert_eq!(st.st_rdev, 0, "{path}: rdev"),
        }
        let xattrs: BTreeMap<String, String> = listxattr(&p)
            .into_iter()
            .map(|n| {
                let v = getxattr(&p, &n).unwrap_or_else(|e| panic!("{path}: {n}: errno {e}"));
                (n, hex(&v))
            })
            .collect();
        if no_xattrs.contains(&path) {
            assert!(xattrs.is_empty(), "{path}: xattrs {xattrs:?}");
        } else {
            assert_eq!(xattrs, l.xattrs, "{path}: xattrs");
        }
    }
    let hashes = sha256_all(mnt, &regular);
    for path in &regular {
        assert_eq!(
            hashes.get(*path).map(String::as_str),
            Some(kept[path].get("sha256")),
            "{path}: content"
        );
    }
    // Reading changed no access time.
    for path in regular {
        let st = lstat(&mnt.join(path));
        assert_eq!(
            ts(st.st_atime, st.st_atime_nsec),
            kept[path].get("atime"),
            "{path}: atime after reading"
        );
    }
}

// ----- the tests ----------------------------------------------------------------------------

/// Mounting a version-1 image is refused with the command that converts it.
#[test]
fn mount_of_v1_image_names_upgrade() {
    let dir = tempdir();
    let img = fixture(dir.path());
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let before = fs::read(&img).unwrap();
    let out = mmapfs(&[
        "mount".as_ref(),
        "--foreground".as_ref(),
        img.as_os_str(),
        mnt.as_os_str(),
    ]);
    if is_mountpoint(&mnt) {
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
        panic!("a version-1 image was mounted: {}", describe(&out));
    }
    let line = assert_clean_failure(&out, "mount of a version-1 image");
    assert!(
        line.contains(&format!("mmapfs upgrade {}", img.display())),
        "{line}"
    );
    assert!(fs::read(&img).unwrap() == before, "the image changed");
}

/// The fixture upgraded: every manifest object as it was, through a mount.
#[test]
fn upgrade_carries_every_object_of_the_manifest() {
    let dir = tempdir();
    let img = upgraded_fixture(dir.path());
    let m = mount_copy(&img);
    verify(m.path(), &manifest(), &[], &[]);
    m.finish();
}

/// A second upgrade of the now version-2 image is refused; nothing changes.
#[test]
fn upgrade_of_a_v2_image_is_refused() {
    let dir = tempdir();
    let img = upgraded_fixture(dir.path());
    // Without the backup in the way too: the version is what refuses it.
    fs::remove_file(with_suffix(&img, ".v1")).unwrap();
    for no_backup in [false, true] {
        let before = snapshot(dir.path());
        let line = assert_clean_failure(&upgrade(&img, no_backup), "upgrade of a v2 image");
        assert!(line.contains("already format version 2"), "{line}");
        assert!(snapshot(dir.path()) == before, "files changed");
    }
    // A freshly made version-2 image as well.
    let fresh = dir.path().join("fresh");
    let out = mmapfs(&[
        "mkfs".as_ref(),
        fresh.as_os_str(),
        "--size".as_ref(),
        "1M".as_ref(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let before = snapshot(dir.path());
    let line = assert_clean_failure(&upgrade(&fresh, false), "upgrade of a fresh v2 image");
    assert!(line.contains("already format version 2"), "{line}");
    assert!(snapshot(dir.path()) == before, "files changed");
}

/// `--no-backup`: no IMAGE.v1, the same result.
#[test]
fn upgrade_without_backup() {
    let dir = tempdir();
    let img = fixture(dir.path());
    let skipped = assert_upgraded(&upgrade(&img, true), "upgrade --no-backup");
    assert!(skipped.is_empty(), "{skipped:?}");
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["image"], "files beside the image");
    check_v2(&img, &manifest(), &[]);
    let m = mount_copy(&img);
    verify(m.path(), &manifest(), &[], &[]);
    m.finish();
}

/// An IMAGE.v1 already there blocks an upgrade that keeps a backup; `--no-backup` ignores it.
#[test]
fn existing_backup_blocks_upgrade() {
    let dir = tempdir();
    let img = fixture(dir.path());
    let backup = with_suffix(&img, ".v1");
    fs::write(&backup, b"an older backup").unwrap();
    let before = snapshot(dir.path());
    let line = assert_clean_failure(&upgrade(&img, false), "upgrade with IMAGE.v1 present");
    assert!(
        line.contains(&backup.display().to_string()) && line.contains("exists"),
        "{line}"
    );
    assert!(snapshot(dir.path()) == before, "files changed");
    assert_upgraded(
        &upgrade(&img, true),
        "upgrade --no-backup with IMAGE.v1 present",
    );
    assert_eq!(fs::read(&backup).unwrap(), b"an older backup");
    check_v2(&img, &manifest(), &[]);
}

/// A version-1 image held by another process (a mounted v1 daemon holds an exclusive flock;
/// a shared one is another reader, e.g. an upgrade in progress) is refused, unchanged.
#[test]
fn upgrade_refuses_an_image_in_use() {
    let dir = tempdir();
    let img = fixture(dir.path());
    for (lock, what) in [(libc::LOCK_EX, "exclusive"), (libc::LOCK_SH, "shared")] {
        let holder = File::open(&img).unwrap();
        // SAFETY: plain flock on a valid descriptor.
        assert_eq!(
            unsafe { libc::flock(holder.as_raw_fd(), lock | libc::LOCK_NB) },
            0
        );
        let before = snapshot(dir.path());
        let line = assert_clean_failure(&upgrade(&img, false), &format!("{what} lock held"));
        assert!(line.contains("in use"), "{what}: {line}");
        assert!(snapshot(dir.path()) == before, "{what}: files changed");
        drop(holder);
    }
    assert_upgraded(&upgrade(&img, false), "upgrade once the locks are gone");
    check_v2(&img, &manifest(), &[]);
}

/// Two upgrades of one image at once: exactly one converts it, the other is refused cleanly,
/// and the result is whole (the image version 2, the backup the original version-1 image).
#[test]
fn concurrent_upgrades_of_one_image() {
    let dir = tempdir();
    for round in 0..6 {
        let img = fixture(dir.path());
        let original = fs::read(&img).unwrap();
        let outs: Vec<Output> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..2).map(|_| s.spawn(|| upgrade(&img, false))).collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let ok = outs.iter().filter(|o| o.status.success()).count();
        assert_eq!(
            ok,
            1,
            "round {round}: {} and {}",
            describe(&outs[0]),
            describe(&outs[1])
        );
        for o in &outs {
            if o.status.success() {
                assert_upgraded(o, "the upgrade that ran");
            } else {
                assert_clean_failure(o, "the upgrade refused");
            }
        }
        assert!(
            fs::read(with_suffix(&img, ".v1")).unwrap() == original,
            "round {round}: IMAGE.v1 is not the version-1 image"
        );
        assert!(!with_suffix(&img, ".upgrading").exists(), "round {round}");
        check_v2(&img, &manifest(), &[]);
        fs::remove_file(with_suffix(&img, ".v1")).unwrap();
    }
}

// ----- damaged version-1 images -----------------------------------------------------------

/// Byte offset of version-1 inode `ino`'s record: the superblock's inode-table tree
/// (`itab_tree` at byte 40: root block in bits 0..56, height above; 512 pointers per node),
/// 16 records of 256 bytes per block.
fn v1_inode_offset(image: &[u8], ino: u64) -> usize {
    let packed = u64::from_le_bytes(image[40..48].try_into().unwrap());
    let (mut node, height) = (packed & ((1 << 56) - 1), (packed >> 56) as u32);
    let fblock = ino / 16;
    for level in (0..height).rev() {
        let idx = (fblock / 512u64.pow(level)) % 512;
        let at = node as usize * 4096 + idx as usize * 8;
        node = u64::from_le_bytes(image[at..at + 8].try_into().unwrap());
    }
    node as usize * 4096 + (ino % 16) as usize * 256
}

/// The only offset of `needle` in `image`.
fn unique_offset(image: &[u8], needle: &[u8]) -> usize {
    let hits: Vec<usize> = image
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "{:?} at {hits:?}",
        String::from_utf8_lossy(needle)
    );
    hits[0]
}

fn ino_of(man: &BTreeMap<String, Line>, path: &str) -> u64 {
    man[path].num("ino")
}

/// What a damaged upgrade must report and leave out.
struct Skips<'a> {
    /// Objects not carried over (with everything under them).
    gone: &'a [&'a str],
    /// Objects carried over without their extended attributes.
    no_xattrs: &'a [&'a str],
    /// The `skipped:` lines, in any order: each matches one entry (contains all its strings).
    lines: &'a [&'a [&'a str]],
}

/// Upgrades a damaged copy of the fixture that must succeed with exactly the `skipped:` lines
/// and losses of `want`; checks the result (fsck, info, and through a mount).
fn damaged_upgrade_skips(what: &str, damage: impl FnOnce(&mut Vec<u8>), want: Skips) {
    let dir = tempdir();
    let img = fixture(dir.path());
    let mut bytes = fs::read(&img).unwrap();
    damage(&mut bytes);
    fs::write(&img, &bytes).unwrap();
    let skipped = assert_upgraded(&upgrade(&img, false), what);
    let matches = |line: &str, w: &[&str]| w.iter().all(|s| line.contains(s));
    assert_eq!(
        skipped.len(),
        want.lines.len(),
        "{what}: skipped {skipped:#?}"
    );
    for w in want.lines {
        assert_eq!(
            skipped.iter().filter(|l| matches(l, w)).count(),
            1,
            "{what}: no single skipped line with {w:?}: {skipped:#?}"
        );
    }
    assert!(
        fs::read(with_suffix(&img, ".v1")).unwrap() == bytes,
        "{what}: IMAGE.v1 differs from the damaged original"
    );
    assert!(!with_suffix(&img, ".upgrading").exists(), "{what}");
    let man = manifest();
    check_v2(&img, &man, want.gone);
    let m = mount_copy(&img);
    verify(m.path(), &man, want.gone, want.no_xattrs);
    m.finish();
}

/// Upgrades a damaged copy of the fixture that must be refused: one clean line containing
/// `expect`, every file beside it unchanged, no IMAGE.upgrading or IMAGE.v1.
fn damaged_upgrade_refused(what: &str, damage: impl FnOnce(&Path), expect: &str) {
    let dir = tempdir();
    let img = fixture(dir.path());
    damage(&img);
    let before = snapshot(dir.path());
    for no_backup in [false, true] {
        let line = assert_clean_failure(&upgrade(&img, no_backup), what);
        assert!(line.contains(expect), "{what}: {expect:?} not in {line:?}");
        assert!(snapshot(dir.path()) == before, "{what}: files changed");
    }
}

/// A directory entry record damaged (a name byte: its checksum fails): that entry is skipped,
/// its neighbours survive. The entry is one of three names of a file, whose link count drops.
#[test]
fn damaged_directory_entry_is_skipped() {
    let man = manifest();
    let big = ino_of(&man, "big");
    damaged_upgrade_skips(
        "damaged directory entry",
        |b| {
            let at = unique_offset(b, b"shared-too");
            b[at + 3] ^= 0x20;
        },
        Skips {
            gone: &["big/shared-too"],
            no_xattrs: &[],
            lines: &[&[
                "/big: an entry",
                &format!("inode {big}: directory entry at"),
                "checksum mismatch",
            ]],
        },
    );
}

/// An inode record damaged: a file (with xattrs) and a directory (its whole subtree) are
/// skipped, one line each; everything else is carried over.
#[test]
fn damaged_inode_records_are_skipped() {
    let man = manifest();
    let (small, c) = (ino_of(&man, "files/small.txt"), ino_of(&man, "a/b/c"));
    damaged_upgrade_skips(
        "damaged inode records",
        |b| {
            // The size field of one, a time of the other: both fail their checksum.
            let at = v1_inode_offset(b, small);
            b[at + 20] ^= 1;
            let at = v1_inode_offset(b, c);
            b[at + 40] ^= 0x10;
        },
        Skips {
            gone: &["files/small.txt", "a/b/c"],
            no_xattrs: &[],
            lines: &[
                &["/a/b/c: ", &format!("inode {c}: checksum mismatch")],
                &[
                    "/files/small.txt: ",
                    &format!("inode {small}: checksum mismatch"),
                ],
            ],
        },
    );
}

/// Field of a version-1 inode record: 8 little-endian bytes at `field` (tree at 88, xattr block
/// at 96).
fn v1_inode_u64(image: &[u8], ino: u64, field: usize) -> u64 {
    let at = v1_inode_offset(image, ino) + field;
    u64::from_le_bytes(image[at..at + 8].try_into().unwrap())
}

/// Unreadable extended attributes (a byte of an xattr block changed, its checksum fails) of a
/// file and of a directory: the objects are carried over without them, one line each.
#[test]
fn damaged_xattr_blocks_lose_only_the_attributes() {
    let man = manifest();
    let (small, a) = (ino_of(&man, "files/small.txt"), ino_of(&man, "a"));
    damaged_upgrade_skips(
        "damaged xattr blocks",
        |b| {
            for ino in [small, a] {
                let xb = v1_inode_u64(b, ino, 96) as usize;
                assert_ne!(xb, 0);
                b[xb * 4096 + 30] ^= 8;
            }
        },
        Skips {
            gone: &[],
            no_xattrs: &["files/small.txt", "a"],
            lines: &[
                &[
                    "/a",
                    &format!("inode {a}: xattr block"),
                    "checksum mismatch",
                ],
                &[
                    "/files/small.txt",
                    &format!("inode {small}: xattr block"),
                    "checksum mismatch",
                ],
            ],
        },
    );
}

/// A file whose block tree is damaged (a pointer out of range): the file is skipped, not left
/// half copied.
#[test]
fn damaged_file_tree_skips_the_file() {
    let man = manifest();
    let big = ino_of(&man, "files/big.bin");
    damaged_upgrade_skips(
        "damaged file tree",
        |b| {
            let root = (v1_inode_u64(b, big, 88) & ((1 << 56) - 1)) as usize;
            b[root * 4096 + 7] ^= 0x80;
        },
        Skips {
            gone: &["files/big.bin"],
            no_xattrs: &[],
            lines: &[&[
                "/files/big.bin: ",
                &format!("inode {big}: "),
                "out of range",
            ]],
        },
    );
}

/// Extended attributes of the root directory are carried over too (the fixture's root has none:
/// its inode is pointed at the xattr block of files/small.txt and resealed).
#[test]
fn root_xattrs_are_carried_over() {
    let man = manifest();
    let dir = tempdir();
    let img = fixture(dir.path());
    let mut b = fs::read(&img).unwrap();
    let xb = v1_inode_u64(&b, ino_of(&man, "files/small.txt"), 96);
    let at = v1_inode_offset(&b, 1);
    b[at + 96..at + 104].copy_from_slice(&xb.to_le_bytes());
    // The record's checksum (at 252) covers all but kernel_refs (168..176) and itself.
    let r = &b[at..at + 256];
    let sum = crc32c::crc32c_append(crc32c::crc32c(&r[..168]), &r[176..252]);
    b[at + 252..at + 256].copy_from_slice(&sum.to_le_bytes());
    fs::write(&img, &b).unwrap();
    let skipped = assert_upgraded(&upgrade(&img, false), "root with xattrs");
    assert!(skipped.is_empty(), "{skipped:?}");
    check_v2(&img, &man, &[]);
    let m = mount_copy(&img);
    for p in [".", "files/small.txt"] {
        let xattrs: BTreeMap<String, String> = listxattr(&m.p(p))
            .into_iter()
            .map(|n| {
                let v = getxattr(&m.p(p), &n).unwrap();
                (n, hex(&v))
            })
            .collect();
        assert_eq!(xattrs, man["files/small.txt"].xattrs, "{p}");
    }
    m.finish();
}

/// Damage the upgrade cannot get past is refused cleanly and changes nothing: the root
/// directory's inode, a truncated file, garbage in the superblock.
#[test]
fn damaged_images_are_refused_cleanly() {
    damaged_upgrade_refused(
        "damaged root inode",
        |p| {
            let mut b = fs::read(p).unwrap();
            let at = v1_inode_offset(&b, 1);
            b[at + 8] ^= 4;
            fs::write(p, &b).unwrap();
        },
        "root directory",
    );
    for (len, expect) in [
        (4 << 20, "truncated?"),
        (5000, "truncated?"),
        (100, "bad magic"),
    ] {
        damaged_upgrade_refused(
            &format!("truncated to {len} bytes"),
            |p| {
                File::options()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(len)
                    .unwrap()
            },
            expect,
        );
    }
    let mut rng = Rng::new(seed("damaged_images_are_refused_cleanly"));
    let garbage = rng.bytes(4096);
    damaged_upgrade_refused(
        "garbage superblock",
        |p| {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .write_all_at(&garbage, 0)
                .unwrap()
        },
        "not an mmapfs image",
    );
    damaged_upgrade_refused(
        "garbage superblock after the magic and version",
        |p| {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .write_all_at(&garbage[..240], 12)
                .unwrap()
        },
        "superblock: checksum mismatch",
    );
    damaged_upgrade_refused(
        "an empty file",
        |p| {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(0)
                .unwrap()
        },
        "not an mmapfs image",
    );
}
