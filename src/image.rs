//! The mapping of the image file: the ONLY module with `unsafe`.
//!
//! Invariants:
//! - The whole address range `[base, base + reserved)` is reserved once, at open, as one
//!   `MAP_SHARED` mapping of the image file. It never moves and is unmapped only on drop, so a
//!   reference into it stays valid for as long as the [`Image`] lives.
//! - `len` (the file's size) only grows, and only after the host file has been extended with
//!   `posix_fallocate`, so every byte below `len` is backed by allocated host storage: touching
//!   it cannot raise `SIGBUS` for lack of space. Accessors check bounds against `len`.
//! - Growth never remaps: the pages past the old end of file simply become valid once the file is
//!   longer. Readers therefore need no lock against growth.
//! - Writers to the same bytes are serialised by the layers above (inode locks, the allocator
//!   lock); this module only guarantees memory safety of the mapping itself. 8-byte slots that are
//!   read without such a lock (tree pointers) go through [`Image::load_u64`]/[`Image::store_u64`].
//!
//! Another process truncating the image file under a live mount could still cause `SIGBUS`; the
//! exclusive `flock` taken at open keeps other mmapfs instances away, and the docs tell users not
//! to modify a mounted image.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

/// Page size assumed by the format and by msync alignment.
pub const PAGE_SIZE: u64 = 4096;

/// Largest address range reserved for one image; the first that the kernel grants is used.
const RESERVE_CANDIDATES: [usize; 4] = [1 << 44, 1 << 42, 1 << 40, 1 << 38];

/// Environment variable naming a "power-loss shadow" file (a test hook): every range flushed by
/// [`Image::sync_range`] is also copied there, so at any moment the shadow holds exactly what a
/// power loss could be guaranteed to leave on disk: the bytes that were msync'd.
pub const SHADOW_ENV: &str = "MMAPFS_POWERLOSS_SHADOW";

/// A memory-mapped image file whose base address never moves.
pub struct Image {
    file: File,
    shadow: Option<Mutex<File>>,
    base: *mut u8,
    reserved: usize,
    len: AtomicUsize,
    grow_lock: Mutex<()>,
}

// SAFETY: the mapping is plain shared memory; concurrent access is coordinated by the callers
// (see the module invariants), and the raw pointer itself is never reassigned after `open`.
unsafe impl Send for Image {}
// SAFETY: as above; all shared-state mutation goes through atomics or the grow lock.
unsafe impl Sync for Image {}

impl Image {
    /// Maps `file` (already opened read-write and locked by the caller). The file's current size
    /// is the initial length; it must be a multiple of the page size.
    pub fn map(file: File) -> io::Result<Image> {
        let len = file.metadata()?.len();
        Image::map_prefix(file, len)
    }

    /// Like `map`, with an initial length of `len` bytes, at most the file's size: the rest of
    /// the file is left alone (a tail the image does not own yet).
    pub fn map_prefix(file: File, len: u64) -> io::Result<Image> {
        if len > file.metadata()?.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("image length {len} exceeds the file"),
            ));
        }
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("image size {len} is not a multiple of {PAGE_SIZE}"),
            ));
        }
        let len = usize::try_from(len).map_err(|_| io::Error::other("image too large"))?;
        let mut last_err = io::Error::other("no address range could be reserved");
        for &reserved in RESERVE_CANDIDATES.iter() {
            if reserved < len {
                continue;
            }
            // SAFETY: a fresh mapping at a kernel-chosen address; it aliases nothing in this
            // process. MAP_NORESERVE because most of the range stays past end of file.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    reserved,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                last_err = io::Error::last_os_error();
                continue;
            }
            let shadow = match std::env::var_os(SHADOW_ENV) {
                Some(path) => Some(Mutex::new(shadow_file(&path, &file)?)),
                None => None,
            };
            return Ok(Image {
                file,
                shadow,
                base: ptr.cast::<u8>(),
                reserved,
                len: AtomicUsize::new(len),
                grow_lock: Mutex::new(()),
            });
        }
        Err(last_err)
    }

    /// Current length of the image in bytes.
    #[allow(clippy::len_without_is_empty)] // an image is never empty
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire) as u64
    }

    /// Largest length this mapping can ever grow to.
    pub fn max_len(&self) -> u64 {
        self.reserved as u64
    }

    fn check(&self, off: u64, len: usize) -> io::Result<usize> {
        let end = off.checked_add(len as u64);
        match end {
            Some(end) if end <= self.len() => Ok(off as usize),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("access [{off}, +{len}) beyond image end {}", self.len()),
            )),
        }
    }

    /// Borrows `len` bytes at `off`. The slice points into the mapping (no copy).
    pub fn bytes(&self, off: u64, len: usize) -> io::Result<&[u8]> {
        let start = self.check(off, len)?;
        // SAFETY: [start, start+len) is inside the file and inside the reservation, which stays
        // mapped for the lifetime of `self`. Concurrent writers to these bytes are excluded by the
        // callers' locks (module invariants).
        Ok(unsafe { std::slice::from_raw_parts(self.base.add(start), len) })
    }

    /// Copies `data` into the image at `off`.
    pub fn write(&self, off: u64, data: &[u8]) -> io::Result<()> {
        let start = self.check(off, data.len())?;
        // SAFETY: bounds checked above; the destination is mapped writable and cannot overlap
        // `data` unless the caller passed a slice of the image itself, which `copy` tolerates.
        unsafe { std::ptr::copy(data.as_ptr(), self.base.add(start), data.len()) };
        Ok(())
    }

    /// Copies `len` bytes inside the image from `src` to `dst` (ranges may overlap).
    pub fn copy_within(&self, src: u64, dst: u64, len: usize) -> io::Result<()> {
        let s = self.check(src, len)?;
        let d = self.check(dst, len)?;
        // SAFETY: both ranges are bounds checked; `ptr::copy` handles overlap.
        unsafe { std::ptr::copy(self.base.add(s), self.base.add(d), len) };
        Ok(())
    }

    /// Zeroes `len` bytes at `off`.
    pub fn zero(&self, off: u64, len: usize) -> io::Result<()> {
        let start = self.check(off, len)?;
        // SAFETY: bounds checked above; the range is mapped writable.
        unsafe { std::ptr::write_bytes(self.base.add(start), 0, len) };
        Ok(())
    }

    fn atomic_u64(&self, off: u64) -> io::Result<&AtomicU64> {
        if !off.is_multiple_of(8) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unaligned 8-byte slot at {off}"),
            ));
        }
        let start = self.check(off, 8)?;
        // SAFETY: in bounds and 8-byte aligned (the base is page aligned); AtomicU64 has the
        // same layout as u64, and the mapping outlives the returned reference.
        Ok(unsafe { &*(self.base.add(start) as *const AtomicU64) })
    }

    /// Reads a little-endian u64 slot that other threads may update concurrently.
    pub fn load_u64(&self, off: u64) -> io::Result<u64> {
        Ok(u64::from_le(self.atomic_u64(off)?.load(Ordering::Acquire)))
    }

    /// Publishes a little-endian u64 slot (everything written before is visible to a reader
    /// that sees the new value).
    pub fn store_u64(&self, off: u64, value: u64) -> io::Result<()> {
        self.atomic_u64(off)?
            .store(value.to_le(), Ordering::Release);
        Ok(())
    }

    /// Atomically replaces a little-endian u64 slot with `f(old)`; returns the new value.
    pub fn update_u64(&self, off: u64, mut f: impl FnMut(u64) -> u64) -> io::Result<u64> {
        let slot = self.atomic_u64(off)?;
        let mut cur = slot.load(Ordering::Acquire);
        loop {
            let new = f(u64::from_le(cur));
            match slot.compare_exchange_weak(cur, new.to_le(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(new),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Grows the image file to `new_len` bytes: host space is allocated first, so a full disk is
    /// an `ENOSPC` error here instead of a `SIGBUS` later.
    pub fn grow(&self, new_len: u64) -> io::Result<()> {
        let _guard = self.grow_lock.lock();
        let old = self.len();
        if new_len <= old {
            return Ok(());
        }
        if new_len > self.reserved as u64 || !new_len.is_multiple_of(PAGE_SIZE) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let fd = self.file.as_raw_fd();
        // SAFETY: plain syscall on our own descriptor.
        let rc = unsafe { libc::posix_fallocate(fd, old as i64, (new_len - old) as i64) };
        if rc != 0 {
            // Give back whatever part was allocated so the file keeps its page-multiple size.
            // SAFETY: plain syscall on our own descriptor.
            unsafe { libc::ftruncate(fd, old as i64) };
            return Err(io::Error::from_raw_os_error(rc));
        }
        self.len.store(new_len as usize, Ordering::Release);
        Ok(())
    }

    /// `[off, off+len)` widened to whole pages and cut at the end of the image; `None` if empty.
    fn page_range(&self, off: u64, len: u64) -> Option<(u64, u64)> {
        let start = off / PAGE_SIZE * PAGE_SIZE;
        let end = off.saturating_add(len).min(self.len()).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        (end > start).then_some((start, end))
    }

    /// Writes back `[off, off+len)` (widened to whole pages) and waits for it (`MS_SYNC`).
    pub fn sync_range(&self, off: u64, len: u64) -> io::Result<()> {
        let Some((start, end)) = self.page_range(off, len) else {
            return Ok(());
        };
        // SAFETY: the range lies within the reservation; msync does not touch memory contents.
        let rc = unsafe {
            libc::msync(
                self.base.add(start as usize).cast(),
                (end - start) as usize,
                libc::MS_SYNC,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.copy_to_shadow(start, end)
    }

    /// Writes `[off, off+len)` back to the host file and waits for it, without the journal commit
    /// and device cache flush of an msync: a later [`Image::sync_range`] makes it durable with
    /// one flush for several ranges.
    pub fn write_back_range(&self, off: u64, len: u64) -> io::Result<()> {
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        if let Some((start, end)) = self.sync_file_range(off, len, flags)? {
            self.copy_to_shadow(start, end)?;
        }
        Ok(())
    }

    /// `sync_file_range(2)` over the pages of `[off, off+len)`; returns the page range used.
    fn sync_file_range(&self, off: u64, len: u64, flags: u32) -> io::Result<Option<(u64, u64)>> {
        let Some((start, end)) = self.page_range(off, len) else {
            return Ok(None);
        };
        // SAFETY: plain syscall on our own descriptor; it reads no memory of ours.
        let rc = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                start as i64,
                (end - start) as i64,
                flags,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some((start, end)))
    }

    /// Starts writing `[off, off+len)` back to the host file without waiting (so several ranges
    /// are in flight together).
    pub fn start_write_back(&self, off: u64, len: u64) -> io::Result<()> {
        self.sync_file_range(off, len, libc::SYNC_FILE_RANGE_WRITE)
            .map(|_| ())
    }

    fn copy_to_shadow(&self, start: u64, end: u64) -> io::Result<()> {
        if let Some(shadow) = &self.shadow {
            use std::os::unix::fs::FileExt;
            let shadow = shadow.lock();
            shadow.set_len(self.len().max(shadow.metadata()?.len()))?;
            shadow.write_all_at(self.bytes(start, (end - start) as usize)?, start)?;
        }
        Ok(())
    }

    /// Writes back the whole image and the file's metadata (size).
    pub fn sync_all(&self) -> io::Result<()> {
        self.sync_range(0, self.len())?;
        self.file.sync_all()
    }

    /// The underlying file (for locking and metadata).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: `base`/`reserved` are exactly what mmap returned; nothing borrows the mapping
        // any more because borrows are tied to `&self`.
        unsafe { libc::munmap(self.base.cast(), self.reserved) };
    }
}

/// Opens the shadow file, starting it as a copy of the image (what was on disk at open).
fn shadow_file(path: &std::ffi::OsStr, image: &File) -> io::Result<File> {
    let mut shadow = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let mut src = image.try_clone()?;
    io::Seek::seek(&mut src, io::SeekFrom::Start(0))?;
    io::copy(&mut src, &mut shadow)?;
    Ok(shadow)
}

/// Takes an exclusive, non-blocking `flock` on the image file. Returns `Ok(false)` when another
/// process holds it.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: plain syscall on a valid descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_keeps_base_and_bounds_are_checked() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(PAGE_SIZE).unwrap();
        let img = Image::map(f).unwrap();
        img.write(0, b"hello").unwrap();
        let before = img.bytes(0, 5).unwrap().as_ptr();
        assert!(img.bytes(PAGE_SIZE, 1).is_err());
        img.grow(4 * PAGE_SIZE).unwrap();
        img.write(3 * PAGE_SIZE, b"tail").unwrap();
        assert_eq!(img.bytes(0, 5).unwrap().as_ptr(), before);
        assert_eq!(img.bytes(3 * PAGE_SIZE, 4).unwrap(), b"tail");
        img.store_u64(16, 0xdead_beef).unwrap();
        assert_eq!(img.load_u64(16).unwrap(), 0xdead_beef);
        assert!(img.load_u64(17).is_err());
        img.sync_range(0, 4 * PAGE_SIZE).unwrap();
    }
}
