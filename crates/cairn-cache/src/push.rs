//! Closures pushed into another cairnd over TCP (`cairn copy --to tcp://HOST:PORT`).
//!
//! A TCP peer is not identified the way a socket peer is (no SO_PEERCRED), so a pushed path is
//! trusted exactly as a substituted one: it needs a signature by one of the receiver's
//! `trusted-public-keys` (or a content address that gives its path), whatever `require-sigs`
//! says, and its NAR must have the narinfo's hash and size. The receiver only listens for pushes
//! when its config says `accept-pushes = true`.
//!
//! The sender first asks which paths of the closure the receiver lacks (`POST
//! /cairn/v1/missing`, store paths one per line, answered the same way), then sends them in one
//! request (`POST /cairn/v1/push`): the string `cairn-push-1`, then for each path, references
//! first, its narinfo as a string followed by exactly NarSize bytes of NAR, then an empty
//! string — the framing is `cairn_nix::wire::push`, where writer and reader sit together.
//! Everything is committed in one store batch, so a push registers whole closures or nothing of
//! a path.

use std::io::{self, BufReader, Read};
use std::sync::Arc;

use bytes::Bytes;
use cairn_nix::narinfo::NarInfo;
use cairn_nix::wire::push::{PushError, PushReader};
use cairn_store::{Committed, LocalStore};

use crate::substitute::{check_narinfo, path_info_of, Policy};
use crate::CacheError;

/// Where the receiver answers.
pub const MISSING_ROUTE: &str = "/cairn/v1/missing";
pub const PUSH_ROUTE: &str = "/cairn/v1/push";

fn bad(reason: impl Into<String>) -> CacheError {
    CacheError::BadFile { url: "push".into(), reason: reason.into() }
}

/// Receives a push stream into `store` (blocking). With `require_sigs` (always, over TCP; see
/// the module documentation) every path needs a trusted signature or a proving content address;
/// a trusted local user's stream (`copy --to unix://`) needs neither, as an import does not.
pub fn receive(
    store: &Arc<LocalStore>,
    policy: &Policy,
    require_sigs: bool,
    input: impl Read,
) -> Result<Committed, CacheError> {
    let policy = Policy { require_sigs, ..policy.clone() };
    let dir = store.store_dir().clone();
    let framing = |e: PushError| bad(e.to_string());
    let mut input = PushReader::new(BufReader::with_capacity(1 << 20, input)).map_err(framing)?;
    let batch = store.batch()?;
    while let Some(text) = input.next_narinfo().map_err(framing)? {
        let info = NarInfo::parse(&dir, &text).map_err(|e| bad(format!("a narinfo: {e}")))?;
        let path = dir.display(&info.store_path);
        check_narinfo(&dir, &info.store_path, &info, &policy).map_err(|check| CacheError::Refused {
            path: path.clone(),
            cache: "the copy".into(),
            check,
        })?;
        if info.compression != "none" {
            return Err(bad(format!("'{path}': pushed NARs are uncompressed")));
        }
        let mut nar = input.nar(info.nar_size);
        let refuse = |e: cairn_store::StoreError| CacheError::Refused {
            path: path.clone(),
            cache: "the copy".into(),
            check: e.to_string(),
        };
        batch.add_nar_with_info(path_info_of(&info), &mut nar, |_| Ok(())).map_err(refuse)?;
        // A path the receiver has already: its bytes are skipped.
        io::copy(&mut nar, &mut io::sink()).map_err(|source| CacheError::Io { url: "push".into(), source })?;
    }
    Ok(batch.commit()?)
}

/// The sending side: a cairnd's push endpoint at `tcp://HOST:PORT`.
pub struct Pusher {
    client: reqwest::Client,
    base: String,
}

impl Pusher {
    pub fn new(url: &str, net: &crate::NetOptions) -> Result<Pusher, CacheError> {
        let host = url.strip_prefix("tcp://").filter(|h| !h.is_empty() && !h.contains('/')).ok_or_else(|| {
            CacheError::Url { url: url.to_owned(), reason: "a daemon's TCP address is tcp://HOST:PORT".into() }
        })?;
        let client = cairn_net::client_builder(net).build().map_err(|e| CacheError::Url {
            url: url.to_owned(),
            reason: format!("cannot start an HTTP client: {e}"),
        })?;
        Ok(Pusher { client, base: format!("http://{host}") })
    }

    async fn post(&self, route: &str, body: reqwest::Body) -> Result<String, CacheError> {
        let url = format!("{}{route}", self.base);
        let mut req = self.client.post(&url).body(body);
        // A receiver with listen-auth-file wants a user's token.
        if let Ok(token) = std::env::var("CAIRN_PUSH_TOKEN") {
            req = req.bearer_auth(token.trim());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CacheError::Http { url: url.clone(), reason: crate::backend::with_causes(&e) })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| CacheError::Http { url: url.clone(), reason: e.to_string() })?;
        if status == reqwest::StatusCode::NOT_FOUND && route == MISSING_ROUTE {
            return Err(CacheError::Http {
                url,
                reason: "no cairnd accepting pushes answers there (the receiver needs listen and accept-pushes = true)"
                    .into(),
            });
        }
        if !status.is_success() {
            return Err(CacheError::Http { url, reason: text.trim().to_owned() });
        }
        Ok(text)
    }

    /// Which of `paths` the receiver lacks, in the order given.
    pub async fn missing(&self, paths: &[String]) -> Result<Vec<String>, CacheError> {
        let text = self.post(MISSING_ROUTE, paths.join("\n").into()).await?;
        Ok(text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect())
    }

    /// Sends a push stream; returns the receiver's answer (JSON: what it added).
    pub async fn push(
        &self,
        body: impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static,
    ) -> Result<String, CacheError> {
        self.post(PUSH_ROUTE, reqwest::Body::wrap_stream(body)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_nix::signing::SecretKey;
    use cairn_nix::strategies::Tree;
    use cairn_nix::{Hash, HashAlgo, StoreDir};

    fn store(root: &std::path::Path) -> Arc<LocalStore> {
        let layout = cairn_store::StoreLayout::under_root(root, StoreDir::new("/store").unwrap());
        Arc::new(LocalStore::open(layout).unwrap())
    }

    /// A push stream of one path, signed by `key` (if any).
    fn stream(key: Option<&SecretKey>, tamper: bool) -> (Vec<u8>, cairn_nix::StorePath) {
        let dir = StoreDir::new("/store").unwrap();
        let nar = Tree::File { executable: false, contents: b"pushed".to_vec() }.to_nar();
        let path = dir.make_store_path("output:out", &Hash::digest(HashAlgo::Sha256, b"p"), "pushed").unwrap();
        let mut info = cairn_nix::wire::push::narinfo(NarInfo {
            store_path: path.clone(),
            url: String::new(),
            compression: String::new(),
            file_hash: None,
            file_size: None,
            nar_hash: Hash::digest(HashAlgo::Sha256, &nar),
            nar_size: nar.len() as u64,
            references: Default::default(),
            deriver: None,
            system: None,
            signatures: Vec::new(),
            ca: None,
            extra: Vec::new(),
        });
        if let Some(k) = key {
            info.sign(&dir, k).unwrap();
        }
        use cairn_nix::wire::push;
        let mut out = push::start();
        out.extend(push::entry(&info.render(&dir)));
        let mut nar = nar;
        if tamper {
            let last = nar.len() - 20;
            nar[last] ^= 1;
        }
        out.extend_from_slice(&nar);
        out.extend(push::end());
        (out, path)
    }

    #[test]
    fn a_signed_push_is_registered_and_an_unsigned_or_tampered_one_is_not() {
        let root = tempfile::tempdir().unwrap();
        let st = store(root.path());
        let key = SecretKey::from_seed("push-1", [7; 32]);
        let policy = Policy { trusted_keys: vec![key.public()], require_sigs: false };
        let (unsigned, path) = stream(None, false);
        let e = receive(&st, &policy, true, &unsigned[..]).unwrap_err();
        assert!(e.to_string().contains("not signed"), "{e}");
        let (tampered, _) = stream(Some(&key), true);
        assert!(receive(&st, &policy, true, &tampered[..]).is_err());
        assert!(!st.is_valid(&path).unwrap());
        let (good, _) = stream(Some(&key), false);
        let done = receive(&st, &policy, true, &good[..]).unwrap();
        assert_eq!(done.added.len(), 1);
        assert!(st.is_valid(&path).unwrap());
        // Again: nothing new, and the bytes are skipped.
        assert!(receive(&st, &policy, true, &good[..]).unwrap().added.is_empty());
        assert!(receive(&st, &policy, true, &b"garbage"[..]).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Hostile push streams: a valid one cut or with a byte changed anywhere is refused or
        /// registers exactly the signed path, and never panics.
        #[test]
        fn mutated_push_streams_are_refused_or_exact(at in 0usize..400, byte in 0u8..=255, cut in proptest::bool::ANY) {
            let root = tempfile::tempdir().unwrap();
            let st = store(root.path());
            let key = SecretKey::from_seed("push-1", [7; 32]);
            let policy = Policy { trusted_keys: vec![key.public()], require_sigs: true };
            let (mut bytes, path) = stream(Some(&key), false);
            let at = at % bytes.len();
            if cut { bytes.truncate(at) } else { bytes[at] = byte }
            match receive(&st, &policy, true, &bytes[..]) {
                Ok(done) => {
                    for i in &done.added {
                        proptest::prop_assert_eq!(&i.path, &path);
                        let mut nar = Vec::new();
                        st.dump_path(&i.path, &mut nar).unwrap();
                        proptest::prop_assert_eq!(cairn_nix::Hash::digest(HashAlgo::Sha256, &nar), i.nar_hash.clone());
                    }
                }
                Err(_) => proptest::prop_assert!(!st.is_valid(&path).unwrap()),
            }
        }
    }
}
