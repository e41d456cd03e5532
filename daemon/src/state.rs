//! What the routes share: [`AppState`], with the substituters, the daemon's own status and
//! settings ([`Control`]) and the builder of image derivations ([`ImageBuiltin`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::extract::State;
use cairn_api::config::Settings;
use cairn_api::DaemonStatus;
use cairn_cache::{Limits, NarInfoCache, NetOptions, Policy, Substituter};
use cairn_image::Images;
use cairn_nix::{StoreDir, StorePath};
use cairn_store::LocalStore;
use tokio::sync::Notify;

use crate::auth::Peer;
use crate::error::{ApiError, ApiResult};

/// What every handler shares.
pub struct AppState {
    pub store: Arc<LocalStore>,
    pub store_dir: StoreDir,
    /// Substituters, narinfo lookups and the trust policy for substituted paths.
    pub substitution: Substitution,
    pub builder: Arc<cairn_build::Builder>,
    /// OCI images over the same store.
    pub images: cairn_image::Images,
    /// The builder of image derivations (registered with `builder` as `builtin:oci-image`).
    pub image_builder: Arc<ImageBuiltin>,
    /// Who made each tag, and so who may move or remove it.
    pub tag_owners: Arc<crate::tag_owners::TagOwners>,
    /// The daemon's own status and settings, and its stop switch.
    pub control: Arc<Control>,
    /// The p2p node (`p2p-listen`, `peers`), if configured.
    pub p2p: Option<Arc<cairn_p2p::Node>>,
}

pub(crate) type St = State<Arc<AppState>>;

/// What every substitution shares.
pub struct Substitution {
    pub(crate) configured: Vec<Arc<Substituter>>,
    /// `trusted-substituters`: caches users who are not trusted may name too.
    pub(crate) trusted: Vec<Arc<Substituter>>,
    pub(crate) lookups: Arc<NarInfoCache>,
    pub(crate) net: NetOptions,
    /// The store directory, which remote stores are asked for paths of.
    pub(crate) store_dir: StoreDir,
    pub(crate) limits: Limits,
    pub policy: Policy,
    /// Asked for NARs before the caches (`peers`).
    pub(crate) peers: Option<Arc<dyn cairn_store::peers::Peers>>,
}

impl Substitution {
    /// A substitution from `caches` for `client`, sharing the daemon's narinfo cache, trust
    /// policy and limits — one place for what every substitution (a request, a build's missing
    /// inputs, a repair) is made of.
    pub(crate) fn job(
        &self,
        store: &Arc<LocalStore>,
        caches: Vec<Arc<Substituter>>,
        client: Option<cairn_store::ClientId>,
        progress: Arc<cairn_cache::Progress>,
        repair: bool,
    ) -> cairn_cache::substitute::Job {
        cairn_cache::substitute::Job {
            store: store.clone(),
            substituters: caches,
            lookups: self.lookups.clone(),
            policy: self.policy.clone(),
            limits: self.limits,
            client,
            progress,
            repair,
            peers: self.peers.clone(),
            announce: None,
            content_addresses: Default::default(),
        }
    }

    pub fn from_settings(settings: &Settings, store_dir: &StoreDir) -> anyhow::Result<Substitution> {
        let net = NetOptions::from_secs(settings.connect_timeout, settings.stalled_download_timeout)
            .with_netrc_file(settings.netrc_file.as_deref())
            .map_err(|e| anyhow::anyhow!("netrc-file: {e}"))?;
        let configured = settings
            .substituters
            .iter()
            .map(|u| open_substituter(u, &net, store_dir).map(Arc::new).with_context(|| "substituters in the config"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let trusted = settings
            .trusted_substituters
            .iter()
            .map(|u| {
                open_substituter(u, &net, store_dir).map(Arc::new).with_context(|| "trusted-substituters in the config")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let trusted_keys = settings
            .trusted_public_keys
            .iter()
            .map(|k| cairn_nix::signing::PublicKey::parse(k).with_context(|| "trusted-public-keys in the config"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Substitution {
            configured,
            trusted,
            lookups: Arc::new(NarInfoCache::new(
                Duration::from_secs(settings.narinfo_cache_positive_ttl),
                Duration::from_secs(settings.narinfo_cache_negative_ttl),
            )),
            net,
            store_dir: store_dir.clone(),
            limits: Limits { connections: settings.substituter_connections, jobs: settings.max_substitution_jobs },
            policy: Policy { trusted_keys, require_sigs: settings.require_sigs },
            peers: None,
        })
    }

    /// The caches a request uses: those it names (opened for it, or the configured ones of the
    /// same URL), else the configured ones.
    /// The cache of `substituters` or `trusted-substituters` that `url` names: the same URL,
    /// or — as Nix matches them — the URL with a `/` added.
    pub(crate) fn configured_or_trusted(&self, url: &str) -> Option<Arc<Substituter>> {
        let slashed = format!("{url}/");
        self.configured
            .iter()
            .chain(&self.trusted)
            .find(|s| s.url() == url)
            .or_else(|| self.configured.iter().chain(&self.trusted).find(|s| !url.ends_with('/') && s.url() == slashed))
            .cloned()
    }

    pub(crate) fn caches(&self, from: &[String], peer: &Peer) -> ApiResult<Vec<Arc<Substituter>>> {
        if from.is_empty() {
            return Ok(self.configured.clone());
        }
        from.iter()
            .map(|url| {
                if let Some(s) = self.configured_or_trusted(url) {
                    return Ok(s);
                }
                // A configured peer counts as configured: its narinfos are checked as any cache's.
                if let Some(node) = url.strip_prefix("p2p://") {
                    let peers = self.peers.as_ref().ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "'{url}': this cairnd has no p2p node (set peers and p2p-listen in its config)"
                        ))
                    })?;
                    let cache = peers.cache_of(node.trim_end_matches('/')).map_err(ApiError::bad_request)?;
                    return Ok(Arc::new(Substituter::peer(url, cache)));
                }
                if !peer.trusted {
                    return Err(ApiError::forbidden(format!(
                        "user '{}' may only substitute from the configured substituters; '{url}' is not one \
                         (add the user to trusted-users, or the URL to substituters or trusted-substituters)",
                        peer.user
                    )));
                }
                open_substituter(url, &self.net, &self.store_dir)
                    .map(Arc::new)
                    .map_err(|e| ApiError::bad_request(e.to_string()))
            })
            .collect()
    }
}

/// This daemon's directory for SSH master sockets and known-hosts files (its builders' and its
/// substituters'), under the temporary directory: a control socket's path must be short (the
/// kernel allows 108 bytes), which a store's state directory may not be.
pub fn ssh_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cairn-ssh-{}-{}", nix::unistd::geteuid(), std::process::id()))
}

/// Removes the SSH directories (see [`ssh_dir`]) of this user's cairnds that are gone — each
/// daemon makes one, named by its pid, and a daemon that did not stop cleanly left it — and,
/// with `own`, this process's (at exit). Returns how many went.
pub fn sweep_ssh_dirs(own: bool) -> usize {
    let me = nix::unistd::geteuid();
    let prefix = format!("cairn-ssh-{me}-");
    let pid = std::process::id();
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return 0 };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(Ok(other)) = name.to_str().and_then(|n| n.strip_prefix(&prefix)).map(str::parse::<u32>) else {
            continue;
        };
        // At start, one with this pid is an earlier process's.
        let gone = if other == pid { own } else { !std::path::Path::new(&format!("/proc/{other}")).exists() };
        // Only a real directory of this user's (the temporary directory is everyone's).
        let ours = std::fs::symlink_metadata(e.path())
            .is_ok_and(|m| m.is_dir() && std::os::unix::fs::MetadataExt::uid(&m) == me.as_raw());
        if gone && ours && std::fs::remove_dir_all(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The substituter `url` names: a binary cache, or a store that answers Nix's protocols
/// (`ssh://`, `ssh-ng://`, `unix://`), reached from this daemon as its remote builders are.
pub(crate) fn open_substituter(url: &str, net: &NetOptions, store_dir: &StoreDir) -> anyhow::Result<Substituter> {
    if !cairn_cache::remote::is_remote_store(url) {
        return Ok(Substituter::open(url, net)?);
    }
    let store =
        crate::remote_store::ProtocolStore::open(url, store_dir, &ssh_dir(), net).map_err(|e| anyhow::anyhow!(e))?;
    Ok(Substituter::remote(url, Arc::new(store))?)
}

/// What the daemon knows about itself, shared by the handlers and the accept loop.
pub struct Control {
    pub settings: Settings,
    /// The config file the settings were read from (absolute), if any.
    pub config_file: Option<PathBuf>,
    started_wall: SystemTime,
    started: Instant,
    fingerprint: String,
    /// Notified once by a stop request; the accept loop then shuts down as on SIGTERM.
    pub stop: Notify,
}

impl Control {
    pub fn new(settings: Settings, config_file: Option<PathBuf>) -> Control {
        Control {
            fingerprint: settings.fingerprint(),
            settings,
            config_file,
            started_wall: SystemTime::now(),
            started: Instant::now(),
            stop: Notify::new(),
        }
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn status(&self) -> DaemonStatus {
        DaemonStatus {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            api_version: cairn_api::API_VERSION,
            socket: self.settings.socket.display().to_string(),
            store_dir: self.settings.store_dir.clone(),
            root: self.settings.root.display().to_string(),
            config_file: self.config_file.as_ref().map(|p| p.display().to_string()),
            started: self.started_wall.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            uptime_seconds: self.started.elapsed().as_secs(),
            settings_fingerprint: self.fingerprint.clone(),
            memory: None,
        }
    }
}

/// Makes `builtin:oci-image` derivations, and tells the request that asked how many layers it
/// hashed.
pub struct ImageBuiltin {
    images: Images,
    pub(crate) written: std::sync::Mutex<std::collections::HashMap<StorePath, usize>>,
}

impl ImageBuiltin {
    pub fn new(images: Images) -> ImageBuiltin {
        ImageBuiltin { images, written: Default::default() }
    }
}

impl cairn_build::Builtin for ImageBuiltin {
    fn build(
        &self,
        drv_path: &StorePath,
        drv: &cairn_nix::derivation::Derivation,
        outputs: &std::collections::BTreeMap<String, StorePath>,
        log: &mut dyn FnMut(&[u8]),
    ) -> Result<(), String> {
        let out = outputs.get("out").ok_or("an image derivation has one output, 'out'")?;
        if cairn_image::compose::is_composition(drv) {
            return cairn_image::compose::build_output(&self.images, drv_path, drv, out, &mut |l| log(l.as_bytes()))
                .map_err(|e| e.to_string());
        }
        let built = cairn_image::layered::build_output(&self.images, drv_path, drv, out, &mut |l| log(l.as_bytes()))
            .map_err(|e| e.to_string())?;
        let remembered = built.store_layers.saturating_sub(built.layers_written);
        log(match remembered {
            0 => format!("{} store layers hashed", built.layers_written),
            n => format!("{} store layers hashed, {n} remembered", built.layers_written),
        }
        .as_bytes());
        self.written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(drv_path.clone(), built.layers_written);
        Ok(())
    }
}

/// The keys of `secret-key-files`, with which served narinfos and built paths are signed.
pub(crate) fn secret_keys(settings: &Settings) -> anyhow::Result<Vec<cairn_nix::signing::SecretKey>> {
    settings
        .secret_key_files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).with_context(|| format!("cannot read '{}'", f.display()))?;
            cairn_nix::signing::SecretKey::parse(&text)
                .with_context(|| format!("'{}' (secret-key-files in the config)", f.display()))
        })
        .collect()
}
