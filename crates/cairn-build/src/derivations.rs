//! Derivations read from the store, with their output paths checked.
//!
//! A `.drv` names its own output paths, and nothing but their computation stops a derivation
//! from claiming someone else's path. So before a derivation is built (or its outputs reported)
//! its output paths are recomputed — `hashDerivationModulo` over its input derivations, or the
//! fixed hash — and a mismatch refuses it, as Nix refuses such a `.drv` when it is registered.
//! Hashes of input derivations come from the store ([`LocalStore::derivation_hash_modulo`]),
//! which computes them inputs first without recursion and keeps them: a closure of many
//! derivations sharing inputs costs one parse and one hash per derivation.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use cairn_nix::derivation::{Derivation, DerivationError, OutputHashes};
use cairn_nix::StorePath;
use cairn_store::LocalStore;

use crate::BuildError;

/// Of a derivation's `outputs`, the paths of those wanted (`None`: all) that are not valid: what
/// Nix's goals substitute or build. A path whose validity cannot be read counts as valid.
pub fn missing_wanted<'o>(
    store: &LocalStore,
    outputs: &'o BTreeMap<String, StorePath>,
    wanted: Option<&BTreeSet<String>>,
) -> Vec<&'o StorePath> {
    outputs
        .iter()
        .filter(|(name, p)| wanted.is_none_or(|w| w.contains(*name)) && !store.is_valid(p).unwrap_or(true))
        .map(|(_, p)| p)
        .collect()
}

/// Parsed derivations and their `hashDerivationModulo`, loaded on demand.
pub struct Derivations<'s> {
    store: &'s LocalStore,
    parsed: HashMap<StorePath, Arc<Derivation>>,
    modulo: HashMap<StorePath, OutputHashes>,
    checked: HashMap<StorePath, BTreeMap<String, StorePath>>,
}

impl<'s> Derivations<'s> {
    pub fn new(store: &'s LocalStore) -> Self {
        Derivations { store, parsed: HashMap::new(), modulo: HashMap::new(), checked: HashMap::new() }
    }

    fn display(&self, p: &StorePath) -> String {
        self.store.store_dir().display(p)
    }

    /// A derivation of the store (it must be valid).
    pub fn load(&mut self, path: &StorePath) -> Result<Arc<Derivation>, BuildError> {
        if let Some(d) = self.parsed.get(path) {
            return Ok(d.clone());
        }
        if !path.name().ends_with(".drv") {
            return Err(BuildError::NotDerivation(self.display(path)));
        }
        let _root = self.store.temp_root([path.clone()]);
        if !self.store.is_valid(path)? {
            return Err(BuildError::NotValid(self.display(path)));
        }
        let real = self.store.real_path(path);
        let bytes = std::fs::read(&real).map_err(|source| BuildError::Io {
            op: "read derivation",
            path: self.display(path),
            source,
        })?;
        let drv = Derivation::parse(&bytes)
            .map_err(|source| BuildError::BadDerivation { path: self.display(path), source })?;
        let drv = Arc::new(drv);
        self.parsed.insert(path.clone(), drv.clone());
        Ok(drv)
    }

    /// Takes `drv` as the derivation at `path` with the outputs it declares, unchecked: a
    /// derivation a trusted client sent (Nix's `BuildDerivation`), which need not be in the
    /// store and whose input derivations may be missing.
    pub fn give(&mut self, path: &StorePath, drv: Arc<Derivation>) -> Result<(), BuildError> {
        let mut outputs = BTreeMap::new();
        for (name, out) in &drv.outputs {
            let p = self.store.store_dir().parse(&out.path).map_err(|e| BuildError::BadDerivation {
                path: self.display(path),
                source: DerivationError::from(e),
            })?;
            outputs.insert(name.clone(), p);
        }
        self.parsed.insert(path.clone(), drv);
        self.checked.insert(path.clone(), outputs);
        Ok(())
    }

    fn parse_input(&self, s: &str) -> Result<StorePath, BuildError> {
        self.store
            .store_dir()
            .parse(s)
            .map_err(|e| BuildError::BadDerivation { path: s.to_owned(), source: DerivationError::from(e) })
    }

    /// `hashDerivationModulo(drv, maskOutputs = false)`, the hash inputs contribute to their
    /// dependents: the store's, which keeps them.
    fn modulo(&mut self, path: &StorePath) -> Result<OutputHashes, BuildError> {
        if let Some(h) = self.modulo.get(path) {
            return Ok(h.clone());
        }
        let h = self.store.derivation_hash_modulo(path)?;
        self.modulo.insert(path.clone(), h.clone());
        Ok(h)
    }

    fn hash_with_memo(&mut self, drv: &Derivation, mask: bool) -> Result<OutputHashes, BuildError> {
        let dir = self.store.store_dir().clone();
        let memo = &self.modulo;
        drv.hash_modulo::<BuildError>(mask, &mut |p: &str| {
            let sp = dir.parse(p).map_err(DerivationError::from)?;
            memo.get(&sp)
                .cloned()
                .ok_or_else(|| DerivationError::MissingInputOutput(p.to_owned(), String::new()).into())
        })
    }

    /// `staticOutputHashes`: the masked hash modulo of each output, which names a built
    /// output (`sha256:<hex>!out`) in the build results Nix's daemon protocol carries.
    pub fn static_output_hashes(&mut self, path: &StorePath) -> Result<OutputHashes, BuildError> {
        let drv = self.load(path)?;
        if drv.fixed_output()?.is_none() {
            for input in drv.input_drvs.keys() {
                let ip = self.parse_input(input)?;
                self.modulo(&ip)?;
            }
        }
        self.hash_with_memo(&drv, true)
    }

    /// The output paths `drv`, named `name`, has by its hash (its input derivations' hashes
    /// computed first).
    fn computed_outputs(&mut self, drv: &Derivation, name: &str) -> Result<BTreeMap<String, StorePath>, BuildError> {
        // A fixed output's path is its hash and name: its input derivations are not even read,
        // so an output already valid is found without touching them (as Nix finds it).
        let fixed = drv.fixed_output()?.is_some();
        for input in drv.input_drvs.keys().filter(|_| !fixed) {
            let ip = self.parse_input(input)?;
            self.modulo(&ip)?;
        }
        let dir = self.store.store_dir().clone();
        let memo = &self.modulo;
        drv.output_paths::<BuildError>(&dir, name, &mut |p: &str| {
            let sp = dir.parse(p).map_err(DerivationError::from)?;
            memo.get(&sp)
                .cloned()
                .ok_or_else(|| DerivationError::MissingInputOutput(p.to_owned(), String::new()).into())
        })
    }

    /// The derivation's output paths, recomputed and compared with what it declares.
    pub fn outputs(&mut self, path: &StorePath) -> Result<BTreeMap<String, StorePath>, BuildError> {
        if let Some(o) = self.checked.get(path) {
            return Ok(o.clone());
        }
        let drv = self.load(path)?;
        // Floating content-addressed and impure outputs have no path until built.
        if drv.outputs.values().any(|o| o.path.is_empty() || (!o.hash_algo.is_empty() && o.hash.is_empty())) {
            return Err(BuildError::ContentAddressed(self.display(path)));
        }
        let name = path.name().strip_suffix(".drv").unwrap_or(path.name());
        let computed = self.computed_outputs(&drv, name)?;
        let dir = self.store.store_dir().clone();
        for (name, out) in &drv.outputs {
            let want = computed.get(name).map(|p| dir.display(p)).unwrap_or_default();
            if out.path != want {
                return Err(BuildError::WrongOutputPath {
                    drv: self.display(path),
                    output: name.clone(),
                    declared: out.path.clone(),
                    computed: want,
                });
            }
        }
        self.checked.insert(path.clone(), computed.clone());
        Ok(computed)
    }

    /// Fills in the output paths a new derivation leaves empty (and the environment variables
    /// named after its outputs, when empty), as Nix does when it writes a derivation, and checks
    /// the ones it gives. Its input derivations must be valid.
    pub fn complete(&mut self, drv: &mut Derivation) -> Result<(), BuildError> {
        let name = drv.name()?.into_owned();
        // Every output is named in the environment (as `derivation` does), before hashing: the
        // hash covers the (masked) variables.
        for out in drv.outputs.keys() {
            drv.env.entry(out.clone()).or_default();
        }
        let computed = self.computed_outputs(drv, &name)?;
        let dir = self.store.store_dir().clone();
        for (out, o) in drv.outputs.iter_mut() {
            let want = computed.get(out).map(|p| dir.display(p)).unwrap_or_default();
            if o.path.is_empty() {
                o.path = want.clone();
            } else if o.path != want {
                return Err(BuildError::WrongOutputPath {
                    drv: format!("{name}.drv"),
                    output: out.clone(),
                    declared: o.path.clone(),
                    computed: want,
                });
            }
            let v = drv.env.get_mut(out).expect("inserted above");
            if v.is_empty() {
                *v = want;
            }
        }
        Ok(())
    }

    /// The input derivations of `drv` with the outputs it needs of each.
    pub fn inputs(&mut self, drv: &Derivation) -> Result<Vec<(StorePath, Vec<String>)>, BuildError> {
        drv.input_drvs.iter().map(|(p, outs)| Ok((self.parse_input(p)?, outs.iter().cloned().collect()))).collect()
    }
}
