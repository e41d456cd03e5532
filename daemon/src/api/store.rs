//! Store queries (`/v1/query`, the version) and reads (`/v1/nar`, `/v1/cat`).

use std::io;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::{Extension, Json};
use base64::Engine;
use cairn_api::query::{self, ReferenceGraph};
use cairn_api::{DirEntry, GcAction, Op, PathQuery, Request, Response, VersionInfo};
use cairn_nix::StoreDir;
use cairn_store::{ClientScope, Direction, EntryKind, GcOptions, VerifyOptions};

use crate::auth::Peer;
use crate::convert::{self, store_path, store_paths};
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, St};
use crate::stream::{blocking, stream_response, IntoStoreError};

pub(crate) async fn version(State(s): St, Extension(peer): Extension<Peer>) -> Json<VersionInfo> {
    Json(VersionInfo {
        api_version: cairn_api::API_VERSION,
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        store_dir: s.store_dir.as_str().to_owned(),
        trusted: peer.trusted,
        user: peer.user,
        settings_fingerprint: s.control.fingerprint().to_owned(),
    })
}

fn paths_out(dir: &StoreDir, v: impl IntoIterator<Item = cairn_nix::StorePath>) -> Vec<String> {
    v.into_iter().map(|p| dir.display(&p)).collect()
}

/// A JSON answer serialised in one pass into a buffer sized for it. Large answers (a 100k-path
/// closure is 5 MB) would otherwise be copied again at every growth of a small buffer.
pub(crate) fn json_answer(v: &impl serde::Serialize, size_hint: usize) -> ApiResult<HttpResponse> {
    let mut buf = Vec::with_capacity(size_hint.max(256));
    serde_json::to_writer(&mut buf, v).map_err(|e| ApiError::internal(format!("cannot encode answer: {e}")))?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], buf).into_response())
}

/// A generous estimate of a response's JSON size.
fn size_hint(r: &Response) -> usize {
    match r {
        Response::Paths(v) => v.iter().map(|p| p.len() + 3).sum::<usize>() + 64,
        Response::Graph(ReferenceGraph { nodes, edges }) => {
            nodes.iter().map(|p| p.len() + 3).sum::<usize>()
                + edges.iter().map(|(a, b)| a.len() + b.len() + 8).sum::<usize>()
                + 64
        }
        Response::PathInfos(v) => v.len() * 512,
        _ => 4096,
    }
}

pub(crate) async fn query(
    State(s): St,
    Extension(peer): Extension<Peer>,
    Json(req): Json<Request>,
) -> ApiResult<HttpResponse> {
    match req {
        Request::Verify(q @ query::Verify { repair: true, .. }) => {
            let report = crate::api::substitute::verify_and_repair(s, peer, q.check_contents, None, false).await?;
            json_answer(&query::Verify::respond(report), 4096)
        }
        Request::ImageBuild(b) => {
            let (events, _) = tokio::sync::mpsc::unbounded_channel();
            let r = crate::api::images::build_image(s, peer, b, events).await?;
            json_answer(&cairn_api::image::BuildRequest::respond(r), 4096)
        }
        Request::ImageCompose(c) => {
            let r = crate::api::images::compose_image(s, peer, c).await?;
            json_answer(&cairn_api::image::ComposeRequest::respond(r), 4096)
        }
        req => {
            let st = s.clone();
            blocking(move || answer(&st, &peer, req)).await
        }
    }
}

/// `Response::Paths` of a closure, written straight from the graph into one buffer: no string
/// per path. Store path names are validated to `[A-Za-z0-9+._?=-]`, which JSON needs no escape
/// for; the store directory is escaped once.
fn closure_json(st: &AppState, paths: &[String]) -> ApiResult<HttpResponse> {
    let dir = &st.store_dir;
    let prefix = serde_json::to_string(&format!("{}/", dir.as_str())).expect("a string serialises");
    let prefix = &prefix[..prefix.len() - 1]; // the opening quote and the escaped directory
    let mut buf = Vec::with_capacity(1 << 16);
    // `{"kind":"paths","value":[…]}`, the kind as `Closure::respond` names it.
    buf.extend_from_slice(format!(r#"{{"kind":"{}","value":["#, query::Closure::respond(Vec::new()).kind()).as_bytes());
    let mut first = true;
    st.store.walk_map(&store_paths(dir, paths)?, Direction::References, |p| {
        if !std::mem::take(&mut first) {
            buf.push(b',');
        }
        buf.extend_from_slice(prefix.as_bytes());
        buf.extend_from_slice(p.hash_part().as_bytes());
        buf.push(b'-');
        buf.extend_from_slice(p.name().as_bytes());
        buf.push(b'"');
    })?;
    buf.extend_from_slice(b"]}");
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], buf).into_response())
}

/// Answers one blocking query: each operation's handler returns its `Op::Answer`, which only
/// that operation's `respond` turns into a [`Response`]. A closure, the one answer that can hold
/// 100k paths, is written by [`closure_json`]; everything else is serialised by [`json_answer`].
fn answer(st: &AppState, peer: &Peer, req: Request) -> ApiResult<HttpResponse> {
    use crate::api::{images, realise};
    let (store, dir) = (&st.store, &st.store_dir);
    let resp = match req {
        Request::ImageList(_) => query::ImageList::respond(images::list(st)?),
        Request::ImageInspect(q) => query::ImageInspect::respond(images::inspect(st, q)?),
        Request::ImageTag(q) => query::ImageTag::respond(images::tag(st, peer, q)?),
        Request::ImageUntag(q) => query::ImageUntag::respond(images::untag(st, peer, q)?),
        Request::ImageUnpack(q) => query::ImageUnpack::respond(images::unpack(st, peer, q)?),
        Request::AutomatonCreate(q) => {
            cairn_api::image::AutomatonRequest::respond(images::automaton_create(st, peer, q)?)
        }
        Request::AutomatonList(_) => query::AutomatonList::respond(images::automaton_list(st)?),
        Request::AutomatonShow(q) => query::AutomatonShow::respond(images::automaton_show(st, q)?),
        Request::AutomatonRemove(q) => query::AutomatonRemove::respond(images::automaton_remove(st, q)?),
        Request::Builders(_) => query::Builders::respond(realise::builders(st)),
        // Realised by the builder, asynchronously: `query` answers it before coming here.
        Request::ImageBuild(_) | Request::ImageCompose(_) => {
            return Err(ApiError::internal("an image build reached the blocking queries"))
        }
        Request::PathInfo(query::PathInfo { paths, closure }) => {
            let mut paths = store_paths(dir, &paths)?;
            if closure {
                paths = store.walk(&paths, Direction::References)?;
            }
            let infos = paths
                .iter()
                .map(|p| Ok(convert::path_info(dir, &store.valid_path_info(p)?)))
                .collect::<ApiResult<Vec<_>>>()?;
            query::PathInfo::respond(infos)
        }
        Request::References(q) => {
            query::References::respond(paths_out(dir, store.valid_path_info(&store_path(dir, &q.path)?)?.references))
        }
        Request::Referrers(q) => {
            query::Referrers::respond(paths_out(dir, store.referrers(&store_path(dir, &q.path)?)?))
        }
        Request::Closure(q) => return closure_json(st, &q.paths),
        Request::ReferrersClosure(q) => {
            let mut v = store.walk_map(&store_paths(dir, &q.paths)?, Direction::Referrers, |p| dir.display(p))?;
            v.reverse();
            query::ReferrersClosure::respond(v)
        }
        Request::Graph(q) => {
            let g = store.closure_graph(&store_paths(dir, &q.paths)?)?;
            let mut edges = Vec::new();
            let nodes = g
                .into_iter()
                .map(|(p, refs)| {
                    let from = dir.display(&p);
                    edges.extend(refs.iter().map(|r| (from.clone(), dir.display(r))));
                    from
                })
                .collect();
            query::Graph::respond(ReferenceGraph { nodes, edges })
        }
        Request::Ls(q) => {
            let (p, inner) = dir.parse_inner(&q.path).map_err(|e| ApiError::bad_request(e.to_string()))?;
            let (kind, entries) = store.list(&p, inner)?;
            let listing = if kind == EntryKind::Directory {
                entries.into_iter().map(|e| dir_entry(&e.name, e.kind)).collect()
            } else {
                let name =
                    if inner.is_empty() { p.base_name() } else { inner.rsplit('/').next().unwrap_or(inner).to_owned() };
                vec![dir_entry(name.as_bytes(), kind)]
            };
            query::Ls::respond(listing)
        }
        Request::AddText(query::AddText { name, contents, references }) => {
            let contents = base64::engine::general_purpose::STANDARD
                .decode(contents)
                .map_err(|e| ApiError::bad_request(format!("text contents are not base64: {e}")))?;
            let refs = store_paths(dir, &references)?.into_iter().collect();
            let _client = ClientScope::enter(peer.client);
            let info = store.add_text(&name, &contents, &refs)?;
            query::AddText::respond(vec![convert::path_info(dir, &info)])
        }
        Request::IsValid(q) => query::IsValid::respond(
            store_paths(dir, &q.paths)?.iter().map(|p| store.is_valid(p)).collect::<Result<_, _>>()?,
        ),
        Request::Gc(query::Gc { action, max_freed }) => match action {
            GcAction::PrintRoots => query::GcRoots::respond(
                store
                    .roots()?
                    .into_iter()
                    .map(|r| {
                        let path = dir.display(&r.path);
                        cairn_api::RootInfo { origin: r.origin_shown(peer.trusted), path }
                    })
                    .collect(),
            ),
            GcAction::PrintLive => query::GcLive::respond(paths_out(dir, store.live_paths()?)),
            GcAction::PrintDead => query::GcDead::respond(paths_out(dir, store.dead_paths()?)),
            GcAction::Collect | GcAction::DryRun => {
                let opts = GcOptions { dry_run: action == GcAction::DryRun, max_freed };
                query::GcCollect::respond(convert::gc_result(dir, store.collect_garbage(&opts)?))
            }
        },
        Request::Delete(q) => {
            query::Delete::respond(convert::gc_result(dir, store.delete_paths(&store_paths(dir, &q.paths)?)?))
        }
        Request::AddRoot(query::AddRoot { link, path }) => {
            let link = std::path::PathBuf::from(link);
            if !link.is_absolute() {
                return Err(ApiError::bad_request(format!("root link '{}' is not an absolute path", link.display())));
            }
            let p = store_path(dir, &path)?;
            // Kept for the client's life: it creates the link after this answer.
            let _client = ClientScope::enter(peer.client);
            store.add_indirect_root(&link, &p)?;
            tracing::info!(link = %link.display(), path, "root added");
            query::AddRoot::respond(vec![dir.display(&p)])
        }
        Request::Optimise(_) => {
            let r = store.optimise()?;
            query::Optimise::respond(cairn_api::OptimiseResult {
                paths: r.paths,
                files_linked: r.files_linked,
                bytes_saved: r.bytes_saved,
            })
        }
        Request::Verify(query::Verify { check_contents, repair: _ }) => query::Verify::respond(convert::verify_result(
            dir,
            store.verify(VerifyOptions { check_contents, forget_vanished: true, ..Default::default() })?,
        )),
        Request::AddDerivation(q) => query::AddDerivation::respond(realise::add_derivation(st, &q.aterm)?),
        Request::DerivationOutputs(q) => query::DerivationOutputs::respond(realise::derivation_outputs(st, &q.paths)?),
        Request::ImpureEnvVars(q) => query::ImpureEnvVars::respond(realise::impure_env_vars(st, &q.paths)?),
    };
    json_answer(&resp, size_hint(&resp))
}

fn dir_entry(name: &[u8], kind: EntryKind) -> DirEntry {
    let name = String::from_utf8_lossy(name).into_owned();
    match kind {
        EntryKind::Regular { executable, size } => DirEntry {
            name,
            kind: if executable { "executable" } else { "regular" }.into(),
            size: Some(size),
            target: None,
        },
        EntryKind::Symlink { target } => DirEntry {
            name,
            kind: "symlink".into(),
            size: None,
            target: Some(String::from_utf8_lossy(&target).into_owned()),
        },
        EntryKind::Directory => DirEntry { name, kind: "directory".into(), size: None, target: None },
    }
}

pub(crate) async fn nar(State(s): St, Query(q): Query<PathQuery>) -> ApiResult<HttpResponse> {
    let p = store_path(&s.store_dir, &q.path)?;
    let st = s.clone();
    let p2 = p.clone();
    blocking::<_, ApiError>(move || Ok(st.store.valid_path_info(&p2)?)).await?;
    Ok(stream_response(move |w| s.store.dump_path(&p, w)))
}

pub(crate) async fn cat(State(s): St, Query(q): Query<PathQuery>) -> ApiResult<HttpResponse> {
    let (p, inner) = s.store_dir.parse_inner(&q.path).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let inner = inner.to_owned();
    let st = s.clone();
    let mut file = blocking::<_, ApiError>(move || Ok(st.store.open_file(&p, &inner)?)).await?;
    Ok(stream_response(move |w| io::copy(&mut file, w).map(|_| ()).map_err(|e| e.into_store())))
}
