//! Signing keys for binary caches: key generate, key public.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;

use cairn_nix::signing::SecretKey;

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

impl KeyCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            KeyCommand::Generate { name, secret_key_file, public_key_file } => {
                key_generate(&name, &secret_key_file, &public_key_file)?;
            }
            KeyCommand::Public { secret_key_file } => {
                let text = std::fs::read_to_string(&secret_key_file)
                    .with_context(|| format!("cannot read '{}'", secret_key_file.display()))?;
                let sk = SecretKey::parse(&text).with_context(|| format!("'{}'", secret_key_file.display()))?;
                println!("{}", sk.public());
            }
        }
        Ok(())
    }
}

/// Writes a new key pair. The seed comes from the kernel's random source; the secret key file is
/// created 0600 and never overwritten (a lost signing key cannot be recovered).
fn key_generate(name: &str, secret: &Path, public: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if name.is_empty() || name.contains(':') || name.contains(char::is_whitespace) {
        bail!("key name '{name}' must be non-empty, without ':' or spaces");
    }
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("cannot read /dev/urandom")?;
    let sk = SecretKey::from_seed(name, seed);
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(secret).with_context(|| {
            match std::fs::symlink_metadata(secret) {
                Ok(_) => format!("cannot create '{}': it exists (a secret key is never overwritten)", secret.display()),
                Err(_) => format!("cannot create '{}'", secret.display()),
            }
        })?;
    f.write_all(sk.to_nix_string().as_bytes())?;
    f.sync_all()?;
    std::fs::write(public, sk.public().to_string()).with_context(|| format!("cannot write '{}'", public.display()))?;
    Ok(())
}
