//! File helpers and the comparisons every scenario uses.
//!
//! Each `expect_*` function compares what a `read()` (pread) or a mapping shows against the
//! deterministic pattern, zeros or an in-memory model, and on mismatch fails with the absolute
//! file offset of the first wrong byte, the expected and the observed value.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Context, Failure, Outcome};
use crate::pattern;
use crate::sys::Mapping;

/// Chunk size for streaming comparisons.
const CHUNK: usize = 1 << 20;

/// Create `path` empty (removing any previous file), opened read-write.
pub fn create_fresh(path: &Path) -> Outcome<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => fail!("remove old {}: {err}", path.display()),
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(|| format!("create {}", path.display()))
}

/// Open `path` read-write.
pub fn open_rw(path: &Path) -> Outcome<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ctx(|| format!("open {} read-write", path.display()))
}

/// Open `path` read-only.
pub fn open_ro(path: &Path) -> Outcome<File> {
    File::open(path).ctx(|| format!("open {} read-only", path.display()))
}

/// Write the pattern for `offset .. offset + len` with `pwrite` (in 1 MiB chunks).
pub fn write_pattern(file: &File, seed: u64, offset: u64, len: u64) -> Outcome {
    let mut done = 0;
    while done < len {
        let n = CHUNK.min((len - done) as usize);
        let data = pattern::generate(seed, offset + done, n);
        file.write_all_at(&data, offset + done)
            .ctx(|| format!("write() {n} bytes at offset {}", offset + done))?;
        done += n as u64;
    }
    Ok(())
}

/// Store the pattern for file offsets `file_offset .. file_offset + len` into the mapping at
/// `map_offset` (in 1 MiB chunks).
pub fn store_pattern(map: &Mapping, map_offset: usize, file_offset: u64, len: usize, seed: u64) {
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        let data = pattern::generate(seed, file_offset + done as u64, n);
        map.write_from(map_offset + done, &data);
        done += n;
    }
}

/// Fail unless the file's size (fstat) is `expected`.
pub fn expect_size(file: &File, expected: u64, what: &str) -> Outcome {
    let size = file.metadata().ctx(|| format!("{what}: fstat"))?.len();
    ensure!(
        size == expected,
        "{what}: file size is {size}, expected {expected}"
    );
    Ok(())
}

/// Compare `found` against `expected`; both start at absolute file offset `base`.
pub fn compare(expected: &[u8], found: &[u8], base: u64, what: &str) -> Outcome {
    if expected == found {
        return Ok(());
    }
    let index = expected
        .iter()
        .zip(found)
        .position(|(e, f)| e != f)
        .unwrap_or(expected.len().min(found.len()));
    let shown = |s: &[u8]| {
        s.get(index)
            .map_or("<none>".to_string(), |b| format!("{b:#04x}"))
    };
    Err(Failure(format!(
        "{what}: first mismatch at file offset {} (0x{:x}): expected {}, found {}",
        base + index as u64,
        base + index as u64,
        shown(expected),
        shown(found)
    )))
}

/// Read `len` bytes at `offset` with `pread`, failing on a short read.
pub fn read_at(file: &File, offset: u64, len: usize, what: &str) -> Outcome<Vec<u8>> {
    let mut buf = vec![0; len];
    let mut got = 0;
    while got < len {
        let n = file
            .read_at(&mut buf[got..], offset + got as u64)
            .ctx(|| format!("{what}: read() at offset {}", offset + got as u64))?;
        ensure!(
            n != 0,
            "{what}: read() hit end of file at offset {}, expected data up to {}",
            offset + got as u64,
            offset + len as u64
        );
        got += n;
    }
    Ok(buf)
}

/// What an expected range holds.
#[derive(Clone, Copy)]
pub enum Expect<'a> {
    /// The pattern with this seed.
    Pattern(u64),
    /// Zero bytes.
    Zero,
    /// Exactly these bytes (indexed from the start of the checked range).
    Bytes(&'a [u8]),
}

impl Expect<'_> {
    fn chunk(&self, offset_in_range: usize, file_offset: u64, len: usize) -> Vec<u8> {
        match self {
            Expect::Pattern(seed) => pattern::generate(*seed, file_offset, len),
            Expect::Zero => vec![0; len],
            Expect::Bytes(bytes) => bytes[offset_in_range..offset_in_range + len].to_vec(),
        }
    }
}

/// Check `read()` of `offset .. offset + len` against `expected`.
pub fn expect_file(
    file: &File,
    offset: u64,
    len: u64,
    expected: Expect<'_>,
    what: &str,
) -> Outcome {
    let mut done = 0u64;
    while done < len {
        let n = CHUNK.min((len - done) as usize);
        let found = read_at(file, offset + done, n, what)?;
        let want = expected.chunk(done as usize, offset + done, n);
        compare(&want, &found, offset + done, what)?;
        done += n as u64;
    }
    Ok(())
}

/// Check the mapping bytes `map_offset .. map_offset + len`, which show file offsets starting at
/// `file_offset`, against `expected`.
pub fn expect_map(
    map: &Mapping,
    map_offset: usize,
    file_offset: u64,
    len: usize,
    expected: Expect<'_>,
    what: &str,
) -> Outcome {
    let mut done = 0;
    let mut found = vec![0; CHUNK.min(len)];
    while done < len {
        let n = CHUNK.min(len - done);
        map.read_into(map_offset + done, &mut found[..n]);
        let want = expected.chunk(done, file_offset + done as u64, n);
        compare(&want, &found[..n], file_offset + done as u64, what)?;
        done += n;
    }
    Ok(())
}

/// Read the whole file through `read()` and check it is exactly `expected` (length included).
pub fn expect_whole_file(path: &Path, expected: &[u8], what: &str) -> Outcome {
    let found = std::fs::read(path).ctx(|| format!("{what}: read {}", path.display()))?;
    ensure!(
        found.len() == expected.len(),
        "{what}: read() returned {} bytes, expected {}",
        found.len(),
        expected.len()
    );
    compare(expected, &found, 0, what)
}
