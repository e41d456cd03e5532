//! `cairn automaton`: containers whose closure is bind-mounted from the store.
//!
//! cairnd writes the bundle and keeps the roots; running it is this process's job: the runtime
//! (runc by default) starts on the bundle with the caller's own privileges and terminal: this
//! process becomes it (signals reach it, its exit status is the command's). `rm` clears the
//! runtimes' record of the container and refuses one that still runs.

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
    /// Remove an automaton; its closure and image become collectable. One that runs (in runc
    /// or crun) is refused unless --force, which kills it.
    Rm {
        /// Names of the automata to remove.
        #[arg(required = true)]
        names: Vec<String>,
        /// Kill the automaton's container first if it runs.
        #[arg(long, short)]
        force: bool,
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
            c.args(["run", "--bundle", &a.bundle, &container_id(&a.name)]);
            // This process becomes the runtime: signals sent to it (a service manager's
            // SIGTERM, a terminal's SIGINT) reach the runtime, which passes them on to the
            // program and ends with its status — nothing is left running without a parent.
            let e = std::os::unix::process::CommandExt::exec(&mut c);
            return Err(anyhow::Error::new(e).context(format!("cannot start {}", runtime.display())));
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
        AutomatonCommand::Rm { names, force } => {
            for name in names {
                // The runtimes' own record of it first: a running container would be left
                // with its bundle and roots gone.
                for runtime in RUNTIMES {
                    forget_container(runtime, &name, force)?;
                }
                automata(ctx, query::AutomatonRemove { name }).await?;
            }
        }
    }
    Ok(())
}

/// The runtimes `run` knows, whose records `rm` clears.
const RUNTIMES: [&str; 2] = ["runc", "crun"];

/// The runtime's container id of automaton `name`.
fn container_id(name: &str) -> String {
    format!("cairn-{name}")
}

/// Clears `runtime`'s record of automaton `name`'s container, as `runtime delete` does: a
/// stopped one is deleted; one that runs is refused unless `force` (then killed and deleted).
/// Nothing to do when the runtime is not installed or has no such container.
fn forget_container(runtime: &str, name: &str, force: bool) -> anyhow::Result<()> {
    let id = container_id(name);
    let Ok(state) =
        std::process::Command::new(runtime).args(["state", &id]).stderr(std::process::Stdio::null()).output()
    else {
        return Ok(()); // not installed
    };
    if !state.status.success() {
        return Ok(()); // no such container
    }
    let status = serde_json::from_slice::<serde_json::Value>(&state.stdout)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_owned))
        .unwrap_or_default();
    if status != "stopped" && !force {
        anyhow::bail!(
            "automaton '{name}' is {} in {runtime} (container '{id}'); stop it first, or remove it with --force, which kills it",
            if status.is_empty() { "known" } else { &status }
        );
    }
    let mut delete = std::process::Command::new(runtime);
    delete.arg("delete");
    if force {
        delete.arg("--force");
    }
    let out = delete.arg(&id).output().with_context(|| format!("cannot run {runtime} delete"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{runtime} delete {id} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("no message")
        );
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
