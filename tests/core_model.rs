//! Model-based tests of the filesystem core without a mount: random operation sequences run
//! against `Fs` on a temporary image and against a simple in-memory model, compared after every
//! step; then the image is reopened (persistence) and checked with fsck. proptest prints the
//! failing (shrunk) sequence and its seed.

use std::collections::BTreeMap;

use mmapfs::engine::{Engine, OpenMode, check};
use mmapfs::format::ROOT_INO;
use mmapfs::fs::{Changer, Ctx, Fs, RenameFlags, SetAttr};
use proptest::prelude::*;

const CTX: Ctx = Ctx {
    uid: 0,
    gid: 0,
    umask: 0,
};
/// Bytes compared on each side of an interesting offset.
const WINDOW: u64 = 8192;
const NAMES: [&str; 6] = ["a", "b", "c", "long-name-with-some-length", "d", "e"];

#[derive(Debug, Clone)]
enum Op {
    Create(usize),
    Write {
        file: usize,
        off: u64,
        len: usize,
        seed: u8,
    },
    Truncate {
        file: usize,
        size: u64,
    },
    Punch {
        file: usize,
        off: u64,
        len: u64,
    },
    Unlink(usize),
    Rename {
        from: usize,
        to: usize,
    },
    Link {
        from: usize,
        to: usize,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let name = 0..NAMES.len();
    // Offsets cluster around block boundaries and also reach far (sparse files).
    let off = prop_oneof![0u64..20_000, 4090u64..4100, (0u64..4).prop_map(|x| x << 30)];
    prop_oneof![
        name.clone().prop_map(Op::Create),
        (name.clone(), off.clone(), 0usize..9000, any::<u8>()).prop_map(
            |(file, off, len, seed)| Op::Write {
                file,
                off,
                len,
                seed
            }
        ),
        (name.clone(), off.clone()).prop_map(|(file, size)| Op::Truncate { file, size }),
        (name.clone(), off, 1u64..12_000).prop_map(|(file, off, len)| Op::Punch { file, off, len }),
        name.clone().prop_map(Op::Unlink),
        (name.clone(), name.clone()).prop_map(|(from, to)| Op::Rename { from, to }),
        (name.clone(), name).prop_map(|(from, to)| Op::Link { from, to }),
        Just(Op::Reopen),
    ]
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// The model: names -> file id, file id -> contents (sparse: stored as a map of written bytes
/// would be too slow, so content is kept up to a bound and sizes can be huge with zero tails).
#[derive(Default, Clone)]
struct Model {
    names: BTreeMap<String, usize>,
    files: BTreeMap<usize, (u64, BTreeMap<u64, u8>)>,
    next: usize,
    /// Offsets where content changed shape (truncate and punch edges): compared in full around.
    boundaries: Vec<u64>,
}

impl Model {
    fn read(&self, id: usize) -> (u64, &BTreeMap<u64, u8>) {
        let (size, bytes) = &self.files[&id];
        (*size, bytes)
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    fs: Option<Fs>,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        Engine::mkfs(&path, 1 << 20, false).unwrap();
        let fs = Fs::new(Engine::open(&path, OpenMode::Mount).unwrap());
        Harness {
            _dir: dir,
            path,
            fs: Some(fs),
        }
    }
    fn fs(&self) -> &Fs {
        self.fs.as_ref().unwrap()
    }
    fn reopen(&mut self) {
        let fs = self.fs.take().unwrap();
        fs.shutdown().unwrap();
        drop(fs);
        self.fs = Some(Fs::new(Engine::open(&self.path, OpenMode::Mount).unwrap()));
    }
    fn ino(&self, name: &str) -> Option<u64> {
        self.fs().lookup(ROOT_INO, name.as_bytes()).ok().map(|a| {
            self.fs().forget(a.ino, 1).unwrap();
            a.ino
        })
    }
    fn fsck(&mut self) {
        let fs = self.fs.take().unwrap();
        fs.shutdown().unwrap();
        drop(fs);
        let e = Engine::open(&self.path, OpenMode::Inspect).unwrap();
        let r = check::run(&e, check::Mode::Report).unwrap();
        assert!(r.problems.is_empty(), "fsck: {:?}", r.problems);
    }
}

fn compare(h: &Harness, m: &Model) -> Result<(), TestCaseError> {
    for name in NAMES {
        let ino = h.ino(name);
        let Some(&id) = m.names.get(name) else {
            prop_assert!(ino.is_none(), "{name} exists but should not");
            continue;
        };
        let ino = ino.ok_or_else(|| TestCaseError::fail(format!("{name} missing")))?;
        let (size, bytes) = m.read(id);
        let attr = h.fs().getattr(ino).unwrap();
        prop_assert_eq!(attr.size, size, "size of {}", name);
        let links = m.names.values().filter(|&&v| v == id).count() as u32;
        prop_assert_eq!(attr.nlink, links, "nlink of {}", name);
        // Compare whole windows around every written byte and every truncate/punch edge
        // (a full compare of terabyte-sized sparse files would be too slow).
        let mut points: Vec<u64> = bytes.keys().copied().collect();
        points.extend(m.boundaries.iter().copied());
        points.extend([0, size]);
        let mut windows: Vec<(u64, u64)> = points
            .into_iter()
            .map(|p| {
                (
                    p.saturating_sub(WINDOW) / WINDOW * WINDOW,
                    (p + WINDOW).min(size),
                )
            })
            .filter(|(s, e)| s < e)
            .collect();
        windows.sort_unstable();
        windows.dedup();
        let mut covered = 0u64;
        for (start, end) in windows {
            let start = start.max(covered);
            if start >= end {
                continue;
            }
            covered = end;
            let got = h
                .fs()
                .read(ino, start, (end - start) as u32, |d| d.to_vec())
                .unwrap();
            prop_assert_eq!(
                got.len() as u64,
                end - start,
                "{} short read at {}",
                name,
                start
            );
            for (i, g) in got.iter().enumerate() {
                let o = start + i as u64;
                let want = bytes.get(&o).copied().unwrap_or(0);
                prop_assert_eq!(*g, want, "{} byte {}", name, o);
            }
        }
    }
    Ok(())
}

fn apply(h: &mut Harness, m: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    let fs_name = |i: usize| NAMES[i].as_bytes();
    match *op {
        Op::Create(i) => {
            let r = h.fs().create(ROOT_INO, fs_name(i), 0o644, CTX);
            if m.names.contains_key(NAMES[i]) {
                prop_assert!(r.is_err());
            } else {
                let a = r.unwrap();
                h.fs().forget(a.ino, 1).unwrap();
                m.names.insert(NAMES[i].into(), m.next);
                m.files.insert(m.next, (0, BTreeMap::new()));
                m.next += 1;
            }
        }
        Op::Write {
            file,
            off,
            len,
            seed,
        } => {
            if let (Some(&id), Some(ino)) = (m.names.get(NAMES[file]), h.ino(NAMES[file])) {
                let data = pattern(len, seed);
                h.fs()
                    .write(ino, off, &data, Some(&Changer::privileged()))
                    .unwrap();
                let f = m.files.get_mut(&id).unwrap();
                for (i, b) in data.iter().enumerate() {
                    f.1.insert(off + i as u64, *b);
                }
                if len > 0 {
                    f.0 = f.0.max(off + len as u64);
                }
            }
        }
        Op::Truncate { file, size } => {
            if let (Some(&id), Some(ino)) = (m.names.get(NAMES[file]), h.ino(NAMES[file])) {
                let s = SetAttr {
                    size: Some(size),
                    ..Default::default()
                };
                h.fs().setattr(ino, &s, &Changer::privileged()).unwrap();
                let f = m.files.get_mut(&id).unwrap();
                f.0 = size;
                f.1.retain(|&o, _| o < size);
                m.boundaries.push(size);
            }
        }
        Op::Punch { file, off, len } => {
            if let (Some(&id), Some(ino)) = (m.names.get(NAMES[file]), h.ino(NAMES[file])) {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                h.fs().fallocate(ino, off, len, mode).unwrap();
                let f = m.files.get_mut(&id).unwrap();
                f.1.retain(|&o, _| o < off || o >= off + len);
                m.boundaries.extend([off, off + len]);
            }
        }
        Op::Unlink(i) => {
            let r = h.fs().unlink(ROOT_INO, fs_name(i));
            match m.names.remove(NAMES[i]) {
                Some(id) => {
                    r.unwrap();
                    if !m.names.values().any(|&v| v == id) {
                        m.files.remove(&id);
                    }
                }
                None => prop_assert!(r.is_err()),
            }
        }
        Op::Rename { from, to } => {
            let r = h.fs().rename(
                ROOT_INO,
                fs_name(from),
                ROOT_INO,
                fs_name(to),
                RenameFlags::default(),
            );
            match m.names.get(NAMES[from]).copied() {
                Some(id) => {
                    r.unwrap();
                    if m.names.get(NAMES[to]) != Some(&id) {
                        m.names.remove(NAMES[from]);
                        if let Some(old) = m.names.insert(NAMES[to].into(), id)
                            && !m.names.values().any(|&v| v == old)
                        {
                            m.files.remove(&old);
                        }
                    }
                }
                None => prop_assert!(r.is_err()),
            }
        }
        Op::Link { from, to } => {
            let src = h.ino(NAMES[from]);
            match (m.names.get(NAMES[from]).copied(), src) {
                (Some(id), Some(ino)) if !m.names.contains_key(NAMES[to]) => {
                    let a = h.fs().link(ino, ROOT_INO, fs_name(to)).unwrap();
                    h.fs().forget(a.ino, 1).unwrap();
                    m.names.insert(NAMES[to].into(), id);
                }
                (Some(_), Some(ino)) => {
                    prop_assert!(h.fs().link(ino, ROOT_INO, fs_name(to)).is_err())
                }
                _ => {}
            }
        }
        Op::Reopen => h.reopen(),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_the_model(ops in prop::collection::vec(op(), 1..60)) {
        let mut h = Harness::new();
        let mut m = Model::default();
        for op in &ops {
            apply(&mut h, &mut m, op)?;
            compare(&h, &m)?;
        }
        h.reopen();
        compare(&h, &m)?;
        h.fsck();
    }
}

/// A directory with many entries: every name is found through the index, listing returns each
/// once, and removing half keeps the rest reachable (index rebuilds, deleted slots).
#[test]
fn large_directory_index() {
    let mut h = Harness::new();
    let n = 20_000u32;
    for i in 0..n {
        let a = h
            .fs()
            .create(ROOT_INO, format!("f{i}").as_bytes(), 0o644, CTX)
            .unwrap();
        h.fs().forget(a.ino, 1).unwrap();
    }
    for i in (0..n).step_by(2) {
        h.fs().unlink(ROOT_INO, format!("f{i}").as_bytes()).unwrap();
    }
    for i in 0..n {
        let found = h.ino(&format!("f{i}")).is_some();
        assert_eq!(found, i % 2 == 1, "f{i}");
    }
    let mut seen = std::collections::BTreeSet::new();
    h.fs()
        .readdir(ROOT_INO, 0, false, &mut |e| {
            assert!(
                seen.insert(String::from_utf8(e.name.to_vec()).unwrap()),
                "duplicate"
            );
            true
        })
        .unwrap();
    assert_eq!(seen.len() as u32, n / 2 + 2);
    h.fsck();
}

/// Readdir cookies stay valid while entries are removed between calls (rm -rf pattern).
#[test]
fn readdir_resumes_while_deleting() {
    let mut h = Harness::new();
    for i in 0..1000 {
        let a = h
            .fs()
            .create(ROOT_INO, format!("x{i}").as_bytes(), 0o644, CTX)
            .unwrap();
        h.fs().forget(a.ino, 1).unwrap();
    }
    let mut offset = 0;
    let mut removed = 0;
    loop {
        let mut batch = Vec::new();
        h.fs()
            .readdir(ROOT_INO, offset, false, &mut |e| {
                batch.push((e.name.to_vec(), e.next));
                batch.len() < 37
            })
            .unwrap();
        if batch.is_empty() {
            break;
        }
        for (name, next) in batch {
            offset = next;
            if name != b"." && name != b".." {
                h.fs().unlink(ROOT_INO, &name).unwrap();
                removed += 1;
            }
        }
    }
    assert_eq!(removed, 1000);
    h.fsck();
}

/// Unlinked but still referenced inodes survive until forgotten, then their space is freed.
#[test]
fn unlinked_inode_lives_until_forgotten() {
    let mut h = Harness::new();
    let a = h.fs().create(ROOT_INO, b"open", 0o644, CTX).unwrap();
    h.fs()
        .write(a.ino, 0, &vec![7u8; 1 << 20], Some(&Changer::privileged()))
        .unwrap();
    let free_before = h.fs().statfs().bfree;
    h.fs().unlink(ROOT_INO, b"open").unwrap();
    assert_eq!(h.fs().read(a.ino, 100, 1, |d| d[0]).unwrap(), 7);
    h.fs().forget(a.ino, 1).unwrap();
    assert!(h.fs().getattr(a.ino).is_err());
    assert!(h.fs().statfs().bfree >= free_before + 256);
    h.fsck();
}

/// Shrinking cuts data off for good: growing again (truncate or a write past the end) reads
/// zeros where the old bytes were, also inside the partial last block.
#[test]
fn truncate_then_grow_reads_zeros() {
    let mut h = Harness::new();
    let a = h.fs().create(ROOT_INO, b"t", 0o644, CTX).unwrap();
    h.fs()
        .write(a.ino, 0, &[0xab; 5000], Some(&Changer::privileged()))
        .unwrap();
    let shrink = SetAttr {
        size: Some(100),
        ..Default::default()
    };
    h.fs()
        .setattr(a.ino, &shrink, &Changer::privileged())
        .unwrap();
    let grow = SetAttr {
        size: Some(5000),
        ..Default::default()
    };
    h.fs()
        .setattr(a.ino, &grow, &Changer::privileged())
        .unwrap();
    let got = h.fs().read(a.ino, 0, 5000, |d| d.to_vec()).unwrap();
    assert!(got[..100].iter().all(|&b| b == 0xab));
    assert!(
        got[100..].iter().all(|&b| b == 0),
        "stale bytes after shrink+grow"
    );
    h.fs()
        .setattr(a.ino, &shrink, &Changer::privileged())
        .unwrap();
    h.fs()
        .write(a.ino, 300, b"x", Some(&Changer::privileged()))
        .unwrap();
    let got = h.fs().read(a.ino, 0, 301, |d| d.to_vec()).unwrap();
    assert!(
        got[100..300].iter().all(|&b| b == 0),
        "stale bytes before a write past the end"
    );
    h.fs().forget(a.ino, 1).unwrap();
    h.fsck();
}

/// fsck checks sizes against extents: a symlink whose size says 0 (record otherwise valid, so
/// no checksum complains) and a directory owning a block past its entries are both reported.
#[test]
fn fsck_checks_sizes_against_extents() {
    let h = Harness::new();
    let link = h.fs().symlink(ROOT_INO, b"l", b"target", CTX).unwrap();
    let dir = h.fs().mkdir(ROOT_INO, b"d", 0o755, CTX).unwrap();
    let file = h.fs().create(dir.ino, b"f", 0o644, CTX).unwrap();
    let e = h.fs().engine();
    {
        let tx = e.begin(16).unwrap();
        let mut rec = e.read_inode(link.ino).unwrap();
        rec.size = 0.into();
        e.write_inode(&tx, link.ino, &mut rec).unwrap();
        let mut rec = e.read_inode(dir.ino).unwrap();
        rec.dir_entries_end = 0.into(); // its one entry block now lies past the entries
        e.write_inode(&tx, dir.ino, &mut rec).unwrap();
    }
    // The check reads committed blocks (their trailers are sealed at commit).
    e.commit_now().unwrap();
    let report = check::run(e, check::Mode::Report).unwrap();
    let all = report.problems.join("\n");
    assert!(
        all.contains(&format!("inode {} (/l): symlink of size 0", link.ino)),
        "{all}"
    );
    assert!(
        all.contains(&format!(
            "inode {} (/d): directory owns file block 0",
            dir.ino
        )),
        "{all}"
    );
    h.fs().forget(file.ino, 1).unwrap();
}

/// A readdir position from before the directory was emptied and refilled lands inside a new
/// record: the listing resumes cleanly (no error, the image not marked damaged), and a fresh
/// listing sees every entry.
#[test]
fn stale_readdir_position_is_not_corruption() {
    let mut h = Harness::new();
    let d = h.fs().mkdir(ROOT_INO, b"d", 0o755, CTX).unwrap().ino;
    for i in 0..20 {
        let a = h
            .fs()
            .create(d, format!("x{i:02}").as_bytes(), 0o644, CTX)
            .unwrap();
        h.fs().forget(a.ino, 1).unwrap();
    }
    // Read part of the listing and keep the position, as a paused readdir would.
    let mut stale = 0;
    let mut seen = 0;
    h.fs()
        .readdir(d, 0, false, &mut |e| {
            seen += 1;
            stale = e.next;
            seen < 3
        })
        .unwrap();
    for i in 0..20 {
        h.fs().unlink(d, format!("x{i:02}").as_bytes()).unwrap();
    }
    let a = h
        .fs()
        .create(d, b"a-much-longer-name-than-before", 0o644, CTX)
        .unwrap();
    h.fs().forget(a.ino, 1).unwrap();
    h.fs()
        .readdir(d, stale, false, &mut |_| true)
        .expect("a stale position is no error");
    assert!(
        !h.fs().engine().has_errors(),
        "stale position marked the image damaged"
    );
    let mut names = Vec::new();
    h.fs()
        .readdir(d, 0, false, &mut |e| {
            names.push(e.name.to_vec());
            true
        })
        .unwrap();
    assert!(names.contains(&b"a-much-longer-name-than-before".to_vec()));
    h.fs().forget(d, 1).unwrap();
    h.fsck();
}

/// Orphan-list links live in other inodes' records, which are rewritten in place under the
/// inode-table lock by threads that do not hold those inodes' locks. A lock-free read of such a
/// record (getattr, the kernel's forget) may meet it half-written: that is not damage. (Taken
/// for damage, it marked healthy images for fsck in about one run in five of the benchmark's
/// metadata job.)
#[test]
fn records_rewritten_for_orphan_links_are_read_whole() {
    let mut h = Harness::new();
    // A permanent orphan: every orphan added or removed next to it rewrites its record.
    let tail = h.fs().create(ROOT_INO, b"tail", 0o644, CTX).unwrap().ino;
    h.fs().unlink(ROOT_INO, b"tail").unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let fs = h.fs();
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..20_000u32 {
                let name = format!("x{i}");
                let ino = fs
                    .create(ROOT_INO, name.as_bytes(), 0o644, CTX)
                    .unwrap()
                    .ino;
                fs.unlink(ROOT_INO, name.as_bytes()).unwrap();
                fs.forget(ino, 1).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                fs.getattr(tail).unwrap();
            }
        });
    });
    assert!(
        !h.fs().engine().has_errors(),
        "a healthy image was taken for damaged"
    );
    h.fs().forget(tail, 1).unwrap();
    h.fsck();
}
