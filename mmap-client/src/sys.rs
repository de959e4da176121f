//! Checked wrappers around the raw system calls the scenarios exercise.
//!
//! This is the only module with `unsafe` code. It offers:
//! - [`Mapping`]: an owned `mmap` region with `msync`, `madvise`, `mincore`, `mprotect` and
//!   byte-copy accessors. No Rust reference to mapped memory is ever handed out (except to
//!   atomics used for cross-process handshakes), because other processes may change the bytes
//!   at any time; every access is a raw copy or a volatile load/store.
//! - [`ftruncate`], [`run_in_child`] (fork + waitpid, used to observe `SIGBUS`/`SIGSEGV`),
//! - [`Library`]: `dlopen`/`dlsym`/`dladdr` for the `PROT_EXEC` scenario.

use std::ffi::{CStr, CString, c_int, c_void};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as usize } else { 4096 }
}

/// `ftruncate(2)` on an open file.
pub fn ftruncate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: ftruncate only reads its integer arguments; the descriptor is owned by `file`.
    let rc = unsafe { libc::ftruncate(file.as_raw_fd(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `fallocate(2)` with `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: deallocate a range, which
/// then reads as zeros.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let to_off =
        |v: u64| libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG));
    let (offset, len) = (to_off(offset)?, to_off(len)?);
    // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `file`.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// When running as root, switch this process to `uid`/`gid` with no supplementary groups
/// (used in forked children only). Does nothing for a non-root caller.
pub fn drop_root_privileges(uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    // SAFETY: setgroups reads 0 entries from a null list; setgid/setuid take plain integers.
    let rc = unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 {
            -1
        } else {
            libc::setuid(uid)
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A memory mapping created with `mmap(2)` and removed with `munmap(2)` on drop.
pub struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// `mmap(NULL, len, prot, flags, fd, offset)`; `prot` and `flags` are `libc` constants.
    pub fn map(
        file: &File,
        offset: u64,
        len: usize,
        prot: c_int,
        flags: c_int,
    ) -> io::Result<Self> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a NULL hint lets the kernel pick unused address space, so no existing Rust
        // object is overlaid; the descriptor is valid for the duration of the call.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                flags,
                file.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { base, len })
    }

    /// `PROT_READ|PROT_WRITE`, `MAP_SHARED`.
    pub fn shared_rw(file: &File, offset: u64, len: usize) -> io::Result<Self> {
        Self::map(
            file,
            offset,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
    }

    /// `PROT_READ`, `MAP_SHARED`.
    pub fn shared_ro(file: &File, offset: u64, len: usize) -> io::Result<Self> {
        Self::map(file, offset, len, libc::PROT_READ, libc::MAP_SHARED)
    }

    /// `PROT_READ|PROT_WRITE`, `MAP_PRIVATE` (copy-on-write).
    pub fn private_rw(file: &File, offset: u64, len: usize) -> io::Result<Self> {
        Self::map(
            file,
            offset,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
        )
    }

    fn check_range(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "range {offset}+{len} outside a mapping of {} bytes",
            self.len
        );
    }

    /// Copy mapped bytes `offset .. offset + buf.len()` into `buf`.
    ///
    /// Touching a page past end of file raises `SIGBUS`, which kills the process: that is the
    /// behaviour some scenarios provoke on purpose (in a forked child).
    pub fn read_into(&self, offset: usize, buf: &mut [u8]) {
        self.check_range(offset, buf.len());
        // SAFETY: the range lies inside the mapping (checked above), `buf` is a distinct Rust
        // allocation so the regions cannot overlap, and no Rust reference to the mapped bytes
        // exists, so a concurrent store by another process cannot invalidate one.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
    }

    /// Copy `data` into the mapping at `offset` (a store through the mapping).
    ///
    /// Storing into a `PROT_READ` mapping raises `SIGSEGV` and past end of file `SIGBUS`; both
    /// kill the process, which scenarios provoke on purpose in a forked child.
    pub fn write_from(&self, offset: usize, data: &[u8]) {
        self.check_range(offset, data.len());
        // SAFETY: the range lies inside the mapping (checked above), `data` is a distinct Rust
        // allocation, and no Rust reference to the mapped bytes exists that the store could alias.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.base.as_ptr().add(offset),
                data.len(),
            );
        }
    }

    /// A single volatile load (used to touch one page).
    pub fn load_u8(&self, offset: usize) -> u8 {
        self.check_range(offset, 1);
        // SAFETY: in bounds (checked above); a volatile read of a mapped byte has no aliasing
        // requirements. A fault (SIGBUS/SIGSEGV) terminates the process rather than returning.
        unsafe { self.base.as_ptr().add(offset).read_volatile() }
    }

    /// A single volatile store (used to touch one page).
    pub fn store_u8(&self, offset: usize, value: u8) {
        self.check_range(offset, 1);
        // SAFETY: in bounds (checked above); no Rust reference to mapped bytes exists. A fault
        // (SIGBUS/SIGSEGV) terminates the process rather than returning.
        unsafe { self.base.as_ptr().add(offset).write_volatile(value) }
    }

    /// An atomic view of the 4 bytes at `offset` (must be 4-aligned), for cross-process flags.
    pub fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        self.check_range(offset, 4);
        assert_eq!(offset % 4, 0, "unaligned atomic");
        // SAFETY: in bounds and aligned (page-aligned base + 4-aligned offset); the mapping
        // outlives the returned reference (tied to &self); AtomicU32 tolerates concurrent
        // modification by other processes, and all accesses to these bytes go through atomics.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast::<u32>()) }
    }

    /// An atomic view of the 8 bytes at `offset` (must be 8-aligned), for cross-process counters.
    pub fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        self.check_range(offset, 8);
        assert_eq!(offset % 8, 0, "unaligned atomic");
        // SAFETY: as for `atomic_u32`, with 8-byte alignment.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast::<u64>()) }
    }

    /// `msync` of the whole mapping.
    pub fn msync(&self, flags: c_int) -> io::Result<()> {
        self.msync_range(0, self.len, flags)
    }

    /// `msync` of `offset .. offset + len` (offset must be page-aligned).
    pub fn msync_range(&self, offset: usize, len: usize, flags: c_int) -> io::Result<()> {
        self.check_range(offset, len);
        // SAFETY: the range is inside this mapping; msync does not change memory contents.
        let rc =
            unsafe { libc::msync(self.base.as_ptr().add(offset).cast::<c_void>(), len, flags) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `madvise` of the whole mapping.
    pub fn madvise(&self, advice: c_int) -> io::Result<()> {
        self.madvise_range(0, self.len, advice)
    }

    /// `madvise` of `offset .. offset + len` (offset must be page-aligned).
    pub fn madvise_range(&self, offset: usize, len: usize, advice: c_int) -> io::Result<()> {
        self.check_range(offset, len);
        // SAFETY: the range is inside this mapping. Advice such as MADV_DONTNEED may discard
        // page contents, but no Rust reference into the mapping exists, so nothing observes
        // a change behind the compiler's back.
        let rc =
            unsafe { libc::madvise(self.base.as_ptr().add(offset).cast::<c_void>(), len, advice) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `mprotect` of the whole mapping.
    pub fn mprotect(&self, prot: c_int) -> io::Result<()> {
        // SAFETY: the range is exactly this mapping; no Rust reference into it exists, so a
        // protection change cannot invalidate one.
        let rc = unsafe { libc::mprotect(self.base.as_ptr().cast::<c_void>(), self.len, prot) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `mincore`: for each page of the mapping, whether it is resident in memory.
    pub fn resident_pages(&self) -> io::Result<Vec<bool>> {
        let pages = self.len.div_ceil(page_size());
        let mut vec = vec![0u8; pages];
        // SAFETY: `vec` has one byte per page of the range, as mincore requires.
        let rc = unsafe {
            libc::mincore(
                self.base.as_ptr().cast::<c_void>(),
                self.len,
                vec.as_mut_ptr(),
            )
        };
        if rc == 0 {
            Ok(vec.iter().map(|b| b & 1 == 1).collect())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `munmap`, reporting its error (drop ignores it).
    pub fn unmap(self) -> io::Result<()> {
        let (base, len) = (self.base, self.len);
        std::mem::forget(self);
        // SAFETY: this mapping is consumed, so nothing can access the range afterwards.
        let rc = unsafe { libc::munmap(base.as_ptr().cast::<c_void>(), len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is being dropped, so nothing can access the range afterwards.
        unsafe {
            libc::munmap(self.base.as_ptr().cast::<c_void>(), self.len);
        }
    }
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildEnd {
    /// Normal exit with this status.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl std::fmt::Display for ChildEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChildEnd::Exited(code) => write!(f, "exited with status {code}"),
            ChildEnd::Signaled(sig) => write!(f, "was killed by {}", signal_name(*sig)),
        }
    }
}

/// A readable name for a signal number.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGBUS => "SIGBUS",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGKILL => "SIGKILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGINT => "SIGINT",
        _ => return format!("signal {sig}"),
    };
    format!("{name} ({sig})")
}

/// A forked child process that has not been waited for yet.
pub struct ForkedChild {
    pid: libc::pid_t,
    reaped: Option<ChildEnd>,
}

impl ForkedChild {
    /// Block until the child ends.
    pub fn wait(mut self) -> io::Result<ChildEnd> {
        if let Some(end) = self.reaped {
            return Ok(end);
        }
        let end = wait_pid(self.pid, 0)?.expect("blocking waitpid returned no status");
        self.reaped = Some(end);
        Ok(end)
    }

    /// Non-blocking check: `Some` once the child has ended.
    pub fn try_wait(&mut self) -> io::Result<Option<ChildEnd>> {
        if self.reaped.is_none() {
            self.reaped = wait_pid(self.pid, libc::WNOHANG)?;
        }
        Ok(self.reaped)
    }
}

impl Drop for ForkedChild {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            // SAFETY: `pid` is our own unreaped child, so the id cannot have been reused.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
            let _ = wait_pid(self.pid, 0);
        }
    }
}

/// Fork; the child runs `body` (with core dumps disabled) and `_exit`s with its return value
/// (101 if it panics). The parent gets a handle to wait for it.
///
/// Must only be called while the process has a single thread (true for this client).
pub fn spawn_child(body: impl FnOnce() -> i32) -> io::Result<ForkedChild> {
    // SAFETY: the client never starts threads, so the child is a complete copy of a
    // single-threaded process and may keep running ordinary Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        disable_core_dumps();
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101);
        // SAFETY: _exit ends the child at once, without running destructors or atexit handlers
        // that belong to the parent's state.
        unsafe { libc::_exit(code) }
    }
    Ok(ForkedChild { pid, reaped: None })
}

/// Fork, run `body` in the child, and wait for it: how did the child end?
pub fn run_in_child(body: impl FnOnce() -> i32) -> io::Result<ChildEnd> {
    spawn_child(body)?.wait()
}

/// `waitpid(pid, flags)`, retrying on `EINTR`; `None` when `WNOHANG` found it still running.
fn wait_pid(pid: libc::pid_t, flags: c_int) -> io::Result<Option<ChildEnd>> {
    loop {
        let mut status: c_int = 0;
        // SAFETY: `status` is a valid out-pointer for the duration of the call.
        let rc = unsafe { libc::waitpid(pid, &mut status, flags) };
        if rc == pid {
            if libc::WIFSIGNALED(status) {
                return Ok(Some(ChildEnd::Signaled(libc::WTERMSIG(status))));
            }
            return Ok(Some(ChildEnd::Exited(libc::WEXITSTATUS(status))));
        }
        if rc == 0 {
            return Ok(None);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Expected crashes should not leave core files behind.
fn disable_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid rlimit for the duration of the call.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
    }
}

/// A shared library opened with `dlopen`.
pub struct Library {
    handle: NonNull<c_void>,
}

/// The current `dlerror()` text.
fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl* call;
    // it is copied at once.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        "unknown dl error".to_string()
    } else {
        // SAFETY: non-NULL dlerror results are NUL-terminated C strings.
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Library {
    /// `dlopen(path, RTLD_NOW | RTLD_LOCAL)`.
    pub fn open(path: &Path) -> Result<Self, String> {
        let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: `cpath` is a valid C string. Loading runs the library's constructors; the
        // probe library used here has none that touch this process's state.
        let handle = unsafe { libc::dlopen(cpath.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        NonNull::new(handle)
            .map(|handle| Library { handle })
            .ok_or_else(dl_error)
    }

    /// The address of symbol `name`.
    pub fn symbol(&self, name: &str) -> Result<*const c_void, String> {
        let cname = CString::new(name).map_err(|e| e.to_string())?;
        // SAFETY: the handle is live (owned by self) and `cname` is a valid C string.
        let addr = unsafe { libc::dlsym(self.handle.as_ptr(), cname.as_ptr()) };
        if addr.is_null() {
            Err(dl_error())
        } else {
            Ok(addr.cast_const())
        }
    }

    /// Call symbol `name` as `int name(int)`.
    ///
    /// # Safety
    /// The library must define `name` as a C function with exactly that signature.
    pub unsafe fn call_int_fn(&self, name: &str, arg: c_int) -> Result<c_int, String> {
        let addr = self.symbol(name)?;
        // SAFETY: the caller guarantees the symbol is an `int (*)(int)` C function, so the
        // pointer-to-function transmute and the call are well-typed.
        let func: extern "C" fn(c_int) -> c_int = unsafe { std::mem::transmute(addr) };
        Ok(func(arg))
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        // SAFETY: the handle came from dlopen and no symbol address outlives the scenario.
        unsafe {
            libc::dlclose(self.handle.as_ptr());
        }
    }
}

/// `dladdr`: the path of the loaded object that contains `addr`.
pub fn object_containing(addr: *const c_void) -> Option<PathBuf> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: `info` is a valid out-pointer; dladdr only reads the address value.
    let rc = unsafe { libc::dladdr(addr, info.as_mut_ptr()) };
    if rc == 0 {
        return None;
    }
    // SAFETY: dladdr succeeded, so it initialised `info`.
    let info = unsafe { info.assume_init() };
    if info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the dynamic loader.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes())))
}
