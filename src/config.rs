//! Command-line and environment configuration, validated once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::cache::Eviction;
use crate::embed::Backend;
use crate::store::Durability;

#[derive(Debug, Parser)]
#[command(
    name = "semcache",
    version,
    about = "A semantic cache for LLM calls that speaks the OpenAI API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the caching proxy.
    Serve(Box<ServeArgs>),
    /// Measure answer quality on labelled data, through the server's own lookup.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Recommend the lowest threshold that keeps wrong hits on labelled pairs under a rate.
    Calibrate(CalibrateArgs),
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Labelled pairs, JSONL `{"a": ..., "b": ..., "duplicate": true|false}`: store `a`, ask
    /// `b`; report recall, false-hit rate and precision per threshold.
    Pairs(EvalPairsArgs),
    /// Intent-labelled queries, CSV `text,category`: store every training query, ask every test
    /// query; report hit rate and the share of hits with another intent.
    Intents(EvalIntentsArgs),
    /// Labelled pairs of chats, JSONL `{"id", "kind", "should_hit", "stored": [messages],
    /// "asked": [messages]}`: store the answer to `stored`, ask `asked`; report should-hit
    /// pairs and traps served, per kind and per threshold.
    Conversations(EvalConversationsArgs),
}

/// The default similarity a conversation needs in the semantic context mode. Lower than the
/// single-message threshold because what is compared by meaning is the request with the turn it
/// refers back to, while the conversation matcher refuses earlier details and decisions that
/// differ. On the team's conversation suite (`semcache eval conversations
/// tests/data/conversations.jsonl --context semantic`), 0.70 served 47.8% of the follow-ups that
/// should hit with 2.2% of the traps, against 36.7% / 2.2% at 0.82, and no other conversation's
/// answer (of the same bot) would have been served; at 0.68 two were, both wrong.
pub const DEFAULT_CONTEXT_THRESHOLD: f32 = 0.70;

/// Which model runs, and how.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Embedding backend that runs the model.
    #[arg(long, env = "SEMCACHE_EMBEDDER", value_enum, default_value_t = Backend::DEFAULT)]
    pub embedder: Backend,

    /// Folder holding the embedding model (config.json, tokenizer files, model.safetensors
    /// for candle, model_int8.onnx and model.onnx with their .data weights for ONNX Runtime,
    /// 1_Pooling/config.json).
    #[arg(long, env = "SEMCACHE_MODEL_DIR", default_value = "models/all-MiniLM-L6-v2")]
    pub model_dir: PathBuf,

    /// ONNX Runtime's shared library, for the onnx backends [default: onnxruntime/libonnxruntime.so
    /// beside the model folder, where `models/fetch` puts it].
    #[arg(long, env = "SEMCACHE_ONNXRUNTIME")]
    pub onnxruntime: Option<PathBuf>,
}

impl ModelArgs {
    pub fn paths(&self) -> crate::embed::ModelPaths {
        crate::embed::ModelPaths {
            model_dir: self.model_dir.clone(),
            onnxruntime: self.onnxruntime.clone(),
        }
    }
}

/// Options every evaluation takes.
#[derive(Debug, Clone, Parser)]
pub struct EvalOptions {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Thresholds to report, FROM:TO:STEP.
    #[arg(long, default_value = "0.70:0.98:0.02", value_parser = crate::eval::Grid::parse)]
    pub thresholds: crate::eval::Grid,

    /// The serving threshold, marked in the table (and added to the grid if missing).
    #[arg(long, default_value_t = 0.82)]
    pub threshold: f32,

    /// Evaluate this many items chosen at random instead of all of them.
    #[arg(long)]
    pub sample: Option<usize>,

    /// Seed for --sample.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,

    /// Also draw the curves to this PNG file.
    #[arg(long)]
    pub plot: Option<PathBuf>,

    /// TrueType font for the plot's labels (a system font is looked for otherwise).
    #[arg(long)]
    pub font: Option<PathBuf>,

    /// Also serve the queries through the judge named by --judge-model (at --judge-upstream,
    /// by default the OpenAI API with OPENAI_API_KEY), against the verifier alone.
    #[command(flatten)]
    pub judge: JudgeArgs,

    /// Also serve them through a judge simulated from the labels, right this share of the
    /// time, one row per value: e.g. 0.90,0.95,0.99.
    #[arg(long, value_delimiter = ',')]
    pub judge_simulated: Vec<f64>,
}

/// The judge's API when an eval names a model without --judge-upstream.
pub const DEFAULT_JUDGE_API: &str = "https://api.openai.com/v1";

impl EvalOptions {
    /// Whether the eval is to run through a judge too.
    pub fn judged(&self) -> bool {
        self.judge.judge_model.is_some() || !self.judge_simulated.is_empty()
    }

    pub fn validate(&self) -> Result<(), String> {
        self.judge.validate()?;
        if let Some(accuracy) = self
            .judge_simulated
            .iter()
            .find(|accuracy| !(0.0..=1.0).contains(*accuracy))
        {
            return Err(format!(
                "--judge-simulated takes shares within [0, 1], got {accuracy}"
            ));
        }
        Ok(())
    }

    /// The judge's policy (also for simulated judges).
    pub fn judge_policy(&self) -> crate::judge::Policy {
        crate::judge::Policy {
            floor: self.judge.judge_floor,
            max_error: self.judge.judge_max_error,
        }
    }

    /// The real judge's settings, when --judge-model names one.
    pub fn judge_config(&self) -> Option<crate::judge::Config> {
        let key = std::env::var("OPENAI_API_KEY").ok();
        self.judge.config(DEFAULT_JUDGE_API, key.as_deref())
    }
}

#[derive(Debug, Clone, Parser)]
pub struct EvalPairsArgs {
    /// JSONL file of labelled pairs.
    pub file: PathBuf,
    #[command(flatten)]
    pub options: EvalOptions,
}

#[derive(Debug, Clone, Parser)]
pub struct EvalConversationsArgs {
    /// JSONL file of labelled conversation pairs (e.g. tests/data/conversations.jsonl).
    pub file: PathBuf,
    /// How earlier turns are compared: `exact` (as the server keys them) or `semantic` (the
    /// conversation matcher: the request and what it refers back to by meaning, earlier
    /// details and decisions by contrast).
    #[arg(long, value_enum, default_value_t = ContextMode::Exact)]
    pub context: ContextMode,
    /// With `--context semantic`, the serving threshold for conversations, marked in the table
    /// (and added to the grid if missing) in place of --threshold.
    #[arg(long, default_value_t = DEFAULT_CONTEXT_THRESHOLD)]
    pub context_threshold: f32,
    #[command(flatten)]
    pub options: EvalOptions,
}

/// How a conversation's earlier turns are compared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContextMode {
    /// Every earlier message is part of the context fingerprint, word for word.
    #[default]
    Exact,
    /// The user and assistant turns are compared by meaning, with the last message; the
    /// model, system prompt, tools and parameters stay exact.
    Semantic,
}

impl ContextMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ContextMode::Exact => "exact",
            ContextMode::Semantic => "semantic",
        }
    }
}

#[derive(Debug, Clone, Parser)]
pub struct EvalIntentsArgs {
    /// CSV file of queries to store.
    pub train: PathBuf,
    /// CSV file of queries to ask.
    pub test: PathBuf,
    #[command(flatten)]
    pub options: EvalOptions,
}

#[derive(Debug, Clone, Parser)]
pub struct CalibrateArgs {
    /// JSONL file of labelled pairs, as for `eval pairs`.
    pub file: PathBuf,

    /// Highest acceptable share of non-duplicates served, e.g. 0.05.
    #[arg(long)]
    pub max_false_hit_rate: f64,

    /// Whether semantic hits pass the hit verifier, as in `serve --verify`.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub verify: bool,

    #[command(flatten)]
    pub model: ModelArgs,

    /// Calibrate on this many pairs chosen at random instead of all of them.
    #[arg(long)]
    pub sample: Option<usize>,

    /// Seed for --sample.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// How cached entries are partitioned between clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scope {
    /// Each bearer key sees only the answers cached for that key.
    Tenant,
    /// All clients share one cache. Only for deployments with a single trusted application.
    Shared,
}

#[derive(Debug, Clone, Parser)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SEMCACHE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Base URL of the OpenAI-compatible upstream, including the version path.
    #[arg(long, env = "SEMCACHE_UPSTREAM", default_value = "https://api.openai.com/v1")]
    pub upstream: String,

    /// API key sent to the upstream. When unset, each client's own Authorization header is
    /// forwarded.
    #[arg(long, env = "SEMCACHE_UPSTREAM_API_KEY", hide_env_values = true)]
    pub upstream_api_key: Option<String>,

    #[command(flatten)]
    pub model: ModelArgs,

    /// Cosine similarity at or above which an earlier prompt's answer is served.
    #[arg(long, env = "SEMCACHE_THRESHOLD", default_value_t = 0.82)]
    pub threshold: f32,

    /// Check semantic hits with the hit verifier (negation, numbers, dates, names, quantifiers).
    #[arg(long, env = "SEMCACHE_VERIFY", default_value_t = true, action = clap::ArgAction::Set)]
    pub verify: bool,

    /// How a conversation's earlier turns are compared: `exact` (word for word, part of the
    /// context) or `semantic` (by meaning, with the last message; details and decisions that
    /// differ refuse).
    #[arg(long, env = "SEMCACHE_CONTEXT", value_enum, default_value_t = ContextMode::Exact)]
    pub context: ContextMode,

    /// In the semantic context mode, the similarity at or above which a conversation's answer
    /// is served (its request with what it refers back to); --threshold stays for single
    /// messages.
    #[arg(long, env = "SEMCACHE_CONTEXT_THRESHOLD", default_value_t = DEFAULT_CONTEXT_THRESHOLD)]
    pub context_threshold: f32,

    /// Folder for the cache's durable data (the embedded store and saved settings), unless
    /// --store names a shared one.
    #[arg(long, env = "SEMCACHE_DATA_DIR", default_value = "./semcache-data")]
    pub data_dir: PathBuf,

    /// A store shared by several nodes: `redis://[user:password@]host:port[/db]`, or
    /// `rediss://` for TLS (Redis or Valkey 7, standalone, no modules). Without it, entries are
    /// kept in the data directory.
    #[arg(long, env = "SEMCACHE_STORE", hide_env_values = true)]
    pub store: Option<String>,

    /// With --store: the name under which this cache's keys are kept, so that several caches
    /// can share one Redis.
    #[arg(long, env = "SEMCACHE_NAMESPACE", default_value = "semcache")]
    pub namespace: String,

    /// With --store: how long one node's upstream call holds off identical requests on the
    /// other nodes, in milliseconds; they make their own call after it.
    #[arg(long, env = "SEMCACHE_LEASE_MS", default_value_t = 30_000)]
    pub lease_ms: u64,

    /// Whether cached answers are partitioned per client key (tenant) or shared by everyone.
    #[arg(long, env = "SEMCACHE_SCOPE", value_enum, default_value_t = Scope::Tenant)]
    pub scope: Scope,

    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "SEMCACHE_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Default lifetime of an entry in seconds; 0 keeps entries until evicted. A request's
    /// `Cache-Control: max-age=N` sets the lifetime of the entry it stores.
    #[arg(long, env = "SEMCACHE_TTL", default_value_t = 7 * 24 * 3600)]
    pub ttl: u64,

    /// Most entries kept; past it, entries are evicted by --eviction. 0: no bound.
    #[arg(long, env = "SEMCACHE_MAX_ENTRIES", default_value_t = 100_000)]
    pub max_entries: usize,

    /// Which entry goes when the cache is full: least recently or least frequently used.
    #[arg(long, env = "SEMCACHE_EVICTION", value_enum, default_value_t = Eviction::Lfu)]
    pub eviction: Eviction,

    /// strict: a new entry is on disk (fsynced) before its client gets the answer. relaxed:
    /// entries are written in the background every --relaxed-window-ms; a crash can lose that
    /// window's new entries.
    #[arg(long, env = "SEMCACHE_DURABILITY", value_enum, default_value_t = Durability::Strict)]
    pub durability: Durability,

    /// With --durability relaxed: how long new entries may wait before they are written.
    #[arg(long, env = "SEMCACHE_RELAXED_WINDOW_MS", default_value_t = 1000)]
    pub relaxed_window_ms: u64,

    /// Token that opens the admin API, /stats and /metrics (`Authorization: Bearer TOKEN`).
    /// Without it, those routes answer only to clients on the loopback interface.
    #[arg(long, env = "SEMCACHE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// JSON file of model prices in dollars per million tokens,
    /// `{"model": {"input": 0.15, "output": 0.6}}`; overrides and extends the built-in table.
    #[arg(long, env = "SEMCACHE_PRICES")]
    pub prices: Option<PathBuf>,

    /// Proxied requests handled at once; 0: no bound. Past it, requests wait for a turn.
    #[arg(long, env = "SEMCACHE_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,

    /// Requests that may wait for a turn; past it, 503 with `Retry-After` at once.
    #[arg(long, env = "SEMCACHE_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,

    /// Longest wait for a turn, in milliseconds; then 503 with `Retry-After`.
    #[arg(long, env = "SEMCACHE_MAX_WAIT_MS", default_value_t = 1000)]
    pub max_wait_ms: u64,

    /// Seconds requests in flight get to finish after SIGTERM/SIGINT; then they are dropped and
    /// the store is closed.
    #[arg(long, env = "SEMCACHE_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace_secs: u64,

    /// Threads running embedding passes (each batches what has queued); 0: as many as the
    /// backend runs at once (onnx: one pass on every core; candle: one pass per core).
    #[arg(long, env = "SEMCACHE_EMBED_WORKERS", default_value_t = 0)]
    pub embed_workers: usize,

    /// Most client connections open at once; past it, new ones wait to be accepted.
    #[arg(long, env = "SEMCACHE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Seconds a client gets to send a request's headers; then its connection is closed.
    #[arg(long, env = "SEMCACHE_HEADER_TIMEOUT", default_value_t = 10)]
    pub header_timeout_secs: u64,

    /// Seconds a request body gets before --min-body-rate applies; a body that falls behind
    /// gets 408.
    #[arg(long, env = "SEMCACHE_BODY_TIMEOUT", default_value_t = 10)]
    pub body_timeout_secs: u64,

    /// Least pace of a request body after --body-timeout-secs, in bytes per second.
    #[arg(long, env = "SEMCACHE_MIN_BODY_RATE", default_value_t = 16 * 1024)]
    pub min_body_rate: u64,

    /// Seconds a keep-alive connection may stay open with no request in flight.
    #[arg(long, env = "SEMCACHE_IDLE_TIMEOUT", default_value_t = 60)]
    pub idle_timeout_secs: u64,

    /// Host names (besides loopback addresses, `localhost` and the listen address) that
    /// operator routes answer to when no --admin-token is set, comma-separated. Others are
    /// refused, so that a web page cannot reach them through DNS rebinding.
    #[arg(long, env = "SEMCACHE_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,

    /// Seconds allowed to connect to the upstream.
    #[arg(long, env = "SEMCACHE_UPSTREAM_CONNECT_TIMEOUT", default_value_t = 10)]
    pub upstream_connect_timeout_secs: u64,

    /// Seconds allowed for a whole upstream call, streaming included.
    #[arg(long, env = "SEMCACHE_UPSTREAM_TIMEOUT", default_value_t = 600)]
    pub upstream_timeout_secs: u64,

    #[command(flatten)]
    pub judge: JudgeArgs,
}

/// The judge model for uncertain semantic candidates (off unless --judge-model is given).
#[derive(Debug, Clone, clap::Args)]
pub struct JudgeArgs {
    /// A model asked, through an OpenAI-compatible chat completions API, whether a semantic
    /// candidate's answer serves the new request; candidates from --judge-floor up are served
    /// only on its yes, unless their entry's learned bound says it need not be asked.
    #[arg(long, env = "SEMCACHE_JUDGE_MODEL")]
    pub judge_model: Option<String>,

    /// The judge's API base URL, including the version path [default: --upstream, with its
    /// key handling].
    #[arg(long, env = "SEMCACHE_JUDGE_UPSTREAM")]
    pub judge_upstream: Option<String>,

    /// The key sent to the judge. Without it, a judge on the main upstream gets
    /// --upstream-api-key or else the client's own key; a judge elsewhere gets none.
    #[arg(long, env = "SEMCACHE_JUDGE_API_KEY", hide_env_values = true)]
    pub judge_api_key: Option<String>,

    /// Semantic candidates from this similarity up are judged, below the threshold too.
    #[arg(long, env = "SEMCACHE_JUDGE_FLOOR", default_value_t = 0.70)]
    pub judge_floor: f32,

    /// Milliseconds a judge call may take; a slower one is a miss.
    #[arg(long, env = "SEMCACHE_JUDGE_TIMEOUT_MS", default_value_t = 2000)]
    pub judge_timeout_ms: u64,

    /// The expected share of wrong hits an entry may have, from its verdicts, to be served
    /// without asking the judge; 0: the judge is always asked.
    #[arg(long, env = "SEMCACHE_JUDGE_MAX_ERROR", default_value_t = 0.02)]
    pub judge_max_error: f32,
}

impl JudgeArgs {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.judge_floor) || self.judge_floor.is_nan() {
            return Err(format!(
                "--judge-floor must be within [0, 1], got {}",
                self.judge_floor
            ));
        }
        if !(0.0..1.0).contains(&self.judge_max_error) || self.judge_max_error.is_nan() {
            return Err(format!(
                "--judge-max-error must be within [0, 1), got {}",
                self.judge_max_error
            ));
        }
        if self.judge_timeout_ms == 0 {
            return Err("--judge-timeout-ms must be positive".to_owned());
        }
        if let Some(url) = &self.judge_upstream {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("--judge-upstream must be an http(s) URL, got {url:?}"));
            }
        }
        if self
            .judge_model
            .as_deref()
            .is_some_and(|model| model.trim().is_empty())
        {
            return Err("--judge-model must name a model".to_owned());
        }
        Ok(())
    }

    /// The judge's settings, when --judge-model names one. `upstream` and `upstream_key` are
    /// the main upstream's: the judge's defaults.
    pub fn config(&self, upstream: &str, upstream_key: Option<&str>) -> Option<crate::judge::Config> {
        let model = self.judge_model.clone()?;
        let upstream = upstream.trim_end_matches('/');
        let base_url = self
            .judge_upstream
            .as_deref()
            .map_or(upstream, |url| url.trim_end_matches('/'));
        let on_main = base_url == upstream;
        let api_key = match (&self.judge_api_key, on_main) {
            (Some(key), _) => Some(key.clone()),
            (None, true) => upstream_key.map(str::to_owned),
            (None, false) => None,
        };
        Some(crate::judge::Config {
            model,
            base_url: base_url.to_owned(),
            forwards_client_key: on_main && api_key.is_none(),
            api_key,
            timeout: Duration::from_millis(self.judge_timeout_ms),
            policy: crate::judge::Policy {
                floor: self.judge_floor,
                max_error: self.judge_max_error,
            },
        })
    }
}

impl ServeArgs {
    /// Checks what clap's types cannot express.
    pub fn validate(&self) -> Result<(), String> {
        for (flag, value) in [
            ("threshold", self.threshold),
            ("context-threshold", self.context_threshold),
        ] {
            if !(0.0..=1.0).contains(&value) || value.is_nan() {
                return Err(format!("--{flag} must be within [0, 1], got {value}"));
            }
        }
        if !(self.upstream.starts_with("http://") || self.upstream.starts_with("https://")) {
            return Err(format!(
                "--upstream must be an http(s) URL, got {:?}",
                self.upstream
            ));
        }
        if self.admin_token.as_deref().is_some_and(|token| token.len() < 16) {
            return Err("--admin-token must be at least 16 characters".to_owned());
        }
        if let Some(store) = &self.store {
            if !(store.starts_with("redis://") || store.starts_with("rediss://")) {
                // Not shown: it may hold a password.
                return Err("--store must be a redis:// or rediss:// URL".to_owned());
            }
            if redis::Client::open(store.as_str()).is_err() {
                return Err(format!(
                    "--store is not a valid Redis URL: {}",
                    crate::store::redis::redacted(store)
                ));
            }
        }
        if self.namespace.is_empty()
            || !self
                .namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "--namespace must be letters, digits, '-', '_' or '.', got {:?}",
                self.namespace
            ));
        }
        if self.lease_ms == 0 {
            return Err("--lease-ms must be positive".to_owned());
        }
        if self.max_body_bytes == 0 {
            return Err("--max-body-bytes must be positive".to_owned());
        }
        for (name, value) in [
            ("--max-connections", self.max_connections as u64),
            ("--header-timeout-secs", self.header_timeout_secs),
            ("--body-timeout-secs", self.body_timeout_secs),
            ("--min-body-rate", self.min_body_rate),
            ("--idle-timeout-secs", self.idle_timeout_secs),
        ] {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        self.judge.validate()
    }

    /// The judge's settings, when --judge-model names one.
    pub fn judge_config(&self) -> Option<crate::judge::Config> {
        self.judge
            .config(&self.upstream, self.upstream_api_key.as_deref())
    }

    pub fn cache_config(&self) -> crate::cache::Config {
        crate::cache::Config {
            max_entries: self.max_entries,
            eviction: self.eviction,
            default_ttl: (self.ttl > 0).then(|| Duration::from_secs(self.ttl)),
            embed_workers: self.embed_workers,
        }
    }

    /// The shared store's settings, when --store names one.
    pub fn redis_config(&self) -> Option<crate::store::redis::RedisConfig> {
        Some(crate::store::redis::RedisConfig {
            url: self.store.clone()?,
            namespace: self.namespace.clone(),
            max_entries: self.max_entries,
            eviction: self.eviction,
            strict: self.durability == Durability::Strict,
            lease: Duration::from_millis(self.lease_ms),
        })
    }

    pub fn body_limits(&self) -> crate::http::BodyLimits {
        crate::http::BodyLimits {
            max_bytes: self.max_body_bytes,
            grace: Duration::from_secs(self.body_timeout_secs),
            min_rate: self.min_body_rate,
        }
    }

    pub fn connection_limits(&self) -> crate::http::ConnectionLimits {
        crate::http::ConnectionLimits {
            max_connections: self.max_connections,
            header_timeout: Duration::from_secs(self.header_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
        }
    }

    pub fn upstream_config(&self) -> crate::upstream::Config {
        crate::upstream::Config {
            base_url: self.upstream.trim_end_matches('/').to_owned(),
            api_key: self.upstream_api_key.clone(),
            connect_timeout: Duration::from_secs(self.upstream_connect_timeout_secs),
            timeout: Duration::from_secs(self.upstream_timeout_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(extra: &[&str]) -> Result<(), String> {
        let mut args = vec!["serve"];
        args.extend_from_slice(extra);
        ServeArgs::parse_from(args).validate()
    }

    #[test]
    fn bad_stores_and_namespaces_are_refused_without_showing_the_password() {
        assert_eq!(serve(&["--store", "redis://127.0.0.1:6379/0"]), Ok(()));
        assert_eq!(serve(&["--store", "rediss://:pw@cache.internal:6380"]), Ok(()));
        let err = serve(&["--store", "http://:hunter2secret@10.0.0.1:6379"]).unwrap_err();
        assert!(
            err.contains("redis://") && !err.contains("hunter2secret"),
            "{err}"
        );
        let err = serve(&["--store", "redis://:hunter2secret@[::1:6379"]).unwrap_err();
        assert!(
            err.contains("not a valid Redis URL") && !err.contains("hunter2secret"),
            "{err}"
        );
        assert!(serve(&["--namespace", "a b"])
            .unwrap_err()
            .contains("--namespace"));
        assert!(serve(&["--namespace", ""]).is_err());
        assert!(serve(&["--lease-ms", "0"]).is_err());
    }
}
