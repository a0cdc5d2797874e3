//! # semcache
//!
//! A semantic cache for LLM calls. It speaks the OpenAI API: set it as the OpenAI base URL, and
//! chat completions whose prompt means the same as an earlier one, in the same context and for
//! the same client, are answered from the cache.
//!
//! # Layout
//!
//! - [`config`]: command line and environment, validated once at start.
//! - [`embed`]: the `Embedder` trait and the candle BERT backend.
//! - [`index`]: vectors partitioned by tenant and context; exact search for small partitions,
//!   HNSW for large ones.
//! - [`cache`]: the policy: keys, exact and semantic lookup, insertion, coalescing.
//! - [`openai`]: OpenAI wire formats: request validation and fingerprinting, SSE.
//! - [`upstream`]: the OpenAI-compatible client.
//! - [`settings`]: settings that change at run time, read lock-free per request.
//! - [`http`]: the axum routes. Only this module knows axum.

pub mod cache;
pub mod config;
pub mod embed;
pub mod http;
pub mod index;
pub mod openai;
pub mod settings;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::cache::Cache;
use crate::config::ServeArgs;
use crate::embed::Embedder;
use crate::settings::{Settings, SharedSettings};

/// The service, ready to serve: its router and handles on its live parts.
pub struct App {
    pub router: axum::Router,
    pub settings: SharedSettings,
    pub cache: Arc<Cache>,
}

/// Builds the service from its configuration and an embedder.
pub fn app(args: &ServeArgs, embedder: Arc<dyn Embedder>) -> Result<App, upstream::Error> {
    let state = http::AppState {
        cache: Arc::new(Cache::new(embedder)),
        upstream: Arc::new(upstream::Upstream::new(args.upstream_config())?),
        settings: settings::shared(Settings {
            threshold: args.threshold,
        }),
        scope: args.scope,
        max_body_bytes: args.max_body_bytes,
    };
    Ok(App {
        settings: state.settings.clone(),
        cache: Arc::clone(&state.cache),
        router: http::router(state),
    })
}

/// Serves `app` on `listener` until `shutdown` completes, then finishes in-flight requests.
pub async fn run(
    app: axum::Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}
