use std::process::ExitCode;

use clap::Parser;

/// fuser warns when its own unmount-on-exit finds the mount already gone (`fusermount3 -u`),
/// which is the normal way to stop: its session warnings are kept out of the default log.
fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,fuser::session=error"),
    )
    .format_timestamp_millis()
    .init();
    mmapfs::cli::run(mmapfs::cli::Cli::parse())
}
