//! The mapping of the image file: with `sys`, the only module with `unsafe` (its `sim`
//! submodule has none).
//!
//! Invariants:
//! - The whole address range `[base, base + reserved)` is reserved once, at open, as one
//!   `MAP_SHARED` mapping of the image file. It never moves and is unmapped only on drop, so a
//!   reference into it stays valid for as long as the [`Image`] lives.
//! - `len` (the file's size) only grows while mapped, and only after the host file has been
//!   extended with `posix_fallocate`, so every byte below `len` is backed by allocated host
//!   storage: touching it cannot raise `SIGBUS` for lack of space. Accessors check bounds.
//! - Growth never remaps: the pages past the old end of file simply become valid once the file is
//!   longer. Readers therefore need no lock against growth.
//! - Writers to the same bytes are serialised by the layers above (inode locks, the allocator
//!   and inode-table locks, copy-on-write); this module only guarantees memory safety of the
//!   mapping itself. 8-byte slots read without such a lock (tree pointers) go through
//!   [`Image::load_u64`]/[`Image::store_u64`].
//!
//! Durability primitives: [`Image::write_back`] starts and waits for the write-back of a range
//! without a device flush; [`Image::flush`] writes a range back and then flushes the device
//! cache, which makes everything written back before it durable too (one flush for many ranges).
//! With a crash simulator ([`sim::CrashSim`]) attached, these record what would be durable
//! instead of calling the kernel.
//!
//! Another process truncating the image file under a live mount could still cause `SIGBUS`; the
//! exclusive `flock` taken at open keeps other mmapfs instances away, and the docs tell users not
//! to modify a mounted image.

pub mod sim;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

/// Page size assumed by the format and by msync alignment.
pub const PAGE_SIZE: u64 = 4096;

/// Largest address range reserved for one image; the first that the kernel grants is used.
const RESERVE_CANDIDATES: [usize; 4] = [1 << 44, 1 << 42, 1 << 40, 1 << 38];

/// Largest image this build can map (the first reservation candidate).
pub const MAX_IMAGE_SIZE: u64 = RESERVE_CANDIDATES[0] as u64;

/// Copies into the image at least this long prefault their pages in one call.
const PREFAULT_MIN: usize = 64 * 1024;

/// A memory-mapped image file whose base address never moves.
pub struct Image {
    file: File,
    base: *mut u8,
    reserved: usize,
    len: AtomicUsize,
    grow_lock: Mutex<()>,
    sim: Option<sim::CrashSim>,
    /// False for a read-only mapping: every store is refused before it reaches it.
    writable: bool,
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
        Image::map_with(file, len, true)
    }

    /// Maps `len` bytes of `file` for reading only (the file may be opened read-only): any store
    /// through it faults, so nothing can change the image.
    pub fn map_read_only(file: File, len: u64) -> io::Result<Image> {
        Image::map_with(file, len, false)
    }

    fn map_with(file: File, len: u64, writable: bool) -> io::Result<Image> {
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
                    if writable {
                        libc::PROT_READ | libc::PROT_WRITE
                    } else {
                        libc::PROT_READ
                    },
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                last_err = io::Error::last_os_error();
                continue;
            }
            // No readaround on faults. The host filesystem may back a faulted range with a large
            // folio (ext4 does since 6.x), and a store through the mapping then dirties the whole
            // folio: every commit would write up to a MiB per touched 4 KiB page. Measured on
            // ext4 (kernel 6.18): fsync p50 1,171 µs without this, 334 µs with it (host 204 µs).
            // SAFETY: advice on the range just mapped; it changes no memory contents.
            let rc = unsafe { libc::madvise(ptr, reserved, libc::MADV_RANDOM) };
            if rc != 0 {
                log::debug!("madvise(MADV_RANDOM): {}", io::Error::last_os_error());
            }
            return Ok(Image {
                file,
                base: ptr.cast::<u8>(),
                reserved,
                len: AtomicUsize::new(len),
                grow_lock: Mutex::new(()),
                sim: None,
                writable,
            });
        }
        Err(last_err)
    }

    /// Attaches a crash simulator: from now on flushes are recorded by it instead of reaching
    /// the kernel (tests, and the `MMAPFS_CRASH_SIM` hook of the daemon).
    pub fn attach_sim(&mut self, sim: sim::CrashSim) {
        self.sim = Some(sim);
    }

    /// The crash simulator, if one is attached.
    pub fn sim(&self) -> Option<&sim::CrashSim> {
        self.sim.as_ref()
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

    /// Like `check`, for a store: refused on a read-only mapping.
    fn check_mut(&self, off: u64, len: usize) -> io::Result<usize> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check(off, len)
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
        let start = self.check_mut(off, data.len())?;
        if data.len() >= PREFAULT_MIN {
            self.prefault_writable(start, data.len());
        }
        // SAFETY: bounds checked above; the destination is mapped writable and cannot overlap
        // `data` unless the caller passed a slice of the image itself, which `copy` tolerates.
        unsafe { std::ptr::copy(data.as_ptr(), self.base.add(start), data.len()) };
        Ok(())
    }

    /// Makes the pages of `[start, start+len)` present and writable in one call. The mapping has
    /// no readaround (`MADV_RANDOM`), so a large copy would otherwise take one write fault per
    /// 4 KiB page. Advice only: on failure the copy simply takes the faults.
    fn prefault_writable(&self, start: usize, len: usize) {
        let first = start & !(PAGE_SIZE as usize - 1);
        let end = start + len;
        // SAFETY: [first, end) lies inside the mapped file (checked by the caller, rounded down
        // to the page that holds `start`); populating changes no contents.
        let rc = unsafe {
            libc::madvise(
                self.base.add(first).cast(),
                end - first,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            log::trace!(
                "madvise(MADV_POPULATE_WRITE): {}",
                io::Error::last_os_error()
            );
        }
    }

    /// Copies `len` bytes inside the image from `src` to `dst` (ranges may overlap).
    pub fn copy_within(&self, src: u64, dst: u64, len: usize) -> io::Result<()> {
        let s = self.check(src, len)?;
        let d = self.check_mut(dst, len)?;
        // SAFETY: both ranges are bounds checked; `ptr::copy` handles overlap.
        unsafe { std::ptr::copy(self.base.add(s), self.base.add(d), len) };
        Ok(())
    }

    /// Zeroes `len` bytes at `off`.
    pub fn zero(&self, off: u64, len: usize) -> io::Result<()> {
        let start = self.check_mut(off, len)?;
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
        self.check_mut(off, 8)?;
        self.atomic_u64(off)?
            .store(value.to_le(), Ordering::Release);
        Ok(())
    }

    /// Grows the image file to `new_len` bytes: host space is allocated first, so a full disk is
    /// an `ENOSPC` error here instead of a `SIGBUS` later.
    pub fn grow(&self, new_len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
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

    /// Starts writing the pages of `[off, off+len)` back to the host file without waiting, so
    /// several ranges are in flight together; [`Image::write_back`] then waits for them.
    pub fn start_write_back(&self, off: u64, len: u64) -> io::Result<()> {
        let Some((start, end)) = self.page_range(off, len) else {
            return Ok(());
        };
        if self.sim.is_some() {
            return Ok(());
        }
        self.sync_file_range(start, end, libc::SYNC_FILE_RANGE_WRITE)
    }

    /// Writes the pages of `[off, off+len)` back to the host file and waits for the writes,
    /// without flushing the device cache: a later [`Image::flush`] makes them durable.
    pub fn write_back(&self, off: u64, len: u64) -> io::Result<()> {
        let Some((start, end)) = self.page_range(off, len) else {
            return Ok(());
        };
        if let Some(sim) = &self.sim {
            sim.write_back(self, start, end);
            return Ok(());
        }
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        self.sync_file_range(start, end, flags)
    }

    fn sync_file_range(&self, start: u64, end: u64, flags: u32) -> io::Result<()> {
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
        Ok(())
    }

    /// Writes back `[off, off+len)` (widened to whole pages), waits, and flushes the device
    /// cache (`msync(MS_SYNC)`): the range, everything written back before, and the file's size
    /// are durable when this returns.
    pub fn flush(&self, off: u64, len: u64) -> io::Result<()> {
        // An empty range still flushes the device: use the first page.
        let (start, end) = self.page_range(off, len).unwrap_or((0, PAGE_SIZE));
        if let Some(sim) = &self.sim {
            sim.flush(self, start, end);
            return Ok(());
        }
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
        Ok(())
    }

    /// Writes back the whole image and the file's metadata (size), and flushes.
    pub fn sync_all(&self) -> io::Result<()> {
        if let Some(sim) = &self.sim {
            sim.flush(self, 0, self.len());
            return Ok(());
        }
        self.flush(0, self.len())?;
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

/// A zero-filled anonymous array of atomic words that lives only while mounted, reserved as
/// large as the address space allows but backed only where touched: the daemon's memory grows
/// with the entries actually used, never with the image.
pub struct VolatileWords {
    base: *mut AtomicU32,
    words: u64,
    bytes: usize,
}

// SAFETY: the array is only accessed through atomics.
unsafe impl Send for VolatileWords {}
// SAFETY: as above.
unsafe impl Sync for VolatileWords {}

impl VolatileWords {
    /// Reserves `2^shift` words, or fewer (by factors of 4, down to `2^(shift-8)`) when the
    /// address space is short.
    pub fn new(shift: u32) -> io::Result<VolatileWords> {
        let mut last_err = io::Error::other("no address range for a volatile table");
        for s in (shift.saturating_sub(8)..=shift).rev().step_by(2) {
            let words = 1u64 << s;
            let bytes = (words * 4) as usize;
            // SAFETY: a fresh private anonymous mapping; pages are zero-filled on first touch.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                last_err = io::Error::last_os_error();
                continue;
            }
            return Ok(VolatileWords {
                base: ptr.cast(),
                words,
                bytes,
            });
        }
        Err(last_err)
    }

    /// Number of words.
    pub fn words(&self) -> u64 {
        self.words
    }

    /// Word `idx`, or `None` past the array.
    pub fn get(&self, idx: u64) -> Option<&AtomicU32> {
        if idx >= self.words {
            return None;
        }
        // SAFETY: in bounds of the mapping, which lives as long as `self`; AtomicU32 is valid
        // for any bit pattern and the mapping is 4-byte aligned.
        Some(unsafe { &*self.base.add(idx as usize) })
    }
}

impl Drop for VolatileWords {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping created in `new`; no borrow outlives `self`.
        unsafe { libc::munmap(self.base.cast(), self.bytes) };
    }
}

/// Per-inode counters that live only while mounted (the kernel's references, the transactions
/// that last changed an inode), indexed by inode number: `VOLATILE_FIELDS` words per inode.
pub struct VolatileTable(VolatileWords);

/// Counters per entry of a [`VolatileTable`].
pub const VOLATILE_FIELDS: u64 = 4;

impl VolatileTable {
    /// Reserves room for as many entries as the address space allows, up to 2^32.
    pub fn new() -> io::Result<VolatileTable> {
        VolatileWords::new(34).map(VolatileTable)
    }

    /// Number of entries (inode numbers `0..entries` have counters).
    pub fn entries(&self) -> u64 {
        self.0.words() / VOLATILE_FIELDS
    }

    /// The counter `field` of entry `idx`, or `None` past the table.
    pub fn get(&self, idx: u64, field: u64) -> Option<&AtomicU32> {
        if field >= VOLATILE_FIELDS {
            return None;
        }
        self.0.get(idx.checked_mul(VOLATILE_FIELDS)? + field)
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
        img.write_back(0, PAGE_SIZE).unwrap();
        img.flush(0, 4 * PAGE_SIZE).unwrap();
    }

    #[test]
    fn volatile_table_counts_and_bounds() {
        let t = VolatileTable::new().unwrap();
        let c = t.get(123_456, 0).unwrap();
        assert_eq!(c.load(Ordering::Relaxed), 0);
        c.fetch_add(3, Ordering::Relaxed);
        assert_eq!(t.get(123_456, 0).unwrap().load(Ordering::Relaxed), 3);
        assert!(t.get(t.entries(), 0).is_none());
        assert!(t.get(0, VOLATILE_FIELDS).is_none());
    }
}
