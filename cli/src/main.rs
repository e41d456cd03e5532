//! `cairn`: the command-line client of cairnd.
//!
//! Each verb is a few calls to the daemon through `cairn-client`; the CLI itself reads only
//! what the user names (files to add, streams on stdin) and never opens the store or its
//! database. Exit codes: 0 success, 1 failure, 2 usage error (clap's).

mod archive;
mod automaton;
mod build;
mod cache;
mod closures;
mod commands;
mod completions;
mod connect;
mod daemon;
mod image;
mod progress;

use std::path::PathBuf;
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
    Add {
        /// Files or directories to add.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Add a regular file by the hash of its bytes (a flat fixed-output path).
        #[arg(long)]
        flat: bool,
        /// Store path name (default: the file's name). Only with one path.
        #[arg(long)]
        name: Option<String>,
        /// Print each path's metadata as JSON.
        #[arg(long)]
        json: bool,
        /// Make LINK a symlink to the path that keeps it from garbage collection (LINK-2,
        /// LINK-3 … for further paths).
        #[arg(long, short = 'o', value_name = "LINK")]
        out_link: Option<PathBuf>,
    },
    /// Add a text file whose store path depends on its references, as `builtins.toFile`.
    AddText {
        /// The store path name.
        name: String,
        /// The file with the contents ("-" for stdin).
        file: PathBuf,
        /// A store path the text refers to (repeatable).
        #[arg(long = "ref", value_name = "PATH")]
        references: Vec<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Make LINK a symlink to the path that keeps it from garbage collection.
        #[arg(long, short = 'o', value_name = "LINK")]
        out_link: Option<PathBuf>,
    },
    /// Make LINK a symlink to PATH that keeps PATH from garbage collection while LINK exists
    /// (an indirect root, as `nix-store --add-root --indirect`).
    AddRoot {
        /// The symlink to create (a relative one is taken from the current directory).
        link: PathBuf,
        /// The store path it keeps.
        path: String,
    },
    /// Delete every path no root reaches, as `nix-store --gc`; or show roots, live or dead
    /// paths.
    #[command(visible_alias = "collect-garbage")]
    Gc {
        /// Print the roots (`LINK -> PATH`) instead.
        #[arg(long, group = "report")]
        print_roots: bool,
        /// Print the paths that would be kept instead.
        #[arg(long, group = "report")]
        print_live: bool,
        /// Print the paths that would be deleted instead.
        #[arg(long, group = "report")]
        print_dead: bool,
        /// Say what would be deleted and how much it would free, deleting nothing.
        #[arg(long, conflicts_with = "report")]
        dry_run: bool,
        /// Stop after freeing about this much (bytes, or with a K, M, G or T suffix).
        #[arg(long, value_name = "SIZE", value_parser = parse_size, conflicts_with = "report")]
        max_freed: Option<u64>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete paths, refusing any that is still rooted or referenced (and saying by what).
    Delete {
        /// Store paths to delete.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hard-link identical files across the store, as `nix-store --optimise`.
    #[command(visible_alias = "optimize")]
    Optimise {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check that every valid path is present (and, with --check-contents, intact).
    Verify {
        /// Hash every path's contents and compare with the recorded NAR hash.
        #[arg(long)]
        check_contents: bool,
        /// Repair broken paths from a substituter (needs a trusted user).
        #[arg(long)]
        repair: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show paths' metadata (NAR hash and size, references, content address …).
    #[command(disable_help_flag = true)]
    PathInfo {
        /// Store paths (or paths inside the store, or symlinks to them).
        #[arg(required = true)]
        paths: Vec<String>,
        /// For the whole closure of the paths.
        #[arg(long, short = 'r')]
        closure: bool,
        /// Print each path's NAR size, as `nix path-info -s`.
        #[arg(long, short = 's')]
        size: bool,
        /// Print each path's closure size (the NAR sizes of its closure added), as `nix path-info -S`.
        #[arg(long, short = 'S')]
        closure_size: bool,
        /// With -s and -S, print sizes as 5.7G (`-h`, as Nix).
        #[arg(long, short = 'h')]
        human_readable: bool,
        /// JSON, as `nix path-info --json`: `{"path": …, "valid": false}` for an invalid path.
        #[arg(long)]
        json: bool,
        /// Print help.
        #[arg(long, action = clap::ArgAction::Help)]
        help: Option<bool>,
    },
    /// Show why PACKAGE has DEPENDENCY in its closure: the chain of references from one to the
    /// other, as `nix why-depends`.
    WhyDepends {
        /// The store path that depends (directly or not) on DEPENDENCY.
        package: String,
        /// The store path it depends on.
        dependency: String,
        /// Show every edge on a path from PACKAGE to DEPENDENCY, not only a shortest chain.
        #[arg(long, short = 'a')]
        all: bool,
        /// `{"package", "dependency", "chain": [PACKAGE, …, DEPENDENCY]}`, with --all also
        /// `"edges"`: each path on the way and its references on the way, closest first.
        #[arg(long)]
        json: bool,
    },
    /// Show what packages and versions were added and removed between two closures, and their
    /// size changes, as `nix store diff-closures`.
    DiffClosures {
        /// The old store path (its closure is compared).
        before: String,
        /// The new store path.
        after: String,
        /// A map from package name to `versionsBefore`, `versionsAfter` and `sizeDelta` (bytes).
        #[arg(long)]
        json: bool,
    },
    /// Show the size of paths' closures (NAR sizes added up) and how many paths they hold, and
    /// with several paths their total (shared paths counted once).
    Du {
        /// Store paths whose closure sizes to print.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Sizes in bytes instead of KiB, MiB, GiB.
        #[arg(long, short = 'b')]
        bytes: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a path's direct references.
    References {
        /// A store path.
        path: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the valid paths that directly reference a path.
    Referrers {
        /// A store path.
        path: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the closure of paths (everything they need), dependencies first, as `nix-store -qR`.
    #[command(visible_alias = "requisites")]
    Closure {
        /// Store paths whose closure to print.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print every path that needs one of the paths, as `nix-store -q --referrers-closure`.
    ReferrersClosure {
        /// Store paths whose referrers to print.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the reference graph of a closure.
    Graph {
        /// Store paths whose closure to draw.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Graphviz DOT (the default).
        #[arg(long, conflicts_with = "json")]
        dot: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List a directory inside a store path.
    Ls {
        /// A directory in the store (`/store/…-name/sub/dir`).
        path: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a file inside a store path.
    Cat {
        /// A file in the store (`/store/…-name/file`).
        path: String,
    },
    /// NAR archives: dump and restore.
    #[command(subcommand)]
    Nar(NarCommand),
    /// Write paths (not their closure: use `$(cairn closure …)`) to stdout as a
    /// `nix-store --export` stream.
    Export {
        /// Store paths to export (references are not added).
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Read a `nix-store --export` stream from stdin and add its paths.
    Import {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Fetch paths with their closures from binary caches (the daemon's substituters, or
    /// --from URL), each path checked against the daemon's trusted-public-keys.
    Substitute {
        /// Use this cache instead of the configured ones (repeatable; file://, http(s)://, s3://).
        #[arg(long, value_name = "URL")]
        from: Vec<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Store paths to fetch, with their closures.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Copy paths with their closures to or from a binary cache, or into another daemon, as
    /// `nix copy`. From a cache, the daemon checks every path against its trusted-public-keys.
    Copy {
        /// Write to this cache (`file:///dir`, `s3://bucket?endpoint=…`; `?compression=zstd|xz|
        /// bzip2|none`, zstd by default) or daemon (`unix:///path/to/socket`, or
        /// `tcp://HOST:PORT` of one with accept-pushes, which takes only signed paths).
        #[arg(long, required_unless_present = "from", conflicts_with = "from")]
        to: Option<String>,
        /// Substitute from this cache: `file:///dir`, `http(s)://host/…`, `s3://bucket?…`.
        #[arg(long)]
        from: Option<String>,
        /// Sign each path with this secret key (see `cairn key generate`).
        #[arg(long, value_name = "FILE")]
        secret_key_file: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Store paths whose closures to copy.
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Build derivations in the daemon's sandbox, as `nix-store --realise`: their input
    /// derivations first, outputs already valid skipped. Prints the output paths.
    #[command(alias = "build")]
    Realise {
        /// `DRV` or `DRV!out1,out2` (a `.drv` store path, or a symlink to one).
        #[arg(required = true)]
        paths: Vec<String>,
        /// Go on building what does not need a failed build (`-k`, as Nix).
        #[arg(short = 'k', long)]
        keep_going: bool,
        /// Keep the build directory of a failed build (`-K`, as Nix).
        #[arg(short = 'K', long)]
        keep_failed: bool,
        /// Make this symlink to the (first) output a garbage-collector root.
        #[arg(short = 'o', long, value_name = "LINK")]
        out_link: Option<PathBuf>,
        /// Do not print build logs (they are still stored: see `cairn log`).
        #[arg(short = 'Q', long)]
        quiet: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Build the derivations again although their outputs are valid, and fail (exit code
        /// 104) if an output differs from the registered one, as `nix-store --realise --check`.
        /// Nothing registered changes; with `-K` the new output is kept as `OUTPUT.check`.
        #[arg(long, conflicts_with = "repair")]
        check: bool,
        /// Rebuild outputs (and paths of their closure) whose contents are corrupt or missing
        /// and put the good copies in place, as `nix-store --realise --repair`.
        #[arg(long)]
        repair: bool,
    },
    /// Print the log of a past build of a derivation, or of the derivation that built a path.
    Log {
        /// A derivation (`.drv`) or an output it built.
        path: String,
    },
    /// Signing keys for binary caches.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Derivations (`.drv` store paths).
    #[command(subcommand)]
    Derivation(DerivationCommand),
    /// OCI images: pull, push, list, tag, inspect, build, unpack.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Containers that mount their closure from the store: create, run, ls, show, rm.
    #[command(subcommand)]
    Automaton(automaton::AutomatonCommand),
    /// Print a shell completion script: `source <(cairn completions bash)`, or save it where
    /// the shell loads completions from.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages into DIR: cairn.1 and one page per verb (cairn-image-pull.1 …).
    Man {
        /// The directory to write the pages into (created if missing).
        dir: PathBuf,
    },
    /// Run the daemon in the foreground (what `cairnd` does), or see and steer the running one:
    /// status, show-config, stop, restart.
    Daemon {
        #[command(subcommand)]
        action: Option<daemon::DaemonCommand>,
        /// Shadows the global flag, which means nothing here (`cairn daemon` is the daemon).
        #[arg(long, hide = true)]
        no_auto_start: bool,
    },
    /// Print the client's and the daemon's versions.
    Version {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Write a new ed25519 key pair in Nix's format (as `nix-store --generate-binary-cache-key
    /// NAME SECRET PUBLIC`): SECRET (mode 0600) signs, PUBLIC goes in trusted-public-keys.
    Generate {
        /// The key's name, conventionally the cache's host name and a number (`cache.example.org-1`).
        name: String,
        /// Where to write the secret key (must not exist).
        secret_key_file: PathBuf,
        /// Where to write the public key.
        public_key_file: PathBuf,
    },
    /// Print the public key of a secret key file.
    Public {
        /// A secret key file, as `key generate` writes it.
        secret_key_file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum DerivationCommand {
    /// Print derivations as JSON, as `nix show-derivation` (Nix 2.8) prints them.
    Show {
        /// Derivations (`.drv` store paths).
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Write a derivation given as JSON (as `derivation show` prints it, or its inner object)
    /// into the store, as `nix derivation add`; empty output paths are computed. Prints the .drv.
    Add {
        /// The JSON file; `-` reads stdin.
        file: PathBuf,
    },
    /// Print the output paths of derivations, computed from their inputs (as `nix-store -q
    /// --outputs` prints them); a derivation declaring other paths than its hash gives is refused.
    OutputPaths {
        /// Derivations (`.drv` store paths).
        #[arg(required = true)]
        paths: Vec<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum NarCommand {
    /// Write the NAR of a store path or any local path to stdout, as `nix-store --dump`.
    Dump {
        /// A store path, or any local file or directory.
        path: PathBuf,
    },
    /// Read a NAR from stdin and unpack it at DIR, as `nix-store --restore`.
    Restore {
        /// Where to unpack (must not exist).
        dir: PathBuf,
    },
}

/// A byte count with an optional binary suffix (`512`, `64K`, `1.5G`), as Nix's `--max-freed`.
fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("invalid size '{s}' (use bytes or K/M/G/T)");
    let t = s.trim();
    let (num, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c.to_ascii_uppercase()),
        _ => (t, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => return Err(bad()),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    Ok((n * (1u64 << shift) as f64) as u64)
}

fn main() -> ExitCode {
    // Before anything else: this process may be a build's sandbox helper.
    cairn_build::run_if_asked();
    let cli = Cli::parse();
    if let Command::Daemon { action: None, .. } = cli.command {
        return match cairn_daemon::run(&cli.store) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cairn daemon: {}", cairn_daemon::error_line(&e));
                ExitCode::FAILURE
            }
        };
    }
    match &cli.command {
        Command::Completions { shell } => return completions::completions(*shell),
        Command::Man { dir } => return completions::man(dir),
        _ => {}
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cairn: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our stdout went away (`cairn closure … | head`): nothing to say.
        Err(e) if stdout_closed(&e) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cairn: {}", cairn_daemon::error_line(&e));
            // Failed builds exit as `nix-store --realise` does (100 and up).
            match e.downcast_ref::<build::RealiseFailed>() {
                Some(f) => ExitCode::from(f.status),
                None => ExitCode::FAILURE,
            }
        }
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
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        for bad in ["", "K", "-1M", "1X", "nanM", "one", "banana"] {
            assert_eq!(parse_size(bad), Err(format!("invalid size '{bad}' (use bytes or K/M/G/T)")), "{bad:?}");
        }
    }
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
