//! `cairn`: the command-line client of cairnd.
//!
//! Each verb is a few calls to the daemon through `cairn-client`; the CLI itself reads only
//! what the user names (files to add, streams on stdin) and never opens the store or its
//! database. Exit codes: 0 success, 1 failure, 2 usage error (clap's).

mod archive;
mod automaton;
mod cache;
mod closures;
mod completions;
mod connect;
mod copied;
mod ctx;
mod daemon;
mod gc;
mod image;
mod keys;
mod progress;
mod realise;
mod ssh_copy;
mod store;

use std::process::ExitCode;

use cairn_daemon::args::StoreArgs;
use clap::{Parser, Subcommand};

/// cairn: a content-addressed store for Nix closures and OCI images.
///
/// Talks to cairnd over a Unix socket and starts one with the same settings when none is
/// listening.
#[derive(Parser)]
#[command(name = "cairn", version, propagate_version = true, arg_required_else_help = true)]
pub struct Cli {
    #[command(flatten, next_help_heading = "Global options")]
    store: StoreArgs,
    /// Do not start a daemon when none is listening (also: `auto-start-daemon = false`).
    #[arg(long, global = true, help_heading = "Global options")]
    no_auto_start: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Add files or directories to the store, as `nix-store --add` (or `--add-fixed sha256`
    /// with --flat), and print their store paths.
    Add(store::AddArgs),
    /// Add a text file whose store path depends on its references, as `builtins.toFile`.
    AddText(store::AddTextArgs),
    /// Make LINK a symlink to PATH that keeps PATH from garbage collection while LINK exists
    /// (an indirect root, as `nix-store --add-root --indirect`).
    AddRoot(store::AddRootArgs),
    /// Delete every path no root reaches, as `nix-store --gc`; or show roots, live or dead
    /// paths.
    #[command(visible_alias = "collect-garbage")]
    Gc(gc::GcArgs),
    /// Delete paths, refusing any that is still rooted or referenced (and saying by what).
    Delete(gc::DeleteArgs),
    /// Hard-link identical files across the store, as `nix-store --optimise`.
    #[command(visible_alias = "optimize")]
    Optimise(gc::OptimiseArgs),
    /// Check that every valid path is present (and, with --check-contents, intact).
    Verify(gc::VerifyArgs),
    /// Show paths' metadata (NAR hash and size, references, content address …).
    #[command(disable_help_flag = true)]
    PathInfo(closures::PathInfoArgs),
    /// Show why PACKAGE has DEPENDENCY in its closure: the chain of references from one to the
    /// other, as `nix why-depends`.
    WhyDepends(closures::WhyDependsArgs),
    /// Show what packages and versions were added and removed between two closures, and their
    /// size changes, as `nix store diff-closures`.
    DiffClosures(closures::DiffClosuresArgs),
    /// Show the size of paths' closures (NAR sizes added up) and how many paths they hold, and
    /// with several paths their total (shared paths counted once).
    Du(closures::DuArgs),
    /// Print a path's direct references.
    References(closures::ReferencesArgs),
    /// Print the valid paths that directly reference a path.
    Referrers(closures::ReferrersArgs),
    /// Print the closure of paths (everything they need), dependencies first, as `nix-store -qR`.
    #[command(visible_alias = "requisites")]
    Closure(closures::ClosureArgs),
    /// Print every path that needs one of the paths, as `nix-store -q --referrers-closure`.
    ReferrersClosure(closures::ReferrersClosureArgs),
    /// Print the reference graph of a closure.
    Graph(closures::GraphArgs),
    /// List a directory inside a store path.
    Ls(store::LsArgs),
    /// Print a file inside a store path.
    Cat(store::CatArgs),
    /// NAR archives: dump and restore.
    #[command(subcommand)]
    Nar(store::NarCommand),
    /// Write paths (not their closure: use `$(cairn closure …)`) to stdout as a
    /// `nix-store --export` stream.
    Export(store::ExportArgs),
    /// Read a `nix-store --export` stream from stdin and add its paths.
    Import(store::ImportArgs),
    /// Fetch paths with their closures from binary caches (the daemon's substituters, or
    /// --from URL), each path checked against the daemon's trusted-public-keys.
    Substitute(cache::SubstituteArgs),
    /// Copy paths with their closures to or from a binary cache, or into another daemon, as
    /// `nix copy`. From a cache, the daemon checks every path against its trusted-public-keys.
    Copy(cache::CopyArgs),
    /// Build derivations in the daemon's sandbox, as `nix-store --realise`: their input
    /// derivations first, outputs already valid skipped. Prints the output paths.
    #[command(alias = "build")]
    Realise(realise::RealiseArgs),
    /// Print the log of a past build of a derivation, or of the derivation that built a path.
    Log(realise::LogArgs),
    /// Show the remote builders (the daemon's `builders`, and those realisations named): up or
    /// down, builds running, systems and features, what was sent and fetched, the last error.
    Builders(realise::BuildersArgs),
    /// Show this daemon's p2p node (the id peers need) and its peers: reachable or shunned,
    /// what was fetched from each and served to each.
    Peers(cache::PeersArgs),
    /// Signing keys for binary caches.
    #[command(subcommand)]
    Key(keys::KeyCommand),
    /// Derivations (`.drv` store paths).
    #[command(subcommand)]
    Derivation(realise::DerivationCommand),
    /// OCI images: pull, push, list, tag, inspect, build, unpack.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Containers that mount their closure from the store: create, run, ls, show, rm.
    #[command(subcommand)]
    Automaton(automaton::AutomatonCommand),
    /// Print a shell completion script: `source <(cairn completions bash)`, or save it where
    /// the shell loads completions from.
    Completions(completions::CompletionsArgs),
    /// Write man pages into DIR: cairn.1 and one page per verb (cairn-image-pull.1 …).
    Man(completions::ManArgs),
    /// Run the daemon in the foreground (what `cairnd` does), or see and steer the running one:
    /// status, show-config, stop, restart.
    Daemon(daemon::DaemonArgs),
    /// Print the client's and the daemon's versions.
    Version(daemon::VersionArgs),
}

/// Whether a panic is `println!`'s on a standard output whose reader went away.
fn closed_stdout_panic(payload: &(dyn std::any::Any + Send)) -> bool {
    let message =
        payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
    message.is_some_and(|m| m.starts_with("failed printing to stdout") && m.contains("Broken pipe"))
}

/// A reader of our standard output that goes away (`cairn image inspect … | head -1`) makes
/// `println!` panic: that panic is not reported, and `main` ends quietly once it has unwound
/// (so temporary files are removed), with the exit code of the error path that sees the same
/// thing (`stdout_closed`).
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !closed_stdout_panic(info.payload()) {
            default(info)
        }
    }));
}

fn main() -> ExitCode {
    // Before anything else: this process may be a build's sandbox helper.
    cairn_build::run_if_asked();
    let cli = Cli::parse();
    if let Command::Daemon(daemon::DaemonArgs { action: None, .. }) = cli.command {
        return match cairn_daemon::run(&cli.store) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cairn daemon: {}", cairn_daemon::error_line(&e));
                ExitCode::FAILURE
            }
        };
    }
    match &cli.command {
        Command::Completions(a) => return completions::completions(a.shell),
        Command::Man(a) => return completions::man(&a.dir),
        _ => {}
    }
    quiet_on_closed_stdout();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cairn: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(run(cli))));
    let ran = match ran {
        Ok(r) => r,
        Err(p) if closed_stdout_panic(p.as_ref()) => return ExitCode::FAILURE,
        Err(p) => std::panic::resume_unwind(p),
    };
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our stdout went away (`cairn closure … | head`): nothing to say.
        Err(e) if stdout_closed(&e) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cairn: {}", cairn_daemon::error_line(&e));
            // Failed builds exit as `nix-store --realise` does (100 and up).
            match e.downcast_ref::<realise::RealiseFailed>() {
                Some(f) => ExitCode::from(f.status),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// Runs a verb: each group's module owns its arguments and its `run`.
async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = cli.store.settings(cli.no_auto_start)?;
    let ctx = ctx::Ctx { settings, cli_store: cli.store };
    match cli.command {
        Command::Add(a) => a.run(&ctx).await,
        Command::AddText(a) => a.run(&ctx).await,
        Command::AddRoot(a) => a.run(&ctx).await,
        Command::Gc(a) => a.run(&ctx).await,
        Command::Delete(a) => a.run(&ctx).await,
        Command::Optimise(a) => a.run(&ctx).await,
        Command::Verify(a) => a.run(&ctx).await,
        Command::PathInfo(a) => a.run(&ctx).await,
        Command::WhyDepends(a) => a.run(&ctx).await,
        Command::DiffClosures(a) => a.run(&ctx).await,
        Command::Du(a) => a.run(&ctx).await,
        Command::References(a) => a.run(&ctx).await,
        Command::Referrers(a) => a.run(&ctx).await,
        Command::Closure(a) => a.run(&ctx).await,
        Command::ReferrersClosure(a) => a.run(&ctx).await,
        Command::Graph(a) => a.run(&ctx).await,
        Command::Ls(a) => a.run(&ctx).await,
        Command::Cat(a) => a.run(&ctx).await,
        Command::Nar(c) => c.run(&ctx).await,
        Command::Export(a) => a.run(&ctx).await,
        Command::Import(a) => a.run(&ctx).await,
        Command::Substitute(a) => a.run(&ctx).await,
        Command::Copy(a) => a.run(&ctx).await,
        Command::Realise(a) => a.run(&ctx).await,
        Command::Builders(a) => a.run(&ctx).await,
        Command::Peers(a) => a.run(&ctx).await,
        Command::Log(a) => a.run(&ctx).await,
        Command::Key(c) => c.run(),
        Command::Derivation(c) => c.run(&ctx).await,
        Command::Image(c) => image::run(&ctx, c).await,
        Command::Automaton(c) => automaton::run(&ctx, c).await,
        Command::Version(a) => a.run(&ctx).await,
        Command::Daemon(daemon::DaemonArgs { action: Some(c), .. }) => daemon::run(&ctx, c).await,
        Command::Daemon(_) | Command::Completions(_) | Command::Man(_) => unreachable!("handled in main"),
    }
}

/// Whether an error is a write to a closed stdout (`cairn closure … | head`): a broken pipe that
/// did not happen on the way to the daemon (those are `ClientError`s).
fn stdout_closed(e: &anyhow::Error) -> bool {
    let broken =
        e.root_cause().downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
    broken && !e.chain().any(|c| c.is::<cairn_client::ClientError>())
}

#[cfg(test)]
mod help_tests {
    use clap::CommandFactory;

    /// Every option and positional of every verb, except help and version, with its path.
    fn undescribed(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for a in cmd.get_arguments() {
            let id = a.get_id().as_str();
            if a.is_hide_set() || id == "help" || id == "version" {
                continue;
            }
            if a.get_help().is_none() {
                out.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            undescribed(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_option_and_positional_is_described() {
        let mut cmd = super::Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        undescribed(&cmd, "cairn", &mut missing);
        assert!(missing.is_empty(), "undescribed in --help: {missing:#?}");
    }
}
