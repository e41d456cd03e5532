//! Flags and environment variables shared by `cairnd` and `cairn`.

use std::path::PathBuf;

use cairn_api::config::{ConfigError, ConfigFile, Overrides, Settings};

/// Where the store and the socket are; every binary takes these.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreArgs {
    /// Logical store directory, part of every path's hash ("/nix/store" to match Nix).
    #[arg(long, env = "CAIRN_STORE_DIR", global = true, value_name = "DIR")]
    pub store_dir: Option<String>,
    /// Physical root under which the store and its state live.
    #[arg(long, env = "CAIRN_ROOT", global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// The daemon's Unix socket.
    #[arg(long, env = "CAIRN_SOCKET", global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Configuration file (default: /etc/cairn/cairn.toml if it exists).
    #[arg(long, env = "CAIRN_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl StoreArgs {
    /// Resolves the settings these arguments select.
    pub fn settings(&self, no_auto_start: bool) -> Result<Settings, ConfigError> {
        let file = ConfigFile::load(self.config.as_deref())?;
        let over = Overrides {
            store_dir: self.store_dir.clone(),
            root: self.root.clone(),
            socket: self.socket.clone(),
            no_auto_start,
        };
        Ok(Settings::resolve(file, over, nix::unistd::geteuid().is_root()))
    }

    /// The config file these arguments make the settings come from (absolute), if any.
    pub fn config_file(&self) -> Option<PathBuf> {
        ConfigFile::source(self.config.as_deref()).map(|p| std::path::absolute(&p).unwrap_or(p))
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
