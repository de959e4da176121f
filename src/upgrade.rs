//! `mmapfs upgrade IMAGE`: converts a format-version-1 image to version 2.
//!
//! The version-1 image is only read ([`crate::v1`], plain reads under an exclusive lock). Its
//! contents are rebuilt in a fresh version-2 image beside it (`IMAGE.upgrading`) through the
//! filesystem core: every name, type, hard link, mode, owner, time, size, hole, extended
//! attribute and device number. The new image is checked, then takes the old one's name; the
//! old one is kept as `IMAGE.v1` unless told otherwise. Any failure before that leaves the
//! original untouched.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use crate::engine::{Engine, OpenMode, check};
use crate::format::{BLOCK_SIZE, MIN_IMAGE_SIZE, ROOT_INO};
use crate::fs::{Changer, Ctx, FALLOC_KEEP_SIZE, Fs, SetAttr, SetTime, Time};
use crate::v1::{V1Error, V1Image, V1Inode, V1Kind, V1State, V1Time};

/// What an upgrade did.
#[derive(Debug, Default)]
pub struct Summary {
    pub files: u64,
    pub directories: u64,
    pub bytes: u64,
    /// Objects that could not be carried over (damaged in the version-1 image), one line each.
    pub skipped: Vec<String>,
    /// Where the version-1 image was kept, if it was.
    pub backup: Option<PathBuf>,
}

/// Reads of file data go in chunks of this size.
const CHUNK: usize = 1 << 20;

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn time(t: V1Time) -> Time {
    Time {
        sec: t.sec,
        nsec: t.nsec,
    }
}

/// Converts `path` in place. Errors are one line naming the cause.
pub fn upgrade(path: &Path, keep_backup: bool) -> Result<Summary, String> {
    let p = path.display();
    let old = V1Image::open(path).map_err(|e| match e {
        V1Error::BadVersion(2) => format!("{p}: already format version 2"),
        e => format!("{p}: {e}"),
    })?;
    let info = old.info();
    if info.state == V1State::Dirty {
        log::warn!(
            "{p}: was not cleanly unmounted; what a version-1 recovery would repair is \
             skipped instead"
        );
    }
    let tmp = with_suffix(path, ".upgrading");
    let backup = with_suffix(path, ".v1");
    if keep_backup && backup.exists() {
        return Err(format!(
            "{}: exists; move it away (or use --no-backup)",
            backup.display()
        ));
    }
    let _ = std::fs::remove_file(&tmp);
    let size = (info.total_blocks * BLOCK_SIZE).max(MIN_IMAGE_SIZE);
    let result = (|| {
        Engine::mkfs(&tmp, size, true).map_err(|e| e.to_string())?;
        let engine = Engine::open(&tmp, OpenMode::Mount).map_err(|e| e.to_string())?;
        let fs = Fs::new(engine);
        let summary = copy_all(&old, &fs).map_err(|e| format!("{}: {e}", tmp.display()))?;
        fs.shutdown()
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        drop(fs);
        let engine = Engine::open(&tmp, OpenMode::Inspect).map_err(|e| e.to_string())?;
        let report = check::run(&engine, check::Mode::Report).map_err(|e| e.to_string())?;
        if !report.problems.is_empty() {
            return Err(format!(
                "{}: the converted image fails its check: {}",
                tmp.display(),
                report.problems.join("; ")
            ));
        }
        Ok(summary)
    })();
    let mut summary = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    // The version-1 image stays locked until it has been replaced: released before the renames,
    // a concurrent upgrade could take it and rename the new image to IMAGE.v1 over the backup.
    // The backup is a second name of the original (a link fails if the name is taken); the
    // new image then replaces the original's name in one rename: IMAGE always exists.
    if keep_backup {
        if let Err(e) = std::fs::hard_link(path, &backup) {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("{}: {e}", backup.display()));
        }
        summary.backup = Some(backup);
    }
    std::fs::rename(&tmp, path).map_err(|e| format!("{p}: {e}"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    drop(old);
    Ok(summary)
}

/// Rebuilds the whole namespace of `old` in `fs`.
fn copy_all(old: &V1Image, fs: &Fs) -> Result<Summary, String> {
    let mut s = Summary::default();
    // Version-1 inode -> version-2 inode, for hard links and the attribute pass.
    let mut made: HashMap<u64, u64> = HashMap::new();
    let mut attrs: Vec<(V1Inode, u64)> = Vec::new();
    let root = old
        .inode(ROOT_INO)
        .map_err(|e| format!("the root directory: {e}"))?
        .ok_or("the root directory is missing")?;
    copy_xattrs(old, fs, &root, ROOT_INO, "/", &mut s);
    attrs.push((root, ROOT_INO));
    made.insert(ROOT_INO, ROOT_INO);
    let mut queue = VecDeque::from([(ROOT_INO, ROOT_INO, String::from("/"))]);
    while let Some((old_dir, new_dir, path)) = queue.pop_front() {
        s.directories += 1;
        let (entries, damaged) = match old.dir_entries_salvage(old_dir) {
            Ok(x) => x,
            Err(e) => {
                s.skipped.push(format!("{path}: contents unreadable: {e}"));
                continue;
            }
        };
        for e in damaged {
            s.skipped.push(format!("{path}: an entry: {e}"));
        }
        for e in entries {
            let name = String::from_utf8_lossy(&e.name).into_owned();
            let child_path = if path == "/" {
                format!("/{name}")
            } else {
                format!("{path}/{name}")
            };
            let rec = match old.inode(e.ino) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    s.skipped
                        .push(format!("{child_path}: names free inode {}", e.ino));
                    continue;
                }
                Err(err) => {
                    s.skipped.push(format!("{child_path}: {err}"));
                    continue;
                }
            };
            if let Some(&new) = made.get(&e.ino) {
                if rec.kind == V1Kind::Dir {
                    s.skipped.push(format!(
                        "{child_path}: a second name of directory {}",
                        e.ino
                    ));
                    continue;
                }
                let a = fs
                    .link(new, new_dir, &e.name)
                    .map_err(|err| format!("{child_path}: link: {err}"))?;
                fs.forget(a.ino, 1).map_err(|err| err.to_string())?;
                continue;
            }
            match create(old, fs, new_dir, &e.name, &rec, &mut s) {
                Ok(new) => {
                    copy_xattrs(old, fs, &rec, new, &child_path, &mut s);
                    made.insert(e.ino, new);
                    if rec.kind == V1Kind::Dir {
                        queue.push_back((e.ino, new, child_path.clone()));
                    }
                    attrs.push((rec, new));
                }
                Err(err) => s.skipped.push(format!("{child_path}: {err}")),
            }
        }
    }
    // Owners, modes and times last: adding entries and data changed them.
    let by = Changer::privileged();
    for (rec, new) in &attrs {
        let set = SetAttr {
            mode: Some(rec.mode & 0o7777),
            uid: Some(rec.uid),
            gid: Some(rec.gid),
            size: None,
            atime: Some(SetTime::At(time(rec.atime))),
            mtime: Some(SetTime::At(time(rec.mtime))),
            ctime: Some(time(rec.ctime)),
        };
        fs.setattr(*new, &set, &by)
            .map_err(|e| format!("inode {}: attributes: {e}", rec.ino))?;
        fs.set_birth_time(*new, time(rec.btime))
            .map_err(|e| format!("inode {}: creation time: {e}", rec.ino))?;
    }
    Ok(s)
}

/// Creates `name` in `dir` like the version-1 inode `rec`, with its contents and extended
/// attributes; returns the new inode number.
fn create(
    old: &V1Image,
    fs: &Fs,
    dir: u64,
    name: &[u8],
    rec: &V1Inode,
    s: &mut Summary,
) -> Result<u64, String> {
    let ctx = Ctx {
        uid: rec.uid,
        gid: rec.gid,
        umask: 0,
    };
    let perm = rec.mode & 0o7777;
    let attr = match rec.kind {
        V1Kind::Dir => fs.mkdir(dir, name, perm, ctx),
        V1Kind::File => fs.create(dir, name, perm, ctx),
        V1Kind::Symlink => {
            let target = old.readlink(rec.ino).map_err(|e| e.to_string())?;
            fs.symlink(dir, name, &target, ctx)
        }
        V1Kind::Fifo | V1Kind::Socket | V1Kind::CharDev | V1Kind::BlockDev => {
            fs.mknod(dir, name, rec.mode, rec.rdev, ctx)
        }
    }
    .map_err(|e| e.to_string())?;
    let new = attr.ino;
    fs.forget(new, 1).map_err(|e| e.to_string())?;
    if rec.kind == V1Kind::File {
        if let Err(e) = copy_data(old, fs, rec, new, s) {
            // A file reported skipped must not be left behind half copied (with the new
            // image's times and without its other names' link).
            fs.unlink(dir, name)
                .map_err(|u| format!("{e}; removing the partial copy: {u}"))?;
            return Err(e);
        }
        s.files += 1;
    }
    Ok(new)
}

/// Copies the extended attributes of `rec` (at `path`) to `new`. Unreadable or refused
/// attributes are reported as skipped; the object itself is kept. (This was part of `create`,
/// where an unreadable xattr block failed the object after it was made: a directory was left
/// empty, its whole subtree lost, a file kept with the new image's times although reported
/// skipped. The root, never passed to `create`, lost its attributes silently.)
fn copy_xattrs(old: &V1Image, fs: &Fs, rec: &V1Inode, new: u64, path: &str, s: &mut Summary) {
    let xattrs = match old.xattrs(rec.ino) {
        Ok(x) => x,
        Err(e) => {
            s.skipped.push(format!("{path}: extended attributes: {e}"));
            return;
        }
    };
    for (n, v) in xattrs {
        if let Err(e) = fs.setxattr(new, &n, &v, 0) {
            s.skipped.push(format!(
                "{path}: attribute {}: {e}",
                String::from_utf8_lossy(&n)
            ));
        }
    }
}

/// Copies a regular file's data, hole for hole; blocks allocated past its end stay allocated.
fn copy_data(
    old: &V1Image,
    fs: &Fs,
    rec: &V1Inode,
    new: u64,
    s: &mut Summary,
) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    for (off, len) in old.data_extents(rec.ino).map_err(|e| e.to_string())? {
        let end = off + len;
        let data_end = end.min(rec.size);
        let mut pos = off;
        while pos < data_end {
            let n = ((data_end - pos) as usize).min(CHUNK);
            let got = old
                .read_at(rec.ino, pos, &mut buf[..n])
                .map_err(|e| e.to_string())?;
            if got == 0 {
                break;
            }
            fs.write(new, pos, &buf[..got], None)
                .map_err(|e| format!("write at {pos}: {e}"))?;
            pos += got as u64;
            s.bytes += got as u64;
        }
        let kept = off.max(rec.size);
        if end > kept {
            fs.fallocate(new, kept, end - kept, FALLOC_KEEP_SIZE)
                .map_err(|e| format!("allocate past the end: {e}"))?;
        }
    }
    let set = SetAttr {
        size: Some(rec.size),
        ..Default::default()
    };
    fs.setattr(new, &set, &Changer::privileged())
        .map_err(|e| format!("size: {e}"))?;
    Ok(())
}
