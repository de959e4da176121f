//! File contents: truncate, sparse files, fallocate, SEEK_DATA/SEEK_HOLE, copy_file_range,
//! mmap through the mount, and growth of the image past 1 GiB.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Instant;

use crate::common::*;

const TIB: u64 = 1 << 40;

fn rw(p: &std::path::Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap()
}

fn read_at(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAAu8; len];
    f.read_exact_at(&mut buf, off).unwrap();
    buf
}

#[test]
fn truncate_grow_and_shrink() {
    let m = Mount::new();
    let p = m.p("t");
    let f = rw(&p);
    let data = pattern(10, 0, 3 * 4096 + 100);
    f.write_all_at(&data, 0).unwrap();
    // Grow: the new part reads zeros.
    f.set_len(40_000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 40_000);
    assert_eq!(read_at(&f, 0, data.len()), data);
    assert!(
        read_at(&f, data.len() as u64, 40_000 - data.len())
            .iter()
            .all(|&b| b == 0)
    );
    // Shrink into the middle of a block, then grow again: the cut tail must read zeros,
    // including the rest of the partial block that still holds old bytes on disk.
    f.set_len(5000).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 5000);
    f.set_len(20_000).unwrap();
    assert_eq!(read_at(&f, 0, 5000), data[..5000]);
    let tail = read_at(&f, 5000, 15_000);
    assert!(
        tail.iter().all(|&b| b == 0),
        "stale bytes after shrink+grow at {:?}",
        tail.iter().position(|&b| b != 0).map(|i| i + 5000)
    );
    drop(f);
    // Through a fresh open and path-based truncate too.
    let f = rw(&p);
    fs::write(m.p("u"), pattern(11, 0, 10_000)).unwrap();
    let u = OpenOptions::new().write(true).open(m.p("u")).unwrap();
    u.set_len(4097).unwrap();
    u.set_len(8192).unwrap();
    drop(u);
    let back = fs::read(m.p("u")).unwrap();
    assert_eq!(back[..4097], pattern(11, 0, 4097)[..]);
    assert!(back[4097..].iter().all(|&b| b == 0));
    // Truncate to zero frees everything.
    f.set_len(0).unwrap();
    assert_eq!(f.metadata().unwrap().blocks(), 0);
    // Writing past EOF leaves a zero gap.
    f.write_all_at(b"end", 10_000).unwrap();
    let all = read_at(&f, 0, 10_003);
    assert!(all[..10_000].iter().all(|&b| b == 0));
    assert_eq!(&all[10_000..], b"end");
    drop(f);
    m.finish();
}

#[test]
fn sparse_file_at_one_tib() {
    let mut m = Mount::new();
    let p = m.p("sparse");
    let f = rw(&p);
    let payload = pattern(12, TIB, 10_000);
    f.write_all_at(&payload, TIB).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    // (With the writeback cache, st_blocks counts the data once the kernel wrote it back.)
    f.sync_all().unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), TIB + 10_000);
    // 3 data blocks + 1 + a few tree nodes, in 512-byte units.
    assert!(
        md.blocks() <= 8 * 16,
        "st_blocks {} for a sparse file",
        md.blocks()
    );
    assert!(md.blocks() >= 8 * 4, "st_blocks {} too small", md.blocks());
    assert_eq!(read_at(&f, TIB, 10_000), payload);
    assert!(read_at(&f, TIB - 8192, 8192).iter().all(|&b| b == 0));
    assert!(read_at(&f, TIB / 2, 65536).iter().all(|&b| b == 0));
    assert_eq!(read_at(&f, 0, 4), b"head");
    // Reading at EOF returns nothing.
    let mut buf = [0u8; 16];
    assert_eq!(f.read_at(&mut buf, TIB + 10_000).unwrap(), 0);
    // Shrinking a huge sparse file is fast and frees its blocks.
    fs::write(m.p("other"), b"o").unwrap();
    let g = rw(&m.p("huge"));
    for i in 0..8u64 {
        g.write_all_at(&[i as u8 + 1; 4096], i * (TIB / 8) + 12_345)
            .unwrap();
    }
    assert_eq!(g.metadata().unwrap().len(), 7 * (TIB / 8) + 12_345 + 4096);
    g.set_len(4096).unwrap();
    assert!(g.metadata().unwrap().blocks() <= 8 * 4);
    drop(g);
    drop(f);
    m.remount();
    let f = File::open(m.p("sparse")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), TIB + 10_000);
    assert_eq!(read_at(&f, TIB, 10_000), payload);
    // Past the largest file size.
    let r = f.metadata().map(|_| ());
    r.unwrap();
    drop(f);
    let f = rw(&m.p("sparse"));
    match f.write_all_at(b"x", 1 << 60) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EFBIG)),
        // The writeback cache takes the write (the kernel knows no size limit of a FUSE
        // filesystem); writing it back fails, and fsync says so.
        Ok(()) => assert_eq!(err_of(f.sync_all()), libc::EFBIG),
    }
    drop(f);
    m.remount();
    assert_eq!(fs::metadata(m.p("sparse")).unwrap().len(), TIB + 10_000);
    m.finish();
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> Result<(), i32> {
    // SAFETY: valid descriptor.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) }).map(|_| ())
}

fn lseek(f: &File, off: u64, whence: i32) -> Result<u64, i32> {
    // SAFETY: valid descriptor.
    check(unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) }).map(|o| o as u64)
}

#[test]
fn fallocate_modes_and_seek_data_hole() {
    let m = Mount::new();
    let f = rw(&m.p("fa"));
    // Default mode: size and blocks grow, content reads zero.
    fallocate(&f, 0, 0, 1 << 20).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), 1 << 20);
    assert!(
        md.blocks() >= 2048,
        "st_blocks {} after 1 MiB fallocate",
        md.blocks()
    );
    assert!(read_at(&f, 0, 1 << 20).iter().all(|&b| b == 0));
    // KEEP_SIZE: blocks grow beyond EOF, size unchanged.
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20).unwrap();
    let md2 = f.metadata().unwrap();
    assert_eq!(md2.len(), 1 << 20);
    assert!(
        md2.blocks() >= md.blocks() + 2048,
        "KEEP_SIZE allocated nothing"
    );
    // Punch a hole in written data: it reads zero and the blocks go.
    let data = pattern(13, 0, 1 << 20);
    f.write_all_at(&data, 0).unwrap();
    let before = f.metadata().unwrap().blocks();
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    fallocate(&f, mode, 100_000, 300_000).unwrap();
    let after = f.metadata().unwrap();
    assert_eq!(after.len(), 1 << 20);
    assert!(
        after.blocks() + 8 * 70 <= before,
        "punch freed too little: {before} -> {}",
        after.blocks()
    );
    let back = read_at(&f, 0, 1 << 20);
    assert_eq!(back[..100_000], data[..100_000]);
    assert!(
        back[100_000..400_000].iter().all(|&b| b == 0),
        "punched range not zero"
    );
    assert_eq!(back[400_000..], data[400_000..]);
    // Punching without KEEP_SIZE is invalid.
    assert_eq!(
        fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096),
        Err(libc::EOPNOTSUPP)
    );
    drop(f);

    // data - hole - data.
    let g = rw(&m.p("holey"));
    g.write_all_at(&[1u8; 8192], 0).unwrap();
    g.write_all_at(&[2u8; 8192], 1 << 20).unwrap();
    assert_eq!(lseek(&g, 0, libc::SEEK_DATA), Ok(0));
    assert_eq!(lseek(&g, 0, libc::SEEK_HOLE), Ok(8192));
    assert_eq!(lseek(&g, 8192, libc::SEEK_DATA), Ok(1 << 20));
    assert_eq!(lseek(&g, 100_000, libc::SEEK_DATA), Ok(1 << 20));
    assert_eq!(lseek(&g, 1 << 20, libc::SEEK_HOLE), Ok((1 << 20) + 8192));
    assert_eq!(
        lseek(&g, (1 << 20) + 8192, libc::SEEK_DATA),
        Err(libc::ENXIO)
    );
    assert_eq!(
        lseek(&g, (1 << 20) + 9000, libc::SEEK_HOLE),
        Err(libc::ENXIO)
    );
    drop(g);
    m.finish();
}

/// The kernel sends LSEEK without writing back the pages it holds dirty: a store through a
/// mapping (any mount) or a cached write (writeback cache) into a hole must still read as data,
/// exactly as on tmpfs, while the pages are still only in the kernel.
#[test]
fn seek_data_sees_pages_the_kernel_has_not_written_back() {
    for options in [&[][..], &["writeback_cache"][..]] {
        let m = Mount::with(&["--size", "16M"], options);
        let f = rw(&m.p("sparse"));
        f.set_len(1 << 20).unwrap();
        let mut map = Map::new(&f, 1 << 20, libc::MAP_SHARED);
        map.slice()[5 * 4096 + 10] = 1;
        assert_eq!(
            lseek(&f, 0, libc::SEEK_DATA),
            Ok(5 * 4096),
            "{options:?}: stored page"
        );
        assert_eq!(
            lseek(&f, 5 * 4096, libc::SEEK_HOLE),
            Ok(6 * 4096),
            "{options:?}"
        );
        f.write_all_at(b"w", 9 * 4096 + 7).unwrap();
        assert_eq!(
            lseek(&f, 6 * 4096, libc::SEEK_DATA),
            Ok(9 * 4096),
            "{options:?}: written page"
        );
        assert_eq!(
            lseek(&f, 9 * 4096, libc::SEEK_HOLE),
            Ok(10 * 4096),
            "{options:?}"
        );
        // A store after the seek (the mapping is still live) is seen by the next one.
        map.slice()[20 * 4096] = 2;
        assert_eq!(
            lseek(&f, 10 * 4096, libc::SEEK_DATA),
            Ok(20 * 4096),
            "{options:?}: again"
        );
        drop(map);
        let mut back = vec![0u8; 1 << 20];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(
            (back[5 * 4096 + 10], back[9 * 4096 + 7], back[20 * 4096]),
            (1, b'w', 2)
        );
        drop(f);
        m.finish();
    }
}

fn copy_file_range(a: &File, off_a: u64, b: &File, off_b: u64, len: usize) -> Result<usize, i32> {
    let (mut oa, mut ob) = (off_a as i64, off_b as i64);
    // SAFETY: valid descriptors and offset pointers.
    let r =
        unsafe { libc::copy_file_range(a.as_raw_fd(), &mut oa, b.as_raw_fd(), &mut ob, len, 0) };
    check(r).map(|n| n as usize)
}

#[test]
fn copy_file_range_between_and_within_files() {
    let m = Mount::new();
    let src_data = pattern(14, 0, 3 << 20);
    fs::write(m.p("src"), &src_data).unwrap();
    let src = File::open(m.p("src")).unwrap();
    let dst = rw(&m.p("dst"));
    let mut done = 0;
    while done < src_data.len() {
        let n =
            copy_file_range(&src, done as u64, &dst, done as u64, src_data.len() - done).unwrap();
        assert!(n > 0);
        done += n;
    }
    drop(dst);
    assert!(fs::read(m.p("dst")).unwrap() == src_data, "copy differs");
    // Unaligned offsets.
    let dst2 = rw(&m.p("dst2"));
    let n = copy_file_range(&src, 1234, &dst2, 777, 100_000).unwrap();
    assert_eq!(n, 100_000);
    let back = read_at(&dst2, 0, 100_777);
    assert!(back[..777].iter().all(|&b| b == 0));
    assert_eq!(back[777..], src_data[1234..101_234]);
    drop(dst2);
    // Within one file, non-overlapping.
    let f = rw(&m.p("one"));
    let half = pattern(15, 0, 1 << 20);
    f.write_all_at(&half, 0).unwrap();
    let n = copy_file_range(&f, 0, &f, 2 << 20, 1 << 20).unwrap();
    assert_eq!(n, 1 << 20);
    assert_eq!(f.metadata().unwrap().len(), 3 << 20);
    assert_eq!(read_at(&f, 2 << 20, 1 << 20), half);
    assert!(read_at(&f, 1 << 20, 1 << 20).iter().all(|&b| b == 0));
    assert_eq!(read_at(&f, 0, 1 << 20), half);
    // Overlapping ranges are refused.
    assert_eq!(copy_file_range(&f, 0, &f, 4096, 8192), Err(libc::EINVAL));
    drop(f);
    drop(src);
    m.finish();
}

/// An mmap of `len` bytes of `f`.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(f: &File, len: usize, flags: i32) -> Map {
        // SAFETY: a fresh mapping of an open descriptor; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Map {
            ptr: ptr.cast(),
            len,
        }
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is live for `len` bytes and only this thread touches it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn msync(&self) {
        // SAFETY: a live mapping.
        let r = unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) };
        assert_eq!(r, 0, "msync: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[test]
fn mmap_shared_and_private() {
    let mut m = Mount::new();
    let len = 1 << 20;
    let p = m.p("mapped");
    fs::write(&p, vec![0u8; len]).unwrap();
    let f = rw(&p);
    let data = pattern(16, 0, len);
    {
        let mut map = Map::new(&f, len, libc::MAP_SHARED);
        map.slice().copy_from_slice(&data);
        map.msync();
        // read() through another descriptor sees it.
        assert!(
            fs::read(&p).unwrap() == data,
            "MAP_SHARED write not visible to read()"
        );
    }
    {
        let mut map = Map::new(&f, len, libc::MAP_PRIVATE);
        assert!(map.slice() == &data[..]);
        map.slice()[..4096].fill(0xEE);
        map.slice()[len - 1] = 0xEE;
        assert_eq!(read_at(&f, 0, 4096), data[..4096]);
        assert_eq!(read_at(&f, len as u64 - 1, 1), [data[len - 1]]);
    }
    // read()/write() and a shared mapping are coherent.
    {
        let mut map = Map::new(&f, len, libc::MAP_SHARED);
        f.write_all_at(b"written", 8192).unwrap();
        assert_eq!(&map.slice()[8192..8199], b"written");
        map.slice()[100..106].copy_from_slice(b"mapped");
        map.msync();
        assert_eq!(read_at(&f, 100, 6), b"mapped");
    }
    drop(f);
    let mut expect = data.clone();
    expect[8192..8199].copy_from_slice(b"written");
    expect[100..106].copy_from_slice(b"mapped");
    m.remount();
    assert!(
        fs::read(m.p("mapped")).unwrap() == expect,
        "mapped writes lost across remount"
    );
    m.finish();
}

/// Stamps every 4 KiB block with its file and block number over a random base, so a block
/// written to the wrong place or lost is detected.
fn growth_chunk(base: &[u8], file: u64, chunk: u64, out: &mut [u8]) {
    out.copy_from_slice(base);
    for (i, block) in out.chunks_mut(4096).enumerate() {
        let id = chunk * (base.len() as u64 / 4096) + i as u64;
        block[..8].copy_from_slice(&file.to_le_bytes());
        block[8..16].copy_from_slice(&id.to_le_bytes());
    }
}

#[test]
fn image_grows_past_one_gib() {
    let mut m = Mount::new();
    let start = Instant::now();
    let chunk = 1usize << 20;
    let files = 4u64;
    let chunks_per_file = 282u64; // 4 x 282 MiB = 1128 MiB
    let mut rng = Rng::new(17);
    let base = rng.bytes(chunk);
    let mut buf = vec![0u8; chunk];
    let handles: Vec<_> = (0..files)
        .map(|i| {
            let m_path = m.p(&format!("big{i}"));
            let base = base.clone();
            std::thread::spawn(move || {
                let mut f = File::create(&m_path).unwrap();
                let mut buf = vec![0u8; chunk];
                for c in 0..chunks_per_file {
                    growth_chunk(&base, i, c, &mut buf);
                    f.write_all(&buf).unwrap();
                }
                f.sync_all().unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let written = start.elapsed();
    m.remount();
    let mut got = vec![0u8; chunk];
    for i in 0..files {
        let mut f = File::open(m.p(&format!("big{i}"))).unwrap();
        assert_eq!(f.metadata().unwrap().len(), chunks_per_file * chunk as u64);
        for c in 0..chunks_per_file {
            f.read_exact(&mut got).unwrap();
            growth_chunk(&base, i, c, &mut buf);
            assert!(got == buf, "file {i} chunk {c} differs");
        }
    }
    eprintln!(
        "growth: wrote {} MiB in {written:?}, verified in {:?}",
        files * chunks_per_file,
        start.elapsed() - written
    );
    m.unmount();
    let info = info(m.image());
    let capacity = info_field(&info, "capacity");
    assert!(
        capacity * 4096 > files * chunks_per_file * chunk as u64,
        "capacity {capacity} blocks after writing 1.1 GiB:\n{info}"
    );
    assert!(fs::metadata(m.image()).unwrap().len() >= capacity * 4096);
    m.finish();
}

#[test]
fn seek_past_eof_and_read_zero() {
    let m = Mount::new();
    let mut f = rw(&m.p("x"));
    f.seek(SeekFrom::Start(5000)).unwrap();
    f.write_all(b"abc").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), 5003);
    assert!(all[..5000].iter().all(|&b| b == 0));
    drop(f);
    m.finish();
}

#[test]
fn preallocation_shrink_and_zero_range() {
    let m = Mount::new();
    let f = rw(&m.p("pa"));
    f.write_all_at(&[0x55; 100_000], 0).unwrap();
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 0, 1 << 20).unwrap();
    // Shrinking drops the preallocated blocks; growing again reads zeros.
    f.set_len(50_000).unwrap();
    f.set_len(1 << 20).unwrap();
    let d = read_at(&f, 0, 1 << 20);
    assert!(d[..50_000].iter().all(|&b| b == 0x55));
    assert!(
        d[50_000..].iter().all(|&b| b == 0),
        "stale data after shrink+grow"
    );
    // A write past EOF into preallocated space leaves zeros in the gap.
    f.set_len(1000).unwrap();
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 0, 1 << 20).unwrap();
    f.write_all_at(b"B", 500_000).unwrap();
    let d = read_at(&f, 0, 500_001);
    assert!(d[1000..500_000].iter().all(|&b| b == 0));
    assert_eq!(d[500_000], b'B');
    drop(f);
    // FALLOC_FL_ZERO_RANGE inside data and across EOF.
    let g = rw(&m.p("zr"));
    g.write_all_at(&[b'q'; 1 << 20], 0).unwrap();
    fallocate(&g, libc::FALLOC_FL_ZERO_RANGE, 100, 200).unwrap();
    fallocate(&g, libc::FALLOC_FL_ZERO_RANGE, 8192, 3 * 4096).unwrap();
    let d = read_at(&g, 0, 6 * 4096);
    assert!(d[..100].iter().all(|&b| b == b'q'));
    assert!(d[100..300].iter().all(|&b| b == 0));
    assert!(d[300..8192].iter().all(|&b| b == b'q'));
    assert!(d[8192..5 * 4096].iter().all(|&b| b == 0));
    assert!(d[5 * 4096..].iter().all(|&b| b == b'q'));
    fallocate(&g, libc::FALLOC_FL_ZERO_RANGE, (1 << 20) - 10, 100).unwrap();
    assert_eq!(g.metadata().unwrap().len(), (1 << 20) + 90);
    assert!(read_at(&g, (1 << 20) - 10, 100).iter().all(|&b| b == 0));
    drop(g);
    m.finish();
}

#[test]
fn mmap_shared_between_processes() {
    let m = Mount::new();
    let p = m.p("ipc");
    fs::write(&p, vec![0u8; 8192]).unwrap();
    let f = rw(&p);
    let mut map = Map::new(&f, 8192, libc::MAP_SHARED);
    // Another process writes through write(2); the mapping sees it at once (same page cache).
    let out = run(std::process::Command::new("sh").arg("-c").arg(format!(
        "printf 'from-another-process' | dd of={} bs=1 seek=4096 conv=notrunc status=none",
        p.display()
    )));
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(&map.slice()[4096..4116], b"from-another-process");
    // And what the mapping stores is what another process reads.
    map.slice()[..5].copy_from_slice(b"hello");
    map.msync();
    let out = run(std::process::Command::new("head").args(["-c", "5"]).arg(&p));
    assert_eq!(out.stdout, b"hello");
    drop(map);
    drop(f);
    m.finish();
}

/// With the writeback cache a write + fsync is the page's WRITE and the FSYNC: the daemon drops
/// the kernel's cached attributes after an fsync only when the written-back pages changed the
/// block count, since the kernel re-reads them (GETATTR, then GETXATTR security.capability)
/// before its next cached write. Overwrites change no blocks; appends do, and st_blocks then
/// shows them right after the fsync.
#[test]
fn write_and_fsync_cost_two_requests_and_keep_st_blocks_exact() {
    let m = Mount::new();
    let f = rw(&m.p("f"));
    f.write_all_at(&pattern(1, 0, 1 << 20), 0).unwrap();
    f.sync_all().unwrap();
    let count = |op: &str| -> u64 {
        let out = run(std::process::Command::new(BIN)
            .arg("stats")
            .arg("--prometheus")
            .arg(m.path()));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let key = format!("mmapfs_requests_total{{op=\"{op}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .map_or(0, |n| n.trim().parse().unwrap())
    };
    let (getattr, getxattr) = (count("getattr"), count("getxattr"));
    for i in 0..200u64 {
        f.write_all_at(&[i as u8; 4096], (i * 7919 % 256) * 4096)
            .unwrap();
        f.sync_all().unwrap();
    }
    let extra = (count("getattr") - getattr) + (count("getxattr") - getxattr);
    assert!(
        extra < 20,
        "{extra} GETATTR/GETXATTR requests for 200 writes + fsyncs"
    );
    // An append allocates: its blocks show right after the fsync.
    let before = f.metadata().unwrap().blocks();
    f.write_all_at(&pattern(2, 0, 1 << 20), 1 << 20).unwrap();
    f.sync_all().unwrap();
    let after = f.metadata().unwrap().blocks();
    assert!(
        after >= before + 2048,
        "st_blocks {before} -> {after} after a 1 MiB append + fsync"
    );
    drop(f);
    m.finish();
}
