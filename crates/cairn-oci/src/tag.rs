//! Local image names: `NAME[:TAG]`, the names `cairn image tag` gives and the garbage
//! collector's roots for images.
//!
//! A name is a repository as distribution spells it (lower-case path components, optionally
//! led by a registry host with a port, as `127.0.0.1:5000/team/app`), so a pulled image can keep
//! the name it was pulled by, and the same name can be served back by cairnd's registry. A tag
//! is kept as a symlink in the gcroots directory; [`TagName::file_name`] is that symlink's name,
//! reversible and free of `/`.

use std::fmt;

use crate::{OciError, Result};

/// A repository name and a tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TagName {
    name: String,
    tag: String,
}

/// The tag of a name given without one.
pub const DEFAULT_TAG: &str = "latest";

/// The group of garbage-collector roots tags are (`<state>/gcroots/oci-tags/<file name>`): the
/// store keeps root links by group and name and knows neither.
pub const ROOT_GROUP: &str = "oci-tags";

impl TagName {
    /// Parses `NAME[:TAG]`; the tag defaults to `latest`.
    pub fn parse(s: &str) -> Result<TagName> {
        let (name, tag) = split_tag(s);
        TagName::new(name, tag.unwrap_or(DEFAULT_TAG))
    }

    pub fn new(name: &str, tag: &str) -> Result<TagName> {
        validate_repository(name)?;
        validate_tag(tag)?;
        let t = TagName { name: name.to_owned(), tag: tag.to_owned() };
        if t.file_name().len() > MAX_LINK_NAME {
            return Err(OciError::NameTooLong(t.to_string()));
        }
        Ok(t)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The name of the root symlink: the name with `%`, `/` and `:` percent-encoded, `:`, the tag.
    pub fn file_name(&self) -> String {
        format!("{}:{}", encode_name(&self.name), self.tag)
    }

    /// The inverse of [`file_name`](Self::file_name).
    pub fn from_file_name(f: &str) -> Result<TagName> {
        let (enc, tag) = f.rsplit_once(':').ok_or_else(|| OciError::BadName(f.to_owned()))?;
        TagName::new(&decode_name(enc), tag)
    }
}

impl fmt::Display for TagName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

/// The longest file name a root link may have (Linux's `NAME_MAX`).
pub const MAX_LINK_NAME: usize = 255;

/// Whether repository `name`'s links to blobs by digest ([`digest_root_file_name`], the longest
/// digest's) fit a file name.
pub fn fits_digest_links(name: &str) -> Result<()> {
    // "@sha512-" and 128 hex digits.
    if encode_name(name).len() + 8 + 128 > MAX_LINK_NAME {
        return Err(OciError::NameTooLong(name.to_owned()));
    }
    Ok(())
}

/// A repository name with `%`, `/` and `:` percent-encoded: one file name.
pub fn encode_name(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        match c {
            '%' => s.push_str("%25"),
            '/' => s.push_str("%2F"),
            ':' => s.push_str("%3A"),
            c => s.push(c),
        }
    }
    s
}

fn decode_name(enc: &str) -> String {
    enc.replace("%2F", "/").replace("%3A", ":").replace("%25", "%")
}

/// The root keeping a manifest pushed to repository `name` by digest (no tag):
/// `<encoded name>@<alg>-<hex>` (no `:`, so it is never read as a tag).
pub fn digest_root_file_name(name: &str, digest: &crate::Digest) -> String {
    format!("{}@{}-{}", encode_name(name), digest.algo().as_str(), digest.hex())
}

/// The repository and digest of a [`digest_root_file_name`].
pub fn parse_digest_root_file_name(f: &str) -> Option<(String, crate::Digest)> {
    let (enc, rest) = f.rsplit_once('@')?;
    let (alg, hex) = rest.split_once('-')?;
    let d = crate::Digest::parse(&format!("{alg}:{hex}")).ok()?;
    let name = decode_name(enc);
    validate_repository(&name).ok()?;
    Some((name, d))
}

/// Splits `NAME[:TAG]` at the last `:` that is not part of a host's port (a `:` followed later by
/// a `/` belongs to the host).
pub(crate) fn split_tag(s: &str) -> (&str, Option<&str>) {
    match s.rfind(':') {
        Some(i) if !s[i + 1..].contains('/') => (&s[..i], Some(&s[i + 1..])),
        _ => (s, None),
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`, as distribution's tag grammar.
pub fn validate_tag(tag: &str) -> Result<()> {
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(OciError::BadTag(tag.chars().take(200).collect()))
    }
}

/// A repository name: an optional registry host (`host[:port]`, told apart by a `.` or `:` or by
/// being `localhost`) and path components of `[a-z0-9]` joined by `.`, `_`, `__` or `-`s.
pub fn validate_repository(name: &str) -> Result<()> {
    let bad = || OciError::BadName(name.chars().take(200).collect());
    if name.is_empty() || name.len() > 255 {
        return Err(bad());
    }
    let mut parts = name.split('/').peekable();
    let first = *parts.peek().ok_or_else(bad)?;
    if name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost") {
        validate_host(first).map_err(|_| bad())?;
        parts.next();
    }
    let mut any = false;
    for p in parts {
        any = true;
        if !valid_component(p) {
            return Err(bad());
        }
    }
    if any {
        Ok(())
    } else {
        Err(bad())
    }
}

/// A repository's name as a registry's `/v2/NAME/…` routes take it (distribution's path
/// grammar): components of lower-case letters and digits joined by `.`, `_`, `__` or dashes, no
/// host part (a `:port` cannot be in a route), at most 255 bytes.
pub fn validate_registry_path(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 || !name.split('/').all(valid_component) {
        return Err(OciError::BadName(name.chars().take(200).collect()));
    }
    Ok(())
}

/// `[A-Za-z0-9.-]+` labels joined by `.` (no label empty or starting or ending with `-`) with an
/// optional `:port`, or `[v6]:port`.
/// The callers say what was wrong in their own terms, so this only answers yes or no.
#[allow(clippy::result_unit_err)]
pub fn validate_host(host: &str) -> Result<(), ()> {
    let (h, port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, Some(p)),
        _ => (host, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(());
        }
    }
    if let Some(v6) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return if !v6.is_empty() && v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') { Ok(()) } else { Err(()) };
    }
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
    };
    if h.split('.').all(label) {
        Ok(())
    } else {
        Err(())
    }
}

fn valid_component(p: &str) -> bool {
    let b = p.as_bytes();
    if b.is_empty() || !b[0].is_ascii_lowercase() && !b[0].is_ascii_digit() {
        return false;
    }
    let last = b[b.len() - 1];
    if !(last.is_ascii_lowercase() || last.is_ascii_digit()) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            i += 1;
            continue;
        }
        // A separator: ".", "_", "__" or a run of "-", then an alphanumeric.
        let start = i;
        match c {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || !b.get(i).is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_and_tags() {
        let t = TagName::parse("127.0.0.1:5000/team/app:v1.2").unwrap();
        assert_eq!((t.name(), t.tag()), ("127.0.0.1:5000/team/app", "v1.2"));
        assert_eq!(TagName::parse("alpine").unwrap().to_string(), "alpine:latest");
        assert_eq!(TagName::parse("localhost:5000/x").unwrap().tag(), "latest");
        for bad in ["", "Alpine", "a//b", "a/", "/a", "a:", "a:-x", "a:.x", "a b", "a..b", "../x", "a/.."] {
            assert!(TagName::parse(bad).is_err(), "{bad}");
        }
        assert!(TagName::parse("a__b/c-d--e.f:_x").is_ok());
    }

    #[test]
    fn registry_paths_are_distribution_s_and_hosts_have_no_empty_labels() {
        for ok in ["app", "team/app", "registry.example.com/team/app", "a__b/c-d", "x.y_z"] {
            assert!(validate_registry_path(ok).is_ok(), "{ok}");
        }
        for bad in ["a..b/x", "127.0.0.1:5000/a", "Team/app", "a//b", "-a", "a/", ""] {
            assert!(validate_registry_path(bad).is_err(), "{bad}");
        }
        assert!(validate_host("a..b").is_err() && validate_host("a.-b").is_err());
        assert!(validate_host("my-host.example.com:5000").is_ok() && validate_host("[::1]:5000").is_ok());
        assert!(TagName::parse("a..b/x:t").is_err());
    }

    #[test]
    fn file_names_reverse() {
        let t = TagName::parse("localhost:5000/a/b:t").unwrap();
        assert_eq!(t.file_name(), "localhost%3A5000%2Fa%2Fb:t");
        assert_eq!(TagName::from_file_name(&t.file_name()).unwrap(), t);
        assert!(!t.file_name().contains('/'));
        let d = crate::Digest::sha256_of(b"m");
        let f = digest_root_file_name("localhost:5000/a", &d);
        assert!(!f.contains(':') && !f.contains('/'));
        assert_eq!(parse_digest_root_file_name(&f), Some(("localhost:5000/a".to_owned(), d)));
        assert!(TagName::from_file_name(&f).is_err());
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            if let Ok(t) = TagName::parse(&s) {
                prop_assert_eq!(TagName::from_file_name(&t.file_name()).unwrap(), t);
            }
        }

        #[test]
        fn valid_names_round_trip(
            host in proptest::option::of("[a-z0-9]{1,8}\\.[a-z]{2,4}(:[0-9]{1,5})?"),
            comps in proptest::collection::vec("[a-z0-9]{1,6}([._-][a-z0-9]{1,6})?", 1..4),
            tag in "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}",
        ) {
            let name = host.into_iter().chain(comps).collect::<Vec<_>>().join("/");
            let t = TagName::new(&name, &tag).unwrap();
            prop_assert_eq!(TagName::parse(&t.to_string()).unwrap(), t.clone());
            prop_assert_eq!(TagName::from_file_name(&t.file_name()).unwrap(), t);
        }
    }
}
