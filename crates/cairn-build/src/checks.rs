//! Reference constraints on a build's outputs, as Nix 2.8's `LocalDerivationGoal::checkOutputs`
//! applies them.
//!
//! A derivation may limit what its outputs refer to: `allowedReferences`, `allowedRequisites`,
//! `disallowedReferences`, `disallowedRequisites` — each a list of store paths or names of the
//! derivation's own outputs (anything else is "an illegal reference specifier"). "References" are
//! the output's direct references as scanned; "requisites" its whole closure, walked through the
//! other outputs of the same build (not registered yet, so taken from the build) and through the
//! store for everything else. With `__structuredAttrs` the constraints live per output in
//! `outputChecks.<output>`, which may also bound the output's NAR size (`maxSize`) and its
//! closure's (`maxClosureSize`); the top-level attributes are then ignored, as in Nix.
//!
//! Nix's self-reference rule differs between the two forms, and cairn keeps the difference: in
//! the legacy form an output is never its own requisite (so `allowedRequisites = []` accepts a
//! self-reference), but it is its own reference (`allowedReferences = []` refuses one); in
//! `outputChecks` it is both.
//!
//! Everything here is pure: the caller hands in the collected outputs and a lookup of path
//! metadata, and calls [`check_outputs`] before anything of the build is added to the store, so
//! that a refused output is never registered. Outputs are checked in name order and the first
//! violation is the error, with Nix's text.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use cairn_nix::{StoreDir, StorePath};
use serde_json::Value;

/// Why a build's outputs were refused (or their constraints could not be read).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CheckError {
    /// Nix's message, word for word (multi-line: one offending path per line).
    #[error("output '{output}' is not allowed to refer to the following paths:{}", list(.paths))]
    NotAllowed { output: String, paths: Vec<String> },
    #[error("derivation contains an illegal reference specifier '{0}'")]
    IllegalSpecifier(String),
    #[error("path '{path}' is too large at {size} bytes; limit is {limit} bytes")]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("closure of path '{path}' is too large at {size} bytes; limit is {limit} bytes")]
    ClosureTooLarge { path: String, size: u64, limit: u64 },
    #[error("attribute '{attr}' of derivation '{drv}' must be a list of strings")]
    NotStrings { attr: String, drv: String },
    #[error("attribute '{attr}' of output '{output}' in 'outputChecks' must be a number")]
    NotNumber { attr: String, output: String },
    /// A requisite is neither an output of the build nor a valid path.
    #[error("cannot check the closure of '{output}': path '{path}' is not valid")]
    Unknown { output: String, path: String },
    #[error("cannot check the closure of '{output}': {message}")]
    Lookup { output: String, message: String },
    #[error(transparent)]
    Attrs(#[from] crate::structured::AttrsError),
}

fn list(paths: &[String]) -> String {
    paths.iter().map(|p| format!("\n  {p}")).collect()
}

/// One output as the build produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    pub path: StorePath,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
}

/// The constraints on one output (Nix's `Checks`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checks {
    /// Whether an output is left out of its own requisites (legacy attributes only).
    pub ignore_self_refs: bool,
    pub max_size: Option<u64>,
    pub max_closure_size: Option<u64>,
    pub allowed_references: Option<Vec<String>>,
    pub allowed_requisites: Option<Vec<String>>,
    pub disallowed_references: Option<Vec<String>>,
    pub disallowed_requisites: Option<Vec<String>>,
}

impl Checks {
    fn is_empty(&self) -> bool {
        self.max_size.is_none()
            && self.max_closure_size.is_none()
            && self.allowed_references.is_none()
            && self.allowed_requisites.is_none()
            && self.disallowed_references.is_none()
            && self.disallowed_requisites.is_none()
    }
}

/// A derivation's constraints: the same for every output (legacy attributes), or per output
/// (`outputChecks` of structured attributes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Constraints {
    Legacy(Checks),
    PerOutput(BTreeMap<String, Checks>),
}

/// The four reference attributes, in the order Nix applies them: (name, allowed?, recursive?).
const KINDS: [(&str, bool, bool); 4] = [
    ("allowedReferences", true, false),
    ("allowedRequisites", true, true),
    ("disallowedReferences", false, false),
    ("disallowedRequisites", false, true),
];

/// Nix's `tokenizeString` with its default separators.
pub fn tokens(s: &str) -> Vec<String> {
    s.split([' ', '\t', '\n', '\r']).filter(|t| !t.is_empty()).map(str::to_owned).collect()
}

impl Constraints {
    /// The constraints of a derivation: from its environment, or from its structured
    /// attributes (`structured`, the parsed `__json`) when it has them. `drv` is the
    /// derivation's path as error messages show it.
    pub fn of(env: &BTreeMap<String, String>, structured: Option<&Value>, drv: &str) -> Result<Self, CheckError> {
        let Some(attrs) = structured else {
            let mut c = Checks { ignore_self_refs: true, ..Checks::default() };
            let get = |name: &str| env.get(name).map(|v| tokens(v));
            c.allowed_references = get("allowedReferences");
            c.allowed_requisites = get("allowedRequisites");
            c.disallowed_references = get("disallowedReferences");
            c.disallowed_requisites = get("disallowedRequisites");
            return Ok(Constraints::Legacy(c));
        };
        let mut per = BTreeMap::new();
        // Like nlohmann's `find`, a non-object has no members: no checks.
        if let Some(Value::Object(outputs)) = attrs.get("outputChecks") {
            for (output, o) in outputs {
                let Value::Object(o) = o else {
                    per.insert(output.clone(), Checks::default());
                    continue;
                };
                let number = |attr: &str| -> Result<Option<u64>, CheckError> {
                    o.get(attr)
                        .map(|v| {
                            as_u64(v).ok_or_else(|| CheckError::NotNumber { attr: attr.into(), output: output.clone() })
                        })
                        .transpose()
                };
                let strings = |attr: &str| -> Result<Option<Vec<String>>, CheckError> {
                    o.get(attr).map(|v| strings_of(v, attr, drv)).transpose()
                };
                let c = Checks {
                    ignore_self_refs: false,
                    max_size: number("maxSize")?,
                    max_closure_size: number("maxClosureSize")?,
                    allowed_references: strings("allowedReferences")?,
                    allowed_requisites: strings("allowedRequisites")?,
                    disallowed_references: strings("disallowedReferences")?,
                    disallowed_requisites: strings("disallowedRequisites")?,
                };
                per.insert(output.clone(), c);
            }
        }
        Ok(Constraints::PerOutput(per))
    }

    /// Whether there is nothing to check (the common case: no closure walk, no lookups).
    pub fn is_empty(&self) -> bool {
        match self {
            Constraints::Legacy(c) => c.is_empty(),
            Constraints::PerOutput(m) => m.values().all(Checks::is_empty),
        }
    }

    fn for_output(&self, name: &str) -> Option<&Checks> {
        match self {
            Constraints::Legacy(c) => Some(c),
            Constraints::PerOutput(m) => m.get(name),
        }
    }
}

/// nlohmann's `get<uint64_t>()` of a number: negative integers wrap, floats truncate.
fn as_u64(v: &Value) -> Option<u64> {
    let Value::Number(n) = v else { return None };
    n.as_u64().or_else(|| n.as_i64().map(|i| i as u64)).or_else(|| n.as_f64().map(|f| f as u64))
}

/// The strings of a list attribute inside `outputChecks`. Iterating a JSON value as Nix does
/// (nlohmann): an array yields its elements, an object its values, `null` nothing, and any
/// other value itself.
fn strings_of(v: &Value, attr: &str, drv: &str) -> Result<Vec<String>, CheckError> {
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Object(o) => o.values().collect(),
        Value::Null => Vec::new(),
        other => vec![other],
    };
    items
        .into_iter()
        .map(|i| {
            i.as_str().map(str::to_owned).ok_or_else(|| CheckError::NotStrings { attr: attr.into(), drv: drv.into() })
        })
        .collect()
}

/// Size and references of a valid path that is not an output of this build; `Ok(None)` if it is
/// not valid.
pub type Lookup<'a> = dyn FnMut(&StorePath) -> Result<Option<(u64, BTreeSet<StorePath>)>, String> + 'a;

/// Checks every output against `constraints`; the first violation (outputs in name order, then
/// `maxSize`, `maxClosureSize`, and the four reference attributes in Nix's order) is the error.
pub fn check_outputs(
    dir: &StoreDir,
    outputs: &BTreeMap<String, Built>,
    constraints: &Constraints,
    lookup: &mut Lookup<'_>,
) -> Result<(), CheckError> {
    if constraints.is_empty() {
        return Ok(());
    }
    let by_path: BTreeMap<&StorePath, &Built> = outputs.values().map(|b| (&b.path, b)).collect();
    for (name, built) in outputs {
        let Some(checks) = constraints.for_output(name) else { continue };
        let shown = dir.display(&built.path);
        if let Some(limit) = checks.max_size {
            if built.nar_size > limit {
                return Err(CheckError::TooLarge { path: shown, size: built.nar_size, limit });
            }
        }
        // The closure is walked at most once per output, and only if a check needs it.
        let mut closure: Option<(BTreeSet<StorePath>, u64)> = None;
        let mut closure_of = |closure: &mut Option<(BTreeSet<StorePath>, u64)>| -> Result<(), CheckError> {
            if closure.is_none() {
                *closure = Some(walk(&built.path, &by_path, lookup).map_err(|e| e.for_output(&shown, dir))?);
            }
            Ok(())
        };
        if let Some(limit) = checks.max_closure_size {
            closure_of(&mut closure)?;
            let size = closure.as_ref().map_or(0, |c| c.1);
            if size > limit {
                return Err(CheckError::ClosureTooLarge { path: shown, size, limit });
            }
        }
        for (attr, allowed, recursive) in KINDS {
            let value = match attr {
                "allowedReferences" => &checks.allowed_references,
                "allowedRequisites" => &checks.allowed_requisites,
                "disallowedReferences" => &checks.disallowed_references,
                _ => &checks.disallowed_requisites,
            };
            let Some(value) = value else { continue };
            let spec = specifiers(dir, value, outputs)?;
            let mut used = if recursive {
                closure_of(&mut closure)?;
                closure.as_ref().map(|c| c.0.clone()).unwrap_or_default()
            } else {
                built.references.clone()
            };
            if recursive && checks.ignore_self_refs {
                used.remove(&built.path);
            }
            let bad: Vec<String> =
                used.iter().filter(|p| spec.contains(p) != allowed).map(|p| dir.display(p)).collect();
            if !bad.is_empty() {
                return Err(CheckError::NotAllowed { output: shown, paths: bad });
            }
        }
    }
    Ok(())
}

/// Parses reference specifiers: store paths, or names of this derivation's outputs.
fn specifiers(
    dir: &StoreDir,
    value: &[String],
    outputs: &BTreeMap<String, Built>,
) -> Result<BTreeSet<StorePath>, CheckError> {
    value
        .iter()
        .map(|s| match dir.parse(s) {
            Ok(p) => Ok(p),
            Err(_) => match outputs.get(s) {
                Some(b) => Ok(b.path.clone()),
                None => Err(CheckError::IllegalSpecifier(s.clone())),
            },
        })
        .collect()
}

enum WalkError {
    Unknown(StorePath),
    Lookup(String),
}

impl WalkError {
    fn for_output(self, output: &str, dir: &StoreDir) -> CheckError {
        match self {
            WalkError::Unknown(p) => CheckError::Unknown { output: output.into(), path: dir.display(&p) },
            WalkError::Lookup(message) => CheckError::Lookup { output: output.into(), message },
        }
    }
}

/// The closure of `start` (itself included) and the sum of its NAR sizes, as Nix's `getClosure`:
/// outputs of this build are taken from the build, everything else from the store.
fn walk(
    start: &StorePath,
    outputs: &BTreeMap<&StorePath, &Built>,
    lookup: &mut Lookup<'_>,
) -> Result<(BTreeSet<StorePath>, u64), WalkError> {
    let mut done = BTreeSet::new();
    let mut size = 0u64;
    let mut left = VecDeque::from([start.clone()]);
    while let Some(p) = left.pop_front() {
        if done.contains(&p) {
            continue;
        }
        match outputs.get(&p) {
            Some(b) => {
                size = size.saturating_add(b.nar_size);
                left.extend(b.references.iter().cloned());
            }
            None => {
                let (s, refs) = lookup(&p).map_err(WalkError::Lookup)?.ok_or_else(|| WalkError::Unknown(p.clone()))?;
                size = size.saturating_add(s);
                left.extend(refs);
            }
        }
        done.insert(p);
    }
    Ok((done, size))
}

/// The daemon's side: checks the outputs `collected` (in the order of `outputs`) of a build of
/// `drv` against its constraints, looking requisites up in `store`. `shown` is the derivation's
/// path as messages print it.
pub fn check_built<'c>(
    store: &cairn_store::LocalStore,
    drv: &cairn_nix::derivation::Derivation,
    collected: impl Iterator<Item = (&'c String, &'c crate::outputs::Collected)>,
    shown: &str,
) -> Result<(), CheckError> {
    let structured = crate::structured::parse(&drv.env, shown)?;
    let constraints = Constraints::of(&drv.env, structured.as_ref(), shown)?;
    if constraints.is_empty() {
        return Ok(());
    }
    let built: BTreeMap<String, Built> = collected
        .map(|(name, c)| {
            (name.clone(), Built { path: c.path.clone(), nar_size: c.nar_size, references: c.references.clone() })
        })
        .collect();
    let mut lookup =
        |p: &StorePath| store.path_info(p).map(|i| i.map(|i| (i.nar_size, i.references))).map_err(|e| e.to_string());
    check_outputs(store.store_dir(), &built, &constraints, &mut lookup)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dir() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    fn sp(c: char, name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}", c.to_string().repeat(32))).unwrap()
    }

    fn built(p: &StorePath, size: u64, refs: &[&StorePath]) -> Built {
        Built { path: p.clone(), nar_size: size, references: refs.iter().map(|r| (*r).clone()).collect() }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    /// A store with `lib` (100 bytes) → `libc` (1000 bytes).
    fn store() -> impl FnMut(&StorePath) -> Result<Option<(u64, BTreeSet<StorePath>)>, String> {
        move |p: &StorePath| {
            Ok(if *p == sp('1', "lib") {
                Some((100, BTreeSet::from([sp('2', "libc")])))
            } else if *p == sp('2', "libc") {
                Some((1000, BTreeSet::new()))
            } else {
                None
            })
        }
    }

    fn run(outputs: &BTreeMap<String, Built>, c: &Constraints) -> Result<(), CheckError> {
        check_outputs(&dir(), outputs, c, &mut store())
    }

    fn legacy(pairs: &[(&str, &str)]) -> Constraints {
        Constraints::of(&env(pairs), None, "/nix/store/x.drv").unwrap()
    }

    #[test]
    fn disallowed_reference_names_the_output_and_the_paths_in_nix_words() {
        let out = sp('a', "out");
        let outputs = BTreeMap::from([("out".to_owned(), built(&out, 10, &[&sp('1', "lib")]))]);
        let err =
            run(&outputs, &legacy(&[("disallowedReferences", "/nix/store/11111111111111111111111111111111-lib")]))
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "output '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-out' is not allowed to refer to the following paths:\n  \
             /nix/store/11111111111111111111111111111111-lib"
        );
    }

    #[test]
    fn requisites_reach_through_the_store_and_references_do_not() {
        let out = sp('a', "out");
        let outputs = BTreeMap::from([("out".to_owned(), built(&out, 10, &[&sp('1', "lib")]))]);
        let libc = "/nix/store/22222222222222222222222222222222-libc";
        assert_eq!(run(&outputs, &legacy(&[("disallowedReferences", libc)])), Ok(()));
        let err = run(&outputs, &legacy(&[("disallowedRequisites", libc)])).unwrap_err();
        assert!(matches!(err, CheckError::NotAllowed { ref paths, .. } if paths == &[libc.to_owned()]), "{err}");
        let lib = "/nix/store/11111111111111111111111111111111-lib";
        let err = run(&outputs, &legacy(&[("allowedRequisites", lib)])).unwrap_err();
        assert!(matches!(err, CheckError::NotAllowed { ref paths, .. } if paths == &[libc.to_owned()]), "{err}");
        assert_eq!(run(&outputs, &legacy(&[("allowedRequisites", &format!("{lib} {libc}"))])), Ok(()));
    }

    #[test]
    fn legacy_self_reference_is_a_reference_but_not_a_requisite() {
        let out = sp('a', "out");
        let outputs = BTreeMap::from([("out".to_owned(), built(&out, 10, &[&out]))]);
        assert_eq!(run(&outputs, &legacy(&[("allowedRequisites", "")])), Ok(()));
        assert!(run(&outputs, &legacy(&[("allowedReferences", "")])).is_err());
        assert_eq!(run(&outputs, &legacy(&[("allowedReferences", "out")])), Ok(()));
    }

    #[test]
    fn structured_self_reference_is_also_a_requisite() {
        let out = sp('a', "out");
        let outputs = BTreeMap::from([("out".to_owned(), built(&out, 10, &[&out]))]);
        let json = serde_json::json!({ "outputChecks": { "out": { "allowedRequisites": [] } } });
        let c = Constraints::of(&BTreeMap::new(), Some(&json), "d").unwrap();
        assert!(run(&outputs, &c).is_err());
    }

    #[test]
    fn structured_attrs_ignore_top_level_constraints() {
        let out = sp('a', "out");
        let outputs = BTreeMap::from([("out".to_owned(), built(&out, 10, &[&sp('1', "lib")]))]);
        let json = serde_json::json!({ "allowedReferences": [] });
        let c = Constraints::of(&env(&[("allowedReferences", "")]), Some(&json), "d").unwrap();
        assert_eq!(run(&outputs, &c), Ok(()));
    }

    #[test]
    fn requisites_go_through_sibling_outputs_of_the_same_build() {
        let (out, dev) = (sp('a', "x"), sp('b', "x-dev"));
        let outputs = BTreeMap::from([
            ("dev".to_owned(), built(&dev, 10, &[&out])),
            ("out".to_owned(), built(&out, 10, &[&sp('1', "lib")])),
        ]);
        let lib = "/nix/store/11111111111111111111111111111111-lib";
        let err = run(&outputs, &legacy(&[("disallowedRequisites", lib)])).unwrap_err();
        // dev comes first in name order and reaches lib through out.
        assert!(matches!(err, CheckError::NotAllowed { ref output, .. } if output.ends_with("-x-dev")), "{err}");
        assert_eq!(run(&outputs, &legacy(&[("allowedReferences", &format!("out {lib}"))])), Ok(()));
        let err = run(&outputs, &legacy(&[("disallowedReferences", lib)])).unwrap_err();
        assert!(matches!(err, CheckError::NotAllowed { ref output, .. } if output.ends_with("-x")), "{err}");
    }

    #[test]
    fn an_unknown_specifier_is_illegal() {
        let out = sp('a', "out");
        let outputs = BTreeMap::from([("out".to_owned(), built(&out, 10, &[]))]);
        assert_eq!(
            run(&outputs, &legacy(&[("allowedReferences", "dev")])).unwrap_err().to_string(),
            "derivation contains an illegal reference specifier 'dev'"
        );
    }

    #[test]
    fn output_checks_bound_size_and_closure_size() {
        let out = sp('a', "out");
        let outputs = BTreeMap::from([("out".to_owned(), built(&out, 10, &[&sp('1', "lib")]))]);
        let c = |checks: Value| {
            Constraints::of(&BTreeMap::new(), Some(&serde_json::json!({ "outputChecks": { "out": checks } })), "d")
                .unwrap()
        };
        assert_eq!(
            run(&outputs, &c(serde_json::json!({ "maxSize": 9 }))).unwrap_err().to_string(),
            "path '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-out' is too large at 10 bytes; limit is 9 bytes"
        );
        assert_eq!(run(&outputs, &c(serde_json::json!({ "maxSize": 10, "maxClosureSize": 1110 }))), Ok(()));
        assert_eq!(
            run(&outputs, &c(serde_json::json!({ "maxClosureSize": 1109 }))).unwrap_err().to_string(),
            "closure of path '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-out' is too large at 1110 bytes; limit is 1109 bytes"
        );
        // Other outputs' checks do not apply.
        assert_eq!(run(&outputs, &c(serde_json::json!({}))), Ok(()));
        assert!(matches!(
            Constraints::of(
                &BTreeMap::new(),
                Some(&serde_json::json!({ "outputChecks": { "out": { "allowedReferences": [1] } } })),
                "d"
            ),
            Err(CheckError::NotStrings { .. })
        ));
    }

    proptest! {
        /// Against a model: with a random graph of outputs and store paths, each check refuses
        /// exactly the paths the rule names.
        #[test]
        fn verdicts_follow_nix_rules(
            edges in proptest::collection::vec((0usize..5, 0usize..5), 0..12),
            spec in proptest::collection::btree_set(0usize..5, 0..5),
            kind in 0usize..4,
            structured in any::<bool>(),
        ) {
            // Nodes 0 and 1 are outputs of the build; 2..5 are store paths.
            let nodes: Vec<StorePath> = (0..5).map(|i| sp(char::from(b'0' + i as u8), &format!("n{i}"))).collect();
            let mut refs: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); 5];
            for (a, b) in edges {
                // Store paths only refer to store paths (they were valid before the build).
                if a < 2 || b >= 2 { refs[a].insert(b); }
            }
            let outputs: BTreeMap<String, Built> = (0..2).map(|i| (format!("o{i}"), Built {
                path: nodes[i].clone(), nar_size: 1, references: refs[i].iter().map(|j| nodes[*j].clone()).collect(),
            })).collect();
            let (attr, allowed, recursive) = KINDS[kind];
            let spec_strs: Vec<String> = spec.iter().map(|i| dir().display(&nodes[*i])).collect();
            let c = if structured {
                let json = serde_json::json!({ "outputChecks": { "o0": { attr: spec_strs }, "o1": { attr: spec_strs } } });
                Constraints::of(&BTreeMap::new(), Some(&json), "d").unwrap()
            } else {
                Constraints::of(&env(&[(attr, &spec_strs.join(" "))]), None, "d").unwrap()
            };
            let (nodes2, refs2) = (nodes.clone(), refs.clone());
            let mut lookup = move |p: &StorePath| Ok(nodes2.iter().position(|n| n == p).map(|i| (1, refs2[i].iter().map(|j| nodes2[*j].clone()).collect())));
            let got = check_outputs(&dir(), &outputs, &c, &mut lookup);
            // The model.
            let mut expected = Ok(());
            for i in 0..2 {
                let mut used: BTreeSet<usize> = if recursive {
                    let mut seen = BTreeSet::from([i]);
                    let mut stack = vec![i];
                    while let Some(n) = stack.pop() { for r in &refs[n] { if seen.insert(*r) { stack.push(*r); } } }
                    seen
                } else { refs[i].clone() };
                if recursive && !structured { used.remove(&i); }
                let bad: Vec<String> = used.iter().filter(|u| spec.contains(u) != allowed).map(|u| dir().display(&nodes[*u])).collect();
                if !bad.is_empty() {
                    expected = Err(CheckError::NotAllowed { output: dir().display(&nodes[i]), paths: bad });
                    break;
                }
            }
            prop_assert_eq!(got, expected);
        }
    }
}
