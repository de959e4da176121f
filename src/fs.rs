//! The filesystem core: POSIX semantics (lookup, create, read, write, rename, link, truncate,
//! fallocate, xattr, ...) on top of the engine. It returns its own small types ([`Attr`],
//! [`Entry`]) and [`Error`]; the FUSE adapter only translates. Everything here is testable
//! without a mount.
//!
//! Every change is one engine transaction ([`Tx`]): an operation reserves the blocks it may
//! need first (so it fails with `ENOSPC` before changing anything), then changes inodes and
//! directories; the engine decides when that becomes durable (`fsync`, or its committer).
//!
//! Lifetimes: an inode whose link count reaches 0 is freed when the kernel forgets its last
//! reference (open files keep a reference); until then it is on the engine's orphan list, which
//! the next mount empties after a crash.
//! Locks: a transaction is begun before any inode lock is taken; see `engine` (no stripe is
//! taken while another is held, except through `lock_many`).

use std::cell::Cell;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::acl::{self, Acl};
use crate::engine::{DataRun, DirEntry, Engine, NewInode, SetMode, Tx, now};
use crate::error::{Error, Result};
use crate::format::*;
use crate::perm::{self, AttrChange, Caller, Target};

pub use crate::engine::check;

/// Who is asking (from the FUSE request header).
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    /// The caller's umask, applied here unless the directory has a default ACL.
    pub umask: u32,
}

/// When reading a file or listing a directory updates its access time (the mount's atime
/// options, as the kernel applies them to other filesystems).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Atime {
    /// Only when atime is not newer than mtime or ctime, or is a day old (`relatime`).
    #[default]
    Relative,
    /// On every access (`strictatime`).
    Strict,
    /// Never (`noatime`).
    Never,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// A timestamp: seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    /// 512-byte units, as `st_blocks`.
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub btime: Time,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub generation: u64,
}

#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    Now,
    At(Time),
}

/// Changes requested by `setattr` (already permission-checked: by the kernel, or by
/// `Fs::may_setattr` on mounts without `default_permissions`).
#[derive(Default, Clone, Copy, Debug)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    pub ctime: Option<Time>,
}

/// Who writes, truncates or chowns a file, as far as set-ID bits are concerned
/// (see `Fs::drop_privileges`).
pub struct Changer<'a> {
    /// Holds `CAP_FSETID`: set-ID bits survive its writes and truncates.
    pub privileged: bool,
    /// Whether it belongs to group `gid`; asked only about a set-group-ID file whose group may
    /// not execute it.
    pub in_group: &'a dyn Fn(u32) -> bool,
    /// Set when a set-ID bit or a capability was dropped.
    pub dropped: Cell<bool>,
}

impl<'a> Changer<'a> {
    pub fn new(privileged: bool, in_group: &'a dyn Fn(u32) -> bool) -> Changer<'a> {
        Changer {
            privileged,
            in_group,
            dropped: Cell::new(false),
        }
    }

    /// A changer that holds every privilege (tests, internal callers).
    pub fn privileged() -> Changer<'static> {
        Changer::new(true, &|_| true)
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
    /// `RENAME_WHITEOUT`: leave a whiteout (a 0/0 character device, what overlayfs uses to
    /// hide a lower file) owned by this caller at the old name.
    pub whiteout: Option<Ctx>,
}

#[derive(Clone, Copy, Debug)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// One directory entry handed to a readdir callback.
pub struct ListEntry<'a> {
    pub name: &'a [u8],
    pub ino: u64,
    pub kind: FileKind,
    /// Cookie to resume after this entry.
    pub next: u64,
    /// Present for readdirplus (and then the kernel holds a new reference).
    pub attr: Option<&'a Attr>,
}

pub const FALLOC_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
pub const FALLOC_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
pub const FALLOC_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

/// Readdir cookies: 1 = after ".", 2 = after "..", else entry offset + 3.
const COOKIE_BASE: u64 = 3;
/// Entries gathered per readdir batch (bounded heap per request).
const READDIR_BATCH: usize = 256;

/// Blocks an operation reserves for copies of what it changes: inode-table leaves, directory
/// blocks, tree paths, and the space map at its commit.
const OP_BLOCKS: u64 = 96;

/// The `FS_*_FL` inode flags (`lsattr`/`chattr`) stored here, and their bits in the record.
pub const FS_NODUMP_FL: u32 = 0x40;
pub const FS_NOATIME_FL: u32 = 0x80;
const USER_FLAGS: &[(u32, u32)] = &[
    (FS_NODUMP_FL, INODE_FLAG_NODUMP),
    (FS_NOATIME_FL, INODE_FLAG_NOATIME),
];

/// `relatime` updates an atime at least this old even when it is newer than mtime and ctime.
const RELATIME_MAX_AGE_SECS: i64 = 24 * 3600;

/// Blocks a write of `len` bytes may allocate: data, tree nodes, copies.
fn write_blocks(len: u64) -> u64 {
    let data = len.div_ceil(BLOCK_SIZE) + 2;
    data + (data / (TREE_FANOUT - 10) + 2) * u64::from(TREE_MAX_HEIGHT) + OP_BLOCKS
}

pub struct Fs {
    engine: Arc<Engine>,
    /// With the kernel's writeback cache the kernel keeps mtime/ctime of written files and sends
    /// them with setattr; writes must then leave them alone.
    kernel_owns_write_times: bool,
    /// POSIX ACLs are on (the kernel enforces them, or `crate::perm` on mounts without
    /// `default_permissions`): `system.posix_acl_*` attributes are kept, and chmod and new files
    /// follow them (see `crate::acl`).
    acls: bool,
    /// How permission checks made here see owners and modes (`-o uid=,gid=,umask=`).
    shown: perm::Shown,
    /// When accesses update atime; `diratime`: directories too.
    atime: Atime,
    diratime: bool,
    /// Serialises renames, so the ancestor walk that prevents directory loops stays valid.
    rename_lock: Mutex<()>,
    /// Open directory streams (`opendir` handles): where the directory's entries ended when
    /// the stream began or was rewound. A pass stops there, so it ends however fast creates
    /// and renames append records, and returns each entry that stayed put exactly once.
    dir_streams: Mutex<DirStreams>,
}

/// What a write did.
pub struct Written {
    pub len: u32,
    /// The file's block count (st_blocks) changed.
    pub blocks_changed: bool,
}

/// Answers SEEK_DATA / SEEK_HOLE from the image, on any thread.
pub struct Seeker(Arc<Engine>);

impl Seeker {
    pub fn lseek(&self, ino: u64, off: u64, whence: i32) -> Result<u64> {
        let _g = self.0.lock_read(ino);
        let rec = self.0.read_inode(ino)?;
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(Error::Invalid),
        };
        self.0.seek(&rec, off, want_data)?.ok_or(Error::NoData)
    }
}

#[derive(Default)]
struct DirStreams {
    next: u64,
    end: std::collections::HashMap<u64, u64>,
}

fn kind_of(mode: u32) -> FileKind {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFLNK => FileKind::Symlink,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        libc::S_IFCHR => FileKind::CharDev,
        libc::S_IFBLK => FileKind::BlockDev,
        _ => FileKind::File,
    }
}

fn kind_of_dtype(t: u8) -> FileKind {
    match t {
        libc::DT_DIR => FileKind::Dir,
        libc::DT_LNK => FileKind::Symlink,
        libc::DT_FIFO => FileKind::Fifo,
        libc::DT_SOCK => FileKind::Socket,
        libc::DT_CHR => FileKind::CharDev,
        libc::DT_BLK => FileKind::BlockDev,
        _ => FileKind::File,
    }
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(Error::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(Error::Invalid);
    }
    Ok(())
}

/// Whether `rec` can take no more links (one short of what the count holds).
fn at_link_limit(rec: &Inode) -> bool {
    rec.nlink.get() >= u32::MAX - 1
}

fn now_time() -> Time {
    let (sec, nsec) = now();
    Time { sec, nsec }
}

fn set_mtime_ctime(rec: &mut Inode, t: Time) {
    rec.mtime_sec = t.sec.into();
    rec.mtime_nsec = t.nsec.into();
    rec.ctime_sec = t.sec.into();
    rec.ctime_nsec = t.nsec.into();
}

fn set_ctime(rec: &mut Inode, t: Time) {
    rec.ctime_sec = t.sec.into();
    rec.ctime_nsec = t.nsec.into();
}

pub fn attr_of(ino: u64, rec: &Inode) -> Attr {
    let t = |s: i64, n: u32| Time { sec: s, nsec: n };
    Attr {
        ino,
        size: rec.size.get(),
        blocks: rec.blocks.get() * (BLOCK_SIZE / 512),
        atime: t(rec.atime_sec.get(), rec.atime_nsec.get()),
        mtime: t(rec.mtime_sec.get(), rec.mtime_nsec.get()),
        ctime: t(rec.ctime_sec.get(), rec.ctime_nsec.get()),
        btime: t(rec.btime_sec.get(), rec.btime_nsec.get()),
        kind: kind_of(rec.mode.get()),
        perm: (rec.mode.get() & 0o7777) as u16,
        nlink: rec.nlink.get(),
        uid: rec.uid.get(),
        gid: rec.gid.get(),
        rdev: rec.rdev.get(),
        generation: rec.generation.get(),
    }
}

impl Fs {
    /// The filesystem over an opened engine; starts its committer thread when writable.
    pub fn new(engine: Engine) -> Fs {
        let fs = Fs::new_idle(engine);
        fs.start();
        fs
    }

    /// The filesystem over an opened engine, writing nothing until `start`.
    pub fn new_idle(engine: Engine) -> Fs {
        let engine = Arc::new(engine);
        Fs {
            engine,
            kernel_owns_write_times: false,
            acls: false,
            shown: perm::Shown::default(),
            atime: Atime::Relative,
            diratime: true,
            rename_lock: Mutex::new(()),
            dir_streams: Mutex::default(),
        }
    }

    /// Starts the committer thread (periodic commits, freeing files left unlinked at a crash).
    pub fn start(&self) {
        self.engine.start_committer();
    }

    /// See `kernel_owns_write_times` (set when the writeback cache is on).
    pub fn set_kernel_owns_write_times(&mut self, on: bool) {
        self.kernel_owns_write_times = on;
    }

    /// See `atime`.
    pub fn set_atime(&mut self, atime: Atime, diratime: bool) {
        self.atime = atime;
        self.diratime = diratime;
    }

    /// Whether accesses update atime at all.
    pub fn tracks_atime(&self) -> bool {
        self.atime != Atime::Never && self.engine.writable()
    }

    /// Records an access to `ino` (a read, an open for reading, a directory listing) in its
    /// atime as the mount's policy says; returns whether atime changed. Cheap when nothing is
    /// due: one look at the inode under its read lock.
    pub fn note_access(&self, ino: u64) -> Result<bool> {
        if !self.tracks_atime() {
            return Ok(false);
        }
        let now = now_time();
        let due = |rec: &Inode| {
            let atime = (rec.atime_sec.get(), rec.atime_nsec.get());
            let pinned = rec.flags.get() & INODE_FLAG_NOATIME != 0;
            if rec.is_dir() && !self.diratime || rec.nlink.get() == 0 || pinned {
                return false;
            }
            match self.atime {
                Atime::Never => false,
                Atime::Strict => atime != (now.sec, now.nsec),
                Atime::Relative => {
                    atime <= (rec.mtime_sec.get(), rec.mtime_nsec.get())
                        || atime <= (rec.ctime_sec.get(), rec.ctime_nsec.get())
                        || now.sec.saturating_sub(atime.0) >= RELATIME_MAX_AGE_SECS
                }
            }
        };
        {
            let _g = self.engine.lock_read(ino);
            if !due(&self.engine.read_inode(ino)?) {
                return Ok(false);
            }
        }
        let tx = self.engine.begin(OP_BLOCKS)?;
        let _g = self.engine.lock_write(ino);
        let mut rec = self.engine.read_inode(ino)?;
        if !due(&rec) {
            return Ok(false);
        }
        rec.atime_sec = now.sec.into();
        rec.atime_nsec = now.nsec.into();
        self.engine.write_inode(&tx, ino, &mut rec)?;
        Ok(true)
    }

    /// See `shown`.
    pub fn set_shown(&mut self, shown: perm::Shown) {
        self.shown = shown;
    }

    /// See `acls` (set when ACLs are on for this mount).
    pub fn set_acls(&mut self, on: bool) {
        self.acls = on;
    }

    /// A handle on the engine that does not keep it alive (the stats server).
    pub fn engine_weak(&self) -> std::sync::Weak<Engine> {
        Arc::downgrade(&self.engine)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Frees what unlinked files the kernel still held, flushes everything and marks the image
    /// clean; called at unmount (the kernel holds nothing any more).
    pub fn shutdown(&self) -> Result<()> {
        if self.engine.writable() {
            match self.engine.orphans() {
                Ok(orphans) => {
                    for ino in orphans {
                        self.engine.free_orphan(ino)?;
                    }
                }
                // Marked for fsck (which rebuilds the list); the rest still unmounts cleanly.
                Err(e) => log::error!("unlinked files not freed at unmount: {e}"),
            }
        }
        self.engine.close_clean()
    }

    fn read_dir(&self, ino: u64) -> Result<Inode> {
        let rec = self.engine.read_inode(ino)?;
        if !rec.is_dir() {
            return Err(Error::NotDir);
        }
        Ok(rec)
    }

    /// The kernel gained a reference to `ino` (an entry reply). Counted in the engine's
    /// volatile per-inode table, not on the image.
    fn add_lookup(&self, ino: u64) -> Result<()> {
        self.engine.add_kernel_refs(ino, 1).map(|_| ())
    }

    fn is_referenced(&self, ino: u64) -> Result<bool> {
        Ok(self.engine.kernel_refs(ino)? > 0)
    }

    /// The kernel dropped `n` references to `ino`; frees it if it was unlinked.
    pub fn forget(&self, ino: u64, n: u64) -> Result<()> {
        {
            let _g = self.engine.lock_write(ino);
            let left = match self
                .engine
                .add_kernel_refs(ino, -(n.min(i64::MAX as u64) as i64))
            {
                Ok(left) => left,
                Err(Error::NotFound) => return Ok(()),
                Err(e) => return Err(e),
            };
            if left > 0 {
                return Ok(());
            }
            match self.engine.read_inode(ino) {
                Ok(r) if r.nlink.get() == 0 => {}
                Ok(_) | Err(Error::NotFound) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if !self.engine.writable() {
            return Ok(());
        }
        // The transaction is begun before the inode is locked again; check again under it.
        let tx = self.engine.begin_delete(OP_BLOCKS)?;
        let _g = self.engine.lock_write(ino);
        if self.is_referenced(ino)? {
            return Ok(());
        }
        match self.engine.read_inode(ino) {
            Ok(mut rec) if rec.nlink.get() == 0 => self.engine.free_inode(&tx, ino, &mut rec),
            Ok(_) | Err(Error::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Drops one link from `rec` (already locked); frees it at zero, or puts it on the orphan
    /// list while the kernel still holds it.
    fn drop_link(&self, tx: &Tx, ino: u64, rec: &mut Inode, t: Time) -> Result<()> {
        let links = rec.nlink.get().saturating_sub(1);
        rec.nlink = links.into();
        set_ctime(rec, t);
        if links == 0 {
            if self.is_referenced(ino)? {
                self.engine.orphan_add(tx, ino)?;
            } else {
                return self.engine.free_inode(tx, ino, rec);
            }
        }
        self.engine.write_inode(tx, ino, rec)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        if name == b"." {
            // "." of any inode, not only of directories: the kernel asks this way when it
            // turns a file handle (open_by_handle_at, NFS export) back into an inode it no
            // longer caches. A freed inode is not found; a reused one has a new generation.
            {
                let _g = self.engine.lock_read(parent);
                self.engine.read_inode(parent)?;
                self.add_lookup(parent)?;
            }
            return self.getattr(parent).inspect_err(|_| {
                let _ = self.forget(parent, 1);
            });
        }
        let ino = {
            let _g = self.engine.lock_read(parent);
            let dir = self.read_dir(parent)?;
            let ino = match name {
                b".." => dir.parent.get(),
                _ => {
                    self.engine
                        .dir_lookup(&dir, name)?
                        .ok_or(Error::NotFound)?
                        .0
                }
            };
            // Counted while the entry is locked, so the inode cannot be freed before we reply.
            self.add_lookup(ino)?;
            ino
        };
        match self.getattr(ino) {
            Ok(a) => Ok(a),
            Err(e) => {
                self.forget(ino, 1)?;
                Err(e)
            }
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let _g = self.engine.lock_read(ino);
        Ok(attr_of(ino, &self.engine.read_inode(ino)?))
    }

    pub fn setattr(&self, ino: u64, s: &SetAttr, by: &Changer) -> Result<Attr> {
        // A truncate frees space: it may use the last blocks of a full image.
        let tx = if s.size.is_some() {
            self.engine.begin_delete(OP_BLOCKS)?
        } else {
            self.engine.begin(OP_BLOCKS)?
        };
        let _g = self.engine.lock_write(ino);
        let mut rec = self.engine.read_inode(ino)?;
        let t = now_time();
        let mut changed = false;
        if let Some(size) = s.size {
            if rec.is_dir() {
                return Err(Error::IsDir);
            }
            if rec.file_type() != libc::S_IFREG {
                return Err(Error::Invalid);
            }
            self.truncate(&tx, ino, &mut rec, size)?;
            set_mtime_ctime(&mut rec, t);
            self.drop_privileges(&tx, &mut rec, by, false)?;
            changed = true;
        }
        // chown drops set-ID bits whoever calls it (mode bits given with it still win below).
        if s.uid.is_some() || s.gid.is_some() {
            self.drop_privileges(&tx, &mut rec, by, true)?;
        }
        // A SETATTR that sets nothing is what is left of the kernel's own request to drop
        // privileges (before fallocate, copy_file_range, a write, chown(f, -1, -1)) once it
        // leaves that to the daemon: drop them as for a write by the caller.
        let sets_nothing = s.mode.is_none()
            && s.uid.is_none()
            && s.gid.is_none()
            && s.size.is_none()
            && s.atime.is_none()
            && s.mtime.is_none();
        if sets_nothing {
            self.drop_privileges(&tx, &mut rec, by, false)?;
            changed |= by.dropped.get();
        }
        if let Some(mode) = s.mode {
            rec.mode = ((rec.mode.get() & libc::S_IFMT) | (mode & 0o7777)).into();
            self.acl_chmod(&tx, ino, &mut rec)?;
            changed = true;
        }
        if let Some(uid) = s.uid {
            rec.uid = uid.into();
            changed = true;
        }
        if let Some(gid) = s.gid {
            rec.gid = gid.into();
            changed = true;
        }
        let resolve = |st: SetTime| match st {
            SetTime::Now => t,
            SetTime::At(x) => x,
        };
        if let Some(a) = s.atime {
            let a = resolve(a);
            rec.atime_sec = a.sec.into();
            rec.atime_nsec = a.nsec.into();
            changed = true;
        }
        if let Some(m) = s.mtime {
            let m = resolve(m);
            rec.mtime_sec = m.sec.into();
            rec.mtime_nsec = m.nsec.into();
            changed = true;
        }
        if changed {
            set_ctime(&mut rec, s.ctime.unwrap_or(t));
        } else if let Some(c) = s.ctime {
            set_ctime(&mut rec, c);
        }
        self.engine.write_inode(&tx, ino, &mut rec)?;
        Ok(attr_of(ino, &rec))
    }

    /// Drops what a write, truncate or chown takes from a regular file, as the kernel's VFS
    /// does on tmpfs (with FUSE_HANDLE_KILLPRIV_V2 the kernel leaves it to the daemon, see the
    /// adapter's `init`): file capabilities always; the set-user-ID bit on chown or when the
    /// changer lacks `CAP_FSETID`; the set-group-ID bit in the same cases when the group may
    /// execute the file, else (the bit then marks mandatory locking) only when the changer is
    /// neither privileged nor in the file's group.
    fn drop_privileges(&self, tx: &Tx, rec: &mut Inode, by: &Changer, chown: bool) -> Result<()> {
        if rec.file_type() != libc::S_IFREG {
            return Ok(());
        }
        let mode = rec.mode.get();
        if mode & (libc::S_ISUID | libc::S_ISGID) != 0 && (chown || !by.privileged) {
            let mut kept = mode & !libc::S_ISUID;
            if mode & libc::S_ISGID != 0
                && (mode & libc::S_IXGRP != 0 || !(by.privileged || (by.in_group)(rec.gid.get())))
            {
                kept &= !libc::S_ISGID;
            }
            if kept != mode {
                rec.mode = kept.into();
                by.dropped.set(true);
            }
        }
        if rec.xattr_block.get() != 0 {
            match self.engine.xattr_remove(tx, rec, b"security.capability") {
                Ok(()) => by.dropped.set(true),
                Err(Error::NoAttr) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Changes the size of a locked regular file: frees whole blocks past the end and zeroes
    /// the tail of the last block, so bytes past EOF always read as zero.
    fn truncate(&self, tx: &Tx, ino: u64, rec: &mut Inode, size: u64) -> Result<()> {
        if size > MAX_FILE_SIZE {
            return Err(Error::TooBig);
        }
        let old = rec.size.get();
        if size < old {
            let keep_blocks = size.div_ceil(BLOCK_SIZE);
            self.engine.punch_blocks(tx, rec, keep_blocks, u64::MAX)?;
            if !size.is_multiple_of(BLOCK_SIZE) {
                self.engine
                    .zero_range(tx, ino, rec, size, BLOCK_SIZE - size % BLOCK_SIZE)?;
            }
        }
        rec.size = size.into();
        Ok(())
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let _g = self.engine.lock_read(ino);
        let rec = self.engine.read_inode(ino)?;
        if rec.file_type() != libc::S_IFLNK {
            return Err(Error::Invalid);
        }
        let size = rec.size.get();
        if size > SYMLINK_MAX as u64 {
            return Err(Error::corrupt(format!("symlink {ino} of size {size}")));
        }
        self.read_into_vec(&rec, 0, size)
    }

    fn read_into_vec(&self, rec: &Inode, off: u64, len: u64) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len as usize);
        let mut pos = off;
        while pos < off + len {
            match self.engine.data_run(rec, pos, off + len - pos)? {
                DataRun::Mapped(b) => {
                    out.extend_from_slice(b);
                    pos += b.len() as u64;
                }
                DataRun::Hole(n) => {
                    out.resize(out.len() + n as usize, 0);
                    pos += n;
                }
            }
        }
        Ok(out)
    }

    /// Creates a node of any type under `parent` (the shared part of create, mknod, mkdir,
    /// symlink). `init` fills in type-specific content before the entry becomes visible.
    fn make_node(
        &self,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        ctx: Ctx,
        init: &dyn Fn(&Tx, u64, &mut Inode) -> Result<()>,
    ) -> Result<Attr> {
        check_name(name)?;
        let tx = self.engine.begin(OP_BLOCKS)?;
        let _g = self.engine.lock_write(parent);
        let mut dir = self.read_dir(parent)?;
        if dir.nlink.get() == 0 {
            return Err(Error::NotFound);
        }
        if self.engine.dir_lookup(&dir, name)?.is_some() {
            return Err(Error::Exists);
        }
        tx.reserve_more(self.engine.dir_insert_cost(&dir))?;
        let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir && at_link_limit(&dir) {
            return Err(Error::TooManyLinks);
        }
        // BSD group semantics for setgid directories, as tmpfs/ext4 do.
        let parent_sgid = dir.mode.get() & libc::S_ISGID != 0;
        let gid = if parent_sgid { dir.gid.get() } else { ctx.gid };
        let mode = if parent_sgid && is_dir {
            mode | libc::S_ISGID
        } else {
            mode
        };
        let inherited = self.inherit(parent, &dir, mode, ctx.umask)?;
        let mode = inherited.mode;
        let (ino, mut rec) = self.engine.alloc_inode(
            &tx,
            &NewInode {
                mode,
                uid: ctx.uid,
                gid,
                rdev,
            },
        )?;
        let result = (|| {
            for (name, value) in [
                (acl::ACCESS, &inherited.access),
                (acl::DEFAULT, &inherited.default),
            ] {
                if let Some(v) = value {
                    self.engine
                        .xattr_set(&tx, &mut rec, name, v, SetMode::Any)?;
                }
            }
            init(&tx, ino, &mut rec)?;
            self.engine.write_inode(&tx, ino, &mut rec)?;
            self.engine
                .dir_insert(&tx, &mut dir, name, ino, dtype_of_mode(mode))?;
            Ok(())
        })();
        if let Err(e) = result {
            self.engine.free_inode(&tx, ino, &mut rec)?;
            self.engine.write_inode(&tx, parent, &mut dir)?;
            return Err(e);
        }
        let t = Time {
            sec: rec.ctime_sec.get(),
            nsec: rec.ctime_nsec.get(),
        };
        set_mtime_ctime(&mut dir, t);
        if is_dir {
            dir.nlink = (dir.nlink.get() + 1).into();
        }
        self.engine.write_inode(&tx, parent, &mut dir)?;
        self.add_lookup(ino)?;
        Ok(attr_of(ino, &rec))
    }

    pub fn mknod(&self, parent: u64, name: &[u8], mode: u32, rdev: u32, ctx: Ctx) -> Result<Attr> {
        let t = mode & libc::S_IFMT;
        let mode = if t == 0 { mode | libc::S_IFREG } else { mode };
        match mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR | libc::S_IFBLK => {}
            _ => return Err(Error::Invalid),
        }
        self.make_node(parent, name, mode, rdev, ctx, &|_, _, _| Ok(()))
    }

    pub fn create(&self, parent: u64, name: &[u8], mode: u32, ctx: Ctx) -> Result<Attr> {
        let mode = libc::S_IFREG | (mode & 0o7777);
        self.make_node(parent, name, mode, 0, ctx, &|_, _, _| Ok(()))
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, ctx: Ctx) -> Result<Attr> {
        let mode = libc::S_IFDIR | (mode & 0o7777);
        self.make_node(parent, name, mode, 0, ctx, &|_, _, rec| {
            self.engine.dir_init(rec, parent);
            rec.nlink = 2.into();
            Ok(())
        })
    }

    pub fn symlink(&self, parent: u64, name: &[u8], target: &[u8], ctx: Ctx) -> Result<Attr> {
        if target.len() > SYMLINK_MAX {
            return Err(Error::NameTooLong);
        }
        if target.is_empty() {
            return Err(Error::NotFound);
        }
        let mode = libc::S_IFLNK | 0o777;
        self.make_node(parent, name, mode, 0, ctx, &|tx, ino, rec| {
            self.engine.write_data(tx, ino, rec, 0, target)?;
            rec.size = (target.len() as u64).into();
            Ok(())
        })
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> Result<Attr> {
        check_name(newname)?;
        let tx = self.engine.begin(OP_BLOCKS)?;
        let _g = self.engine.lock_many(&[ino, newparent]);
        let mut dir = self.read_dir(newparent)?;
        let mut rec = self.engine.read_inode(ino)?;
        if rec.is_dir() {
            return Err(Error::NotPermitted);
        }
        if rec.nlink.get() == 0 || dir.nlink.get() == 0 {
            return Err(Error::NotFound);
        }
        if at_link_limit(&rec) {
            return Err(Error::TooManyLinks);
        }
        if self.engine.dir_lookup(&dir, newname)?.is_some() {
            return Err(Error::Exists);
        }
        tx.reserve_more(self.engine.dir_insert_cost(&dir))?;
        self.engine
            .dir_insert(&tx, &mut dir, newname, ino, dtype_of_mode(rec.mode.get()))?;
        let t = now_time();
        rec.nlink = (rec.nlink.get() + 1).into();
        set_ctime(&mut rec, t);
        set_mtime_ctime(&mut dir, t);
        self.engine.write_inode(&tx, ino, &mut rec)?;
        self.engine.write_inode(&tx, newparent, &mut dir)?;
        self.add_lookup(ino)?;
        Ok(attr_of(ino, &rec))
    }

    /// Finds `name` in `parent` and locks both; retries if the entry changed in between.
    fn locked_child(&self, parent: u64, name: &[u8]) -> Result<(crate::engine::Locked<'_>, u64)> {
        loop {
            let child = {
                let _g = self.engine.lock_read(parent);
                let dir = self.read_dir(parent)?;
                self.engine
                    .dir_lookup(&dir, name)?
                    .ok_or(Error::NotFound)?
                    .0
            };
            let g = self.engine.lock_many(&[parent, child]);
            let dir = self.read_dir(parent)?;
            if self.engine.dir_lookup(&dir, name)?.map(|(i, _)| i) == Some(child) {
                return Ok((g, child));
            }
        }
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        let tx = self.engine.begin_delete(OP_BLOCKS)?;
        let (_g, child) = self.locked_child(parent, name)?;
        let mut dir = self.read_dir(parent)?;
        let mut rec = self.engine.read_inode(child)?;
        if rec.is_dir() {
            return Err(Error::IsDir);
        }
        self.engine.dir_remove(&tx, &mut dir, name)?;
        let t = now_time();
        set_mtime_ctime(&mut dir, t);
        self.engine.write_inode(&tx, parent, &mut dir)?;
        self.drop_link(&tx, child, &mut rec, t)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        if name.len() > NAME_MAX {
            return Err(Error::NameTooLong);
        }
        if name == b"." {
            return Err(Error::Invalid);
        }
        if name == b".." {
            return Err(Error::NotEmpty);
        }
        let tx = self.engine.begin_delete(OP_BLOCKS)?;
        let (_g, child) = self.locked_child(parent, name)?;
        let mut dir = self.read_dir(parent)?;
        let mut rec = self.engine.read_inode(child)?;
        if !rec.is_dir() {
            return Err(Error::NotDir);
        }
        if self.dir_has_entries(child, &rec)? {
            return Err(Error::NotEmpty);
        }
        self.engine.dir_remove(&tx, &mut dir, name)?;
        let t = now_time();
        set_mtime_ctime(&mut dir, t);
        dir.nlink = dir.nlink.get().saturating_sub(1).into();
        self.engine.write_inode(&tx, parent, &mut dir)?;
        rec.nlink = 1.into();
        self.drop_link(&tx, child, &mut rec, t)
    }

    /// True if directory `dir` is `ancestor` or lies below it.
    fn is_within(&self, dir: u64, ancestor: u64) -> Result<bool> {
        // The walk follows parent fields read from the image: it stops at the first inode seen
        // twice, not after a number of steps a damaged counter could make endless.
        let mut seen = std::collections::HashSet::new();
        let mut cur = dir;
        loop {
            if cur == ancestor {
                return Ok(true);
            }
            if cur == ROOT_INO {
                return Ok(false);
            }
            if !seen.insert(cur) {
                return Err(self
                    .engine
                    .corrupt(format!("directory {dir}: parent chain loops at {cur}")));
            }
            let _g = self.engine.lock_read(cur);
            let rec = self.engine.read_inode(cur)?;
            if !rec.is_dir() {
                return Err(self.engine.corrupt(format!(
                    "directory {dir}: parent chain reaches non-directory {cur}"
                )));
            }
            cur = rec.parent.get();
        }
    }

    /// Whether directory `ino` holds any entry, from its records (not from its live-entry
    /// counter, which a damaged image could have wrong: removing a directory that still has
    /// entries would orphan them all).
    fn dir_has_entries(&self, ino: u64, rec: &Inode) -> Result<bool> {
        let mut any = false;
        self.engine.dir_for_each(rec, 0, &mut |_| {
            any = true;
            Ok(false)
        })?;
        if any != (rec.dir_live.get() > 0) {
            // Marks the image for fsck --repair; the records decide.
            let e = self.engine.corrupt(format!(
                "directory {ino} counts {} entries, holds {}",
                rec.dir_live,
                if any { "some" } else { "none" }
            ));
            log::error!("image corruption: {e}");
        }
        Ok(any)
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: RenameFlags,
    ) -> Result<()> {
        check_name(name)?;
        check_name(newname)?;
        if flags.exchange && (flags.noreplace || flags.whiteout.is_some()) {
            return Err(Error::Invalid);
        }
        // Begun before the rename lock: a commit waits for running transactions, so none may
        // wait for the lock while another holds it and waits for the commit.
        let tx = self.engine.begin(if flags.whiteout.is_some() {
            3 * OP_BLOCKS
        } else {
            2 * OP_BLOCKS
        })?;
        let _r = self.rename_lock.lock();
        let find = |p: u64, n: &[u8]| -> Result<Option<(u64, u8)>> {
            let _g = self.engine.lock_read(p);
            let d = self.read_dir(p)?;
            self.engine.dir_lookup(&d, n)
        };
        loop {
            let (src, src_kind) = find(parent, name)?.ok_or(Error::NotFound)?;
            let dst = find(newparent, newname)?;
            if flags.exchange && dst.is_none() {
                return Err(Error::NotFound);
            }
            if flags.noreplace && dst.is_some() {
                return Err(Error::Exists);
            }
            if dst.map(|d| d.0) == Some(src) {
                return Ok(()); // Same inode: POSIX says do nothing.
            }
            let src_is_dir = src_kind == libc::DT_DIR;
            let dst_is_dir = dst.is_some_and(|d| d.1 == libc::DT_DIR);
            // A directory must not move below itself (checked while renames are excluded).
            if src_is_dir && parent != newparent && self.is_within(newparent, src)? {
                return Err(Error::Invalid);
            }
            if flags.exchange
                && dst_is_dir
                && parent != newparent
                && self.is_within(parent, dst.map(|d| d.0).unwrap_or(0))?
            {
                return Err(Error::Invalid);
            }
            let mut inos = vec![parent, newparent, src];
            if let Some((d, _)) = dst {
                inos.push(d);
            }
            let _g = self.engine.lock_many(&inos);
            // Entries can have changed between lookup and lock only through unlink/create (renames
            // are excluded): re-verify.
            let mut pdir = self.read_dir(parent)?;
            if self.engine.dir_lookup(&pdir, name)?.map(|x| x.0) != Some(src) {
                return Err(Error::NotFound);
            }
            let mut src_rec = self.engine.read_inode(src)?;
            let same_dir = parent == newparent;
            let mut ndir = if same_dir {
                None
            } else {
                Some(self.read_dir(newparent)?)
            };
            let cur_dst = {
                let d = ndir.as_ref().unwrap_or(&pdir);
                self.engine.dir_lookup(d, newname)?
            };
            if cur_dst.map(|x| x.0) != dst.map(|x| x.0) {
                continue; // A create or unlink of the target raced with us: look again.
            }
            if dst.is_none() {
                tx.reserve_more(self.engine.dir_insert_cost(ndir.as_ref().unwrap_or(&pdir)))?;
            }
            // A directory moving to another parent adds a link there: refuse rather than wrap
            // a count that a damaged image (or 2^32 subdirectories) put at the limit.
            let gains_link = match (&ndir, flags.exchange) {
                (Some(nd), false) => src_is_dir && at_link_limit(nd),
                (Some(nd), true) => {
                    (src_is_dir && !dst_is_dir && at_link_limit(nd))
                        || (dst_is_dir && !src_is_dir && at_link_limit(&pdir))
                }
                (None, _) => false,
            };
            if gains_link {
                return Err(Error::TooManyLinks);
            }
            let t = now_time();
            let mut dst_rec = match dst {
                Some((d, _)) => Some(self.engine.read_inode(d)?),
                None => None,
            };
            if let (Some(dr), false) = (&dst_rec, flags.exchange) {
                if dr.is_dir() && !src_is_dir {
                    return Err(Error::IsDir);
                }
                if !dr.is_dir() && src_is_dir {
                    return Err(Error::NotDir);
                }
                if dr.is_dir() && self.dir_has_entries(dst.map_or(0, |d| d.0), dr)? {
                    return Err(Error::NotEmpty);
                }
            }
            let src_dtype = dtype_of_mode(src_rec.mode.get());
            if flags.exchange {
                let (d, _) = dst.ok_or(Error::NotFound)?;
                let dr = dst_rec.as_mut().ok_or(Error::NotFound)?;
                let dst_dtype = dtype_of_mode(dr.mode.get());
                self.engine
                    .dir_replace(&tx, &mut pdir, name, d, dst_dtype)?;
                {
                    let target_dir = ndir.as_mut().unwrap_or(&mut pdir);
                    self.engine
                        .dir_replace(&tx, target_dir, newname, src, src_dtype)?;
                }
                if !same_dir {
                    if src_is_dir {
                        src_rec.parent = newparent.into();
                    }
                    if dr.is_dir() {
                        dr.parent = parent.into();
                    }
                    let nd = ndir.as_mut().ok_or(Error::Invalid)?;
                    let delta = i64::from(src_is_dir) - i64::from(dr.is_dir());
                    let clamp = |n: i64| n.clamp(0, i64::from(u32::MAX)) as u32;
                    pdir.nlink = clamp(i64::from(pdir.nlink.get()) - delta).into();
                    nd.nlink = clamp(i64::from(nd.nlink.get()) + delta).into();
                }
                set_ctime(dr, t);
                self.engine.write_inode(&tx, d, dr)?;
            } else {
                {
                    let target_dir = ndir.as_mut().unwrap_or(&mut pdir);
                    if dst.is_some() {
                        self.engine
                            .dir_replace(&tx, target_dir, newname, src, src_dtype)?;
                    } else {
                        self.engine
                            .dir_insert(&tx, target_dir, newname, src, src_dtype)?;
                    }
                }
                match flags.whiteout {
                    Some(owner) => {
                        let (wino, mut wrec) = self.engine.alloc_inode(
                            &tx,
                            &NewInode {
                                mode: libc::S_IFCHR,
                                uid: owner.uid,
                                gid: owner.gid,
                                rdev: 0,
                            },
                        )?;
                        self.engine.write_inode(&tx, wino, &mut wrec)?;
                        self.engine
                            .dir_replace(&tx, &mut pdir, name, wino, libc::DT_CHR)?;
                    }
                    None => {
                        self.engine.dir_remove(&tx, &mut pdir, name)?;
                    }
                }
                if src_is_dir && !same_dir {
                    src_rec.parent = newparent.into();
                    pdir.nlink = pdir.nlink.get().saturating_sub(1).into();
                    if let Some(nd) = ndir.as_mut() {
                        nd.nlink = nd.nlink.get().saturating_add(1).into();
                    }
                }
                if let (Some((d, _)), Some(dr)) = (dst, dst_rec.as_mut()) {
                    if dr.is_dir() {
                        // The replaced directory's link from its parent goes away.
                        let nd = ndir.as_mut().unwrap_or(&mut pdir);
                        nd.nlink = nd.nlink.get().saturating_sub(1).into();
                        dr.nlink = 1.into();
                    }
                    self.drop_link(&tx, d, dr, t)?;
                }
            }
            set_ctime(&mut src_rec, t);
            self.engine.write_inode(&tx, src, &mut src_rec)?;
            set_mtime_ctime(&mut pdir, t);
            self.engine.write_inode(&tx, parent, &mut pdir)?;
            if let Some(nd) = ndir.as_mut() {
                set_mtime_ctime(nd, t);
                self.engine.write_inode(&tx, newparent, nd)?;
            }
            return Ok(());
        }
    }

    /// Reads up to `size` bytes at `off`, handing `f` one slice: straight from the mapping when
    /// the range is contiguous in the image, else assembled.
    pub fn read<R>(&self, ino: u64, off: u64, size: u32, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        let _g = self.engine.lock_read(ino);
        let rec = self.engine.read_inode(ino)?;
        if rec.is_dir() {
            return Err(Error::IsDir);
        }
        let fsize = rec.size.get();
        if off >= fsize {
            return Ok(f(&[]));
        }
        let len = u64::from(size).min(fsize - off);
        if let DataRun::Mapped(b) = self.engine.data_run(&rec, off, len)?
            && b.len() as u64 == len
        {
            return Ok(f(b));
        }
        let buf = self.read_into_vec(&rec, off, len)?;
        Ok(f(&buf))
    }

    /// Writes `data` at `off`, dropping what a write by `by` drops (set-ID bits, capabilities).
    /// `by` is `None` for the write-back of pages stored through a mapping, which drops nothing
    /// (as on tmpfs, where stores through a mapping never touch set-ID bits or capabilities).
    pub fn write(&self, ino: u64, off: u64, data: &[u8], by: Option<&Changer>) -> Result<u32> {
        self.write_tracked(ino, off, data, by).map(|w| w.len)
    }

    /// [`Fs::write`], also saying whether the file's block count changed.
    pub fn write_tracked(
        &self,
        ino: u64,
        off: u64,
        data: &[u8],
        by: Option<&Changer>,
    ) -> Result<Written> {
        let tx = self.begin_write(ino, off, data.len() as u64)?;
        let _g = self.engine.lock_write(ino);
        let mut rec = self.engine.read_inode(ino)?;
        if rec.is_dir() {
            return Err(Error::IsDir);
        }
        let blocks_before = rec.blocks.get();
        let end = off.checked_add(data.len() as u64).ok_or(Error::TooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(Error::TooBig);
        }
        let r = self.engine.write_data(&tx, ino, &mut rec, off, data);
        // Applied to the record before it is written back, but its error only after: the data
        // and the new size must be recorded either way.
        let dropped = match by {
            Some(by) if r.is_ok() => self.drop_privileges(&tx, &mut rec, by, false),
            _ => Ok(()),
        };
        if r.is_ok() && end > rec.size.get() {
            rec.size = end.into();
        }
        if !self.kernel_owns_write_times {
            set_mtime_ctime(&mut rec, now_time());
        }
        self.engine.write_inode(&tx, ino, &mut rec)?;
        dropped?;
        r.map(|_| Written {
            len: data.len() as u32,
            blocks_changed: rec.blocks.get() != blocks_before,
        })
    }

    /// Begins a transaction for writing `len` bytes at `off` of `ino`. On a full host disk the
    /// reservation shrinks to what the range really needs (its holes, pinned blocks and
    /// copies), so overwriting existing data keeps working.
    fn begin_write(&self, ino: u64, off: u64, len: u64) -> Result<Tx<'_>> {
        match self.engine.begin(write_blocks(len)) {
            Err(Error::NoSpace) => {
                let need = {
                    let _g = self.engine.lock_read(ino);
                    let rec = self.engine.read_inode(ino)?;
                    self.engine.write_cost(&rec, off, len)?
                };
                self.engine.begin_delete(need + OP_BLOCKS)
            }
            r => r,
        }
    }

    /// Sets a file's creation time (restoring an image: `mmapfs upgrade`).
    pub fn set_birth_time(&self, ino: u64, t: Time) -> Result<()> {
        let tx = self.engine.begin(OP_BLOCKS)?;
        let _g = self.engine.lock_write(ino);
        let mut rec = self.engine.read_inode(ino)?;
        rec.btime_sec = t.sec.into();
        rec.btime_nsec = t.nsec.into();
        self.engine.write_inode(&tx, ino, &mut rec)
    }

    pub fn fsync(&self, ino: u64, datasync: bool) -> Result<()> {
        self.engine.sync_inode(ino, datasync)
    }

    /// Lists a directory from cookie `offset`. `emit` returns false when the reply is full.
    /// With `plus`, each emitted entry (except `.` and `..`) carries attributes and counts as a
    /// kernel reference.
    /// Opens a directory stream on `ino`; returns its handle (never 0).
    pub fn opendir(&self, ino: u64) -> Result<u64> {
        let end = self.entries_end(ino)?;
        let mut st = self.dir_streams.lock();
        st.next += 1;
        let fh = st.next;
        st.end.insert(fh, end);
        Ok(fh)
    }

    /// Where directory `ino`'s entry records end now: a stream begun now lists up to here.
    fn entries_end(&self, ino: u64) -> Result<u64> {
        let _g = self.engine.lock_read(ino);
        Ok(self.read_dir(ino)?.dir_entries_end.get())
    }

    pub fn releasedir(&self, fh: u64) {
        self.dir_streams.lock().end.remove(&fh);
    }

    /// Lists `ino` from `offset` without a stream bound (the whole directory as it is).
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        plus: bool,
        emit: &mut dyn FnMut(ListEntry<'_>) -> bool,
    ) -> Result<()> {
        self.readdir_stream(ino, 0, offset, plus, emit)
    }

    /// Lists `ino` from `offset` for stream `fh` (from `opendir`; 0 for none): entries added
    /// since the stream began or was rewound (offset 0) are not listed.
    pub fn readdir_stream(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        plus: bool,
        emit: &mut dyn FnMut(ListEntry<'_>) -> bool,
    ) -> Result<()> {
        let until = match fh {
            0 => u64::MAX,
            _ if offset == 0 => {
                // rewinddir: the stream sees the directory as it is now.
                let end = self.entries_end(ino)?;
                self.dir_streams.lock().end.insert(fh, end);
                end
            }
            _ => self
                .dir_streams
                .lock()
                .end
                .get(&fh)
                .copied()
                .unwrap_or(u64::MAX),
        };
        let (parent, self_attr) = {
            let _g = self.engine.lock_read(ino);
            let d = self.read_dir(ino)?;
            (d.parent.get(), attr_of(ino, &d))
        };
        if offset == 0 {
            let e = ListEntry {
                name: b".",
                ino,
                kind: FileKind::Dir,
                next: 1,
                attr: plus.then_some(&self_attr),
            };
            if !emit(e) {
                return Ok(());
            }
        }
        if offset <= 1 {
            let pattr = if plus {
                Some(self.getattr(parent)?)
            } else {
                None
            };
            let e = ListEntry {
                name: b"..",
                ino: parent,
                kind: FileKind::Dir,
                next: 2,
                attr: pattr.as_ref(),
            };
            if !emit(e) {
                return Ok(());
            }
        }
        let mut pos = offset.max(COOKIE_BASE) - COOKIE_BASE;
        loop {
            let mut batch: Vec<DirEntry> = Vec::new();
            {
                let _g = self.engine.lock_read(ino);
                let d = self.read_dir(ino)?;
                self.engine.dir_for_each_until(&d, pos, until, &mut |e| {
                    batch.push(e);
                    Ok(batch.len() < READDIR_BATCH)
                })?;
                if plus {
                    for e in &batch {
                        self.add_lookup(e.ino)?;
                    }
                }
            }
            if batch.is_empty() {
                return Ok(());
            }
            let mut iter = batch.into_iter();
            while let Some(e) = iter.next() {
                pos = e.next;
                if !legal_name(&e.name) {
                    // Left out, so that the rest of the directory can still be listed.
                    let err = self.engine.corrupt(format!(
                        "directory {ino}: entry {:?} has an illegal name",
                        String::from_utf8_lossy(&e.name)
                    ));
                    log::error!("image corruption: {err}");
                    if plus {
                        self.forget(e.ino, 1)?;
                    }
                    continue;
                }
                let attr = if plus {
                    match self.getattr(e.ino) {
                        Ok(a) => Some(a),
                        Err(_) => {
                            self.forget(e.ino, 1)?;
                            continue;
                        }
                    }
                } else {
                    None
                };
                let le = ListEntry {
                    name: &e.name,
                    ino: e.ino,
                    kind: kind_of_dtype(e.kind),
                    next: e.next + COOKIE_BASE,
                    attr: attr.as_ref(),
                };
                if !emit(le) {
                    if plus {
                        self.forget(e.ino, 1)?;
                        for rest in iter {
                            self.forget(rest.ino, 1)?;
                        }
                    }
                    return Ok(());
                }
            }
        }
    }

    pub fn statfs(&self) -> Statfs {
        let sb = self.engine.superblock();
        let total = self.engine.total_blocks();
        let free = sb.free_blocks.get();
        let used = sb.used_inodes.get();
        let files = used + free * INODES_PER_BLOCK;
        Statfs {
            blocks: total,
            bfree: free,
            files,
            ffree: files - used,
            bsize: BLOCK_SIZE as u32,
            namelen: NAME_MAX as u32,
        }
    }

    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        let known = FALLOC_KEEP_SIZE | FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE;
        if mode & !known != 0 {
            return Err(Error::NotSupported);
        }
        if len == 0 {
            return Err(Error::Invalid);
        }
        let end = off.checked_add(len).ok_or(Error::TooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(Error::TooBig);
        }
        let punch = mode & FALLOC_PUNCH_HOLE != 0;
        let tx = if punch {
            self.engine.begin_delete(OP_BLOCKS)?
        } else {
            self.begin_write(ino, off, len)?
        };
        let _g = self.engine.lock_write(ino);
        let mut rec = self.engine.read_inode(ino)?;
        if rec.is_dir() {
            return Err(Error::IsDir);
        }
        if rec.file_type() != libc::S_IFREG {
            return Err(Error::NoData);
        }
        if punch && mode & FALLOC_KEEP_SIZE == 0 {
            return Err(Error::NotSupported);
        }
        if punch || mode & FALLOC_ZERO_RANGE != 0 {
            let first_full = off.div_ceil(BLOCK_SIZE);
            let end_full = end / BLOCK_SIZE;
            if first_full < end_full {
                self.engine
                    .punch_blocks(&tx, &mut rec, first_full, end_full)?;
                let head = first_full * BLOCK_SIZE - off;
                self.engine.zero_range(&tx, ino, &mut rec, off, head)?;
                self.engine.zero_range(
                    &tx,
                    ino,
                    &mut rec,
                    end_full * BLOCK_SIZE,
                    end - end_full * BLOCK_SIZE,
                )?;
            } else {
                self.engine.zero_range(&tx, ino, &mut rec, off, len)?;
            }
        }
        if !punch {
            self.engine.allocate_range(&tx, ino, &mut rec, off, len)?;
            if mode & FALLOC_KEEP_SIZE == 0 && end > rec.size.get() {
                rec.size = end.into();
            }
        }
        let t = now_time();
        if mode & FALLOC_KEEP_SIZE == 0 || punch {
            set_mtime_ctime(&mut rec, t);
        }
        self.engine.write_inode(&tx, ino, &mut rec)
    }

    /// SEEK_DATA / SEEK_HOLE.
    pub fn lseek(&self, ino: u64, off: u64, whence: i32) -> Result<u64> {
        self.seeker().lseek(ino, off, whence)
    }

    /// SEEK_DATA / SEEK_HOLE for another thread (see `FuseAdapter::lseek`).
    pub fn seeker(&self) -> Seeker {
        Seeker(Arc::clone(&self.engine))
    }

    pub fn copy_file_range(
        &self,
        ino_in: u64,
        off_in: u64,
        ino_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u64> {
        let tx = self.begin_write(ino_out, off_out, len)?;
        let _g = self.engine.lock_many(&[ino_in, ino_out]);
        let src = self.engine.read_inode(ino_in)?;
        let mut dst = self.engine.read_inode(ino_out)?;
        if src.is_dir() || dst.is_dir() {
            return Err(Error::IsDir);
        }
        let size = src.size.get();
        if off_in >= size || len == 0 {
            return Ok(0);
        }
        let len = len.min(size - off_in);
        let end_out = off_out.checked_add(len).ok_or(Error::TooBig)?;
        if end_out > MAX_FILE_SIZE {
            return Err(Error::TooBig);
        }
        if ino_in == ino_out && off_in < end_out && off_out < off_in + len {
            return Err(Error::Invalid);
        }
        let mut done = 0;
        while done < len {
            let run = if ino_in == ino_out {
                self.engine.data_run(&dst, off_in + done, len - done)?
            } else {
                self.engine.data_run(&src, off_in + done, len - done)?
            };
            match run {
                DataRun::Mapped(b) => {
                    let n = b.len() as u64;
                    // Copy through a bounce buffer only when source and destination are the same
                    // inode (the tree may change under the borrowed slice).
                    if ino_in == ino_out {
                        let tmp = b.to_vec();
                        self.engine
                            .write_data(&tx, ino_out, &mut dst, off_out + done, &tmp)?;
                    } else {
                        self.engine
                            .write_data(&tx, ino_out, &mut dst, off_out + done, b)?;
                    }
                    done += n;
                }
                DataRun::Hole(n) => {
                    self.engine
                        .zero_range(&tx, ino_out, &mut dst, off_out + done, n)?;
                    done += n;
                }
            }
        }
        if end_out > dst.size.get() {
            dst.size = end_out.into();
        }
        set_mtime_ctime(&mut dst, now_time());
        self.engine.write_inode(&tx, ino_out, &mut dst)?;
        Ok(len)
    }

    /// The inode flags `lsattr` shows (`FS_*_FL`), of those stored here: `A` (no atime
    /// updates) and `d` (no dump).
    pub fn get_flags(&self, ino: u64) -> Result<u32> {
        let _g = self.engine.lock_read(ino);
        let stored = self.engine.read_inode(ino)?.flags.get();
        Ok(USER_FLAGS
            .iter()
            .filter(|(_, bit)| stored & bit != 0)
            .map(|(fl, _)| fl)
            .sum())
    }

    /// `chattr`: sets the inode flags to `flags` (`FS_*_FL`). A flag not stored here
    /// (immutable, append-only, ...) is `EOPNOTSUPP`, as on filesystems without it.
    pub fn set_flags(&self, ino: u64, flags: u32) -> Result<()> {
        let known: u32 = USER_FLAGS.iter().map(|(fl, _)| fl).sum();
        if flags & !known != 0 {
            return Err(Error::NotSupported);
        }
        let tx = self.engine.begin(OP_BLOCKS)?;
        let _g = self.engine.lock_write(ino);
        let mut rec = self.engine.read_inode(ino)?;
        let mut stored = rec.flags.get();
        for &(fl, bit) in USER_FLAGS {
            stored = if flags & fl != 0 {
                stored | bit
            } else {
                stored & !bit
            };
        }
        if stored == rec.flags.get() {
            return Ok(());
        }
        rec.flags = stored.into();
        set_ctime(&mut rec, now_time());
        self.engine.write_inode(&tx, ino, &mut rec)
    }

    /// Supported namespaces: user, trusted, security, and the POSIX ACLs when they are on.
    fn check_xattr_name(&self, name: &[u8]) -> Result<()> {
        if name.len() > 255 {
            return Err(Error::Range);
        }
        if name == acl::ACCESS || name == acl::DEFAULT {
            return if self.acls {
                Ok(())
            } else {
                Err(Error::NotSupported)
            };
        }
        let ok = [&b"user."[..], b"trusted.", b"security."]
            .iter()
            .any(|p| name.len() > p.len() && name.starts_with(p));
        if ok { Ok(()) } else { Err(Error::NotSupported) }
    }

    /// A stored ACL of `ino`, if it has one.
    fn stored_acl(&self, ino: u64, rec: &Inode, name: &[u8]) -> Result<Option<Acl>> {
        if !self.acls || rec.xattr_block.get() == 0 {
            return Ok(None);
        }
        match self.engine.xattr_get(rec, name) {
            Ok(v) => Acl::parse(&v).map(Some).map_err(|_| {
                self.engine.corrupt(format!(
                    "inode {ino}: stored {} is not a valid ACL",
                    String::from_utf8_lossy(name)
                ))
            }),
            Err(Error::NoAttr) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// chmod keeps an access ACL in step with the new mode bits (`posix_acl_chmod`).
    fn acl_chmod(&self, tx: &Tx, ino: u64, rec: &mut Inode) -> Result<()> {
        let Some(mut a) = self.stored_acl(ino, rec, acl::ACCESS)? else {
            return Ok(());
        };
        a.chmod(rec.mode.get());
        self.engine
            .xattr_set(tx, rec, acl::ACCESS, &a.encode(), SetMode::Replace)
    }

    /// A new node's mode and ACLs: from the directory's default ACL when it has one, which
    /// then replaces the umask (POSIX.1e), else the mode less the umask.
    fn inherit(&self, parent: u64, dir: &Inode, mode: u32, umask: u32) -> Result<Inherited> {
        let kind = mode & libc::S_IFMT;
        let default = if kind == libc::S_IFLNK {
            None
        } else {
            self.stored_acl(parent, dir, acl::DEFAULT)?
        };
        let Some(default) = default else {
            let mode = if kind == libc::S_IFLNK {
                mode
            } else {
                mode & !(umask & 0o777)
            };
            return Ok(Inherited {
                mode,
                access: None,
                default: None,
            });
        };
        let mut access = default.clone();
        let mode = (mode & !0o777) | access.create_masq(mode);
        Ok(Inherited {
            mode,
            access: (!access.is_minimal()).then(|| access.encode()),
            default: (kind == libc::S_IFDIR).then(|| default.encode()),
        })
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        self.check_xattr_name(name)?;
        let mode = match flags {
            0 => SetMode::Any,
            libc::XATTR_CREATE => SetMode::Create,
            libc::XATTR_REPLACE => SetMode::Replace,
            _ => return Err(Error::Invalid),
        };
        let tx = self.engine.begin(OP_BLOCKS)?;
        let _g = self.engine.lock_write(ino);
        let mut rec = self.engine.read_inode(ino)?;
        if name == acl::ACCESS {
            // The mode bits follow the ACL; an ACL the mode says all of is not kept.
            let a = Acl::parse(value)?;
            rec.mode = ((rec.mode.get() & !0o777) | a.mode_bits()).into();
            if a.is_minimal() {
                match self.engine.xattr_remove(&tx, &mut rec, name) {
                    Ok(()) | Err(Error::NoAttr) => {}
                    Err(e) => return Err(e),
                }
            } else {
                self.engine.xattr_set(&tx, &mut rec, name, value, mode)?;
            }
        } else {
            if name == acl::DEFAULT {
                if !rec.is_dir() {
                    return Err(Error::AccessDenied);
                }
                Acl::parse(value)?;
            }
            self.engine.xattr_set(&tx, &mut rec, name, value, mode)?;
        }
        set_ctime(&mut rec, now_time());
        self.engine.write_inode(&tx, ino, &mut rec)
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        self.check_xattr_name(name)?;
        let _g = self.engine.lock_read(ino);
        let rec = self.engine.read_inode(ino)?;
        self.engine.xattr_get(&rec, name)
    }

    /// Attribute names, each followed by a NUL, as listxattr returns them.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>> {
        let _g = self.engine.lock_read(ino);
        let rec = self.engine.read_inode(ino)?;
        let mut out = Vec::new();
        for n in self.engine.xattr_list(&rec)? {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        self.check_xattr_name(name)?;
        let tx = self.engine.begin(OP_BLOCKS)?;
        let _g = self.engine.lock_write(ino);
        let mut rec = self.engine.read_inode(ino)?;
        self.engine.xattr_remove(&tx, &mut rec, name)?;
        set_ctime(&mut rec, now_time());
        self.engine.write_inode(&tx, ino, &mut rec)
    }
}

/// Permission checks for mounts without the kernel's `default_permissions` (the rules are
/// `crate::perm`'s): each reads what its check needs, under the inodes' read locks; the
/// operation follows separately, as it does after the kernel's own checks.
impl Fs {
    /// `ino` as a permission check by `c` sees it: its access ACL only when the check can
    /// depend on it.
    fn perm_target(&self, ino: u64, c: &Caller) -> Result<Target> {
        let _g = self.engine.lock_read(ino);
        let rec = self.engine.read_inode(ino)?;
        let (uid, gid, mode) = self
            .shown
            .apply(rec.uid.get(), rec.gid.get(), rec.mode.get());
        let acl = if perm::consults_acl(c, uid, mode) {
            self.stored_acl(ino, &rec, acl::ACCESS)?
        } else {
            None
        };
        Ok(Target {
            uid,
            gid,
            mode,
            acl,
        })
    }

    /// The inode `name` names in directory `parent` (the kernel gains no reference).
    fn child(&self, parent: u64, name: &[u8]) -> Result<Option<u64>> {
        let _g = self.engine.lock_read(parent);
        let dir = self.read_dir(parent)?;
        Ok(self.engine.dir_lookup(&dir, name)?.map(|(ino, _)| ino))
    }

    /// Whether `c` may read, write and/or execute `ino` (`perm::MAY_*` in `want`).
    pub fn may(&self, ino: u64, c: &Caller, want: u32) -> Result<()> {
        perm::permission(c, &self.perm_target(ino, c)?, want)
    }

    /// Whether `c` may create an entry in `parent`.
    pub fn may_create(&self, parent: u64, c: &Caller) -> Result<()> {
        perm::may_create(c, &self.perm_target(parent, c)?)
    }

    /// Whether `c` may remove `name` from `parent`; `NotFound` first, as the kernel's lookup
    /// finds that before any permission.
    pub fn may_delete(&self, parent: u64, name: &[u8], c: &Caller) -> Result<()> {
        let child = self.child(parent, name)?.ok_or(Error::NotFound)?;
        perm::may_delete(
            c,
            &self.perm_target(parent, c)?,
            &self.perm_target(child, c)?,
        )
    }

    /// Whether `c` may rename `name` in `parent` to `newname` in `newparent` (`vfs_rename`):
    /// remove the source; remove the target or create in its directory; and, when a directory
    /// changes parent, write to it (its ".." changes).
    pub fn may_rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        exchange: bool,
        c: &Caller,
    ) -> Result<()> {
        let src = self.child(parent, name)?.ok_or(Error::NotFound)?;
        let src = self.perm_target(src, c)?;
        perm::may_delete(c, &self.perm_target(parent, c)?, &src)?;
        let newdir = self.perm_target(newparent, c)?;
        let dst = match self.child(newparent, newname)? {
            Some(d) => {
                let d = self.perm_target(d, c)?;
                perm::may_delete(c, &newdir, &d)?;
                Some(d)
            }
            None => {
                perm::may_create(c, &newdir)?;
                None
            }
        };
        let is_dir = |t: &Target| t.mode & libc::S_IFMT == libc::S_IFDIR;
        if parent != newparent {
            if is_dir(&src) {
                perm::permission(c, &src, perm::MAY_WRITE)?;
            }
            if let Some(d) = dst.filter(|d| exchange && is_dir(d)) {
                perm::permission(c, &d, perm::MAY_WRITE)?;
            }
        }
        Ok(())
    }

    /// Whether `c` may link `ino` into `newparent`; `protected`: the kernel's protected
    /// hardlinks are on.
    pub fn may_link(&self, ino: u64, newparent: u64, c: &Caller, protected: bool) -> Result<()> {
        if protected {
            perm::may_link(c, &self.perm_target(ino, c)?)?;
        }
        self.may_create(newparent, c)
    }

    /// Whether `c` may change `ino` so; the mode to set instead of the asked one (see
    /// `perm::setattr`).
    pub fn may_setattr(&self, ino: u64, c: &Caller, ch: &AttrChange) -> Result<Option<u32>> {
        perm::setattr(c, &self.perm_target(ino, c)?, ch)
    }

    /// Whether `c` may read (or, `write`, change) the extended attribute `name` of `ino`.
    pub fn may_xattr(&self, ino: u64, name: &[u8], write: bool, c: &Caller) -> Result<()> {
        perm::xattr(c, &self.perm_target(ino, c)?, name, write)
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        // The committer thread holds the engine while it works (freeing orphans after a crash):
        // wait for it, so the image is not used after its owner is gone.
        self.engine.stop_committer();
    }
}

/// What a new node takes from its directory.
struct Inherited {
    mode: u32,
    /// Its access ACL (when the directory's default ACL says more than mode bits can).
    access: Option<Vec<u8>>,
    /// Its default ACL (a directory under a directory with one).
    default: Option<Vec<u8>>,
}
