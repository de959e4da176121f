//! A power-cut simulator under the image (test support, and the daemon's
//! `MMAPFS_POWERLOSS_SHADOW` hook).
//!
//! It models the disk under a `MAP_SHARED` mapping as the kernel and a device with a volatile
//! cache treat it: a page written back ([`super::Image::write_back`], or by the kernel at any
//! moment: [`CrashSim::kernel_writeback`]) sits in the device cache; a flush makes everything
//! in the cache durable, and the file's length with it. A crash image ([`CrashSim::crash_image`])
//! is the durable state plus, for every page that differs from it, any of its versions: durable,
//! cached, or the newest in memory, possibly torn at 512-byte sectors. That is exactly what a
//! power cut may leave, so correctness is tested against every order in which pages may land.
//!
//! The mapping itself keeps working as usual; only the durability calls are intercepted (no
//! `msync`, no `sync_file_range`), which makes simulated runs fast.

#![deny(unsafe_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use parking_lot::Mutex;

use super::{Image, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;
const SECTOR: usize = 512;

/// Called at the start of every flush, before it takes effect: a crash image taken inside it is
/// a power cut during that flush.
pub type FlushHook = Box<dyn FnMut(&Image) + Send>;

/// What the simulator believes the disk holds.
pub struct CrashSim {
    state: Mutex<State>,
    hook: Mutex<Option<FlushHook>>,
}

struct State {
    /// Durable bytes; its length is the durable file length.
    durable: Vec<u8>,
    /// Pages written back since the last flush (the device's volatile cache).
    cache: HashMap<u64, Vec<u8>>,
    /// Mirror of `durable` kept on disk, if asked for (the daemon's shadow file).
    shadow: Option<File>,
    flushes: u64,
}

/// Counters for tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimStats {
    pub flushes: u64,
    pub durable_len: u64,
    pub cached_pages: usize,
}

impl CrashSim {
    /// A simulator whose disk starts as the current contents of `img`'s file.
    pub fn new(img: &Image) -> io::Result<CrashSim> {
        let len = img.file().metadata()?.len() as usize;
        let mut durable = vec![0u8; len];
        img.file().read_exact_at(&mut durable, 0)?;
        Ok(CrashSim {
            state: Mutex::new(State {
                durable,
                cache: HashMap::new(),
                shadow: None,
                flushes: 0,
            }),
            hook: Mutex::new(None),
        })
    }

    /// Mirrors the durable state into `file` from now on (replaced at every flush).
    pub fn mirror_to(&self, file: File) -> io::Result<()> {
        let mut s = self.state.lock();
        file.set_len(0)?;
        file.write_all_at(&s.durable, 0)?;
        s.shadow = Some(file);
        Ok(())
    }

    /// Installs the hook called at the start of each flush.
    pub fn set_flush_hook(&self, hook: Option<FlushHook>) {
        *self.hook.lock() = hook;
    }

    pub fn stats(&self) -> SimStats {
        let s = self.state.lock();
        SimStats {
            flushes: s.flushes,
            durable_len: s.durable.len() as u64,
            cached_pages: s.cache.len(),
        }
    }

    /// Pages `[start, end)` (byte offsets, page aligned) are written back: into the cache.
    pub(super) fn write_back(&self, img: &Image, start: u64, end: u64) {
        let mut s = self.state.lock();
        for page in start / PAGE_SIZE..end / PAGE_SIZE {
            s.write_back_page(img, page);
        }
    }

    /// A flush: the range is written back, then the cache and the file length become durable.
    pub(super) fn flush(&self, img: &Image, start: u64, end: u64) {
        let hook = self.hook.lock().take();
        if let Some(mut hook) = hook {
            hook(img);
            let mut slot = self.hook.lock();
            if slot.is_none() {
                *slot = Some(hook);
            }
        }
        let mut s = self.state.lock();
        for page in start / PAGE_SIZE..end / PAGE_SIZE {
            s.write_back_page(img, page);
        }
        let len = img.len() as usize;
        s.durable.resize(len, 0);
        let cache = std::mem::take(&mut s.cache);
        let mut pages: Vec<u64> = cache.keys().copied().collect();
        pages.sort_unstable();
        for (page, bytes) in cache {
            let off = page as usize * PAGE;
            if off + PAGE <= len {
                s.durable[off..off + PAGE].copy_from_slice(&bytes);
            }
        }
        s.flushes += 1;
        if let Some(shadow) = &s.shadow {
            // The mirror is a test aid: report failures loudly but do not fail the flush.
            let r = shadow.set_len(len as u64).and_then(|_| {
                pages
                    .iter()
                    .filter(|&&p| (p as usize + 1) * PAGE <= len)
                    .try_for_each(|&p| {
                        let off = p as usize * PAGE;
                        shadow.write_all_at(&s.durable[off..off + PAGE], off as u64)
                    })
            });
            if let Err(e) = r {
                log::error!("crash simulator: cannot update the shadow file: {e}");
            }
        }
    }

    /// The kernel writes back pages on its own: each page that differs from the disk is written
    /// back with probability `1 / one_in`.
    pub fn kernel_writeback(&self, img: &Image, rng: &mut dyn FnMut() -> u64, one_in: u64) {
        let mut s = self.state.lock();
        let pages = img.len() / PAGE_SIZE;
        for page in 0..pages {
            if rng().is_multiple_of(one_in.max(1)) {
                s.write_back_page(img, page);
            }
        }
    }

    /// What a power cut right now could leave on disk: one random choice among all of them.
    pub fn crash_image(&self, img: &Image, rng: &mut dyn FnMut() -> u64) -> Vec<u8> {
        let s = self.state.lock();
        let mem_len = img.len() as usize;
        let dur_len = s.durable.len();
        // The file's new length reaches the disk at a flush or whenever the kernel writes the
        // inode back: either may have happened.
        let len = if mem_len != dur_len && rng().is_multiple_of(2) {
            mem_len
        } else {
            dur_len
        };
        let mut out = vec![0u8; len];
        let zero = [0u8; PAGE];
        for page in 0..(len / PAGE) as u64 {
            let off = page as usize * PAGE;
            let durable = s.durable.get(off..off + PAGE).unwrap_or(&zero);
            let memory = match img.bytes(off as u64, PAGE) {
                Ok(m) if off + PAGE <= mem_len => m,
                _ => durable,
            };
            let mut versions: Vec<&[u8]> = vec![durable];
            if let Some(c) = s.cache.get(&page)
                && c.as_slice() != durable
            {
                versions.push(c);
            }
            if memory != durable && versions.iter().all(|v| *v != memory) {
                versions.push(memory);
            }
            let dst = &mut out[off..off + PAGE];
            let pick = versions[(rng() % versions.len() as u64) as usize];
            dst.copy_from_slice(pick);
            if versions.len() > 1 && rng().is_multiple_of(8) {
                // A torn write: some sectors of another version.
                let other = versions[(rng() % versions.len() as u64) as usize];
                for sector in 0..PAGE / SECTOR {
                    if rng().is_multiple_of(2) {
                        let r = sector * SECTOR..(sector + 1) * SECTOR;
                        dst[r.clone()].copy_from_slice(&other[r]);
                    }
                }
            }
        }
        out
    }

    /// The durable state alone (a power cut where nothing unflushed reached the disk).
    pub fn durable_image(&self) -> Vec<u8> {
        self.state.lock().durable.clone()
    }
}

impl State {
    fn write_back_page(&mut self, img: &Image, page: u64) {
        let off = page as usize * PAGE;
        let Ok(memory) = img.bytes(off as u64, PAGE) else {
            return;
        };
        let known = match self.cache.get(&page) {
            Some(c) => c.as_slice(),
            None => self.durable.get(off..off + PAGE).unwrap_or(&[]),
        };
        if known != memory {
            self.cache.insert(page, memory.to_vec());
        }
    }
}
