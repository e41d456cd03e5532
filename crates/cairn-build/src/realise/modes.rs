//! Check and repair: the two build modes besides the ordinary one, and how failures are kinded.
//!
//! Nix 2.8 realises derivations in one of three modes (`BuildMode`): normal (build what is not
//! valid), check (`--check`: build again what is valid and compare) and repair (`--repair`:
//! build again what is valid but whose contents no longer match the database, and put the good
//! copy in place). The rules followed here are those of `DerivationGoal` and
//! `LocalDerivationGoal::registerOutputs` in Nix 2.8:
//!
//! - **check** applies to the requested derivations only; their input derivations are realised
//!   normally. A requested derivation whose wanted outputs are not all valid cannot be checked
//!   ("some outputs of '…' are not valid, so checking is not possible", and the whole request
//!   fails). The rebuilt outputs are compared by NAR hash with the registered ones; the first that
//!   differs fails the build as "may not be deterministic", and with `--keep-failed` the new
//!   output is kept beside the old one as `<output>.check`. Nothing is registered: reference
//!   constraints are not applied (Nix returns before `checkOutputs` in this mode).
//! - **repair** applies to the requested derivations and, for those that must be rebuilt, to
//!   their input derivations, recursively. A derivation is rebuilt when one of its outputs is
//!   invalid, missing on disk or no longer hashes to its registered NAR hash. A derivation whose
//!   outputs are good has the rest of its outputs' closure checked instead; a bad path there is
//!   repaired by rebuilding its deriver, found among the derivation's own input closure (Nix's
//!   `repairClosure`). A rebuilt output that was valid replaces the broken contents through the
//!   store's repair batch, which insists on the registered NAR hash: a build that is not
//!   deterministic therefore cannot repair its output. Nix would swap in the new contents and
//!   re-register the new hash; cairn never changes what it vouched for about a valid path
//!   (signatures, caches and exports of it), so it reports the difference instead.
//!
//! Failures carry a [`FailureKind`] so that the client can exit as `nix-store --realise` does
//! (`Worker::exitStatus`): 100 for a failed build, 101 for a timeout, 102 for a fixed-output
//! hash mismatch, 104 for a check that found a difference (bits combined, `0x60 | mask`), 1 for
//! anything else.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use cairn_nix::hash::HashingWriter;
use cairn_nix::{HashAlgo, StorePath};
use cairn_store::LocalStore;

/// How a request treats derivations whose outputs are valid (Nix's `BuildMode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// Build what is not valid.
    #[default]
    Normal,
    /// Build the requested derivations again and compare their outputs with the registered ones.
    Check,
    /// Build again whatever is invalid or corrupt among the requested derivations' outputs and
    /// their closure, and put the good copies in place.
    Repair,
}

/// What kind of failure ended a build, as Nix's `BuildResult::Status` decides its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The builder failed, or the build could not start on this machine (`PermanentFailure`,
    /// and `InputRejected`, which sets the same flag).
    Permanent,
    /// `timeout` or `max-silent-time`.
    TimedOut,
    /// A fixed output's contents do not have the declared hash.
    HashMismatch,
    /// `--check` found an output that differs from the registered one.
    NotDeterministic,
    /// Killed for writing more log than `max-build-log-size` (Nix's `LogLimitExceeded`, which
    /// sets none of the exit status's bits).
    LogLimit,
    /// Anything else: refused outputs, fixed-output builders that failed (Nix counts those as
    /// transient), failures of the daemon itself.
    Other,
}

/// A build that failed: its kind and the message to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure { kind, message: message.into() }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure { kind: FailureKind::Other, message }
    }
}

/// Why a build did not finish: it failed, or the request stopped it (another build failed and
/// the request does not keep going).
#[derive(Debug)]
pub(super) enum Stop {
    Failed(Failure),
    Cancelled,
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Stop {
        Stop::Failed(f)
    }
}

impl From<String> for Stop {
    fn from(m: String) -> Stop {
        Stop::Failed(m.into())
    }
}

/// What one scheduled derivation is built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum NodeMode {
    /// Some output is not valid: build and register the missing ones.
    Build,
    /// Build again and compare with the registered outputs; register nothing.
    Check,
    /// Build again; `corrupt` are the valid outputs whose contents are bad, swapped for the new
    /// ones, and the invalid outputs are registered as in a normal build.
    Repair { corrupt: BTreeSet<StorePath> },
}

/// Whether valid paths' contents still hash to their registered NAR hash, remembered per path
/// (Nix's `Worker::pathContentsGood`). A path missing on disk is not good; neither is one that
/// is not valid.
pub(super) struct ContentsCheck<'a> {
    store: &'a LocalStore,
    known: HashMap<StorePath, bool>,
}

impl<'a> ContentsCheck<'a> {
    pub(super) fn new(store: &'a LocalStore) -> ContentsCheck<'a> {
        ContentsCheck { store, known: HashMap::new() }
    }

    pub(super) fn good(&mut self, path: &StorePath) -> cairn_store::Result<bool> {
        if let Some(g) = self.known.get(path) {
            return Ok(*g);
        }
        let good = match self.store.path_info(path)? {
            None => false,
            Some(info) => {
                let mut w = HashingWriter::new(std::io::sink(), HashAlgo::Sha256);
                match self.store.dump_path(path, &mut w) {
                    Ok(()) => {
                        let (hash, size, _) = w.finish();
                        hash == info.nar_hash && size == info.nar_size
                    }
                    Err(e) => {
                        tracing::info!(path = %self.store.store_dir().display(path), "cannot read a valid path: {e}");
                        false
                    }
                }
            }
        };
        if !good {
            tracing::warn!(path = %self.store.store_dir().display(path), "corrupted or missing");
        }
        self.known.insert(path.clone(), good);
        Ok(good)
    }
}

/// Whether the wanted outputs of a derivation (all if `wanted` is `None`) are all valid, as a
/// check needs them to be.
pub(super) fn checkable(
    store: &LocalStore,
    outputs: &BTreeMap<String, StorePath>,
    wanted: Option<&BTreeSet<String>>,
) -> cairn_store::Result<bool> {
    for (name, p) in outputs {
        if wanted.is_some_and(|w| !w.contains(name)) {
            continue;
        }
        if !store.is_valid(p)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Nix's message for a check that found `real_output` (the output's path on disk) differing,
/// and, when the new contents were kept, where.
pub(super) fn not_deterministic(shown_drv: &str, real_output: &str, kept: Option<&str>) -> Failure {
    let message = match kept {
        Some(k) => {
            format!("derivation '{shown_drv}' may not be deterministic: output '{real_output}' differs from '{k}'")
        }
        None => format!("derivation '{shown_drv}' may not be deterministic: output '{real_output}' differs"),
    };
    Failure::new(FailureKind::NotDeterministic, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_deterministic_speaks_nixs_words() {
        let f = not_deterministic("/nix/store/h-x.drv", "/r/nix/store/h-x", None);
        assert_eq!(f.kind, FailureKind::NotDeterministic);
        assert_eq!(
            f.message,
            "derivation '/nix/store/h-x.drv' may not be deterministic: output '/r/nix/store/h-x' differs"
        );
        let f = not_deterministic("/nix/store/h-x.drv", "/s/h-x", Some("/s/h-x.check"));
        assert_eq!(
            f.message,
            "derivation '/nix/store/h-x.drv' may not be deterministic: output '/s/h-x' differs from '/s/h-x.check'"
        );
    }

    #[test]
    fn a_plain_message_is_an_other_failure() {
        let f: Failure = "no".to_owned().into();
        assert_eq!(f.kind, FailureKind::Other);
        assert!(matches!(Stop::from("x".to_owned()), Stop::Failed(Failure { kind: FailureKind::Other, .. })));
    }
}
