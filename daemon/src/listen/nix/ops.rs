//! The operations that read the store or keep it: path queries, substitutability, roots, the
//! collector, optimising, verifying, signatures and build logs.
//!
//! Each answers as `nix-daemon` 2.8's `performOp` does, from the same store calls as the HTTP
//! API's `/v1/query`; where Nix refuses an untrusted client, so does this, in Nix's words.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_cache::substitute::Notice;
use cairn_nix::hash::Encoding;
use cairn_nix::narinfo::NarInfo;
use cairn_nix::StorePath;
use cairn_worker::{GcAction, GcOptions, GcResults, Request, Response, SubstitutablePathInfo};

use super::session::{Failure, OpResult, Session};

pub(super) use cairn_build::remote::wire_info;

fn substitutable(info: &NarInfo) -> SubstitutablePathInfo {
    SubstitutablePathInfo {
        deriver: info.deriver.clone(),
        references: info.references.clone(),
        // As Nix: a narinfo without FileSize (or a store that is no binary cache) says 0.
        download_size: info.file_size.unwrap_or(0),
        nar_size: info.nar_size,
    }
}

impl<R: Read, W: Write> Session<R, W> {
    /// A setting the client's `SetOptions` overrode, if it did.
    pub(super) fn client_setting(&self, name: &str) -> Option<&str> {
        self.options.overrides.get(name).map(String::as_str)
    }

    /// The caches substitutions and queries use: none if the client turned substitution off;
    /// else those its `substituters` (and `extra-substituters`) name, as `nix-daemon` takes
    /// them — any for a trusted client, only configured ones for others (the rest are ignored);
    /// else the configured ones.
    pub(super) fn substituters(&self) -> Vec<Arc<cairn_cache::Substituter>> {
        if !self.options.use_substitutes {
            return Vec::new();
        }
        let sub = &self.st.substitution;
        let named: Option<Vec<String>> =
            self.client_setting("substituters").map(|v| v.split_whitespace().map(str::to_owned).collect());
        let extra: Vec<String> = self
            .client_setting("extra-substituters")
            .map(|v| v.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let urls: Vec<String> = match (named, extra.is_empty()) {
            (None, true) => return sub.configured.clone(),
            (Some(named), _) => named.into_iter().chain(extra).collect::<Vec<String>>(),
            (None, false) => sub.configured.iter().map(|c| c.url().to_owned()).chain(extra).collect(),
        };
        urls.iter()
            .filter_map(|u| match sub.caches(std::slice::from_ref(u), &self.peer) {
                Ok(mut c) => c.pop(),
                Err(e) => {
                    tracing::info!(user = self.peer.user, "ignoring substituter '{u}': {}", e.message);
                    None
                }
            })
            .collect()
    }

    /// Tells a client that is not trusted which of the caches it named will not be used, as
    /// nix-daemon warns when it takes the client's options: those neither in `substituters`
    /// nor in `trusted-substituters` (nor a configured peer).
    pub(super) fn warn_of_untrusted_substituters(&mut self) {
        if self.peer.trusted {
            return;
        }
        let named: Vec<String> = ["substituters", "extra-substituters"]
            .iter()
            .filter_map(|k| self.client_setting(k))
            .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        for url in named {
            if self.st.substitution.caches(std::slice::from_ref(&url), &self.peer).is_err() {
                self.log_line(&format!("warning: ignoring untrusted substituter '{url}'"));
            }
        }
    }

    /// What makes a path trusted for this client: the daemon's keys, or — for a trusted client
    /// that set them, as `nix-daemon` lets it — its `trusted-public-keys`
    /// (`extra-trusted-public-keys` added) and `require-sigs`.
    pub(super) fn policy(&self) -> cairn_cache::Policy {
        let mut policy = self.st.substitution.policy.clone();
        if !self.peer.trusted {
            return policy;
        }
        let keys = |v: &str| -> Vec<cairn_nix::signing::PublicKey> {
            v.split_whitespace().filter_map(|k| cairn_nix::signing::PublicKey::parse(k).ok()).collect()
        };
        if let Some(v) = self.client_setting("trusted-public-keys") {
            policy.trusted_keys = keys(v);
        }
        if let Some(v) = self.client_setting("extra-trusted-public-keys") {
            policy.trusted_keys.extend(keys(v));
        }
        if let Some(v) = self.client_setting("require-sigs") {
            policy.require_sigs = v == "true";
        }
        policy
    }

    /// Narinfos of the paths the caches could substitute: trusted under this client's policy.
    pub(super) fn substitutable(&self, paths: &[StorePath]) -> BTreeMap<StorePath, NarInfo> {
        self.narinfos(paths, self.policy(), self.substituters())
    }

    /// Narinfos of the paths the caches have, signed or not: what Nix's substitutability
    /// queries answer (`querySubstitutablePaths`, `querySubstitutablePathInfos`, and so
    /// `queryMissing`), which look for a narinfo, not at its signatures — a path whose
    /// signature then fails is built instead, as by `nix-daemon`.
    pub(super) fn offered(&self, paths: &[StorePath]) -> BTreeMap<StorePath, NarInfo> {
        let mut policy = self.policy();
        policy.require_sigs = false;
        self.narinfos(paths, policy, self.substituters())
    }

    /// What [`Self::offered`] answers from the caches that want mass queries only: Nix's
    /// `querySubstitutablePaths` (`HasSubstitutes`, `QuerySubstitutablePaths`) skips the others.
    fn offered_in_bulk(&self, paths: &[StorePath]) -> BTreeMap<StorePath, NarInfo> {
        let mut policy = self.policy();
        policy.require_sigs = false;
        let dir = &self.st.store_dir;
        let subs: Vec<_> =
            self.substituters().into_iter().filter(|s| self.rt.block_on(s.want_mass_query(dir))).collect();
        self.narinfos(paths, policy, subs)
    }

    fn narinfos(
        &self,
        paths: &[StorePath],
        policy: cairn_cache::Policy,
        subs: Vec<Arc<cairn_cache::Substituter>>,
    ) -> BTreeMap<StorePath, NarInfo> {
        if subs.is_empty() || paths.is_empty() {
            return BTreeMap::new();
        }
        let sub = &self.st.substitution;
        self.rt.block_on(cairn_cache::substitute::query(&subs, &sub.lookups, &policy, &self.st.store_dir, paths))
    }

    /// Substitutes what of `paths` is missing (closures included); errors are the caller's to
    /// find, by asking what is valid afterwards.
    /// Returns why each path that a cache offered could not be substituted.
    pub(super) fn substitute_missing(&mut self, paths: &[StorePath]) -> OpResult<BTreeMap<StorePath, String>> {
        let store = &self.st.store;
        let mut missing = Vec::new();
        for p in paths {
            if !store.is_valid(p)? {
                missing.push(p.clone());
            }
        }
        let subs = self.substituters();
        if missing.is_empty() || subs.is_empty() {
            return Ok(BTreeMap::new());
        }
        let progress = Arc::new(cairn_cache::Progress::default());
        let mut job = self.st.substitution.job(store, subs, self.peer.client, progress, false);
        job.policy = self.policy();
        let (announce, copying) = tokio::sync::mpsc::unbounded_channel();
        job.announce = Some(announce);
        let failed = match self.showing_copies(cairn_cache::substitute(job, &missing), copying) {
            Ok(report) => {
                for i in &report.added {
                    tracing::info!(path = %self.show(&i.path), "substituted");
                }
                report.failed
            }
            Err(e) => {
                tracing::warn!("substitution failed: {e}");
                Vec::new()
            }
        };
        // Only what a cache offered failed; the rest simply had no substitute.
        let paths: Vec<StorePath> = failed.iter().map(|(p, _)| p.clone()).collect();
        let offered = if failed.is_empty() { BTreeMap::new() } else { self.substitutable(&paths) };
        Ok(failed.into_iter().filter(|(p, _)| offered.contains_key(p)).collect())
    }

    /// Runs `work`, a substitution that announces on `copying` each path it starts, showing the
    /// client each as Nix's daemon does: a "copying path '…' from '…'" activity (stopped when
    /// the substitution ends); and Nix's warning for each substitute signed by no trusted key.
    pub(super) fn showing_copies<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
        mut copying: tokio::sync::mpsc::UnboundedReceiver<cairn_cache::substitute::Notice>,
    ) -> T {
        let rt = self.rt.clone();
        let mut started = Vec::new();
        let out = rt.block_on(async {
            tokio::pin!(work);
            loop {
                tokio::select! {
                    out = &mut work => break out,
                    Some(notice) = copying.recv() => self.show_notice(notice, &mut started),
                }
            }
        });
        // What was told just as the work ended is shown too.
        while let Ok(notice) = copying.try_recv() {
            self.show_notice(notice, &mut started);
        }
        for id in started {
            self.stop_activity(id);
        }
        out
    }

    /// A substitution's notice as Nix's daemon shows it: a copy as an activity (its id kept in
    /// `started`), a substitute signed by no trusted key as Nix's warning.
    fn show_notice(&mut self, notice: Notice, started: &mut Vec<u64>) {
        match notice {
            Notice::Copying { path, from } => started.push(self.start_copy(path, from)),
            Notice::Unsigned { path, from } => self.log_line(&format!(
                "warning: the substitute for '{path}' from '{from}' is not signed by any of the keys in \
                 'trusted-public-keys'"
            )),
        }
    }

    /// Makes `paths` valid, substituting them if needed (`EnsurePath`, opaque build goals). A
    /// path no cache has fails with `none`'s message for it (each operation has Nix's own).
    pub(super) fn ensure_valid(&mut self, paths: &[StorePath], none: fn(&str) -> String) -> OpResult<()> {
        let failed = self.substitute_missing(paths)?;
        for p in paths {
            if !self.st.store.is_valid(p)? {
                // A substitute that failed is the error, not a missing one.
                return Err(Failure::Report(match failed.get(p) {
                    Some(why) => format!("cannot substitute '{}': {why}", self.show(p)),
                    None => none(&self.show(p)),
                }));
            }
        }
        self.temp_roots.extend(paths.iter().cloned());
        Ok(())
    }

    /// Nix's `BuildResult` message for a path no cache has.
    pub(super) fn no_substituter(p: &str) -> String {
        format!("path '{p}' is required, but there is no substituter that can build it")
    }

    /// The queries and upkeep operations (everything but adds and builds).
    pub(super) fn query(&mut self, req: Request) -> OpResult<Response> {
        use Request as Q;
        let st = self.st.clone();
        let (store, dir) = (&st.store, &st.store_dir);
        Ok(match req {
            Q::IsValidPath(p) => Response::Bool(store.is_valid(&p)?),
            Q::QueryValidPaths { paths, substitute } => {
                let paths: Vec<StorePath> = paths.into_iter().collect();
                if substitute {
                    self.substitute_missing(&paths)?;
                }
                let mut valid = BTreeSet::new();
                for p in paths {
                    if store.is_valid(&p)? {
                        valid.insert(p);
                    }
                }
                Response::PathSet(valid)
            }
            Q::QueryPathInfo(p) => Response::PathInfo(store.path_info(&p)?.as_ref().map(wire_info)),
            Q::QueryPathHash(p) => Response::Text(store.valid_path_info(&p)?.nar_hash.encode(Encoding::Base16)),
            Q::QueryReferences(p) => Response::PathSet(store.valid_path_info(&p)?.references),
            // As Nix's: a path that is not valid has no referrers (not an error).
            Q::QueryReferrers(p) if !store.is_valid(&p)? => Response::PathSet(BTreeSet::new()),
            Q::QueryReferrers(p) => Response::PathSet(store.referrers(&p)?),
            Q::QueryDeriver(p) => Response::OptPath(store.valid_path_info(&p)?.deriver),
            Q::QueryValidDerivers(p) => Response::PathSet(store.valid_derivers(&p)?),
            Q::QueryPathFromHashPart(h) => Response::OptPath(store.path_from_hash_part(&h)?),
            Q::QueryAllValidPaths => {
                let mut all: BTreeSet<StorePath> = store.live_paths()?.into_iter().collect();
                all.extend(store.dead_paths()?);
                Response::PathSet(all)
            }
            Q::QueryDerivationOutputMap(drv) => {
                let outputs = cairn_build::derivations::Derivations::new(store).outputs(&drv)?;
                Response::OutputMap(outputs.into_iter().map(|(k, v)| (k, Some(v))).collect())
            }
            Q::QueryDerivationOutputs(drv) => {
                let outputs = cairn_build::derivations::Derivations::new(store).outputs(&drv)?;
                Response::PathSet(outputs.into_values().collect())
            }
            Q::QueryDerivationOutputNames(drv) => {
                let d = cairn_build::derivations::Derivations::new(store).load(&drv)?;
                Response::StringSet(d.outputs.keys().cloned().collect())
            }
            Q::HasSubstitutes(p) => Response::Bool(!self.offered_in_bulk(std::slice::from_ref(&p)).is_empty()),
            Q::QuerySubstitutablePaths(paths) => {
                let missing = self.invalid(paths)?;
                Response::PathSet(self.offered_in_bulk(&missing).into_keys().collect())
            }
            Q::QuerySubstitutablePathInfo(p) => {
                let found = self.offered(std::slice::from_ref(&p));
                Response::SubstitutablePathInfo(found.get(&p).map(substitutable))
            }
            Q::QuerySubstitutablePathInfos(paths) => {
                let missing = self.invalid(paths.into_keys())?;
                let found = self.offered(&missing);
                Response::SubstitutablePathInfos(found.iter().map(|(p, i)| (p.clone(), substitutable(i))).collect())
            }
            Q::AddTempRoot(p) => {
                self.temp_roots.extend([p]);
                Response::One
            }
            Q::AddIndirectRoot(link) => {
                self.add_indirect_root(Path::new(&link))?;
                Response::One
            }
            Q::AddPermRoot { path, gc_root } => {
                self.require_trust("create perm roots")?;
                let link = PathBuf::from(&gc_root);
                if !link.is_absolute() {
                    return Err(Failure::Report(format!("root '{gc_root}' is not an absolute path")));
                }
                store.valid_path_info(&path)?;
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(dir.display(&path), &link)
                    .map_err(|e| Failure::Report(format!("cannot create root '{gc_root}': {e}")))?;
                store.add_indirect_root(&link, &path)?;
                Response::Text(gc_root)
            }
            Q::SyncWithGc => Response::One,
            Q::FindRoots => {
                let trusted = self.peer.trusted;
                let roots = store.roots()?.into_iter().map(|r| (r.origin_shown(trusted), r.path)).collect();
                Response::Roots(roots)
            }
            Q::CollectGarbage(o) => Response::GcResults(self.collect_garbage(o)?),
            Q::OptimiseStore => {
                let r = store.optimise()?;
                self.log_line(&format!("{} freed by hard-linking {} files", human(r.bytes_saved), r.files_linked));
                Response::One
            }
            Q::VerifyStore { check_contents, repair } => Response::Bool(self.verify(check_contents, repair)?),
            Q::AddSignatures { path, sigs } => {
                self.require_trust("add signatures")?;
                store.add_signatures(&path, &sigs)?;
                Response::One
            }
            Q::AddBuildLog(drv) => {
                if !self.peer.trusted {
                    // Read past (the connection stays in step) but never kept: an untrusted
                    // client's refused log must not cost the daemon its size in memory.
                    cairn_worker::FramedReader::new(&mut self.r).drain()?;
                }
                self.require_trust("add logs")?;
                let mut framed = cairn_worker::FramedReader::new(&mut self.r);
                let mut log = Vec::new();
                let read = (&mut framed).take(self.proto.limits.max_blob as u64 + 1).read_to_end(&mut log);
                framed.drain()?;
                read?;
                if log.len() > self.proto.limits.max_blob {
                    return Err(Failure::Report("the build log is too large".into()));
                }
                // As Nix's `addBuildLog`: a log already kept stays (the build's own).
                if st.builder.logs().exists(&drv) {
                    return Ok(Response::One);
                }
                let mut w = st.builder.logs().writer(&drv);
                let text = log.strip_suffix(b"\n").unwrap_or(&log);
                for line in text.split(|&b| b == b'\n') {
                    w.line(line).map_err(|e| Failure::Report(format!("cannot write the build log: {e}")))?;
                }
                w.finish().map_err(|e| Failure::Report(format!("cannot write the build log: {e}")))?;
                Response::One
            }
            Q::QueryRealisation(_) => {
                // Realisations are for content-addressed derivations (experimental in Nix
                // 2.8); this store records none.
                if self.proto.has(31) {
                    Response::Realisations(cairn_worker::Realisations::Json(BTreeSet::new()))
                } else {
                    Response::Realisations(cairn_worker::Realisations::Paths(BTreeSet::new()))
                }
            }
            Q::RegisterDrvOutput(_) => {
                return Err(Failure::Report(
                    "unsupported operation: cairnd does not record realisations of content-addressed derivations"
                        .into(),
                ))
            }
            other => {
                return Err(Failure::Report(format!("unsupported operation {}", other.op().to_u64())));
            }
        })
    }

    fn invalid(&self, paths: impl IntoIterator<Item = StorePath>) -> OpResult<Vec<StorePath>> {
        let mut v = Vec::new();
        for p in paths {
            if !self.st.store.is_valid(&p)? {
                v.push(p);
            }
        }
        Ok(v)
    }

    /// `AddIndirectRoot`: the client made `link` point at a store path (Nix's `addPermRoot`
    /// does so on the client's side) and asks for it to be a root.
    ///
    /// The daemon reads what the client names with its own rights, so an untrusted client's
    /// link must be its own, and every refusal is the same words: what is behind a directory
    /// the client may not read (whether a file is there, where a link leads) is not told.
    fn add_indirect_root(&mut self, link: &Path) -> OpResult<()> {
        if !link.is_absolute() {
            return Err(Failure::Report(format!("root '{}' is not an absolute path", link.display())));
        }
        let trusted = self.peer.trusted;
        let refused = |why: String| {
            Failure::Report(if trusted {
                why
            } else {
                format!("root '{}' is not a symbolic link of yours into the store", link.display())
            })
        };
        if !trusted {
            let owner = std::fs::symlink_metadata(link).map(|m| std::os::unix::fs::MetadataExt::uid(&m));
            if owner.ok() != Some(self.peer.uid) {
                return Err(refused(String::new()));
            }
        }
        let target =
            std::fs::read_link(link).map_err(|e| refused(format!("cannot read root '{}': {e}", link.display())))?;
        let target = target.to_string_lossy();
        let path = self
            .st
            .store_dir
            .parse(&target)
            .map_err(|_| refused(format!("root '{}' does not point into the store ({target})", link.display())))?;
        self.st.store.add_indirect_root(link, &path)?;
        Ok(())
    }

    fn collect_garbage(&mut self, o: GcOptions) -> OpResult<GcResults> {
        if o.ignore_liveness {
            return Err(Failure::Report("you are not allowed to ignore liveness".into()));
        }
        let st = self.st.clone();
        let (store, dir) = (&st.store, &st.store_dir);
        let shown = |v: Vec<StorePath>| v.iter().map(|p| dir.display(p)).collect::<BTreeSet<_>>();
        // Nix's progress lines, as its collector prints them.
        let deleting = matches!(o.action, GcAction::DeleteDead | GcAction::DeleteSpecific);
        self.log_line("finding garbage collector roots...");
        match o.action {
            GcAction::DeleteDead => self.log_line("deleting garbage..."),
            GcAction::ReturnLive | GcAction::ReturnDead => self.log_line("determining live/dead paths..."),
            GcAction::DeleteSpecific => {}
        }
        // The limit a collection stopped at, said after what it deleted, as Nix says it.
        let mut stopped_at = None;
        let results = match o.action {
            GcAction::ReturnLive => GcResults { paths: shown(store.live_paths()?), bytes_freed: 0 },
            GcAction::ReturnDead => {
                // Leftovers in the store directory are dead too, as Nix lists them.
                let mut dead = store.dead_paths()?;
                dead.extend(store.unregistered_entries()?.into_iter().filter(|p| !store.is_valid(p).unwrap_or(true)));
                GcResults { paths: shown(dead), bytes_freed: 0 }
            }
            GcAction::DeleteDead => {
                let max_freed = (o.max_freed != u64::MAX).then_some(o.max_freed);
                let r = store.collect_garbage(&cairn_store::GcOptions { dry_run: false, max_freed })?;
                stopped_at = max_freed.filter(|_| r.limit_reached);
                GcResults { paths: shown(r.deleted), bytes_freed: r.bytes_freed }
            }
            GcAction::DeleteSpecific => {
                // As Nix: a path that is not valid is dead and counts as deleted, and what the
                // store directory holds under its name (a leftover) is removed; only valid paths
                // can be alive.
                let (valid, invalid): (Vec<StorePath>, Vec<StorePath>) =
                    o.paths_to_delete.into_iter().partition(|p| store.is_valid(p).unwrap_or(true));
                let mut deleted = Vec::new();
                for p in invalid {
                    store.remove_unregistered_path(&p)?;
                    deleted.push(p);
                }
                let r = if valid.is_empty() {
                    cairn_store::GcReport::default()
                } else {
                    // In nix-daemon's words, which scripts look for.
                    store.delete_paths(&valid).map_err(|e| match e {
                        cairn_store::StoreError::Alive { path, .. } => Failure::Report(format!(
                            "Cannot delete path '{path}' since it is still alive. To find out why, use: nix-store \
                             --query --roots"
                        )),
                        e => e.into(),
                    })?
                };
                deleted.extend(r.deleted);
                GcResults { paths: shown(deleted), bytes_freed: r.bytes_freed }
            }
        };
        if deleting {
            for p in &results.paths {
                self.log_line(&format!("deleting '{p}'"));
            }
            if let Some(m) = stopped_at {
                self.log_line(&format!("deleted more than {m} bytes; stopping"));
            }
            self.log_line("deleting unused links...");
            if let Ok(saved) = store.links_saving() {
                self.log_line(&format!(
                    "note: currently hard linking saves {:.2} MiB",
                    saved as f64 / (1024.0 * 1024.0)
                ));
            }
        }
        Ok(results)
    }

    /// `VerifyStore`: each problem is logged as Nix logs it; the answer is whether any is left.
    fn verify(&mut self, check_contents: bool, repair: bool) -> OpResult<bool> {
        if repair {
            self.require_trust("repair paths")?;
            let caches = Some((self.substituters(), self.policy()));
            let (st, peer) = (self.st.clone(), self.peer.clone());
            let fut = crate::api::substitute::verify_and_repair(st, peer, check_contents, caches, true);
            let report = self.rt.block_on(fut)?;
            let problems: Vec<(&str, &str)> =
                report.problems.iter().map(|p| (p.kind.as_str(), p.message.as_str())).collect();
            self.log_verify(check_contents, &report.forgotten, &problems);
            return Ok(report.problems.iter().any(|p| !p.message.ends_with("(repaired)")));
        }
        let report = self.st.store.verify(cairn_store::VerifyOptions {
            check_contents,
            forget_vanished: true,
            ..Default::default()
        })?;
        let problems: Vec<(&str, &str)> = report.problems.iter().map(|p| (p.kind, p.message.as_str())).collect();
        self.log_verify(check_contents, &report.forgotten, &problems);
        Ok(!report.problems.is_empty())
    }

    /// A verification's findings in the order and words of Nix's `verifyStore`: its progress
    /// lines, then what the existence check found (paths forgotten, paths missing), then what
    /// the contents check found.
    fn log_verify(&mut self, check_contents: bool, forgotten: &[String], problems: &[(&str, &str)]) {
        self.log_line("reading the Nix store...");
        self.log_line("checking path existence...");
        for line in forgotten {
            self.log_line(line);
        }
        let stage = |kind: &str| match kind {
            "link" => 1,
            "modified" | "content-address" => 2,
            _ => 0,
        };
        for at in 0..3 {
            match at {
                1 if check_contents => self.log_line("checking link hashes..."),
                2 if check_contents => self.log_line("checking store hashes..."),
                _ => {}
            }
            for (_, m) in problems.iter().filter(|(kind, _)| stage(kind) == at) {
                self.log_line(m);
            }
        }
    }
}

/// Bytes as Nix's `showBytes` prints them.
fn human(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}
