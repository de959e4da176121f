//! `mmapfs scrub MOUNTPOINT`: the check `fsck` runs, done by the daemon of a live mount, so an
//! image kept for years can be checked without unmounting it. It reads only: every metadata
//! block's checksum, every inode, directory and tree, reachability and the space map. While it
//! runs, operations and commits wait (it holds the commit gate, as a commit's cut does for a
//! moment), so it sees one consistent state. Damage it finds marks the image for
//! `fsck --repair`, as damage found by any operation does.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::sync::Weak;
use std::time::Instant;

use crate::engine::{Engine, check};
use crate::{control, sys};

/// The report's last line when nothing is wrong.
pub const CLEAN: &str = "clean";
/// The report's last line when something is.
pub const DAMAGED: &str = "damaged";

/// Serves scrub requests for the mount with device `dev`, from root and from the user the
/// daemon runs as (a scrub makes everyone else's operations wait).
pub fn serve(dev: &str, engine: Weak<Engine>) -> io::Result<()> {
    let owner = sys::effective_uid();
    control::listen("scrub", dev, move |mut conn| {
        let Some(e) = engine.upgrade() else {
            return false;
        };
        let text = match sys::peer_uid(&conn) {
            Ok(uid) if uid == 0 || uid == owner => scrub(&e),
            Ok(uid) => {
                format!("refused: user {uid} may not scrub this mount (root or its owner may)\n")
            }
            Err(err) => format!("refused: cannot tell who asked ({err})\n"),
        };
        drop(e);
        let _ = conn.write_all(text.as_bytes());
        true
    })
}

fn scrub(e: &Engine) -> String {
    log::info!("scrub started");
    let started = Instant::now();
    let mut out = String::new();
    match check::run(e, check::Mode::Report) {
        Ok(r) => {
            for p in &r.problems {
                let _ = writeln!(out, "problem: {p}");
            }
            let secs = started.elapsed().as_secs_f64();
            let _ = writeln!(
                out,
                "{} inodes, {} directories, {} blocks used; checked in {secs:.2} s",
                r.inodes, r.directories, r.blocks_used
            );
            if r.problems.is_empty() {
                log::info!("scrub: clean ({secs:.2} s)");
                let _ = writeln!(out, "{CLEAN}");
            } else {
                log::error!(
                    "scrub: {} problem(s) found; the image is marked for fsck --repair",
                    r.problems.len()
                );
                e.mark_damaged();
                let _ = writeln!(out, "{DAMAGED}");
            }
        }
        Err(err) => {
            log::error!("scrub failed: {err}");
            let _ = writeln!(out, "error: {err}");
        }
    }
    out
}

/// Asks the daemon of the mount with device `dev` to scrub it and returns its report (this
/// waits as long as the check takes).
pub fn request(dev: &str) -> io::Result<String> {
    let mut conn = control::connect("scrub", dev)?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    Ok(text)
}
