//! Where images come from and go to, spelled as skopeo spells transports:
//! `docker://HOST/NAME[:TAG|@DIGEST]`, `oci:DIR[:REF]`, `oci-archive:FILE[:REF]`,
//! `docker-archive:FILE[:NAME:TAG]`, and a cairn tag (`NAME[:TAG]`) for the store itself.

use std::fmt;

use crate::tag::{split_tag, validate_host, validate_repository, validate_tag, TagName, DEFAULT_TAG};
use crate::{Digest, OciError, Result};

/// Docker Hub's names as distribution clients resolve them.
pub const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A tag or a digest in a registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => write!(f, "{d}"),
        }
    }
}

/// An image in a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]` as written (`docker.io` for Docker Hub).
    pub registry: String,
    pub repository: String,
    pub reference: Reference,
}

impl ImageRef {
    /// Parses what follows `docker://`: `[HOST/]NAME[:TAG][@DIGEST]` (a digest wins over a tag;
    /// a bare name is on Docker Hub, under `library/` when it has one component).
    pub fn parse(s: &str) -> Result<ImageRef> {
        let bad = |why| OciError::BadReference { reference: s.chars().take(200).collect(), why };
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d)?)),
            None => (s, None),
        };
        let (name, tag) = split_tag(rest);
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                validate_host(first).map_err(|()| bad("the registry host is not a host name"))?;
                (first.to_owned(), path.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        validate_repository(&repository).map_err(|_| bad("the repository is not a valid name"))?;
        if repository.split('/').next().is_some_and(|c| c.contains(':')) {
            return Err(bad("the repository is not a valid name"));
        }
        let reference = match (digest, tag) {
            (Some(d), _) => Reference::Digest(d),
            (None, Some(t)) => {
                validate_tag(t)?;
                Reference::Tag(t.to_owned())
            }
            (None, None) => Reference::Tag(DEFAULT_TAG.to_owned()),
        };
        Ok(ImageRef { registry, repository, reference })
    }

    /// The host to connect to (Docker Hub's API host for `docker.io`).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The local name a pulled image gets by default: `HOST/REPO:TAG`, and for a digest
    /// `HOST/REPO:ALG-HEX` (the digest as a tag: `latest` would be a lie). A pull by digest is
    /// kept and listed as any pull, as podman and docker keep one, until that tag is removed.
    pub fn default_tag(&self) -> Option<TagName> {
        let name = format!("{}/{}", self.registry, self.repository);
        match &self.reference {
            Reference::Tag(t) => TagName::new(&name, t).ok(),
            Reference::Digest(d) => TagName::new(&name, &format!("{}-{}", d.algo().as_str(), d.hex())).ok(),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}/{}:{t}", self.registry, self.repository),
            Reference::Digest(d) => write!(f, "{}/{}@{d}", self.registry, self.repository),
        }
    }
}

/// A transport and what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Docker(ImageRef),
    /// An OCI image layout directory and the `org.opencontainers.image.ref.name` to pick or write.
    Oci {
        dir: String,
        reference: Option<String>,
    },
    /// A tar of an OCI image layout.
    OciArchive {
        file: String,
        reference: Option<String>,
    },
    /// A `docker save` tar and the `NAME:TAG` to pick or write.
    DockerArchive {
        file: String,
        reference: Option<String>,
    },
    /// An image in this store, by tag.
    Store(TagName),
}

impl Transport {
    /// Parses `TRANSPORT:REST`; text without a known transport is a cairn tag.
    pub fn parse(s: &str) -> Result<Transport> {
        let bad = |why| OciError::BadReference { reference: s.chars().take(200).collect(), why };
        if let Some(r) = s.strip_prefix("docker://") {
            return Ok(Transport::Docker(ImageRef::parse(r)?));
        }
        let path_ref = |rest: &str| -> Result<(String, Option<String>)> {
            let (path, reference) = match rest.split_once(':') {
                Some((p, r)) => (p, Some(r.to_owned())),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(bad("the path is empty"));
            }
            Ok((path.to_owned(), reference.filter(|r| !r.is_empty())))
        };
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, reference) = path_ref(rest)?;
            return Ok(Transport::Oci { dir, reference });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (file, reference) = path_ref(rest)?;
            return Ok(Transport::OciArchive { file, reference });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (file, reference) = path_ref(rest)?;
            return Ok(Transport::DockerArchive { file, reference });
        }
        if let Some(t) = s.split_once(':').map(|(t, _)| t) {
            if ["docker", "docker-daemon", "containers-storage", "dir", "sif", "tarball"].contains(&t) {
                return Err(bad(
                    "transport not supported (use docker://, oci:, oci-archive:, docker-archive: or a cairn tag)",
                ));
            }
        }
        Ok(Transport::Store(TagName::parse(s)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn registry_references() {
        let r = ImageRef::parse("127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("127.0.0.1:5000", "team/app"));
        assert_eq!(r.reference, Reference::Tag("v1".into()));
        assert_eq!(r.to_string(), "127.0.0.1:5000/team/app:v1");
        let hub = ImageRef::parse("alpine").unwrap();
        assert_eq!(hub.to_string(), "docker.io/library/alpine:latest");
        assert_eq!(hub.api_host(), "registry-1.docker.io");
        let d = format!("{}", Digest::sha256_of(b"x"));
        let by_digest = ImageRef::parse(&format!("localhost:5000/a:t@{d}")).unwrap();
        assert_eq!(by_digest.reference, Reference::Digest(Digest::parse(&d).unwrap()));
        let kept = by_digest.default_tag().expect("a pull by digest is kept under a tag");
        assert_eq!(kept.tag(), format!("sha256-{}", d.trim_start_matches("sha256:")));
        for bad in ["", "UPPER/x", "host:99999999/x", "a/b:", "a@sha256:00", "a:b:c/d", "-x.com/a"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn transports() {
        assert_eq!(
            Transport::parse("oci:/tmp/l:v1").unwrap(),
            Transport::Oci { dir: "/tmp/l".into(), reference: Some("v1".into()) }
        );
        assert_eq!(Transport::parse("oci:./l").unwrap(), Transport::Oci { dir: "./l".into(), reference: None });
        assert!(matches!(Transport::parse("docker-archive:x.tar:a/b:c").unwrap(),
            Transport::DockerArchive { reference: Some(r), .. } if r == "a/b:c"));
        assert!(matches!(Transport::parse("app:v1").unwrap(), Transport::Store(_)));
        assert!(Transport::parse("docker-daemon:x:y").is_err());
        assert!(Transport::parse("oci:").is_err());
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,120}") {
            let _ = Transport::parse(&s);
            let _ = ImageRef::parse(&s);
        }
    }
}
