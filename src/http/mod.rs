//! The HTTP edge: axum routers and the shared application state. Only this module knows axum.

mod admin;
pub mod admission;
mod auth;
mod body;
mod error;
mod guard;
mod json;
mod openai;
mod serve;
mod stats;

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{any, delete, get, post};
use axum::Json;
use serde_json::json;
use tower_http::trace::TraceLayer;

/// The service's routes, for whoever serves them ([`serve`], or a test's `oneshot`).
pub use axum::Router;
pub use body::BodyLimits;
pub use error::ApiError;
pub use guard::AllowedHosts;
pub use serve::{serve, ConnectionLimits};

use crate::cache::{Cache, Service};
use crate::config::Scope;
use crate::settings::{SettingsStore, SharedSettings};
use crate::stats::Stats;
use crate::upstream::Upstream;

#[derive(Clone)]
pub struct AppState {
    /// The caching core; `cache` and `stats` are its parts, for the operator routes.
    pub service: Arc<Service>,
    pub cache: Arc<Cache>,
    pub upstream: Arc<Upstream>,
    pub settings: SharedSettings,
    pub settings_store: SettingsStore,
    pub stats: Arc<Stats>,
    pub scope: Scope,
    pub body_limits: BodyLimits,
    pub admin_token: Option<Arc<str>>,
    pub allowed_hosts: AllowedHosts,
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
        .route_layer(middleware::from_fn_with_state(state.clone(), guard::guard));
    // Proxied calls are shed under overload; health, feedback and operator routes never are.
    let proxied = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/responses", post(openai::responses))
        .route("/v1/{*rest}", any(openai::forward))
        .route_layer(middleware::from_fn_with_state(state.clone(), admission::admit));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/dashboard", get(dashboard))
        .route("/v1/semcache/feedback", post(openai::feedback))
        .merge(proxied)
        .merge(operator)
        // Outermost but for tracing: every body is read whole, within its limits, before the
        // admission queue or any handler sees the request.
        .layer(middleware::from_fn_with_state(state.clone(), body::buffered))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// A threshold as operators typed it: `0.9`, not the f32's `0.8999999761581543`.
fn rounded(threshold: f32) -> f64 {
    (f64::from(threshold) * 1e6).round() / 1e6
}

/// The service answers only once the model is loaded, so being up means being ready. A store
/// that can no longer keep entries makes it `degraded`: still answering (from memory and the
/// upstream), still 200, so that a load balancer keeps a working proxy in service, but saying
/// why, for whoever watches.
async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    match state.cache.store_lost() {
        None => Json(json!({"status": "ok"})),
        Some(reason) => Json(json!({"status": "degraded", "store": reason})),
    }
}

const DASHBOARD: &str = include_str!("dashboard.html");

/// The dashboard's Content-Security-Policy: its one inline script by hash, nothing loaded from
/// elsewhere, requests to this server only, and never inside a frame.
fn dashboard_csp() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        use base64::Engine;
        use sha2::Digest;
        let script = DASHBOARD
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(script, _)| script);
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
        format!(
            "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
             img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'"
        )
    })
}

async fn dashboard() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
            (CONTENT_SECURITY_POLICY, dashboard_csp()),
            (X_FRAME_OPTIONS, "DENY"),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (REFERRER_POLICY, "no-referrer"),
        ],
        DASHBOARD,
    )
}
