//! Store verbs: add, add-text, add-root, ls, cat, nar dump/restore, export, import.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use base64::Engine;
use cairn_api::{query, AddMethod, AddQuery, PathInfo};
use cairn_client::{body_from_reader, Client};
use cairn_nix::nar::{Limits, NarReader};
use tokio_util::io::SyncIoBridge;

use crate::ctx::{numbered, print_json, to_stdout, Ctx};
use crate::progress::{self, Counting};

#[derive(Args)]
pub struct AddArgs {
    /// Files or directories to add.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Add a regular file by the hash of its bytes (a flat fixed-output path).
    #[arg(long)]
    pub flat: bool,
    /// Store path name (default: the file's name). Only with one path.
    #[arg(long)]
    pub name: Option<String>,
    /// Print each path's metadata as JSON.
    #[arg(long)]
    pub json: bool,
    /// Make LINK a symlink to the path that keeps it from garbage collection (LINK-2,
    /// LINK-3 … for further paths).
    #[arg(long, short = 'o', value_name = "LINK")]
    pub out_link: Option<PathBuf>,
}

impl AddArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let AddArgs { paths, flat, name, json, out_link } = self;
        if name.is_some() && paths.len() > 1 {
            bail!("--name names one path, but {} were given", paths.len());
        }
        let client = ctx.client().await?;
        let mut infos = Vec::new();
        for (i, p) in paths.iter().enumerate() {
            let info = add(&client, p, flat, name.as_deref()).await?;
            if let Some(link) = &out_link {
                ctx.add_root(&client, &numbered(link, i), &info.path).await?;
            }
            if !json {
                println!("{}", info.path);
            }
            infos.push(info);
        }
        if json {
            print_json(&infos)?;
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct AddTextArgs {
    /// The store path name.
    pub name: String,
    /// The file with the contents ("-" for stdin).
    pub file: PathBuf,
    /// A store path the text refers to (repeatable).
    #[arg(long = "ref", value_name = "PATH")]
    pub references: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Make LINK a symlink to the path that keeps it from garbage collection.
    #[arg(long, short = 'o', value_name = "LINK")]
    pub out_link: Option<PathBuf>,
}

impl AddTextArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let AddTextArgs { name, file, references, json, out_link } = self;
        let contents = if file == Path::new("-") {
            let mut v = Vec::new();
            std::io::stdin().read_to_end(&mut v).context("cannot read stdin")?;
            v
        } else {
            std::fs::read(&file).with_context(|| format!("cannot read '{}'", file.display()))?
        };
        let references = references.iter().map(|r| ctx.store_path(r)).collect::<anyhow::Result<_>>()?;
        let req =
            query::AddText { name, contents: base64::engine::general_purpose::STANDARD.encode(contents), references };
        let client = ctx.client().await?;
        let infos = client.call(req).await?;
        if let (Some(link), Some(info)) = (&out_link, infos.first()) {
            ctx.add_root(&client, link, &info.path).await?;
        }
        if json {
            print_json(&infos)?;
        } else {
            infos.iter().for_each(|i| println!("{}", i.path));
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct AddRootArgs {
    /// The symlink to create (a relative one is taken from the current directory).
    pub link: PathBuf,
    /// The store path it keeps.
    pub path: String,
}

impl AddRootArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let AddRootArgs { link, path } = self;
        let path = ctx.store_path(&path)?;
        ctx.add_root(&ctx.client().await?, &link, &path).await?;
        println!("{}", std::path::absolute(&link)?.display());
        Ok(())
    }
}

#[derive(Args)]
pub struct LsArgs {
    /// A directory in the store (`/store/…-name/sub/dir`).
    pub path: String,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl LsArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let LsArgs { path, json } = self;
        let entries = ctx.client().await?.call(query::Ls { path: ctx.inner_path(&path)? }).await?;
        if json {
            print_json(&entries)?;
        } else {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for e in entries {
                let mode = match e.kind.as_str() {
                    "directory" => "dr-xr-xr-x",
                    "executable" => "-r-xr-xr-x",
                    "symlink" => "lrwxrwxrwx",
                    _ => "-r--r--r--",
                };
                let target = e.target.map(|t| format!(" -> {t}")).unwrap_or_default();
                writeln!(out, "{mode} {:>12} {}{target}", e.size.unwrap_or(0), e.name)?;
            }
            out.flush()?;
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct CatArgs {
    /// A file in the store (`/store/…-name/file`).
    pub path: String,
}

impl CatArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let CatArgs { path } = self;
        let r = ctx.client().await?.cat(&ctx.inner_path(&path)?).await?;
        to_stdout(r, None).await?;
        Ok(())
    }
}

#[derive(Args)]
pub struct ExportArgs {
    /// Store paths to export (references are not added).
    #[arg(required = true)]
    pub paths: Vec<String>,
}

impl ExportArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let ExportArgs { paths } = self;
        refuse_terminal("an export stream")?;
        let r = ctx.client().await?.export(ctx.store_paths(&paths)?).await?;
        // cairnd checks each NAR's hash as it sends it, as Nix's exportPath does, and cuts the
        // stream off at a path whose contents no longer match: said, rather than only the
        // transport's complaint.
        to_stdout(r, Some("exporting")).await.map_err(|e| match e.downcast_ref::<crate::ctx::CutOff>() {
            Some(_) => e.context(
                "cairnd cut the export off: a path whose contents no longer match its recorded hash is \
                 not exported (`cairn verify --check-contents` names it, and `--repair` mends it)",
            ),
            None => e,
        })?;
        Ok(())
    }
}

#[derive(Args)]
pub struct ImportArgs {
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl ImportArgs {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        let ImportArgs { json } = self;
        let client = ctx.client().await?;
        // Say so before sending a stream the daemon would refuse unread (it checks again).
        let me = client.version().await?;
        if !me.trusted {
            bail!("{}", cairn_api::untrusted_import_message(&me.user));
        }
        let (w, r) = tokio::io::duplex(1 << 20);
        let bar = progress::bytes("importing");
        let mut sink = Counting { inner: SyncIoBridge::new(w), bar: bar.clone() };
        let reader = tokio::task::spawn_blocking(move || std::io::copy(&mut std::io::stdin().lock(), &mut sink));
        let res = client.import(body_from_reader(r)).await;
        bar.finish_and_clear();
        let read = reader.await?;
        let infos = upload_outcome(res, read.map(|_| ()), "cannot read stdin")?;
        if json {
            print_json(&infos)?;
        } else {
            infos.iter().for_each(|i| println!("{}", i.path));
        }
        Ok(())
    }
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

impl NarCommand {
    pub(crate) async fn run(self, ctx: &Ctx) -> anyhow::Result<()> {
        match self {
            NarCommand::Dump { path } => {
                refuse_terminal("a NAR")?;
                match ctx.try_store_path(&path.to_string_lossy()) {
                    Some(p) => {
                        let r = ctx.client().await?.nar(&p).await?;
                        to_stdout(r, Some("dumping")).await?;
                    }
                    None => {
                        tokio::task::spawn_blocking(move || cairn_nar_fs::dump(&path, std::io::stdout().lock()))
                            .await??;
                    }
                }
            }
            NarCommand::Restore { dir } => {
                tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    let stdin = std::io::BufReader::with_capacity(1 << 20, std::io::stdin().lock());
                    let mut nar = NarReader::new(stdin, Limits::default())?;
                    cairn_nar_fs::restore(&mut nar, &dir, cairn_nar_fs::RestoreMode::Plain)?;
                    Ok(())
                })
                .await??;
            }
        }
        Ok(())
    }
}

fn refuse_terminal(what: &str) -> anyhow::Result<()> {
    if std::io::stdout().is_terminal() {
        bail!("refusing to write {what} to a terminal; redirect stdout to a file or a pipe");
    }
    Ok(())
}

/// Adds one file or tree: hands a regular file to the daemon open, streams a tree's NAR.
async fn add(client: &Client, path: &Path, flat: bool, name: Option<&str>) -> anyhow::Result<PathInfo> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    let given = name.is_some();
    let name = match name {
        Some(n) => n.to_owned(),
        None => std::path::absolute(path)?
            .file_name()
            .with_context(|| format!("'{}' has no file name; give one with --name", path.display()))?
            .to_string_lossy()
            .into_owned(),
    };
    cairn_nix::store_path::validate_name(&name).with_context(|| match given {
        true => format!("cannot add '{}'", path.display()),
        false => format!("cannot add '{}' under its own name (give it another with --name)", path.display()),
    })?;
    if flat && !meta.is_file() {
        bail!("--flat adds regular files, and '{}' is not one", path.display());
    }
    if meta.is_file() {
        // The daemon reads a regular file itself, from the descriptor opened here with this
        // user's permissions: the bytes do not cross the socket.
        let file = std::fs::File::open(path).with_context(|| format!("cannot read '{}'", path.display()))?;
        let method = if flat { AddMethod::Flat } else { AddMethod::Nar };
        let bar = progress::spinner(&format!("adding {name} ({})", indicatif::HumanBytes(meta.len())));
        let q = AddQuery { name, method, size: None, executable: false, handed_over: true, spliced: false };
        let added = client.add_file(&q, &file).await;
        bar.finish_and_clear();
        return added.with_context(|| format!("cannot add '{}'", path.display()));
    }
    // A tree's large files are handed over open too; the rest of its NAR streams.
    let path_arg = path;
    let src = path.to_owned();
    let layout = tokio::task::spawn_blocking(move || cairn_nar_fs::NarLayout::of(&src))
        .await?
        .with_context(|| format!("cannot add '{}'", path.display()))?;
    let handed = layout.files_to_hand_over();
    let files = {
        let files: Vec<(&Path, u64)> = layout.files().collect();
        let open = |(path, len): (&Path, u64)| -> anyhow::Result<std::fs::File> {
            let f = std::fs::File::open(path).with_context(|| format!("cannot read '{}'", path.display()))?;
            // The daemon refuses a file whose size is not the laid-out one; say which it is.
            if f.metadata()?.len() != len {
                bail!("cannot add '{}': '{}' changed while it was being added", path_arg.display(), path.display());
            }
            Ok(f)
        };
        handed.iter().map(|i| open(files[*i])).collect::<anyhow::Result<Vec<_>>>()?
    };
    let (w, r) = tokio::io::duplex(1 << 20);
    let bar = progress::bytes(&format!("adding {name}"));
    let sink = Counting { inner: SyncIoBridge::new(w), bar: bar.clone() };
    let q =
        AddQuery { name, method: AddMethod::Nar, size: None, executable: false, handed_over: false, spliced: false };
    let (dumper, added) = if files.is_empty() {
        let src = path.to_owned();
        let dumper = tokio::task::spawn_blocking(move || cairn_nar_fs::dump(&src, sink).map_err(std::io::Error::other));
        (dumper, client.add(&q, body_from_reader(r)).await)
    } else {
        let dumper = tokio::task::spawn_blocking(move || layout.write_spliced(&handed, sink));
        let refs: Vec<&std::fs::File> = files.iter().collect();
        (dumper, client.add_spliced(&q, body_from_reader(r), &refs).await)
    };
    bar.finish_and_clear();
    let dumped = dumper.await?.map_err(|e| {
        // A dump's broken pipe, under its error, is the daemon having stopped reading.
        match e.get_ref().and_then(|inner| inner.downcast_ref::<cairn_nar_fs::FsError>()) {
            Some(cairn_nar_fs::FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
                std::io::Error::from(std::io::ErrorKind::BrokenPipe)
            }
            _ => e,
        }
    });
    upload_outcome(added, dumped, &format!("cannot add '{}'", path.display()))
}

/// Combines the daemon's answer to an upload with the local side that produced the body.
/// A local read error explains a failed upload best; but when the daemon refused the upload
/// and stopped reading, the producer only sees a broken pipe, and the daemon's answer is the
/// one that names the problem.
fn upload_outcome<T>(
    answer: Result<T, cairn_client::ClientError>,
    produced: std::io::Result<()>,
    what: &str,
) -> anyhow::Result<T> {
    match (answer, produced) {
        (Ok(v), Ok(())) => Ok(v),
        (_, Err(e)) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context(what.to_owned()))
        }
        (Err(e), _) => Err(e.into()),
        (Ok(_), Err(e)) => Err(anyhow::Error::new(e).context(what.to_owned())),
    }
}
