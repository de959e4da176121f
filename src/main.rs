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
    match mmapfs::cli::Cli::try_parse() {
        Ok(cli) => mmapfs::cli::run(cli),
        Err(e) if e.use_stderr() => {
            // One line: clap's first paragraph names the bad argument and why.
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let line = first.join(" ");
            eprintln!(
                "mmapfs: {} (see mmapfs --help)",
                line.trim_start_matches("error: ")
            );
            ExitCode::from(2)
        }
        Err(e) => {
            e.print().ok();
            ExitCode::SUCCESS
        }
    }
}
