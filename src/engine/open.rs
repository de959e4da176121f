//! Creating and opening images, and recovery (see "Recovery" in `docs/design/transactions.md`).
//!
//! Opening reads both superblock slots with `pread` before mapping anything, takes the newest
//! valid one, and trusts it only if every block its commit list names holds the listed CRC;
//! otherwise the other slot, which is complete, is the state. Then the file's length is matched
//! to the state, and a state that was not cleanly unmounted has its orphans freed. None of this
//! depends on the number of files or the size of the image.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::alloc::Space;
use super::inode::ItabState;
use super::txn::TxnManager;
use super::{Engine, LOCK_STRIPES, block_off, now, set_all_times_now};
use crate::error::{Error, Result};
use crate::format::*;
use crate::image::{self, Image, VolatileTable, VolatileWords};

/// Why an image could not be opened: each variant is one clear line for the user.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0}: not an mmapfs image (bad magic)")]
    BadMagic(String),
    #[error(
        "{0}: image format version 1; convert it with `mmapfs upgrade {0}` (this build reads version {FORMAT_VERSION})"
    )]
    NeedsUpgrade(String),
    #[error("{0}: unsupported format version {1} (this build reads version {FORMAT_VERSION})")]
    BadVersion(String, u32),
    #[error("{0}: the image uses features this build does not know (incompatible flags {1:#x})")]
    Features(String, u32),
    #[error("{0}: image is corrupted: {1}")]
    Corrupt(String, String),
    #[error("{0}: image is already in use (mounted by another process)")]
    Busy(String),
}

/// How `open` treats the image.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OpenMode {
    /// Mount: lock exclusively, recover, allow changes.
    Mount,
    /// Read only (fsck, info, `mount -o ro`): lock exclusively, change nothing; the file is
    /// opened and mapped read-only.
    Inspect,
}

/// What opening found and did.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// Slot and transaction of the state in use.
    pub slot: u64,
    pub txn: u64,
    /// The superblock state of that state (clean, mounted, errors).
    pub state: u32,
    /// Why the newest superblock was not used, if it was not.
    pub rolled_back: Option<String>,
    /// A problem with the other slot worth telling (damaged, unreadable).
    pub other_slot: Option<String>,
    /// Orphans found (freed once the mount is live, or by `fsck --repair`).
    pub orphans: u64,
    /// The file's length was changed to match the state: (old, new) in bytes.
    pub resized: Option<(u64, u64)>,
}

impl Recovery {
    /// Whether the state needs the recovery a mount performs (it was not cleanly unmounted,
    /// or the newest commit was incomplete).
    pub fn needed(&self) -> bool {
        self.state != STATE_CLEAN || self.rolled_back.is_some()
    }
}

/// How long `open` waits for the image lock: `fusermount3 -u` returns before the daemon has
/// flushed and exited, so a remount right after an unmount must wait for it briefly.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

fn lock_with_grace(file: &File) -> io::Result<bool> {
    let deadline = std::time::Instant::now() + LOCK_GRACE;
    loop {
        if image::try_lock_exclusive(file)? {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

const CHECKSUM_MISMATCH: &str = "checksum mismatch";

/// A superblock slot as read: valid, or why not.
enum Slot {
    Valid(Box<Superblock>),
    Invalid(SlotProblem),
}

enum SlotProblem {
    Unreadable,
    BadMagic,
    Version(u32),
    Features(u32),
    Damaged(String),
}

fn read_slot(file: &File, slot: u64) -> Slot {
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    if file.read_exact_at(&mut buf, block_off(slot)).is_err() {
        return Slot::Invalid(SlotProblem::Unreadable);
    }
    parse_slot(&buf)
}

fn parse_slot(buf: &[u8]) -> Slot {
    let Ok(sb) = Superblock::read_from_bytes(buf) else {
        return Slot::Invalid(SlotProblem::Unreadable);
    };
    if sb.magic != MAGIC {
        return Slot::Invalid(SlotProblem::BadMagic);
    }
    if sb.version.get() != FORMAT_VERSION {
        return Slot::Invalid(SlotProblem::Version(sb.version.get()));
    }
    if !sb.checksum_ok() {
        return Slot::Invalid(SlotProblem::Damaged(CHECKSUM_MISMATCH.into()));
    }
    if sb.incompat.get() & !INCOMPAT_SUPPORTED != 0 {
        return Slot::Invalid(SlotProblem::Features(sb.incompat.get()));
    }
    if sb.ro_compat.get() & !RO_COMPAT_SUPPORTED != 0 {
        return Slot::Invalid(SlotProblem::Features(sb.ro_compat.get()));
    }
    match sanity(&sb) {
        Ok(()) => Slot::Valid(Box::new(sb)),
        Err(what) => Slot::Invalid(SlotProblem::Damaged(what)),
    }
}

/// Checks a checksummed superblock's fields against each other.
fn sanity(sb: &Superblock) -> std::result::Result<(), String> {
    if u64::from(sb.block_size.get()) != BLOCK_SIZE {
        return Err(format!("block size {} unsupported", sb.block_size));
    }
    if ![STATE_CLEAN, STATE_MOUNTED, STATE_ERRORS].contains(&sb.state.get()) {
        return Err(format!("state {} unknown", sb.state));
    }
    let total = sb.total_blocks.get();
    if !(8..MAX_BLOCKS).contains(&total) {
        return Err(format!("total blocks {total} out of range"));
    }
    if sb.free_blocks.get() > total {
        return Err(format!(
            "free block count {} > total {total}",
            sb.free_blocks
        ));
    }
    for (what, packed) in [
        ("inode table", sb.itab_tree.get()),
        ("space map", sb.space_tree.get()),
    ] {
        let (root, height) = unpack_tree(packed);
        if root < 2 || root >= total || height == 0 || height > TREE_MAX_HEIGHT {
            return Err(format!("{what} root {root} height {height} invalid"));
        }
    }
    let slots = sb.itab_slots.get();
    if slots < INODES_PER_BLOCK
        || !slots.is_multiple_of(INODES_PER_BLOCK)
        || slots / INODES_PER_BLOCK > total
    {
        return Err(format!("inode table size {slots} invalid"));
    }
    if sb.list_len.get() as usize > COMMIT_LIST_MAX {
        return Err(format!("commit list length {}", sb.list_len));
    }
    Ok(())
}

impl SlotProblem {
    fn describe(&self, i: u64) -> String {
        match self {
            SlotProblem::Unreadable => format!("superblock {i} is unreadable"),
            SlotProblem::BadMagic => format!("superblock {i} is not one"),
            SlotProblem::Version(v) => format!("superblock {i} has format version {v}"),
            SlotProblem::Features(f) => format!("superblock {i} has unknown features {f:#x}"),
            SlotProblem::Damaged(w) => format!("superblock {i} is damaged: {w}"),
        }
    }
}

impl Engine {
    /// Check: what is wrong with the superblock slot the state is not in, as it is now in
    /// the image (the next commit writes that slot). A valid older commit there is fine, and
    /// so is a checksum mismatch: a power cut tears the superblock write of the commit it
    /// interrupts (the state then in use is the one before), and the next commit rewrites
    /// it. A slot whose checksum holds but whose fields do not was written wrong: damage.
    pub(super) fn other_slot_problem(&self) -> Option<String> {
        let other = 1 - self.txm.slot();
        let bytes = match self.img.bytes(block_off(other), BLOCK_SIZE as usize) {
            Ok(b) => b,
            Err(_) => return Some(SlotProblem::Unreadable.describe(other)),
        };
        match parse_slot(bytes) {
            Slot::Valid(_) => None,
            Slot::Invalid(SlotProblem::Damaged(why)) if why == CHECKSUM_MISMATCH => None,
            Slot::Invalid(p) => Some(p.describe(other)),
        }
    }
}

/// How a commit's list compares with the blocks on disk.
enum Verdict {
    Complete,
    /// Only data blocks differ: they may have been overwritten in place after a newer commit.
    DataDiffers(u64),
    /// A metadata block differs: the commit did not reach the disk whole.
    Torn(u64),
}

fn verify_list(file: &File, sb: &Superblock) -> Verdict {
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut data_differs = None;
    let mut entries: Vec<&ListEntry> = sb.listed().iter().collect();
    entries.sort_by_key(|e| e.block.get() & !LIST_DATA_FLAG);
    for e in entries {
        let raw = e.block.get();
        let block = raw & !LIST_DATA_FLAG;
        let read = block < MAX_BLOCKS && file.read_exact_at(&mut buf, block_off(block)).is_ok();
        if raw & LIST_DATA_FLAG != 0 {
            if !read || crc32c::crc32c(&buf) != e.crc.get() {
                data_differs.get_or_insert(block);
            }
            continue;
        }
        // A metadata block: the version this commit wrote (its checksum and its birth).
        let trailer = Trailer::read_from_bytes(&buf[TRAILER_OFFSET..]).ok();
        let ok = read
            && block_checksum(&buf) == e.crc.get()
            && trailer.is_some_and(|t| t.birth.get() == sb.txn.get());
        if !ok {
            return Verdict::Torn(block);
        }
    }
    match data_differs {
        Some(b) => Verdict::DataDiffers(b),
        None => Verdict::Complete,
    }
}

/// The state to use and what choosing it found.
struct Choice {
    sb: Superblock,
    slot: u64,
    /// Highest transaction number seen in either slot.
    max_txn: u64,
    /// Smallest image size either valid slot records: the file was at least this long once
    /// both were durable, so a shorter file was truncated, not caught in a growth.
    min_total: u64,
    rolled_back: Option<String>,
    other_slot: Option<String>,
}

fn choose_state(file: &File, p: &str) -> std::result::Result<Choice, OpenError> {
    let slots = [read_slot(file, 0), read_slot(file, 1)];
    let valid: Vec<(u64, &Superblock)> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Slot::Valid(sb) => Some((i as u64, sb.as_ref())),
            Slot::Invalid(_) => None,
        })
        .collect();
    // A slot written by a newer build with features this one does not know: the other slot
    // is older, and using it would let a commit overwrite the newer state.
    for s in &slots {
        if let Slot::Invalid(SlotProblem::Features(f)) = s {
            return Err(OpenError::Features(p.into(), *f));
        }
    }
    if valid.is_empty() {
        // Name the most telling problem.
        for s in &slots {
            match s {
                Slot::Invalid(SlotProblem::Version(1)) => {
                    return Err(OpenError::NeedsUpgrade(p.into()));
                }
                Slot::Invalid(SlotProblem::Version(v)) => {
                    return Err(OpenError::BadVersion(p.into(), *v));
                }
                Slot::Invalid(SlotProblem::Features(f)) => {
                    return Err(OpenError::Features(p.into(), *f));
                }
                _ => {}
            }
        }
        let damaged: Vec<String> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Slot::Invalid(SlotProblem::Damaged(w)) => Some(format!("superblock {i}: {w}")),
                _ => None,
            })
            .collect();
        if damaged.is_empty() {
            return Err(OpenError::BadMagic(p.into()));
        }
        return Err(OpenError::Corrupt(p.into(), damaged.join("; ")));
    }
    let max_txn = valid.iter().map(|(_, sb)| sb.txn.get()).max().unwrap_or(0);
    let min_total = valid
        .iter()
        .map(|(_, sb)| sb.total_blocks.get())
        .min()
        .unwrap_or(0);
    let mut order = valid.clone();
    order.sort_by_key(|(_, sb)| std::cmp::Reverse(sb.txn.get()));
    let describe = |i: usize| match &slots[i] {
        Slot::Valid(_) => None,
        Slot::Invalid(p) => Some(p.describe(i as u64)),
    };
    let (newest_slot, newest) = order[0];
    let other_slot = describe(1 - newest_slot as usize);
    match verify_list(file, newest) {
        Verdict::Complete => Ok(Choice {
            sb: newest.clone(),
            slot: newest_slot,
            max_txn,
            min_total,
            rolled_back: None,
            other_slot,
        }),
        verdict => match order.get(1) {
            Some(&(older_slot, older)) => {
                let block = match verdict {
                    Verdict::Torn(b) | Verdict::DataDiffers(b) => b,
                    Verdict::Complete => 0,
                };
                Ok(Choice {
                    sb: older.clone(),
                    slot: older_slot,
                    max_txn,
                    min_total,
                    rolled_back: Some(format!(
                        "the newest commit (transaction {}) did not reach the disk whole \
                         (block {block}); using transaction {}",
                        newest.txn, older.txn
                    )),
                    other_slot: None,
                })
            }
            // The other slot is gone. If only data blocks differ, this state was complete and
            // superseded (a newer slot was damaged later); metadata cannot have changed.
            None => match verdict {
                Verdict::DataDiffers(_) => Ok(Choice {
                    sb: newest.clone(),
                    slot: newest_slot,
                    max_txn,
                    min_total,
                    rolled_back: None,
                    other_slot,
                }),
                _ => Err(OpenError::Corrupt(
                    p.into(),
                    format!(
                        "the newest commit (transaction {}) is incomplete and {}",
                        newest.txn,
                        other_slot.unwrap_or_else(|| "the other superblock is unusable".into())
                    ),
                )),
            },
        },
    }
}

/// The superblock of the state a mount would use, read without taking the lock (for `info` of
/// a mounted image: the newest commit that reached the page cache, without waiting for more).
pub fn peek_superblock(path: &Path) -> std::result::Result<Superblock, OpenError> {
    let p = path.display().to_string();
    let file = File::open(path).map_err(|source| OpenError::Io {
        path: p.clone(),
        source,
    })?;
    Ok(choose_state(&file, &p)?.sb)
}

impl Engine {
    /// Formats `path` as a new image of `size` bytes, its root directory owned by root, 0755.
    pub fn mkfs(path: &Path, size: u64, force: bool) -> std::result::Result<(), OpenError> {
        Engine::mkfs_with(path, size, force, RootDir::default())
    }

    /// Formats `path` as a new image of `size` bytes with the given root directory. A file this
    /// call created is removed again if formatting fails; an existing one is checked for space
    /// before it is truncated.
    pub fn mkfs_with(
        path: &Path,
        size: u64,
        force: bool,
        root: RootDir,
    ) -> std::result::Result<(), OpenError> {
        let existed = path.exists();
        let r = Engine::format_file(path, size, force, root);
        if r.is_err() && !existed {
            std::fs::remove_file(path).ok();
        }
        r
    }

    fn format_file(
        path: &Path,
        size: u64,
        force: bool,
        root: RootDir,
    ) -> std::result::Result<(), OpenError> {
        let p = path.display().to_string();
        let io_err = |source| OpenError::Io {
            path: p.clone(),
            source,
        };
        if let Ok(md) = std::fs::metadata(path)
            && md.len() > 0
            && !force
        {
            return Err(io_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not empty (use --force to overwrite)",
            )));
        }
        let size = size / BLOCK_SIZE * BLOCK_SIZE;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        if !image::try_lock_exclusive(&file).map_err(io_err)? {
            return Err(OpenError::Busy(p));
        }
        // The space must be there before an existing file's contents are given up.
        let held = file.metadata().map_err(io_err)?.blocks() * 512;
        let free = crate::sys::host_free_bytes(&file).map_err(io_err)?;
        if size > free.saturating_add(held) {
            return Err(io_err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "{size} bytes do not fit on the host filesystem ({} bytes free)",
                    free.saturating_add(held)
                ),
            )));
        }
        file.set_len(0).map_err(io_err)?;
        let img = Image::map(file).map_err(io_err)?;
        img.grow(size).map_err(io_err)?;
        format(&img, size, root).map_err(|e| io_err(io::Error::other(e.to_string())))?;
        img.sync_all().map_err(io_err)?;
        Ok(())
    }

    /// Opens an image file, validating its superblocks before mapping it.
    pub fn open(path: &Path, mode: OpenMode) -> std::result::Result<Engine, OpenError> {
        let p = path.display().to_string();
        let io_err = |source| OpenError::Io {
            path: p.clone(),
            source,
        };
        // Inspection only reads: it works on an image the user may only read.
        let file = OpenOptions::new()
            .read(true)
            .write(mode == OpenMode::Mount)
            .open(path)
            .map_err(io_err)?;
        if !file.metadata().map_err(io_err)?.is_file() {
            return Err(io_err(io::Error::other("not a regular file")));
        }
        if !lock_with_grace(&file).map_err(io_err)? {
            return Err(OpenError::Busy(p));
        }
        let choice = choose_state(&file, &p)?;
        let sb = choice.sb.clone();
        let want_len = sb.total_blocks.get() * BLOCK_SIZE;
        let len = file.metadata().map_err(io_err)?.len();
        if len < choice.min_total * BLOCK_SIZE {
            return Err(OpenError::Corrupt(
                p,
                format!(
                    "the image needs at least {} bytes but the file holds {len} (truncated?)",
                    choice.min_total * BLOCK_SIZE
                ),
            ));
        }
        let mut resized = None;
        if mode == OpenMode::Mount && len > want_len {
            // A growth the state does not know about (not committed): nothing lives there.
            file.set_len(want_len).map_err(io_err)?;
            resized = Some((len, want_len));
        }
        let map_len = want_len.min(len) / BLOCK_SIZE * BLOCK_SIZE;
        let img = match mode {
            OpenMode::Mount => Image::map_prefix(file, map_len),
            OpenMode::Inspect => Image::map_read_only(file, map_len),
        }
        .map_err(io_err)?;
        if mode == OpenMode::Mount && map_len < want_len {
            // A committed growth whose new file length had not reached the disk: the space
            // was free, so zeros are right.
            img.grow(want_len).map_err(io_err)?;
            resized = Some((len, want_len));
        }
        if let Some((from, to)) = resized {
            log::warn!("{p}: file length {from} did not match the image ({to}); adjusted");
        }
        let vol = VolatileTable::new().map_err(io_err)?;
        // One bit per block of the largest image: 2^32 bits.
        let trusted = VolatileWords::new(27).map_err(io_err)?;
        let next_txn = choice.max_txn + 1;
        let engine = Engine {
            hash_seed: sb.hash_seed.get(),
            mode,
            itab_tree: AtomicU64::new(sb.itab_tree.get()),
            itab_slots: AtomicU64::new(sb.itab_slots.get()),
            itab: Mutex::new(ItabState::new(&sb)),
            space: Mutex::new(Space::new(&sb)),
            txm: TxnManager::new(sb.txn.get(), choice.slot, next_txn),
            misc: Mutex::new(sb.clone()),
            misc_dirty: Mutex::new(false),
            img,
            stripes: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            vol,
            trusted,
            dirty_data: Mutex::new(Default::default()),
            errors: AtomicBool::new(false),
            suspects: Mutex::new(Default::default()),
            any_suspects: AtomicBool::new(false),
            recovery: Recovery {
                slot: choice.slot,
                txn: sb.txn.get(),
                state: sb.state.get(),
                rolled_back: choice.rolled_back,
                other_slot: choice.other_slot,
                orphans: 0,
                resized,
            },
        };
        engine.after_open(&p)
    }

    fn after_open(mut self, p: &str) -> std::result::Result<Engine, OpenError> {
        let corrupt = |e: Error| OpenError::Corrupt(p.to_string(), e.to_string());
        // The root must be readable, or nothing is.
        let root = self.read_inode(ROOT_INO).map_err(corrupt)?;
        if !root.is_dir() {
            return Err(corrupt(Error::corrupt("root inode is not a directory")));
        }
        // A broken orphan list does not keep the image from opening: the files on it stay
        // allocated, and fsck --repair rebuilds the list from the records.
        self.recovery.orphans = match self.orphans() {
            Ok(orphans) => orphans.len() as u64,
            Err(e) => {
                log::warn!("{p}: {e}; run `mmapfs fsck --repair`");
                0
            }
        };
        if let Some(why) = &self.recovery.rolled_back {
            log::warn!("{p}: {why}");
        }
        if let Some(why) = &self.recovery.other_slot {
            log::warn!("{p}: {why}");
        }
        if self.mode != OpenMode::Mount {
            return Ok(self);
        }
        {
            let mut misc = self.misc.lock();
            misc.mount_count = (misc.mount_count.get() + 1).into();
            misc.last_mount_sec = now().0.into();
        }
        *self.misc_dirty.lock() = true;
        self.txm.initial_commit.store(true, Ordering::Release);
        // What the page cache holds of a killed daemon's last commit must reach the disk before
        // a new commit builds on it: the first commit writes everything back first.
        self.txm.sync_before_commit.store(true, Ordering::Release);
        if self.recovery.state == STATE_ERRORS {
            log::warn!("{p}: the image was marked as damaged; run `mmapfs fsck --repair`");
            self.errors.store(true, Ordering::Relaxed);
        }
        if self.recovery.orphans > 0 {
            // Unlinked and unreferenced: invisible. Freed once the mount is live (the committer
            // thread starts with it), so recovery does not wait for their blocks.
            log::warn!(
                "{p}: {} unlinked files were left open at a crash; freeing them",
                self.recovery.orphans
            );
        }
        Ok(self)
    }

    /// Frees every inode on the orphan list (files unlinked while open when the last mount
    /// ended without unmounting), and commits. Returns how many.
    pub fn free_orphans(&self) -> Result<u64> {
        let orphans = self.orphans()?;
        for &ino in &orphans {
            if self.kernel_refs(ino)? == 0 {
                self.free_orphan(ino)?;
            }
        }
        if !orphans.is_empty() {
            self.commit_now()?;
        }
        Ok(orphans.len() as u64)
    }

    /// Test hook: durability goes through a crash simulator from now on (see `image::sim`);
    /// with `shadow`, the simulated disk is mirrored to that file at every flush.
    pub fn attach_crash_sim(&mut self, shadow: Option<File>) -> io::Result<()> {
        let sim = image::sim::CrashSim::new(&self.img)?;
        if let Some(f) = shadow {
            sim.mirror_to(f)?;
        }
        self.img.attach_sim(sim);
        Ok(())
    }

    /// Frees an inode that was unlinked while open (recovery, unmount).
    pub fn free_orphan(&self, ino: u64) -> Result<()> {
        let tx = self.begin_delete(64)?;
        let _g = self.lock_write(ino);
        let mut rec = match self.read_inode(ino) {
            Ok(r) => r,
            // Freed meanwhile (by the committer thread or an unmount).
            Err(Error::NotFound) => return Ok(()),
            Err(e) => return Err(e),
        };
        if rec.flags.get() & INODE_FLAG_ORPHAN == 0 {
            return Ok(());
        }
        if rec.nlink.get() != 0 {
            return Err(self.corrupt(format!("orphan {ino} has {} links", rec.nlink)));
        }
        self.free_inode(&tx, ino, &mut rec)
    }
}

/// Writes a fresh image's blocks. Layout: 0 and 1 superblock slots, 2 the space-map root,
/// 3 the bitmap of group 0, 4 the inode-table root, 5 its first leaf, then (large images) the
/// other space-map nodes; every other group's bitmap is its own first block.
/// Owner and permissions of a new image's root directory.
#[derive(Clone, Copy, Debug)]
pub struct RootDir {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits (at most 0o7777).
    pub mode: u32,
}

impl Default for RootDir {
    fn default() -> RootDir {
        RootDir {
            uid: 0,
            gid: 0,
            mode: 0o755,
        }
    }
}

fn format(img: &Image, size: u64, root: RootDir) -> Result<()> {
    const TXN: u64 = 1;
    let total = size / BLOCK_SIZE;
    let groups = total.div_ceil(GROUP_BLOCKS);
    let mut seed = [0u8; 24];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(Error::Io)?;
    let write_block = |block: u64, payload: &[u8], kind: BlockKind, level: u32| -> Result<()> {
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        buf[..payload.len()].copy_from_slice(payload);
        let t = Trailer {
            birth: TXN.into(),
            kind: kind as u8,
            level: level as u8,
            set_bits: if kind == BlockKind::Bitmap {
                bitmap_set_bits(&buf[..PAYLOAD_SIZE as usize])
            } else {
                0
            }
            .into(),
            checksum: 0.into(),
        };
        buf[TRAILER_OFFSET..].copy_from_slice(t.as_bytes());
        let crc = block_checksum(&buf);
        buf[TRAILER_CHECKSUM_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        img.write(block_off(block), &buf)?;
        Ok(())
    };
    let pointers =
        |blocks: &[u64]| -> Vec<u8> { blocks.iter().flat_map(|b| b.to_le_bytes()).collect() };
    // The space map: a tree whose block `g` is group `g`'s bitmap, built bottom-up. Nodes
    // other than the root take blocks 6.. of group 0.
    let bitmaps: Vec<u64> = (0..groups)
        .map(|g| if g == 0 { 3 } else { g * GROUP_BLOCKS })
        .collect();
    let mut next_node = 6;
    let mut level_blocks = bitmaps.clone();
    let mut level = 0;
    let space_root = loop {
        let chunks: Vec<&[u64]> = level_blocks.chunks(TREE_FANOUT as usize).collect();
        if chunks.len() == 1 {
            write_block(2, &pointers(chunks[0]), BlockKind::Node, level)?;
            break pack_tree(2, level + 1);
        }
        let mut parents = Vec::new();
        for chunk in chunks {
            write_block(next_node, &pointers(chunk), BlockKind::Node, level)?;
            parents.push(next_node);
            next_node += 1;
        }
        level_blocks = parents;
        level += 1;
    };
    if next_node > GROUP_BLOCKS.min(total) {
        return Err(Error::corrupt("image too large for its first group"));
    }
    let mut bitmap = vec![0u8; PAYLOAD_SIZE as usize];
    for b in (0..6).chain(6..next_node) {
        bitmap[(b / 8) as usize] |= 1 << (b % 8);
    }
    write_block(3, &bitmap, BlockKind::Bitmap, 0)?;
    let mut own_first = vec![0u8; PAYLOAD_SIZE as usize];
    own_first[0] = 1;
    for &bm in &bitmaps[1..] {
        write_block(bm, &own_first, BlockKind::Bitmap, 0)?;
    }
    write_block(4, &5u64.to_le_bytes(), BlockKind::Node, 0)?;
    let mut leaf = vec![0u8; PAYLOAD_SIZE as usize];
    for ino in 0..INODES_PER_BLOCK {
        let mut rec = Inode::new_zeroed();
        if ino == ROOT_INO {
            rec.mode = (libc::S_IFDIR | (root.mode & 0o7777)).into();
            rec.uid = root.uid.into();
            rec.gid = root.gid.into();
            rec.nlink = 2.into();
            rec.parent = ROOT_INO.into();
            set_all_times_now(&mut rec);
        } else if ino > ROOT_INO && ino + 1 < INODES_PER_BLOCK {
            rec.next_free = (ino + 1).into();
        }
        rec.seal();
        let at = (ino * INODE_SIZE) as usize;
        leaf[at..at + INODE_SIZE as usize].copy_from_slice(rec.as_bytes());
    }
    write_block(5, &leaf, BlockKind::InodeTable, 0)?;
    let used = next_node + (groups - 1);
    let mut sb = Superblock::new_zeroed();
    sb.magic = MAGIC;
    sb.version = FORMAT_VERSION.into();
    sb.block_size = (BLOCK_SIZE as u32).into();
    sb.state = STATE_CLEAN.into();
    sb.uuid.copy_from_slice(&seed[8..24]);
    sb.hash_seed = u64::from_le_bytes(seed[..8].try_into().unwrap_or_default()).into();
    sb.created_sec = now().0.into();
    sb.total_blocks = total.into();
    sb.free_blocks = (total - used).into();
    sb.used_inodes = 1.into();
    sb.itab_slots = INODES_PER_BLOCK.into();
    sb.itab_tree = pack_tree(4, 1).into();
    sb.space_tree = space_root.into();
    sb.free_inode_head = 2.into();
    sb.next_generation = 1.into();
    sb.alloc_cursor = next_node.into();
    // Both slots hold the fresh state; slot 0 is the newer.
    for (slot, txn) in [(0, TXN), (1, TXN - 1)] {
        sb.txn = txn.into();
        sb.commit_sec = sb.created_sec;
        sb.seal();
        img.write(block_off(slot), sb.as_bytes())?;
    }
    Ok(())
}
