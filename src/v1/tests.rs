//! Tests of the version-1 reader against the fixture `tests/fixtures/v1-sample.img.gz` (made by
//! `tests/fixtures/make_v1_fixture.sh` with the v1 binary) and its manifest, and against
//! damaged copies of it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::*;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/v1-sample.img.gz"
);
const MANIFEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/v1-sample.manifest"
);
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The fixture image, gunzipped into a temporary file.
fn fixture() -> tempfile::NamedTempFile {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new("gzip")
        .arg("-dc")
        .arg(FIXTURE)
        .stdout(tmp.reopen().unwrap())
        .status()
        .expect("run gzip");
    assert!(status.success(), "gzip -dc {FIXTURE}");
    tmp
}

/// One manifest line: its fields, and its xattrs (name -> hex value).
#[derive(Debug)]
struct Line {
    f: HashMap<String, String>,
    xattrs: BTreeMap<String, String>,
}

impl Line {
    fn get(&self, key: &str) -> &str {
        self.f.get(key).map_or("", String::as_str)
    }
    fn num<T: std::str::FromStr>(&self, key: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        self.get(key).parse().unwrap()
    }
}

/// The manifest: path -> line.
fn manifest() -> BTreeMap<String, Line> {
    let text = std::fs::read_to_string(MANIFEST).unwrap();
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
        out.insert(line.get("path").to_string(), line);
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|c| format!("{c:02x}")).collect()
}

fn sha256(data: &[u8]) -> String {
    if data.is_empty() {
        return EMPTY_SHA256.into();
    }
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn time(t: V1Time) -> String {
    format!("{}.{:09}", t.sec, t.nsec)
}

fn kind_name(k: V1Kind) -> &'static str {
    match k {
        V1Kind::Dir => "dir",
        V1Kind::File => "reg",
        V1Kind::Symlink => "lnk",
        V1Kind::Fifo => "fifo",
        V1Kind::CharDev => "chr",
        V1Kind::BlockDev => "blk",
        V1Kind::Socket => "sock",
    }
}

fn dtype(k: V1Kind) -> u8 {
    match k {
        V1Kind::Dir => libc::DT_DIR,
        V1Kind::File => libc::DT_REG,
        V1Kind::Symlink => libc::DT_LNK,
        V1Kind::Fifo => libc::DT_FIFO,
        V1Kind::CharDev => libc::DT_CHR,
        V1Kind::BlockDev => libc::DT_BLK,
        V1Kind::Socket => libc::DT_SOCK,
    }
}

/// The whole content of a file, read in odd-sized chunks.
fn content(img: &V1Image, ino: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65537];
    loop {
        let n = img.read_at(ino, out.len() as u64, &mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Every path reachable from the root -> (inode, parent directory inode, entry type).
fn namespace(img: &V1Image) -> BTreeMap<String, (u64, u64, u8)> {
    fn visit(img: &V1Image, dir: u64, path: &str, out: &mut BTreeMap<String, (u64, u64, u8)>) {
        for e in img.dir_entries(dir).unwrap() {
            let name = String::from_utf8(e.name.clone()).unwrap();
            let p = if path == "." {
                name
            } else {
                format!("{path}/{name}")
            };
            assert!(
                out.insert(p.clone(), (e.ino, dir, e.dtype)).is_none(),
                "{p} twice"
            );
            if e.dtype == libc::DT_DIR {
                visit(img, e.ino, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    out.insert(".".to_string(), (V1_ROOT_INO, V1_ROOT_INO, libc::DT_DIR));
    visit(img, V1_ROOT_INO, ".", &mut out);
    out
}

#[test]
fn v1_fixture_matches_manifest() {
    let tmp = fixture();
    let img = open_retrying(tmp.path()).unwrap();
    let man = manifest();
    let names = namespace(&img);
    assert_eq!(
        names.keys().collect::<Vec<_>>(),
        man.keys().collect::<Vec<_>>(),
        "namespace differs from the manifest"
    );
    let mut paths_of: HashMap<u64, usize> = HashMap::new();
    for (path, &(ino, parent, dt)) in &names {
        let want = &man[path];
        let rec = img.inode(ino).unwrap().unwrap();
        *paths_of.entry(ino).or_default() += 1;
        // Inode numbers are the ones the mount showed: hard links share them.
        assert_eq!(ino, want.num::<u64>("ino"), "{path}: ino");
        assert_eq!(kind_name(rec.kind), want.get("type"), "{path}: type");
        assert_eq!(dt, dtype(rec.kind), "{path}: entry type");
        assert_eq!(rec.nlink, want.num::<u32>("nlink"), "{path}: nlink");
        let mode = u32::from_str_radix(want.get("mode"), 8).unwrap();
        assert_eq!(rec.mode & 0o7777, mode, "{path}: mode");
        assert_eq!(rec.uid, want.num::<u32>("uid"), "{path}: uid");
        assert_eq!(rec.gid, want.num::<u32>("gid"), "{path}: gid");
        assert_eq!(rec.size, want.num::<u64>("size"), "{path}: size");
        assert_eq!(time(rec.atime), want.get("atime"), "{path}: atime");
        assert_eq!(time(rec.mtime), want.get("mtime"), "{path}: mtime");
        assert_eq!(time(rec.ctime), want.get("ctime"), "{path}: ctime");
        match rec.kind {
            V1Kind::Dir => {
                let n = img.dir_entries(ino).unwrap().len() as u64;
                assert_eq!(n, want.num::<u64>("entries"), "{path}: entries");
                assert_eq!(rec.dir_live, n, "{path}: dir_live");
                assert_eq!(rec.parent, parent, "{path}: parent");
            }
            V1Kind::File => {
                let data = content(&img, ino);
                assert_eq!(data.len() as u64, rec.size, "{path}: bytes read");
                assert_eq!(sha256(&data), want.get("sha256"), "{path}: content");
            }
            V1Kind::Symlink => {
                let target = img.readlink(ino).unwrap();
                assert_eq!(hex(&target), want.get("target"), "{path}: target");
                assert_eq!(content(&img, ino), target, "{path}: read_at of a symlink");
            }
            V1Kind::CharDev | V1Kind::BlockDev => {
                // Linux new_decode_dev.
                let (major, minor) = (
                    (rec.rdev >> 8) & 0xfff,
                    (rec.rdev & 0xff) | ((rec.rdev >> 12) & 0xfff00),
                );
                assert_eq!(format!("{major}:{minor}"), want.get("rdev"), "{path}: rdev");
            }
            V1Kind::Fifo | V1Kind::Socket => {}
        }
        let xattrs: BTreeMap<String, String> = img
            .xattrs(ino)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), hex(&v)))
            .collect();
        assert_eq!(xattrs, want.xattrs, "{path}: xattrs");
    }
    // Link counts of non-directories are their names; the superblock counts every inode seen,
    // and every used slot is reachable (the unlinked files were freed).
    for (path, &(ino, _, dt)) in &names {
        if dt != libc::DT_DIR {
            assert_eq!(
                paths_of[&ino],
                man[path].num::<usize>("nlink"),
                "{path}: links"
            );
        }
    }
    let info = img.info();
    assert_eq!(info.state, V1State::Clean);
    assert_eq!(info.used_inodes, paths_of.len() as u64);
    let used: HashSet<u64> = (1..info.itab_slots)
        .filter(|&i| img.inode(i).unwrap().is_some())
        .collect();
    assert_eq!(used, paths_of.keys().copied().collect::<HashSet<u64>>());
    assert!(info.free_blocks < info.total_blocks && info.mount_count == 2);
}

#[test]
fn v1_extents_holes_and_bounds() {
    let tmp = fixture();
    let img = open_retrying(tmp.path()).unwrap();
    let man = manifest();
    let ino = |p: &str| man[p].num::<u64>("ino");
    const MIB: u64 = 1 << 20;
    let big = ino("files/big.bin");
    let rec = img.inode(big).unwrap().unwrap();
    assert_eq!(img.tree("t", rec.tree).unwrap().height, 2);
    assert_eq!(img.data_extents(big).unwrap(), [(0, 640 * 4096)]);
    let mut buf = [0u8; 32];
    assert_eq!(img.read_at(big, 600 * 4096, &mut buf).unwrap(), 32);
    assert_eq!(&buf[..21], b"big block 000600\niiii");

    let holes = ino("files/holes.bin");
    assert_eq!(
        img.data_extents(holes).unwrap(),
        [
            (0, 4096),
            (24 * 4096, 4096),
            (3 * MIB, 3 * 4096),
            (9 * MIB, 4096)
        ]
    );
    let mut buf = vec![0xffu8; 8192];
    assert_eq!(img.read_at(holes, 9 * MIB - 4096, &mut buf).unwrap(), 8192);
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert_eq!(&buf[4096..4101], b"nine\0");
    assert_eq!(img.read_at(holes, 12 * MIB - 10, &mut buf).unwrap(), 10);
    assert_eq!(img.read_at(holes, 12 * MIB, &mut buf).unwrap(), 0);
    assert_eq!(img.read_at(holes, u64::MAX, &mut buf).unwrap(), 0);

    // Preallocated past EOF: the extents say so, reads stop at the size.
    let pre = ino("files/prealloc.bin");
    assert_eq!(img.data_extents(pre).unwrap(), [(0, 65536)]);
    assert_eq!(img.read_at(pre, 4990, &mut buf).unwrap(), 10);

    let tail = ino("files/tail-only.bin");
    assert_eq!(img.data_extents(tail).unwrap(), [(5 * MIB, 4096)]);
    assert!(img.data_extents(ino("files/empty")).unwrap().is_empty());
    assert_eq!(
        img.data_extents(ino("files/one-block")).unwrap(),
        [(0, 4096)]
    );

    // The big directory: deleted records are skipped, nothing is damaged.
    let (entries, damaged) = img.dir_entries_salvage(ino("big")).unwrap();
    assert!(damaged.is_empty());
    assert_eq!(entries.len(), 518);
    assert!(entries.iter().any(|e| e.name.len() == 255));

    // Wrong types and out-of-range numbers are errors, not panics.
    assert!(matches!(
        img.read_at(ino("a"), 0, &mut buf),
        Err(V1Error::WrongType { .. })
    ));
    assert!(matches!(
        img.readlink(holes),
        Err(V1Error::WrongType { .. })
    ));
    assert!(matches!(
        img.dir_entries(holes),
        Err(V1Error::WrongType { .. })
    ));
    let slots = img.info().itab_slots;
    for bad in [0, slots, u64::MAX] {
        assert!(img.inode(bad).is_err(), "inode {bad}");
    }
    let free = (1..slots)
        .find(|&i| img.inode(i).unwrap().is_none())
        .unwrap();
    assert_eq!(
        img.xattrs(free).unwrap_err().to_string(),
        format!("inode {free}: free slot")
    );
}

/// Reads everything the reader offers, the way an upgrade would; returns the errors seen.
fn exercise(img: &V1Image) -> Vec<String> {
    let mut errors = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    for ino in 1..img.info().itab_slots {
        let r = (|| -> Result<(), V1Error> {
            let Some(rec) = img.inode(ino)? else {
                return Ok(());
            };
            let xattrs = img.xattrs(ino);
            match rec.kind {
                V1Kind::Dir => {
                    let (_, damaged) = img.dir_entries_salvage(ino)?;
                    errors.extend(damaged.iter().map(ToString::to_string));
                }
                V1Kind::File => {
                    for (off, len) in img.data_extents(ino)? {
                        let end = (off + len).min(rec.size);
                        let mut pos = off;
                        while pos < end {
                            match img.read_at(ino, pos, &mut buf)? {
                                0 => break,
                                n => pos += n as u64,
                            }
                        }
                    }
                }
                V1Kind::Symlink => drop(img.readlink(ino)?),
                _ => {}
            }
            xattrs.map(drop)
        })();
        if let Err(e) = r {
            errors.push(e.to_string());
        }
    }
    errors
}

/// Opens the image, waiting out a lock that outlives its holder for a moment: a child another
/// test forks (gzip, sha256sum) holds the previous open of this file until it execs.
fn open_retrying(path: &Path) -> Result<V1Image, V1Error> {
    let mut r = V1Image::open(path);
    for _ in 0..50 {
        if !matches!(r, Err(V1Error::Busy)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        r = V1Image::open(path);
    }
    r
}

/// Opens the image and exercises it on another thread; fails the test on a panic or a hang.
fn exercise_path(path: &Path) -> Result<Vec<String>, V1Error> {
    let path = path.to_path_buf();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(open_retrying(&path).map(|img| exercise(&img)));
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("reader panicked or hung")
}

/// A damaged copy of the fixture: bytes are changed in place and can be put back.
struct Damage {
    tmp: tempfile::NamedTempFile,
}

impl Damage {
    fn new() -> Damage {
        Damage { tmp: fixture() }
    }
    fn path(&self) -> &Path {
        self.tmp.path()
    }
    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.tmp.as_file().read_exact_at(&mut b, off).unwrap();
        b
    }
    fn write(&self, off: u64, bytes: &[u8]) {
        self.tmp.as_file().write_all_at(bytes, off).unwrap();
    }
    /// Runs `check` on the image with `bytes` written at `off`, then restores the old bytes.
    fn with<T>(&self, off: u64, bytes: &[u8], check: impl FnOnce(&Path) -> T) -> T {
        let old = self.read(off, bytes.len());
        self.write(off, bytes);
        let r = check(self.path());
        self.write(off, &old);
        r
    }
    /// As `with`, XOR-ing `mask` into the byte at `off`.
    fn flip<T>(&self, off: u64, mask: u8, check: impl FnOnce(&Path) -> T) -> T {
        let b = self.read(off, 1)[0] ^ mask;
        self.with(off, &[b], check)
    }
    /// Byte offset of inode `ino`'s record.
    fn inode_off(&self, ino: u64) -> u64 {
        let img = open_retrying(self.path()).unwrap();
        let b = img.block_of("t", img.itab, ino / 16).unwrap().unwrap();
        b * BLOCK + (ino % 16) * INODE_SIZE
    }
    /// Inode `ino`'s record with `edit` applied and its checksum recomputed.
    fn resealed(&self, ino: u64, edit: impl FnOnce(&mut RawInode)) -> Vec<u8> {
        let mut r = RawInode::read_from_bytes(&self.read(self.inode_off(ino), 256)).unwrap();
        edit(&mut r);
        let b = r.as_bytes();
        r.checksum = crc(&[&b[..REFS_OFFSET], &b[REFS_OFFSET + 8..252]]).into();
        r.as_bytes().to_vec()
    }
}

fn open_err(path: &Path) -> String {
    match open_retrying(path) {
        Ok(_) => panic!("damaged image opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn v1_damaged_superblock_is_refused() {
    let d = Damage::new();
    assert!(exercise_path(d.path()).unwrap().is_empty());
    assert_eq!(d.flip(0, 1, open_err), "not an mmapfs image (bad magic)");
    assert_eq!(d.flip(8, 2, open_err), "format version 3, not 1");
    for off in [12, 16, 24, 40, 48, 100, 200, 252] {
        assert_eq!(
            d.flip(off, 0x10, open_err),
            "superblock: checksum mismatch",
            "{off}"
        );
    }
    // Checksummed but inconsistent superblocks.
    let sb = |edit: &dyn Fn(&mut Superblock)| {
        let mut sb = Superblock::read_from_bytes(&d.read(0, 256)).unwrap();
        edit(&mut sb);
        sb.checksum = crc(&[&sb.as_bytes()[..252]]).into();
        sb.as_bytes().to_vec()
    };
    let len = d.tmp.as_file().metadata().unwrap().len();
    type Edit<'a> = &'a dyn Fn(&mut Superblock);
    let cases: [(Edit, &str); 6] = [
        (&|s| s.total_blocks = (len / 4096 + 1).into(), "truncated?"),
        (&|s| s.total_blocks = u64::MAX.into(), "truncated?"),
        (
            &|s| s.itab_tree = ((5u64 << 56) | 2).into(),
            "height 5 invalid",
        ),
        (
            &|s| s.itab_tree = ((1u64 << 56) | 1 << 40).into(),
            "out of range",
        ),
        (&|s| s.itab_slots = (1u64 << 40).into(), "inode table of"),
        (&|s| s.itab_slots = 17.into(), "inode table of"),
    ];
    for (edit, want) in cases {
        let e = d.with(0, &sb(edit), open_err);
        let prefix = e.starts_with("superblock: ") || e.starts_with("inode table: ");
        assert!(prefix && e.contains(want), "{e}");
    }
    // A truncated file.
    d.tmp.as_file().set_len(len / 2).unwrap();
    assert!(open_err(d.path()).contains("truncated?"));
    d.tmp.as_file().set_len(100).unwrap();
    assert_eq!(open_err(d.path()), "not an mmapfs image (bad magic)");
}

#[test]
fn v1_damaged_objects_are_reported_per_object() {
    let d = Damage::new();
    let man = manifest();
    let ino = |p: &str| man[p].num::<u64>("ino");
    let img_of = |p: &Path| open_retrying(p).unwrap();

    // An inode record: that inode fails, the rest of the image reads.
    let small = ino("files/small.txt");
    let off = d.inode_off(small);
    let errs = d.flip(off + 20, 1, |p| exercise_path(p).unwrap());
    assert_eq!(errs, [format!("inode {small}: checksum mismatch")]);
    // kernel_refs is volatile and outside the checksum.
    assert!(d.flip(off + 170, 0xff, |p| exercise_path(p).unwrap().is_empty()));
    // A used inode of unknown type, a tree of height 5.
    let weird = d.resealed(small, |r| r.mode = 0o170644.into());
    let e = d.with(off, &weird, |p| {
        img_of(p).inode(small).unwrap_err().to_string()
    });
    assert_eq!(e, format!("inode {small}: mode 170644: unknown file type"));
    let tall = d.resealed(small, |r| r.tree = ((5u64 << 56) | 9).into());
    let e = d.with(off, &tall, |p| {
        img_of(p).read_at(small, 0, &mut [0; 4]).unwrap_err()
    });
    assert!(e.to_string().contains("height 5 invalid"), "{e}");

    // A directory block: the damaged record is reported and skipped, its neighbours survive.
    let big = ino("big");
    let img = img_of(d.path());
    let all = img.dir_entries(big).unwrap();
    let rec = img.inode(big).unwrap().unwrap();
    let block0 = img
        .block_of("t", img.tree("t", rec.tree).unwrap(), 0)
        .unwrap()
        .unwrap();
    drop(img);
    // Record 0 is the deleted "e0000", record 1 (at 24) "entry-0001-with-a-longer-name".
    let (left, damaged) = d.flip(block0 * BLOCK + 24 + 20, 1, |p| {
        let img = img_of(p);
        assert!(img.dir_entries(big).is_err());
        img.dir_entries_salvage(big).unwrap()
    });
    assert_eq!(left.len(), all.len() - 1);
    assert_eq!(all[0].name, b"entry-0001-with-a-longer-name");
    assert_eq!(left[..], all[1..]);
    assert_eq!(
        damaged.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        [format!(
            "inode {big}: directory entry at 24: checksum mismatch"
        )]
    );
    // A record length that does not fit.
    let errs = d.with(block0 * BLOCK + 24 + 12, &[0xf8, 0x0f], |p| {
        exercise_path(p).unwrap()
    });
    assert_eq!(
        errs,
        [format!(
            "inode {big}: directory entry at 24: record length 4088, name length 29"
        )]
    );
    // An entry region larger than the image could hold: refused before any walk.
    let boff = d.inode_off(big);
    let huge = d.resealed(big, |r| r.dir_entries_end = (1u64 << 40).into());
    let e = d.with(boff, &huge, |p| {
        img_of(p).dir_entries(big).unwrap_err().to_string()
    });
    assert_eq!(
        e,
        format!("inode {big}: directory entries end at {}", 1u64 << 40)
    );

    // A tree node: a pointer out of range; a pointer to another node (data read from the wrong
    // place, which tree nodes carry no checksum to detect, but nothing worse).
    let bigf = ino("files/big.bin");
    let img = img_of(d.path());
    let root = img
        .tree("t", img.inode(bigf).unwrap().unwrap().tree)
        .unwrap()
        .root;
    drop(img);
    let e = d.flip(root * BLOCK + 7, 0x80, |p| {
        img_of(p).data_extents(bigf).unwrap_err()
    });
    assert!(
        e.to_string()
            .ends_with("tree block 9223372036854775808 out of range")
            || e.to_string().contains("out of range"),
        "{e}"
    );
    let leaf0 = d.read(root * BLOCK, 8);
    let ext = d.with(root * BLOCK + 8, &leaf0, |p| {
        img_of(p).data_extents(bigf).unwrap()
    });
    assert_eq!(ext, [(0, 1024 * 4096)]);

    // A tree whose every slot points at its own root, four levels deep: 512^4 "blocks" if
    // followed naively; the walk gives up after as many blocks as the image holds.
    let total = img_of(d.path()).info().total_blocks;
    let spare = total - 1;
    let bomb: Vec<u8> = (0..512).flat_map(|_| spare.to_le_bytes()).collect();
    d.write(spare * BLOCK, &bomb);
    let foff = d.inode_off(bigf);
    let rec = d.resealed(bigf, |r| r.tree = ((4u64 << 56) | spare).into());
    let e = d.with(foff, &rec, |p| {
        let img = img_of(p);
        let mut buf = vec![0u8; 1 << 16];
        assert_eq!(img.read_at(bigf, 0, &mut buf).unwrap(), buf.len());
        img.data_extents(bigf).unwrap_err().to_string()
    });
    assert_eq!(
        e,
        format!("inode {bigf}: tree maps more blocks than the image holds")
    );
    d.write(spare * BLOCK, &[0; 4096]);

    // An xattr block.
    let img = img_of(d.path());
    let xb = img.inode(small).unwrap().unwrap().xattr_block;
    drop(img);
    let e = d.flip(xb * BLOCK + 40, 4, |p| img_of(p).xattrs(small).unwrap_err());
    assert_eq!(
        e.to_string(),
        format!("inode {small}: xattr block {xb}: checksum mismatch")
    );
    let e = d.flip(xb * BLOCK + 5, 0x40, |p| {
        img_of(p).xattrs(small).unwrap_err()
    });
    assert_eq!(
        e.to_string(),
        format!("inode {small}: xattr block {xb}: bad header")
    );

    assert!(exercise_path(d.path()).unwrap().is_empty(), "restored");
}

/// Blocks holding metadata: inode table blocks, tree nodes (roots of trees of height 2 or
/// more), directory blocks, xattr blocks.
fn metadata_blocks(img: &V1Image) -> Vec<u64> {
    let mut out = Vec::new();
    let slots = img.info().itab_slots;
    for i in 0..slots / INODES_PER_BLOCK {
        out.extend(img.block_of("t", img.itab, i).unwrap());
    }
    for ino in 1..slots {
        let Some(rec) = img.inode(ino).unwrap() else {
            continue;
        };
        let tree = img.tree("t", rec.tree).unwrap();
        if tree.height >= 2 {
            out.push(tree.root);
        }
        if rec.kind == V1Kind::Dir && tree.height > 0 {
            let end = rec.dir_entries_end.div_ceil(BLOCK);
            img.walk("t", tree, 0, end, &mut |_, _, b| {
                out.extend(b);
                Ok(())
            })
            .unwrap();
        }
        if rec.xattr_block != 0 {
            out.push(rec.xattr_block);
        }
    }
    out
}

#[test]
fn v1_random_damage_never_panics_or_hangs() {
    let d = Damage::new();
    let (used, meta) = {
        let img = open_retrying(d.path()).unwrap();
        let i = img.info();
        (i.total_blocks - i.free_blocks, metadata_blocks(&img))
    };
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rng = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // One random bit at a time: mostly in metadata blocks, the rest anywhere in the first
    // blocks, where the allocator put nearly everything.
    let mut noticed = 0;
    for i in 0..400 {
        let off = if i % 4 == 0 {
            rng() % ((used + 64) * BLOCK)
        } else {
            meta[(rng() % meta.len() as u64) as usize] * BLOCK + rng() % BLOCK
        };
        let bit = 1u8 << (rng() % 8);
        let r = d.flip(off, bit, exercise_path);
        if r.is_err() || r.is_ok_and(|e| !e.is_empty()) {
            noticed += 1;
        }
    }
    assert!(noticed > 40, "only {noticed} of 400 flips were noticed");
    assert!(exercise_path(d.path()).unwrap().is_empty(), "restored");
}
