//! Everything written survives unmount and mount: contents, metadata, links, xattrs.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::common::*;
use crate::posix::{getxattr, listxattr, set_xattr};

#[derive(Debug, PartialEq, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    ino: u64,
    mtime: (i64, i64),
    atime: (i64, i64),
}

fn meta(p: &Path) -> Meta {
    let st = lstat(p);
    Meta {
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        nlink: st.st_nlink,
        ino: st.st_ino,
        mtime: (st.st_mtime, st.st_mtime_nsec),
        atime: (st.st_atime, st.st_atime_nsec),
    }
}

fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) {
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: valid path and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cpath(p).as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat: {}", std::io::Error::last_os_error());
}

#[test]
fn tree_survives_remount() {
    let seed = seed("tree_survives_remount");
    let mut rng = Rng::new(seed);
    let mut m = Mount::new();
    let mut contents: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let sizes = [
        0usize,
        1,
        4095,
        4096,
        4097,
        65_536,
        100_001,
        1 << 20,
        3 << 20,
        5 << 20 | 17,
    ];
    fs::create_dir_all(m.p("a/b/c")).unwrap();
    fs::create_dir(m.p("d")).unwrap();
    for (i, &size) in sizes.iter().enumerate() {
        let dir = ["", "a/", "a/b/", "a/b/c/", "d/"][i % 5];
        let name = format!("{dir}file{i}");
        let data = rng.bytes(size);
        fs::write(m.p(&name), &data).unwrap();
        contents.insert(name, data);
    }
    // Random overwrites at random offsets, some past EOF (leaving holes).
    for _ in 0..40 {
        let keys: Vec<String> = contents.keys().cloned().collect();
        let name = &keys[rng.below(keys.len() as u64) as usize];
        let data = contents.get_mut(name).unwrap();
        let off = rng.below(data.len() as u64 + 50_000) as usize;
        let len = 1 + rng.below(70_000) as usize;
        let patch = rng.bytes(len);
        let f = OpenOptions::new().write(true).open(m.p(name)).unwrap();
        f.write_all_at(&patch, off as u64).unwrap();
        if data.len() < off + len {
            data.resize(off + len, 0);
        }
        data[off..off + len].copy_from_slice(&patch);
    }
    // Metadata of every kind.
    std::os::unix::fs::symlink("a/b/c/file3", m.p("sym")).unwrap();
    let long_target = "t/".repeat(2000);
    std::os::unix::fs::symlink(&long_target, m.p("d/longsym")).unwrap();
    fs::hard_link(m.p("file0"), m.p("d/hard0")).unwrap();
    fs::hard_link(m.p("file0"), m.p("a/hard0")).unwrap();
    contents.insert("d/hard0".into(), contents["file0"].clone());
    contents.insert("a/hard0".into(), contents["file0"].clone());
    fs::set_permissions(m.p("a/b/file2"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(m.p("a/b/file2"), Some(4321), Some(8765)).unwrap();
    fs::set_permissions(m.p("a/b"), fs::Permissions::from_mode(0o711)).unwrap();
    set_xattr(&m.p("file5"), "user.note", b"persist me");
    set_xattr(&m.p("a"), "trusted.dirattr", &rng.bytes(2000));
    // SAFETY: valid path.
    let r = unsafe { libc::mkfifo(cpath(&m.p("d/fifo")).as_ptr(), 0o620) };
    assert_eq!(r, 0);
    for (i, name) in contents.keys().enumerate() {
        let t = 1_600_000_000 + i as i64;
        set_times(
            &m.p(name),
            (t, 111_111_111 + i as i64),
            (t + 7, 999_000_000 + i as i64),
        );
    }
    set_times(&m.p("sym"), (5, 5), (6, 6));

    let all_paths: Vec<String> = walk(m.path());
    let metas: BTreeMap<String, Meta> = all_paths
        .iter()
        .map(|p| (p.clone(), meta(&m.p(p))))
        .collect();
    let xattrs: BTreeMap<String, Vec<(String, Vec<u8>)>> = all_paths
        .iter()
        .map(|p| {
            let names = listxattr(&m.p(p));
            let vals = names
                .into_iter()
                .map(|n| {
                    let v = getxattr(&m.p(p), &n).unwrap();
                    (n, v)
                })
                .collect();
            (p.clone(), vals)
        })
        .collect();

    for round in 0..2 {
        m.remount();
        let now_paths = walk(m.path());
        assert_eq!(now_paths, all_paths, "tree differs after remount {round}");
        for (name, data) in &contents {
            let got = fs::read(m.p(name)).unwrap();
            assert_eq!(got.len(), data.len(), "{name} size");
            if let Some(i) = got.iter().zip(data).position(|(a, b)| a != b) {
                panic!("{name} differs at byte {i} after remount {round} (seed {seed})");
            }
        }
        for p in &all_paths {
            let mut want = metas[p];
            let got = meta(&m.p(p));
            // Reads may move atimes; the exact atime is checked on the symlink below.
            want.atime = got.atime;
            assert_eq!(got, want, "metadata of {p} after remount {round}");
            let names = listxattr(&m.p(p));
            let vals: Vec<_> = names
                .into_iter()
                .map(|n| {
                    let v = getxattr(&m.p(p), &n).unwrap();
                    (n, v)
                })
                .collect();
            assert_eq!(vals, xattrs[p], "xattrs of {p}");
        }
        if round == 0 {
            assert_eq!(meta(&m.p("sym")).atime, (5, 5));
        }
        assert_eq!(
            fs::read_link(m.p("d/longsym")).unwrap().to_string_lossy(),
            long_target
        );
        assert_eq!(
            fs::read_link(m.p("sym")).unwrap().to_string_lossy(),
            "a/b/c/file3"
        );
        assert_eq!(lstat(&m.p("file0")).st_nlink, 3);
        assert_eq!(
            meta(&m.p("a/b/file2")).mtime.1 % 1_000_000_000 / 1_000_000,
            999
        );
    }
    m.finish();
}

/// Every path under `root` (relative, sorted), depth first, not following symlinks.
fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            out.push(
                path.strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
            );
            if e.file_type().unwrap().is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn empty_image_survives_many_remounts() {
    let mut m = Mount::new();
    for i in 0..5 {
        fs::write(m.p(&format!("gen{i}")), format!("{i}")).unwrap();
        m.remount();
        for j in 0..=i {
            assert_eq!(
                fs::read_to_string(m.p(&format!("gen{j}"))).unwrap(),
                j.to_string()
            );
        }
    }
    let size = lstat(&m.p("gen0")).st_size;
    assert_eq!(size, 1);
    let md = fs::metadata(m.path()).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o755);
    assert_eq!(md.nlink(), 2);
    m.unmount();
    let info = info(m.image());
    assert!(info.contains("clean"), "{info}");
    assert!(
        info.contains("mount count:  5") || info.contains("mount count:  6"),
        "{info}"
    );
    m.finish();
}
