//! `cairnd`: see the crate documentation of `cairn_daemon`.

use std::process::ExitCode;

use cairn_daemon::args::StoreArgs;
use clap::Parser;

/// cairnd owns a content-addressed store and serves it to `cairn` on a Unix socket.
#[derive(Parser)]
#[command(name = "cairnd", version)]
struct Cli {
    #[command(flatten)]
    store: StoreArgs,
    /// Print a commented configuration file with every key and its default, and exit.
    #[arg(long)]
    print_config_template: bool,
}

fn main() -> ExitCode {
    // Before anything else: this process may be a build's sandbox helper.
    cairn_build::helper::run_if_asked();
    let cli = Cli::parse();
    if cli.print_config_template {
        print!("{}", cairn_api::config::TEMPLATE);
        return ExitCode::SUCCESS;
    }
    match cairn_daemon::run(&cli.store) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairnd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
