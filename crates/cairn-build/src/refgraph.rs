//! `exportReferencesGraph`: closures of input paths handed to the builder, as Nix 2.8 does.
//!
//! Legacy derivations name pairs `FILE PATH …` in the variable; before the build, `/build/FILE`
//! holds the closure of `PATH` in the format of `nix-store --register-validity` without hashes
//! or derivers (Nix's `makeValidityRegistration(paths, false, false)`): per path, in store-path
//! order, the path, an empty deriver line, the number of references and the references. With
//! structured attributes the attribute is an object `NAME → [PATH …]` and `.attrs.json` gets
//! `NAME`: the closure as `nix path-info --json --closure-size` prints it (`path`, `narHash` in
//! nix32 with its algorithm, `narSize`, `references`, `ca` when there is one, `closureSize`).
//!
//! Each path must be in the build's input closure ("cannot export references of path …"), so a
//! builder learns nothing about the store it could not already read. Derivations (`.drv`) in a
//! closure bring the closures of their outputs too (Nix's rule, for NixOS images of build
//! dependencies).
//!
//! The store is reached through [`Metadata`], so that the formats are tested without one.

use std::collections::{BTreeMap, BTreeSet};

use cairn_nix::hash::{Encoding, Hash};
use cairn_nix::{ContentAddress, StoreDir, StorePath};
use serde_json::{json, Value};

/// Why the graphs could not be written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GraphError {
    #[error("odd number of tokens in 'exportReferencesGraph': '{0}'")]
    OddTokens(String),
    #[error("invalid file name '{0}' in 'exportReferencesGraph'")]
    BadFileName(String),
    #[error("'exportReferencesGraph' contains a non-store path '{0}'")]
    NotStorePath(String),
    #[error("path '{0}' is not in the Nix store")]
    NotInStore(String),
    #[error("cannot export references of path '{0}' because it is not in the input closure of the derivation")]
    NotInput(String),
    #[error("path '{0}' is not valid")]
    NotValid(String),
    #[error("{0}")]
    Store(String),
}

/// What the graphs need to know of a valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub ca: Option<ContentAddress>,
}

/// The store, as far as the graphs read it.
pub trait Metadata {
    /// The metadata of a path, `None` if it is not valid.
    fn meta(&mut self, path: &StorePath) -> Result<Option<Meta>, String>;
    /// The output paths of a derivation stored at `drv`.
    fn derivation_outputs(&mut self, drv: &StorePath) -> Result<Vec<StorePath>, String>;
}

/// The files and attributes a build gets from `exportReferencesGraph`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Graphs {
    /// Legacy: file name in the build directory → contents.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Structured: attribute name → path infos, for `.attrs.json`.
    pub attrs: BTreeMap<String, Value>,
}

/// Reads the derivation's `exportReferencesGraph` (from `env`, or from `structured` when the
/// derivation has structured attributes) and computes what the build gets. `inputs` is the
/// build's input closure.
pub fn graphs(
    dir: &StoreDir,
    env: &BTreeMap<String, String>,
    structured: Option<&Value>,
    inputs: &BTreeSet<StorePath>,
    store: &mut dyn Metadata,
) -> Result<Graphs, GraphError> {
    let mut out = Graphs::default();
    match structured {
        None => {
            let Some(s) = env.get("exportReferencesGraph") else { return Ok(out) };
            let tokens = crate::checks::tokens(s);
            if tokens.len() % 2 != 0 {
                return Err(GraphError::OddTokens(s.clone()));
            }
            for pair in tokens.chunks(2) {
                let (file, path) = (&pair[0], &pair[1]);
                if !is_file_name(file) {
                    return Err(GraphError::BadFileName(file.clone()));
                }
                // Like Nix's `isInStore`/`toStorePath`: a path inside a store path names it.
                let p = dir.parse_inner(path).map_err(|_| GraphError::NotStorePath(path.clone()))?.0;
                let closure = export_references(dir, &[p], inputs, store)?;
                out.files.insert(file.clone(), validity_registration(dir, &closure, store)?.into_bytes());
            }
        }
        Some(attrs) => {
            let Some(Value::Object(m)) = attrs.get("exportReferencesGraph") else { return Ok(out) };
            for (name, v) in m {
                let items: Vec<&Value> = match v {
                    Value::Array(a) => a.iter().collect(),
                    Value::Object(o) => o.values().collect(),
                    Value::Null => Vec::new(),
                    other => vec![other],
                };
                let mut paths = Vec::new();
                for i in items {
                    let s = i.as_str().ok_or_else(|| GraphError::NotInStore(crate::structured::dump(i)))?;
                    paths.push(dir.parse(s).map_err(|_| GraphError::NotInStore(s.to_owned()))?);
                }
                let closure = export_references(dir, &paths, inputs, store)?;
                out.attrs.insert(name.clone(), path_infos(dir, &closure, store)?);
            }
        }
    }
    Ok(out)
}

/// `[A-Za-z_][A-Za-z0-9_.-]*`: a plain file name in the build directory.
fn is_file_name(s: &str) -> bool {
    let mut cs = s.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Nix's `exportReferences`: the closure of `paths` (each in `inputs`), plus the closures of the
/// outputs of every derivation in it.
pub fn export_references(
    dir: &StoreDir,
    paths: &[StorePath],
    inputs: &BTreeSet<StorePath>,
    store: &mut dyn Metadata,
) -> Result<BTreeSet<StorePath>, GraphError> {
    let mut closure = BTreeSet::new();
    for p in paths {
        if !inputs.contains(p) {
            return Err(GraphError::NotInput(dir.display(p)));
        }
        close(dir, p, &mut closure, store)?;
    }
    let drvs: Vec<StorePath> = closure.iter().filter(|p| p.name().ends_with(".drv")).cloned().collect();
    for d in drvs {
        for o in store.derivation_outputs(&d).map_err(GraphError::Store)? {
            close(dir, &o, &mut closure, store)?;
        }
    }
    Ok(closure)
}

/// Adds the closure of `start` to `into`.
fn close(
    dir: &StoreDir,
    start: &StorePath,
    into: &mut BTreeSet<StorePath>,
    store: &mut dyn Metadata,
) -> Result<(), GraphError> {
    let mut stack = vec![start.clone()];
    while let Some(p) = stack.pop() {
        if into.contains(&p) {
            continue;
        }
        let m = meta(dir, &p, store)?;
        stack.extend(m.references.into_iter().filter(|r| !into.contains(r)));
        into.insert(p);
    }
    Ok(())
}

fn meta(dir: &StoreDir, p: &StorePath, store: &mut dyn Metadata) -> Result<Meta, GraphError> {
    store.meta(p).map_err(GraphError::Store)?.ok_or_else(|| GraphError::NotValid(dir.display(p)))
}

/// `makeValidityRegistration(paths, showDerivers = false, showHash = false)`.
pub fn validity_registration(
    dir: &StoreDir,
    paths: &BTreeSet<StorePath>,
    store: &mut dyn Metadata,
) -> Result<String, GraphError> {
    let mut s = String::new();
    for p in paths {
        let m = meta(dir, p, store)?;
        s.push_str(&dir.display(p));
        s.push_str("\n\n");
        s.push_str(&format!("{}\n", m.references.len()));
        for r in &m.references {
            s.push_str(&dir.display(r));
            s.push('\n');
        }
    }
    Ok(s)
}

/// `pathInfoToJSON(paths, includeImpureInfo = false, showClosureSize = true)`, as a value (its
/// key order is the one nlohmann prints after Nix parses it back: sorted).
pub fn path_infos(dir: &StoreDir, paths: &BTreeSet<StorePath>, store: &mut dyn Metadata) -> Result<Value, GraphError> {
    let mut list = Vec::new();
    for p in paths {
        let m = meta(dir, p, store)?;
        let mut own = BTreeSet::new();
        close(dir, p, &mut own, store)?;
        let mut closure_size = 0u64;
        for q in &own {
            closure_size = closure_size.saturating_add(meta(dir, q, store)?.nar_size);
        }
        let mut o = json!({
            "path": dir.display(p),
            "narHash": format!("{}:{}", m.nar_hash.algo(), m.nar_hash.encode(Encoding::Nix32)),
            "narSize": m.nar_size,
            "references": m.references.iter().map(|r| dir.display(r)).collect::<Vec<_>>(),
            "closureSize": closure_size,
        });
        if let Some(ca) = &m.ca {
            o["ca"] = Value::String(ca.to_string());
        }
        list.push(o);
    }
    Ok(Value::Array(list))
}

/// [`Metadata`] from a local store.
pub struct StoreMeta<'s> {
    store: &'s cairn_store::LocalStore,
    drvs: crate::derivations::Derivations<'s>,
}

impl<'s> StoreMeta<'s> {
    pub fn new(store: &'s cairn_store::LocalStore) -> Self {
        StoreMeta { store, drvs: crate::derivations::Derivations::new(store) }
    }
}

impl Metadata for StoreMeta<'_> {
    fn meta(&mut self, path: &StorePath) -> Result<Option<Meta>, String> {
        let info = self.store.path_info(path).map_err(|e| e.to_string())?;
        Ok(info.map(|i| Meta { nar_hash: i.nar_hash, nar_size: i.nar_size, references: i.references, ca: i.ca }))
    }

    fn derivation_outputs(&mut self, drv: &StorePath) -> Result<Vec<StorePath>, String> {
        Ok(self.drvs.outputs(drv).map_err(|e| e.to_string())?.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_nix::HashAlgo;

    struct Fake(BTreeMap<StorePath, Meta>, BTreeMap<StorePath, Vec<StorePath>>);

    impl Metadata for Fake {
        fn meta(&mut self, path: &StorePath) -> Result<Option<Meta>, String> {
            Ok(self.0.get(path).cloned())
        }
        fn derivation_outputs(&mut self, drv: &StorePath) -> Result<Vec<StorePath>, String> {
            Ok(self.1.get(drv).cloned().unwrap_or_default())
        }
    }

    fn sp(c: char, name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}", c.to_string().repeat(32))).unwrap()
    }

    fn dir() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    /// a → b → c, and d.drv whose output is e.
    fn fake() -> Fake {
        let m = |refs: &[StorePath], size| Meta {
            nar_hash: Hash::digest(HashAlgo::Sha256, b""),
            nar_size: size,
            references: refs.iter().cloned().collect(),
            ca: None,
        };
        Fake(
            BTreeMap::from([
                (sp('a', "a"), m(&[sp('b', "b"), sp('a', "a")], 1)),
                (sp('b', "b"), m(&[sp('c', "c")], 10)),
                (sp('c', "c"), m(&[], 100)),
                (sp('d', "d.drv"), m(&[], 1000)),
                (sp('f', "e"), m(&[], 10000)),
            ]),
            BTreeMap::from([(sp('d', "d.drv"), vec![sp('f', "e")])]),
        )
    }

    fn inputs() -> BTreeSet<StorePath> {
        [sp('a', "a"), sp('b', "b"), sp('c', "c"), sp('d', "d.drv"), sp('f', "e")].into()
    }

    #[test]
    fn legacy_file_is_a_validity_registration_without_derivers() {
        let env = BTreeMap::from([(
            "exportReferencesGraph".to_owned(),
            "g /nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b/bin/x".to_owned(),
        )]);
        let g = graphs(&dir(), &env, None, &inputs(), &mut fake()).unwrap();
        assert_eq!(
            String::from_utf8(g.files["g"].clone()).unwrap(),
            "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b\n\n1\n/nix/store/cccccccccccccccccccccccccccccccc-c\n\
             /nix/store/cccccccccccccccccccccccccccccccc-c\n\n0\n"
        );
    }

    #[test]
    fn derivations_bring_their_outputs() {
        let c = export_references(&dir(), &[sp('d', "d.drv")], &inputs(), &mut fake()).unwrap();
        assert_eq!(c, [sp('d', "d.drv"), sp('f', "e")].into());
    }

    #[test]
    fn only_input_paths_are_exported() {
        let env = BTreeMap::from([(
            "exportReferencesGraph".to_owned(),
            "g /nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a".to_owned(),
        )]);
        let only_b: BTreeSet<StorePath> = [sp('b', "b")].into();
        assert_eq!(
            graphs(&dir(), &env, None, &only_b, &mut fake()).unwrap_err().to_string(),
            "cannot export references of path '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a' because it is not in the \
             input closure of the derivation"
        );
    }

    #[test]
    fn malformed_legacy_values_are_refused_with_nixs_messages() {
        for (v, msg) in [
            ("g", "odd number of tokens in 'exportReferencesGraph': 'g'"),
            (
                "../g /nix/store/cccccccccccccccccccccccccccccccc-c",
                "invalid file name '../g' in 'exportReferencesGraph'",
            ),
            ("g /etc/passwd", "'exportReferencesGraph' contains a non-store path '/etc/passwd'"),
        ] {
            let env = BTreeMap::from([("exportReferencesGraph".to_owned(), v.to_owned())]);
            assert_eq!(graphs(&dir(), &env, None, &inputs(), &mut fake()).unwrap_err().to_string(), msg);
        }
    }

    #[test]
    fn structured_graph_is_path_infos_with_closure_sizes() {
        let attrs = json!({ "exportReferencesGraph": { "g": ["/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a"] } });
        let g = graphs(&dir(), &BTreeMap::new(), Some(&attrs), &inputs(), &mut fake()).unwrap();
        let v = &g.attrs["g"];
        let sizes: Vec<u64> = v.as_array().unwrap().iter().map(|i| i["closureSize"].as_u64().unwrap()).collect();
        assert_eq!(sizes, vec![111, 110, 100]);
        assert_eq!(
            v[0]["narHash"], "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            "nix32 with its algorithm"
        );
        assert!(v[0].get("ca").is_none());
    }
}
