//! Errors as clients see them: OpenAI's error shape, so that OpenAI SDKs parse them.

use axum::http::header::{CONNECTION, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::openai::Invalid;
use crate::upstream;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{}", .0.message)]
    InvalidRequest(Invalid),
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body")]
    BodyUnreadable,
    #[error("the request body did not arrive in time: it must start within {grace_secs} s and then arrive at {min_rate} bytes per second at least")]
    BodyTimeout { grace_secs: u64, min_rate: u64 },
    #[error("{0}")]
    BadApiKey(&'static str),
    #[error("the path {0:?} is refused: it holds dot segments or backslashes (encoded or not), which could leave the upstream's base path")]
    BadPath(String),
    #[error("{0}")]
    UnsupportedMediaType(&'static str),
    #[error("header {header}: {message}")]
    BadHeader { header: &'static str, message: String },
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    #[error("this route needs the admin token: `Authorization: Bearer <admin token>`")]
    Unauthorized,
    #[error("admin routes answer only to loopback clients unless semcache runs with --admin-token")]
    Forbidden,
    #[error("{0}")]
    CrossSite(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the embedding model failed: {0}")]
    Embedding(#[from] crate::embed::Error),
    #[error("could not save the settings")]
    Persist(#[from] crate::settings::Error),
    #[error("the cache's store cannot be reached now; nothing was changed or only part of it. Retry when /healthz says ok.")]
    Store(String),
    #[error("semcache is overloaded: too many requests in flight and waiting. Retry after {OVERLOAD_RETRY_AFTER_SECS} s.")]
    Overloaded,
}

impl From<crate::cache::Error> for ApiError {
    fn from(err: crate::cache::Error) -> Self {
        match err {
            crate::cache::Error::Embed(err) => ApiError::Embedding(err),
            other => ApiError::Store(other.to_string()),
        }
    }
}

/// What an overloaded service tells clients to wait, in seconds.
pub const OVERLOAD_RETRY_AFTER_SECS: u64 = 1;

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, Option<&'static str>, Option<String>) {
        match self {
            ApiError::InvalidRequest(invalid) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                invalid.param.clone(),
            ),
            ApiError::BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
                None,
            ),
            ApiError::BodyUnreadable => (StatusCode::BAD_REQUEST, "invalid_request_error", None, None),
            ApiError::BodyTimeout { .. } => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                Some("request_timeout"),
                None,
            ),
            ApiError::BadApiKey(_) => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                None,
            ),
            ApiError::BadPath(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_path"),
                None,
            ),
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                Some("unsupported_media_type"),
                None,
            ),
            ApiError::BadHeader { header, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_header"),
                Some((*header).to_owned()),
            ),
            ApiError::Upstream(upstream::Error::Timeout) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                Some("upstream_timeout"),
                None,
            ),
            ApiError::Upstream(upstream::Error::Transport(_)) => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Some("upstream_unreachable"),
                None,
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_admin_token"),
                None,
            ),
            ApiError::Forbidden => (
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("loopback_only"),
                None,
            ),
            ApiError::CrossSite(_) => (
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("cross_site_refused"),
                None,
            ),
            ApiError::NotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("not_found"),
                None,
            ),
            ApiError::Embedding(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None),
            ApiError::Persist(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None),
            ApiError::Store(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("store_unavailable"),
                None,
            ),
            ApiError::Overloaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("overloaded"),
                None,
            ),
        }
    }
}

/// The JSON body of an error, also used inside a broken stream's final event.
pub fn error_body(message: &str, kind: &str, code: Option<&str>, param: Option<&str>) -> serde_json::Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, code, param) = self.parts();
        // Internal errors can name addresses and paths: they are logged once, and the client
        // gets a plain sentence.
        let message = match &self {
            ApiError::Upstream(upstream::Error::Transport(detail)) => {
                tracing::warn!(%detail, "upstream unreachable");
                "semcache could not reach the upstream API.".to_owned()
            }
            ApiError::Embedding(detail) => {
                tracing::error!(%detail, "embedding failed");
                "semcache's embedding model failed.".to_owned()
            }
            ApiError::Store(detail) => {
                tracing::error!(%detail, "the store failed an operator's change");
                self.to_string()
            }
            ApiError::Persist(detail) => {
                tracing::error!(%detail, "saving settings failed");
                self.to_string()
            }
            other => {
                if status.is_server_error() {
                    tracing::warn!(error = %other, "request failed");
                }
                other.to_string()
            }
        };
        let mut response = (status, Json(error_body(&message, kind, code, param.as_deref()))).into_response();
        match self {
            ApiError::Overloaded => {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(OVERLOAD_RETRY_AFTER_SECS));
            }
            // The rest of the body may still be on its way: the connection cannot be reused.
            ApiError::BodyTimeout { .. } => {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}
