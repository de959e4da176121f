//! Scenario 11 (`exec`): `PROT_EXEC` mappings of files on the mount.
//!
//! The integration script compiles a tiny shared library (`libmmapfsprobe.so`, exporting
//! `int mmapfs_probe(int)`) and a program linked against it with `rpath=$ORIGIN` (`probe-bin`),
//! and copies both plus `/bin/true` into DIR. This subcommand then:
//! - `dlopen`s the library from DIR, calls `mmapfs_probe`, and proves the code really runs from
//!   the mount: `dladdr` names the file in DIR, and the `/proc/self/maps` line containing the
//!   function is executable, names that path, and carries the mount's device number;
//! - runs `probe-bin` from DIR, which loads the library from DIR via `$ORIGIN` and reports its
//!   own executable path, the library path (`dladdr`) and the probe result;
//! - runs DIR/`true`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Context, Outcome};
use crate::sys::{Library, object_containing};

const LIBRARY: &str = "libmmapfsprobe.so";
const PROGRAM: &str = "probe-bin";
const TRUE: &str = "true";
const PROBE_ARG: i32 = 20;

/// What `probe_lib.c` computes.
fn probe_expected(x: i32) -> i32 {
    x * 3 + 7
}

fn canonical(path: &Path) -> Outcome<PathBuf> {
    std::fs::canonicalize(path).ctx(|| format!("canonicalize {}", path.display()))
}

/// The `/proc/self/maps` line whose range contains `addr`: (permissions, device, path).
fn maps_entry(addr: usize) -> Outcome<(String, String, String)> {
    let maps = std::fs::read_to_string("/proc/self/maps").ctx(|| "read /proc/self/maps")?;
    for line in maps.lines() {
        let mut fields = line.splitn(6, ' ');
        let (Some(range), Some(perms), Some(_offset), Some(dev), Some(_inode)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let path = fields.next().unwrap_or("").trim().to_string();
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        if (start..end).contains(&addr) {
            return Ok((perms.to_string(), dev.to_string(), path));
        }
    }
    fail!("no /proc/self/maps entry contains address {addr:#x}")
}

fn dlopen_check(dir: &Path) -> Outcome {
    let path = canonical(&dir.join(LIBRARY))?;
    let library = Library::open(&path).ctx(|| format!("dlopen {}", path.display()))?;
    // SAFETY: probe_lib.c defines `int mmapfs_probe(int)`.
    let result = unsafe { library.call_int_fn("mmapfs_probe", PROBE_ARG) }
        .ctx(|| "dlsym/call mmapfs_probe")?;
    ensure!(
        result == probe_expected(PROBE_ARG),
        "mmapfs_probe({PROBE_ARG}) from the dlopen'ed library returned {result}, expected {}",
        probe_expected(PROBE_ARG)
    );
    let addr = library
        .symbol("mmapfs_probe")
        .ctx(|| "dlsym mmapfs_probe")?;
    let owner = object_containing(addr)
        .ok_or_else(|| crate::error::Failure("dladdr found no object for mmapfs_probe".into()))?;
    ensure!(
        canonical(&owner)? == path,
        "dladdr says mmapfs_probe lives in {}, expected {}",
        owner.display(),
        path.display()
    );
    let (perms, dev, mapped) = maps_entry(addr as usize)?;
    ensure!(
        perms.contains('x'),
        "mapping of mmapfs_probe has permissions {perms}, expected executable"
    );
    ensure!(
        Path::new(&mapped) == path,
        "/proc/self/maps shows mmapfs_probe mapped from {mapped:?}, expected {}",
        path.display()
    );
    let st_dev = std::fs::metadata(&path).ctx(|| "stat the library")?.dev();
    let expected_dev = format!("{:02x}:{:02x}", libc::major(st_dev), libc::minor(st_dev));
    ensure!(
        dev == expected_dev,
        "/proc/self/maps device of the library mapping is {dev}, expected the mount's {expected_dev}"
    );
    Ok(())
}

fn run_program(dir: &Path) -> Outcome {
    let program = canonical(&dir.join(PROGRAM))?;
    let library = canonical(&dir.join(LIBRARY))?;
    let output = Command::new(&program)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .ctx(|| format!("execute {}", program.display()))?;
    ensure!(
        output.status.success(),
        "{} {} (stderr: {})",
        program.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let expected = format!(
        "probe {}\nexe {}\nlib {}\n",
        probe_expected(PROBE_ARG),
        program.display(),
        library.display()
    );
    ensure!(
        stdout == expected,
        "{} printed {stdout:?}, expected {expected:?}",
        program.display()
    );

    let true_bin = dir.join(TRUE);
    let status = Command::new(&true_bin)
        .status()
        .ctx(|| format!("execute {}", true_bin.display()))?;
    ensure!(status.success(), "{} {status}", true_bin.display());
    Ok(())
}

/// The single phase (run again after remount by the script).
pub fn run(dir: &Path) -> Outcome {
    for name in [LIBRARY, PROGRAM, TRUE] {
        ensure!(
            dir.join(name).is_file(),
            "{} missing: the script copies it there before running `exec`",
            dir.join(name).display()
        );
    }
    dlopen_check(dir)?;
    run_program(dir)
}
