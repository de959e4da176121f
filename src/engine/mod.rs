//! The storage engine: superblock, allocator, block trees, inode table, directories, xattrs,
//! consistency check. Everything it stores lives in the [`Image`]; its heap holds only bounded
//! bookkeeping (lock stripes, the set of ranges to flush on the next fsync).
//!
//! Locking (callers above follow it; the engine does not take inode locks itself):
//! - `meta` (a mutex around the in-memory superblock copy) serialises the allocator, the inode
//!   free list and superblock writes. It is a leaf lock: nothing else is taken while it is held.
//! - Inode `n` is read under `stripe(n).read()` and modified under `stripe(n).write()`; a
//!   directory's entries and index belong to the directory inode. Several stripes are taken in
//!   ascending stripe order ([`Engine::lock_many`]).
//! - The inode table's tree is only ever extended (under `meta`), with slots published through
//!   atomic stores, so inode records are located without any lock.

mod alloc;
pub mod check;
mod dir;
mod tree;
mod xattr;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::error::{Error, Result};
use crate::format::*;
use crate::image::{self, Image};

pub use dir::DirEntry;
pub use tree::Run;

/// Number of inode lock stripes (inode `n` uses stripe `n % LOCK_STRIPES`).
const LOCK_STRIPES: usize = 1024;
/// Beyond this many tracked ranges, fsync falls back to flushing the whole image: keeps the
/// daemon's heap bounded however many files are written between two fsyncs.
const MAX_TRACKED_RANGES: usize = 1 << 16;

/// Why an image could not be opened: each variant is one clear line for the user.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{0}: not an mmapfs image (bad magic)")]
    BadMagic(String),
    #[error("{0}: unsupported format version {1} (this build reads version {FORMAT_VERSION})")]
    BadVersion(String, u32),
    #[error("{0}: image is corrupted: {1}")]
    Corrupt(String, String),
    #[error("{0}: image is already in use (mounted by another process)")]
    Busy(String),
}

/// Ranges written since the last flush, as block numbers.
#[derive(Default)]
struct DirtySet {
    meta: std::collections::HashSet<u64>,
    data: HashMap<u64, Vec<(u64, u64)>>,
    data_ranges: usize,
    /// Inodes whose unflushed changes go beyond data and timestamps (allocation, size): even
    /// fdatasync must flush metadata for them.
    structural: std::collections::HashSet<u64>,
    overflow: bool,
}

pub struct Engine {
    img: Image,
    meta: Mutex<Superblock>,
    itab_tree: AtomicU64,
    itab_slots: AtomicU64,
    hash_seed: u64,
    /// Tags kernel reference counts with this mount, so stale counts need no reset scan.
    epoch: u64,
    stripes: Box<[RwLock<()>]>,
    dirty: Mutex<DirtySet>,
}

/// Guards over one or more inode stripes.
pub enum Locked<'a> {
    Read(RwLockReadGuard<'a, ()>),
    Write(Vec<RwLockWriteGuard<'a, ()>>),
}

/// Creation parameters of a new inode.
pub struct NewInode {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
}

pub fn now() -> (i64, u32) {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(_) => (0, 0),
    }
}

/// Sets a new inode's atime, mtime, ctime and birth time to now.
fn set_all_times_now(rec: &mut Inode) {
    let (s, ns) = now();
    for (sec, nsec) in [
        (&mut rec.atime_sec, &mut rec.atime_nsec),
        (&mut rec.mtime_sec, &mut rec.mtime_nsec),
        (&mut rec.ctime_sec, &mut rec.ctime_nsec),
        (&mut rec.btime_sec, &mut rec.btime_nsec),
    ] {
        *sec = s.into();
        *nsec = ns.into();
    }
}

fn block_off(block: u64) -> u64 {
    block * BLOCK_SIZE
}

/// Reads and validates the superblock with plain reads, before anything is mapped (LMDB-style).
/// Returns it with the file's length.
fn read_superblock(
    file: &mut File,
    path: &str,
) -> std::result::Result<(Superblock, u64), OpenError> {
    let io_err = |source| OpenError::Io {
        path: path.to_string(),
        source,
    };
    let len = file.metadata().map_err(io_err)?.len();
    let mut buf = [0u8; SUPERBLOCK_SIZE];
    if len < SUPERBLOCK_SIZE as u64 {
        return Err(OpenError::BadMagic(path.to_string()));
    }
    file.read_exact(&mut buf).map_err(io_err)?;
    let sb = Superblock::read_from_bytes(&buf).map_err(|_| OpenError::BadMagic(path.into()))?;
    if sb.magic != MAGIC {
        return Err(OpenError::BadMagic(path.to_string()));
    }
    if sb.version.get() != FORMAT_VERSION {
        return Err(OpenError::BadVersion(path.to_string(), sb.version.get()));
    }
    let corrupt = |what: String| OpenError::Corrupt(path.to_string(), what);
    if !sb.checksum_ok() {
        return Err(corrupt("superblock checksum mismatch".into()));
    }
    if u64::from(sb.block_size.get()) != BLOCK_SIZE {
        return Err(corrupt(format!("block size {} unsupported", sb.block_size)));
    }
    let total = sb.total_blocks.get();
    // A longer file is a growth that a crash interrupted after the host file grew and before
    // the superblock said so: nothing lives past `total` yet (see `Engine::open`).
    if total < 4
        || total
            .checked_mul(BLOCK_SIZE)
            .is_none_or(|bytes| bytes > len)
    {
        return Err(corrupt(format!(
            "superblock says {total} blocks but the file holds {len} bytes (truncated?)"
        )));
    }
    if sb.free_blocks.get() > total {
        return Err(corrupt(format!(
            "free block count {} > total",
            sb.free_blocks
        )));
    }
    let (root, height) = unpack_tree(sb.itab_tree.get());
    if root == 0 || root >= total || height == 0 || height > TREE_MAX_HEIGHT {
        return Err(corrupt(format!(
            "inode table root {root} height {height} invalid"
        )));
    }
    let slots = sb.itab_slots.get();
    if slots < 2 || slots % INODES_PER_BLOCK != 0 || slots / INODES_PER_BLOCK > total {
        return Err(corrupt(format!("inode table size {slots} invalid")));
    }
    Ok((sb, len))
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

/// How `open` treats the image.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Mount: lock exclusively, mark dirty; recover first if the last mount did not end cleanly.
    Mount,
    /// Read-only inspection (fsck, info): lock exclusively, change nothing.
    Inspect,
}

impl Engine {
    /// Formats `path` as a new image of `size` bytes.
    pub fn mkfs(path: &Path, size: u64, force: bool) -> std::result::Result<(), OpenError> {
        let p = path.display().to_string();
        let io_err = |source| OpenError::Io {
            path: p.clone(),
            source,
        };
        if let Ok(md) = std::fs::metadata(path)
            && md.len() > 0
            && !force
        {
            return Err(OpenError::Io {
                path: p.clone(),
                source: io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "exists and is not empty (use --force to overwrite)",
                ),
            });
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
        file.set_len(0).map_err(io_err)?;
        let img = Image::map(file).map_err(io_err)?;
        img.grow(size).map_err(io_err)?;
        Self::format(&img, size).map_err(|e| OpenError::Io {
            path: p.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        img.sync_all().map_err(io_err)?;
        Ok(())
    }

    fn format(img: &Image, size: u64) -> Result<()> {
        let total = size / BLOCK_SIZE;
        let (sec, _) = now();
        // Layout of a fresh image: 0 superblock, 1 bitmap of group 0, 2 inode-table tree node,
        // 3 first inode-table block, 4 root directory's first entries block is allocated lazily.
        let mut sb = Superblock::new_zeroed();
        sb.magic = MAGIC;
        sb.version = FORMAT_VERSION.into();
        sb.block_size = (BLOCK_SIZE as u32).into();
        sb.total_blocks = total.into();
        sb.state = STATE_CLEAN.into();
        sb.itab_tree = pack_tree(2, 1).into();
        sb.itab_slots = INODES_PER_BLOCK.into();
        sb.used_inodes = 1.into();
        sb.next_generation = 1.into();
        sb.alloc_cursor = 4.into();
        let seed = {
            let mut s = [0u8; 24];
            File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut s))
                .map_err(Error::Io)?;
            s
        };
        sb.hash_seed = u64::from_le_bytes(seed[..8].try_into().unwrap_or_default()).into();
        sb.uuid.copy_from_slice(&seed[8..24]);
        sb.created_sec = sec.into();
        // Group bitmaps: mark the fixed blocks used and everything past the end as used.
        let groups = total.div_ceil(GROUP_BLOCKS);
        let mut used = 0u64;
        for g in 0..groups {
            let bm = bitmap_block(g);
            img.zero(block_off(bm), BLOCK_SIZE as usize)?;
            let mut fixed = vec![bm];
            if g == 0 {
                fixed.extend([0, 2, 3]);
            }
            for b in fixed {
                alloc::set_bit(img, b, true)?;
                used += 1;
            }
        }
        sb.free_blocks = (total - used).into();
        // Inode table: node 2 points at block 3, which holds inodes 0..16.
        img.zero(block_off(2), BLOCK_SIZE as usize)?;
        img.store_u64(block_off(2), 3)?;
        img.zero(block_off(3), BLOCK_SIZE as usize)?;
        // Free list 2 -> 3 -> ... -> 15 (inode 0 is never used, 1 is the root).
        for ino in 2..INODES_PER_BLOCK {
            let mut rec = Inode::new_zeroed();
            rec.next_link = if ino + 1 < INODES_PER_BLOCK {
                ino + 1
            } else {
                0
            }
            .into();
            rec.seal();
            img.write(block_off(3) + ino * INODE_SIZE, rec.as_bytes())?;
        }
        let mut zero = Inode::new_zeroed();
        zero.seal();
        img.write(block_off(3), zero.as_bytes())?;
        sb.free_inode_head = 2.into();
        let mut root = Inode::new_zeroed();
        root.mode = (libc::S_IFDIR | 0o755).into();
        root.nlink = 2.into();
        root.parent = ROOT_INO.into();
        root.generation = 0.into();
        set_all_times_now(&mut root);
        root.seal();
        img.write(block_off(3) + ROOT_INO * INODE_SIZE, root.as_bytes())?;
        sb.seal();
        img.write(0, sb.as_bytes())?;
        Ok(())
    }

    /// Opens an image file, validating its superblock before mapping it.
    pub fn open(path: &Path, mode: OpenMode) -> std::result::Result<Engine, OpenError> {
        let p = path.display().to_string();
        let io_err = |source| OpenError::Io {
            path: p.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err)?;
        if !file.metadata().map_err(io_err)?.is_file() {
            return Err(io_err(io::Error::other("not a regular file")));
        }
        if !lock_with_grace(&file).map_err(io_err)? {
            return Err(OpenError::Busy(p));
        }
        let (sb, len) = read_superblock(&mut file, &p)?;
        let bytes = sb.total_blocks.get() * BLOCK_SIZE;
        if len > bytes && mode == OpenMode::Mount {
            // The allocator hands out blocks only below the superblock's count, and the count
            // is written after the host file grows: the tail is unused space from a growth
            // that a crash interrupted. Give it back so file and superblock agree again.
            log::warn!(
                "{p}: file is {} bytes longer than the image (growth interrupted); trimming",
                len - bytes
            );
            file.set_len(bytes).map_err(io_err)?;
        }
        // Inspection leaves a longer file as it is and sees only the image's own length.
        let img = Image::map_prefix(file, bytes).map_err(io_err)?;
        let mut engine = Engine {
            epoch: 0,
            itab_tree: AtomicU64::new(sb.itab_tree.get()),
            itab_slots: AtomicU64::new(sb.itab_slots.get()),
            hash_seed: sb.hash_seed.get(),
            meta: Mutex::new(sb),
            img,
            stripes: (0..LOCK_STRIPES).map(|_| RwLock::new(())).collect(),
            dirty: Mutex::new(DirtySet::default()),
        };
        if mode == OpenMode::Mount {
            let state = engine.meta.lock().state.get();
            if state != STATE_CLEAN {
                log::warn!("{p}: not cleanly unmounted; recovering");
                let report = check::run(&engine, check::Mode::Repair)
                    .map_err(|e| OpenError::Corrupt(p.clone(), e.to_string()))?;
                for line in &report.repaired {
                    log::warn!("recovery: {line}");
                }
                if !report.problems.is_empty() {
                    return Err(OpenError::Corrupt(p.clone(), report.problems.join("; ")));
                }
            }
            let (sec, _) = now();
            engine
                .update_sb(|sb| {
                    sb.state = STATE_DIRTY.into();
                    sb.mount_count = (sb.mount_count.get() + 1).into();
                    sb.last_mount_sec = sec.into();
                })
                .and_then(|_| engine.img.sync_range(0, BLOCK_SIZE).map_err(Error::Io))
                .map_err(|e| OpenError::Corrupt(p.clone(), e.to_string()))?;
            // Epoch 0 is never a mount's, so counts left by an old format read as 0.
            engine.epoch = (engine.meta.lock().mount_count.get() & 0xffff_ffff).max(1);
        }
        Ok(engine)
    }

    /// Flushes everything and marks the image clean (unmount).
    pub fn close_clean(&self) -> Result<()> {
        self.img.sync_all()?;
        self.update_sb(|sb| sb.state = STATE_CLEAN.into())?;
        self.img.sync_all()?;
        let mut d = self.dirty.lock();
        *d = DirtySet::default();
        Ok(())
    }

    // ----- superblock -------------------------------------------------------------------------

    /// A copy of the superblock.
    pub fn superblock(&self) -> Superblock {
        self.meta.lock().clone()
    }

    fn write_sb(&self, sb: &mut Superblock) -> Result<()> {
        sb.seal();
        self.img.write(0, sb.as_bytes())?;
        self.mark_meta(0);
        Ok(())
    }

    fn update_sb(&self, f: impl FnOnce(&mut Superblock)) -> Result<()> {
        let mut sb = self.meta.lock();
        f(&mut sb);
        self.write_sb(&mut sb)
    }

    pub fn total_blocks(&self) -> u64 {
        self.img.len() / BLOCK_SIZE
    }

    pub fn hash_seed(&self) -> u64 {
        self.hash_seed
    }

    pub(crate) fn image(&self) -> &Image {
        &self.img
    }

    /// Validates a block number read from the image.
    fn check_block(&self, block: u64, what: &str) -> Result<u64> {
        if block == 0 || block >= self.total_blocks() {
            return Err(Error::corrupt(format!(
                "{what}: block {block} out of range"
            )));
        }
        Ok(block)
    }

    // ----- locks ------------------------------------------------------------------------------

    fn stripe(&self, ino: u64) -> usize {
        (ino % LOCK_STRIPES as u64) as usize
    }

    pub fn lock_read(&self, ino: u64) -> Locked<'_> {
        Locked::Read(self.stripes[self.stripe(ino)].read())
    }

    pub fn lock_write(&self, ino: u64) -> Locked<'_> {
        self.lock_many(&[ino])
    }

    /// Write-locks several inodes without deadlock (ascending stripe order, each once).
    pub fn lock_many(&self, inos: &[u64]) -> Locked<'_> {
        let mut idx: Vec<usize> = inos.iter().map(|&i| self.stripe(i)).collect();
        idx.sort_unstable();
        idx.dedup();
        Locked::Write(idx.into_iter().map(|i| self.stripes[i].write()).collect())
    }

    // ----- dirty tracking ---------------------------------------------------------------------

    fn mark_meta(&self, block: u64) {
        let mut d = self.dirty.lock();
        if d.meta.len() >= MAX_TRACKED_RANGES {
            d.overflow = true;
        } else {
            d.meta.insert(block);
        }
    }

    /// Records that blocks `[start, start+len)` hold data of `ino` not yet flushed.
    pub fn mark_data(&self, ino: u64, start: u64, len: u64) {
        let mut d = self.dirty.lock();
        if d.data_ranges >= MAX_TRACKED_RANGES {
            d.overflow = true;
            return;
        }
        let ranges = d.data.entry(ino).or_default();
        if let Some(last) = ranges.last_mut() {
            if last.0 + last.1 == start {
                last.1 += len;
                return;
            }
            if last.0 <= start && start + len <= last.0 + last.1 {
                return;
            }
        }
        ranges.push((start, len));
        d.data_ranges += 1;
    }

    /// Records that `ino` changed beyond data and timestamps (blocks allocated or freed, size).
    pub fn mark_structural(&self, ino: u64) {
        let mut d = self.dirty.lock();
        if d.structural.len() >= MAX_TRACKED_RANGES {
            d.overflow = true;
        } else {
            d.structural.insert(ino);
        }
    }

    /// fsync: flushes `ino`'s written data and the metadata written so far, not the whole image.
    /// With `datasync` (fdatasync, msync), metadata is skipped when only timestamps of `ino`
    /// changed: its data is then retrievable without it.
    pub fn sync_inode(&self, ino: u64, datasync: bool) -> Result<()> {
        let (mut ranges, overflow) = {
            let mut d = self.dirty.lock();
            if d.overflow {
                *d = DirtySet::default();
                (Vec::new(), true)
            } else {
                let structural = d.structural.remove(&ino);
                let need_meta = !datasync || structural;
                let mut r: Vec<(u64, u64)> = if need_meta {
                    d.structural.clear();
                    d.meta.drain().map(|b| (b, 1)).collect()
                } else {
                    Vec::new()
                };
                if let Some(data) = d.data.remove(&ino) {
                    d.data_ranges -= data.len();
                    r.extend(data);
                }
                (r, false)
            }
        };
        if overflow {
            return Ok(self.img.sync_all()?);
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (s, l) in ranges {
            match merged.last_mut() {
                // Close ranges are flushed with one msync: the kernel skips clean pages.
                Some(m) if s <= m.0 + m.1 + 16 => m.1 = m.1.max(s + l - m.0),
                _ => merged.push((s, l)),
            }
        }
        // Every range but the last is submitted at once and waited for; the msync of the last one
        // then writes it, commits the host filesystem's journal and flushes the device cache once
        // for all. (Submitting the last range separately first only added a syscall that could
        // block: it doubled the msync latency of a one-page fsync.)
        let Some((&(last_start, last_len), earlier)) = merged.split_last() else {
            return Ok(());
        };
        for &(s, l) in earlier {
            self.img.start_write_back(block_off(s), l * BLOCK_SIZE)?;
        }
        for &(s, l) in earlier {
            self.img.write_back_range(block_off(s), l * BLOCK_SIZE)?;
        }
        self.img
            .sync_range(block_off(last_start), last_len * BLOCK_SIZE)?;
        Ok(())
    }

    /// Forgets what is pending for an inode whose blocks were freed.
    fn forget_data(&self, ino: u64) {
        let mut d = self.dirty.lock();
        if let Some(r) = d.data.remove(&ino) {
            d.data_ranges -= r.len();
        }
        d.structural.remove(&ino);
    }

    // ----- inode table ------------------------------------------------------------------------

    fn inode_offset(&self, ino: u64) -> Result<u64> {
        if ino == 0 || ino >= self.itab_slots.load(Ordering::Acquire) {
            return Err(Error::NotFound);
        }
        let tree = self.itab_tree.load(Ordering::Acquire);
        let fblock = ino / INODES_PER_BLOCK;
        match self.tree_lookup(tree, fblock)? {
            Some(b) => Ok(block_off(b) + (ino % INODES_PER_BLOCK) * INODE_SIZE),
            None => Err(Error::corrupt(format!(
                "inode table block for inode {ino} missing"
            ))),
        }
    }

    /// Reads inode `ino` (free or used), verifying its checksum.
    pub fn read_inode_raw(&self, ino: u64) -> Result<Inode> {
        let off = self.inode_offset(ino)?;
        let bytes = self.img.bytes(off, INODE_SIZE as usize)?;
        let rec = Inode::read_from_bytes(bytes).map_err(|_| Error::corrupt("inode size"))?;
        if !rec.checksum_ok() {
            return Err(Error::corrupt(format!("inode {ino} checksum mismatch")));
        }
        Ok(rec)
    }

    /// Reads a used inode; a free slot is `NotFound`.
    pub fn read_inode(&self, ino: u64) -> Result<Inode> {
        let rec = self.read_inode_raw(ino)?;
        if rec.is_free() {
            return Err(Error::NotFound);
        }
        Ok(rec)
    }

    /// Writes an inode record, all but `kernel_refs`, which is only changed in place.
    pub fn write_inode(&self, ino: u64, rec: &mut Inode) -> Result<()> {
        rec.seal();
        let off = self.inode_offset(ino)?;
        let bytes = rec.as_bytes();
        let after = INODE_REFS_OFFSET + 8;
        self.img.write(off, &bytes[..INODE_REFS_OFFSET])?;
        self.img.write(off + after as u64, &bytes[after..])?;
        self.mark_meta(off / BLOCK_SIZE);
        Ok(())
    }

    /// Adds `delta` to the kernel's reference count of `ino` (kept in the inode record, so the
    /// daemon's heap does not grow with the inodes the kernel caches); returns the new count.
    pub fn add_kernel_refs(&self, ino: u64, delta: i64) -> Result<u64> {
        let off = self.inode_offset(ino)? + INODE_REFS_OFFSET as u64;
        let epoch = self.epoch;
        let v = self.img.update_u64(off, |old| {
            let count = if old >> 32 == epoch {
                old & 0xffff_ffff
            } else {
                0
            };
            let count = (count as i64 + delta).clamp(0, u32::MAX as i64) as u64;
            (epoch << 32) | count
        })?;
        Ok(v & 0xffff_ffff)
    }

    /// The kernel's current reference count of `ino`.
    pub fn kernel_refs(&self, ino: u64) -> Result<u64> {
        self.add_kernel_refs(ino, 0)
    }

    /// Allocates and initialises a new inode; returns its number and record (already written).
    pub fn alloc_inode(&self, new: &NewInode) -> Result<(u64, Inode)> {
        let (ino, generation) = {
            let mut sb = self.meta.lock();
            if sb.free_inode_head.get() == 0 {
                self.grow_inode_table(&mut sb)?;
            }
            let ino = sb.free_inode_head.get();
            let free = self.read_inode_raw(ino)?;
            if !free.is_free() {
                return Err(Error::corrupt(format!(
                    "free inode list points at used inode {ino}"
                )));
            }
            let generation = sb.next_generation.get();
            sb.free_inode_head = free.next_link;
            sb.next_generation = (generation + 1).into();
            sb.used_inodes = (sb.used_inodes.get() + 1).into();
            self.write_sb(&mut sb)?;
            (ino, generation)
        };
        let mut rec = Inode::new_zeroed();
        rec.mode = new.mode.into();
        rec.uid = new.uid.into();
        rec.gid = new.gid.into();
        rec.rdev = new.rdev.into();
        rec.nlink = 1.into();
        rec.generation = (generation as u32).into();
        set_all_times_now(&mut rec);
        self.write_inode(ino, &mut rec)?;
        Ok((ino, rec))
    }

    fn grow_inode_table(&self, sb: &mut Superblock) -> Result<()> {
        let slots = sb.itab_slots.get();
        let fblock = slots / INODES_PER_BLOCK;
        let mut tree = sb.itab_tree.get();
        let mut counter = 0u64;
        let (block, _) = self.tree_ensure_locked(sb, &mut tree, fblock, 1, &mut counter)?;
        let block = block.start;
        for i in 0..INODES_PER_BLOCK {
            let ino = slots + i;
            let mut rec = Inode::new_zeroed();
            rec.next_link = if i + 1 < INODES_PER_BLOCK { ino + 1 } else { 0 }.into();
            rec.seal();
            self.img
                .write(block_off(block) + i * INODE_SIZE, rec.as_bytes())?;
        }
        self.mark_meta(block);
        sb.itab_tree = tree.into();
        sb.itab_slots = (slots + INODES_PER_BLOCK).into();
        sb.free_inode_head = slots.into();
        // Publish: the tree first, then the slot count readers check against.
        self.itab_tree.store(tree, Ordering::Release);
        self.itab_slots
            .store(slots + INODES_PER_BLOCK, Ordering::Release);
        self.write_sb(sb)
    }

    /// Returns inode `ino` to the free list. Its blocks must already be freed.
    fn release_inode_slot(&self, ino: u64) -> Result<()> {
        let mut sb = self.meta.lock();
        let mut rec = Inode::new_zeroed();
        rec.next_link = sb.free_inode_head;
        self.write_inode(ino, &mut rec)?;
        sb.free_inode_head = ino.into();
        sb.used_inodes = (sb.used_inodes.get().saturating_sub(1)).into();
        self.write_sb(&mut sb)
    }

    /// Frees an inode with all its blocks (caller holds its write lock; nothing refers to it).
    pub fn free_inode(&self, ino: u64, rec: &mut Inode) -> Result<()> {
        let mut tree = rec.tree.get();
        let mut blocks = rec.blocks.get();
        self.tree_free_range(&mut tree, 0, u64::MAX, &mut blocks)?;
        let xb = rec.xattr_block.get();
        if xb != 0 {
            self.free_run(self.check_block(xb, "xattr block")?, 1)?;
        }
        self.forget_data(ino);
        self.release_inode_slot(ino)
    }

    // ----- file data --------------------------------------------------------------------------

    /// The file data at byte `off`, at most `len` bytes: a slice of the mapping as long as the
    /// blocks are contiguous in the image, or the length of the hole that starts there.
    pub fn data_run(&self, rec: &Inode, off: u64, len: u64) -> Result<DataRun<'_>> {
        let fblock = off / BLOCK_SIZE;
        let in_block = off % BLOCK_SIZE;
        let max_blocks = (in_block + len).div_ceil(BLOCK_SIZE);
        let run = self.tree_lookup_run(rec.tree.get(), fblock, max_blocks)?;
        let avail = (run.len * BLOCK_SIZE - in_block).min(len);
        match run.start {
            Some(b) => Ok(DataRun::Mapped(
                self.img.bytes(block_off(b) + in_block, avail as usize)?,
            )),
            None => Ok(DataRun::Hole(avail)),
        }
    }

    /// Copies `data` into the file at byte `off`, allocating blocks as needed; freshly allocated
    /// blocks get zeros around the written part. Does not change `size` or times.
    pub fn write_data(&self, ino: u64, rec: &mut Inode, off: u64, data: &[u8]) -> Result<()> {
        let end = off.checked_add(data.len() as u64).ok_or(Error::TooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(Error::TooBig);
        }
        let mut tree = rec.tree.get();
        let mut blocks = rec.blocks.get();
        let mut pos = off;
        let result = (|| {
            while pos < end {
                let fblock = pos / BLOCK_SIZE;
                let last_fblock = (end - 1) / BLOCK_SIZE;
                let (run, fresh) =
                    self.tree_ensure(&mut tree, fblock, last_fblock - fblock + 1, &mut blocks)?;
                let run_start_byte = fblock * BLOCK_SIZE;
                let run_end_byte = (fblock + run.len) * BLOCK_SIZE;
                let chunk_end = end.min(run_end_byte);
                let img_off = block_off(run.start) + (pos - run_start_byte);
                if fresh {
                    let head = pos - run_start_byte;
                    if head > 0 {
                        self.img.zero(block_off(run.start), head as usize)?;
                    }
                    if chunk_end < run_end_byte {
                        let tail_off = block_off(run.start) + (chunk_end - run_start_byte);
                        self.img
                            .zero(tail_off, (run_end_byte - chunk_end) as usize)?;
                    }
                }
                if fresh {
                    self.mark_structural(ino);
                }
                let src = &data[(pos - off) as usize..(chunk_end - off) as usize];
                self.img.write(img_off, src)?;
                self.mark_data(ino, run.start, run.len);
                pos = chunk_end;
            }
            Ok(())
        })();
        rec.tree = tree.into();
        rec.blocks = blocks.into();
        result
    }

    /// Frees whole blocks in `[from_block, to_block)` of a file.
    pub fn punch_blocks(&self, rec: &mut Inode, from_block: u64, to_block: u64) -> Result<()> {
        let mut tree = rec.tree.get();
        let mut blocks = rec.blocks.get();
        let r = self.tree_free_range(&mut tree, from_block, to_block, &mut blocks);
        rec.tree = tree.into();
        rec.blocks = blocks.into();
        r
    }

    /// Zeroes `[off, off+len)` of the file where blocks exist (partial blocks of a punch or a
    /// truncate); holes stay holes.
    pub fn zero_range(&self, ino: u64, rec: &Inode, off: u64, len: u64) -> Result<()> {
        let end = off.saturating_add(len);
        let mut pos = off;
        while pos < end {
            let fblock = pos / BLOCK_SIZE;
            let block_end = ((fblock + 1) * BLOCK_SIZE).min(end);
            if let Some(b) = self.tree_lookup(rec.tree.get(), fblock)? {
                self.img
                    .zero(block_off(b) + pos % BLOCK_SIZE, (block_end - pos) as usize)?;
                self.mark_data(ino, b, 1);
            }
            pos = block_end;
        }
        Ok(())
    }

    /// Allocates blocks for `[off, off+len)` without writing data (fallocate); new blocks are
    /// zeroed.
    pub fn allocate_range(&self, ino: u64, rec: &mut Inode, off: u64, len: u64) -> Result<()> {
        let end = off.checked_add(len).ok_or(Error::TooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(Error::TooBig);
        }
        let mut tree = rec.tree.get();
        let mut blocks = rec.blocks.get();
        let mut fblock = off / BLOCK_SIZE;
        let last = end.div_ceil(BLOCK_SIZE);
        let result = (|| {
            while fblock < last {
                let (run, fresh) =
                    self.tree_ensure(&mut tree, fblock, last - fblock, &mut blocks)?;
                if fresh {
                    self.img
                        .zero(block_off(run.start), (run.len * BLOCK_SIZE) as usize)?;
                    self.mark_data(ino, run.start, run.len);
                    self.mark_structural(ino);
                }
                fblock += run.len;
            }
            Ok(())
        })();
        rec.tree = tree.into();
        rec.blocks = blocks.into();
        result
    }

    /// First byte offset `>= off` that is data (`want_data`) or a hole, within `size`.
    pub fn seek(&self, rec: &Inode, off: u64, want_data: bool) -> Result<Option<u64>> {
        let size = rec.size.get();
        if off >= size {
            return Ok(None);
        }
        match self.tree_next(rec.tree.get(), off / BLOCK_SIZE, want_data)? {
            Some(fb) => {
                let pos = (fb * BLOCK_SIZE).max(off);
                if pos >= size {
                    Ok(if want_data { None } else { Some(size) })
                } else {
                    Ok(Some(pos))
                }
            }
            None => Ok(if want_data { None } else { Some(size) }),
        }
    }
}

/// Largest file size: a tree of maximum height addresses 2^36 blocks.
pub const MAX_FILE_SIZE: u64 = 1 << 48;

/// A piece of file data: bytes straight from the mapping, or a hole of that many bytes.
pub enum DataRun<'a> {
    Mapped(&'a [u8]),
    Hole(u64),
}

pub use xattr::SetMode;
