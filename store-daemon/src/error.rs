//! One error type for every handler, mapped to one status code per kind. Messages of internal
//! errors are logged in full and reach the client too: the socket's callers are local users of
//! this machine, not the internet.

use axum::response::{IntoResponse, Response};
use axum::Json;
use cairn_api::{ErrorBody, ErrorKind};
use cairn_store::StoreError;

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
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError { kind: ErrorKind::Internal, message: message.into() }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        use StoreError::*;
        let kind = match &e {
            NotValid(_) => ErrorKind::NotFound,
            Nar(_) | Export(_) | StorePath(_) | SizeMismatch { .. } | TrailingData | HashMismatch { .. }
            | MissingReference { .. } | UnsupportedFileType(_) | BadInnerPath(_) | NotAFile(_) => ErrorKind::BadRequest,
            Db(cairn_db::DbError::MissingReference { .. }) => ErrorKind::BadRequest,
            Io { .. } | NarWrite { .. } | Db(_) | Locked(_) => ErrorKind::Internal,
        };
        ApiError { kind, message: e.to_string() }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> ApiError {
        ApiError::internal(format!("worker task failed: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.kind == ErrorKind::Internal {
            tracing::error!("{}", self.message);
        } else {
            tracing::debug!(kind = ?self.kind, "{}", self.message);
        }
        let status = axum::http::StatusCode::from_u16(self.kind.status()).expect("valid status");
        (status, Json(ErrorBody { kind: self.kind, message: self.message })).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
