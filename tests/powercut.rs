//! Power cuts, simulated (the failure model of `docs/design/transactions.md`): the engine runs
//! over the crash simulator (`mmapfs::image::sim`), a seeded workload runs against it and
//! against a model, and at many moments (between operations, and inside every flush) crash
//! images are taken: the durable state plus a random subset of the pages written since, each in
//! one of its versions, some torn. Every image is recovered (opened as a mount does) and must:
//! - open (recovery never refuses it) and pass fsck;
//! - hold exactly the namespace of a committed state: the last one, or, when the cut came
//!   inside a commit, the one being committed (names, types, hard links, sizes, link targets,
//!   extended attributes, some of them large enough to be stored in chunks);
//! - show in every file only bytes that file was given at that offset since its last truncate
//!   there, or zeros;
//! - hold every file byte for byte as its last fsync left it, if unchanged since;
//! - read without an error anywhere, and stay usable.
//!
//! Seeds are printed; `MMAPFS_SEED=N` replays one, `MMAPFS_POWERCUT_SEEDS=K` runs K seeds
//! (the soak script runs many).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mmapfs::engine::{Engine, OpenMode, check};
use mmapfs::format::ROOT_INO;
use mmapfs::fs::{
    Changer, Ctx, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE, FileKind, Fs, RenameFlags, SetAttr,
};
use mmapfs::image;

const CTX: Ctx = Ctx {
    uid: 0,
    gid: 0,
    umask: 0,
};
/// Word size of the data pattern: every 8-byte word says whose it is, where, and which write.
const WORD: u64 = 8;
/// Tree-level boundaries of a file: 510 blocks (the first node full) and 510^2 blocks.
const LEVEL1_BYTES: u64 = 510 * 4096;
const LEVEL2_BYTES: u64 = 510 * 510 * 4096;

// ----- randomness ---------------------------------------------------------------------------

/// splitmix64: deterministic across crate versions, so a printed seed replays the same run.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        (!v.is_empty()).then(|| &v[self.below(v.len() as u64) as usize])
    }
}

fn seeds(test: &str, default: usize) -> Vec<u64> {
    if let Some(s) = std::env::var("MMAPFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![s];
    }
    let n = std::env::var("MMAPFS_POWERCUT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let v: Vec<u64> = (0..n as u64)
        .map(|i| base.wrapping_add(i.wrapping_mul(0x9E37_79B9)))
        .collect();
    eprintln!("{test}: seeds {v:?} (replay one with MMAPFS_SEED=N)");
    v
}

// ----- the model ----------------------------------------------------------------------------

type Fid = u64;

#[derive(Clone, PartialEq, Eq)]
enum Node {
    File(Fid),
    Dir,
    Symlink(Vec<u8>),
}

/// A file's contents: nonzero words by index, each naming the write (version) that put it.
#[derive(Clone, Default, Debug)]
struct FileModel {
    size: u64,
    words: Arc<BTreeMap<u64, u32>>,
    /// Extended attributes: name number -> (operation that set it, value length).
    xattrs: BTreeMap<u8, (usize, u32)>,
}

/// Name and value of an attribute the workload sets (values up to the 64 KiB maximum, so an
/// inode's attributes take the chunked form).
fn xattr_name(n: u8) -> Vec<u8> {
    format!("user.attr-{n}").into_bytes()
}

fn xattr_value(fid: Fid, n: u8, op: usize, len: u32) -> Vec<u8> {
    let seed = (fid as usize) * 31 + usize::from(n) * 7 + op * 13;
    (0..len as usize)
        .map(|i| ((seed + i) % 251) as u8)
        .collect()
}

#[derive(Clone, Default)]
struct State {
    names: BTreeMap<String, Node>,
    files: BTreeMap<Fid, FileModel>,
    /// Operations applied.
    op: usize,
}

impl State {
    fn dirs(&self) -> Vec<String> {
        let mut v = vec![String::new()];
        v.extend(
            self.names
                .iter()
                .filter(|(_, n)| **n == Node::Dir)
                .map(|(p, _)| p.clone()),
        );
        v
    }
    fn files(&self) -> Vec<(String, Fid)> {
        self.names
            .iter()
            .filter_map(|(p, n)| match n {
                Node::File(f) => Some((p.clone(), *f)),
                _ => None,
            })
            .collect()
    }
    fn children(&self, dir: &str) -> Vec<String> {
        self.names
            .keys()
            .filter(|p| parent_of(p) == dir)
            .cloned()
            .collect()
    }
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// The 8-byte word a write puts at word index `idx` of file `fid`: never zero, and it tells
/// where it belongs.
fn word(fid: Fid, version: u32, idx: u64) -> u64 {
    ((fid & 0xffff) << 48) | ((u64::from(version) & 0xffff) << 32) | (idx & 0xffff_ffff)
}

/// What happened to files' contents, to judge what a recovered file may show.
#[derive(Default)]
struct History {
    /// version -> (operation, file, first word, end word)
    writes: HashMap<u32, (usize, Fid, u64, u64)>,
    /// Truncates and punches: (operation, file, first word, end word); they end what earlier
    /// writes may show there.
    cuts: Vec<(usize, Fid, u64, u64)>,
    /// Files fsync'd and not changed since: operation and contents then.
    synced: Synced,
    /// Every fsync that returned: (operation, file, contents then).
    synced_log: Vec<(usize, Fid, FileModel)>,
    /// Every change of a file's contents: (operation, file).
    touch_log: Vec<(usize, Fid)>,
    next_version: u32,
}

/// Files whose contents an fsync made durable and nothing changed since.
type Synced = HashMap<Fid, (usize, FileModel)>;

impl History {
    /// Whether a recovered nonzero `w` at word `idx` of `fid` is legitimate for a state taken
    /// after operation `at`.
    fn allows(&self, fid: Fid, idx: u64, w: u64, at: usize) -> bool {
        if w >> 48 != fid & 0xffff || w & 0xffff_ffff != idx & 0xffff_ffff {
            return false;
        }
        let version = ((w >> 32) & 0xffff) as u32;
        let Some(&(op, f, lo, hi)) = self.writes.get(&version) else {
            return false;
        };
        let epoch = self
            .cuts
            .iter()
            .filter(|c| c.1 == fid && c.0 <= at && c.2 <= idx && idx < c.3)
            .map(|c| c.0)
            .max()
            .unwrap_or(0);
        f == fid && lo <= idx && idx < hi && op > epoch
    }
    fn touched(&mut self, fid: Fid, op: usize) {
        self.synced.remove(&fid);
        self.touch_log.push((op, fid));
    }

    /// What was fsync'd and unchanged as of a crash image taken while operations `1..=started`
    /// had started and `1..=completed` had returned (operations are numbered from 1).
    fn synced_at(&self, started: usize, completed: usize) -> Synced {
        let mut out = Synced::new();
        for (j, fid, content) in &self.synced_log {
            if *j > completed {
                continue;
            }
            let changed = self
                .touch_log
                .iter()
                .any(|(w, f)| f == fid && *w > *j && *w <= started);
            if changed {
                out.remove(fid);
            } else {
                out.insert(*fid, (*j, content.clone()));
            }
        }
        out
    }
}

// ----- operations ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Create(String),
    Write {
        path: String,
        off: u64,
        len: u64,
        page_cache: bool,
    },
    Truncate(String, u64),
    Punch(String, u64, u64),
    Link(String, String),
    Unlink(String),
    Rename(String, String),
    Mkdir(String),
    Rmdir(String),
    Symlink(String, Vec<u8>),
    SetXattr(String, u8, u32),
    RemoveXattr(String, u8),
    Fsync(String, bool),
    FsyncDir(String),
    /// Keep a reference on a file, as an open file descriptor would (or drop one).
    Hold(String),
    Release,
}

/// The careful replace of an application: write a temporary file, fsync it, rename it over
/// the target (each step its own operation, so a cut between any two is judged exactly).
fn replace(target: &str, len: u64) -> Vec<Op> {
    let tmp = join(parent_of(target), "tmp-replace");
    vec![
        Op::Create(tmp.clone()),
        Op::Write {
            path: tmp.clone(),
            off: 0,
            len,
            page_cache: false,
        },
        Op::Fsync(tmp.clone(), false),
        Op::Rename(tmp, target.to_string()),
    ]
}

const NAMES: [&str; 6] = ["f0", "f1", "f2", "long-file-name-3", "f4", "f5"];
const DIRS: [&str; 3] = ["a", "b", "c"];

fn gen_ops(s: &State, rng: &mut Rng) -> Vec<Op> {
    let dirs = s.dirs();
    let files = s.files();
    let new_path = |rng: &mut Rng| {
        let d = rng.pick(&dirs).cloned().unwrap_or_default();
        join(&d, rng.pick(&NAMES).copied().unwrap_or("f0"))
    };
    loop {
        let op = match rng.below(100) {
            0..=11 => {
                let p = new_path(rng);
                (!s.names.contains_key(&p)).then_some(Op::Create(p))
            }
            12..=39 => rng.pick(&files).map(|(p, f)| {
                let size = s.files[f].size;
                let (off, len) = match rng.below(10) {
                    // Append across the first tree-level boundary.
                    0 => (
                        LEVEL1_BYTES - rng.below(64) * 4096,
                        4096 + rng.below(40) * 4096,
                    ),
                    // Far past the end: a sparse file crossing the second level.
                    1 => (LEVEL2_BYTES + rng.below(1 << 20) / WORD * WORD, 8 * 1024),
                    2..=4 => (size, 8 + rng.below(12_000)),
                    _ => (rng.below(size + 1), 8 + rng.below(20_000)),
                };
                Op::Write {
                    path: p.clone(),
                    off: off / WORD * WORD,
                    len: len.div_ceil(WORD) * WORD,
                    page_cache: rng.below(3) == 0,
                }
            }),
            40..=45 => rng.pick(&files).map(|(p, f)| {
                let size = s.files[f].size;
                Op::Truncate(p.clone(), rng.below(size + 9000) / WORD * WORD)
            }),
            46..=48 => rng.pick(&files).map(|(p, f)| {
                let size = s.files[f].size.max(1);
                let off = rng.below(size) / WORD * WORD;
                Op::Punch(p.clone(), off, 8 + rng.below(20_000) / WORD * WORD)
            }),
            49..=52 => rng.pick(&files).and_then(|(p, _)| {
                let q = new_path(rng);
                (!s.names.contains_key(&q)).then(|| Op::Link(p.clone(), q))
            }),
            53..=60 => {
                let removable: Vec<String> = s
                    .names
                    .iter()
                    .filter(|(_, n)| **n != Node::Dir)
                    .map(|(p, _)| p.clone())
                    .collect();
                rng.pick(&removable).map(|p| Op::Unlink(p.clone()))
            }
            61..=67 => {
                let movable: Vec<String> = s
                    .names
                    .iter()
                    .filter(|(_, n)| **n != Node::Dir)
                    .map(|(p, _)| p.clone())
                    .collect();
                rng.pick(&movable).and_then(|p| {
                    let q = new_path(rng);
                    let over_dir = s.names.get(&q) == Some(&Node::Dir);
                    (q != *p && !over_dir).then(|| Op::Rename(p.clone(), q))
                })
            }
            68..=71 => {
                if let Some((p, _)) = rng.pick(&files) {
                    return replace(p, 8 + rng.below(30_000) / WORD * WORD);
                }
                None
            }
            72..=74 => {
                let d = rng.pick(&DIRS).copied().unwrap_or("a");
                let p = match rng.below(3) {
                    0 => join(d, "sub"),
                    _ => d.to_string(),
                };
                let parent_ok =
                    parent_of(&p).is_empty() || s.names.get(parent_of(&p)) == Some(&Node::Dir);
                (parent_ok && !s.names.contains_key(&p)).then_some(Op::Mkdir(p))
            }
            75..=77 => {
                let empty: Vec<String> = s
                    .names
                    .iter()
                    .filter(|(p, n)| **n == Node::Dir && s.children(p).is_empty())
                    .map(|(p, _)| p.clone())
                    .collect();
                rng.pick(&empty).map(|p| Op::Rmdir(p.clone()))
            }
            78..=79 => {
                let p = new_path(rng);
                let max = if rng.below(4) == 0 { 4000 } else { 60 };
                let len = 1 + rng.below(max) as usize;
                let target: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                (!s.names.contains_key(&p)).then_some(Op::Symlink(p, target))
            }
            80..=82 => rng.pick(&files).map(|(p, f)| {
                let n = rng.below(6) as u8;
                if s.files[f].xattrs.contains_key(&n) && rng.below(3) == 0 {
                    Op::RemoveXattr(p.clone(), n)
                } else {
                    let len = match rng.below(3) {
                        0 => rng.below(200),
                        1 => 4000 + rng.below(12_000),
                        _ => 30_000 + rng.below(35_537),
                    };
                    Op::SetXattr(p.clone(), n, len as u32)
                }
            }),
            83..=92 => rng
                .pick(&files)
                .map(|(p, _)| Op::Fsync(p.clone(), rng.below(2) == 0)),
            93..=95 => rng.pick(&dirs).map(|d| Op::FsyncDir(d.clone())),
            96..=97 => rng.pick(&files).map(|(p, _)| Op::Hold(p.clone())),
            _ => Some(Op::Release),
        };
        if let Some(op) = op {
            return vec![op];
        }
    }
}

// ----- the world: the engine under test and its model ---------------------------------------

/// One workload: its model, and how it drives the filesystem inside its directory.
struct Actor {
    /// Directory the actor works in ("" = the root).
    prefix: String,
    state: State,
    history: History,
    next_fid: Fid,
    /// fid -> inode number in the live filesystem.
    inos: HashMap<Fid, u64>,
    /// References held on inodes (open files).
    held: Vec<u64>,
    rng: Rng,
    seed: u64,
    /// Every operation so far (printed when a check fails).
    log: Vec<Op>,
}

/// The single-threaded world: one actor, commits tracked exactly.
struct World {
    _dir: tempfile::TempDir,
    scratch: tempfile::TempDir,
    fs: Fs,
    actor: Actor,
    /// The newest state known durable (a commit finished after it).
    committed: State,
    /// Crash images taken inside flushes during the current operation.
    cut_images: Arc<Mutex<Vec<Vec<u8>>>>,
    checked: usize,
}

/// Where crash images are written for recovery: memory-backed when the machine has it.
fn scratch_dir() -> tempfile::TempDir {
    let builder = || {
        let mut b = tempfile::Builder::new();
        b.prefix("mmapfs-powercut-");
        b
    };
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = builder().tempdir_in(shm)
    {
        return d;
    }
    builder().tempdir().unwrap()
}

/// Where an image that failed a check is kept for inspection.
fn failure_dir() -> PathBuf {
    let d = std::env::temp_dir().join("mmapfs-powercut-failures");
    let _ = std::fs::create_dir_all(&d);
    d
}

impl World {
    fn new(seed: u64, hook_one_in: u64) -> World {
        let dir = tempfile::tempdir().unwrap();
        let scratch = scratch_dir();
        let cut_images: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let sink = cut_images.clone();
        let mut hook_rng = Rng(seed ^ 0x5eed);
        let fs = sim_fs(
            dir.path(),
            Box::new(move |img| {
                if hook_rng.below(hook_one_in) != 0 {
                    return;
                }
                if let Some(sim) = img.sim() {
                    let mut r = hook_rng.clone();
                    let image = sim.crash_image(img, &mut || r.next());
                    hook_rng.next();
                    sink.lock().unwrap().push(image);
                }
            }),
        );
        World {
            _dir: dir,
            scratch,
            fs,
            actor: Actor::new(String::new(), seed, 1),
            committed: State::default(),
            cut_images,
            checked: 0,
        }
    }
}

/// A filesystem over the crash simulator on a fresh 1 MiB image (it grows), no timed commits;
/// `hook` runs at the start of every flush.
fn sim_fs(dir: &Path, hook: image::sim::FlushHook) -> Fs {
    let path = dir.join("image");
    Engine::mkfs(&path, 1 << 20, false).unwrap();
    let mut engine = Engine::open(&path, OpenMode::Mount).unwrap();
    engine.attach_crash_sim(None).unwrap();
    // Commits happen where the test can see them: in operations, not on a timer.
    engine.set_commit_interval(Duration::from_secs(24 * 3600));
    let fs = Fs::new(engine);
    fs.engine()
        .image()
        .sim()
        .unwrap()
        .set_flush_hook(Some(hook));
    fs
}

impl Actor {
    fn new(prefix: String, seed: u64, first_fid: Fid) -> Actor {
        Actor {
            prefix,
            state: State::default(),
            history: History::default(),
            next_fid: first_fid,
            inos: HashMap::new(),
            held: Vec::new(),
            rng: Rng(seed),
            seed,
            log: Vec::new(),
        }
    }

    fn lookup(&self, fs: &Fs, path: &str) -> u64 {
        let full = join(&self.prefix, path);
        let mut ino = ROOT_INO;
        for part in full.split('/').filter(|p| !p.is_empty()) {
            ino = fs
                .lookup(ino, part.as_bytes())
                .unwrap_or_else(|e| panic!("seed {}: lookup {path}: {e}", self.seed))
                .ino;
            fs.forget(ino, 1).unwrap();
        }
        ino
    }

    fn split(&self, fs: &Fs, path: &str) -> (u64, String) {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        (self.lookup(fs, dir), name.to_string())
    }

    /// Drops the kernel reference an entry reply gave, unless told to keep it.
    fn drop_ref(&self, fs: &Fs, ino: u64) {
        fs.forget(ino, 1).unwrap();
    }

    fn write_words(&mut self, fid: Fid, off: u64, len: u64) -> (u32, Vec<u8>) {
        let version = self.history.next_version;
        self.history.next_version += 1;
        let first = off / WORD;
        let mut data = Vec::with_capacity(len as usize);
        for i in 0..len / WORD {
            data.extend_from_slice(&word(fid, version, first + i).to_le_bytes());
        }
        self.history
            .writes
            .insert(version, (self.state.op + 1, fid, first, first + len / WORD));
        (version, data)
    }

    fn model_write(&mut self, fid: Fid, off: u64, len: u64, version: u32) {
        let f = self.state.files.get_mut(&fid).unwrap();
        let words = Arc::make_mut(&mut f.words);
        for i in off / WORD..(off + len) / WORD {
            words.insert(i, version);
        }
        f.size = f.size.max(off + len);
        self.history.touched(fid, self.state.op + 1);
    }

    fn model_cut(&mut self, fid: Fid, from: u64, to: u64) {
        let f = self.state.files.get_mut(&fid).unwrap();
        let (lo, hi) = (from / WORD, to.div_ceil(WORD));
        let words = Arc::make_mut(&mut f.words);
        let doomed: Vec<u64> = words.range(lo..hi).map(|(k, _)| *k).collect();
        for k in doomed {
            words.remove(&k);
        }
        self.history.cuts.push((self.state.op + 1, fid, lo, hi));
        self.history.touched(fid, self.state.op + 1);
    }

    /// Runs one operation on the filesystem and the model. An fsync returns what it made
    /// durable (recorded once crash images taken inside it are judged).
    fn apply(&mut self, fs: &Fs, op: &Op) -> Option<(Fid, FileModel)> {
        let seed = self.seed;
        let fail =
            |what: &str, e: mmapfs::error::Error| -> ! { panic!("seed {seed}: {what}: {e}") };
        let by = Changer::privileged();
        match op {
            Op::Create(p) => {
                let (dir, name) = self.split(fs, p);
                let a = fs
                    .create(dir, name.as_bytes(), 0o644, CTX)
                    .unwrap_or_else(|e| fail("create", e));
                self.drop_ref(fs, a.ino);
                let fid = self.next_fid;
                self.next_fid += 1;
                self.inos.insert(fid, a.ino);
                self.state.names.insert(p.clone(), Node::File(fid));
                self.state.files.insert(fid, FileModel::default());
            }
            Op::Write {
                path,
                off,
                len,
                page_cache,
            } => {
                let Some(Node::File(fid)) = self.state.names.get(path).cloned() else {
                    unreachable!()
                };
                let (version, data) = self.write_words(fid, *off, *len);
                let ino = self.inos[&fid];
                let who = (!page_cache).then_some(&by);
                fs.write(ino, *off, &data, who)
                    .unwrap_or_else(|e| fail("write", e));
                self.model_write(fid, *off, *len, version);
            }
            Op::Truncate(p, size) => {
                let Some(Node::File(fid)) = self.state.names.get(p).cloned() else {
                    unreachable!()
                };
                let set = SetAttr {
                    size: Some(*size),
                    ..Default::default()
                };
                fs.setattr(self.inos[&fid], &set, &by)
                    .unwrap_or_else(|e| fail("truncate", e));
                let old = self.state.files[&fid].size;
                if *size < old {
                    self.model_cut(fid, *size, u64::MAX / 2);
                } else {
                    self.history.touched(fid, self.state.op + 1);
                }
                self.state.files.get_mut(&fid).unwrap().size = *size;
            }
            Op::Punch(p, off, len) => {
                let Some(Node::File(fid)) = self.state.names.get(p).cloned() else {
                    unreachable!()
                };
                fs.fallocate(
                    self.inos[&fid],
                    *off,
                    *len,
                    FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE,
                )
                .unwrap_or_else(|e| fail("punch", e));
                self.model_cut(fid, *off, off + len);
            }
            Op::Link(from, to) => {
                let Some(Node::File(fid)) = self.state.names.get(from).cloned() else {
                    unreachable!()
                };
                let (dir, name) = self.split(fs, to);
                let a = fs
                    .link(self.inos[&fid], dir, name.as_bytes())
                    .unwrap_or_else(|e| fail("link", e));
                self.drop_ref(fs, a.ino);
                self.state.names.insert(to.clone(), Node::File(fid));
            }
            Op::Unlink(p) => {
                let (dir, name) = self.split(fs, p);
                fs.unlink(dir, name.as_bytes())
                    .unwrap_or_else(|e| fail("unlink", e));
                self.state.names.remove(p);
                self.forget_unnamed();
            }
            Op::Rename(from, to) => {
                let (d1, n1) = self.split(fs, from);
                let (d2, n2) = self.split(fs, to);
                fs.rename(d1, n1.as_bytes(), d2, n2.as_bytes(), RenameFlags::default())
                    .unwrap_or_else(|e| fail("rename", e));
                // Two names of one file: POSIX says rename does nothing.
                if self.state.names.get(from) != self.state.names.get(to) {
                    let node = self.state.names.remove(from).unwrap();
                    self.state.names.insert(to.clone(), node);
                    self.forget_unnamed();
                }
            }
            Op::Mkdir(p) => {
                let (dir, name) = self.split(fs, p);
                let a = fs
                    .mkdir(dir, name.as_bytes(), 0o755, CTX)
                    .unwrap_or_else(|e| fail("mkdir", e));
                self.drop_ref(fs, a.ino);
                self.state.names.insert(p.clone(), Node::Dir);
            }
            Op::Rmdir(p) => {
                let (dir, name) = self.split(fs, p);
                fs.rmdir(dir, name.as_bytes())
                    .unwrap_or_else(|e| fail("rmdir", e));
                self.state.names.remove(p);
            }
            Op::Symlink(p, target) => {
                let (dir, name) = self.split(fs, p);
                let a = fs
                    .symlink(dir, name.as_bytes(), target, CTX)
                    .unwrap_or_else(|e| fail("symlink", e));
                self.drop_ref(fs, a.ino);
                self.state
                    .names
                    .insert(p.clone(), Node::Symlink(target.clone()));
            }
            Op::SetXattr(p, n, len) => {
                let Some(Node::File(fid)) = self.state.names.get(p).cloned() else {
                    unreachable!()
                };
                let at = self.state.op + 1;
                let value = xattr_value(fid, *n, at, *len);
                fs.setxattr(self.inos[&fid], &xattr_name(*n), &value, 0)
                    .unwrap_or_else(|e| fail("setxattr", e));
                let model = self.state.files.get_mut(&fid).unwrap();
                model.xattrs.insert(*n, (at, *len));
            }
            Op::RemoveXattr(p, n) => {
                let Some(Node::File(fid)) = self.state.names.get(p).cloned() else {
                    unreachable!()
                };
                fs.removexattr(self.inos[&fid], &xattr_name(*n))
                    .unwrap_or_else(|e| fail("removexattr", e));
                self.state.files.get_mut(&fid).unwrap().xattrs.remove(n);
            }
            Op::Fsync(p, datasync) => {
                let Some(Node::File(fid)) = self.state.names.get(p).cloned() else {
                    unreachable!()
                };
                fs.fsync(self.inos[&fid], *datasync)
                    .unwrap_or_else(|e| fail("fsync", e));
                return Some((fid, self.state.files[&fid].clone()));
            }
            Op::FsyncDir(d) => {
                let ino = self.lookup(fs, d);
                fs.fsync(ino, false).unwrap_or_else(|e| fail("fsyncdir", e));
            }
            Op::Hold(p) => {
                let ino = self.lookup(fs, p);
                fs.engine().add_kernel_refs(ino, 1).unwrap();
                self.held.push(ino);
            }
            Op::Release => {
                if let Some(ino) = self.held.pop() {
                    fs.forget(ino, 1).unwrap_or_else(|e| fail("forget", e));
                }
            }
        }
        None
    }

    /// Files whose last name went away are gone from the model (and their inode numbers may
    /// be reused).
    fn forget_unnamed(&mut self) {
        let named: std::collections::BTreeSet<Fid> =
            self.state.files().into_iter().map(|(_, f)| f).collect();
        let gone: Vec<Fid> = self
            .state
            .files
            .keys()
            .filter(|f| !named.contains(f))
            .copied()
            .collect();
        for fid in gone {
            self.state.files.remove(&fid);
            self.inos.remove(&fid);
        }
    }
}

impl World {
    /// Runs `op`; takes crash images inside its flushes and after it; checks them all.
    fn step(&mut self, op: &Op) {
        let before = self.actor.state.clone();
        let committed_before = self.committed.clone();
        let durable = self.fs.engine().durable_txn();
        let synced = self.actor.apply(&self.fs, op);
        self.actor.log.push(op.clone());
        self.actor.state.op += 1;
        if self.fs.engine().durable_txn() != durable {
            // Commits happen at the start of an operation (the first change of a mount) or
            // in an fsync, which changes nothing: either way they made `before` durable.
            self.committed = before.clone();
        }
        // A cut inside the operation: its commit (if any) may or may not have completed.
        let inside: Vec<Vec<u8>> = std::mem::take(&mut *self.cut_images.lock().unwrap());
        let candidates_inside = [committed_before, before];
        for image in inside {
            self.check(&image, &candidates_inside, op);
        }
        // The fsync has returned: from now on its data must survive.
        if let Some((fid, content)) = synced {
            let op = self.actor.state.op;
            self.actor
                .history
                .synced_log
                .push((op, fid, content.clone()));
            self.actor.history.synced.insert(fid, (op, content));
        }
        // A cut between operations: the last committed state.
        let sim = self.fs.engine().image().sim().unwrap();
        let img = self.fs.engine().image();
        let mut r = Rng(self.actor.rng.next());
        if self.actor.rng.below(3) == 0 {
            sim.kernel_writeback(img, &mut || r.next(), 4);
        }
        let image = sim.crash_image(img, &mut || r.next());
        let candidates = [self.committed.clone()];
        self.check(&image, &candidates, op);
    }

    /// Recovers `image` and judges it against `candidates` (any one may match).
    fn check(&mut self, image: &[u8], candidates: &[State], op: &Op) {
        self.checked += 1;
        let path = self
            .scratch
            .path()
            .join(format!("crash-{}.img", self.actor.seed));
        std::fs::write(&path, image).unwrap();
        let verdict = recover_and_compare(&path, candidates, &self.actor.history);
        if let Err(why) = verdict {
            let keep =
                failure_dir().join(format!("failed-{}-{}.img", self.actor.seed, self.checked));
            let _ = std::fs::copy(&path, &keep);
            let log: Vec<String> = self
                .actor
                .log
                .iter()
                .enumerate()
                .map(|(i, o)| format!("  {}: {o:?}", i + 1))
                .collect();
            let ops: Vec<usize> = candidates.iter().map(|c| c.op).collect();
            panic!(
                "seed {}: after operation {} ({op:?}), crash image {} (states after operations \
                 {ops:?} allowed): {why}\n(kept as {})\noperations:\n{}",
                self.actor.seed,
                self.actor.state.op,
                self.checked,
                keep.display(),
                log.join("\n")
            );
        }
        let _ = std::fs::remove_file(&path);
    }
}

// ----- recovery and comparison ---------------------------------------------------------------

/// What a recovered filesystem holds.
#[derive(Clone)]
enum Seen {
    File {
        ino: u64,
        size: u64,
        words: BTreeMap<u64, u64>,
        xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    },
    Dir,
    Symlink(Vec<u8>),
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::File {
                ino, size, words, ..
            } => {
                write!(f, "file {ino} of {size} bytes, {} data words", words.len())
            }
            Seen::Dir => write!(f, "directory"),
            Seen::Symlink(t) => write!(f, "symlink to {}", short(t)),
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Node::File(fid) => write!(f, "file #{fid}"),
            Node::Dir => write!(f, "directory"),
            Node::Symlink(t) => write!(f, "symlink to {}", short(t)),
        }
    }
}

/// A link target for messages: its length and first bytes.
fn short(t: &[u8]) -> String {
    format!(
        "{} bytes {:?}",
        t.len(),
        String::from_utf8_lossy(&t[..t.len().min(16)])
    )
}

fn walk(fs: &Fs, dir: u64, prefix: &str, out: &mut BTreeMap<String, Seen>) -> Result<(), String> {
    let mut entries: Vec<(Vec<u8>, u64)> = Vec::new();
    fs.readdir(dir, 0, false, &mut |e| {
        if e.name != b"." && e.name != b".." {
            entries.push((e.name.to_vec(), e.ino));
        }
        true
    })
    .map_err(|e| format!("readdir {prefix:?}: {e}"))?;
    for (name, _) in entries {
        let name = String::from_utf8_lossy(&name).into_owned();
        let path = join(prefix, &name);
        let attr = fs
            .lookup(dir, name.as_bytes())
            .map_err(|e| format!("lookup {path}: {e}"))?;
        let seen = match attr.kind {
            FileKind::Dir => {
                walk(fs, attr.ino, &path, out)?;
                Seen::Dir
            }
            FileKind::Symlink => Seen::Symlink(
                fs.readlink(attr.ino)
                    .map_err(|e| format!("readlink {path}: {e}"))?,
            ),
            FileKind::File => {
                let mut words = BTreeMap::new();
                let mut off = 0;
                while off < attr.size {
                    let data = match fs.lseek(attr.ino, off, libc::SEEK_DATA) {
                        Ok(d) => d,
                        Err(mmapfs::error::Error::NoData) => break,
                        Err(e) => return Err(format!("seek {path}: {e}")),
                    };
                    let hole = fs
                        .lseek(attr.ino, data, libc::SEEK_HOLE)
                        .map_err(|e| format!("seek {path}: {e}"))?;
                    let mut pos = data;
                    while pos < hole {
                        let n = (hole - pos).min(1 << 20) as u32;
                        let bytes = fs
                            .read(attr.ino, pos, n, |d| d.to_vec())
                            .map_err(|e| format!("read {path} at {pos}: {e}"))?;
                        if bytes.is_empty() {
                            break;
                        }
                        for (i, chunk) in bytes.chunks(WORD as usize).enumerate() {
                            let mut w = [0u8; 8];
                            w[..chunk.len()].copy_from_slice(chunk);
                            let w = u64::from_le_bytes(w);
                            if w != 0 {
                                words.insert((pos / WORD) + i as u64, w);
                            }
                        }
                        pos += bytes.len() as u64;
                    }
                    off = hole;
                }
                let mut xattrs = BTreeMap::new();
                let names = fs
                    .listxattr(attr.ino)
                    .map_err(|e| format!("listxattr {path}: {e}"))?;
                for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
                    let value = fs
                        .getxattr(attr.ino, name)
                        .map_err(|e| format!("getxattr {path}: {e}"))?;
                    xattrs.insert(name.to_vec(), value);
                }
                Seen::File {
                    ino: attr.ino,
                    size: attr.size,
                    words,
                    xattrs,
                }
            }
            other => return Err(format!("{path}: unexpected kind {other:?}")),
        };
        fs.forget(attr.ino, 1)
            .map_err(|e| format!("forget {path}: {e}"))?;
        out.insert(path, seen);
    }
    Ok(())
}

/// Whether what was recovered is `state` (namespace exact, contents legitimate).
fn compare(
    seen: &BTreeMap<String, Seen>,
    state: &State,
    h: &History,
    synced: &Synced,
) -> Result<(), String> {
    let names_seen: Vec<&String> = seen.keys().collect();
    let names_want: Vec<&String> = state.names.keys().collect();
    if names_seen != names_want {
        return Err(format!(
            "names {names_seen:?}, state after operation {} has {names_want:?}",
            state.op
        ));
    }
    let mut ino_of: HashMap<Fid, u64> = HashMap::new();
    for (path, want) in &state.names {
        match (want, &seen[path]) {
            (Node::Dir, Seen::Dir) => {}
            (Node::Symlink(t), Seen::Symlink(got)) if t == got => {}
            (
                Node::File(fid),
                Seen::File {
                    ino,
                    size,
                    words,
                    xattrs,
                },
            ) => {
                if *ino_of.entry(*fid).or_insert(*ino) != *ino {
                    return Err(format!(
                        "{path}: hard links to one file are different inodes"
                    ));
                }
                let model = &state.files[fid];
                // Attributes are metadata: exactly those of the state.
                let want: BTreeMap<Vec<u8>, Vec<u8>> = model
                    .xattrs
                    .iter()
                    .map(|(&n, &(at, len))| (xattr_name(n), xattr_value(*fid, n, at, len)))
                    .collect();
                if *xattrs != want {
                    let lens = |m: &BTreeMap<Vec<u8>, Vec<u8>>| -> Vec<(String, usize)> {
                        m.iter()
                            .map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), v.len()))
                            .collect()
                    };
                    return Err(format!(
                        "{path}: attributes {:?}, state after operation {} has {:?}",
                        lens(xattrs),
                        state.op,
                        lens(&want)
                    ));
                }
                if *size != model.size {
                    return Err(format!(
                        "{path}: size {size}, state after operation {} has {}",
                        state.op, model.size
                    ));
                }
                for (&idx, &w) in words {
                    if idx * WORD >= model.size || !h.allows(*fid, idx, w, state.op) {
                        return Err(format!(
                            "{path}: word {idx} (byte {}) holds {w:#018x}, never written there \
                             (state after operation {} has version {:?})",
                            idx * WORD,
                            state.op,
                            model.words.get(&idx)
                        ));
                    }
                }
            }
            (w, s) => return Err(format!("{path}: expected {w:?}, found {s:?}")),
        }
    }
    let inos: std::collections::BTreeSet<u64> = ino_of.values().copied().collect();
    if inos.len() != ino_of.len() {
        return Err("two files share an inode".into());
    }
    // fsync'd and unchanged since: byte for byte.
    for (fid, (at, content)) in synced {
        let Some((path, _)) = state.names.iter().find(|(_, n)| **n == Node::File(*fid)) else {
            continue;
        };
        let Seen::File { size, words, .. } = &seen[path] else {
            continue;
        };
        if *size != content.size {
            return Err(format!(
                "{path}: fsync'd at operation {at} with size {}, found {size}",
                content.size
            ));
        }
        for (&idx, &version) in content.words.iter() {
            if words.get(&idx) != Some(&word(*fid, version, idx)) {
                return Err(format!(
                    "{path}: fsync'd at operation {at}, word {idx} (byte {}) lost: {:?}",
                    idx * WORD,
                    words.get(&idx)
                ));
            }
        }
        if words.len() != content.words.len() {
            return Err(format!(
                "{path}: fsync'd at operation {at}, extra data found"
            ));
        }
    }
    Ok(())
}

/// Recovers a crash image as a mount would, requires fsck to be clean, and lists every path
/// with what it holds.
fn recover_and_walk(path: &Path) -> Result<(Fs, BTreeMap<String, Seen>), String> {
    let mut engine =
        Engine::open(path, OpenMode::Mount).map_err(|e| format!("recovery refused: {e}"))?;
    engine.set_commit_interval(Duration::from_secs(24 * 3600));
    engine.attach_crash_sim(None).map_err(|e| e.to_string())?;
    let report = check::run(&engine, check::Mode::Report).map_err(|e| format!("fsck: {e}"))?;
    if !report.problems.is_empty() {
        return Err(format!("fsck after recovery: {:?}", report.problems));
    }
    let fs = Fs::new(engine);
    let mut seen = BTreeMap::new();
    walk(&fs, ROOT_INO, "", &mut seen)?;
    Ok((fs, seen))
}

fn recover_and_compare(path: &Path, candidates: &[State], h: &History) -> Result<(), String> {
    let (fs, seen) = recover_and_walk(path)?;
    let mut why = Vec::new();
    for c in candidates {
        match compare(&seen, c, h, &h.synced) {
            Ok(()) => {
                // Still usable: a change commits and checks clean.
                let a = fs
                    .create(ROOT_INO, b"after-recovery", 0o644, CTX)
                    .map_err(|e| format!("create after recovery: {e}"))?;
                fs.write(a.ino, 0, b"after", None)
                    .and_then(|_| fs.fsync(a.ino, false))
                    .map_err(|e| format!("write after recovery: {e}"))?;
                let report = check::run(fs.engine(), check::Mode::Report)
                    .map_err(|e| format!("fsck after use: {e}"))?;
                if !report.problems.is_empty() {
                    return Err(format!(
                        "fsck after using the recovered image: {:?}",
                        report.problems
                    ));
                }
                return Ok(());
            }
            Err(e) => why.push(e),
        }
    }
    Err(why.join("\n   or: "))
}

// ----- the tests ------------------------------------------------------------------------------

fn run_world(seed: u64, ops: usize, hook_one_in: u64) -> usize {
    let mut w = World::new(seed, hook_one_in);
    let mut done = 0;
    while done < ops {
        for op in gen_ops(&w.actor.state, &mut w.actor.rng) {
            w.step(&op);
            done += 1;
        }
    }
    w.checked
}

/// A seeded mixed workload (creates, appends across tree levels, sparse writes, overwrites
/// through the page cache, truncates, holes, links, renames over targets, careful replaces,
/// mkdir/rmdir, symlinks, files held open and unlinked, fsync of files and directories, image
/// growth from 1 MiB), with power cuts between all operations and inside flushes.
#[test]
fn power_cuts_anywhere_keep_every_guarantee() {
    let mut checked = 0;
    let seeds = seeds("power_cuts_anywhere_keep_every_guarantee", 10);
    for &seed in &seeds {
        checked += run_world(seed, 70, 2);
    }
    eprintln!("{checked} crash images recovered and checked");
    assert!(checked >= 60 * seeds.len(), "only {checked} crash images");
}

/// The failure classes found in format version 1, each as a scripted run with a power cut at
/// every flush and after every operation.
#[test]
fn regressions_of_the_version_1_failure_classes() {
    let scripts: Vec<(&str, Vec<Op>)> = vec![
        (
            "an append past 2 MiB into a new tree node, fsync'd",
            vec![
                Op::Create("big".into()),
                Op::Write {
                    path: "big".into(),
                    off: 0,
                    len: 2_621_440,
                    page_cache: false,
                },
                Op::Fsync("big".into(), false),
                Op::Write {
                    path: "big".into(),
                    off: 2_621_440,
                    len: 4_718_592 - 2_621_440,
                    page_cache: false,
                },
                Op::Fsync("big".into(), true),
                Op::Write {
                    path: "big".into(),
                    off: LEVEL2_BYTES,
                    len: 8192,
                    page_cache: true,
                },
                Op::Fsync("big".into(), true),
            ],
        ),
        (
            "rename over an fsync'd target, and unlink",
            [
                Op::Create("target".into()),
                Op::Write {
                    path: "target".into(),
                    off: 0,
                    len: 40_000,
                    page_cache: false,
                },
                Op::Fsync("target".into(), false),
            ]
            .into_iter()
            .chain(replace("target", 30_000))
            .chain([
                Op::Create("other".into()),
                Op::Write {
                    path: "other".into(),
                    off: 0,
                    len: 9000,
                    page_cache: false,
                },
                Op::Fsync("other".into(), false),
                Op::Rename("other".into(), "target".into()),
                Op::Unlink("target".into()),
                Op::FsyncDir(String::new()),
            ])
            .collect(),
        ),
        (
            "creates, links and mkdir in flight; the first create in an empty directory",
            vec![
                Op::Mkdir("a".into()),
                Op::Create("a/f0".into()),
                Op::Link("a/f0".into(), "a/f1".into()),
                Op::Mkdir("a/sub".into()),
                Op::Create("a/sub/f2".into()),
                Op::Fsync("a/sub/f2".into(), false),
                Op::Unlink("a/sub/f2".into()),
                Op::Rmdir("a/sub".into()),
                Op::Create("b".into()),
                Op::Fsync("b".into(), false),
            ],
        ),
        (
            "the inode table and the image grow",
            (0..40)
                .flat_map(|i| {
                    let p = format!("n{i}");
                    [
                        Op::Create(p.clone()),
                        Op::Write {
                            path: p.clone(),
                            off: 0,
                            len: 120_000,
                            page_cache: i % 2 == 0,
                        },
                        Op::Fsync(p, i % 3 == 0),
                    ]
                })
                .collect(),
        ),
        (
            "a file held open, unlinked, then a cut",
            vec![
                Op::Create("open".into()),
                Op::Write {
                    path: "open".into(),
                    off: 0,
                    len: 200_000,
                    page_cache: false,
                },
                Op::Fsync("open".into(), false),
                Op::Hold("open".into()),
                Op::Unlink("open".into()),
                Op::FsyncDir(String::new()),
                Op::Release,
                Op::Create("after".into()),
                Op::Fsync("after".into(), false),
            ],
        ),
    ];
    let mut checked = 0;
    for (i, (what, ops)) in scripts.into_iter().enumerate() {
        let seed = 1000 + i as u64;
        let mut w = World::new(seed, 1);
        for op in &ops {
            w.step(op);
        }
        eprintln!("{what}: {} crash images", w.checked);
        checked += w.checked;
    }
    assert!(checked >= 100, "only {checked} crash images");
}

/// A crash image taken while two actors were at work: how far each had got.
struct Capture {
    image: Vec<u8>,
    /// Per actor: operations started, operations returned.
    progress: [(usize, usize); 2],
}

/// Two threads change the filesystem at once, each in its own directory, while crash images
/// are taken inside flushes (commits by either thread). A commit cuts each thread between two of
/// its operations, so every recovered directory must be exactly that thread's state after some
/// prefix of its operations (no later than what it had started), keep what it had fsync'd, and
/// pass fsck.
#[test]
fn power_cuts_with_two_threads_at_work() {
    let seeds = seeds("power_cuts_with_two_threads_at_work", 4);
    let mut checked = 0;
    for &seed in &seeds {
        checked += run_two_threads(seed, 80);
    }
    eprintln!("{checked} crash images of two threads recovered and checked");
    assert!(checked >= 10 * seeds.len(), "only {checked} crash images");
}

fn run_two_threads(seed: u64, ops: usize) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let scratch = scratch_dir();
    let progress: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
    let captures: Arc<Mutex<Vec<Capture>>> = Arc::default();
    let (sink, seen) = (captures.clone(), progress.clone());
    let mut hook_rng = Rng(seed ^ 0xc0ffee);
    let fs = sim_fs(
        dir.path(),
        Box::new(move |img| {
            let p = |i: usize| seen[i].load(Ordering::SeqCst);
            // Returned before the image (read first), started by the time it is taken (read
            // after): the image lies within these bounds.
            let returned = [p(1), p(3)];
            if let Some(sim) = img.sim() {
                let mut r = hook_rng.clone();
                let image = sim.crash_image(img, &mut || r.next());
                hook_rng.next();
                sink.lock().unwrap().push(Capture {
                    image,
                    progress: [(p(0), returned[0]), (p(2), returned[1])],
                });
            }
        }),
    );
    for d in ["t0", "t1"] {
        let a = fs.mkdir(ROOT_INO, d.as_bytes(), 0o755, CTX).unwrap();
        fs.forget(a.ino, 1).unwrap();
    }
    fs.fsync(ROOT_INO, false).unwrap();
    captures.lock().unwrap().clear();
    let mut actors = [
        Actor::new("t0".into(), seed ^ 1, 1),
        Actor::new("t1".into(), seed ^ 2, 0x8000),
    ];
    let mut states: [Vec<State>; 2] = [vec![State::default()], vec![State::default()]];
    std::thread::scope(|sc| {
        for (i, (actor, states)) in actors.iter_mut().zip(states.iter_mut()).enumerate() {
            let fs = &fs;
            let progress = &progress;
            sc.spawn(move || {
                let mut done = 0;
                while done < ops {
                    for op in gen_ops(&actor.state, &mut actor.rng) {
                        progress[2 * i].fetch_add(1, Ordering::SeqCst);
                        let synced = actor.apply(fs, &op);
                        actor.log.push(op.clone());
                        actor.state.op += 1;
                        if let Some((fid, content)) = synced {
                            let at = actor.state.op;
                            actor.history.synced_log.push((at, fid, content));
                        }
                        states.push(actor.state.clone());
                        progress[2 * i + 1].fetch_add(1, Ordering::SeqCst);
                        done += 1;
                    }
                }
            });
        }
    });
    // And a cut after both finished.
    {
        let sim = fs.engine().image().sim().unwrap();
        let mut r = Rng(seed ^ 0xfeed);
        let image = sim.crash_image(fs.engine().image(), &mut || r.next());
        let n = [states[0].len() - 1, states[1].len() - 1];
        captures.lock().unwrap().push(Capture {
            image,
            progress: [(n[0], n[0]), (n[1], n[1])],
        });
    }
    let captures = std::mem::take(&mut *captures.lock().unwrap());
    let count = captures.len();
    for (n, c) in captures.into_iter().enumerate() {
        let path = scratch.path().join("crash.img");
        std::fs::write(&path, &c.image).unwrap();
        if let Err(why) = judge_two(&path, &c, &actors, &states) {
            let keep = failure_dir().join(format!("failed-two-{seed}-{n}.img"));
            let _ = std::fs::copy(&path, &keep);
            let logs: Vec<String> = actors
                .iter()
                .map(|a| {
                    a.log
                        .iter()
                        .enumerate()
                        .map(|(i, o)| format!("  {}: {o:?}", i + 1))
                        .collect::<Vec<_>>()
                        .join("\n")
                })
                .collect();
            panic!(
                "seed {seed}: crash image {n} (progress {:?}): {why}\n(kept as {})\nt0:\n{}\nt1:\n{}",
                c.progress,
                keep.display(),
                logs[0],
                logs[1]
            );
        }
    }
    count
}

/// Recovers a two-thread crash image and judges each thread's directory.
fn judge_two(
    path: &Path,
    c: &Capture,
    actors: &[Actor; 2],
    states: &[Vec<State>; 2],
) -> Result<(), String> {
    let (_fs, seen) = recover_and_walk(path)?;
    let top: Vec<&String> = seen.keys().filter(|p| !p.contains('/')).collect();
    if top != ["t0", "t1"] {
        return Err(format!("top level holds {top:?}"));
    }
    for (i, actor) in actors.iter().enumerate() {
        let prefix = format!("{}/", actor.prefix);
        let sub: BTreeMap<String, Seen> = seen
            .iter()
            .filter_map(|(p, v)| Some((p.strip_prefix(&prefix)?.to_string(), v.clone())))
            .collect();
        let (started, completed) = c.progress[i];
        let synced = actor.history.synced_at(started, completed);
        let top_k = started.min(states[i].len() - 1);
        let mut last = String::new();
        let ok = (0..=top_k).rev().any(|k| {
            match compare(&sub, &states[i][k], &actor.history, &synced) {
                Ok(()) => true,
                Err(e) => {
                    if last.is_empty() {
                        last = format!("after operation {k}: {e}");
                    }
                    false
                }
            }
        });
        if !ok {
            return Err(format!(
                "{}: matches no state of its first {top_k} operations (nearest: {last})",
                actor.prefix
            ));
        }
    }
    Ok(())
}
