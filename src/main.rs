use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

fn main() -> ExitCode {
    if std::env::var_os(mmapfs::logging::DAEMON_ENV).is_some() {
        mmapfs::sys::close_inherited_fds();
    }
    let argv0 = std::env::args_os()
        .next()
        .unwrap_or_else(|| "mmapfs".into());
    let args = std::iter::once(argv0).chain(mmapfs::cli::args());
    match mmapfs::cli::Cli::try_parse_from(args) {
        Ok(cli) => {
            let (target, daemon) = cli.log_target();
            if !daemon {
                mmapfs::sys::default_sigpipe();
            }
            if let Err(e) = mmapfs::logging::init(target, daemon) {
                eprintln!("mmapfs: {e}");
                return ExitCode::FAILURE;
            }
            mmapfs::cli::run(cli)
        }
        // No verb: the list of verbs, as `mmapfs --help` shows it.
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            e.print().ok();
            ExitCode::from(2)
        }
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
