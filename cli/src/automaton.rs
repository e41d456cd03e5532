//! `cairn automaton`: containers whose closure is bind-mounted from the store.
//!
//! cairnd writes the bundle and keeps the roots; running it is this process's job: the runtime
//! (runc by default) starts on the bundle with the caller's own privileges and terminal, and
//! its exit status is the command's.

use std::path::PathBuf;

use anyhow::Context;
use cairn_api::image::{AutomatonInfo, AutomatonRequest};
use cairn_api::{query, Op};
use clap::Subcommand;

use crate::ctx::{print_json, Ctx};

#[derive(Subcommand)]
pub enum AutomatonCommand {
    /// Create an automaton: an OCI runtime bundle running CMD with every path of the closures of
    /// --closure bind-mounted read-only at its store path.
    Create {
        /// The automaton's name.
        name: String,
        /// A store path whose closure is mounted (repeatable).
        #[arg(long = "closure", value_name = "PATH")]
        closure: Vec<String>,
        /// An image (tag, digest or layout path) whose root filesystem is used in place.
        #[arg(long)]
        image: Option<String>,
        /// Mount the whole store directory read-only instead of the closure's paths.
        #[arg(long)]
        whole_store: bool,
        /// Leave the root filesystem writable (the bundle's directory; the store stays read-only).
        #[arg(long)]
        writable: bool,
        /// NAME=VALUE for the environment (repeatable).
        #[arg(long, value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// The command and its arguments (after `--`); with --image, the image's Entrypoint and
        /// Cmd by default. It must exist in what the automaton mounts.
        #[arg(last = true, required_unless_present = "image")]
        cmd: Vec<String>,
    },
    /// Run an automaton with an OCI runtime (runc by default, or crun; crun runs without a
    /// cgroup manager and, on a host with hybrid cgroups, sees only the unified hierarchy).
    Run {
        /// The automaton's name.
        name: String,
        /// The OCI runtime to run it with (a name on PATH or a path).
        #[arg(long, default_value = "runc", value_name = "RUNTIME")]
        runtime: PathBuf,
    },
    /// List automata.
    #[command(visible_alias = "list")]
    Ls {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one automaton (its bundle, closure and command).
    Show {
        /// The automaton's name.
        name: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print an automaton's description (JSON, for `import`), after copying its closure and
    /// image to another daemon or a binary cache with --to (only what it lacks travels).
    Export {
        /// The automaton's name.
        name: String,
        /// `unix://SOCKET`, `tcp://HOST:PORT`, `p2p://NODE-ID`, `file://DIR` or `s3://…`, as
        /// `cairn copy --to`.
        #[arg(long, value_name = "URL")]
        to: Option<String>,
        /// Sign what is copied (needed by daemons that do not trust this one's user).
        #[arg(long, value_name = "FILE")]
        secret_key_file: Option<PathBuf>,
    },
    /// Create an automaton from an `export` description (a file, or - for stdin), substituting
    /// the paths this store lacks from --from first.
    Import {
        /// The description (as `export` prints it), or - for stdin.
        file: PathBuf,
        /// A binary cache or peer (`p2p://NODE-ID`) to substitute missing paths from, as
        /// `cairn copy --from`.
        #[arg(long, value_name = "URL")]
        from: Option<String>,
        /// Another name for it here.
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove an automaton; its closure and image become collectable.
    Rm {
        /// Names of the automata to remove.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

async fn automata<O: Op<Answer = Vec<AutomatonInfo>>>(ctx: &Ctx, op: O) -> anyhow::Result<Vec<AutomatonInfo>> {
    Ok(ctx.client().await?.call(op).await?)
}

fn show(a: &AutomatonInfo) {
    println!("Name:    {}", a.name);
    println!("Bundle:  {}", a.bundle);
    println!("Closure: {}", a.paths.join(" "));
    match a.mounted {
        0 => println!("Mounts:  the whole store"),
        n => println!("Mounts:  {}", crate::ctx::count(n, "store path")),
    }
    if let Some(i) = &a.image {
        println!("Image:   {i}");
    }
    println!("Command: {}", a.args.join(" "));
}

pub async fn run(ctx: &Ctx, cmd: AutomatonCommand) -> anyhow::Result<()> {
    match cmd {
        AutomatonCommand::Create { name, closure, image, whole_store, writable, env, json, cmd } => {
            let req = AutomatonRequest {
                name,
                paths: ctx.store_paths(&closure)?,
                image,
                whole_store,
                writable,
                args: cmd,
                env,
            };
            let made = automata(ctx, req).await?;
            let a = made.first().context("cairnd created nothing")?;
            if json {
                print_json(a)?;
            } else {
                println!("{}", a.bundle);
            }
        }
        AutomatonCommand::Run { name, runtime } => {
            let a = automata(ctx, query::AutomatonShow { name }).await?;
            let a = a.first().context("no such automaton")?;
            let mut c = std::process::Command::new(&runtime);
            if runtime.file_name().is_some_and(|n| n == "crun") {
                c.arg("--cgroup-manager=disabled");
                if hybrid_cgroups() {
                    crun_sees_unified_cgroups(&mut c);
                }
            }
            c.args(["run", "--bundle", &a.bundle, &format!("cairn-{}", a.name)]);
            let status = c.status().with_context(|| format!("cannot start {}", runtime.display()))?;
            if !status.success() {
                // The program's own status (runc passes it on), not a failure of cairn's.
                std::process::exit(status.code().unwrap_or(1));
            }
        }
        AutomatonCommand::Ls { json } => {
            let all = automata(ctx, query::AutomatonList {}).await?;
            if json {
                print_json(&all)?;
            } else {
                for a in &all {
                    println!("{:<24} {:>4} paths  {}", a.name, a.mounted, a.args.join(" "));
                }
            }
        }
        AutomatonCommand::Show { name, json } => {
            let a = automata(ctx, query::AutomatonShow { name }).await?;
            if json {
                print_json(&a[0])?;
            } else {
                show(&a[0]);
            }
        }
        AutomatonCommand::Export { name, to, secret_key_file } => {
            let a = automata(ctx, query::AutomatonShow { name }).await?.remove(0);
            if let Some(to) = to {
                let key = match &secret_key_file {
                    Some(f) => {
                        let text =
                            std::fs::read_to_string(f).with_context(|| format!("cannot read '{}'", f.display()))?;
                        Some(
                            cairn_nix::signing::SecretKey::parse(&text)
                                .with_context(|| format!("'{}'", f.display()))?,
                        )
                    }
                    None => None,
                };
                let mut paths = a.paths.clone();
                paths.extend(a.image.clone());
                let store_dir = cairn_nix::StoreDir::new(&ctx.settings.store_dir)?;
                let client = ctx.client().await?;
                let done = crate::cache::copy_closure(
                    &client,
                    &store_dir,
                    &to,
                    paths,
                    key.as_ref(),
                    &ctx.net(),
                    Default::default(),
                )
                .await?;
                eprintln!("copied {} to {to}, {} already there", crate::ctx::count(done.written, "path"), done.skipped);
            }
            let description = AutomatonRequest {
                name: a.name,
                paths: a.paths,
                image: a.image,
                whole_store: a.whole_store,
                writable: a.writable,
                args: a.args,
                env: a.env,
            };
            print_json(&description)?;
        }
        AutomatonCommand::Import { file, from, name } => {
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("cannot read '{}'", file.display()))?
            };
            let mut req: AutomatonRequest = serde_json::from_str(&text)
                .with_context(|| format!("'{}' is not an automaton description", file.display()))?;
            if let Some(n) = name {
                req.name = n;
            }
            if let Some(from) = from {
                let mut paths = req.paths.clone();
                paths.extend(req.image.clone());
                crate::cache::substitute(ctx, vec![from], &paths, false).await?;
            }
            let made = automata(ctx, req).await?;
            println!("{}", made.first().context("cairnd created nothing")?.bundle);
        }
        AutomatonCommand::Rm { names } => {
            for name in names {
                automata(ctx, query::AutomatonRemove { name }).await?;
            }
        }
    }
    Ok(())
}

/// Whether the host mounts cgroups in hybrid mode (v1 controllers under a tmpfs, the v2
/// hierarchy at `unified/`), which crun refuses.
fn hybrid_cgroups() -> bool {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, TMPFS_MAGIC};
    let kind = |p: &str| statfs(p).map(|s| s.filesystem_type()).ok();
    kind("/sys/fs/cgroup") == Some(TMPFS_MAGIC) && kind("/sys/fs/cgroup/unified") == Some(CGROUP2_SUPER_MAGIC)
}

/// Starts crun in a mount namespace of its own where `/sys/fs/cgroup` is the unified (v2)
/// hierarchy, so it runs as on a v2-only host; the host's mounts are not touched.
fn crun_sees_unified_cgroups(c: &mut std::process::Command) {
    use nix::mount::{mount, MsFlags};
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the hook only makes system calls (unshare, mount) and
    // allocates nothing.
    #[allow(unsafe_code)]
    unsafe {
        c.pre_exec(|| {
            let err = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(err)?;
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>).map_err(err)?;
            mount(Some("/sys/fs/cgroup/unified"), "/sys/fs/cgroup", None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(err)?;
            Ok(())
        });
    }
}
