//! The HTTP edge: axum routers and the shared application state. Only this module knows axum.

mod admin;
pub mod admission;
mod error;
mod openai;
mod stats;

use std::sync::Arc;

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{any, delete, get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::trace::TraceLayer;

pub use error::ApiError;

use crate::cache::Cache;
use crate::config::Scope;
use crate::settings::{SettingsStore, SharedSettings};
use crate::stats::Stats;
use crate::upstream::Upstream;

#[derive(Clone)]
pub struct AppState {
    pub cache: Arc<Cache>,
    pub upstream: Arc<Upstream>,
    pub settings: SharedSettings,
    pub settings_store: SettingsStore,
    pub stats: Arc<Stats>,
    pub scope: Scope,
    pub max_body_bytes: usize,
    pub admin_token: Option<Arc<str>>,
    pub admission: Arc<admission::Admission>,
}

pub fn router(state: AppState) -> Router {
    // Operator routes sit behind the admin guard. The dashboard page itself holds no data; it
    // calls these routes, sending the admin token when the operator enters one.
    let operator = Router::new()
        .route("/admin/config", get(admin::get_config).patch(admin::patch_config))
        .route("/admin/entries", get(admin::list_entries))
        .route("/admin/entries/{id}", delete(admin::delete_entry))
        .route("/admin/entries/{id}/feedback", post(admin::entry_feedback))
        .route("/admin/flush", post(admin::flush))
        .route("/admin/invalidate", post(admin::invalidate))
        .route("/stats", get(stats::stats))
        .route("/metrics", get(stats::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), admin::guard));
    // Proxied calls are shed under overload; health, feedback and operator routes never are.
    let proxied = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/{*rest}", any(openai::forward))
        .route_layer(middleware::from_fn_with_state(state.clone(), admission::admit));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/dashboard", get(dashboard))
        .route("/v1/semcache/feedback", post(openai::feedback))
        .merge(proxied)
        .merge(operator)
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// A threshold as operators typed it: `0.9`, not the f32's `0.8999999761581543`.
fn rounded(threshold: f32) -> f64 {
    (f64::from(threshold) * 1e6).round() / 1e6
}

/// The service answers only once the model is loaded, so being up means being ready.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn dashboard() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
        ],
        include_str!("dashboard.html"),
    )
}
