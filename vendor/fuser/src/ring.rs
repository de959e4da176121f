//! FUSE over io_uring (Linux 6.14+, FUSE protocol 7.42): a transport beside `/dev/fuse`.
//!
//! When `FUSE_OVER_IO_URING` is negotiated at INIT, the kernel keeps one request queue per
//! possible CPU and puts each request on the queue of the CPU its caller runs on. For each queue
//! one thread, pinned to that CPU, owns an io_uring on the session's fd and registers
//! [`RING_DEPTH`] entries with `FUSE_IO_URING_CMD_REGISTER`: each entry is a header buffer and a
//! payload buffer as large as the largest request. The kernel completes an entry's command once
//! it has copied a request into the entry; the thread dispatches the request to the filesystem,
//! the reply is written into the same entry ([`RingSender`]), and the entry goes back with
//! `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which both delivers the reply and waits for the next
//! request, all in the thread's next `io_uring_enter`.
//!
//! Requests are rebuilt into the contiguous layout `/dev/fuse` delivers (in-header, first
//! argument, rest) without copying the payload: each entry's header page ends where its payload
//! starts, so the in-header and first argument are copied into the tail of the header page and the
//! whole request is one slice, parsed and dispatched by the same code as requests read from
//! `/dev/fuse`.
//!
//! INIT, FORGET, BATCH_FORGET and INTERRUPT still arrive on `/dev/fuse`, and notifications go out
//! through it, so the session's `/dev/fuse` workers keep running beside the rings.
//!
//! Memory: per queue, [`RING_DEPTH`] entries of one page plus the payload size (`max(max_write,
//! max_pages * page size, 8 KiB)`, rounded up to pages), mapped lazily: pages are only backed by
//! memory once a request or reply of that size has used them.

use std::io;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::thread;
use std::thread::JoinHandle;
use std::thread::ThreadId;
use std::time::Duration;
use std::time::Instant;

use log::debug;
use log::error;
use log::warn;
use parking_lot::Mutex;

use crate::Filesystem;
use crate::ReplyEmpty;
use crate::channel::ChannelSender;
use crate::ll::Operation;
use crate::passthrough::BackingId;
use crate::request::RequestWithSender;
use crate::session::SessionEventLoop;
use crate::session::TransportStats;

/// Entries registered per queue. A queue's thread serves one request at a time and hands each
/// entry back with the fetch of the next request, so a synchronous client needs one; the others
/// let the kernel copy the next requests (readahead, writeback, other processes on that CPU) while
/// the thread is busy.
pub(crate) const RING_DEPTH: usize = 4;

// ---- The FUSE-over-io_uring ABI (include/uapi/linux/fuse.h, 7.42) ----

/// `struct fuse_uring_req_header`: `in_out` (128 bytes: `fuse_in_header` in, `fuse_out_header`
/// back), `op_in` (128 bytes: the request's first argument), `ring_ent_in_out` (32 bytes).
const HEADER_SIZE: usize = 288;
const OP_IN_OFFSET: usize = 128;
const OP_IN_SIZE: usize = 128;
/// `struct fuse_uring_ent_in_out` at 256: flags u64, commit_id u64, payload_sz u32, ...
const ENT_COMMIT_ID_OFFSET: usize = 264;
const ENT_PAYLOAD_SZ_OFFSET: usize = 272;
const IN_HEADER_SIZE: usize = 40;
const OUT_HEADER_SIZE: usize = 16;
const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;
/// The smallest payload buffer the kernel accepts whatever `max_write` is.
const FUSE_MIN_READ_BUFFER: usize = 8192;
/// Pages per request when `FUSE_MAX_PAGES` is not negotiated.
const FUSE_DEFAULT_MAX_PAGES_PER_REQ: usize = 32;

// ---- io_uring (include/uapi/linux/io_uring.h), what this transport uses ----

const IORING_SETUP_SQE128: u32 = 1 << 10;
const IORING_FEAT_SINGLE_MMAP: u32 = 1;
const IORING_OFF_SQ_RING: libc::off_t = 0;
const IORING_OFF_SQES: libc::off_t = 0x1000_0000;
const IORING_ENTER_GETEVENTS: u32 = 1;
const IORING_REGISTER_FILES: u32 = 2;
const IORING_OP_POLL_ADD: u8 = 6;
const IORING_OP_URING_CMD: u8 = 46;
const IOSQE_FIXED_FILE: u8 = 1;

#[repr(C)]
#[derive(Default)]
struct SqringOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    flags: u32,
    dropped: u32,
    array: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct CqringOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    overflow: u32,
    cqes: u32,
    flags: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct Params {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: SqringOffsets,
    cq_off: CqringOffsets,
}

/// A 128-byte submission queue entry (`IORING_SETUP_SQE128`), with the fields this transport
/// sets; `cmd` is the 80-byte command area of `IORING_OP_URING_CMD`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Sqe128 {
    opcode: u8,
    flags: u8,
    ioprio: u16,
    fd: i32,
    cmd_op: u32,
    pad1: u32,
    addr: u64,
    len: u32,
    /// `poll32_events` for POLL_ADD, `uring_cmd_flags` for URING_CMD.
    op_flags: u32,
    user_data: u64,
    buf_index: u16,
    personality: u16,
    file_index: u32,
    cmd: [u8; 80],
}

const _: () = assert!(size_of::<Sqe128>() == 128);
const _: () = assert!(size_of::<Params>() == 120);

impl Sqe128 {
    fn zeroed() -> Sqe128 {
        Sqe128 {
            opcode: 0,
            flags: 0,
            ioprio: 0,
            fd: 0,
            cmd_op: 0,
            pad1: 0,
            addr: 0,
            len: 0,
            op_flags: 0,
            user_data: 0,
            buf_index: 0,
            personality: 0,
            file_index: 0,
            cmd: [0; 80],
        }
    }

    /// A FUSE command on fixed file 0 (the session's fd); `struct fuse_uring_cmd_req` (flags u64,
    /// commit_id u64, qid u16) in the command area.
    fn fuse_cmd(cmd_op: u32, qid: u16, commit_id: u64, entry: usize) -> Sqe128 {
        let mut sqe = Sqe128::zeroed();
        sqe.opcode = IORING_OP_URING_CMD;
        sqe.flags = IOSQE_FIXED_FILE;
        sqe.cmd_op = cmd_op;
        sqe.user_data = entry as u64;
        sqe.cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        sqe.cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
        sqe
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Cqe {
    user_data: u64,
    res: i32,
    flags: u32,
}

/// `user_data` of the poll on the queue's eventfd (entries use their index).
const WAKE: u64 = u64::MAX;

/// An anonymous or file mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize, fd: Option<(RawFd, libc::off_t)>) -> io::Result<Mapping> {
        let (flags, fd, offset) = match fd {
            Some((fd, offset)) => (libc::MAP_SHARED | libc::MAP_POPULATE, fd, offset),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            ),
        };
        // SAFETY: a new mapping at an address the kernel chooses; nothing else is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the mapping made in `new`, unmapped once; no reference into it outlives its
        // owner (`Ring` hands out none, `EntryMemory` decides when the kernel is done with it).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One io_uring with 128-byte SQEs, used by one thread at a time.
struct Ring {
    fd: OwnedFd,
    _rings: Mapping,
    sqes: Mapping,
    sq_head: *const AtomicU32,
    sq_tail: *const AtomicU32,
    sq_mask: u32,
    sq_entries: u32,
    cq_head: *const AtomicU32,
    cq_tail: *const AtomicU32,
    cq_mask: u32,
    cqes: *const Cqe,
}

// SAFETY: the pointers point into the ring's own mappings, which move with it; it is used by one
// thread at a time (`&mut self` for everything that touches the queues).
unsafe impl Send for Ring {}

impl Ring {
    /// A ring of at least `entries` SQEs with the FUSE session's fd as fixed file 0.
    fn new(entries: u32, fuse_fd: BorrowedFd<'_>) -> io::Result<Ring> {
        // Plain flags besides SQE128, as libfuse: SINGLE_ISSUER/COOP_TASKRUN measured slower.
        let mut p = Params {
            flags: IORING_SETUP_SQE128,
            ..Params::default()
        };
        // SAFETY: io_uring_setup(2) with a valid params struct it fills in.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, entries, &mut p as *mut Params) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        if p.features & IORING_FEAT_SINGLE_MMAP == 0 {
            return Err(io::Error::other("kernel lacks IORING_FEAT_SINGLE_MMAP"));
        }
        let sq_len = p.sq_off.array as usize + p.sq_entries as usize * size_of::<u32>();
        let cq_len = p.cq_off.cqes as usize + p.cq_entries as usize * size_of::<Cqe>();
        let rings = Mapping::new(
            sq_len.max(cq_len),
            Some((fd.as_raw_fd(), IORING_OFF_SQ_RING)),
        )?;
        let sqes = Mapping::new(
            p.sq_entries as usize * size_of::<Sqe128>(),
            Some((fd.as_raw_fd(), IORING_OFF_SQES)),
        )?;
        let at = |off: u32| rings.ptr.wrapping_add(off as usize);
        // SAFETY: the offsets are the kernel's, inside the ring mapping; the masks are
        // read once, the kernel never changes them.
        let (sq_mask, cq_mask) = unsafe {
            (
                *at(p.sq_off.ring_mask).cast::<u32>(),
                *at(p.cq_off.ring_mask).cast::<u32>(),
            )
        };
        // The SQ index array maps slot i to SQE i once and for all.
        let array = at(p.sq_off.array).cast::<u32>();
        for i in 0..p.sq_entries {
            // SAFETY: `array` has `sq_entries` elements in the mapping.
            unsafe { array.add(i as usize).write(i) };
        }
        let fixed = [fuse_fd.as_raw_fd()];
        // SAFETY: io_uring_register(2) with an array of one fd, read during the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_register,
                fd.as_raw_fd(),
                IORING_REGISTER_FILES,
                fixed.as_ptr(),
                1u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Ring {
            sq_head: at(p.sq_off.head).cast(),
            sq_tail: at(p.sq_off.tail).cast(),
            sq_mask,
            sq_entries: p.sq_entries,
            cq_head: at(p.cq_off.head).cast(),
            cq_tail: at(p.cq_off.tail).cast(),
            cq_mask,
            cqes: at(p.cq_off.cqes).cast(),
            fd,
            _rings: rings,
            sqes,
        })
    }

    fn sq(&self) -> (&AtomicU32, &AtomicU32) {
        // SAFETY: aligned u32s in the ring mapping, shared with the kernel, accessed atomically.
        unsafe { (&*self.sq_head, &*self.sq_tail) }
    }

    fn cq(&self) -> (&AtomicU32, &AtomicU32) {
        // SAFETY: as in `sq`.
        unsafe { (&*self.cq_head, &*self.cq_tail) }
    }

    /// Queues `sqe` for the next `enter`. The rings are sized so that it never fills: each entry
    /// and the wake-up poll have at most one command outstanding.
    fn push(&mut self, sqe: &Sqe128) {
        let (head, tail) = self.sq();
        let t = tail.load(Ordering::Relaxed);
        assert!(
            t.wrapping_sub(head.load(Ordering::Acquire)) < self.sq_entries,
            "io_uring submission queue full"
        );
        let slot = (t & self.sq_mask) as usize;
        // SAFETY: slot < sq_entries, inside the SQE mapping; the kernel does not read this SQE
        // before the tail below is published.
        unsafe { self.sqes.ptr.cast::<Sqe128>().add(slot).write(*sqe) };
        tail.store(t.wrapping_add(1), Ordering::Release);
    }

    /// Submits what was queued and, if `wait`, sleeps until at least one completion is there.
    fn enter(&mut self, wait: bool) -> io::Result<()> {
        loop {
            let (head, tail) = self.sq();
            let pending = tail
                .load(Ordering::Relaxed)
                .wrapping_sub(head.load(Ordering::Acquire));
            let (min_complete, flags) = if wait {
                (1u32, IORING_ENTER_GETEVENTS)
            } else {
                (0, 0)
            };
            if pending == 0 && !wait {
                return Ok(());
            }
            // SAFETY: io_uring_enter(2) on our ring, no signal mask or extended argument.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    self.fd.as_raw_fd(),
                    pending,
                    min_complete,
                    flags,
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            };
            if r >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Completions must be reaped first; the caller does that and comes back.
                Some(libc::EBUSY | libc::EAGAIN) => return Ok(()),
                _ => return Err(e),
            }
        }
    }

    /// The next completion, if any.
    fn next_cqe(&mut self) -> Option<Cqe> {
        let (head, tail) = self.cq();
        let h = head.load(Ordering::Relaxed);
        if h == tail.load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: the kernel published the CQE at `h` (tail load above, acquire).
        let cqe = unsafe { self.cqes.add((h & self.cq_mask) as usize).read() };
        head.store(h.wrapping_add(1), Ordering::Release);
        Some(cqe)
    }
}

/// The entries' buffers of one queue: per entry one page (the kernel's 288-byte header at its
/// start, the rebuilt request's head at its end) followed by the payload buffer.
struct EntryMemory {
    map: Mapping,
    page: usize,
    payload_size: usize,
    /// Set when the kernel may still hold registered entries at exit: then the memory is leaked
    /// rather than unmapped.
    leak: AtomicBool,
}

// SAFETY: raw memory shared with the kernel; who may touch which bytes when is the protocol of
// `Queue` (documented there), not something the type system sees.
unsafe impl Send for EntryMemory {}
// SAFETY: as above.
unsafe impl Sync for EntryMemory {}

impl EntryMemory {
    fn stride(&self) -> usize {
        self.page + self.payload_size
    }

    fn header(&self, entry: usize) -> *mut u8 {
        self.map.ptr.wrapping_add(entry * self.stride())
    }

    fn payload(&self, entry: usize) -> *mut u8 {
        self.header(entry).wrapping_add(self.page)
    }
}

impl Drop for EntryMemory {
    fn drop(&mut self) {
        if self.leak.load(Ordering::Relaxed) {
            // An empty mapping is not unmapped.
            self.map.len = 0;
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum SlotState {
    /// Registered with the kernel (or not yet): the kernel may write the entry.
    #[default]
    Kernel,
    /// Holds a request being served; the reply has not been written yet.
    Serving,
    /// The reply is written (or staged); the entry waits for its commit.
    Answered,
}

/// What a queue knows of one entry between the kernel's fetch and the commit.
#[derive(Debug, Default)]
struct Slot {
    state: SlotState,
    unique: u64,
    commit_id: u64,
    /// The parsed request covers the payload buffer: a reply sent while it is dispatched is
    /// staged in `staged` and copied into the payload once dispatch is over.
    borrowed: bool,
    staged: Vec<u8>,
    /// The entry has fetched a request since it was registered (so a failed command is a
    /// failed commit, not a failed registration).
    fetched: bool,
}

/// `struct iovec`.
#[repr(C)]
struct IoVec {
    base: usize,
    len: usize,
}

/// A queue's state shared by its thread and the replies in flight.
///
/// Who touches an entry's memory when: the kernel, from a REGISTER or COMMIT_AND_FETCH until the
/// completion that says a request is there (`SlotState::Kernel`); then the queue's thread, which
/// reads the header, writes the request's head at the end of the header page and parses it in
/// place; then the reply (under the slot's lock), which writes the out-header and payload size
/// into the header and the body into the payload buffer, or stages the body if the request
/// covers the payload; then the thread again, which copies a staged body into place once dispatch
/// has returned and submits the commit.
pub(crate) struct Queue {
    qid: u16,
    mem: EntryMemory,
    /// The REGISTER commands' iovecs (header, payload) per entry; the kernel reads them while the
    /// command is issued.
    iovecs: Box<[[IoVec; 2]]>,
    slots: Box<[Mutex<Slot>]>,
    /// Entries answered since the thread last looked, in order.
    answered: Mutex<Vec<usize>>,
    /// Written by replies sent from other threads and by `stop`, polled by the ring.
    wake: OwnedFd,
    thread: OnceLock<ThreadId>,
    stop: AtomicBool,
    stats: Arc<TransportStats>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("qid", &self.qid).finish()
    }
}

impl Queue {
    fn new(qid: u16, payload_size: usize, stats: Arc<TransportStats>) -> io::Result<Queue> {
        let page = page_size::get();
        let stride = page + payload_size;
        let map = Mapping::new(stride * RING_DEPTH, None)?;
        let mem = EntryMemory {
            map,
            page,
            payload_size,
            leak: AtomicBool::new(false),
        };
        let iovecs = (0..RING_DEPTH)
            .map(|i| {
                [
                    IoVec {
                        base: mem.header(i) as usize,
                        len: HEADER_SIZE,
                    },
                    IoVec {
                        base: mem.payload(i) as usize,
                        len: payload_size,
                    },
                ]
            })
            .collect();
        let wake = nix::sys::eventfd::EventFd::from_value_and_flags(
            0,
            nix::sys::eventfd::EfdFlags::EFD_CLOEXEC | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
        )?;
        Ok(Queue {
            qid,
            mem,
            iovecs,
            slots: (0..RING_DEPTH).map(|_| Mutex::default()).collect(),
            answered: Mutex::new(Vec::with_capacity(RING_DEPTH)),
            wake: wake.into(),
            thread: OnceLock::new(),
            stop: AtomicBool::new(false),
            stats,
        })
    }

    fn register_sqe(&self, entry: usize) -> Sqe128 {
        let mut sqe = Sqe128::fuse_cmd(FUSE_IO_URING_CMD_REGISTER, self.qid, 0, entry);
        sqe.addr = self.iovecs[entry].as_ptr() as u64;
        sqe.len = 2;
        sqe
    }

    fn wake_sqe(&self) -> Sqe128 {
        let mut sqe = Sqe128::zeroed();
        sqe.opcode = IORING_OP_POLL_ADD;
        sqe.fd = self.wake.as_raw_fd();
        sqe.op_flags = libc::POLLIN as u32;
        sqe.user_data = WAKE;
        sqe
    }

    fn wake_up(&self) {
        let one = 1u64.to_ne_bytes();
        if let Err(e) = nix::unistd::write(&self.wake, &one) {
            if e != nix::errno::Errno::EAGAIN {
                error!(
                    "FUSE io_uring queue {}: cannot wake its thread: {e}",
                    self.qid
                );
            }
        }
    }

    fn drain_wake(&self) {
        let mut buf = [0u8; 8];
        let _ = nix::unistd::read(&self.wake, &mut buf);
    }

    /// Writes the reply `data` (out-header, then body) to the request `unique` held by `entry`.
    fn answer(&self, entry: usize, unique: u64, data: &[IoSlice<'_>]) -> io::Result<()> {
        let mut slot = self.slots[entry].lock();
        if slot.state != SlotState::Serving || slot.unique != unique {
            return Err(io::Error::other(format!(
                "FUSE io_uring queue {}: reply to request {unique}, which is not being served",
                self.qid
            )));
        }
        let total: usize = data.iter().map(|s| s.len()).sum();
        let mut out = [0u8; OUT_HEADER_SIZE];
        // Reused from one reply to the next: a WRITE's 8-byte reply allocates nothing.
        let mut staged = std::mem::take(&mut slot.staged);
        staged.clear();
        let mut body_len = total.saturating_sub(OUT_HEADER_SIZE);
        if body_len > self.mem.payload_size {
            error!(
                "FUSE io_uring queue {}: reply of {body_len} bytes exceeds the {}-byte buffer, \
                 answering EIO",
                self.qid, self.mem.payload_size
            );
            body_len = 0;
            out[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
        } else {
            // Split the slices into the out-header and the body.
            let mut header_filled = 0;
            let dst = if slot.borrowed {
                None
            } else {
                Some(self.mem.payload(entry))
            };
            let mut written = 0;
            for s in data {
                let mut s: &[u8] = s;
                if header_filled < OUT_HEADER_SIZE {
                    let n = s.len().min(OUT_HEADER_SIZE - header_filled);
                    out[header_filled..header_filled + n].copy_from_slice(&s[..n]);
                    header_filled += n;
                    s = &s[n..];
                }
                if s.is_empty() {
                    continue;
                }
                match dst {
                    // SAFETY: written + s.len() <= body_len <= payload_size, inside this entry's
                    // payload buffer, which the request being served does not cover (not
                    // `borrowed`) and which nothing else writes while the slot is `Serving`.
                    Some(p) => unsafe {
                        std::ptr::copy_nonoverlapping(s.as_ptr(), p.add(written), s.len());
                    },
                    None => staged.extend_from_slice(s),
                }
                written += s.len();
            }
        }
        slot.staged = staged;
        // The out-header as the kernel reads it: its length, our error, the request's unique.
        out[0..4].copy_from_slice(&((OUT_HEADER_SIZE + body_len) as u32).to_ne_bytes());
        out[8..16].copy_from_slice(&unique.to_ne_bytes());
        let header = self.mem.header(entry);
        // SAFETY: the first 16 bytes (in_out) and the payload size field of this entry's header,
        // which the request being served does not cover (its head is at the end of the page) and
        // which only the holder of the slot's lock writes while the slot is `Serving`.
        unsafe {
            std::ptr::copy_nonoverlapping(out.as_ptr(), header, OUT_HEADER_SIZE);
            header
                .add(ENT_PAYLOAD_SZ_OFFSET)
                .cast::<u32>()
                .write_unaligned(body_len as u32);
        }
        slot.state = SlotState::Answered;
        drop(slot);
        self.answered.lock().push(entry);
        if self.thread.get() != Some(&thread::current().id()) {
            self.wake_up();
        }
        Ok(())
    }
}

/// Replies to one request held by a ring entry (the `ReplySender` of the ring transport).
#[derive(Debug, Clone)]
pub(crate) struct RingSender {
    queue: Arc<Queue>,
    entry: usize,
    unique: u64,
    /// The session's `/dev/fuse` channel, for what only it carries (backing files).
    dev: ChannelSender,
}

impl RingSender {
    pub(crate) fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        self.queue.answer(self.entry, self.unique, data)
    }

    pub(crate) fn open_backing(&self, fd: BorrowedFd<'_>) -> io::Result<BackingId> {
        self.dev.open_backing(fd)
    }

    pub(crate) unsafe fn wrap_backing(&self, id: u32) -> BackingId {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.dev.wrap_backing(id) }
    }
}

/// The queues' rings and buffers, made before the INIT reply so that a failure there means
/// io_uring is simply not negotiated.
#[derive(Debug)]
pub(crate) struct Rings {
    queues: Vec<(Arc<Queue>, RingHolder)>,
}

struct RingHolder(Ring);

impl std::fmt::Debug for RingHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ring")
    }
}

impl Rings {
    /// One ring per possible CPU on `fuse_fd`, entries with payload buffers of `payload`
    /// bytes (at least what the kernel requires for the negotiated `max_write` and
    /// `max_pages`).
    pub(crate) fn prepare(
        fuse_fd: BorrowedFd<'_>,
        max_write: u32,
        max_pages: u16,
        stats: Arc<TransportStats>,
    ) -> io::Result<Rings> {
        let page = page_size::get();
        let payload = (max_write as usize)
            .max(usize::from(max_pages) * page)
            .max(FUSE_DEFAULT_MAX_PAGES_PER_REQ * page)
            .max(FUSE_MIN_READ_BUFFER)
            .div_ceil(page)
            * page;
        let n = possible_cpus();
        let qids = u16::try_from(n).map_err(|_| io::Error::other("too many CPUs"))?;
        let mut queues = Vec::with_capacity(n);
        for qid in 0..qids {
            let queue = Queue::new(qid, payload, stats.clone())?;
            // Entries and the wake-up poll, each with at most one command outstanding.
            let ring = Ring::new((RING_DEPTH + 1) as u32, fuse_fd)?;
            queues.push((Arc::new(queue), RingHolder(ring)));
        }
        debug!("FUSE io_uring: {n} queues of {RING_DEPTH} entries, {payload}-byte payload buffers");
        Ok(Rings { queues })
    }

    /// Starts the queues' threads, which register the entries and serve requests.
    pub(crate) fn start<FS: Filesystem>(
        self,
        make_loop: impl Fn(String) -> SessionEventLoop<FS>,
    ) -> io::Result<RingThreads> {
        let mut threads = Vec::with_capacity(self.queues.len());
        let mut queues = Vec::with_capacity(self.queues.len());
        for (queue, RingHolder(ring)) in self.queues {
            let name = format!("fuser-uring-{}", queue.qid);
            let se = make_loop(name.clone());
            let q = queue.clone();
            let handle = thread::Builder::new()
                .name(name)
                .spawn(move || serve_queue(ring, &q, &se))?;
            threads.push(handle);
            queues.push(queue);
        }
        Ok(RingThreads { queues, threads })
    }
}

/// The running queue threads.
#[derive(Debug)]
pub(crate) struct RingThreads {
    queues: Vec<Arc<Queue>>,
    threads: Vec<JoinHandle<()>>,
}

impl RingThreads {
    /// Stops and joins the threads. At unmount the kernel has already completed every entry's
    /// command, and the threads are on their way out; this is for the rest.
    pub(crate) fn stop_and_join(self) {
        for q in &self.queues {
            q.stop.store(true, Ordering::Release);
            q.wake_up();
        }
        for t in self.threads {
            if t.join().is_err() {
                error!("FUSE io_uring thread panicked");
            }
        }
    }
}

/// How long a stopped queue waits for the kernel to give its entries back.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// The thread of one queue.
fn serve_queue<FS: Filesystem>(mut ring: Ring, q: &Arc<Queue>, se: &SessionEventLoop<FS>) {
    q.thread.set(thread::current().id()).ok();
    pin_to_cpu(usize::from(q.qid));
    for entry in 0..RING_DEPTH {
        ring.push(&q.register_sqe(entry));
    }
    ring.push(&q.wake_sqe());
    q.stats.io_uring_queues.fetch_add(1, Ordering::Relaxed);
    let mut live = RING_DEPTH;
    let mut stopping: Option<Instant> = None;
    let mut failed_registration = false;
    loop {
        // Commits of the last round go in with the wait for the next request: one syscall.
        if let Err(e) = ring.enter(stopping.is_none()) {
            error!("FUSE io_uring queue {}: io_uring_enter: {e}", q.qid);
            break;
        }
        while let Some(cqe) = ring.next_cqe() {
            if cqe.user_data == WAKE {
                q.drain_wake();
                if stopping.is_none() {
                    ring.push(&q.wake_sqe());
                }
                continue;
            }
            let entry = cqe.user_data as usize;
            if cqe.res < 0 {
                live -= 1;
                let fetched = std::mem::take(&mut q.slots[entry].lock().fetched);
                entry_failed(q, cqe.res, fetched, &mut failed_registration);
                continue;
            }
            q.stats.io_uring_requests.fetch_add(1, Ordering::Relaxed);
            serve_entry(q, entry, se);
        }
        // Answered entries go back to the kernel with their reply.
        let answered = std::mem::take(&mut *q.answered.lock());
        for entry in answered {
            let mut slot = q.slots[entry].lock();
            if slot.borrowed && !slot.staged.is_empty() {
                // SAFETY: dispatch of the request that covered the payload is over; the
                // staged body fits (checked in `answer`); the slot's lock is held.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        slot.staged.as_ptr(),
                        q.mem.payload(entry),
                        slot.staged.len(),
                    );
                }
                slot.staged.clear();
            }
            slot.state = SlotState::Kernel;
            let commit = Sqe128::fuse_cmd(
                FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
                q.qid,
                slot.commit_id,
                entry,
            );
            drop(slot);
            ring.push(&commit);
        }
        if live == 0 {
            break;
        }
        if q.stop.load(Ordering::Acquire) {
            let since = *stopping.get_or_insert_with(Instant::now);
            if since.elapsed() > STOP_GRACE {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
    q.stats.io_uring_queues.fetch_sub(1, Ordering::Relaxed);
    if live > 0 {
        // The kernel may still write into registered entries: never unmap them.
        warn!(
            "FUSE io_uring queue {}: stopped with {live} entries still registered",
            q.qid
        );
        q.mem.leak.store(true, Ordering::Relaxed);
    }
    debug!("FUSE io_uring queue {} stopped", q.qid);
}

fn entry_failed(q: &Queue, res: i32, fetched: bool, failed_registration: &mut bool) {
    let err = io::Error::from_raw_os_error(-res);
    match -res {
        // The connection is gone (unmount, abort): every entry ends this way.
        libc::ENOTCONN | libc::ECANCELED | libc::ENODEV => {
            debug!("FUSE io_uring queue {}: entry ended: {err}", q.qid);
        }
        _ if !fetched => {
            // A failed registration turns io_uring off for the connection: the kernel sends
            // everything through /dev/fuse, where the session's workers serve it.
            if !*failed_registration {
                warn!(
                    "FUSE io_uring queue {}: registration failed ({err}); requests go through \
                     /dev/fuse",
                    q.qid
                );
                *failed_registration = true;
            }
        }
        _ => error!("FUSE io_uring queue {}: commit failed: {err}", q.qid),
    }
}

/// Serves the request the kernel put into `entry`.
fn serve_entry<FS: Filesystem>(q: &Arc<Queue>, entry: usize, se: &SessionEventLoop<FS>) {
    let header = q.mem.header(entry);
    let mut in_header = [0u8; IN_HEADER_SIZE];
    let (commit_id, payload_sz) = {
        // SAFETY: the kernel wrote this entry's header before posting the completion just
        // reaped, and does not touch the entry again before its commit.
        unsafe {
            std::ptr::copy_nonoverlapping(header, in_header.as_mut_ptr(), IN_HEADER_SIZE);
            (
                header
                    .add(ENT_COMMIT_ID_OFFSET)
                    .cast::<u64>()
                    .read_unaligned(),
                header
                    .add(ENT_PAYLOAD_SZ_OFFSET)
                    .cast::<u32>()
                    .read_unaligned() as usize,
            )
        }
    };
    let len = u32::from_ne_bytes(in_header[0..4].try_into().unwrap()) as usize;
    let opcode = u32::from_ne_bytes(in_header[4..8].try_into().unwrap());
    let unique = u64::from_ne_bytes(in_header[8..16].try_into().unwrap());
    {
        let mut slot = q.slots[entry].lock();
        slot.state = SlotState::Serving;
        slot.unique = unique;
        slot.commit_id = commit_id;
        slot.borrowed = payload_sz > 0;
        slot.fetched = true;
    }
    // The kernel puts the request's first argument (`op_in`) apart from the rest (the payload);
    // the in-header's length covers all three.
    let arg0 = len.checked_sub(IN_HEADER_SIZE + payload_sz);
    let arg0 = match arg0 {
        Some(a) if a <= OP_IN_SIZE && payload_sz <= q.mem.payload_size => a,
        _ => {
            error!(
                "FUSE io_uring queue {}: malformed request (opcode {opcode}, length {len}, \
                 payload {payload_sz})",
                q.qid
            );
            q.slots[entry].lock().borrowed = false;
            reply_error(q, entry, unique, libc::EIO);
            return;
        }
    };
    let head = IN_HEADER_SIZE + arg0;
    let mut copied: Vec<u64> = Vec::new();
    let data: &[u8] = if head % 8 == 0 {
        let start = q.mem.payload(entry).wrapping_sub(head);
        // SAFETY: `start..payload` is the end of this entry's header page (head <= 168 bytes,
        // the kernel's header takes its first 288), which only this thread writes; the kernel
        // wrote the payload before the completion and leaves the entry alone until the commit.
        unsafe {
            std::ptr::copy_nonoverlapping(in_header.as_ptr(), start, IN_HEADER_SIZE);
            std::ptr::copy_nonoverlapping(
                header.add(OP_IN_OFFSET),
                start.add(IN_HEADER_SIZE),
                arg0,
            );
        }
        // SAFETY: `len` bytes from `start` are the rebuilt head and the first `payload_sz`
        // bytes of the payload, all initialised; while this slice lives nobody writes them: the
        // reply writes the in_out bytes at the page's start, the payload size field, and the
        // payload only when it is not `borrowed` by this request (payload_sz == 0), and the kernel
        // waits for the commit. The start is 8-byte aligned, as `fuse_in_header` needs.
        unsafe { std::slice::from_raw_parts(start, len) }
    } else {
        // A first argument whose size breaks the in-header's alignment (none of today's):
        // assemble the request in an aligned copy instead.
        copied.resize(len.div_ceil(8), 0);
        let dst = copied.as_mut_ptr().cast::<u8>();
        // SAFETY: `copied` holds at least `len` bytes; the sources are this entry's header
        // and payload, as above.
        unsafe {
            std::ptr::copy_nonoverlapping(in_header.as_ptr(), dst, IN_HEADER_SIZE);
            std::ptr::copy_nonoverlapping(header.add(OP_IN_OFFSET), dst.add(IN_HEADER_SIZE), arg0);
            std::ptr::copy_nonoverlapping(q.mem.payload(entry), dst.add(head), payload_sz);
        }
        q.slots[entry].lock().borrowed = false;
        // SAFETY: `len` initialised bytes of `copied`.
        unsafe { std::slice::from_raw_parts(dst, len) }
    };
    let sender = RingSender {
        queue: q.clone(),
        entry,
        unique,
        dev: se.ch.sender(),
    };
    let dispatched =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(
            || match RequestWithSender::with_ring(se.ch.sender(), sender, data) {
                Some(req) => {
                    if let Ok(Operation::Destroy(_)) = req.request.operation() {
                        req.reply::<ReplyEmpty>().ok();
                    } else {
                        req.dispatch(se);
                    }
                    true
                }
                None => false,
            },
        ));
    match dispatched {
        Ok(true) => {}
        Ok(false) => reply_error(q, entry, unique, libc::EIO),
        Err(_) => {
            error!(
                "FUSE io_uring queue {}: panic while serving opcode {opcode}",
                q.qid
            );
            reply_error(q, entry, unique, libc::EIO);
        }
    }
    // FORGET and BATCH_FORGET have no reply (the kernel sends them through /dev/fuse; this is
    // in case it ever does not): the entry still has to go back.
    if matches!(opcode, 2 | 42) {
        reply_error(q, entry, unique, 0);
    }
}

/// Answers `entry`'s request with `errno` (0: an empty success) unless it was answered.
fn reply_error(q: &Queue, entry: usize, unique: u64, errno: i32) {
    if q.slots[entry].lock().state != SlotState::Serving {
        return;
    }
    let mut out = [0u8; OUT_HEADER_SIZE];
    out[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    if let Err(e) = q.answer(entry, unique, &[IoSlice::new(&out)]) {
        error!("{e}");
    }
}

/// The number of possible CPUs (the kernel makes one queue for each, online or not).
fn possible_cpus() -> usize {
    let from_sysfs = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
                .max()
        });
    match from_sysfs {
        Some(highest) => highest + 1,
        // SAFETY: sysconf(3) has no preconditions.
        None => unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as usize,
    }
}

/// Pins the calling thread to `cpu`: the kernel queues a request on the queue of the CPU the
/// caller runs on, so the thread that answers is woken where the caller waits.
fn pin_to_cpu(cpu: usize) {
    use nix::sched::CpuSet;
    let mut set = CpuSet::new();
    let result = set
        .set(cpu)
        .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
    match result {
        Ok(()) => debug!("FUSE io_uring queue {cpu}: pinned to its CPU"),
        // An offline CPU, or one outside this process's cpuset: the queue is served all the
        // same, from wherever the scheduler runs the thread.
        Err(e) => debug!("FUSE io_uring queue {cpu}: not pinned to its CPU: {e}"),
    }
}
