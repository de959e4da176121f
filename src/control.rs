//! The daemon's control sockets: abstract Unix sockets named after the mount's device
//! (`mmapfs-stats/MAJOR:MINOR`, `mmapfs-scrub/MAJOR:MINOR`), so a command that names a mount
//! point reaches its daemon without a file on any disk. Each socket is served by a thread of
//! its own, one connection at a time.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::Duration;

/// The socket name of service `what` for the mount with device `dev` (`MAJOR:MINOR`).
fn name(what: &str, dev: &str) -> String {
    format!("mmapfs-{what}/{dev}")
}

/// Serves service `what` of the mount with device `dev`: `handle` gets each connection and
/// returns false once there is nothing more to serve (the filesystem is gone).
pub fn listen(
    what: &'static str,
    dev: &str,
    mut handle: impl FnMut(UnixStream) -> bool + Send + 'static,
) -> io::Result<()> {
    let addr = SocketAddr::from_abstract_name(name(what, dev))?;
    std::thread::Builder::new()
        .name(format!("mmapfs-{what}"))
        .spawn(move || {
            // The daemon of an earlier mount with the same device number may still hold the
            // name for a moment while it finishes (umount returns before it exits).
            let mut tries = 0;
            let listener = loop {
                match UnixListener::bind_addr(&addr) {
                    Ok(l) => break l,
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 100 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => {
                        log::warn!("mmapfs {what} unavailable: {e}");
                        return;
                    }
                }
            };
            for conn in listener.incoming() {
                if let Ok(conn) = conn
                    && !handle(conn)
                {
                    return;
                }
            }
        })?;
    Ok(())
}

/// Connects to service `what` of the mount with device `dev`.
pub fn connect(what: &str, dev: &str) -> io::Result<UnixStream> {
    let addr = SocketAddr::from_abstract_name(name(what, dev))?;
    UnixStream::connect_addr(&addr)
}
