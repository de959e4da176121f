//! Where log lines go: stderr for commands run from a shell, a file (`mount --log-file`), or
//! syslog/journald for a daemon in the background, whose stderr nobody reads.

use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// Set by the launcher for the daemon it leaves in the background.
pub const DAEMON_ENV: &str = "MMAPFS_DAEMON";
/// The syslog socket (default /dev/log); tests point it elsewhere.
const SYSLOG_SOCKET_ENV: &str = "MMAPFS_SYSLOG_SOCKET";

pub enum Target {
    Stderr,
    File(PathBuf),
    Syslog,
}

/// Installs the logger. `daemon` selects the default level of a mount (info: mounts, unmounts,
/// recovery, repairs) instead of a command's (warn); `RUST_LOG` overrides either.
pub fn init(target: Target, daemon: bool) -> Result<(), String> {
    // fuser warns when its own unmount-on-exit finds the mount already gone (`fusermount3 -u`),
    // which is the normal way to stop.
    let quiet = "warn,fuser::session=error";
    let filter = |level: &str| {
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
    };
    let mut b = filter(if daemon {
        "warn,mmapfs=info,fuser::session=error"
    } else {
        quiet
    });
    match target {
        Target::Stderr => {
            b.format_timestamp_millis();
        }
        Target::File(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("log file {}: {e}", path.display()))?;
            b.format_timestamp_millis()
                .target(env_logger::Target::Pipe(Box::new(f)));
        }
        Target::Syslog => {
            let socket = std::env::var_os(SYSLOG_SOCKET_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/dev/log"));
            match Syslog::connect(&socket) {
                Ok(s) => {
                    let pid = std::process::id();
                    // RFC 3164 without timestamp and host (the receiver adds them): facility
                    // daemon (3), the record's severity.
                    b.format(move |buf, record| {
                        let severity = match record.level() {
                            log::Level::Error => 3,
                            log::Level::Warn => 4,
                            log::Level::Info => 6,
                            log::Level::Debug | log::Level::Trace => 7,
                        };
                        writeln!(
                            buf,
                            "<{}>mmapfs[{pid}]: {}",
                            3 * 8 + severity,
                            record.args()
                        )
                    })
                    .target(env_logger::Target::Pipe(Box::new(s)));
                }
                // No syslog here (a container): warnings and errors go to stderr, which the
                // launcher relays until the mount is live (use --log-file for more).
                Err(_) => {
                    b = filter(quiet);
                    b.format_timestamp_millis();
                }
            }
        }
    }
    b.try_init().map_err(|e| e.to_string())
}

/// One datagram per record to the syslog socket.
struct Syslog(UnixDatagram);

impl Syslog {
    fn connect(path: &Path) -> io::Result<Syslog> {
        let s = UnixDatagram::unbound()?;
        s.connect(path)?;
        Ok(Syslog(s))
    }
}

impl Write for Syslog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let line = buf.strip_suffix(b"\n").unwrap_or(buf);
        // A full or missing receiver must not stop the filesystem: the line is dropped.
        let _ = self.0.send(line);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
