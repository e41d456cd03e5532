//! One error type for every handler, mapped to one status code per kind. Messages of internal
//! errors are logged in full and reach the client too: the socket's callers are local users of
//! this machine, not the internet.

use axum::response::{IntoResponse, Response};
use axum::Json;
use cairn_api::{ErrorBody, ErrorKind};
use cairn_build::BuildError;
use cairn_image::ImageError;
use cairn_store::StoreError;

use crate::tag_owners::TagError;

#[derive(Debug)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError { kind: ErrorKind::BadRequest, message: message.into() }
    }
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError { kind: ErrorKind::Forbidden, message: message.into() }
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError { kind: ErrorKind::NotFound, message: message.into() }
    }
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError { kind: ErrorKind::Internal, message: message.into() }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        use StoreError::*;
        let kind = match &e {
            NotValid(_) => ErrorKind::NotFound,
            Alive { .. } => ErrorKind::Conflict,
            Nar(_)
            | Export(_)
            | StorePath(_)
            | SizeMismatch { .. }
            | TrailingData
            | HashMismatch { .. }
            | MissingReference { .. }
            | UnsupportedFileType(_)
            | BadInnerPath(_)
            | NotAFile(_)
            | FileChanged { .. }
            | NotReadable(_)
            | ContentMismatch { .. }
            | ContentAddressMismatch { .. }
            | ContentAddressNotAFile { .. }
            | ContentAddressClaim { .. }
            | BadTagName(_)
            | BadDerivation(_) => ErrorKind::BadRequest,
            Db(cairn_db::DbError::MissingReference { .. } | cairn_db::DbError::ReferenceCycle { .. }) => {
                ErrorKind::BadRequest
            }
            Io { .. } | NarWrite { .. } | Db(_) | Locked(_) => ErrorKind::Internal,
        };
        ApiError { kind, message: e.to_string() }
    }
}

impl From<BuildError> for ApiError {
    fn from(e: BuildError) -> ApiError {
        match e {
            BuildError::Store(e) => ApiError::from(e),
            BuildError::NotValid(_) => ApiError::not_found(e.to_string()),
            BuildError::Io { .. } | BuildError::Internal(_) => ApiError::internal(e.to_string()),
            _ => ApiError::bad_request(e.to_string()),
        }
    }
}

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> ApiError {
        if let ImageError::Store(s) = e {
            return ApiError::from(s);
        }
        let kind = if e.is_not_found() {
            ErrorKind::NotFound
        } else if e.is_bad_input() {
            ErrorKind::BadRequest
        } else if matches!(e, ImageError::Unauthorized { .. }) {
            ErrorKind::Forbidden
        } else {
            ErrorKind::Internal
        };
        ApiError { kind, message: e.to_string() }
    }
}

impl From<cairn_oci::OciError> for ApiError {
    fn from(e: cairn_oci::OciError) -> ApiError {
        ApiError::bad_request(e.to_string())
    }
}

impl From<cairn_cache::CacheError> for ApiError {
    fn from(e: cairn_cache::CacheError) -> ApiError {
        use cairn_cache::CacheError::*;
        match e {
            Store(e) => ApiError::from(e),
            Url { .. } | Compression(_) | BadFile { .. } | Refused { .. } => ApiError::bad_request(e.to_string()),
            Missing { .. } => ApiError::not_found(e.to_string()),
            Io { .. } | Http { .. } | Timeout { .. } => ApiError::internal(e.to_string()),
        }
    }
}

impl From<TagError> for ApiError {
    fn from(e: TagError) -> ApiError {
        match e {
            TagError::Image(e) => e.into(),
            TagError::Store(e) => e.into(),
            e @ (TagError::NotYours { .. } | TagError::Unowned { .. }) => ApiError::forbidden(e.to_string()),
            e @ TagError::Record { .. } => ApiError::internal(e.to_string()),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> ApiError {
        ApiError::internal(format!("worker task failed: {e}"))
    }
}

/// Escapes control characters, so that a message quoting user input (a name with a newline)
/// stays one line.
pub fn one_line(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars().map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() }).collect()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = one_line(&self.message);
        if self.kind == ErrorKind::Internal {
            tracing::error!("{message}");
        } else {
            tracing::debug!(kind = ?self.kind, "{message}");
        }
        let status = axum::http::StatusCode::from_u16(self.kind.status()).expect("valid status");
        (status, Json(ErrorBody { kind: self.kind, message })).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Gives every error answer the API's JSON body, including those produced outside the handlers
/// (axum's extractor rejections for a malformed query string or JSON body, which are plain text
/// with statuses 400, 415 or 422).
pub async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.is_success() || is_json {
        return resp;
    }
    let kind = match status.as_u16() {
        403 => ErrorKind::Forbidden,
        404 => ErrorKind::NotFound,
        409 => ErrorKind::Conflict,
        400..=499 => ErrorKind::BadRequest,
        _ => ErrorKind::Internal,
    };
    let bytes = axum::body::to_bytes(resp.into_body(), 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let message = if text.trim().is_empty() { status.to_string() } else { text.trim().to_owned() };
    ApiError { kind, message: format!("bad request: {message}") }.into_response()
}
