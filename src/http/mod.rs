//! The HTTP edge: axum routers and the shared application state. Only this module knows axum.

mod error;
mod openai;

use std::sync::Arc;

use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::trace::TraceLayer;

pub use error::ApiError;

use crate::cache::Cache;
use crate::config::Scope;
use crate::settings::SharedSettings;
use crate::upstream::Upstream;

#[derive(Clone)]
pub struct AppState {
    pub cache: Arc<Cache>,
    pub upstream: Arc<Upstream>,
    pub settings: SharedSettings,
    pub scope: Scope,
    pub max_body_bytes: usize,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/{*rest}", any(openai::forward))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// The service answers only once the model is loaded, so being up means being ready.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}
