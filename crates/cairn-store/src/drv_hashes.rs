//! `hashDerivationModulo` of the store's derivations, memoised, so that a derivation's
//! input-addressed output paths are checked when it is registered, as Nix 2.8 checks them
//! (`checkDerivationOutputs`).
//!
//! A `.drv` names its own output paths, and only their computation stops it from claiming
//! another derivation's output: a derivation whose builder is the attacker's, at the path of a
//! trusted package not yet built here. The builder recomputes the paths before it builds
//! (`cairn-build`'s `Derivations`, which asks this module for its inputs' hashes too); refusing
//! the `.drv` at registration also keeps the lie out of the store, where Nix keeps it out.
//!
//! An input-addressed output's path hashes the derivation with each input derivation replaced
//! by that input's own modulo hash, recursively. The hashes are computed inputs first without
//! recursion and kept by path, so registering a derivation whose inputs were registered before
//! (what `nix-instantiate` does, one `.drv` at a time) reads and hashes that derivation alone.

use std::collections::HashMap;
use std::sync::Mutex;

use cairn_nix::derivation::{Derivation, DerivationError, OutputHashes};
use cairn_nix::StorePath;

use crate::{LocalStore, Result, StoreError};

/// How many derivations' hashes are kept; past it the memo starts again (a hash is cheap to
/// compute again, memory held for ever is not).
const MAX_KEPT: usize = 200_000;

/// The memo: unmasked modulo hashes by derivation path.
#[derive(Default)]
pub(crate) struct DrvHashes {
    kept: Mutex<HashMap<StorePath, OutputHashes>>,
}

impl DrvHashes {
    fn get(&self, p: &StorePath) -> Option<OutputHashes> {
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(p).cloned()
    }

    fn put(&self, computed: HashMap<StorePath, OutputHashes>) {
        let mut kept = self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() + computed.len() > MAX_KEPT {
            kept.clear();
        }
        kept.extend(computed);
    }
}

impl LocalStore {
    /// Reads and parses the derivation at `path` in place (valid, or being registered).
    fn read_derivation(&self, path: &StorePath) -> Result<Derivation> {
        let shown = self.store_dir().display(path);
        let bytes = std::fs::read(self.real_path(path)).map_err(|e| {
            StoreError::BadDerivation(match e.kind() {
                std::io::ErrorKind::NotFound => format!(
                    "derivation '{shown}' is not in this store (add the derivations it needs first: \
                     `cairn derivation add` or `cairn import`)"
                ),
                _ => format!("cannot read derivation '{shown}': {e}"),
            })
        })?;
        Derivation::parse(&bytes)
            .map_err(|e| StoreError::BadDerivation(format!("error parsing derivation '{shown}': {e}")))
    }

    /// `hashDerivationModulo(drv, maskOutputs = false)` of the derivation at `path`: the hash
    /// it contributes to the derivations that use it. Its input derivations must be in place.
    pub fn derivation_hash_modulo(&self, path: &StorePath) -> Result<OutputHashes> {
        let mut computed: HashMap<StorePath, OutputHashes> = HashMap::new();
        let h = self.modulo_with(path, None, &mut computed)?;
        self.drv_hashes.put(computed);
        Ok(h)
    }

    /// The modulo hash of `path` (masked if `drv`, the derivation at `path`, is given, as for
    /// its own output paths), computing its inputs' into `computed` first.
    fn modulo_with(
        &self,
        path: &StorePath,
        top: Option<&Derivation>,
        computed: &mut HashMap<StorePath, OutputHashes>,
    ) -> Result<OutputHashes> {
        let known = |p: &StorePath, computed: &HashMap<StorePath, OutputHashes>| {
            computed.get(p).cloned().or_else(|| self.drv_hashes.get(p))
        };
        let parse_input = |s: &str| {
            self.store_dir().parse(s).map_err(|e| StoreError::BadDerivation(format!("input derivation '{s}': {e}")))
        };
        // Post-order without recursion: a chain of thousands of derivations is fine.
        let mut parsed: HashMap<StorePath, Derivation> = HashMap::new();
        let mut stack: Vec<(StorePath, bool)> = match top {
            Some(drv) => drv.input_drvs.keys().map(|i| Ok((parse_input(i)?, false))).collect::<Result<_>>()?,
            None => vec![(path.clone(), false)],
        };
        while let Some((p, inputs_done)) = stack.pop() {
            if known(&p, computed).is_some() {
                continue;
            }
            if !parsed.contains_key(&p) {
                let d = self.read_derivation(&p)?;
                parsed.insert(p.clone(), d);
            }
            let drv = &parsed[&p];
            let fixed = drv.fixed_output().map_err(|e| self.drv_error(&p, e))?.is_some();
            // A fixed output's hash is its declared hash: its inputs play no part.
            if !inputs_done && !fixed {
                let inputs: Vec<StorePath> = drv.input_drvs.keys().map(|i| parse_input(i)).collect::<Result<_>>()?;
                stack.push((p, true));
                stack.extend(inputs.into_iter().filter(|i| known(i, computed).is_none()).map(|i| (i, false)));
                continue;
            }
            let h = self.hash_given(&p, drv, false, computed)?;
            parsed.remove(&p);
            computed.insert(p, h);
        }
        match top {
            Some(drv) => self.hash_given(path, drv, true, computed),
            None => known(path, computed).ok_or_else(|| StoreError::BadDerivation(format!("no hash for '{path}'"))),
        }
    }

    /// `drv`'s modulo hash, its inputs' taken from `computed` or the memo.
    fn hash_given(
        &self,
        path: &StorePath,
        drv: &Derivation,
        mask: bool,
        computed: &HashMap<StorePath, OutputHashes>,
    ) -> Result<OutputHashes> {
        let dir = self.store_dir();
        drv.hash_modulo::<DerivationError>(mask, &mut |p: &str| {
            let sp = dir.parse(p).map_err(DerivationError::from)?;
            computed
                .get(&sp)
                .cloned()
                .or_else(|| self.drv_hashes.get(&sp))
                .ok_or_else(|| DerivationError::MissingInputOutput(p.to_owned(), String::new()))
        })
        .map_err(|e| self.drv_error(path, e))
    }

    fn drv_error(&self, path: &StorePath, e: DerivationError) -> StoreError {
        StoreError::BadDerivation(format!("error parsing derivation '{}': {e}", self.store_dir().display(path)))
    }

    /// The path each input-addressed output of `drv` (at `path`, named `name` without `.drv`)
    /// must have: Nix's `makeOutputPath` of its masked modulo hash.
    pub(crate) fn input_addressed_outputs(
        &self,
        path: &StorePath,
        drv: &Derivation,
        name: &str,
    ) -> Result<Vec<(String, StorePath)>> {
        let mut computed = HashMap::new();
        let hashes = self.modulo_with(path, Some(drv), &mut computed)?;
        self.drv_hashes.put(computed);
        hashes
            .iter()
            .map(|(o, h)| {
                let p = self.store_dir().make_output_path(o, h, name).map_err(|e| self.drv_error(path, e.into()))?;
                Ok((o.clone(), p))
            })
            .collect()
    }
}
