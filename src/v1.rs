//! Read-only reader of format-version-1 images, for `mmapfs upgrade`.
//!
//! Self-contained on purpose: it defines the version-1 on-image structures it needs (the layout
//! `docs/format.md` gave for version 1) and uses neither `engine` nor `format`, which move on to
//! version 2. It reads with `pread`, never maps, and treats the image as untrusted input: every
//! block number, offset, length, tree height and name length is checked before use, every loop
//! is bounded by the image's own size, and nothing panics. Each error names the object it
//! concerns ("inode 37: checksum mismatch"), so a caller converting a damaged (crashed) image can
//! skip that object and go on.
//!
//! Not checked here (fsck's business; the upgrade rebuilds all of it): allocation bitmaps,
//! free-block and link counts, the free-inode list, directory name indexes (entries are read in
//! record order, which needs no index) and whether a block is claimed twice.

use std::fmt::Display;
use std::fs::{File, TryLockError};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use zerocopy::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Inode number of the root directory.
pub const V1_ROOT_INO: u64 = 1;

const BLOCK: u64 = 4096;
const MAGIC: [u8; 8] = *b"MMAPFS\0\x1a";
const INODE_SIZE: u64 = 256;
const INODES_PER_BLOCK: u64 = BLOCK / INODE_SIZE;
const FANOUT: usize = 512;
const MAX_HEIGHT: u32 = 4;
/// Offset of `kernel_refs` in an inode record: volatile, outside the checksum.
const REFS_OFFSET: usize = 168;
const DIRENT_HEADER: usize = 16;
/// Entry records live at directory offsets below this (the name index lies above).
const DIR_ENTRIES_MAX: u64 = 1 << 40;
const XATTR_MAGIC: u32 = 0x5841_5454;
const XATTR_HEADER: usize = 16;
const SYMLINK_MAX: u64 = 4095;

/// Block 0, bytes 0..256.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Superblock {
    magic: [u8; 8],
    version: U32,
    block_size: U32,
    total_blocks: U64,
    free_blocks: U64,
    state: U32,
    _flags: U32,
    itab_tree: U64,
    itab_slots: U64,
    _free_inode_head: U64,
    _reserved0: U64,
    used_inodes: U64,
    _next_generation: U64,
    _alloc_cursor: U64,
    hash_seed: U64,
    uuid: [u8; 16],
    created_sec: I64,
    mount_count: U64,
    last_mount_sec: I64,
    _reserved: [u8; 108],
    checksum: U32,
}
const _: () = assert!(size_of::<Superblock>() == 256);

/// One 256-byte inode record.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawInode {
    mode: U32,
    nlink: U32,
    uid: U32,
    gid: U32,
    size: U64,
    blocks: U64,
    times_sec: [I64; 4],
    times_nsec: [U32; 4],
    rdev: U32,
    generation: U32,
    tree: U64,
    xattr_block: U64,
    _next_link: U64,
    parent: U64,
    dir_entries_end: U64,
    dir_live: U64,
    _dir_tomb_bytes: U64,
    _dir_hash_cap: U64,
    _dir_hash_used: U64,
    _dir_hash_area: U32,
    _flags: U32,
    _kernel_refs: U64,
    _reserved: [u8; 76],
    checksum: U32,
}
const _: () = assert!(size_of::<RawInode>() == INODE_SIZE as usize);

/// Header of a directory entry record; the name follows.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct DirentHeader {
    ino: U64,
    checksum: U32,
    rec_len: U16,
    name_len: u8,
    dtype: u8,
}
const _: () = assert!(size_of::<DirentHeader>() == DIRENT_HEADER);

/// A tree node: 512 block numbers, 0 = hole.
type Node = [U64; FANOUT];

/// Why something could not be read. Each variant displays as one line naming the object.
#[derive(Debug, thiserror::Error)]
pub enum V1Error {
    /// The image could not be opened or read.
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// The file does not start with the mmapfs magic.
    #[error("not an mmapfs image (bad magic)")]
    BadMagic,
    /// An mmapfs image of another format version.
    #[error("format version {0}, not 1")]
    BadVersion(u32),
    /// Another process holds the image (it is mounted).
    #[error("image is in use (mounted?)")]
    Busy,
    /// An object of the image is damaged or inconsistent; the message names it.
    #[error("{0}")]
    Corrupt(String),
    /// The inode exists but is not of the type the call needs.
    #[error("inode {ino}: not a {want}")]
    WrongType { ino: u64, want: &'static str },
}

fn corrupt<T>(obj: &str, msg: impl Display) -> Result<T, V1Error> {
    Err(V1Error::Corrupt(format!("{obj}: {msg}")))
}

/// Whether the image was unmounted cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1State {
    /// State 1: unmounted and flushed.
    Clean,
    /// Anything else (2 = mounted or crashed): objects may be inconsistent.
    Dirty,
}

/// The superblock's description of the image.
#[derive(Debug, Clone)]
pub struct V1Info {
    pub uuid: [u8; 16],
    pub hash_seed: u64,
    pub created_sec: i64,
    pub last_mount_sec: i64,
    pub mount_count: u64,
    pub total_blocks: u64,
    pub free_blocks: u64,
    pub used_inodes: u64,
    /// Inode numbers `1..itab_slots` exist (used or free).
    pub itab_slots: u64,
    pub state: V1State,
}

/// File type of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V1Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    CharDev,
    BlockDev,
    Socket,
}

/// A timestamp: signed seconds since the epoch and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V1Time {
    pub sec: i64,
    pub nsec: u32,
}

/// A used inode, checksum verified.
#[derive(Debug, Clone)]
pub struct V1Inode {
    pub ino: u64,
    pub kind: V1Kind,
    /// `S_IF*` type bits and permission bits (including set-ID and sticky).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Bytes (regular files, symlinks); directories keep 0.
    pub size: u64,
    /// Blocks the inode owns (tree nodes, data, xattr block).
    pub blocks: u64,
    pub atime: V1Time,
    pub mtime: V1Time,
    pub ctime: V1Time,
    /// Creation time.
    pub btime: V1Time,
    /// Device number (Linux `new_encode_dev`) of device nodes.
    pub rdev: u32,
    pub generation: u32,
    /// Directories: the parent directory (the root's is itself).
    pub parent: u64,
    /// Directories: live entries according to the inode (not counting `.` and `..`).
    pub dir_live: u64,
    tree: u64,
    xattr_block: u64,
    dir_entries_end: u64,
}

/// An extended attribute: name (with its namespace prefix, e.g. `user.foo`) and value.
pub type V1Xattr = (Vec<u8>, Vec<u8>);

/// A live directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    /// `DT_*` type recorded in the entry.
    pub dtype: u8,
}

/// An open version-1 image (read-only, exclusive lock held while open).
pub struct V1Image {
    file: File,
    sb: Superblock,
    total_blocks: u64,
    itab: Tree,
    itab_slots: u64,
}

/// A block tree: root block and height (0 = empty).
#[derive(Clone, Copy)]
struct Tree {
    root: u64,
    height: u32,
}

/// File blocks a tree of `height` (at most 4) addresses.
fn capacity(height: u32) -> u64 {
    1 << (9 * height)
}

fn crc(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p))
}

impl V1Image {
    /// Opens `path` and validates the superblock: magic, version 1, checksum, block size, block
    /// count against the file's length, and the inode table's root and size. Takes an
    /// exclusive lock, so an image that is mounted (the v1 daemon held an exclusive lock) or
    /// open by another reader is refused.
    pub fn open(path: &Path) -> Result<V1Image, V1Error> {
        let name = path.display().to_string();
        let io_err = |source| V1Error::Io {
            what: name.clone(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let md = file.metadata().map_err(io_err)?;
        if !md.is_file() {
            return Err(io_err(io::Error::other("not a regular file")));
        }
        // Exclusive, not shared: the only reader is `mmapfs upgrade`, which replaces the file.
        // Two upgrades of one image under shared locks both ran, raced on IMAGE.upgrading and
        // on the renames, and could leave a version-2 image as IMAGE.v1 and no IMAGE at all.
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(V1Error::Busy),
            Err(TryLockError::Error(e)) => return Err(io_err(e)),
        }
        let len = md.len();
        let mut sb = Superblock::new_zeroed();
        if len < BLOCK {
            return Err(V1Error::BadMagic);
        }
        file.read_exact_at(sb.as_mut_bytes(), 0).map_err(io_err)?;
        if sb.magic != MAGIC {
            return Err(V1Error::BadMagic);
        }
        if sb.version.get() != 1 {
            return Err(V1Error::BadVersion(sb.version.get()));
        }
        let obj = "superblock";
        if crc(&[&sb.as_bytes()[..252]]) != sb.checksum.get() {
            return corrupt(obj, "checksum mismatch");
        }
        if u64::from(sb.block_size.get()) != BLOCK {
            return corrupt(obj, format!("block size {} unsupported", sb.block_size));
        }
        let total = sb.total_blocks.get();
        if total < 4 || total.checked_mul(BLOCK).is_none_or(|b| b > len) {
            return corrupt(
                obj,
                format!("{total} blocks, but the file holds {len} bytes (truncated?)"),
            );
        }
        if sb.free_blocks.get() > total {
            return corrupt(obj, format!("{} free blocks > total", sb.free_blocks));
        }
        let mut img = V1Image {
            file,
            total_blocks: total,
            itab: Tree { root: 0, height: 0 },
            itab_slots: sb.itab_slots.get(),
            sb,
        };
        img.itab = img.tree("inode table", img.sb.itab_tree.get())?;
        let slots = img.itab_slots;
        if img.itab.height == 0
            || slots < INODES_PER_BLOCK
            || !slots.is_multiple_of(INODES_PER_BLOCK)
            || slots / INODES_PER_BLOCK > total
            || slots / INODES_PER_BLOCK > capacity(img.itab.height)
        {
            return corrupt(obj, format!("inode table of {slots} slots invalid"));
        }
        Ok(img)
    }

    /// What the superblock says about the image.
    pub fn info(&self) -> V1Info {
        let sb = &self.sb;
        V1Info {
            uuid: sb.uuid,
            hash_seed: sb.hash_seed.get(),
            created_sec: sb.created_sec.get(),
            last_mount_sec: sb.last_mount_sec.get(),
            mount_count: sb.mount_count.get(),
            total_blocks: self.total_blocks,
            free_blocks: sb.free_blocks.get(),
            used_inodes: sb.used_inodes.get(),
            itab_slots: self.itab_slots,
            state: if sb.state.get() == 1 {
                V1State::Clean
            } else {
                V1State::Dirty
            },
        }
    }

    /// Inode `ino` (`1..itab_slots`), checksum verified; `None` for a free slot.
    pub fn inode(&self, ino: u64) -> Result<Option<V1Inode>, V1Error> {
        let obj = format!("inode {ino}");
        if ino == 0 || ino >= self.itab_slots {
            return corrupt(&obj, format!("out of range 1..{}", self.itab_slots));
        }
        let Some(block) = self.block_of(&obj, self.itab, ino / INODES_PER_BLOCK)? else {
            return corrupt(&obj, "inode table block missing");
        };
        let mut r = RawInode::new_zeroed();
        let off = block * BLOCK + (ino % INODES_PER_BLOCK) * INODE_SIZE;
        self.pread(&obj, off, r.as_mut_bytes())?;
        let b = r.as_bytes();
        if crc(&[&b[..REFS_OFFSET], &b[REFS_OFFSET + 8..252]]) != r.checksum.get() {
            return corrupt(&obj, "checksum mismatch");
        }
        let mode = r.mode.get();
        if mode == 0 {
            return Ok(None);
        }
        let kind = match mode & libc::S_IFMT {
            libc::S_IFDIR => V1Kind::Dir,
            libc::S_IFREG => V1Kind::File,
            libc::S_IFLNK => V1Kind::Symlink,
            libc::S_IFIFO => V1Kind::Fifo,
            libc::S_IFCHR => V1Kind::CharDev,
            libc::S_IFBLK => V1Kind::BlockDev,
            libc::S_IFSOCK => V1Kind::Socket,
            _ => return corrupt(&obj, format!("mode {mode:o}: unknown file type")),
        };
        let t = |i: usize| V1Time {
            sec: r.times_sec[i].get(),
            nsec: r.times_nsec[i].get(),
        };
        Ok(Some(V1Inode {
            ino,
            kind,
            mode,
            nlink: r.nlink.get(),
            uid: r.uid.get(),
            gid: r.gid.get(),
            size: r.size.get(),
            blocks: r.blocks.get(),
            atime: t(0),
            mtime: t(1),
            ctime: t(2),
            btime: t(3),
            rdev: r.rdev.get(),
            generation: r.generation.get(),
            parent: r.parent.get(),
            dir_live: r.dir_live.get(),
            tree: r.tree.get(),
            xattr_block: r.xattr_block.get(),
            dir_entries_end: r.dir_entries_end.get(),
        }))
    }

    /// The live entries of directory `dir_ino`, in record order (`.` and `..` are not stored).
    /// Fails on the first damaged record; see [`V1Image::dir_entries_salvage`].
    pub fn dir_entries(&self, dir_ino: u64) -> Result<Vec<V1DirEntry>, V1Error> {
        let (entries, mut damaged) = self.dir_entries_salvage(dir_ino)?;
        if damaged.is_empty() {
            Ok(entries)
        } else {
            Err(damaged.swap_remove(0))
        }
    }

    /// As [`V1Image::dir_entries`], but a damaged record is reported in the second list and
    /// skipped (the walk resumes at the next valid record of its block), so the entries around
    /// it survive. A damaged inode or tree still fails the whole call.
    pub fn dir_entries_salvage(
        &self,
        dir_ino: u64,
    ) -> Result<(Vec<V1DirEntry>, Vec<V1Error>), V1Error> {
        let dir = self.used(dir_ino)?;
        if dir.kind != V1Kind::Dir {
            return Err(V1Error::WrongType {
                ino: dir_ino,
                want: "directory",
            });
        }
        let obj = format!("inode {dir_ino}");
        let end = dir.dir_entries_end;
        let nblocks = end.div_ceil(BLOCK);
        if end > DIR_ENTRIES_MAX || nblocks > self.total_blocks {
            return corrupt(&obj, format!("directory entries end at {end}"));
        }
        let tree = self.tree(&obj, dir.tree)?;
        let (mut entries, mut damaged) = (Vec::new(), Vec::new());
        let mut bytes = [0u8; BLOCK as usize];
        self.walk(&obj, tree, 0, nblocks, &mut |fblock, _, block| {
            let Some(b) = block else { return Ok(()) };
            self.pread(&obj, b * BLOCK, &mut bytes)?;
            let base = fblock * BLOCK;
            let mut p = 0;
            while p + DIRENT_HEADER <= bytes.len() && base + (p as u64) < end {
                match self.record(&bytes, p) {
                    Ok(None) => break,
                    Ok(Some((len, e))) => {
                        entries.extend(e);
                        p += len;
                    }
                    Err(msg) => {
                        damaged.push(V1Error::Corrupt(format!(
                            "{obj}: directory entry at {}: {msg}",
                            base + p as u64
                        )));
                        // Resume at the next 8-aligned offset holding a valid record, if any.
                        match (p + 8..=bytes.len() - DIRENT_HEADER)
                            .step_by(8)
                            .find(|&q| matches!(self.record(&bytes, q), Ok(Some(_))))
                        {
                            Some(q) => p = q,
                            None => break,
                        }
                    }
                }
            }
            Ok(())
        })?;
        Ok((entries, damaged))
    }

    /// The record at `p` of a directory block: `None` = nothing more in this block, else its
    /// length and the live entry it holds (`None` for a deleted record).
    fn record(
        &self,
        bytes: &[u8],
        p: usize,
    ) -> Result<Option<(usize, Option<V1DirEntry>)>, String> {
        let h =
            DirentHeader::read_from_bytes(&bytes[p..p + DIRENT_HEADER]).map_err(|_| "header")?;
        let (rec_len, name_len) = (usize::from(h.rec_len.get()), usize::from(h.name_len));
        if rec_len == 0 {
            return Ok(None);
        }
        if !rec_len.is_multiple_of(8)
            || name_len == 0
            || rec_len < (DIRENT_HEADER + name_len).div_ceil(8) * 8
            || p + rec_len > bytes.len()
        {
            return Err(format!("record length {rec_len}, name length {name_len}"));
        }
        let hb = &bytes[p..p + DIRENT_HEADER];
        let name = &bytes[p + DIRENT_HEADER..p + DIRENT_HEADER + name_len];
        if crc(&[&hb[..8], &hb[12..], name]) != h.checksum.get() {
            return Err("checksum mismatch".into());
        }
        let ino = h.ino.get();
        if ino == 0 {
            return Ok(Some((rec_len, None)));
        }
        if name == b"." || name == b".." || name.iter().any(|&c| c == b'/' || c == 0) {
            return Err(format!("invalid name {:?}", String::from_utf8_lossy(name)));
        }
        if ino >= self.itab_slots {
            return Err(format!("inode {ino} out of range"));
        }
        let e = V1DirEntry {
            name: name.to_vec(),
            ino,
            dtype: h.dtype,
        };
        Ok(Some((rec_len, Some(e))))
    }

    /// The mapped (non-hole) runs of an inode's tree as `(byte offset, length)`, merged, in
    /// order. Runs may extend past `size` (blocks preallocated with fallocate KEEP_SIZE, which
    /// hold zeros): clip them to `size` to copy the data. Meant for regular files.
    pub fn data_extents(&self, ino: u64) -> Result<Vec<(u64, u64)>, V1Error> {
        let rec = self.used(ino)?;
        let obj = format!("inode {ino}");
        let tree = self.tree(&obj, rec.tree)?;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        self.walk(
            &obj,
            tree,
            0,
            capacity(tree.height),
            &mut |fblock, _, block| {
                if block.is_some() {
                    match runs.last_mut() {
                        Some((off, len)) if *off + *len == fblock * BLOCK => *len += BLOCK,
                        _ => runs.push((fblock * BLOCK, BLOCK)),
                    }
                }
                Ok(())
            },
        )?;
        Ok(runs)
    }

    /// Reads a regular file's or symlink's bytes at `off` into `buf`; holes read as zeros.
    /// Returns the bytes read: fewer than `buf.len()` only at the end of the file (`size`).
    pub fn read_at(&self, ino: u64, off: u64, buf: &mut [u8]) -> Result<usize, V1Error> {
        let rec = self.used(ino)?;
        if !matches!(rec.kind, V1Kind::File | V1Kind::Symlink) {
            return Err(V1Error::WrongType {
                ino,
                want: "regular file",
            });
        }
        self.read_data(&rec, off, buf)
    }

    fn read_data(&self, rec: &V1Inode, off: u64, buf: &mut [u8]) -> Result<usize, V1Error> {
        let obj = format!("inode {}", rec.ino);
        let tree = self.tree(&obj, rec.tree)?;
        let n = rec.size.saturating_sub(off).min(buf.len() as u64);
        if n == 0 {
            return Ok(0);
        }
        let (first, end) = (off / BLOCK, (off + n).div_ceil(BLOCK));
        self.walk(&obj, tree, first, end, &mut |fblock, count, block| {
            // The part of [fblock, fblock + count) blocks that the read covers, in buf.
            let lo = (fblock * BLOCK).max(off);
            let hi = ((fblock + count) * BLOCK).min(off + n);
            let dst = &mut buf[(lo - off) as usize..(hi - off) as usize];
            match block {
                None => dst.fill(0),
                Some(b) => self.pread(&obj, b * BLOCK + lo % BLOCK, dst)?,
            }
            Ok(())
        })?;
        Ok(n as usize)
    }

    /// A symlink's target (at most 4095 bytes).
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, V1Error> {
        let rec = self.used(ino)?;
        if rec.kind != V1Kind::Symlink {
            return Err(V1Error::WrongType {
                ino,
                want: "symlink",
            });
        }
        if rec.size == 0 || rec.size > SYMLINK_MAX {
            return corrupt(
                &format!("inode {ino}"),
                format!("symlink of {} bytes", rec.size),
            );
        }
        let mut target = vec![0; rec.size as usize];
        self.read_data(&rec, 0, &mut target)?;
        Ok(target)
    }

    /// The extended attributes of any inode, in stored order.
    pub fn xattrs(&self, ino: u64) -> Result<Vec<V1Xattr>, V1Error> {
        let rec = self.used(ino)?;
        if rec.xattr_block == 0 {
            return Ok(Vec::new());
        }
        let obj = format!("inode {ino}");
        let b = self.check_block(&obj, rec.xattr_block, "xattr")?;
        let mut bytes = [0u8; BLOCK as usize];
        self.pread(&obj, b * BLOCK, &mut bytes)?;
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let used = word(4) as usize;
        if word(0) != XATTR_MAGIC || used > bytes.len() - XATTR_HEADER {
            return corrupt(&obj, format!("xattr block {b}: bad header"));
        }
        let body = &bytes[XATTR_HEADER..XATTR_HEADER + used];
        if crc(&[body]) != word(8) {
            return corrupt(&obj, format!("xattr block {b}: checksum mismatch"));
        }
        let mut out = Vec::new();
        let mut p = 0;
        while p < body.len() {
            let (n, v) = match body.get(p..p + 4) {
                Some(h) => (
                    usize::from(h[0]),
                    usize::from(u16::from_le_bytes([h[2], h[3]])),
                ),
                None => return corrupt(&obj, format!("xattr block {b}: truncated entry")),
            };
            let (name, value) = (p + 4, p + 4 + n);
            if n == 0 || value + v > body.len() {
                return corrupt(&obj, format!("xattr block {b}: entry at {p} out of bounds"));
            }
            out.push((body[name..value].to_vec(), body[value..value + v].to_vec()));
            p = value + v;
        }
        Ok(out)
    }

    /// A used inode; a free slot is an error.
    fn used(&self, ino: u64) -> Result<V1Inode, V1Error> {
        match self.inode(ino)? {
            Some(rec) => Ok(rec),
            None => corrupt(&format!("inode {ino}"), "free slot"),
        }
    }

    fn pread(&self, obj: &str, off: u64, buf: &mut [u8]) -> Result<(), V1Error> {
        self.file
            .read_exact_at(buf, off)
            .map_err(|source| V1Error::Io {
                what: format!("{obj}: reading {} bytes at {off}", buf.len()),
                source,
            })
    }

    fn check_block(&self, obj: &str, b: u64, what: &str) -> Result<u64, V1Error> {
        if b == 0 || b >= self.total_blocks {
            return corrupt(obj, format!("{what} block {b} out of range"));
        }
        Ok(b)
    }

    /// Unpacks and checks a tree: bits 0..56 root block, bits 56..64 height.
    fn tree(&self, obj: &str, packed: u64) -> Result<Tree, V1Error> {
        let (root, height) = (packed & ((1 << 56) - 1), (packed >> 56) as u32);
        if height > MAX_HEIGHT || (height == 0) != (root == 0) {
            return corrupt(obj, format!("tree root {root} height {height} invalid"));
        }
        if height > 0 {
            self.check_block(obj, root, "tree root")?;
        }
        Ok(Tree { root, height })
    }

    /// The image block holding file block `fblock` of `tree`, if mapped.
    fn block_of(&self, obj: &str, tree: Tree, fblock: u64) -> Result<Option<u64>, V1Error> {
        let mut found = None;
        self.walk(obj, tree, fblock, fblock + 1, &mut |_, _, b| {
            found = b;
            Ok(())
        })?;
        Ok(found)
    }

    /// Calls `f(first, count, block)` for file blocks `[from, to)` of `tree`, in order: a mapped
    /// block (`count` 1, `Some(image block)`) or a hole of `count` blocks (`None`). Every node
    /// and mapped block visited counts against the image's block count, so a corrupt tree whose
    /// slots share nodes cannot make the walk run longer than a sound tree could.
    fn walk(
        &self,
        obj: &str,
        tree: Tree,
        from: u64,
        to: u64,
        f: &mut dyn FnMut(u64, u64, Option<u64>) -> Result<(), V1Error>,
    ) -> Result<(), V1Error> {
        let cap = if tree.height == 0 {
            0
        } else {
            capacity(tree.height)
        };
        let mut budget = self.total_blocks;
        if from < to.min(cap) {
            self.walk_node(
                obj,
                tree.root,
                tree.height - 1,
                0,
                (from, to.min(cap)),
                &mut budget,
                f,
            )?;
        }
        if to > cap.max(from) {
            f(cap.max(from), to - cap.max(from), None)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_node(
        &self,
        obj: &str,
        node: u64,
        level: u32,
        base: u64,
        (from, to): (u64, u64),
        budget: &mut u64,
        f: &mut dyn FnMut(u64, u64, Option<u64>) -> Result<(), V1Error>,
    ) -> Result<(), V1Error> {
        let mut slots: Node = FromZeros::new_zeroed();
        self.pread(obj, node * BLOCK, slots.as_mut_bytes())?;
        let span = capacity(level);
        for idx in (from - base) / span..(to - base).div_ceil(span) {
            let child_base = base + idx * span;
            let range = (from.max(child_base), to.min(child_base + span));
            let child = slots.get(idx as usize).map_or(0, |s| s.get());
            if child == 0 {
                f(range.0, range.1 - range.0, None)?;
                continue;
            }
            self.check_block(obj, child, "tree")?;
            *budget = match budget.checked_sub(1) {
                Some(b) => b,
                None => return corrupt(obj, "tree maps more blocks than the image holds"),
            };
            if level == 0 {
                f(range.0, 1, Some(child))?;
            } else {
                self.walk_node(obj, child, level - 1, child_base, range, budget, f)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
