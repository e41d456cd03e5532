//! `builtin:unpack-channel`: the builder `nix-channel --update` uses to turn a channel's
//! tarball (`nixexprs.tar.xz`, already in the store as `src`) into `$out/CHANNEL-NAME`, as Nix
//! 2.8 does (`libstore/builtins/unpack-channel.cc`): the tarball is unpacked into `out`, where
//! it must have made exactly one entry, which is renamed to `channelName`.
//!
//! The tarball is compressed with xz, bzip2, gzip or zstd, or not at all (told by its first
//! bytes, as libarchive tells them). It is untrusted: entries are unpacked only inside `out`
//! (no absolute names, no `..`, no write through a symlink: `tar`'s `unpack_in`), only
//! directories, regular files, symlinks and hard links are taken, and neither owners nor
//! special mode bits are kept — a device node is refused, not made, since the daemon may be
//! root. For the same reason the tarball is not read through a symlink, and the channel's name
//! must be a plain file name (the unpacked directory is renamed to it). Nix runs this builder in the sandbox as the build user; the store canonicalises what
//! it registers in both.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The builder name this module serves.
pub const UNPACK_CHANNEL: &str = "builtin:unpack-channel";

/// Why a channel could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackChannelError {
    #[error("attribute '{0}' missing")]
    MissingAttr(&'static str),
    #[error("channel tarball '{src}' contains more than one file")]
    NotOneEntry { src: String },
    #[error("channel tarball '{src}': entry '{entry}' is {kind}, which a channel cannot hold")]
    Unsupported { src: String, entry: String, kind: &'static str },
    #[error("channel tarball '{src}': entry '{entry}' would be unpacked outside the channel")]
    Outside { src: String, entry: String },
    #[error("channel tarball '{src}': {source}")]
    Read {
        src: String,
        #[source]
        source: io::Error,
    },
    #[error("channel name '{0}' is not a plain file name")]
    BadName(String),
    #[error("channel tarball '{0}' is not a regular file")]
    NotAFile(String),
    #[error("{op} '{path}': {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

fn attr<'a>(env: &'a BTreeMap<String, String>, name: &'static str) -> Result<&'a str, UnpackChannelError> {
    env.get(name).map(String::as_str).ok_or(UnpackChannelError::MissingAttr(name))
}

/// The decompressed stream of `input`, by its first bytes.
fn decompressed<'a>(input: impl BufRead + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut input = input;
    let head = input.fill_buf()?.to_vec();
    Ok(if head.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0]) {
        Box::new(liblzma::read::XzDecoder::new_multi_decoder(input))
    } else if head.starts_with(b"BZh") {
        Box::new(bzip2::read::MultiBzDecoder::new(input))
    } else if head.starts_with(&[0x1F, 0x8B]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(input))
    } else if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(input)?)
    } else {
        Box::new(input)
    })
}

/// Unpacks the channel of a `builtin:unpack-channel` derivation's environment (`src`,
/// `channelName`) into `out`, a directory path that does not exist yet. `src` is read at
/// `real_src` (its place on the host).
pub fn unpack(env: &BTreeMap<String, String>, real_src: &Path, out: &Path) -> Result<(), UnpackChannelError> {
    let src = attr(env, "src")?;
    let channel = attr(env, "channelName")?;
    // The daemon renames into `out/NAME`: a name with a slash or `..` would move the channel
    // anywhere the daemon may write.
    if channel.is_empty() || channel == "." || channel == ".." || channel.contains(['/', '\0']) {
        return Err(UnpackChannelError::BadName(channel.to_owned()));
    }
    let io_err = |op: &'static str, path: &Path| {
        let path = path.display().to_string();
        move |source| UnpackChannelError::Io { op, path, source }
    };
    let read_err = |source| UnpackChannelError::Read { src: src.to_owned(), source };
    fs::create_dir_all(out).map_err(io_err("create", out))?;
    // Not through a symlink: a store path may be one, to a file only the daemon may read.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(real_src)
        .map_err(io_err("open", real_src))?;
    if !file.metadata().map_err(io_err("stat", real_src))?.is_file() {
        return Err(UnpackChannelError::NotAFile(src.to_owned()));
    }
    let mut archive = tar::Archive::new(decompressed(BufReader::new(file)).map_err(read_err)?);
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = match entry.header().entry_type() {
            tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::Directory
            | tar::EntryType::Symlink
            | tar::EntryType::Link => None,
            // Metadata entries of the archive itself: nothing to make.
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => continue,
            tar::EntryType::Char | tar::EntryType::Block => Some("a device node"),
            tar::EntryType::Fifo => Some("a fifo"),
            _ => Some("of an unknown type"),
        };
        if let Some(kind) = kind {
            return Err(UnpackChannelError::Unsupported { src: src.to_owned(), entry: name, kind });
        }
        entry.set_preserve_mtime(false);
        entry.set_unpack_xattrs(false);
        // `unpack_in` refuses a name that leaves `out`, a `..`, and a parent that is a
        // symlink resolving outside it; it answers `false` for a name it skips.
        if !entry.unpack_in(out).map_err(read_err)? {
            return Err(UnpackChannelError::Outside { src: src.to_owned(), entry: name });
        }
    }
    let entries: Vec<fs::DirEntry> =
        fs::read_dir(out).map_err(io_err("read", out))?.collect::<Result<_, _>>().map_err(io_err("read", out))?;
    let [only] = entries.as_slice() else {
        return Err(UnpackChannelError::NotOneEntry { src: src.to_owned() });
    };
    let to = out.join(channel);
    fs::rename(only.path(), &to).map_err(io_err("rename the channel directory to", &to))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tarball(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o755);
            h.set_size(if *kind == tar::EntryType::Symlink { 0 } else { data.len() as u64 });
            if *kind == tar::EntryType::Symlink {
                h.set_link_name(std::str::from_utf8(data).unwrap()).unwrap();
                b.append_data(&mut h, name, io::empty()).unwrap();
            } else {
                b.append_data(&mut h, name, *data).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    fn env(src: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("src".to_owned(), src.to_owned()), ("channelName".to_owned(), "nixpkgs".to_owned())])
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn a_compressed_channel_is_unpacked_under_its_name() {
        let t = tempfile::tempdir().unwrap();
        let tar = tarball(&[
            ("nixexprs-1.0/", tar::EntryType::Directory, b""),
            ("nixexprs-1.0/default.nix", tar::EntryType::Regular, b"{ }: 42\n"),
            ("nixexprs-1.0/link", tar::EntryType::Symlink, b"default.nix"),
        ]);
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        };
        for (i, bytes) in [xz(&tar), gz, tar.clone()].into_iter().enumerate() {
            let src = t.path().join(format!("src-{i}"));
            fs::write(&src, bytes).unwrap();
            let out = t.path().join(format!("out-{i}"));
            unpack(&env("/nix/store/x-nixexprs.tar.xz"), &src, &out).unwrap();
            assert_eq!(fs::read(out.join("nixpkgs/default.nix")).unwrap(), b"{ }: 42\n");
            assert_eq!(fs::read_link(out.join("nixpkgs/link")).unwrap(), Path::new("default.nix"));
        }
    }

    #[test]
    fn a_tarball_of_two_entries_escapes_or_devices_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                tarball(&[("a/f", tar::EntryType::Regular, b"x"), ("b/f", tar::EntryType::Regular, b"y")]),
                "contains more than one file",
            ),
            (tarball(&[("a/dev", tar::EntryType::Char, b"")]), "a device node"),
            (tarball(&[("a/", tar::EntryType::Directory, b""), ("a/up", tar::EntryType::Symlink, b"/")]), ""),
        ];
        for (i, (bytes, says)) in cases.into_iter().enumerate() {
            let src = t.path().join(format!("src-{i}"));
            fs::write(&src, xz(&bytes)).unwrap();
            let out = t.path().join(format!("out-{i}"));
            let r = unpack(&env("/nix/store/x-c.tar.xz"), &src, &out);
            if says.is_empty() {
                // A symlink may point anywhere (the store refuses nothing of it); only writes
                // through it are refused.
                r.unwrap();
            } else {
                let e = r.unwrap_err().to_string();
                assert!(e.contains(says), "{e}");
            }
        }
        let victim = t.path().join("victim");
        fs::create_dir(&victim).unwrap();
        let through = tarball(&[
            ("a/up", tar::EntryType::Symlink, victim.to_str().unwrap().as_bytes()),
            ("a/up/owned", tar::EntryType::Regular, b"x"),
        ]);
        let src = t.path().join("through");
        fs::write(&src, &through).unwrap();
        let r = unpack(&env("/nix/store/x-c.tar"), &src, &t.path().join("out-through"));
        assert!(r.is_err(), "a write through a symlink was not refused");
        assert!(!victim.join("owned").exists(), "written through the symlink");
        let missing = unpack(&BTreeMap::new(), &src, &t.path().join("o")).unwrap_err().to_string();
        assert_eq!(missing, "attribute 'src' missing");
    }

    #[test]
    fn a_channel_name_that_leaves_the_output_or_a_tarball_behind_a_symlink_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("c.tar");
        fs::write(&src, tarball(&[("a/f", tar::EntryType::Regular, b"x")])).unwrap();
        for name in ["../../escaped", "a/b", "..", ".", ""] {
            let mut e = env("/nix/store/x-c.tar");
            e.insert("channelName".into(), name.into());
            let out = t.path().join("out").join("o");
            let err = unpack(&e, &src, &out).unwrap_err().to_string();
            assert!(err.contains("is not a plain file name"), "{name:?}: {err}");
        }
        assert!(!t.path().join("escaped").exists());
        let link = t.path().join("link.tar");
        std::os::unix::fs::symlink(&src, &link).unwrap();
        assert!(unpack(&env("/nix/store/x-c.tar"), &link, &t.path().join("o2")).is_err(), "read through a symlink");
    }
}
