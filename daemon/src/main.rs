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
    /// Speak Nix's daemon protocol on standard input and output, as `nix-daemon --stdio` does
    /// (for `ssh-ng://HOST?remote-program=cairnd`); relayed to the running daemon if there is one.
    #[arg(long, conflicts_with = "serve")]
    stdio: bool,
    /// Speak Nix's legacy SSH protocol on standard input and output, as `nix-store --serve`
    /// does (for `ssh://HOST?remote-program=cairnd`): queries and downloads only, unless
    /// `--write` is given too.
    #[arg(long)]
    serve: bool,
    /// With `--serve`: also take imports and builds.
    #[arg(long, requires = "serve")]
    write: bool,
}

/// Marks every descriptor this process inherited beyond 0–2 close-on-exec. Whatever started
/// cairnd may have left descriptors open (a shell's redirections, a supervisor's files); none of
/// them is cairnd's to pass on, and the programs it starts — sandbox helpers, which close them
/// too, but also runc and crun for automata — must not get them.
fn close_on_exec_inherited() {
    use cairn_build::sys::{Descriptors, Linux, Sys};
    if let Err(e) = Linux.close_descriptors(Descriptors::CloseOnExec) {
        eprintln!("cairnd: warning: cannot mark inherited descriptors close-on-exec: {e}");
    }
}

fn main() -> ExitCode {
    // Before anything else: this process may be a build's sandbox helper.
    cairn_build::run_if_asked();
    cairn_daemon::limit_allocator_arenas();
    let cli = Cli::parse();
    close_on_exec_inherited();
    if cli.print_config_template {
        print!("{}", cairn_api::config::TEMPLATE);
        return ExitCode::SUCCESS;
    }
    let ran = if cli.stdio {
        cairn_daemon::run_stdio(&cli.store)
    } else if cli.serve {
        cairn_daemon::run_serve(&cli.store, cli.write)
    } else {
        cairn_daemon::run(&cli.store)
    };
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairnd: {}", cairn_daemon::error_line(&e));
            ExitCode::FAILURE
        }
    }
}
