//! `mmap-client`: processes that exercise memory-mapped I/O on a mounted filesystem.
//!
//! Each scenario of the mmapfs integration suite is one subcommand taking the directory (on the
//! mount) it works in. Scenarios whose effect must survive an unmount/remount come as a
//! `*-write` / `*-verify` pair so the integration script can remount in between. On success a
//! subcommand prints nothing and exits 0; on the first mismatch it prints one line naming the
//! check, the file offset, the expected and the observed value, and exits 1 (2 for bad usage).
//! Data is always a deterministic, position-dependent pattern (see [`pattern`]).
//!
//! Run `mmap-client help` for the list. Hidden subcommands (`ipc-peer`, `truncate-peer`,
//! `stream-writer`) are the second processes some scenarios start by re-executing the client.

#[macro_use]
mod error;
mod check;
mod pattern;
mod scenarios;
mod sys;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use error::{Failure, Outcome};
use scenarios::*;

/// How a subcommand takes its arguments.
enum Run {
    /// `SUBCOMMAND DIR`
    Dir(fn(&Path) -> Outcome),
    /// `SUBCOMMAND DIR [MIB]`
    DirMib(fn(&Path, u64) -> Outcome),
    /// Anything else; receives the raw arguments.
    Raw(fn(&[String]) -> Outcome),
}

struct Subcommand {
    name: &'static str,
    hidden: bool,
    about: &'static str,
    run: Run,
}

const fn cmd(name: &'static str, about: &'static str, run: Run) -> Subcommand {
    Subcommand {
        name,
        hidden: false,
        about,
        run,
    }
}

const fn hidden(name: &'static str, about: &'static str, run: Run) -> Subcommand {
    Subcommand {
        name,
        hidden: true,
        about,
        run,
    }
}

const SUBCOMMANDS: &[Subcommand] = &[
    cmd(
        "shared-write",
        "1. MAP_SHARED stores + msync(MS_SYNC) reach read()",
        Run::Dir(shared::write),
    ),
    cmd(
        "shared-verify",
        "1. ... and survive remount",
        Run::Dir(shared::verify),
    ),
    cmd(
        "private-write",
        "2. MAP_PRIVATE stores stay private (copy-on-write)",
        Run::Dir(private::write),
    ),
    cmd(
        "private-verify",
        "2. ... and never reach the file",
        Run::Dir(private::verify),
    ),
    cmd(
        "ipc",
        "3. two unrelated processes share pages of a MAP_SHARED file",
        Run::Dir(ipc::run),
    ),
    cmd(
        "fork",
        "4. mappings inherited across fork()",
        Run::Dir(fork::run),
    ),
    cmd(
        "eof-write",
        "5. partial last page: zeros past EOF, stores there never reach the file",
        Run::Dir(eof::write),
    ),
    cmd(
        "eof-verify",
        "5. ... after remount; --remounted: also zeros past EOF",
        Run::Raw(eof_verify),
    ),
    cmd(
        "sigbus",
        "6. SIGBUS past EOF and after another process's truncate",
        Run::Dir(sigbus::run),
    ),
    cmd(
        "protection",
        "7. SIGSEGV on PROT_READ stores, EACCES, EINVAL",
        Run::Dir(protection::run),
    ),
    cmd(
        "grow-write",
        "8. ftruncate growth; sparse file mapped above 4 GiB",
        Run::Dir(grow::write),
    ),
    cmd(
        "grow-verify",
        "8. ... also after remount",
        Run::Dir(grow::verify),
    ),
    cmd(
        "coherence-write",
        "9. read()/write() and mappings coherent (400 random ops)",
        Run::Dir(coherence::write),
    ),
    cmd(
        "coherence-verify",
        "9. ... final contents after remount",
        Run::Dir(coherence::verify),
    ),
    cmd(
        "hints-write",
        "10. MS_ASYNC, MS_INVALIDATE, MAP_POPULATE, madvise",
        Run::Dir(hints::write),
    ),
    cmd(
        "hints-verify",
        "10. ... resulting contents after remount",
        Run::Dir(hints::verify),
    ),
    cmd(
        "many-files-write",
        "10. 300 files mapped at once",
        Run::Dir(many_files::write),
    ),
    cmd(
        "many-files-verify",
        "10. ... all 300 after remount",
        Run::Dir(many_files::verify),
    ),
    cmd(
        "exec",
        "11. PROT_EXEC: dlopen a library and run a binary from DIR",
        Run::Dir(exec::run),
    ),
    cmd(
        "stream",
        "12. reader checks while another process writes MIB (default 320) MiB",
        Run::DirMib(stream::run),
    ),
    cmd(
        "stream-verify",
        "12. ... whole file after remount",
        Run::DirMib(stream::verify),
    ),
    cmd(
        "unlinked-write",
        "13. mappings outlive unlink and rename-over",
        Run::Dir(unlinked::write),
    ),
    cmd(
        "unlinked-verify",
        "13. ... only the renamed file left after remount",
        Run::Dir(unlinked::verify),
    ),
    hidden(
        "ipc-peer",
        "FILE: second process of `ipc`",
        Run::Raw(ipc_peer),
    ),
    hidden(
        "truncate-peer",
        "FILE LEN: second process of `sigbus`",
        Run::Raw(truncate_peer),
    ),
    hidden(
        "stream-writer",
        "DIR MIB: writer process of `stream`",
        Run::DirMib(stream::writer),
    ),
];

fn ipc_peer(args: &[String]) -> Outcome {
    let [file] = args else {
        fail!("usage: ipc-peer FILE")
    };
    ipc::peer(Path::new(file))
}

fn eof_verify(args: &[String]) -> Outcome {
    match args {
        [dir] => eof::verify(Path::new(dir), false),
        [dir, flag] if flag == "--remounted" => eof::verify(Path::new(dir), true),
        _ => fail!("usage: eof-verify DIR [--remounted]"),
    }
}

fn truncate_peer(args: &[String]) -> Outcome {
    let [file, len] = args else {
        fail!("usage: truncate-peer FILE LEN")
    };
    let len = len
        .parse()
        .map_err(|_| Failure(format!("bad length {len:?}")))?;
    sigbus::truncate_peer(Path::new(file), len)
}

fn usage() -> String {
    let mut text = String::from("usage: mmap-client SUBCOMMAND DIR [ARGS]\n\nsubcommands:\n");
    for sub in SUBCOMMANDS.iter().filter(|s| !s.hidden) {
        let args = match sub.run {
            Run::DirMib(_) => " DIR [MIB]",
            _ if sub.name == "eof-verify" => " DIR [--remounted]",
            _ => " DIR",
        };
        text.push_str(&format!(
            "  {:<34} {}\n",
            format!("{}{args}", sub.name),
            sub.about
        ));
    }
    text
}

fn dir_arg(args: &[String], name: &str) -> Result<PathBuf, String> {
    let Some(dir) = args.first() else {
        return Err(format!("usage: mmap-client {name} DIR"));
    };
    let dir = PathBuf::from(dir);
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    Ok(dir)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = args.first() else {
        eprint!("{}", usage());
        return ExitCode::from(2);
    };
    if matches!(name.as_str(), "help" | "-h" | "--help") {
        print!("{}", usage());
        return ExitCode::SUCCESS;
    }
    let Some(sub) = SUBCOMMANDS.iter().find(|s| s.name == name) else {
        eprintln!("mmap-client: unknown subcommand {name:?}\n\n{}", usage());
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let outcome = match &sub.run {
        Run::Raw(run) => run(rest),
        Run::Dir(run) => match dir_arg(rest, name) {
            Ok(dir) if rest.len() == 1 => run(&dir),
            Ok(_) => Err(Failure(format!("usage: mmap-client {name} DIR"))),
            Err(usage) => {
                eprintln!("mmap-client: {usage}");
                return ExitCode::from(2);
            }
        },
        Run::DirMib(run) => match dir_arg(rest, name) {
            Ok(dir) => match rest.get(1).map(|m| m.parse::<u64>()) {
                None => run(&dir, stream::DEFAULT_MIB),
                Some(Ok(mib)) if mib > 0 && rest.len() == 2 => run(&dir, mib),
                _ => Err(Failure(format!("usage: mmap-client {name} DIR [MIB]"))),
            },
            Err(usage) => {
                eprintln!("mmap-client: {usage}");
                return ExitCode::from(2);
            }
        },
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("mmap-client {name}: {failure}");
            ExitCode::FAILURE
        }
    }
}
