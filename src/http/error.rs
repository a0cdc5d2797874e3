//! Errors as clients see them: OpenAI's error shape, so that OpenAI SDKs parse them.

use axum::http::StatusCode;
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
    #[error("header {header}: {message}")]
    BadHeader { header: &'static str, message: String },
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
}

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
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let message = match &self {
            // Transport errors can carry internal addresses; the client gets a plain sentence.
            ApiError::Upstream(upstream::Error::Transport(_)) => {
                "semcache could not reach the upstream API.".to_owned()
            }
            other => other.to_string(),
        };
        (status, Json(error_body(&message, kind, code, param.as_deref()))).into_response()
    }
}
