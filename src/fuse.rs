//! The FUSE adapter: implements `fuser::Filesystem` by unpacking each request, calling the
//! core ([`Fs`]) and translating the result. No filesystem logic lives here.

use std::cell::OnceCell;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, Notifier, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use crate::error::Error;
use crate::fs::{
    Atime, Attr, Changer, Ctx, FS_NOATIME_FL, FS_NODUMP_FL, FileKind, Fs, SetAttr, SetTime, Time,
};
use crate::perm::{self, AttrChange, Caller, TimeChange};
use crate::stats::{Op, Stats};

/// How long the kernel may cache attributes and entries, including negative entries. Every
/// change goes through this mount (the image is locked exclusively) and the kernel invalidates
/// what its own requests change, so its cache cannot go stale behind its back.
const TTL: Duration = Duration::from_secs(60);
/// Largest write request (the kernel's limit here is 1 MiB = 256 pages).
pub const MAX_WRITE: u32 = 1 << 20;

/// Kernel-side settings chosen at mount (see README "FUSE settings").
#[derive(Clone, Copy, Debug)]
pub struct KernelOptions {
    pub writeback_cache: bool,
    /// POSIX ACLs, when the kernel offers them.
    pub acl: bool,
    pub atime: Atime,
    /// Whether listing a directory updates its atime.
    pub diratime: bool,
    pub readdirplus: bool,
    /// Largest write request asked of the kernel (bytes).
    pub max_write: u32,
    pub ownership: Ownership,
    /// FUSE over io_uring (`-o io_uring`), when the kernel offers it.
    pub io_uring: bool,
    /// The kernel checks permissions (`default_permissions`); off, the daemon does
    /// (`-o no_default_permissions`, see `crate::perm`).
    pub default_permissions: bool,
}

/// How ownership and permissions are shown (`-o uid=,gid=,umask=`): the image keeps what was
/// stored; only the attributes the kernel sees (and checks permissions against) change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Permission bits cleared from every file's mode.
    pub umask: u16,
}

impl Ownership {
    fn apply(&self, mut attr: FileAttr) -> FileAttr {
        attr.uid = self.uid.unwrap_or(attr.uid);
        attr.gid = self.gid.unwrap_or(attr.gid);
        attr.perm &= !self.umask;
        attr
    }
}

pub struct FuseAdapter {
    fs: Fs,
    opts: KernelOptions,
    /// Set once the kernel's INIT arrived: before it nothing is served or written, so a mount
    /// that fails leaves the image exactly as it was.
    initialized: bool,
    stats: Arc<Stats>,
    /// Tells the kernel what changed behind its back; set once the session exists
    /// (`FuseAdapter::notifier_slot`).
    notifier: Arc<OnceLock<Notifier>>,
    /// Files whose block count write-backs from the page cache changed since their last fsync
    /// (the kernel's cached st_blocks is stale; see `fsync`).
    blocks_unseen: parking_lot::Mutex<std::collections::HashSet<u64>>,
}

impl FuseAdapter {
    pub fn new(mut fs: Fs, opts: KernelOptions) -> FuseAdapter {
        fs.set_kernel_owns_write_times(opts.writeback_cache);
        fs.set_atime(opts.atime, opts.diratime);
        fs.set_shown(crate::perm::Shown {
            uid: opts.ownership.uid,
            gid: opts.ownership.gid,
            umask: opts.ownership.umask.into(),
        });
        FuseAdapter {
            fs,
            opts,
            initialized: false,
            stats: Arc::default(),
            notifier: Arc::default(),
            blocks_unseen: Default::default(),
        }
    }

    /// The live counters (served by `stats::serve`).
    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// The engine, weakly (for the stats server).
    pub fn engine_weak(&self) -> std::sync::Weak<crate::engine::Engine> {
        self.fs.engine_weak()
    }

    /// Where the caller puts the session's notifier (`fuser::Session::notifier`) once the
    /// session exists.
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        Arc::clone(&self.notifier)
    }
}

impl FuseAdapter {
    /// Drops the kernel's cached attributes of `ino` (offset -1: the page cache stays), after
    /// a change no reply told it about.
    fn invalidate_attrs(&self, ino: INodeNo) {
        match self.notifier.get() {
            Some(n) => {
                if let Err(e) = n.inval_inode(ino, -1, 0) {
                    log::warn!("cannot invalidate attributes of inode {}: {e}", ino.0);
                }
            }
            None => log::warn!("no notifier: inode {} attributes stay cached", ino.0),
        }
    }

    /// How long the kernel may cache a name. Without `default_permissions` not at all: the
    /// kernel checks no search permission on names it has cached, so every path walk must
    /// reach LOOKUP, where the daemon checks it.
    fn entry_ttl(&self) -> Duration {
        if self.opts.default_permissions {
            TTL
        } else {
            Duration::ZERO
        }
    }

    fn reply_entry(&self, reply: ReplyEntry, r: Result<Attr, Error>) {
        match r {
            Ok(a) => reply.entry_with_ttls(
                &TTL,
                &self.entry_ttl(),
                &self.opts.ownership.apply(file_attr(&a)),
                Generation(a.generation),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Runs permission check `f` for the caller of `req` when the daemon makes the checks
    /// (`-o no_default_permissions`); `None` when the kernel makes them.
    fn check<T>(
        &self,
        req: &Request,
        f: impl FnOnce(&Caller) -> Result<T, Error>,
    ) -> Option<Result<T, Errno>> {
        if self.opts.default_permissions {
            return None;
        }
        let groups = Groups::of(req);
        let caller = Caller {
            uid: req.uid(),
            gid: req.gid(),
            supplementary: &|g| groups.contains(g),
        };
        Some(f(&caller).map_err(|e| errno(&e)))
    }

    /// Runs a setxattr or removexattr, then drops the kernel's cached attributes where they
    /// went stale: an access ACL changes the mode bits, which the kernel (not told of ACLs on a
    /// mount without default_permissions) must see when the daemon checks permissions;
    /// attribute chunks change st_blocks, which the kernel re-reads
    /// only if told (with the writeback cache it keeps the ctime it set itself, so nothing else
    /// makes it ask). Not otherwise: the kernel would re-read them before its next cached write
    /// (a GETATTR and a GETXATTR).
    fn change_xattr(
        &self,
        ino: INodeNo,
        name: &[u8],
        change: impl FnOnce() -> Result<(), Error>,
    ) -> Result<(), Error> {
        let blocks = || self.fs.getattr(ino.0).map(|a| a.blocks).ok();
        let before = self.opts.writeback_cache.then(blocks).flatten();
        change()?;
        let acl = !self.opts.default_permissions && name == crate::acl::ACCESS;
        let grown = self.opts.writeback_cache && blocks() != before;
        if acl || grown {
            self.invalidate_attrs(ino);
        }
        Ok(())
    }

    /// Records an access in atime (`Fs::note_access`). READ, READDIR and READLINK make the
    /// kernel drop its cached atime itself; after others `invalidate` says to drop it. A failed
    /// update (a full image) does not fail the access.
    fn note_access(&self, ino: INodeNo, invalidate: bool) {
        match self.fs.note_access(ino.0) {
            Ok(true) if invalidate => self.invalidate_attrs(ino),
            Ok(_) => {}
            Err(e) => log::debug!("atime of inode {} not updated: {e}", ino.0),
        }
    }
}

fn errno(e: &Error) -> Errno {
    if let Error::Corrupt(msg) = e {
        log::error!("image corruption: {msg}");
    }
    Errno::from_i32(e.errno())
}

fn to_system_time(t: Time) -> SystemTime {
    // Times come from the image, which is untrusted: out-of-range values are clamped to the
    // latest (earliest) time the kernel's 64-bit seconds hold, never an overflow.
    const LIMIT: u64 = (i64::MAX / 2) as u64;
    let nsec = t.nsec.min(999_999_999);
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new((t.sec as u64).min(LIMIT), nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs().min(LIMIT))
            + Duration::from_nanos(u64::from(nsec))
    }
}

/// Decodes a time received from fuser. fuser 0.18 builds a pre-epoch kernel time
/// `(secs < 0, nsec)` as `EPOCH - (|secs| s + nsec ns)` (see its `system_time_from_time`), so the
/// distance before the epoch carries `|secs|` and `nsec` unchanged: undo exactly that.
fn from_request_time(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => Time {
            sec: -(e.duration().as_secs() as i64),
            nsec: e.duration().subsec_nanos(),
        },
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: to_system_time(a.atime),
        mtime: to_system_time(a.mtime),
        ctime: to_system_time(a.ctime),
        crtime: to_system_time(a.btime),
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        umask: 0,
    }
}

/// The caller of a request that creates a node, with its umask: the kernel leaves the umask
/// to the daemon (FUSE_DONT_MASK) when ACLs are on, since a default ACL replaces it.
fn creator(req: &Request, umask: u32) -> Ctx {
    Ctx { umask, ..ctx(req) }
}

/// How a SETATTR changes timestamps, as far as permissions go. Times come with a file handle
/// only in the kernel's own flush of the times it caches (writeback cache), and with a size only
/// as the writeback cache's mtime of a truncate. `utimensat` to now for both (a touch) comes as
/// atime and mtime now, or with the writeback cache as atime now with the kernel's own mtime
/// and ctime.
fn time_change(
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    ctime: Option<SystemTime>,
    size: Option<u64>,
    fh: Option<FileHandle>,
) -> TimeChange {
    if fh.is_some() || size.is_some() {
        return TimeChange::None;
    }
    match (atime, mtime) {
        (None, None) => TimeChange::None,
        (Some(TimeOrNow::Now), Some(TimeOrNow::Now)) => TimeChange::Touch,
        (Some(TimeOrNow::Now), Some(_)) if ctime.is_some() => TimeChange::Touch,
        _ => TimeChange::Set,
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(s) => SetTime::At(from_request_time(s)),
    }
}

/// getxattr/listxattr protocol: size 0 asks for the length; a too small buffer is ERANGE.
fn reply_xattr(reply: ReplyXattr, size: u32, r: Result<Vec<u8>, Error>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() <= size as usize => reply.data(&v),
        Ok(_) => reply.error(Errno::from_i32(libc::ERANGE)),
        Err(e) => reply.error(errno(&e)),
    }
}

fn reply_empty(reply: ReplyEmpty, r: Result<(), Error>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

// The inode-flag ioctls (linux/fs.h): `_IOR('f', 1, long)` and friends.
const FS_IOC_GETFLAGS: u32 = 0x8008_6601;
const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
const FS_IOC32_GETFLAGS: u32 = 0x8004_6601;
const FS_IOC32_SETFLAGS: u32 = 0x4004_6602;
const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;
const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;
/// Size of struct fsxattr.
const FSXATTR_SIZE: usize = 28;
const FS_XFLAG_NOATIME: u32 = 0x40;
const FS_XFLAG_NODUMP: u32 = 0x80;

/// `fsx_xflags` of `FS_*_FL` flags.
fn xflags_of(flags: u32) -> u32 {
    let mut x = 0;
    if flags & FS_NOATIME_FL != 0 {
        x |= FS_XFLAG_NOATIME;
    }
    if flags & FS_NODUMP_FL != 0 {
        x |= FS_XFLAG_NODUMP;
    }
    x
}

/// `FS_*_FL` flags of `fsx_xflags`; `None` when one has no counterpart here.
fn flags_of_xflags(x: u32) -> Option<u32> {
    if x & !(FS_XFLAG_NOATIME | FS_XFLAG_NODUMP) != 0 {
        return None;
    }
    let mut f = 0;
    if x & FS_XFLAG_NOATIME != 0 {
        f |= FS_NOATIME_FL;
    }
    if x & FS_XFLAG_NODUMP != 0 {
        f |= FS_NODUMP_FL;
    }
    Some(f)
}

fn reply_ioctl_empty(reply: ReplyIoctl, r: Result<(), Error>) {
    match r {
        Ok(()) => reply.ioctl(0, &[]),
        Err(e) => reply.error(errno(&e)),
    }
}

/// Open replies keep the page cache (nothing changes the file behind the kernel's back) and
/// skip FLUSH on close (data is in the mapping when a WRITE returns; flush has nothing to do).
/// With the writeback cache the kernel ignores NOFLUSH: at close it writes its dirty pages back
/// itself, and the FLUSH that follows answers ENOSYS once.
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(self.opts.max_write) {
            config.set_max_write(max).ok();
        }
        let caps = config.capabilities();
        let mut wanted = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_MAX_PAGES
            // The daemon drops set-ID bits and capabilities on write, truncate and chown (see
            // `Fs::drop_privileges`). In exchange the kernel marks files it found without them
            // (S_NOSEC) and stops asking for security.capability before every write: that
            // GETXATTR had doubled the round trips of each write(2) (4 KiB random writes).
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            // File handles (name_to_handle_at, NFS export) stay valid across cache drops and
            // remounts: the kernel looks up "." and ".." by inode number (see `Fs::lookup`).
            | InitFlags::FUSE_EXPORT_SUPPORT;
        if self.opts.writeback_cache {
            wanted |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        // Without default_permissions the names it lists could not be cached (see
        // `entry_ttl`), so READDIRPLUS would save no LOOKUP.
        if self.opts.readdirplus && self.opts.default_permissions {
            wanted |= InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO;
        }
        // The kernel enforces ACLs from the stored attributes and leaves the umask to the
        // daemon, which replaces it by a directory's default ACL. FUSE_POSIX_ACL also turns the
        // kernel's default_permissions on (fs/fuse/inode.c), so without them the kernel is not
        // told: it then passes ACLs through as attributes, and the daemon enforces them.
        let acl = if self.opts.default_permissions {
            InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK
        } else {
            InitFlags::FUSE_DONT_MASK
        };
        if self.opts.acl && caps.contains(acl) {
            wanted |= acl;
            self.fs.set_acls(true);
        }
        if self.opts.io_uring {
            if caps.contains(InitFlags::FUSE_OVER_IO_URING) {
                wanted |= InitFlags::FUSE_OVER_IO_URING;
            } else {
                io_uring_refused();
            }
        }
        if let Err(unsupported) = config.add_capabilities(wanted & caps) {
            log::warn!("kernel lacks FUSE capabilities {unsupported:?}");
        }
        self.initialized = true;
        self.fs.start();
        log::debug!(
            "FUSE init: writeback_cache={} readdirplus={}",
            self.opts.writeback_cache,
            self.opts.readdirplus
        );
        Ok(())
    }

    fn destroy(&mut self) {
        if !self.initialized {
            return;
        }
        if let Err(e) = self.fs.shutdown() {
            log::error!("flushing the image at unmount failed: {e}");
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.stats.count(Op::Lookup);
        // "." and ".." come from the kernel itself (file handles, NFS export), not a path walk.
        let walk = name.as_bytes() != b"." && name.as_bytes() != b"..";
        if walk && let Some(Err(e)) = self.check(req, |c| self.fs.may(parent.0, c, perm::MAY_EXEC))
        {
            return reply.error(e);
        }
        match self.fs.lookup(parent.0, name.as_bytes()) {
            // Inode 0 with a timeout: the kernel caches the name as absent.
            Err(Error::NotFound) => {
                reply.entry_with_ttls(&TTL, &self.entry_ttl(), &negative_entry(), Generation(0))
            }
            r => self.reply_entry(reply, r),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.stats.count(Op::Forget);
        self.blocks_unseen.lock().remove(&ino.0);
        if let Err(e) = self.fs.forget(ino.0, nlookup) {
            log::error!("forget {}: {e}", ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.stats.count(Op::Getattr);
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &self.opts.ownership.apply(file_attr(&a))),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.stats.count(Op::Setattr);
        let ch = AttrChange {
            mode,
            uid,
            gid,
            truncate: size.is_some() && fh.is_none(),
            times: time_change(atime, mtime, ctime, size, fh),
        };
        let mode = match self.check(req, |c| self.fs.may_setattr(ino.0, c, &ch)) {
            None => mode,
            Some(Ok(m)) => m,
            Some(Err(e)) => return reply.error(e),
        };
        let s = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
            ctime: ctime.map(from_request_time),
        };
        // The kernel's FATTR_KILL_SUIDGID (caller lacks CAP_FSETID) does not reach fuser's
        // setattr; root stands for the capability.
        let groups = Groups::of(req);
        let in_group = |gid| groups.contains(gid);
        let by = Changer::new(req.uid() == 0, &in_group);
        match self.fs.setattr(ino.0, &s, &by) {
            Ok(a) => reply.attr(&TTL, &self.opts.ownership.apply(file_attr(&a))),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.stats.count(Op::Readlink);
        self.note_access(ino, false);
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.stats.count(Op::Mknod);
        if let Some(Err(e)) = self.check(req, |c| self.fs.may_create(parent.0, c)) {
            return reply.error(e);
        }
        self.reply_entry(
            reply,
            self.fs
                .mknod(parent.0, name.as_bytes(), mode, rdev, creator(req, umask)),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.stats.count(Op::Mkdir);
        if let Some(Err(e)) = self.check(req, |c| self.fs.may_create(parent.0, c)) {
            return reply.error(e);
        }
        self.reply_entry(
            reply,
            self.fs
                .mkdir(parent.0, name.as_bytes(), mode, creator(req, umask)),
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.stats.count(Op::Unlink);
        let name = name.as_bytes();
        if let Some(Err(e)) = self.check(req, |c| self.fs.may_delete(parent.0, name, c)) {
            return reply.error(e);
        }
        reply_empty(reply, self.fs.unlink(parent.0, name));
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.stats.count(Op::Rmdir);
        let name = name.as_bytes();
        if let Some(Err(e)) = self.check(req, |c| self.fs.may_delete(parent.0, name, c)) {
            return reply.error(e);
        }
        reply_empty(reply, self.fs.rmdir(parent.0, name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.stats.count(Op::Symlink);
        if let Some(Err(e)) = self.check(req, |c| self.fs.may_create(parent.0, c)) {
            return reply.error(e);
        }
        let r = self.fs.symlink(
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            ctx(req),
        );
        self.reply_entry(reply, r);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.stats.count(Op::Rename);
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let (name, newname) = (name.as_bytes(), newname.as_bytes());
        if let Some(Err(e)) = self.check(req, |c| {
            self.fs
                .may_rename(parent.0, name, newparent.0, newname, exchange, c)
        }) {
            return reply.error(e);
        }
        let f = crate::fs::RenameFlags {
            noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
            exchange,
            whiteout: flags
                .contains(RenameFlags::RENAME_WHITEOUT)
                .then(|| ctx(req)),
        };
        let r = self.fs.rename(parent.0, name, newparent.0, newname, f);
        reply_empty(reply, r);
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.stats.count(Op::Link);
        if let Some(Err(e)) = self.check(req, |c| {
            self.fs
                .may_link(ino.0, newparent.0, c, protected_hardlinks())
        }) {
            return reply.error(e);
        }
        self.reply_entry(reply, self.fs.link(ino.0, newparent.0, newname.as_bytes()));
    }

    // File handles carry no state here (reads and writes go by inode). OPEN is needed only for
    // atime: reads served from the page cache never reach the daemon, so an open for reading
    // is where an access is recorded (relatime makes that an inode write only when due). With
    // noatime OPEN answers ENOSYS: the kernel then stops sending OPEN and RELEASE for the rest
    // of the mount and opens files itself with FOPEN_KEEP_CACHE, so opening and closing costs
    // no round trip (reading back small cached files: about 25k -> 120k files/s). Without
    // default_permissions OPEN stays: it is where the daemon checks the open's mode.
    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.stats.count(Op::Open);
        if let Some(r) = self.check(req, |c| self.fs.may(ino.0, c, perm::open_mask(flags.0))) {
            if let Err(e) = r {
                return reply.error(e);
            }
        } else if !self.fs.tracks_atime() {
            return reply.error(Errno::from_i32(libc::ENOSYS));
        }
        let reads = flags.0 & libc::O_ACCMODE != libc::O_WRONLY;
        if reads && flags.0 & libc::O_NOATIME == 0 {
            self.note_access(ino, true);
        }
        reply.opened(FileHandle(0), OPEN_FLAGS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.stats.count(Op::Read);
        self.note_access(ino, false);
        // The reply is sent from inside the core's read, so a contiguous extent goes to the
        // kernel straight from the mapping.
        let mut reply = Some(reply);
        let r = self.fs.read(ino.0, offset, size, |data| {
            if let Some(r) = reply.take() {
                self.stats.read_bytes(data.len());
                r.data(data);
            }
        });
        if let (Err(e), Some(r)) = (r, reply) {
            r.error(errno(&e));
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.stats.count(Op::Write);
        let groups = Groups::of(req);
        let in_group = |gid| groups.contains(gid);
        let killing = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        let by = Changer::new(!killing, &in_group);
        // Page-cache write-back (mmap stores; every write with the writeback cache, where the
        // kernel itself falls back to a direct write when set-ID bits must go) drops nothing.
        let from_page_cache = write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        let changer = (!from_page_cache).then_some(&by);
        match self.fs.write_tracked(ino.0, offset, data, changer) {
            Ok(w) => {
                if from_page_cache && w.blocks_changed {
                    self.blocks_unseen.lock().insert(ino.0);
                }
                let n = w.len;
                // The WRITE reply carries no attributes, so the kernel would go on showing (and
                // honouring, for exec) set-ID bits the write dropped until its cached attributes
                // expire. Attributes only (offset -1): the page cache stays.
                if by.dropped.get() {
                    self.invalidate_attrs(ino);
                }
                self.stats.written_bytes(n as usize);
                reply.written(n)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    // A write is in the mapping when it returns, so close has nothing to report or flush
    // (durability is fsync's job). The kernel treats ENOSYS from FLUSH as success and stops
    // sending it, which matters once OPEN is off: its default open flags lack FOPEN_NOFLUSH, and
    // a FLUSH round trip on every close cost as much as the OPEN it replaced.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.stats.count(Op::Flush);
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.stats.count(Op::Fsync);
        let start = std::time::Instant::now();
        let r = self.fs.fsync(ino.0, datasync);
        self.stats.fsync_done(start.elapsed());
        if r.is_ok() && self.blocks_unseen.lock().remove(&ino.0) {
            // The kernel wrote its dirty pages back before this request, and those WRITE
            // replies told it nothing about the blocks they allocated: without this, st_blocks
            // (du) would stay as cached before the data reached the image. Only then: the
            // kernel re-reads attributes before its next cached write (a GETATTR, and a
            // GETXATTR of security.capability), two round trips a write + fsync would pay.
            self.invalidate_attrs(ino);
        }
        reply_empty(reply, r);
    }

    // Directories keep OPENDIR (unlike files, see `open`): without it the kernel would cache
    // listings (FOPEN_CACHE_DIR) and miss that a directory moved by rename has a new "..".
    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.stats.count(Op::Opendir);
        if let Some(Err(e)) = self.check(req, |c| self.fs.may(ino.0, c, perm::open_mask(flags.0))) {
            return reply.error(e);
        }
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.stats.count(Op::Readdir);
        self.note_access(ino, false);
        let r = self
            .fs
            .readdir_stream(ino.0, fh.0, offset, false, &mut |e| {
                !reply.add(
                    INodeNo(e.ino),
                    e.next,
                    file_type(e.kind),
                    OsStr::from_bytes(e.name),
                )
            });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.stats.count(Op::Readdir);
        self.note_access(ino, false);
        let r = self
            .fs
            .readdir_stream(ino.0, fh.0, offset, true, &mut |e| match e.attr {
                Some(a) => !reply.add(
                    INodeNo(e.ino),
                    e.next,
                    OsStr::from_bytes(e.name),
                    &TTL,
                    &self.opts.ownership.apply(file_attr(a)),
                    Generation(a.generation),
                ),
                None => true,
            });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.stats.count(Op::Fsyncdir);
        let start = std::time::Instant::now();
        let r = self.fs.fsync(ino.0, false);
        self.stats.fsync_done(start.elapsed());
        reply_empty(reply, r);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.stats.count(Op::Statfs);
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        );
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.stats.count(Op::Setxattr);
        let name = name.as_bytes();
        if let Some(Err(e)) = self.check(req, |c| self.fs.may_xattr(ino.0, name, true, c)) {
            return reply.error(e);
        }
        let r = self.change_xattr(ino, name, || self.fs.setxattr(ino.0, name, value, flags));
        reply_empty(reply, r);
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.stats.count(Op::Getxattr);
        let name = name.as_bytes();
        if let Some(Err(e)) = self.check(req, |c| self.fs.may_xattr(ino.0, name, false, c)) {
            return reply.error(e);
        }
        reply_xattr(reply, size, self.fs.getxattr(ino.0, name));
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.stats.count(Op::Listxattr);
        let r = self.fs.listxattr(ino.0).map(|names| {
            if req.uid() == 0 {
                return names;
            }
            // trusted.* names are root's, as tmpfs and ext4 list them.
            let visible = names
                .split_inclusive(|&b| b == 0)
                .filter(|n| !n.starts_with(b"trusted."));
            visible.flatten().copied().collect()
        });
        reply_xattr(reply, size, r);
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.stats.count(Op::Removexattr);
        let name = name.as_bytes();
        if let Some(Err(e)) = self.check(req, |c| self.fs.may_xattr(ino.0, name, true, c)) {
            return reply.error(e);
        }
        let r = self.change_xattr(ino, name, || self.fs.removexattr(ino.0, name));
        reply_empty(reply, r);
    }

    /// access(2) and chdir(2), which the kernel asks about only without default_permissions.
    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.stats.count(Op::Access);
        let want = mask.bits() as u32 & (perm::MAY_READ | perm::MAY_WRITE | perm::MAY_EXEC);
        match self.check(req, |c| self.fs.may(ino.0, c, want)) {
            Some(Err(e)) => reply.error(e),
            _ => reply.ok(),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        self.stats.count(Op::Create);
        if let Some(Err(e)) = self.check(req, |c| self.fs.may_create(parent.0, c)) {
            return reply.error(e);
        }
        match self
            .fs
            .create(parent.0, name.as_bytes(), mode, creator(req, umask))
        {
            Ok(a) => reply.created_with_ttls(
                &TTL,
                &self.entry_ttl(),
                &self.opts.ownership.apply(file_attr(&a)),
                Generation(a.generation),
                FileHandle(0),
                OPEN_FLAGS,
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.stats.count(Op::Fallocate);
        reply_empty(reply, self.fs.fallocate(ino.0, offset, length, mode));
    }

    /// The inode-flag ioctls: `FS_IOC_GETFLAGS`/`SETFLAGS` (lsattr/chattr) and their
    /// `FS_IOC_FSGETXATTR`/`FSSETXATTR` form, for the flags stored here (`A`, `d`); the kernel
    /// checks who may change them. Anything else is not a terminal (ENOTTY), answered quietly.
    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        self.stats.count(Op::Ioctl);
        let word = |at: usize| {
            in_data
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        };
        match cmd {
            FS_IOC_GETFLAGS | FS_IOC32_GETFLAGS => match self.fs.get_flags(ino.0) {
                Ok(f) => {
                    let mut out = u64::from(f).to_le_bytes().to_vec();
                    out.truncate((out_size as usize).min(8));
                    reply.ioctl(0, &out)
                }
                Err(e) => reply.error(errno(&e)),
            },
            FS_IOC_SETFLAGS | FS_IOC32_SETFLAGS => match word(0) {
                Some(f) => reply_ioctl_empty(reply, self.fs.set_flags(ino.0, f)),
                None => reply.error(Errno::from_i32(libc::EINVAL)),
            },
            FS_IOC_FSGETXATTR => match self.fs.get_flags(ino.0) {
                Ok(f) => {
                    // struct fsxattr: fsx_xflags first, the rest (extent sizes, project) 0.
                    let mut out = vec![0u8; FSXATTR_SIZE];
                    out[..4].copy_from_slice(&xflags_of(f).to_le_bytes());
                    out.truncate(out_size as usize);
                    reply.ioctl(0, &out)
                }
                Err(e) => reply.error(errno(&e)),
            },
            FS_IOC_FSSETXATTR => {
                let rest_zero = in_data
                    .get(4..16)
                    .is_some_and(|b| b.iter().all(|&x| x == 0));
                match word(0) {
                    Some(x) if rest_zero => match flags_of_xflags(x) {
                        Some(f) => reply_ioctl_empty(reply, self.fs.set_flags(ino.0, f)),
                        None => reply.error(Errno::from_i32(libc::EOPNOTSUPP)),
                    },
                    Some(_) => reply.error(Errno::from_i32(libc::EOPNOTSUPP)),
                    None => reply.error(Errno::from_i32(libc::EINVAL)),
                }
            }
            _ => reply.error(Errno::from_i32(libc::ENOTTY)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.stats.count(Op::Lseek);
        if offset < 0 {
            return reply.error(Errno::from_i32(libc::ENXIO));
        }
        // The kernel sends LSEEK without writing back the pages it holds dirty (stores through
        // a mapping; any write with the writeback cache), so their data would look like a
        // hole. Invalidating the file's cache from `offset` on makes the kernel write those
        // pages back first (it launders dirty pages before dropping them), through WRITE
        // requests the other threads serve. So the invalidation and the answer run on a
        // thread of their own: a request thread waiting for it could be the one its WRITEs
        // need (with io_uring, always: they queue on the waiting thread's CPU). The cost:
        // the file's cached pages from `offset` on are read again.
        let seeker = self.fs.seeker();
        let notifier = self.notifier.get().cloned();
        let answer = move || {
            if let Some(n) = notifier
                && let Err(e) = n.inval_inode(ino, offset & !4095, 0)
            {
                log::warn!(
                    "lseek of inode {}: cached pages not written back: {e}",
                    ino.0
                );
            }
            match seeker.lseek(ino.0, offset as u64, whence) {
                Ok(o) => reply.offset(o as i64),
                Err(e) => reply.error(errno(&e)),
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("mmapfs-lseek".into())
            .spawn(answer)
        {
            // (The reply went down with the closure: the kernel sees the request fail.)
            log::error!("lseek of inode {}: no thread to answer it: {e}", ino.0);
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.stats.count(Op::CopyFileRange);
        let len = len.min(u64::from(u32::MAX) & !0xfff);
        match self
            .fs
            .copy_file_range(ino_in.0, offset_in, ino_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// Where the fuse module's switch for FUSE over io_uring is (Linux 6.14+).
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Says, in one line, why `-o io_uring` falls back to /dev/fuse when the kernel's INIT does not
/// offer FUSE over io_uring. The switch is machine-wide, so the daemon never flips it itself.
fn io_uring_refused() {
    match std::fs::read_to_string(ENABLE_URING).map(|v| v.trim().to_string()) {
        Ok(v) if v == "N" || v == "0" => log::warn!(
            "-o io_uring: FUSE over io_uring is switched off in the kernel ({ENABLE_URING} is \
             {v}); root can switch it on for the whole machine with `echo 1 > {ENABLE_URING}`; \
             serving through /dev/fuse"
        ),
        Ok(_) => log::info!(
            "-o io_uring: the kernel did not offer FUSE over io_uring although {ENABLE_URING} \
             is on; serving through /dev/fuse"
        ),
        Err(_) => log::info!(
            "-o io_uring: this kernel has no FUSE over io_uring (Linux 6.14+ with \
             CONFIG_FUSE_IO_URING); serving through /dev/fuse"
        ),
    }
}

/// The groups of the process that sent a request: its primary group and its supplementary ones,
/// which only /proc tells (read once, on the rare paths that ask about another group). When
/// they cannot be told (the process is gone, or in another PID namespace), it has none, so a
/// set-group-ID bit is dropped rather than kept, and a group's permission is not granted.
struct Groups {
    pid: u32,
    gid: u32,
    supplementary: OnceCell<Vec<u32>>,
}

impl Groups {
    fn of(req: &Request) -> Groups {
        Groups {
            pid: req.pid(),
            gid: req.gid(),
            supplementary: OnceCell::new(),
        }
    }

    fn contains(&self, gid: u32) -> bool {
        gid == self.gid
            || self
                .supplementary
                .get_or_init(|| supplementary_groups(self.pid))
                .contains(&gid)
    }
}

fn supplementary_groups(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|groups| {
            groups
                .split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the kernel's protected hardlinks are on (`fs.protected_hardlinks`, Debian's default):
/// only a file's owner may then link to a file it may not read and write.
fn protected_hardlinks() -> bool {
    std::fs::read_to_string("/proc/sys/fs/protected_hardlinks").is_ok_and(|v| v.trim() != "0")
}
