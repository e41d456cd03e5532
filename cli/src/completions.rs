//! Shell completions and man pages, generated from the same clap definition that parses the
//! command line, so they cannot drift from it. Packagers run them at install time (see
//! `nix/package.nix`): `cairn completions bash|zsh|fish|elvish|powershell` prints a script, and
//! `cairn man DIR` writes `cairn.1` and one page per verb (`cairn-path-info.1`,
//! `cairn-image-pull.1` …). Neither talks to a daemon.

use std::path::Path;
use std::process::ExitCode;

use clap::CommandFactory;

use crate::Cli;
use clap::Args;
use std::path::PathBuf;

pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    use std::io::Write;
    // Into memory first: clap_complete panics when its writer fails (`… | head`).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "cairn", &mut script);
    let mut out = std::io::stdout().lock();
    match out.write_all(&script).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cairn: cannot write the completion script: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn man(dir: &Path) -> ExitCode {
    let written = std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(Cli::command(), dir));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn: cannot write man pages into '{}': {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Args)]
pub struct ManArgs {
    /// The directory to write the pages into (created if missing).
    pub dir: PathBuf,
}
