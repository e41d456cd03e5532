//! Derivations in Nix's ATerm form (`Derive(...)`, the contents of a `.drv` file), and the
//! computation of their output paths.
//!
//! ```text
//! Derive([("out","/nix/store/…-x","",""),…],        outputs: name, path, hash algo, hash
//!        [("/nix/store/…-y.drv",["out"]),…],        input derivations and the outputs used
//!        ["/nix/store/…-src",…],                    input sources
//!        "x86_64-linux","/bin/sh",["-c","…"],       platform, builder, arguments
//!        [("name","x"),…])                          environment
//! ```
//!
//! Strings escape `"`, `\`, newline, carriage return and tab with a backslash. Lists are printed
//! in sorted order, so parsing and printing are exact inverses on what Nix writes.
//!
//! An input-addressed output path is `make_output_path(output, hashDerivationModulo(drv), name)`.
//! `hashDerivationModulo` hashes the derivation's ATerm with each input derivation replaced by its
//! own modulo hash (so that changing how a fixed-output input is fetched does not change its
//! dependents), and with the output paths and their environment variables blanked when computing
//! the derivation's own outputs. A fixed-output derivation's modulo hash depends only on its
//! declared hash and path. Input derivations are reached through a caller's function: this crate
//! reads no files.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::content_address::FileIngestionMethod;
use crate::hash::{Encoding, Hash, HashAlgo};
use crate::store_path::{StoreDir, StorePath, StorePathError};

/// One output of a derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivationOutput {
    /// Absolute store path (empty while a derivation is being constructed).
    pub path: String,
    /// `""` for input-addressed outputs, else the method and algorithm (`sha256`, `r:sha256`).
    pub hash_algo: String,
    /// Base16 hash of a fixed output, else `""`.
    pub hash: String,
}

/// A parsed derivation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    pub outputs: BTreeMap<String, DerivationOutput>,
    pub input_drvs: BTreeMap<String, BTreeSet<String>>,
    pub input_srcs: BTreeSet<String>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// Why a derivation was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DerivationError {
    #[error("malformed derivation at byte {pos}: expected {expected}")]
    Expected { pos: usize, expected: &'static str },
    #[error("malformed derivation: string at byte {0} is not UTF-8")]
    NotUtf8(usize),
    #[error("malformed derivation: {what} {name:?} appears twice or out of order")]
    Unsorted { what: &'static str, name: String },
    #[error("malformed derivation: trailing bytes after the closing parenthesis")]
    Trailing,
    #[error("derivation has no name in its environment")]
    NoName,
    #[error("fixed-output derivation has a bad hash: {0}")]
    BadFixedHash(String),
    #[error("input derivation {0} has no output {1:?}")]
    MissingInputOutput(String, String),
    #[error(transparent)]
    StorePath(#[from] StorePathError),
}

type Result<T> = std::result::Result<T, DerivationError>;

/// The modulo hash of each output of a derivation.
pub type OutputHashes = BTreeMap<String, Hash>;

/// Gives the [`OutputHashes`] of an input derivation, named by its store path.
pub type InputHashes<'a, E> = dyn FnMut(&str) -> std::result::Result<OutputHashes, E> + 'a;

struct Cursor<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn expect(&mut self, lit: &'static str) -> Result<()> {
        if self.s[self.pos..].starts_with(lit.as_bytes()) {
            self.pos += lit.len();
            Ok(())
        } else {
            Err(DerivationError::Expected { pos: self.pos, expected: lit })
        }
    }

    fn peek(&self, c: u8) -> bool {
        self.s.get(self.pos) == Some(&c)
    }

    fn string(&mut self) -> Result<String> {
        let start = self.pos;
        self.expect("\"")?;
        let mut out = Vec::new();
        loop {
            match self.s.get(self.pos) {
                None => return Err(DerivationError::Expected { pos: self.pos, expected: "closing quote" }),
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => {
                    let c = *self
                        .s
                        .get(self.pos + 1)
                        .ok_or(DerivationError::Expected { pos: self.pos, expected: "escaped character" })?;
                    out.push(match c {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                    self.pos += 2;
                }
                Some(&c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| DerivationError::NotUtf8(start))
    }

    /// `[item,item,…]`
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> Result<T>) -> Result<Vec<T>> {
        self.expect("[")?;
        let mut v = Vec::new();
        if self.peek(b']') {
            self.pos += 1;
            return Ok(v);
        }
        loop {
            v.push(item(self)?);
            if self.peek(b',') {
                self.pos += 1;
            } else {
                self.expect("]")?;
                return Ok(v);
            }
        }
    }
}

fn sorted_map<V>(what: &'static str, pairs: Vec<(String, V)>) -> Result<BTreeMap<String, V>> {
    let mut m = BTreeMap::new();
    for (k, v) in pairs {
        if m.last_key_value().is_some_and(|(last, _): (&String, _)| last >= &k) {
            return Err(DerivationError::Unsorted { what, name: k });
        }
        m.insert(k, v);
    }
    Ok(m)
}

fn print_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn print_list<T>(out: &mut String, items: impl IntoIterator<Item = T>, mut f: impl FnMut(&mut String, T)) {
    out.push('[');
    for (i, x) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        f(out, x);
    }
    out.push(']');
}

impl Derivation {
    /// Parses the ATerm form. Refuses anything Nix would not have written (unsorted or
    /// duplicate keys, trailing bytes), so that printing gives back the same bytes.
    pub fn parse(bytes: &[u8]) -> Result<Derivation> {
        let mut c = Cursor { s: bytes, pos: 0 };
        c.expect("Derive(")?;
        let outputs = c.list(|c| {
            c.expect("(")?;
            let name = c.string()?;
            c.expect(",")?;
            let path = c.string()?;
            c.expect(",")?;
            let hash_algo = c.string()?;
            c.expect(",")?;
            let hash = c.string()?;
            c.expect(")")?;
            Ok((name, DerivationOutput { path, hash_algo, hash }))
        })?;
        c.expect(",")?;
        let input_drvs = c.list(|c| {
            c.expect("(")?;
            let path = c.string()?;
            c.expect(",")?;
            let outs = c.list(Cursor::string)?;
            c.expect(")")?;
            let set: BTreeSet<String> = outs.iter().cloned().collect();
            if set.len() != outs.len() || !outs.windows(2).all(|w| w[0] < w[1]) {
                return Err(DerivationError::Unsorted { what: "input output", name: path });
            }
            Ok((path, set))
        })?;
        c.expect(",")?;
        let srcs = c.list(Cursor::string)?;
        c.expect(",")?;
        let platform = c.string()?;
        c.expect(",")?;
        let builder = c.string()?;
        c.expect(",")?;
        let args = c.list(Cursor::string)?;
        c.expect(",")?;
        let env = c.list(|c| {
            c.expect("(")?;
            let k = c.string()?;
            c.expect(",")?;
            let v = c.string()?;
            c.expect(")")?;
            Ok((k, v))
        })?;
        c.expect(")")?;
        if c.pos != bytes.len() {
            return Err(DerivationError::Trailing);
        }
        let input_srcs: BTreeSet<String> = srcs.iter().cloned().collect();
        if input_srcs.len() != srcs.len() || !srcs.windows(2).all(|w| w[0] < w[1]) {
            return Err(DerivationError::Unsorted { what: "input source", name: srcs.join(" ") });
        }
        Ok(Derivation {
            outputs: sorted_map("output", outputs)?,
            input_drvs: sorted_map("input derivation", input_drvs)?,
            input_srcs,
            platform,
            builder,
            args,
            env: sorted_map("environment variable", env)?,
        })
    }

    /// The ATerm form, as Nix writes it to the `.drv` file.
    pub fn to_aterm(&self) -> String {
        self.unparse(false, &self.input_drvs)
    }

    fn unparse(&self, mask_outputs: bool, input_drvs: &BTreeMap<String, BTreeSet<String>>) -> String {
        let mut s = String::with_capacity(1024);
        s.push_str("Derive(");
        print_list(&mut s, &self.outputs, |s, (name, o)| {
            s.push('(');
            print_string(s, name);
            s.push(',');
            print_string(s, if mask_outputs { "" } else { &o.path });
            s.push(',');
            print_string(s, &o.hash_algo);
            s.push(',');
            print_string(s, &o.hash);
            s.push(')');
        });
        s.push(',');
        print_list(&mut s, input_drvs, |s, (path, outs)| {
            s.push('(');
            print_string(s, path);
            s.push(',');
            print_list(s, outs, |s, o| print_string(s, o));
            s.push(')');
        });
        s.push(',');
        print_list(&mut s, &self.input_srcs, |s, p| print_string(s, p));
        s.push(',');
        print_string(&mut s, &self.platform);
        s.push(',');
        print_string(&mut s, &self.builder);
        s.push(',');
        print_list(&mut s, &self.args, |s, a| print_string(s, a));
        s.push(',');
        print_list(&mut s, &self.env, |s, (k, v)| {
            s.push('(');
            print_string(s, k);
            s.push(',');
            print_string(s, if mask_outputs && self.outputs.contains_key(k) { "" } else { v });
            s.push(')');
        });
        s.push(')');
        s
    }

    /// The name `derivation` gives a new derivation: its `name` environment variable, or with
    /// structured attributes (where the environment holds only `__json` and the outputs) the
    /// `name` in `__json`. A derivation in the store is named by its `.drv` path instead.
    pub fn name(&self) -> Result<std::borrow::Cow<'_, str>> {
        if let Some(n) = self.env.get("name") {
            return Ok(std::borrow::Cow::Borrowed(n));
        }
        self.env
            .get("__json")
            .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
            .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_owned))
            .map(std::borrow::Cow::Owned)
            .ok_or(DerivationError::NoName)
    }

    /// The single `out` output of a fixed-output derivation, with its method and hash.
    pub fn fixed_output(&self) -> Result<Option<(FileIngestionMethod, Hash)>> {
        let Some(out) = self.outputs.get("out").filter(|o| !o.hash.is_empty() && self.outputs.len() == 1) else {
            return Ok(None);
        };
        let (method, algo) = match out.hash_algo.strip_prefix("r:") {
            Some(a) => (FileIngestionMethod::Recursive, a),
            None => (FileIngestionMethod::Flat, out.hash_algo.as_str()),
        };
        let algo: HashAlgo =
            algo.parse().map_err(|e: crate::hash::HashError| DerivationError::BadFixedHash(e.to_string()))?;
        let hash = Hash::parse_with_algo(&out.hash, algo).map_err(|e| DerivationError::BadFixedHash(e.to_string()))?;
        Ok(Some((method, hash)))
    }

    /// `hashDerivationModulo`: one hash per output. `input` gives the same for an input
    /// derivation (its own modulo hash with `mask_outputs` false).
    pub fn hash_modulo<E: From<DerivationError>>(
        &self,
        mask_outputs: bool,
        input: &mut InputHashes<'_, E>,
    ) -> std::result::Result<OutputHashes, E> {
        if let Some(out) = self.outputs.get("out").filter(|o| !o.hash.is_empty() && self.outputs.len() == 1) {
            let s = format!("fixed:out:{}:{}:{}", out.hash_algo, out.hash, out.path);
            return Ok(BTreeMap::from([("out".to_owned(), Hash::digest(HashAlgo::Sha256, s.as_bytes()))]));
        }
        let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (path, outs) in &self.input_drvs {
            let hashes = input(path)?;
            for o in outs {
                let h = hashes.get(o).ok_or_else(|| DerivationError::MissingInputOutput(path.clone(), o.clone()))?;
                inputs.entry(h.encode(Encoding::Base16)).or_default().insert(o.clone());
            }
        }
        let h = Hash::digest(HashAlgo::Sha256, self.unparse(mask_outputs, &inputs).as_bytes());
        Ok(self.outputs.keys().map(|o| (o.clone(), h.clone())).collect())
    }

    /// The paths of the derivation's outputs, as Nix computes them when it writes the `.drv`.
    /// `name` is the derivation's name: its `.drv` path's without `.drv` (Nix's
    /// `Derivation::name`), which `derivation` makes from the `name` attribute
    /// ([`Derivation::name`]) but a tool may set apart from it (`nix develop` names its shell
    /// derivation `NAME-env` and leaves the attribute alone).
    pub fn output_paths<E: From<DerivationError>>(
        &self,
        dir: &StoreDir,
        name: &str,
        input: &mut InputHashes<'_, E>,
    ) -> std::result::Result<BTreeMap<String, StorePath>, E> {
        if let Some((method, hash)) = self.fixed_output()? {
            let p = dir
                .make_fixed_output_path(name, method, &hash, &BTreeSet::new(), false)
                .map_err(DerivationError::from)?;
            return Ok(BTreeMap::from([("out".to_owned(), p)]));
        }
        let hashes = self.hash_modulo(true, input)?;
        hashes
            .iter()
            .map(|(o, h)| Ok((o.clone(), dir.make_output_path(o, h, name).map_err(DerivationError::from)?)))
            .collect()
    }
}

/// One output in Nix's JSON form (`nix show-derivation`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonOutput {
    path: String,
    #[serde(rename = "hashAlgo", default, skip_serializing_if = "String::is_empty")]
    hash_algo: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    hash: String,
}

/// A derivation in Nix's JSON form, fields in the order Nix 2.8 prints them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JsonDerivation {
    outputs: BTreeMap<String, JsonOutput>,
    input_srcs: BTreeSet<String>,
    input_drvs: BTreeMap<String, BTreeSet<String>>,
    system: String,
    builder: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
}

/// `nix show-derivation`'s output for derivations keyed by `.drv` path: one object, printed as
/// Nix 2.8 prints it (two-space indentation, paths and maps sorted, fields in Nix's order).
pub fn show_json(drvs: &BTreeMap<String, Derivation>) -> String {
    let forms: BTreeMap<&str, JsonDerivation> = drvs.iter().map(|(p, d)| (p.as_str(), d.json_form())).collect();
    let mut out = serde_json::to_string_pretty(&forms).expect("derivations serialise");
    out.push('\n');
    out
}

impl Derivation {
    /// `nix show-derivation`'s output for this derivation at `drv_path` (see [`show_json`]).
    pub fn to_json(&self, drv_path: &str) -> String {
        show_json(&BTreeMap::from([(drv_path.to_owned(), self.clone())]))
    }

    fn json_form(&self) -> JsonDerivation {
        JsonDerivation {
            outputs: self
                .outputs
                .iter()
                .map(|(k, o)| {
                    (
                        k.clone(),
                        JsonOutput { path: o.path.clone(), hash_algo: o.hash_algo.clone(), hash: o.hash.clone() },
                    )
                })
                .collect(),
            input_srcs: self.input_srcs.clone(),
            input_drvs: self.input_drvs.clone(),
            system: self.platform.clone(),
            builder: self.builder.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
        }
    }

    /// Parses the JSON form: either one derivation object, or `nix show-derivation`'s output
    /// (an object keyed by `.drv` path) holding exactly one; returns the key too, if there was
    /// one. Output paths may be empty strings (to be computed).
    pub fn from_json(text: &str) -> std::result::Result<(Option<String>, Derivation), String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let (key, body) = match value.as_object() {
            Some(m) if m.len() == 1 && m.keys().next().is_some_and(|k| k.ends_with(".drv")) => {
                let (k, v) = m.iter().next().expect("one entry");
                (Some(k.clone()), v.clone())
            }
            _ => (None, value),
        };
        let j: JsonDerivation = serde_json::from_value(body).map_err(|e| e.to_string())?;
        let d = Derivation {
            outputs: j
                .outputs
                .into_iter()
                .map(|(k, o)| (k, DerivationOutput { path: o.path, hash_algo: o.hash_algo, hash: o.hash }))
                .collect(),
            input_drvs: j.input_drvs,
            input_srcs: j.input_srcs,
            platform: j.system,
            builder: j.builder,
            args: j.args,
            env: j.env,
        };
        Ok((key, d))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn structured_derivations_are_named_by_their_json() {
        let mut d = super::Derivation::default();
        d.env.insert("__json".into(), r#"{"name":"sa","x":1}"#.into());
        assert_eq!(d.name().unwrap(), "sa");
        d.env.insert("name".into(), "plain".into());
        assert_eq!(d.name().unwrap(), "plain");
        d.env.clear();
        assert!(d.name().is_err());
    }

    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof!["[a-z0-9/._-]{0,12}", ".{0,12}", Just("\"\\\n\r\t".to_owned())]
    }

    fn derivation() -> impl Strategy<Value = Derivation> {
        (
            prop::collection::btree_map("[a-z]{1,5}", (text(), text(), text()), 0..4),
            prop::collection::btree_map(text(), prop::collection::btree_set("[a-z]{1,4}", 0..3), 0..3),
            prop::collection::btree_set(text(), 0..3),
            (text(), text(), prop::collection::vec(text(), 0..4)),
            prop::collection::btree_map(text(), text(), 0..5),
        )
            .prop_map(|(outs, input_drvs, input_srcs, (platform, builder, args), env)| Derivation {
                outputs: outs
                    .into_iter()
                    .map(|(k, (path, hash_algo, hash))| (k, DerivationOutput { path, hash_algo, hash }))
                    .collect(),
                input_drvs,
                input_srcs,
                platform,
                builder,
                args,
                env,
            })
    }

    proptest! {
        #[test]
        fn print_parse_round_trip(d in derivation()) {
            let aterm = d.to_aterm();
            prop_assert_eq!(Derivation::parse(aterm.as_bytes()).unwrap(), d);
        }

        #[test]
        fn json_round_trip(d in derivation()) {
            let (key, back) = Derivation::from_json(&d.to_json("/nix/store/x.drv")).unwrap();
            prop_assert_eq!(key.as_deref(), Some("/nix/store/x.drv"));
            prop_assert_eq!(back, d);
        }

        #[test]
        fn json_parse_never_panics(text in ".{0,300}") {
            let _ = Derivation::from_json(&text);
        }

        #[test]
        fn parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = Derivation::parse(&bytes);
            let mut with_head = b"Derive(".to_vec();
            with_head.extend(&bytes);
            let _ = Derivation::parse(&with_head);
        }
    }
}
