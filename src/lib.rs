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
//! - [`settings`]: settings that change at run time, read lock-free per request, saved to disk.
//! - [`stats`]: counters, similarity histograms, savings, per-model and per-tenant breakdowns.
//! - [`eval`]: answer quality on labelled data, through the same lookup as the server.
//! - [`http`]: the axum routes. Only this module knows axum.

pub mod cache;
pub mod config;
pub mod context;
pub mod embed;
pub mod eval;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod index;
pub mod judge;
pub mod openai;
pub mod settings;
pub mod stats;
pub mod store;
pub mod upstream;
pub mod verify;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::cache::Cache;
use crate::config::ServeArgs;
use crate::embed::Embedder;
use crate::settings::{Settings, SettingsStore, SharedSettings};
use crate::stats::{PriceTable, Stats};
use crate::store::{every_tenth, Store, Writer};

/// How often expired entries are removed, hit counts saved and the index tidied.
const MAINTENANCE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The service, ready to serve: its router and handles on its live parts.
pub struct App {
    pub router: http::Router,
    pub settings: SharedSettings,
    pub cache: Arc<Cache>,
    pub stats: Arc<Stats>,
    /// How long requests in flight may take to finish once shutdown starts.
    pub shutdown_grace: std::time::Duration,
    pub connections: http::ConnectionLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("setting up the upstream client: {0}")]
    Upstream(#[from] upstream::Error),
    #[error("reading saved settings: {0}")]
    Settings(#[from] settings::Error),
    #[error("reading --prices: {0}")]
    Prices(String),
    #[error("opening the data directory: {0}")]
    Store(#[from] store::Error),
}

/// Builds the service from its configuration and an embedder.
pub fn app(args: &ServeArgs, embedder: Arc<dyn Embedder>) -> Result<App, SetupError> {
    let shared = args
        .redis_config()
        .map(crate::store::redis::RedisStore::new)
        .transpose()?;
    let settings_store = match &shared {
        Some(store) => SettingsStore::shared(Arc::clone(store)),
        None => SettingsStore::new(&args.data_dir),
    };
    let settings = match settings_store.load()? {
        Some(saved) => {
            tracing::info!(
                threshold = saved.threshold,
                context = saved.context.as_str(),
                "using settings saved by the admin API"
            );
            saved
        }
        None => Settings {
            threshold: args.threshold,
            verify: args.verify,
            context: args.context,
            context_threshold: args.context_threshold,
        },
    };
    let prices = match &args.prices {
        Some(path) => PriceTable::with_file(path).map_err(SetupError::Prices)?,
        None => PriceTable::default(),
    };
    let current = embedder.model_id();
    let cache = Arc::new(match &shared {
        Some(store) => Cache::with_shared_store(embedder, args.cache_config(), Arc::clone(store)),
        None => open_cache(args, embedder)?,
    });
    let settings = settings::shared(settings);
    if let Some(store) = &shared {
        // Loads in the background: until it has, requests go through as a plain proxy.
        tracing::info!(store = %crate::store::redis::redacted(&store.config().url), namespace = %args.namespace, "using a shared store");
        store.follow(Arc::downgrade(&cache), settings.clone(), current);
    }
    let stats = Arc::new(Stats::new(prices));
    let mut service = cache::Service::new(Arc::clone(&cache), Arc::clone(&stats));
    if let Some(config) = args.judge_config() {
        tracing::info!(model = %config.model, floor = config.policy.floor, max_error = config.policy.max_error, "judging uncertain candidates");
        service = service.with_judge(judge::Judge::over_http(&config)?);
    }
    let state = http::AppState {
        service: Arc::new(service),
        cache,
        upstream: Arc::new(upstream::Upstream::new(args.upstream_config())?),
        settings,
        settings_store,
        stats,
        scope: args.scope,
        body_limits: args.body_limits(),
        admin_token: args.admin_token.as_deref().map(Arc::from),
        allowed_hosts: http::AllowedHosts::new(args.listen, &args.allowed_hosts),
        admission: Arc::new(http::admission::Admission::new(
            args.max_in_flight,
            args.max_waiting,
            std::time::Duration::from_millis(args.max_wait_ms),
        )),
    };
    if state.admin_token.is_none() {
        tracing::warn!("no --admin-token: admin routes, /stats and /metrics answer only to loopback clients");
    }
    Ok(App {
        settings: state.settings.clone(),
        cache: Arc::clone(&state.cache),
        stats: Arc::clone(&state.stats),
        shutdown_grace: std::time::Duration::from_secs(args.shutdown_grace_secs),
        connections: args.connection_limits(),
        router: http::router(state),
    })
}

/// Opens the store in the data directory and loads its entries into a cache.
fn open_cache(args: &ServeArgs, embedder: Arc<dyn Embedder>) -> Result<Cache, SetupError> {
    let started = std::time::Instant::now();
    let store = Store::open(&args.data_dir)?;
    let current = embedder.model_id();
    if let Some(stored) = store.check_embedder(&current)? {
        // Vectors of two embedders cannot be compared, but the prompts are kept: embed them
        // again rather than lose the cache (one transaction: interrupted, nothing changes).
        tracing::warn!(stored = %stored, current = %current, "the store's vectors were made by another embedder: embedding its prompts again");
        let embedded = store.reembed(
            &stored,
            &current,
            |texts| {
                let vectors = embedder.embed(texts).map_err(|err| err.to_string())?;
                vectors
                    .into_iter()
                    .map(|vector| embed::usable(vector, current.dimensions).map_err(|err| err.to_string()))
                    .collect()
            },
            every_tenth("embedding the store's prompts again", "prompts", 0),
        )?;
        tracing::info!(
            prompts = embedded,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "the store's prompts are embedded with {current}"
        );
    }
    let loaded = store.load(every_tenth("loading the store", "entries", 10_000))?;
    let loaded_records = loaded.records.len();
    let writer = Writer::start(
        store,
        args.durability,
        std::time::Duration::from_millis(args.relaxed_window_ms),
    );
    let cache = Cache::with_store(embedder, args.cache_config(), Arc::new(writer), loaded);
    tracing::info!(
        entries = cache.len(),
        loaded = loaded_records,
        elapsed_ms = started.elapsed().as_millis() as u64,
        data_dir = %args.data_dir.display(),
        "store opened"
    );
    Ok(cache)
}

/// How often a node adds its figures to the cluster's.
const CLUSTER_FIGURES_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Adds what this node counted since the last push to the figures kept for the whole cluster.
async fn push_cluster_figures(
    shared: &store::redis::RedisStore,
    stats: &Stats,
    pushed: &parking_lot::Mutex<[f64; 4]>,
) {
    let snapshot = stats.snapshot();
    let now = [
        snapshot.requests as f64,
        snapshot.hits as f64,
        snapshot.tokens_saved() as f64,
        snapshot.cost_saved_usd,
    ];
    let before = *pushed.lock();
    let names = ["requests", "hits", "tokens_saved", "cost_saved_usd"];
    let deltas: Vec<(&str, f64)> = names
        .iter()
        .zip(now.iter().zip(before))
        .map(|(name, (now, before))| (*name, now - before))
        .collect();
    if deltas.iter().all(|(_, delta)| *delta == 0.0) {
        return;
    }
    if shared.add_cluster_figures(&deltas).await.is_ok() {
        *pushed.lock() = now;
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then finishes in-flight requests.
pub async fn run(
    app: App,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stats = Arc::clone(&app.stats);
    let ticker = tokio::spawn(async move {
        let mut interval = tokio::time::interval(stats::HISTORY_INTERVAL);
        interval.tick().await;
        loop {
            interval.tick().await;
            stats.tick();
        }
    });
    // Each node adds its figures to the cluster's, every second and once more at the end.
    let pushed = Arc::new(parking_lot::Mutex::new([0.0; 4]));
    let pusher = app.cache.shared().map(|shared| {
        let (shared, stats, pushed) = (Arc::clone(shared), Arc::clone(&app.stats), Arc::clone(&pushed));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CLUSTER_FIGURES_INTERVAL).await;
                push_cluster_figures(&shared, &stats, &pushed).await;
            }
        })
    });
    let cache = Arc::clone(&app.cache);
    let upkeep = tokio::spawn(async move {
        loop {
            let cache = Arc::clone(&cache);
            let _ = tokio::task::spawn_blocking(move || cache.maintain()).await;
            tokio::time::sleep(MAINTENANCE_INTERVAL).await;
        }
    });
    // Once the signal comes, no new connections are taken and requests in flight get the
    // grace period to finish; then whatever is left is dropped, and the store is closed either
    // way, so every acknowledged entry is on disk.
    let (signalled, signal) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = signalled.send(());
    };
    let serving = http::serve(listener, app.router, app.connections, shutdown);
    let grace = app.shutdown_grace;
    let grace_over = async move {
        if signal.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = serving => {}
        () = grace_over => {
            tracing::warn!(grace_secs = grace.as_secs(), "requests still in flight after the grace period are dropped");
        }
    }
    ticker.abort();
    upkeep.abort();
    if let Some(pusher) = pusher {
        pusher.abort();
    }
    if let Some(shared) = app.cache.shared() {
        push_cluster_figures(shared, &app.stats, &pushed).await;
    }
    if let Err(err) = app.cache.close_store().await {
        tracing::error!(error = %err, "could not close the store at shutdown");
    }
    Ok(())
}
