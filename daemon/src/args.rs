//! Flags and environment variables shared by `cairnd` and `cairn`.

use std::path::PathBuf;

use cairn_api::config::{ConfigError, ConfigFile, Overrides, Settings};

/// Where the store and the socket are; every binary takes these. Each flag can also come from an
/// environment variable, read by [`StoreArgs::with_env`] rather than by clap: clap counts a value
/// from the environment as typed, and its usage lines would show `--root <DIR>` as if required.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// Logical store directory, part of every path's hash ("/nix/store" to match Nix)
    /// [env: CAIRN_STORE_DIR].
    #[arg(long, global = true, value_name = "DIR")]
    pub store_dir: Option<String>,
    /// Physical root under which the store and its state live [env: CAIRN_ROOT].
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// The daemon's Unix socket [env: CAIRN_SOCKET].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Configuration file (default: /etc/cairn/cairn.toml if it exists) [env: CAIRN_CONFIG].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// A variable's value, unless unset or empty.
fn env(var: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(var).filter(|v| !v.is_empty())
}

impl StoreArgs {
    /// These flags, with the environment's `CAIRN_STORE_DIR`, `CAIRN_ROOT`, `CAIRN_SOCKET` and
    /// `CAIRN_CONFIG` for those not given.
    pub fn with_env(&self) -> StoreArgs {
        StoreArgs {
            store_dir: self
                .store_dir
                .clone()
                .or_else(|| env("CAIRN_STORE_DIR").map(|v| v.to_string_lossy().into_owned())),
            root: self.root.clone().or_else(|| env("CAIRN_ROOT").map(PathBuf::from)),
            socket: self.socket.clone().or_else(|| env("CAIRN_SOCKET").map(PathBuf::from)),
            config: self.config.clone().or_else(|| env("CAIRN_CONFIG").map(PathBuf::from)),
        }
    }

    /// Resolves the settings these arguments select.
    pub fn settings(&self, no_auto_start: bool) -> Result<Settings, ConfigError> {
        let args = self.with_env();
        let file = ConfigFile::load(args.config.as_deref())?;
        let over = Overrides { store_dir: args.store_dir, root: args.root, socket: args.socket, no_auto_start };
        Ok(Settings::resolve(file, over, nix::unistd::geteuid().is_root()))
    }

    /// The config file these arguments make the settings come from (absolute), if any.
    pub fn config_file(&self) -> Option<PathBuf> {
        ConfigFile::source(self.with_env().config.as_deref()).map(|p| std::path::absolute(&p).unwrap_or(p))
    }

    /// The arguments that make a spawned daemon use exactly these settings.
    pub fn to_daemon_args(s: &Settings, config: Option<&PathBuf>) -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![
            "--store-dir".into(),
            s.store_dir.clone().into(),
            "--root".into(),
            s.root.clone().into(),
            "--socket".into(),
            s.socket.clone().into(),
        ];
        if let Some(c) = config {
            v.push("--config".into());
            v.push(c.clone().into());
        }
        v
    }
}
