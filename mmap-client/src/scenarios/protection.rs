//! Scenario 7 (`protection`): protection and argument errors.
//!
//! - A store into a `PROT_READ` mapping (shared or private) kills with `SIGSEGV` (in a forked
//!   child) and changes nothing.
//! - `PROT_WRITE` + `MAP_SHARED` on an `O_RDONLY` descriptor fails with `EACCES`, and so does
//!   `mprotect(PROT_WRITE)` of a read-only shared mapping of it; `MAP_PRIVATE` writable is allowed.
//! - Any mapping of an `O_WRONLY` descriptor fails with `EACCES`.
//! - A non page-aligned offset fails with `EINVAL`, as does a zero length.
//! - Write-back carries no credentials: an unprivileged process (uid 65534 when the client runs
//!   as root) maps its own file writable, closes the descriptor, makes the file read-only
//!   (`chmod 0400`), and its later stores and `msync(MS_SYNC)` must still succeed and reach the file.

use std::fs::OpenOptions;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::check::{
    Expect, create_fresh, expect_file, expect_map, open_ro, store_pattern, write_pattern,
};
use crate::error::{Context, Outcome};
use crate::sys::{ChildEnd, Mapping, page_size, run_in_child, signal_name};

const FILE: &str = "protection.dat";
const SEED: u64 = 0x5EED_0701;
const SEED_PRIVATE: u64 = 0x5EED_0702;
const SEED_UNPRIVILEGED: u64 = 0x5EED_0703;
const UNPRIVILEGED_DIR: &str = "unprivileged";
const NOBODY: u32 = 65534;

fn expect_errno(
    result: std::io::Result<Mapping>,
    errno: i32,
    errno_name: &str,
    what: &str,
) -> Outcome {
    match result {
        Ok(_) => fail!("{what}: succeeded, expected {errno_name}"),
        Err(err) if err.raw_os_error() == Some(errno) => Ok(()),
        Err(err) => fail!("{what}: failed with {err}, expected {errno_name}"),
    }
}

/// The single phase.
pub fn run(dir: &Path) -> Outcome {
    let page = page_size();
    let len = 2 * page;
    let path = dir.join(FILE);
    let file = create_fresh(&path)?;
    write_pattern(&file, SEED, 0, len as u64)?;

    // SIGSEGV on stores into PROT_READ mappings.
    let read_only_shared =
        Mapping::shared_ro(&file, 0, len).ctx(|| "mmap(PROT_READ, MAP_SHARED)")?;
    let read_only_private = Mapping::map(&file, 0, len, libc::PROT_READ, libc::MAP_PRIVATE)
        .ctx(|| "mmap(PROT_READ, MAP_PRIVATE)")?;
    for (map, kind) in [
        (&read_only_shared, "MAP_SHARED"),
        (&read_only_private, "MAP_PRIVATE"),
    ] {
        let end = run_in_child(|| {
            map.store_u8(page + 3, 0xAB);
            0
        })
        .ctx(|| "fork")?;
        ensure!(
            end == ChildEnd::Signaled(libc::SIGSEGV),
            "store into a PROT_READ {kind} mapping: expected the process to be killed by {}, but it {end}",
            signal_name(libc::SIGSEGV)
        );
    }
    expect_file(
        &file,
        0,
        len as u64,
        Expect::Pattern(SEED),
        "read() after the SIGSEGV stores",
    )?;

    // EACCES for write access the descriptor does not allow.
    let read_only_fd = open_ro(&path)?;
    expect_errno(
        Mapping::map(
            &read_only_fd,
            0,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        ),
        libc::EACCES,
        "EACCES",
        "mmap(PROT_READ|PROT_WRITE, MAP_SHARED) of an O_RDONLY descriptor",
    )?;
    let view = Mapping::shared_ro(&read_only_fd, 0, len)
        .ctx(|| "mmap(PROT_READ, MAP_SHARED) of an O_RDONLY descriptor")?;
    match view.mprotect(libc::PROT_READ | libc::PROT_WRITE) {
        Ok(()) => fail!(
            "mprotect(PROT_WRITE) of a shared mapping of an O_RDONLY descriptor: succeeded, expected EACCES"
        ),
        Err(err) if err.raw_os_error() == Some(libc::EACCES) => {}
        Err(err) => fail!(
            "mprotect(PROT_WRITE) of a shared mapping of an O_RDONLY descriptor: {err}, expected EACCES"
        ),
    }
    let cow = Mapping::private_rw(&read_only_fd, 0, len).ctx(
        || "mmap(PROT_READ|PROT_WRITE, MAP_PRIVATE) of an O_RDONLY descriptor (must be allowed)",
    )?;
    store_pattern(&cow, 0, 0, len, SEED_PRIVATE);
    expect_map(
        &cow,
        0,
        0,
        len,
        Expect::Pattern(SEED_PRIVATE),
        "writable private mapping of an O_RDONLY descriptor",
    )?;
    expect_file(
        &file,
        0,
        len as u64,
        Expect::Pattern(SEED),
        "read() after private stores",
    )?;

    let write_only_fd = OpenOptions::new()
        .write(true)
        .open(&path)
        .ctx(|| "open O_WRONLY")?;
    expect_errno(
        Mapping::shared_ro(&write_only_fd, 0, len),
        libc::EACCES,
        "EACCES",
        "mmap(PROT_READ, MAP_SHARED) of an O_WRONLY descriptor",
    )?;

    // EINVAL for bad arguments.
    for offset in [1u64, 512, page as u64 - 1, page as u64 + 8] {
        expect_errno(
            Mapping::shared_ro(&file, offset, page),
            libc::EINVAL,
            "EINVAL",
            &format!("mmap at unaligned offset {offset}"),
        )?;
    }
    expect_errno(
        Mapping::shared_ro(&file, 0, 0),
        libc::EINVAL,
        "EINVAL",
        "mmap of length 0",
    )?;
    write_back_after_chmod(dir)
}

/// The unprivileged child's part: stores into a mapping of a file made read-only after mapping.
///
/// It works inside `dir` (entered before dropping privileges) with a relative path, so the
/// directories above need not be searchable by the unprivileged user.
fn store_after_chmod(dir: &Path, name: &str, len: usize) -> Outcome {
    std::env::set_current_dir(dir).ctx(|| format!("chdir {}", dir.display()))?;
    crate::sys::drop_root_privileges(NOBODY, NOBODY).ctx(|| "drop privileges to uid 65534")?;
    let path = Path::new(name);
    let file = create_fresh(path)?;
    crate::sys::ftruncate(&file, len as u64).ctx(|| "ftruncate")?;
    let map = Mapping::shared_rw(&file, 0, len).ctx(|| "mmap(MAP_SHARED)")?;
    drop(file);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o400)).ctx(|| "chmod 0400")?;
    store_pattern(&map, 0, 0, len, SEED_UNPRIVILEGED);
    map.msync(libc::MS_SYNC).ctx(
        || "msync(MS_SYNC) of stores into a file made read-only after mapping (as uid 65534)",
    )?;
    map.unmap().ctx(|| "munmap")
}

fn write_back_after_chmod(dir: &Path) -> Outcome {
    let len = 4 * page_size();
    let sub = dir.join(UNPRIVILEGED_DIR);
    std::fs::create_dir_all(&sub).ctx(|| format!("mkdir {}", sub.display()))?;
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o1777)).ctx(|| "chmod 1777")?;
    let name = "read-only-after-mapping.dat";
    let path = sub.join(name);
    let end = run_in_child(|| match store_after_chmod(&sub, name, len) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("unprivileged process: {err}");
            3
        }
    })
    .ctx(|| "fork")?;
    ensure!(
        end == ChildEnd::Exited(0),
        "unprivileged process storing after chmod 0400 {end}"
    );
    let file = open_ro(&path)?;
    expect_file(
        &file,
        0,
        len as u64,
        Expect::Pattern(SEED_UNPRIVILEGED),
        "read() of stores made after chmod 0400",
    )
}
