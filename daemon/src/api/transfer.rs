//! Paths into and out of the store: `/v1/add`, `/v1/import`, `/v1/export` and `/v1/receive`.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::Response as HttpResponse;
use axum::{Extension, Json};
use cairn_api::{AddMethod, AddQuery, ExportRequest};
use cairn_store::ClientScope;

use crate::auth::Peer;
use crate::convert::{self, store_paths};
use crate::error::{ApiError, ApiResult};
use crate::state::St;
use crate::stream::{blocking, refuse_upload, stream_response, upload};

pub(crate) async fn add(
    State(s): St,
    Extension(peer): Extension<Peer>,
    Query(q): Query<AddQuery>,
    Extension(handed): Extension<crate::handover::HandedOver>,
    body: Body,
) -> ApiResult<Json<cairn_api::PathInfo>> {
    if q.handed_over {
        let file = handed.take().ok_or_else(|| {
            ApiError::bad_request("handedOver=true, but not exactly one file was handed over with this connection")
        })?;
        let method = match q.method {
            AddMethod::Nar => cairn_store::FileMethod::Nar,
            AddMethod::Flat => cairn_store::FileMethod::Flat,
        };
        let info = upload(body, move |_| {
            let _client = ClientScope::enter(peer.client);
            let info = s.store.add_file(&q.name, file, method)?;
            tracing::info!(path = %s.store_dir.display(&info.path), "added (file handed over)");
            Ok(convert::path_info(&s.store_dir, &info))
        })
        .await?;
        return Ok(Json(info));
    }
    let files = if q.spliced {
        if q.method != AddMethod::Nar {
            return Err(ApiError::bad_request("spliced=true is for method=nar"));
        }
        handed.take_all()
    } else {
        Vec::new()
    };
    let info = upload(body, move |input| {
        let _client = ClientScope::enter(peer.client);
        let info = match q.method {
            AddMethod::Nar if q.spliced => s.store.add_nar(&q.name, cairn_nar_fs::Spliced::new(input, files))?,
            AddMethod::Nar => s.store.add_nar(&q.name, input)?,
            AddMethod::Flat => {
                let size = q.size.ok_or_else(|| ApiError::bad_request("a flat add needs size=BYTES"))?;
                s.store.add_flat(&q.name, input, size, q.executable)?
            }
        };
        tracing::info!(path = %s.store_dir.display(&info.path), "added");
        Ok(convert::path_info(&s.store_dir, &info))
    })
    .await?;
    Ok(Json(info))
}

pub(crate) async fn export(State(s): St, Json(req): Json<ExportRequest>) -> ApiResult<HttpResponse> {
    let paths = store_paths(&s.store_dir, &req.paths)?;
    let st = s.clone();
    let check = paths.clone();
    blocking::<_, ApiError>(move || {
        for p in &check {
            st.store.valid_path_info(p)?;
        }
        Ok(())
    })
    .await?;
    Ok(stream_response(move |w| s.store.export(&paths, w)))
}

/// A closure copied from another daemon, with its metadata (content addresses, signatures,
/// derivers) — what an export stream cannot carry.
pub(crate) async fn receive(
    State(s): St,
    Extension(peer): Extension<Peer>,
    Query(q): Query<cairn_api::ReceiveQuery>,
    body: Body,
) -> ApiResult<Json<Vec<String>>> {
    // An untrusted user's pushes need signatures always; a trusted user's when asked, as far as
    // the daemon's `require-sigs` wants them (Nix's `checkSigs` with `pathInfoIsUntrusted`).
    let require_sigs = !peer.trusted || (q.check_sigs && s.substitution.policy.require_sigs);
    let added = upload(body, move |input| {
        let _client = ClientScope::enter(peer.client);
        let done = cairn_cache::push::receive(&s.store, &s.substitution.policy, require_sigs, input)?;
        tracing::info!(paths = done.added.len(), "received");
        if let Some((p, r)) = done.incomplete.first() {
            return Err(ApiError::bad_request(format!(
                "'{}' references '{}', which is neither valid nor in the stream",
                s.store_dir.display(p),
                s.store_dir.display(r)
            )));
        }
        Ok(done.added.iter().map(|i| s.store_dir.display(&i.path)).collect())
    })
    .await?;
    Ok(Json(added))
}

pub(crate) async fn import(
    State(s): St,
    Extension(peer): Extension<Peer>,
    body: Body,
) -> ApiResult<Json<Vec<cairn_api::PathInfo>>> {
    if !peer.trusted {
        let e = ApiError::forbidden(cairn_api::untrusted_import_message(&peer.user));
        return refuse_upload(body, e).await;
    }
    let infos = upload(body, move |input| {
        let _client = ClientScope::enter(peer.client);
        let infos = s.store.import(input)?;
        tracing::info!(paths = infos.len(), "imported");
        Ok(infos.iter().map(|i| convert::path_info(&s.store_dir, i)).collect())
    })
    .await?;
    Ok(Json(infos))
}
