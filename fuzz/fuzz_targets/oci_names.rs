//! The names images are known by: digests, `docker://` references, transports, cairn tags and
//! the root file names they are kept under, platforms. They come from users, registries
//! (`Docker-Content-Digest`, manifests' descriptors) and pushes. Contract: no panic; each name
//! that parses prints as text that parses as the same name, and tags survive their file names.
#![no_main]

use cairn_oci::manifest::Platform;
use cairn_oci::tag::{digest_root_file_name, parse_digest_root_file_name};
use cairn_oci::{Digest, ImageRef, TagName, Transport};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(s) = cairn_fuzz::text(data) else { return };
    if let Ok(d) = Digest::parse(s) {
        assert_eq!(Digest::parse(&d.to_string()).expect("a printed digest parses"), d);
        let _ = d.to_hash();
    }
    if let Ok(r) = ImageRef::parse(s) {
        assert_eq!(ImageRef::parse(&r.to_string()).expect("a printed reference parses"), r);
        let _ = r.api_host();
        let _ = r.default_tag();
    }
    let _ = Transport::parse(s);
    if let Ok(t) = TagName::parse(s) {
        assert_eq!(TagName::parse(&t.to_string()).expect("a printed tag parses"), t);
        assert_eq!(TagName::from_file_name(&t.file_name()).expect("a tag's file name parses"), t);
        let d = Digest::sha256_of(s.as_bytes());
        let f = digest_root_file_name(t.name(), &d);
        assert_eq!(parse_digest_root_file_name(&f), Some((t.name().to_owned(), d)));
    }
    let _ = TagName::from_file_name(s);
    let _ = parse_digest_root_file_name(s);
    if let Ok(p) = Platform::parse(s) {
        assert_eq!(Platform::parse(&p.to_string()).expect("a printed platform parses"), p);
    }
});
