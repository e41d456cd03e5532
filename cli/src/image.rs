//! `cairn image`: OCI images in the store.
//!
//! Registry transfers (`docker://`) run in cairnd; this side only reads the caller's credentials
//! and draws progress. `oci:DIR` layouts are the caller's files, so the CLI reads them itself
//! (with the caller's permissions) and streams each blob the store lacks to cairnd, which checks
//! it against its digest; exporting reads blobs back through the daemon and writes the layout
//! where the caller asked.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use cairn_api::image::{
    BuildEvent, BuildRequest, BuiltInfo, CommitRequest, ComposeKind, ComposeRequest, Credentials, DescriptorWire,
    ImageDetail, ImageEvent, ImportItem, PullRequest, PushRequest, RegistryOptions, UnpackedInfo,
};
use cairn_api::query;
use cairn_client::Client;
use cairn_oci::layout::{self, blob_path, REF_NAME};
use cairn_oci::manifest::{is_manifest_type, Descriptor, Manifest, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX};
use cairn_oci::reference::Transport;
use cairn_oci::{Digest, TagName};
use clap::{Args, Subcommand};

use crate::ctx::{count, follow_events, print_json, Ctx};
use crate::progress;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Fetch an image into the store: `docker://HOST/NAME[:TAG|@DIGEST]` or `oci:DIR[:REF]`.
    Pull {
        /// Where from: `docker://HOST/NAME[:TAG|@DIGEST]`, `oci:DIR[:REF]`, `oci-archive:FILE[:REF]` or `docker-archive:FILE[:NAME:TAG]`.
        source: String,
        /// The local NAME[:TAG] to give it (default: HOST/NAME:TAG of a registry source; the
        /// directory's name and REF of an oci: source).
        #[arg(long)]
        tag: Option<String>,
        /// OS/ARCH[/VARIANT] to pick from a multi-platform index (default: this machine's).
        #[arg(long)]
        platform: Option<String>,
        /// Keep the whole index and every platform's image.
        #[arg(long)]
        all_platforms: bool,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a stored image (NAME[:TAG], digest or layout path) to `docker://HOST/NAME[:TAG]` or
    /// `oci:DIR[:REF]`.
    Push {
        /// The stored image: NAME[:TAG], digest or layout path.
        image: String,
        /// Where to: `docker://HOST/NAME[:TAG]`, `oci:DIR[:REF]`, `oci-archive:FILE[:REF]` or `docker-archive:FILE[:NAME:TAG]`.
        destination: String,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Upload blobs larger than BYTES in chunks of BYTES (default: each in one request).
        #[arg(long, value_name = "BYTES")]
        chunk_size: Option<u64>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List tagged images.
    #[command(visible_alias = "list")]
    Ls {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give an image another tag (a garbage-collector root).
    Tag {
        /// The image: NAME[:TAG], digest or layout path.
        image: String,
        /// The new NAME[:TAG].
        tag: String,
    },
    /// Remove tags; the images go at the next collection unless something else keeps them.
    #[command(visible_alias = "rm")]
    Untag {
        /// Tags (NAME[:TAG]) to remove.
        #[arg(required = true)]
        tags: Vec<String>,
    },
    /// Show an image's digest, platforms, config and layers.
    Inspect {
        /// The image: NAME[:TAG], digest or layout path.
        image: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build an image from store closures: one layer per popular store path (as nixpkgs'
    /// buildLayeredImage), reproducible. The build is a derivation, so the same inputs build
    /// once; its store layers are streamed (made from the paths when pushed, served or
    /// exported) unless --materialise.
    Build {
        /// A store path whose closure goes into the image (repeatable).
        #[arg(long = "closure", value_name = "PATH", required_unless_present = "copy")]
        closure: Vec<String>,
        /// A store path's own tree (not its closure) placed at DEST inside the image, in a
        /// layer of its own (repeatable): `--copy $(cairn add ./site):/srv/www`.
        #[arg(long, value_name = "PATH:DEST")]
        copy: Vec<String>,
        /// An image to build on (its layers come first).
        #[arg(long, value_name = "IMAGE")]
        from: Option<String>,
        /// Layers in all, the base image's and the /etc-/tmp layer included.
        #[arg(long, default_value_t = 100)]
        max_layers: u64,
        /// The entrypoint, one argument per flag.
        #[arg(long, value_name = "ARG")]
        entrypoint: Vec<String>,
        /// The default command, one argument per flag.
        #[arg(long, value_name = "ARG")]
        cmd: Vec<String>,
        /// NAME=VALUE for the environment (repeatable).
        #[arg(long, value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// The NAME[:TAG] to give the image.
        #[arg(long)]
        tag: Option<String>,
        /// Compress the store layers: none, gzip or zstd (deterministic either way).
        #[arg(long, default_value = "none", value_name = "HOW")]
        compress: String,
        /// Store the layers' bytes as blobs as well (for tools that read the store's layout
        /// directly); without it a layer is a description of the store paths it holds.
        #[arg(long, alias = "materialize")]
        materialise: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make an image of one layer holding IMAGE's filesystem (its layers applied, whiteouts
    /// resolved; owners, modes, links and extended attributes as the layers said); prints its
    /// digest. The same image squashes to the same bytes in any store, and again costs nothing.
    Squash {
        /// The image: NAME[:TAG], digest or layout path.
        image: String,
        /// The NAME[:TAG] to give the result.
        #[arg(long)]
        tag: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make an image whose layers are the first image's, then the second's, and so on (blobs
    /// shared, not copied), configs merged: Env by name (later wins), Labels, ExposedPorts and
    /// Volumes joined, Entrypoint, Cmd, WorkingDir and User from the last image that sets them.
    /// The images must be of one platform. Prints its digest.
    Combine {
        /// The images, bottom first: NAME[:TAG], digest or layout path.
        #[arg(required = true, num_args = 2..)]
        images: Vec<String>,
        /// The entrypoint, one argument per flag (over the merged config's).
        #[arg(long, value_name = "ARG")]
        entrypoint: Vec<String>,
        /// The default command, one argument per flag (over the merged config's).
        #[arg(long, value_name = "ARG")]
        cmd: Vec<String>,
        /// NAME=VALUE for the environment (repeatable), over the merged config's.
        #[arg(long, value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// The NAME[:TAG] to give the result.
        #[arg(long)]
        tag: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make an image's root filesystem (its layers applied in order) a store path and print it;
    /// a second unpack of the same image finds it again.
    Unpack {
        /// The image: NAME[:TAG], digest or layout path.
        image: String,
        /// Also make LINK a symlink to it, registered as a garbage-collector root.
        #[arg(long, short = 'o', value_name = "LINK")]
        out_link: Option<PathBuf>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Builds an image through the streamed route: on a terminal the spinner shows the builder's
/// current step; otherwise each step is a `name> line` on stderr, as `cairn realise` prints
/// build logs.
async fn build_streamed(client: &Client, req: &BuildRequest) -> anyhow::Result<Box<BuiltInfo>> {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let events = client.image_build(req).await?;
    let bar = progress::spinner("building the image");
    let mut end = None;
    follow_events(events, |event: BuildEvent| {
        match event {
            BuildEvent::Started { .. } => bar.set_message("building the image: starting"),
            BuildEvent::Log { drv, line } => {
                if terminal {
                    bar.set_message(format!("building the image: {line}"));
                } else {
                    eprintln!("{}> {line}", crate::realise::short_name(&drv));
                }
            }
            BuildEvent::Built(b) => end = Some(b),
            BuildEvent::Error(e) => {
                bar.finish_and_clear();
                bail!("{}", e.message)
            }
        }
        Ok(())
    })
    .await?;
    bar.finish_and_clear();
    end.context("cairnd ended the image build without its answer (see its log)")
}

/// How to reach a registry, as skopeo's flags.
#[derive(Args, Clone)]
pub struct RegistryArgs {
    /// USER:PASSWORD for the registry (default: from auth.json or ~/.docker/config.json).
    #[arg(long, value_name = "USER:PASSWORD")]
    creds: Option<String>,
    /// Credentials file (default: $REGISTRY_AUTH_FILE, then containers' auth.json, then
    /// ~/.docker/config.json).
    #[arg(long, value_name = "FILE")]
    authfile: Option<PathBuf>,
    /// Use plain HTTP or accept any certificate (`--tls-verify=false`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    tls_verify: bool,
}

impl RegistryArgs {
    fn options(&self, host: &str) -> anyhow::Result<RegistryOptions> {
        let credentials = match &self.creds {
            Some(c) => {
                let (u, p) = c.split_once(':').context("--creds takes USER:PASSWORD")?;
                Some(Credentials { username: u.to_owned(), password: p.to_owned() })
            }
            None => credentials_from_files(self.authfile.as_deref(), host)?,
        };
        Ok(RegistryOptions { credentials, tls_verify: self.tls_verify })
    }
}

/// The credentials for `host` in the first auth file that has them (`auths.HOST.auth`, the
/// base64 of `user:password`, in containers' and Docker's format alike).
fn credentials_from_files(explicit: Option<&Path>, host: &str) -> anyhow::Result<Option<Credentials>> {
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(f) = explicit {
        files.push(f.to_owned());
    } else {
        if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
            files.push(f.into());
        }
        if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
            files.push(Path::new(&d).join("containers/auth.json"));
        }
        if let Some(h) = std::env::var_os("HOME") {
            files.push(Path::new(&h).join(".config/containers/auth.json"));
            files.push(Path::new(&h).join(".docker/config.json"));
        }
    }
    for f in files {
        let text = match std::fs::read(&f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => continue,
            Err(e) => bail!("cannot read '{}': {e}", f.display()),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&text).with_context(|| format!("'{}' is not valid JSON", f.display()))?;
        let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else { continue };
        let entry = auths.iter().find(|(k, _)| {
            let k = k.trim_start_matches("https://").trim_start_matches("http://");
            k == host || k.split('/').next() == Some(host)
        });
        if let Some(auth) = entry.and_then(|(_, e)| e.get("auth")).and_then(|a| a.as_str()) {
            use base64::Engine;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth)
                .with_context(|| format!("'{}': the auth of {host} is not base64", f.display()))?;
            let raw =
                String::from_utf8(raw).with_context(|| format!("'{}': the auth of {host} is not text", f.display()))?;
            let (u, p) = raw
                .split_once(':')
                .with_context(|| format!("'{}': the auth of {host} is not USER:PASSWORD", f.display()))?;
            return Ok(Some(Credentials { username: u.to_owned(), password: p.to_owned() }));
        }
    }
    Ok(None)
}

pub async fn run(ctx: &Ctx, cmd: ImageCommand) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    match cmd {
        ImageCommand::Pull { source, tag, platform, all_platforms, registry, json } => {
            match Transport::parse(&source)? {
                Transport::Docker(r) => {
                    let req = PullRequest {
                        source: r.to_string(),
                        tag,
                        platform,
                        all_platforms,
                        registry: registry.options(&r.registry)?,
                    };
                    let tls = req.registry.tls_verify;
                    let end = plain_http_hint(
                        async { follow(client.pull(&req).await?, "pulling").await }.await,
                        &r.registry,
                        tls,
                    )?;
                    let ImageEvent::Pulled { image, blobs_fetched, bytes_fetched, blobs_skipped, bytes_skipped } = &end
                    else {
                        bail!("cairnd ended the pull with an unexpected event")
                    };
                    // The name it was pulled as (the image may carry other tags already).
                    let named = match &req.tag {
                        Some(t) => Some(TagName::parse(t)?.to_string()),
                        None => r.default_tag().map(|t| t.to_string()),
                    };
                    if json {
                        print_json(&end_json(&end))?;
                    } else {
                        println!("{}", image.digest);
                        eprintln!(
                            "pulled {} ({}, {} fetched; {}, {} already in the store)",
                            named.as_deref().or(image.tags.first().map(String::as_str)).unwrap_or(&image.layout),
                            count(*blobs_fetched, "blob"),
                            human(*bytes_fetched),
                            count(*blobs_skipped, "blob"),
                            human(*bytes_skipped)
                        );
                    }
                }
                Transport::Oci { dir, reference } => {
                    let (tag, named) = match tag {
                        Some(t) => (TagName::parse(&t)?, None),
                        None => (default_oci_tag(&dir, reference.as_deref())?, Some("the directory's name")),
                    };
                    let (source, top) = oci_dir_source(Path::new(&dir), reference.as_deref())?;
                    let top = one_platform(&source, top, platform.as_deref(), all_platforms)?;
                    let info = import_source(ctx, &client, &source, top, &tag).await?;
                    print_imported(&info, &tag, named, json)?;
                }
                Transport::Store(_) => {
                    bail!("'{source}' is already a local name: pull takes docker://…, oci:, oci-archive: or docker-archive:")
                }
                Transport::OciArchive { file, reference } => {
                    let (src, top) = oci_archive_source(Path::new(&file), reference.as_deref())?;
                    // As podman: the manifest's ref.name when it is a whole NAME:TAG, else a name
                    // from the file's with ref.name (or the reference) as the tag.
                    let ref_name = top.annotations.get(REF_NAME).cloned();
                    let top = one_platform(&src, top, platform.as_deref(), all_platforms)?;
                    let (tag, named) = match (tag, ref_name) {
                        (Some(t), _) => (TagName::parse(&t)?, None),
                        (None, Some(r)) if r.contains('/') || r.contains(':') => {
                            (TagName::parse(&r)?, Some("the archive's ref.name annotation"))
                        }
                        (None, r) => (
                            archive_default_tag(Path::new(&file), r.as_deref().or(reference.as_deref()))?,
                            Some("the archive's file name"),
                        ),
                    };
                    let info = import_source(ctx, &client, &src, top, &tag).await?;
                    print_imported(&info, &tag, named, json)?;
                }
                Transport::DockerArchive { file, reference } => {
                    let (src, top, repo_tag) = crate::archive::docker_archive(Path::new(&file), reference.as_deref())?;
                    // As skopeo and podman: the image's own RepoTags name it.
                    let (tag, named) = match (tag, &reference, repo_tag) {
                        (Some(t), ..) => (TagName::parse(&t)?, None),
                        (None, Some(r), _) if !r.starts_with('@') => (TagName::parse(r)?, None),
                        (None, _, Some(t)) => (TagName::parse(&t)?, Some("the archive's RepoTags")),
                        (None, _, None) => {
                            (archive_default_tag(Path::new(&file), None)?, Some("the archive's file name"))
                        }
                    };
                    let info = import_source(ctx, &client, &src, top, &tag).await?;
                    print_imported(&info, &tag, named, json)?;
                }
            }
        }
        ImageCommand::Push { image, destination, registry, chunk_size, json } => {
            match Transport::parse(&destination)? {
                Transport::Docker(r) => {
                    let req = PushRequest {
                        image,
                        destination: r.to_string(),
                        registry: registry.options(&r.registry)?,
                        chunk_size,
                    };
                    let tls = req.registry.tls_verify;
                    let end = plain_http_hint(
                        async { follow(client.push(&req).await?, "pushing").await }.await,
                        &r.registry,
                        tls,
                    )?;
                    let ImageEvent::Pushed { digest, blobs_uploaded, bytes_uploaded, blobs_skipped, blobs_mounted } =
                        &end
                    else {
                        bail!("cairnd ended the push with an unexpected event")
                    };
                    if json {
                        print_json(&end_json(&end))?;
                    } else {
                        println!("{digest}");
                        eprintln!(
                            "pushed {r} ({}, {} uploaded; {blobs_skipped} already there; {blobs_mounted} mounted)",
                            count(*blobs_uploaded, "blob"),
                            human(*bytes_uploaded)
                        );
                    }
                }
                Transport::Oci { dir, reference } => {
                    let n = export_oci(&client, &image, Path::new(&dir), reference.as_deref()).await?;
                    if json {
                        print_json(&serde_json::json!({ "written": n }))?;
                    } else {
                        eprintln!("wrote {} to {dir}", count(n, "blob"));
                    }
                }
                Transport::Store(t) => {
                    bail!("'{destination}' is a local name: use cairn image tag {image} {t}")
                }
                Transport::OciArchive { file, reference } => {
                    let file = Path::new(&file);
                    let parent = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
                    let tmp = tempfile::Builder::new().prefix(".cairn-oci-").tempdir_in(parent)?;
                    let n = export_oci(&client, &image, tmp.path(), reference.as_deref()).await?;
                    crate::archive::tar_dir(tmp.path(), file)?;
                    if json {
                        print_json(&serde_json::json!({ "written": n }))?;
                    } else {
                        eprintln!("wrote {} to {}", count(n, "blob"), file.display());
                    }
                }
                Transport::DockerArchive { file, reference } => {
                    let n = export_docker_archive(&client, &image, Path::new(&file), reference.as_deref()).await?;
                    if json {
                        print_json(&serde_json::json!({ "written": n }))?;
                    } else {
                        eprintln!("wrote {} to {file}", count(n, "layer"));
                    }
                }
            }
        }
        ImageCommand::Ls { json } => {
            let list = client.call(query::ImageList {}).await?;
            if json {
                print_json(&list)?;
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{:<50} {:<19} {:>10}", "NAME:TAG", "DIGEST", "SIZE")?;
                for i in &list {
                    for t in &i.tags {
                        writeln!(out, "{t:<50} {:<19} {:>10}", &i.digest[..19.min(i.digest.len())], human(i.size))?;
                    }
                }
            }
        }
        ImageCommand::Tag { image, tag } => {
            client.call(query::ImageTag { image, tag }).await?;
        }
        ImageCommand::Untag { tags } => {
            client.call(query::ImageUntag { tags }).await?;
        }
        ImageCommand::Inspect { image, json } => {
            let d = inspect(&client, &image).await?;
            if json {
                print_json(&d)?;
            } else {
                println!("Digest:    {}", d.info.digest);
                println!("MediaType: {}", d.info.media_type);
                println!("Layout:    {}", d.info.layout);
                println!("Tags:      {}", d.info.tags.join(", "));
                println!("Platforms: {}", d.platforms.join(", "));
                println!("Size:      {} in {}", human(d.info.size), count(d.info.blobs, "blob"));
                println!("Layers:");
                for l in &d.layers {
                    println!("  {} {:>10}  {}", l.digest, human(l.size), l.media_type);
                }
            }
        }
        ImageCommand::Build {
            closure,
            copy,
            from,
            max_layers,
            entrypoint,
            cmd,
            env,
            tag,
            compress,
            materialise,
            json,
        } => {
            let copy = copy
                .iter()
                .map(|c| match c.split_once(':') {
                    Some((p, dest)) => Ok(format!("{}:{dest}", ctx.store_path(p)?)),
                    None => anyhow::bail!("--copy '{c}': expected PATH:DEST"),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let req = BuildRequest {
                copy,
                paths: ctx.store_paths(&closure)?,
                from,
                max_layers: Some(max_layers),
                entrypoint,
                cmd,
                env,
                tag,
                compression: Some(compress),
                materialise,
            };
            let b = build_streamed(&client, &req).await?;
            if json {
                print_json(&b)?;
            } else {
                println!("{}", b.image.digest);
                let how = if b.cached {
                    format!("output of {} already valid", b.derivation)
                } else {
                    format!("{} hashed now", b.layers_written)
                };
                eprintln!(
                    "built {} ({}, {how})",
                    b.image.tags.first().map(String::as_str).unwrap_or(&b.image.layout),
                    count(b.layers.len(), "store layer")
                );
            }
        }
        ImageCommand::Squash { image, tag, json } => {
            let req = ComposeRequest {
                kind: ComposeKind::Squash,
                images: vec![image],
                tag,
                entrypoint: None,
                cmd: None,
                env: Vec::new(),
            };
            print_composed(&*client.call(req).await?, json)?;
        }
        ImageCommand::Combine { images, entrypoint, cmd, env, tag, json } => {
            let set = |v: Vec<String>| (!v.is_empty()).then_some(v);
            let req = ComposeRequest {
                kind: ComposeKind::Combine,
                images,
                tag,
                entrypoint: set(entrypoint),
                cmd: set(cmd),
                env,
            };
            print_composed(&*client.call(req).await?, json)?;
        }
        ImageCommand::Unpack { image, out_link, json } => {
            let u = client.call(query::ImageUnpack { image }).await?;
            if let Some(link) = &out_link {
                ctx.add_root(&client, link, &u.path).await?;
            }
            if json {
                print_json(&u)?;
            } else {
                println!("{}", u.path);
                eprintln!("{}", unpack_summary(&u));
            }
        }
    }
    Ok(())
}

/// Prints a squash's or combination's result: its digest, and on stderr what it is.
fn print_composed(b: &BuiltInfo, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(b);
    }
    println!("{}", b.image.digest);
    let how = if b.cached { format!("output of {} already valid", b.derivation) } else { "made now".to_owned() };
    eprintln!("{} ({how})", b.image.tags.first().map(String::as_str).unwrap_or(&b.image.layout));
    Ok(())
}

/// A registry transfer's failure, or, when it is TLS meeting a plain-HTTP registry (rustls reads
/// the HTTP answer as a corrupt record: "received corrupt message of type InvalidContentType"),
/// what to do about it.
fn plain_http_hint<T>(r: anyhow::Result<T>, host: &str, tls_verify: bool) -> anyhow::Result<T> {
    match r {
        Err(e) if tls_verify && is_plain_http(&cairn_daemon::error_line(&e)) => {
            bail!("{host}: the registry answered plain HTTP; use --tls-verify=false")
        }
        other => other,
    }
}

/// Whether an error is a TLS handshake that got a plain-HTTP answer.
fn is_plain_http(message: &str) -> bool {
    message.contains("InvalidContentType")
}

/// The one line `image unpack` says on stderr.
fn unpack_summary(u: &UnpackedInfo) -> String {
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let layers = plural(u.layers, "layer", "layers");
    if u.cached {
        return format!("cached: {layers} unpacked before");
    }
    let mut dropped = Vec::new();
    if u.dropped_devices > 0 {
        // Device nodes and fifos, which a store path cannot hold.
        dropped.push(plural(u.dropped_devices, "device node or fifo", "device nodes or fifos"));
    }
    if u.dropped_special_bits > 0 {
        dropped.push(plural(u.dropped_special_bits, "setuid/setgid/sticky bit", "setuid/setgid/sticky bits"));
    }
    let mut line = match dropped.is_empty() {
        true => format!("unpacked {layers}"),
        false => format!("unpacked {layers}; dropped {}", dropped.join(", ")),
    };
    if u.made_readable > 0 {
        // Store paths are every local user's to read: what the image hid is not hidden here.
        line.push_str(&format!(
            "; {} the image keeps from other users readable by every local user, as every store file is",
            plural(u.made_readable, "entry", "entries")
        ));
    }
    line
}

/// What an import prints: the digest (or the image as JSON), and its tag on stderr.
/// Prints an import's digest and, on stderr, the tag it got — and, when no --tag was given,
/// what the name was made from.
fn print_imported(
    info: &cairn_api::image::ImageInfo,
    tag: &TagName,
    named_from: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        print_json(info)
    } else {
        println!("{}", info.digest);
        eprintln!("{}", imported_line(tag, named_from));
        Ok(())
    }
}

fn imported_line(tag: &TagName, named_from: Option<&str>) -> String {
    match named_from {
        Some(from) => format!("imported as {tag} (named from {from}; --tag NAME:TAG names it otherwise)"),
        None => format!("imported {tag}"),
    }
}

async fn inspect(client: &Client, image: &str) -> anyhow::Result<ImageDetail> {
    Ok(*client.call(query::ImageInspect { image: image.to_owned() }).await?)
}

fn end_json(e: &ImageEvent) -> serde_json::Value {
    let mut v = serde_json::to_value(e).expect("events serialise");
    if let Some(o) = v.as_object_mut() {
        o.remove("event");
    }
    v
}

/// Draws a transfer's progress lines and returns its last event.
async fn follow(lines: impl tokio::io::AsyncRead + Unpin, what: &str) -> anyhow::Result<ImageEvent> {
    let bar = progress::transfer(what);
    let mut end = None;
    follow_events(lines, |event: ImageEvent| {
        match event {
            ImageEvent::Progress { blobs_total, blobs_done, bytes_total, bytes_done } => {
                bar.set_length(bytes_total);
                bar.set_position(bytes_done);
                bar.set_message(format!("{what} {blobs_done}/{blobs_total} blobs"));
            }
            ImageEvent::Error(e) => {
                bar.finish_and_clear();
                bail!("{}", e.message)
            }
            done => end = Some(done),
        }
        Ok(())
    })
    .await?;
    bar.finish_and_clear();
    end.context("cairnd ended the transfer without saying how it went (see its log)")
}

fn human(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// `localhost/<directory name>:<REF or latest>` (what an oci: import is tagged without --tag).
fn default_oci_tag(dir: &str, reference: Option<&str>) -> anyhow::Result<TagName> {
    let real = Path::new(dir).canonicalize().with_context(|| format!("cannot read the OCI layout '{dir}'"))?;
    let base = real.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let name: String = base.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    let name = name.trim_matches('-');
    TagName::new(&format!("localhost/{name}"), reference.unwrap_or("latest"))
        .with_context(|| format!("cannot name the image from '{dir}': pass --tag NAME:TAG"))
}

/// `localhost/NAME:TAG` for an archive file: its name without `.tar` (or `.tar.gz`, `.tgz`),
/// lower case, other characters than letters and digits made `-`.
fn archive_default_tag(file: &Path, tag: Option<&str>) -> anyhow::Result<TagName> {
    let base = file.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let stem = [".tar.gz", ".tgz", ".tar"].iter().find_map(|e| base.strip_suffix(e)).unwrap_or(&base);
    let name: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    TagName::new(&format!("localhost/{}", name.trim_matches('-')), tag.unwrap_or("latest"))
        .with_context(|| format!("cannot name the image from '{}': pass --tag NAME:TAG", file.display()))
}

/// Writes a stored image as a docker archive: its (first) image manifest's config and layers,
/// each layer uncompressed as `docker load` wants it.
async fn export_docker_archive(
    client: &Client,
    image: &str,
    file: &Path,
    reference: Option<&str>,
) -> anyhow::Result<u64> {
    let d = inspect(client, image).await?;
    // The config is the first child of the (first) image manifest: in `contents`, the entry just
    // before the first layer (or the last one of an image without layers).
    let layer_digests: Vec<&str> = d.layers.iter().map(|l| l.digest.as_str()).collect();
    let at = match layer_digests.first() {
        Some(first) => {
            d.contents.iter().position(|c| c.digest == *first).context("layers missing from the contents")?
        }
        None => d.contents.len(),
    };
    ensure!(at >= 1, "the image has no config blob");
    let config_desc = &d.contents[at - 1];
    let layout_path = d.info.layout.clone();
    let fetch = |digest: &str| {
        let digest = Digest::parse(digest);
        let layout_path = layout_path.clone();
        async move {
            let digest = digest?;
            let tmp = tempfile::NamedTempFile::new()?;
            copy_blob(client, &layout_path, &digest, tmp.path()).await?;
            anyhow::Ok(tmp)
        }
    };
    let config_bytes = std::fs::read(fetch(&config_desc.digest).await?.path())?;
    let mut temps = Vec::new();
    let mut layers = Vec::new();
    for (l, digest) in d.layers.iter().zip(layer_digests) {
        let t = fetch(digest).await?;
        layers.push((l.media_type.clone(), t.path().to_owned()));
        temps.push(t);
    }
    let file = file.to_owned();
    let reference = reference.map(str::to_owned);
    let n = layers.len() as u64;
    tokio::task::spawn_blocking(move || {
        crate::archive::write_docker_archive(&file, reference.as_deref(), &config_bytes, layers)
    })
    .await??;
    drop(temps);
    Ok(n)
}

/// Copies a blob of an image from cairnd into `file` (synced), checking its digest on the way:
/// a streamed layer is made by cairnd as it is sent, and one that no longer matches its
/// digest breaks off.
async fn copy_blob(client: &Client, layout: &str, digest: &Digest, file: &Path) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut reader = client.oci_blob(layout, &digest.to_string()).await.with_context(|| format!("blob {digest}"))?;
    let mut out = tokio::fs::File::create(file).await.with_context(|| format!("cannot create '{}'", file.display()))?;
    let mut hasher = cairn_nix::Hasher::new(digest.algo().hash_algo());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| {
            anyhow::anyhow!(
                "blob {digest} broke off while cairnd sent it ({e}): a streamed layer whose store paths no longer \
                 make it is refused (cairnd's log names it; `cairn verify --check-contents` finds such paths)"
            )
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).await.with_context(|| format!("cannot write '{}'", file.display()))?;
    }
    let got = Digest::from_hash(&hasher.finish()).context("a blob digest")?;
    ensure!(got == *digest, "blob {digest} came from cairnd as {got}: refused");
    out.sync_all().await?;
    Ok(())
}

/// A blob file of an `oci:` layout (its name comes from a validated digest, never from input
/// text, so it cannot leave the directory).
fn blob_file(dir: &Path, d: &Digest) -> PathBuf {
    dir.join("blobs").join(d.algo().as_str()).join(d.hex())
}

/// The image `oci:DIR[:REF]` names: the layout's blobs and the picked manifest.
fn oci_dir_source(dir: &Path, reference: Option<&str>) -> anyhow::Result<(crate::archive::Source, Descriptor)> {
    let index_path = dir.join("index.json");
    let index = std::fs::read(&index_path).with_context(|| format!("cannot read '{}'", index_path.display()))?;
    let manifests = layout::parse_index(&index).with_context(|| format!("'{}'", dir.display()))?;
    let top = layout::pick(&manifests, reference)?.clone();
    Ok((crate::archive::Source::dir(dir), top))
}

/// An index narrowed to the image for `platform` (else this machine's), as a pull from a
/// registry narrows it and skopeo copies from `oci:`; kept whole with `--all-platforms`.
fn one_platform(
    source: &crate::archive::Source,
    top: Descriptor,
    platform: Option<&str>,
    all_platforms: bool,
) -> anyhow::Result<Descriptor> {
    if all_platforms || ![OCI_INDEX, DOCKER_LIST].contains(&top.media_type.as_str()) {
        return Ok(top);
    }
    let from = &source.name;
    let origin = source.origin(&top.digest).with_context(|| format!("index {} is missing from {from}", top.digest))?;
    let index = Manifest::parse(&source.read(&origin)?, Some(&top.media_type))
        .with_context(|| format!("index {} in {from}", top.digest))?;
    let wanted = match platform {
        Some(p) => cairn_oci::manifest::Platform::parse(p)?,
        None => cairn_oci::manifest::Platform::host(),
    };
    let child = index.select(&wanted).with_context(|| format!("index {} in {from}", top.digest))?.clone();
    if [OCI_INDEX, DOCKER_LIST].contains(&child.media_type.as_str()) {
        bail!("the entry of index {} for {wanted} in {from} is itself an index", top.digest);
    }
    Ok(child)
}

/// The image `oci-archive:FILE[:REF]` names.
fn oci_archive_source(file: &Path, reference: Option<&str>) -> anyhow::Result<(crate::archive::Source, Descriptor)> {
    let (source, index) = crate::archive::oci_archive(file)?;
    let manifests = layout::parse_index(&index).with_context(|| format!("'{}'", file.display()))?;
    let top = layout::pick(&manifests, reference)?.clone();
    Ok((source, top))
}

/// Imports the image `top` of `source`: every blob the store lacks goes to cairnd in one
/// stream, then the layout is committed and tagged.
async fn import_source(
    ctx: &Ctx,
    client: &Client,
    source: &crate::archive::Source,
    top: Descriptor,
    tag: &TagName,
) -> anyhow::Result<cairn_api::image::ImageInfo> {
    let store_dir = cairn_nix::StoreDir::new(&ctx.settings.store_dir)?;
    // First walk the layout and check what can be checked here (presence, sizes, manifests
    // parse), so that a broken layout is refused before anything is sent.
    let mut seen = BTreeSet::new();
    let mut todo = vec![top.clone()];
    let mut blobs: Vec<(Descriptor, crate::archive::Origin)> = Vec::new();
    let from = &source.name;
    while let Some(d) = todo.pop() {
        if !seen.insert(d.digest.clone()) {
            continue;
        }
        let origin = source.origin(&d.digest).with_context(|| format!("blob {} is missing from {from}", d.digest))?;
        let size = source.size(&origin)?;
        if size != d.size {
            bail!("blob {} in {from} is {size} bytes, but its descriptor says {}", d.digest, d.size);
        }
        if is_manifest_type(&d.media_type) {
            if size > cairn_oci::MAX_MANIFEST_SIZE {
                bail!("manifest {} is {size} bytes, more than the {} allowed", d.digest, cairn_oci::MAX_MANIFEST_SIZE);
            }
            let bytes = source.read(&origin)?;
            let m = Manifest::parse(&bytes, Some(&d.media_type)).with_context(|| format!("manifest {}", d.digest))?;
            todo.extend(m.children.iter().cloned());
        }
        blobs.push((d, origin));
    }
    // Then send what the store lacks, in one all-or-nothing stream: the daemon checks each blob
    // against its digest, and deletes what the stream added if one is refused.
    let paths: Vec<String> = blobs.iter().map(|(d, _)| store_dir.display(&blob_path(&store_dir, &d.digest))).collect();
    let valid = client.call(query::IsValid { paths }).await?;
    let bar = progress::bytes("importing");
    let mut parts: Vec<Box<dyn tokio::io::AsyncRead + Send + Sync + Unpin>> = Vec::new();
    let item = |i: &ImportItem| {
        let mut v = serde_json::to_vec(i).expect("items serialise");
        v.push(b'\n');
        std::io::Cursor::new(v)
    };
    for ((d, origin), valid) in blobs.iter().zip(valid) {
        if valid {
            continue;
        }
        let f = source.open(origin).await?;
        parts.push(Box::new(item(&ImportItem::Blob { digest: d.digest.to_string(), size: d.size })));
        parts.push(Box::new(crate::progress::CountingAsync { inner: f, bar: bar.clone() }));
    }
    let platform = top.platform.as_ref().map(|p| p.to_string());
    let top = DescriptorWire { media_type: top.media_type, digest: top.digest.to_string(), size: top.size, platform };
    parts.push(Box::new(item(&ImportItem::Commit(CommitRequest { manifests: vec![top], tag: Some(tag.to_string()) }))));
    let info = client.import_image(cairn_client::body_from_reader(Chain(parts.into()))).await;
    bar.finish_and_clear();
    Ok(info?)
}

/// Readers read one after the other.
struct Chain(std::collections::VecDeque<Box<dyn tokio::io::AsyncRead + Send + Sync + Unpin>>);

impl tokio::io::AsyncRead for Chain {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        while let Some(front) = self.0.front_mut() {
            let before = buf.filled().len();
            match std::pin::Pin::new(front).poll_read(cx, buf) {
                std::task::Poll::Ready(Ok(())) if buf.filled().len() == before => {
                    self.0.pop_front();
                }
                other => return other,
            }
        }
        std::task::Poll::Ready(Ok(()))
    }
}

/// The top manifest of an image written into the layout at `dir`, with OCI's media types: a
/// Docker schema 2 manifest or list is rewritten (`cairn_oci::to_oci`; its children too, those
/// the layout holds) and the new blobs written beside the others, since OCI tools read only OCI
/// manifests from a layout. Returns the descriptor's media type, digest and size.
fn as_oci(
    dir: &Path,
    media_type: &str,
    digest: &Digest,
    size: u64,
    written: &mut u64,
) -> anyhow::Result<(String, Digest, u64)> {
    use cairn_oci::manifest::{DOCKER_MANIFEST, OCI_MANIFEST};
    let mut put = |bytes: Vec<u8>| -> anyhow::Result<(Digest, u64)> {
        let d = Digest::sha256_of(&bytes);
        let file = blob_file(dir, &d);
        if !file.exists() {
            let tmp = file.with_file_name(format!(".{}.tmp", d.hex()));
            std::fs::write(&tmp, &bytes)
                .and_then(|_| std::fs::rename(&tmp, &file))
                .with_context(|| format!("cannot write '{}'", file.display()))?;
            *written += 1;
        }
        Ok((d, bytes.len() as u64))
    };
    let read = |d: &Digest| -> anyhow::Result<Vec<u8>> {
        let file = blob_file(dir, d);
        std::fs::read(&file).with_context(|| format!("cannot read '{}'", file.display()))
    };
    match media_type {
        DOCKER_MANIFEST => {
            let (d, n) = put(cairn_oci::to_oci::manifest(&read(digest)?)?)?;
            Ok((OCI_MANIFEST.to_owned(), d, n))
        }
        DOCKER_LIST => {
            let list = read(digest)?;
            let parsed = Manifest::parse(&list, Some(DOCKER_LIST))?;
            let mut children = std::collections::HashMap::new();
            for c in parsed.children.iter().filter(|c| c.media_type == DOCKER_MANIFEST) {
                if blob_file(dir, &c.digest).exists() {
                    let (d, n) = put(cairn_oci::to_oci::manifest(&read(&c.digest)?)?)?;
                    children.insert(c.digest.to_string(), (d.to_string(), n));
                }
            }
            let (d, n) = put(cairn_oci::to_oci::index(&list, &|old| children.get(old).cloned())?)?;
            Ok((OCI_INDEX.to_owned(), d, n))
        }
        _ => Ok((media_type.to_owned(), digest.clone(), size)),
    }
}

/// Writes a stored image into `oci:DIR[:REF]` (creating the layout, or adding to one): blobs
/// the directory lacks are copied from the store, and `index.json` gets the image's manifest
/// (with OCI's media types, [`as_oci`]), named REF (replacing an entry of that name).
async fn export_oci(client: &Client, image: &str, dir: &Path, reference: Option<&str>) -> anyhow::Result<u64> {
    let d = inspect(client, image).await?;
    let mut written = 0;
    // Blobs this export adds to the layout (the others were there).
    let mut fresh: std::collections::HashSet<String> = std::collections::HashSet::new();
    for c in &d.contents {
        let digest = Digest::parse(&c.digest)?;
        let file = blob_file(dir, &digest);
        if std::fs::metadata(&file).is_ok_and(|m| m.len() == c.size) {
            continue;
        }
        let parent = file.parent().expect("blob files have a parent");
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create '{}'", parent.display()))?;
        let tmp = parent.join(format!(".{}.tmp", digest.hex()));
        let copied = copy_blob(client, &d.info.layout, &digest, &tmp).await;
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &file).with_context(|| format!("cannot write '{}'", file.display()))?;
        written += 1;
        fresh.insert(c.digest.clone());
    }
    std::fs::write(dir.join("oci-layout"), layout::OCI_LAYOUT)
        .with_context(|| format!("cannot write into '{}'", dir.display()))?;
    let index_path = dir.join("index.json");
    let mut manifests: Vec<Descriptor> = match std::fs::read(&index_path) {
        Ok(b) => layout::parse_index(&b).with_context(|| format!("'{}'", index_path.display()))?,
        Err(_) => Vec::new(),
    };
    let top = &d.contents[0];
    let (media_type, digest, size) =
        as_oci(dir, &top.media_type, &Digest::parse(&top.digest)?, top.size, &mut written)?;
    // Docker's manifests were written in OCI's form: their own bytes, which nothing in the
    // layout names, go (as skopeo writes no such blob) unless the layout had them before.
    for c in d.contents.iter().filter(|c| c.media_type == DOCKER_LIST || c.media_type == DOCKER_MANIFEST) {
        if fresh.contains(&c.digest) && c.digest != digest.to_string() {
            let _ = std::fs::remove_file(blob_file(dir, &Digest::parse(&c.digest)?));
            written -= 1;
        }
    }
    let mut desc = Descriptor { media_type, digest, size, platform: None, annotations: Default::default() };
    if let Some(r) = reference {
        manifests.retain(|m| m.annotations.get(REF_NAME).map(String::as_str) != Some(r));
        desc.annotations.insert(REF_NAME.to_owned(), r.to_owned());
    } else {
        manifests.retain(|m| m.digest != desc.digest || m.annotations.contains_key(REF_NAME));
    }
    manifests.push(desc);
    let tmp = dir.join(".index.json.tmp");
    std::fs::write(&tmp, layout::index_json(&manifests))?;
    std::fs::rename(&tmp, &index_path).with_context(|| format!("cannot write '{}'", index_path.display()))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use cairn_api::image::UnpackedInfo;

    #[test]
    fn unpack_summaries() {
        let u = |layers, dropped_devices, dropped_special_bits, cached| UnpackedInfo {
            path: "/store/x".into(),
            layers,
            dropped_devices,
            dropped_special_bits,
            made_readable: 0,
            cached,
        };
        assert_eq!(super::unpack_summary(&u(1, 0, 0, false)), "unpacked 1 layer");
        assert_eq!(
            super::unpack_summary(&u(3, 1, 2, false)),
            "unpacked 3 layers; dropped 1 device node or fifo, 2 setuid/setgid/sticky bits"
        );
        assert_eq!(super::unpack_summary(&u(2, 0, 1, false)), "unpacked 2 layers; dropped 1 setuid/setgid/sticky bit");
        assert_eq!(super::unpack_summary(&u(3, 0, 0, true)), "cached: 3 layers unpacked before");
        let hidden = UnpackedInfo { made_readable: 2, ..u(1, 0, 0, false) };
        assert_eq!(
            super::unpack_summary(&hidden),
            "unpacked 1 layer; 2 entries the image keeps from other users readable by every local user, as every \
             store file is"
        );
    }
}
