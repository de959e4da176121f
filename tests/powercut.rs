//! Power cuts, simulated (the failure model of `docs/design/transactions.md`): the engine runs
//! over the crash simulator (`mmapfs::image::sim`), a seeded workload runs against it and
//! against a model, and at many moments (between operations, and inside every flush) crash
//! images are taken: the durable state plus a random subset of the pages written since, each in
//! one of its versions, some torn. Every image is recovered (opened as a mount does) and must:
//! - open (recovery never refuses it) and pass fsck;
//! - hold exactly the namespace of a committed state: the last one, or, when the cut came
//!   inside a commit, the one being committed (names, types, hard links, sizes, link targets);
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

const CTX: Ctx = Ctx { uid: 0, gid: 0 };
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
    synced: HashMap<Fid, (usize, FileModel)>,
    next_version: u32,
}

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
    fn touched(&mut self, fid: Fid) {
        self.synced.remove(&fid);
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
            80..=92 => rng
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

struct World {
    _dir: tempfile::TempDir,
    scratch: tempfile::TempDir,
    fs: Fs,
    state: State,
    /// The newest state known durable (a commit finished after it).
    committed: State,
    history: History,
    next_fid: Fid,
    /// fid -> inode number in the live filesystem.
    inos: HashMap<Fid, u64>,
    /// References held on inodes (open files).
    held: Vec<u64>,
    rng: Rng,
    seed: u64,
    /// Crash images taken inside flushes during the current operation.
    cut_images: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Every operation so far (printed when a check fails).
    log: Vec<Op>,
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
        let path = dir.path().join("image");
        Engine::mkfs(&path, 1 << 20, false).unwrap();
        let mut engine = Engine::open(&path, OpenMode::Mount).unwrap();
        engine.attach_crash_sim(None).unwrap();
        // Commits happen where the test can see them: in operations, not on a timer.
        engine.set_commit_interval(Duration::from_secs(24 * 3600));
        let fs = Fs::new(engine);
        let cut_images: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let sink = cut_images.clone();
        let mut hook_rng = Rng(seed ^ 0x5eed);
        let sim = fs.engine().image().sim().unwrap();
        sim.set_flush_hook(Some(Box::new(move |img| {
            if hook_rng.below(hook_one_in) != 0 {
                return;
            }
            if let Some(sim) = img.sim() {
                let mut r = hook_rng.clone();
                let image = sim.crash_image(img, &mut || r.next());
                hook_rng.next();
                sink.lock().unwrap().push(image);
            }
        })));
        World {
            _dir: dir,
            scratch,
            fs,
            state: State::default(),
            committed: State::default(),
            history: History::default(),
            next_fid: 1,
            inos: HashMap::new(),
            held: Vec::new(),
            rng: Rng(seed),
            seed,
            cut_images,
            log: Vec::new(),
            checked: 0,
        }
    }

    fn lookup(&self, path: &str) -> u64 {
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = self
                .fs
                .lookup(ino, part.as_bytes())
                .unwrap_or_else(|e| panic!("seed {}: lookup {path}: {e}", self.seed))
                .ino;
            self.fs.forget(ino, 1).unwrap();
        }
        ino
    }

    fn split(&self, path: &str) -> (u64, String) {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        (self.lookup(dir), name.to_string())
    }

    /// Drops the kernel reference an entry reply gave, unless told to keep it.
    fn drop_ref(&self, ino: u64) {
        self.fs.forget(ino, 1).unwrap();
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
        self.history.touched(fid);
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
        self.history.touched(fid);
    }

    /// Runs one operation on the filesystem and the model. An fsync returns what it made
    /// durable (recorded once crash images taken inside it are judged).
    fn apply(&mut self, op: &Op) -> Option<(Fid, FileModel)> {
        let seed = self.seed;
        let fail =
            |what: &str, e: mmapfs::error::Error| -> ! { panic!("seed {seed}: {what}: {e}") };
        let by = Changer::privileged();
        match op {
            Op::Create(p) => {
                let (dir, name) = self.split(p);
                let a = self
                    .fs
                    .create(dir, name.as_bytes(), 0o644, CTX)
                    .unwrap_or_else(|e| fail("create", e));
                self.drop_ref(a.ino);
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
                self.fs
                    .write(ino, *off, &data, who)
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
                self.fs
                    .setattr(self.inos[&fid], &set, &by)
                    .unwrap_or_else(|e| fail("truncate", e));
                let old = self.state.files[&fid].size;
                if *size < old {
                    self.model_cut(fid, *size, u64::MAX / 2);
                } else {
                    self.history.touched(fid);
                }
                self.state.files.get_mut(&fid).unwrap().size = *size;
            }
            Op::Punch(p, off, len) => {
                let Some(Node::File(fid)) = self.state.names.get(p).cloned() else {
                    unreachable!()
                };
                self.fs
                    .fallocate(
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
                let (dir, name) = self.split(to);
                let a = self
                    .fs
                    .link(self.inos[&fid], dir, name.as_bytes())
                    .unwrap_or_else(|e| fail("link", e));
                self.drop_ref(a.ino);
                self.state.names.insert(to.clone(), Node::File(fid));
            }
            Op::Unlink(p) => {
                let (dir, name) = self.split(p);
                self.fs
                    .unlink(dir, name.as_bytes())
                    .unwrap_or_else(|e| fail("unlink", e));
                self.state.names.remove(p);
                self.forget_unnamed();
            }
            Op::Rename(from, to) => {
                let (d1, n1) = self.split(from);
                let (d2, n2) = self.split(to);
                self.fs
                    .rename(d1, n1.as_bytes(), d2, n2.as_bytes(), RenameFlags::default())
                    .unwrap_or_else(|e| fail("rename", e));
                // Two names of one file: POSIX says rename does nothing.
                if self.state.names.get(from) != self.state.names.get(to) {
                    let node = self.state.names.remove(from).unwrap();
                    self.state.names.insert(to.clone(), node);
                    self.forget_unnamed();
                }
            }
            Op::Mkdir(p) => {
                let (dir, name) = self.split(p);
                let a = self
                    .fs
                    .mkdir(dir, name.as_bytes(), 0o755, CTX)
                    .unwrap_or_else(|e| fail("mkdir", e));
                self.drop_ref(a.ino);
                self.state.names.insert(p.clone(), Node::Dir);
            }
            Op::Rmdir(p) => {
                let (dir, name) = self.split(p);
                self.fs
                    .rmdir(dir, name.as_bytes())
                    .unwrap_or_else(|e| fail("rmdir", e));
                self.state.names.remove(p);
            }
            Op::Symlink(p, target) => {
                let (dir, name) = self.split(p);
                let a = self
                    .fs
                    .symlink(dir, name.as_bytes(), target, CTX)
                    .unwrap_or_else(|e| fail("symlink", e));
                self.drop_ref(a.ino);
                self.state
                    .names
                    .insert(p.clone(), Node::Symlink(target.clone()));
            }
            Op::Fsync(p, datasync) => {
                let Some(Node::File(fid)) = self.state.names.get(p).cloned() else {
                    unreachable!()
                };
                self.fs
                    .fsync(self.inos[&fid], *datasync)
                    .unwrap_or_else(|e| fail("fsync", e));
                return Some((fid, self.state.files[&fid].clone()));
            }
            Op::FsyncDir(d) => {
                let ino = self.lookup(d);
                self.fs
                    .fsync(ino, false)
                    .unwrap_or_else(|e| fail("fsyncdir", e));
            }
            Op::Hold(p) => {
                let ino = self.lookup(p);
                self.fs.engine().add_kernel_refs(ino, 1).unwrap();
                self.held.push(ino);
            }
            Op::Release => {
                if let Some(ino) = self.held.pop() {
                    self.fs.forget(ino, 1).unwrap_or_else(|e| fail("forget", e));
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

    /// Runs `op`; takes crash images inside its flushes and after it; checks them all.
    fn step(&mut self, op: &Op) {
        let before = self.state.clone();
        let committed_before = self.committed.clone();
        let durable = self.fs.engine().durable_txn();
        let synced = self.apply(op);
        self.log.push(op.clone());
        self.state.op += 1;
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
            self.history.synced.insert(fid, (self.state.op, content));
        }
        // A cut between operations: the last committed state.
        let sim = self.fs.engine().image().sim().unwrap();
        let img = self.fs.engine().image();
        let mut r = Rng(self.rng.next());
        if self.rng.below(3) == 0 {
            sim.kernel_writeback(img, &mut || r.next(), 4);
        }
        let image = sim.crash_image(img, &mut || r.next());
        let candidates = [self.committed.clone()];
        self.check(&image, &candidates, op);
    }

    /// Recovers `image` and judges it against `candidates` (any one may match).
    fn check(&mut self, image: &[u8], candidates: &[State], op: &Op) {
        self.checked += 1;
        let path = self.scratch.path().join(format!("crash-{}.img", self.seed));
        std::fs::write(&path, image).unwrap();
        let verdict = recover_and_compare(&path, candidates, &self.history);
        if let Err(why) = verdict {
            let keep = failure_dir().join(format!("failed-{}-{}.img", self.seed, self.checked));
            let _ = std::fs::copy(&path, &keep);
            let log: Vec<String> = self
                .log
                .iter()
                .enumerate()
                .map(|(i, o)| format!("  {}: {o:?}", i + 1))
                .collect();
            let ops: Vec<usize> = candidates.iter().map(|c| c.op).collect();
            panic!(
                "seed {}: after operation {} ({op:?}), crash image {} (states after operations \
                 {ops:?} allowed): {why}\n(kept as {})\noperations:\n{}",
                self.seed,
                self.state.op,
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
enum Seen {
    File {
        ino: u64,
        size: u64,
        words: BTreeMap<u64, u64>,
    },
    Dir,
    Symlink(Vec<u8>),
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::File { ino, size, words } => {
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
                Seen::File {
                    ino: attr.ino,
                    size: attr.size,
                    words,
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
fn compare(seen: &BTreeMap<String, Seen>, state: &State, h: &History) -> Result<(), String> {
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
            (Node::File(fid), Seen::File { ino, size, words }) => {
                if *ino_of.entry(*fid).or_insert(*ino) != *ino {
                    return Err(format!(
                        "{path}: hard links to one file are different inodes"
                    ));
                }
                let model = &state.files[fid];
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
    for (fid, (at, content)) in &h.synced {
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

fn recover_and_compare(path: &Path, candidates: &[State], h: &History) -> Result<(), String> {
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
    let mut why = Vec::new();
    for c in candidates {
        match compare(&seen, c, h) {
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
        for op in gen_ops(&w.state, &mut w.rng) {
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
