//! Configuration of cairnd and cairn.
//!
//! Settings come, lowest priority first, from built-in defaults, a TOML file, environment
//! variables and command-line flags. The file is `--config`/`CAIRN_CONFIG` if given, else
//! `/etc/cairn/cairn.toml` if it exists. Unknown keys are errors, so a typo cannot silently leave a
//! setting at its default. `cairnd --print-config-template` prints a commented file with every
//! key, its default and its meaning ([`TEMPLATE`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// A commented configuration file listing every key with its default.
pub const TEMPLATE: &str = include_str!("../cairn.toml");

/// The file's contents. Every field is optional: absent means "use the default".
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub store_dir: Option<String>,
    pub root: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub nix_daemon_socket: Option<PathBuf>,
    pub allowed_users: Option<Vec<String>>,
    pub trusted_users: Option<Vec<String>>,
    pub auto_start_daemon: Option<bool>,
    pub log_level: Option<String>,
    pub keep_derivations: Option<bool>,
    pub keep_outputs: Option<bool>,
    pub auto_optimise_store: Option<bool>,
    pub runtime_roots: Option<bool>,
    pub nix_state_dir: Option<PathBuf>,
    pub min_free: Option<u64>,
    pub max_free: Option<u64>,
    pub min_free_check_interval: Option<u64>,
    pub trusted_public_keys: Option<Vec<String>>,
    pub require_sigs: Option<bool>,
    pub substituters: Option<Vec<String>>,
    pub trusted_substituters: Option<Vec<String>>,
    pub netrc_file: Option<PathBuf>,
    pub substituter_connections: Option<usize>,
    pub max_substitution_jobs: Option<usize>,
    pub connect_timeout: Option<u64>,
    pub stalled_download_timeout: Option<u64>,
    pub narinfo_cache_positive_ttl: Option<u64>,
    pub narinfo_cache_negative_ttl: Option<u64>,
    pub listen: Option<String>,
    pub secret_key_files: Option<Vec<PathBuf>>,
    pub accept_pushes: Option<bool>,
    pub listen_auth_file: Option<PathBuf>,
    pub listen_anonymous_read: Option<bool>,
    pub listen_tls_cert: Option<PathBuf>,
    pub listen_tls_key: Option<PathBuf>,
    pub allowed_registries: Option<Vec<String>>,
    pub max_jobs: Option<usize>,
    pub builders: Option<String>,
    pub builders_use_substitutes: Option<bool>,
    pub cores: Option<usize>,
    pub timeout: Option<u64>,
    pub max_silent_time: Option<u64>,
    pub max_build_log_size: Option<u64>,
    pub build_max_processes: Option<u64>,
    pub sandbox_dev_shm_size: Option<String>,
    pub build_max_output_size: Option<u64>,
    pub sandbox_paths: Option<Vec<String>>,
    pub build_dir: Option<PathBuf>,
    pub build_uid_base: Option<u32>,
    pub system: Option<String>,
    pub extra_platforms: Option<Vec<String>>,
    pub system_features: Option<Vec<String>>,
    pub hashed_mirrors: Option<Vec<String>>,
    pub post_build_hook: Option<PathBuf>,
    pub max_connections: Option<usize>,
    pub max_connections_per_user: Option<usize>,
    pub header_read_timeout: Option<u64>,
    pub send_timeout: Option<u64>,
    pub body_read_timeout: Option<u64>,
    pub p2p_listen: Option<String>,
    pub peers: Option<Vec<String>>,
    pub p2p_max_transfers_per_peer: Option<usize>,
    pub p2p_upload_rate: Option<u64>,
    pub p2p_local_discovery: Option<bool>,
}

/// Every key a configuration file may set, in the template's order.
pub const KEYS: &[&str] = &[
    "store-dir",
    "root",
    "socket",
    "nix-daemon-socket",
    "allowed-users",
    "trusted-users",
    "auto-start-daemon",
    "log-level",
    "keep-derivations",
    "keep-outputs",
    "auto-optimise-store",
    "runtime-roots",
    "nix-state-dir",
    "min-free",
    "max-free",
    "min-free-check-interval",
    "trusted-public-keys",
    "require-sigs",
    "substituters",
    "trusted-substituters",
    "netrc-file",
    "substituter-connections",
    "max-substitution-jobs",
    "connect-timeout",
    "stalled-download-timeout",
    "narinfo-cache-positive-ttl",
    "narinfo-cache-negative-ttl",
    "listen",
    "secret-key-files",
    "accept-pushes",
    "listen-auth-file",
    "listen-anonymous-read",
    "listen-tls-cert",
    "listen-tls-key",
    "allowed-registries",
    "max-jobs",
    "builders",
    "builders-use-substitutes",
    "cores",
    "timeout",
    "max-silent-time",
    "max-build-log-size",
    "build-max-processes",
    "sandbox-dev-shm-size",
    "build-max-output-size",
    "sandbox-paths",
    "build-dir",
    "build-uid-base",
    "system",
    "extra-platforms",
    "system-features",
    "hashed-mirrors",
    "post-build-hook",
    "max-connections",
    "max-connections-per-user",
    "header-read-timeout",
    "send-timeout",
    "body-read-timeout",
    "p2p-listen",
    "peers",
    "p2p-max-transfers-per-peer",
    "p2p-upload-rate",
    "p2p-local-discovery",
];

/// Why configuration could not be loaded. Each message is one line: a user who mistypes a key
/// reads the line, the key and the closest real key, not the TOML parser's multi-line report
/// with every key listed.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config file '{}' does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("cannot read config file '{}'", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key that is not one of [`KEYS`], with the closest one if any is close.
    #[error("config file '{}', line {line}: unknown key `{key}`{}", path.display(), match suggestion {
        Some(s) => format!("; did you mean `{s}`?"),
        None => "; `cairnd --print-config-template` lists the keys".to_owned(),
    })]
    UnknownKey { path: PathBuf, line: usize, key: String, suggestion: Option<&'static str> },
    /// Anything else TOML or a key's type refuses; `problem` is the parser's one-line message.
    #[error("config file '{}', line {line}: {}{problem}", path.display(), key.as_ref().map(|k| format!("`{k}`: ")).unwrap_or_default())]
    Parse { path: PathBuf, line: usize, key: Option<String>, problem: String },
}

/// Levenshtein distance between two keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The known key closest to `key` by edit distance, if it is close enough to be a typo (at most
/// a third of the key's length, and at least 2, apart).
pub fn suggest_key(key: &str) -> Option<&'static str> {
    let limit = (key.chars().count() / 3).max(2);
    KEYS.iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

impl ConfigError {
    /// Turns TOML's report into one line: the line number, the key when the line names one, and
    /// the parser's message (for an unknown key: the key and the closest real one).
    fn from_toml(e: &toml::de::Error, text: &str, path: &Path) -> ConfigError {
        let start = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
        let line = text[..start].matches('\n').count() + 1;
        let line_text = text.lines().nth(line - 1).unwrap_or("");
        let key = line_text
            .split_once('=')
            .map(|(k, _)| k.trim().trim_matches('"').to_owned())
            .filter(|k| !k.is_empty() && !k.starts_with('#'));
        let message = e.message().trim();
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let unknown = rest.split('`').next().unwrap_or(rest).to_owned();
            return ConfigError::UnknownKey {
                path: path.to_owned(),
                line,
                suggestion: suggest_key(&unknown),
                key: unknown,
            };
        }
        let mut problem = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        // Serde names Rust's types; a config file's reader knows TOML's.
        for (rust, toml) in [
            ("expected usize", "expected a whole number"),
            ("expected u64", "expected a whole number"),
            ("expected u32", "expected a whole number"),
            ("expected u16", "expected a whole number"),
            ("expected i64", "expected a whole number"),
        ] {
            problem = problem.replace(rust, toml);
        }
        ConfigError::Parse { path: path.to_owned(), line, key, problem }
    }
}

impl ConfigFile {
    /// Parses a configuration file's text.
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::from_toml(&e, text, path))
    }

    /// The file [`ConfigFile::load`] reads: the one named, or the system file if it exists.
    pub fn source(explicit: Option<&Path>) -> Option<PathBuf> {
        let system = Path::new("/etc/cairn/cairn.toml");
        match explicit {
            Some(p) => Some(p.to_owned()),
            None if system.exists() => Some(system.to_owned()),
            None => None,
        }
    }

    /// Loads the file named, or the system file if it exists, or nothing.
    pub fn load(explicit: Option<&Path>) -> Result<ConfigFile, ConfigError> {
        let Some(path) = ConfigFile::source(explicit) else { return Ok(ConfigFile::default()) };
        let text = std::fs::read_to_string(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ConfigError::Missing { path: path.clone() },
            _ => ConfigError::Read { path: path.clone(), source },
        })?;
        ConfigFile::parse(&text, &path)
    }
}

/// Overrides from the environment and the command line (`None`: not given).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub store_dir: Option<String>,
    pub root: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub no_auto_start: bool,
}

/// Fully resolved settings. Serialised with the config file's keys, so that the daemon's
/// effective settings (`cairn daemon show-config`) read as a config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Settings {
    /// Logical store directory (default `/store`).
    pub store_dir: String,
    /// Physical root the store directory and state live under.
    pub root: PathBuf,
    /// The daemon's socket.
    pub socket: PathBuf,
    /// The socket on which the daemon speaks Nix's worker protocol (what `nix-daemon` answers),
    /// for Nix's own tools; `None`: off.
    pub nix_daemon_socket: Option<PathBuf>,
    /// Who may connect: user names, `@group`, or `*`.
    pub allowed_users: Vec<String>,
    /// Who may do what needs trust (import unsigned paths): names, `@group`, or `*`.
    pub trusted_users: Vec<String>,
    /// Whether `cairn` starts a daemon when none is listening. A client's setting: not part
    /// of the daemon's effective settings, so neither shown nor fingerprinted.
    #[serde(skip)]
    pub auto_start_daemon: bool,
    /// tracing filter for the daemon's log (`RUST_LOG` wins).
    pub log_level: String,
    /// Keep the derivation that built a live path.
    pub keep_derivations: bool,
    /// Keep the outputs of a live derivation.
    pub keep_outputs: bool,
    /// Every path registered (built, substituted, added, imported) is hard-linked with
    /// identical files of the store, as Nix's `auto-optimise-store`.
    pub auto_optimise_store: bool,
    /// Store paths running processes use are roots.
    pub runtime_roots: bool,
    /// Nix's state directory on this machine, whose `gcroots` and `profiles` are roots too
    /// (read, never changed): a store that Nix or a nix-daemon kept before keeps what they
    /// rooted. `None`: off.
    pub nix_state_dir: Option<PathBuf>,
    /// Collect garbage when fewer bytes than this are free (0: never).
    pub min_free: u64,
    /// … until this many are.
    pub max_free: u64,
    /// Seconds between checks of free space.
    pub min_free_check_interval: u64,
    /// Keys (`name:base64`) whose signatures make substituted paths trusted.
    pub trusted_public_keys: Vec<String>,
    /// Whether substituted paths need a trusted signature (or a content address).
    pub require_sigs: bool,
    /// Binary caches to substitute from, tried by priority.
    pub substituters: Vec<String>,
    /// Binary caches that users who are not trusted may name too (`--substituters`,
    /// `extra-substituters`, `cairn substitute --from`), as Nix's `trusted-substituters`.
    pub trusted_substituters: Vec<String>,
    /// Credentials for HTTP(S) binary caches (`machine HOST login NAME password SECRET`), as
    /// Nix's `netrc-file`; a missing file gives none.
    pub netrc_file: Option<PathBuf>,
    /// Narinfo lookups in flight at once.
    pub substituter_connections: usize,
    /// NAR downloads in flight at once.
    pub max_substitution_jobs: usize,
    /// Seconds to connect to a cache and get its answer's headers.
    pub connect_timeout: u64,
    /// Seconds a download may stay silent before it fails.
    pub stalled_download_timeout: u64,
    /// Seconds a found narinfo is remembered.
    pub narinfo_cache_positive_ttl: u64,
    /// Seconds a "no such narinfo" answer is remembered.
    pub narinfo_cache_negative_ttl: u64,
    /// Address (`HOST:PORT`) on which cairnd serves its store as a binary cache; none: off.
    pub listen: Option<String>,
    /// Secret keys with which served narinfos are signed (by the binary cache on `listen`, and
    /// to peers copying from this node over p2p).
    pub secret_key_files: Vec<PathBuf>,
    /// Whether the `listen` address accepts closures pushed by other daemons (signed paths only).
    pub accept_pushes: bool,
    /// Users of the `listen` address (names, token hashes, scopes); none: open to anyone who
    /// reaches it.
    pub listen_auth_file: Option<PathBuf>,
    /// With `listen_auth_file`, whether reading needs no credentials.
    pub listen_anonymous_read: bool,
    /// PEM certificate chain and private key: the `listen` address speaks HTTPS only.
    pub listen_tls_cert: Option<PathBuf>,
    pub listen_tls_key: Option<PathBuf>,
    /// Registries (`HOST[:PORT]`, or `*`) that untrusted users may have the daemon pull from
    /// and push to; trusted users may use any.
    pub allowed_registries: Vec<String>,
    /// Builds running at once on this machine; 0: only on remote builders.
    pub max_jobs: usize,
    /// Remote builders, in Nix's machines format (`@FILE` includes a file); empty: none.
    pub builders: String,
    /// Whether remote builders fetch inputs from their own substituters before they are sent.
    pub builders_use_substitutes: bool,
    /// `NIX_BUILD_CORES` given to builders.
    pub cores: usize,
    /// Seconds a build may run (0: no limit).
    pub timeout: u64,
    /// Seconds a build may go without output (0: no limit).
    pub max_silent_time: u64,
    /// Bytes of log a build may write before it is killed (0: no limit), as Nix's.
    pub max_build_log_size: u64,
    /// Processes (and threads) one build may run at once (0: no limit of cairn's).
    pub build_max_processes: u64,
    /// Size of a build's `/dev/shm`: bytes with an optional K/M/G suffix, or a percentage of
    /// the RAM (checked by the daemon at start).
    pub sandbox_dev_shm_size: String,
    /// Largest NAR an output may have, in bytes (0: no limit).
    pub build_max_output_size: u64,
    /// Host paths visible in every sandbox: `PATH` or `INSIDE=HOST`.
    pub sandbox_paths: Vec<String>,
    /// Where build directories are created.
    pub build_dir: PathBuf,
    /// First host uid (and gid) builds run as when the daemon is root.
    pub build_uid_base: u32,
    /// The platform this machine builds for (a derivation's `system` must be it, one of
    /// `extra_platforms`, or `builtin`).
    pub system: String,
    /// Other platforms it builds for; `None`: Nix's default (on x86_64 Linux, `i686-linux` and
    /// the `x86_64-vN-linux` levels the CPU supports), which the daemon computes.
    pub extra_platforms: Option<Vec<String>>,
    /// Features derivations may require (`requiredSystemFeatures`); `None`: Nix's default
    /// (`nixos-test benchmark big-parallel`, and `kvm` when `/dev/kvm` is usable).
    pub system_features: Option<Vec<String>>,
    /// Base URLs `builtin:fetchurl` tries first for flat fixed outputs, as
    /// `MIRROR/ALGO/BASE16-HASH`.
    pub hashed_mirrors: Vec<String>,
    /// A program run after each derivation built here, as Nix's `post-build-hook`.
    pub post_build_hook: Option<PathBuf>,
    /// Connections open at once on each listener (the socket; the `listen` address apart).
    pub max_connections: usize,
    /// Connections open at once from one user on the socket, or one address on `listen`.
    pub max_connections_per_user: usize,
    /// Seconds a connection gets to send a whole request head, from the moment the daemon
    /// waits for one (0: no limit).
    pub header_read_timeout: u64,
    /// Seconds an answer may wait for a client that takes none of it before the connection is
    /// closed (0: no limit).
    pub send_timeout: u64,
    /// Seconds an upload may send nothing before it is cut (`body-read-timeout`; 0: never).
    pub body_read_timeout: u64,
    /// Where peers reach this node (`HOST:PORT`, UDP); `None`: it serves no peers.
    pub p2p_listen: Option<String>,
    /// Peers asked before upstream, each `NODE-ID@HOST:PORT[,HOST:PORT…]`, or a bare `NODE-ID`
    /// with `p2p-local-discovery`.
    pub peers: Vec<String>,
    /// Transfers served to one peer at once.
    pub p2p_max_transfers_per_peer: usize,
    /// Bytes per second served to all peers together (0: unlimited).
    pub p2p_upload_rate: u64,
    /// Whether peers' addresses are found on the local network (mDNS), so that `peers` may
    /// name bare node ids.
    pub p2p_local_discovery: bool,
}

/// The root used when none is configured: `/` for root, else a per-user directory (as Nix falls
/// back to `~/.local/share/nix/root`), so that a non-root user gets a working store with no setup.
pub fn default_root(is_root: bool) -> PathBuf {
    if is_root {
        return PathBuf::from("/");
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    data.join("cairn/root")
}

/// Nix's name for this machine's platform (`x86_64-linux`, `aarch64-linux`, …).
pub fn native_system() -> String {
    let arch = match std::env::consts::ARCH {
        "x86" => "i686",
        "arm" => "armv7l",
        a => a,
    };
    format!("{arch}-{}", std::env::consts::OS)
}

fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The state directory under a root.
pub fn state_dir(root: &Path) -> PathBuf {
    root.join("var/lib/cairn")
}

impl Settings {
    /// A short hash of the settings that decide what a daemon does (all but the client's
    /// `auto-start-daemon`): a client compares the one it resolves with the running daemon's to
    /// tell the user that the daemon runs with other settings.
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(self).expect("settings serialise");
        Sha256::digest(&json)[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The settings as a config file would set them (TOML, the file's keys).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// The keys whose values differ between these settings and `other`'s (as the daemon reports
    /// them), in [`KEYS`] order.
    pub fn differing_keys(&self, other: &Settings) -> Vec<&'static str> {
        let (a, b) = (serde_json::to_value(self), serde_json::to_value(other));
        let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) = (a, b) else { return vec![] };
        KEYS.iter().copied().filter(|k| a.get(*k) != b.get(*k)).collect()
    }

    /// Resolves defaults, file and overrides.
    pub fn resolve(file: ConfigFile, over: Overrides, is_root: bool) -> Settings {
        // Absolute: a relative root or socket would mean another store, and links into it that
        // dangle, from another working directory.
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        let root = absolute(over.root.or(file.root).unwrap_or_else(|| default_root(is_root)));
        let socket =
            absolute(over.socket.or(file.socket).unwrap_or_else(|| state_dir(&root).join("daemon-socket/socket")));
        // Next to the socket unless set; an empty path turns it off.
        let nix_daemon_socket = match file.nix_daemon_socket {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p),
            None => Some(socket.with_file_name("nix-socket")),
        };
        let store_dir = over.store_dir.or(file.store_dir).unwrap_or_else(|| "/store".to_owned());
        // Nix's own place for it, under the root, when the store is Nix's; an empty path: off.
        let nix_state_dir = match file.nix_state_dir {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p),
            None => (store_dir == "/nix/store").then(|| root.join("nix/var/nix")),
        };
        Settings {
            store_dir,
            nix_state_dir,
            nix_daemon_socket,
            socket,
            root,
            allowed_users: file.allowed_users.unwrap_or_else(|| vec!["*".to_owned()]),
            trusted_users: file.trusted_users.unwrap_or_else(|| vec!["root".to_owned()]),
            auto_start_daemon: file.auto_start_daemon.unwrap_or(true) && !over.no_auto_start,
            log_level: file.log_level.unwrap_or_else(|| "info".to_owned()),
            keep_derivations: file.keep_derivations.unwrap_or(true),
            keep_outputs: file.keep_outputs.unwrap_or(false),
            auto_optimise_store: file.auto_optimise_store.unwrap_or(false),
            runtime_roots: file.runtime_roots.unwrap_or(true),
            min_free: file.min_free.unwrap_or(0),
            max_free: file.max_free.unwrap_or(i64::MAX as u64),
            min_free_check_interval: file.min_free_check_interval.unwrap_or(5).max(1),
            trusted_public_keys: file.trusted_public_keys.unwrap_or_default(),
            require_sigs: file.require_sigs.unwrap_or(true),
            substituters: file.substituters.unwrap_or_default(),
            trusted_substituters: file.trusted_substituters.unwrap_or_default(),
            netrc_file: file.netrc_file.filter(|p| !p.as_os_str().is_empty()),
            substituter_connections: file.substituter_connections.unwrap_or(25).max(1),
            max_substitution_jobs: file.max_substitution_jobs.unwrap_or(16).max(1),
            connect_timeout: file.connect_timeout.unwrap_or(10).max(1),
            stalled_download_timeout: file.stalled_download_timeout.unwrap_or(300).max(1),
            narinfo_cache_positive_ttl: file.narinfo_cache_positive_ttl.unwrap_or(30 * 24 * 3600),
            narinfo_cache_negative_ttl: file.narinfo_cache_negative_ttl.unwrap_or(60),
            listen: file.listen.filter(|l| !l.is_empty()),
            secret_key_files: file.secret_key_files.unwrap_or_default(),
            accept_pushes: file.accept_pushes.unwrap_or(false),
            listen_auth_file: file.listen_auth_file.filter(|p| !p.as_os_str().is_empty()),
            listen_anonymous_read: file.listen_anonymous_read.unwrap_or(false),
            listen_tls_cert: file.listen_tls_cert.filter(|p| !p.as_os_str().is_empty()),
            listen_tls_key: file.listen_tls_key.filter(|p| !p.as_os_str().is_empty()),
            allowed_registries: file.allowed_registries.unwrap_or_default(),
            max_jobs: file.max_jobs.unwrap_or_else(cpus),
            builders: file.builders.unwrap_or_default(),
            builders_use_substitutes: file.builders_use_substitutes.unwrap_or(false),
            cores: file.cores.filter(|&c| c > 0).unwrap_or_else(cpus),
            timeout: file.timeout.unwrap_or(0),
            max_silent_time: file.max_silent_time.unwrap_or(0),
            max_build_log_size: file.max_build_log_size.unwrap_or(0),
            build_max_processes: file.build_max_processes.unwrap_or(4096),
            sandbox_dev_shm_size: file.sandbox_dev_shm_size.unwrap_or_else(|| "50%".to_owned()),
            build_max_output_size: file.build_max_output_size.unwrap_or(0),
            sandbox_paths: file.sandbox_paths.unwrap_or_default(),
            build_dir: file.build_dir.unwrap_or_else(std::env::temp_dir),
            build_uid_base: file.build_uid_base.unwrap_or(30000),
            system: file.system.filter(|s| !s.is_empty()).unwrap_or_else(native_system),
            extra_platforms: file.extra_platforms,
            system_features: file.system_features,
            hashed_mirrors: file.hashed_mirrors.unwrap_or_default(),
            post_build_hook: file.post_build_hook.filter(|p| !p.as_os_str().is_empty()),
            max_connections: file.max_connections.unwrap_or(1024).max(1),
            max_connections_per_user: file.max_connections_per_user.unwrap_or(128).max(1),
            header_read_timeout: file.header_read_timeout.unwrap_or(30),
            send_timeout: file.send_timeout.unwrap_or(60),
            body_read_timeout: file.body_read_timeout.unwrap_or(60),
            p2p_listen: file.p2p_listen.filter(|l| !l.is_empty()),
            peers: file.peers.unwrap_or_default(),
            p2p_max_transfers_per_peer: file.p2p_max_transfers_per_peer.unwrap_or(4).max(1),
            p2p_upload_rate: file.p2p_upload_rate.unwrap_or(0),
            p2p_local_discovery: file.p2p_local_discovery.unwrap_or(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parses_and_names_every_key() {
        let f = ConfigFile::parse(TEMPLATE, Path::new("template")).unwrap();
        assert_eq!(f, ConfigFile::default(), "the template only has comments");
        for key in KEYS {
            assert!(TEMPLATE.contains(&format!("# {key} =")), "template documents {key}");
            // Every listed key is one the file accepts.
            let text = format!("{key} = 0");
            if let Err(ConfigError::UnknownKey { .. }) = ConfigFile::parse(&text, Path::new("c")) {
                panic!("{key} is listed but not accepted");
            }
        }
        assert_eq!(KEYS.len(), 63, "a new key goes into KEYS, the template and ConfigFile");
    }

    #[test]
    fn a_mistyped_key_gets_one_line_and_the_closest_key() {
        let e = ConfigFile::parse("# caches\nsubstituter = [\"file:///c\"]\n", Path::new("sub.toml")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config file 'sub.toml', line 2: unknown key `substituter`; did you mean `substituters`?"
        );
        let e = ConfigFile::parse("requre-sigs = false", Path::new("c")).unwrap_err();
        assert_eq!(e.to_string(), "config file 'c', line 1: unknown key `requre-sigs`; did you mean `require-sigs`?");
        let e = ConfigFile::parse("colour = true", Path::new("c")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config file 'c', line 1: unknown key `colour`; `cairnd --print-config-template` lists the keys"
        );
    }

    #[test]
    fn suggestions_take_the_closest_key_only_when_close() {
        assert_eq!(suggest_key("substituter"), Some("substituters"));
        assert_eq!(suggest_key("max-job"), Some("max-jobs"));
        assert_eq!(suggest_key("store_dir"), Some("store-dir"));
        assert_eq!(suggest_key("trusted-public-key"), Some("trusted-public-keys"));
        assert_eq!(suggest_key("banana"), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn a_wrong_type_names_the_line_and_key_once() {
        let e = ConfigFile::parse("store-dir = \"/s\"\nrequire-sigs = \"yes\"\n", Path::new("c.toml")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("config file 'c.toml', line 2: `require-sigs`: "), "{msg}");
        assert!(msg.contains("expected a boolean"), "{msg}");
        let e = ConfigFile::parse("max-jobs = \"lots\"\n", Path::new("c.toml")).unwrap_err().to_string();
        assert!(e.ends_with("`max-jobs`: invalid type: string \"lots\", expected a whole number"), "{e}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        assert_eq!(msg.matches("boolean").count(), 1, "{msg}");
        let e = ConfigFile::parse("max-jobs = [", Path::new("c")).unwrap_err();
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn a_missing_file_says_so_once() {
        let e = ConfigFile::load(Some(Path::new("/nonexistent/cairn.toml"))).unwrap_err();
        assert_eq!(e.to_string(), "config file '/nonexistent/cairn.toml' does not exist");
        assert!(std::error::Error::source(&e).is_none(), "no cause repeating it");
    }

    #[test]
    fn fingerprints_follow_the_daemons_settings_not_the_clients() {
        let base = Settings::resolve(ConfigFile::default(), Overrides::default(), false);
        let no_start =
            Settings::resolve(ConfigFile::default(), Overrides { no_auto_start: true, ..Default::default() }, false);
        assert_eq!(base.fingerprint(), no_start.fingerprint(), "auto-start is the client's");
        let file = ConfigFile::parse("substituters = [\"file:///c\"]", Path::new("c")).unwrap();
        let other = Settings::resolve(file, Overrides::default(), false);
        assert_ne!(base.fingerprint(), other.fingerprint());
        assert_eq!(base.differing_keys(&other), ["substituters"]);
        assert!(base.differing_keys(&no_start).is_empty());
        let back: Settings = serde_json::from_value(serde_json::to_value(&other).unwrap()).unwrap();
        let toml_text = other.to_toml().unwrap();
        assert!(toml_text.contains("substituters = [\"file:///c\"]"), "{toml_text}");
        let reread =
            Settings::resolve(ConfigFile::parse(&toml_text, Path::new("shown")).unwrap(), Overrides::default(), false);
        assert_eq!(
            reread.fingerprint(),
            other.fingerprint(),
            "show-config's output is a config file giving the same settings"
        );
        assert_eq!(back.fingerprint(), other.fingerprint(), "the wire keeps the fingerprint");
    }

    #[test]
    fn build_limits_default_to_protecting_the_host() {
        let s = Settings::resolve(ConfigFile::default(), Overrides::default(), false);
        assert_eq!((s.build_max_processes, s.sandbox_dev_shm_size.as_str(), s.build_max_output_size), (4096, "50%", 0));
        let file = ConfigFile::parse(
            "build-max-processes = 64\nsandbox-dev-shm-size = \"8M\"\nbuild-max-output-size = 1048576",
            Path::new("c"),
        )
        .unwrap();
        let s = Settings::resolve(file, Overrides::default(), false);
        assert_eq!(
            (s.build_max_processes, s.sandbox_dev_shm_size.as_str(), s.build_max_output_size),
            (64, "8M", 1 << 20)
        );
    }

    #[test]
    fn platforms_and_features_default_to_nixs() {
        let s = Settings::resolve(ConfigFile::default(), Overrides::default(), false);
        assert_eq!(s.system, native_system());
        assert_eq!((s.extra_platforms, s.system_features), (None, None), "computed by the daemon, as Nix does");
        let file = ConfigFile::parse(
            "system = \"x86_64-linux\"\nextra-platforms = []\nsystem-features = [\"kvm\"]\nhashed-mirrors = [\"http://m/\"]",
            Path::new("c"),
        )
        .unwrap();
        let s = Settings::resolve(file, Overrides::default(), false);
        assert_eq!(s.extra_platforms, Some(vec![]));
        assert_eq!(s.system_features, Some(vec!["kvm".to_owned()]));
        assert_eq!(s.hashed_mirrors, vec!["http://m/".to_owned()]);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = ConfigFile::parse("stor-dir = \"/x\"", Path::new("c.toml")).unwrap_err();
        assert!(
            matches!(&e, ConfigError::UnknownKey { key, suggestion: Some("store-dir"), .. } if key == "stor-dir"),
            "{e}"
        );
    }

    #[test]
    fn precedence() {
        let file =
            ConfigFile::parse("store-dir = \"/nix/store\"\nroot = \"/srv\"\nauto-start-daemon = true", Path::new("c"))
                .unwrap();
        let s = Settings::resolve(file.clone(), Overrides::default(), false);
        assert_eq!((s.store_dir.as_str(), s.root.as_path()), ("/nix/store", Path::new("/srv")));
        assert_eq!(s.socket, Path::new("/srv/var/lib/cairn/daemon-socket/socket"));
        let over = Overrides { root: Some("/r".into()), no_auto_start: true, ..Default::default() };
        let s = Settings::resolve(file, over, false);
        assert_eq!(s.root, Path::new("/r"));
        assert!(!s.auto_start_daemon);
        assert_eq!(Settings::resolve(ConfigFile::default(), Overrides::default(), true).root, Path::new("/"));
    }
}
