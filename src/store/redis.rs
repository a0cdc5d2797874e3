//! The store shared by several nodes: plain Redis or Valkey 7, no modules.
//!
//! Redis is the source of truth and every node holds a replica of it in memory (entries and
//! their vectors, in the node's own HNSW index), fed by a change log kept in Redis (a stream).
//! Semantic search stays in-process; Redis is asked one question per hit, whether the entry is
//! still there, so that nothing expired, evicted or removed is served by any node, even one
//! whose replica is behind.
//!
//! Keys, under `NAMESPACE:`:
//! - `e:ID`: an entry, a hash: `r` the record (postcard, with its vector), `x` its exact key,
//!   `t` its tenant, `h` hits, `l` last use (ms), `th` its own threshold, `w` wrong reports.
//!   Its lifetime is Redis's own expiry.
//! - `x:EXACT`: the id of the entry stored for an exact key, with the same expiry.
//! - `ids`: every entry id, ranked for eviction (LRU: last use; LFU: decayed hit count).
//! - `log`: the change log (`put`, `del`, `fb`, `set`), each line numbered from `seq`, trimmed
//!   to about [`LOG_LENGTH`].
//! - `meta`: format version, the embedder that made the vectors, the LFU epoch.
//! - `settings`: the live settings; `l:EXACT`: a lease on an upstream call; `stats`: figures
//!   summed over every node.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncTypedCommands, Script, Value};
use tokio::sync::{mpsc, oneshot};

use super::{scripts, upgrades_from, EntryStore, Error, Loaded, Op, Record, FORMAT_VERSION};
use crate::cache::{Cache, Eviction};
use crate::embed::EmbedderId;
use crate::settings::{Settings, SharedSettings};

/// About how many changes the log keeps. A node that falls further behind loads everything
/// again.
pub const LOG_LENGTH: usize = 100_000;

/// Entries read or fetched per round trip.
const BATCH: usize = 500;

/// How long the follower's read waits for new changes before asking again.
const FOLLOW_BLOCK: Duration = Duration::from_millis(500);

/// LFU ranks halve every this long: each hit adds 2^(age of the namespace / half-life), so
/// that recent hits outweigh old ones without rewriting every rank.
const LFU_HALF_LIFE_MS: f64 = 24.0 * 3600.0 * 1000.0;

/// Most doublings of the LFU increment: 2^1000 leaves room for many hits before a rank
/// overflows an f64.
const LFU_MAX_DOUBLINGS: f64 = 1000.0;

/// Replication lags kept for the percentiles in `/stats`.
const LAGS_KEPT: usize = 1024;

/// Where the shared store is and how it is used.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub url: String,
    pub namespace: String,
    /// Most entries across the cluster; 0: no bound (Redis's `maxmemory` policy then decides).
    pub max_entries: usize,
    pub eviction: Eviction,
    /// Wait for Redis's append-only file before acknowledging an entry, where it can be asked
    /// (`WAITAOF`, Redis 7.2 and later).
    pub strict: bool,
    /// How long a lease on an upstream call lasts; waiters on other nodes give up after it.
    pub lease: Duration,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redacted(&self.url))
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// A Redis URL fit to show: the password (and user) replaced.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// Key names under the namespace; the fixed ones made once.
struct Keys {
    prefix: String,
    ids: String,
    log: String,
    seq: String,
    meta: String,
    settings: String,
    stats: String,
}

impl Keys {
    fn new(namespace: &str) -> Self {
        let prefix = format!("{namespace}:");
        let named = |name: &str| format!("{prefix}{name}");
        Self {
            ids: named("ids"),
            log: named("log"),
            seq: named("seq"),
            meta: named("meta"),
            settings: named("settings"),
            stats: named("stats"),
            prefix,
        }
    }
    fn entry(&self, id: u64) -> String {
        format!("{}e:{id}", self.prefix)
    }
    fn exact(&self, exact: &[u8; 32]) -> String {
        format!("{}x:{}", self.prefix, hex::encode(exact))
    }
    fn lease(&self, exact: &[u8; 32]) -> String {
        format!("{}l:{}", self.prefix, hex::encode(exact))
    }
}

/// How the replica is doing, for `/stats` and `/metrics`.
#[derive(Default)]
pub struct Replication {
    /// Changes applied from the log.
    pub applied: AtomicU64,
    /// Whole loads: at start, after Redis came back, or after falling behind the log.
    pub loads: AtomicU64,
    /// Entries held after the last load.
    pub loaded: AtomicU64,
    lags_ms: Mutex<VecDeque<u64>>,
}

impl Replication {
    fn lag(&self, ms: u64) {
        let mut lags = self.lags_ms.lock();
        if lags.len() == LAGS_KEPT {
            lags.pop_front();
        }
        lags.push_back(ms);
    }

    /// The 50th and 99th percentiles of the last lags, from a store on any node to its
    /// change being applied here, in milliseconds.
    pub fn lag_percentiles(&self) -> Option<(u64, u64)> {
        let mut lags: Vec<u64> = self.lags_ms.lock().iter().copied().collect();
        if lags.is_empty() {
            return None;
        }
        lags.sort_unstable();
        let at = |q: f64| lags[((lags.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.99)))
    }
}

enum Queued {
    Op(Op),
    Flushed(oneshot::Sender<()>),
}

/// A lease on an upstream call, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// This node makes the call; its answer ends the lease.
    Granted(String),
    /// Another node is making it.
    Held,
}

pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    keys: Keys,
    config: RedisConfig,
    available: AtomicBool,
    /// Why the store cannot be used now, if it cannot.
    problem: Mutex<Option<String>>,
    failures: AtomicU64,
    queue: mpsc::UnboundedSender<Queued>,
    /// When the namespace was made: LFU increments grow from it.
    epoch_ms: AtomicU64,
    /// Whether the server answers `WAITAOF`.
    waitaof: AtomicBool,
    pub replication: Replication,
    put: Script,
    remove: Script,
    confirm: Script,
    exact: Script,
    feedback: Script,
    settings: Script,
    position: Script,
    release: Script,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn redis_error(err: redis::RedisError) -> Error {
    // The client's errors name the command and the server's reply, never the URL.
    Error::Db(format!("redis: {err}"))
}

impl RedisStore {
    /// Makes the client; connects lazily, so that a node starts (as a plain proxy) with Redis
    /// down. [`RedisStore::follow`] then loads the entries and follows the log.
    pub fn new(config: RedisConfig) -> Result<Arc<Self>, Error> {
        let client = redis::Client::open(config.url.as_str()).map_err(|err| Error::Open {
            path: redacted(&config.url).into(),
            message: err.to_string(),
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config).map_err(redis_error)?;
        let (queue, queued) = mpsc::unbounded_channel();
        let store = Arc::new(Self {
            client,
            conn,
            keys: Keys::new(&config.namespace),
            config,
            available: AtomicBool::new(false),
            problem: Mutex::new(Some("not connected to Redis yet".to_owned())),
            failures: AtomicU64::new(0),
            queue,
            epoch_ms: AtomicU64::new(now_ms()),
            waitaof: AtomicBool::new(false),
            replication: Replication::default(),
            put: Script::new(&scripts::put()),
            remove: Script::new(&scripts::remove()),
            confirm: Script::new(scripts::CONFIRM),
            exact: Script::new(scripts::EXACT),
            feedback: Script::new(&scripts::feedback()),
            settings: Script::new(&scripts::settings()),
            position: Script::new(scripts::POSITION),
            release: Script::new(scripts::RELEASE),
        });
        tokio::spawn(drain(Arc::downgrade(&store), queued));
        Ok(store)
    }

    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Marks the store unusable (requests go through as through a plain proxy) until the next
    /// successful load.
    fn fail(&self, why: String) {
        let was_available = self.available.swap(false, Ordering::SeqCst);
        let mut problem = self.problem.lock();
        if was_available {
            tracing::error!(error = %why, "lost the shared store: serving as a plain proxy until it is back");
        } else if problem.as_deref() != Some(why.as_str()) {
            // Said once per reason, not at every retry.
            tracing::error!(error = %why, "cannot use the shared store: serving as a plain proxy, retrying");
        }
        *problem = Some(why);
    }

    fn failed<T>(&self, err: redis::RedisError) -> Result<T, Error> {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if err.is_io_error()
            || err.is_timeout()
            || err.is_connection_dropped()
            || err.is_unrecoverable_error()
        {
            self.fail(format!("redis: {err}"));
        }
        Err(redis_error(err))
    }

    fn lfu_increment(&self, now: u64) -> f64 {
        let age = now.saturating_sub(self.epoch_ms.load(Ordering::Relaxed)) as f64;
        // Capped so that ranks stay finite: past about 2.7 years a namespace's LFU stops
        // favouring recent hits over old ones (ranks are not rescaled).
        (age / LFU_HALF_LIFE_MS).min(LFU_MAX_DOUBLINGS).exp2()
    }

    fn score(&self, now: u64) -> f64 {
        match self.config.eviction {
            Eviction::Lru => now as f64,
            Eviction::Lfu => self.lfu_increment(now),
        }
    }

    async fn put(&self, record: &Record) -> Result<(), Error> {
        let exact = record.exact_key().0 .0;
        let now = now_ms();
        let result: redis::RedisResult<u64> = self
            .put
            .key(&self.keys.ids)
            .key(&self.keys.log)
            .key(self.keys.entry(record.id))
            .key(self.keys.exact(&exact))
            .key(self.keys.lease(&exact))
            .arg(&self.keys.prefix)
            .arg(now)
            .arg(LOG_LENGTH)
            .arg(record.id)
            .arg(record.encode())
            .arg(hex::encode(exact))
            .arg(hex::encode(record.tenant))
            .arg(record.expires_ms.unwrap_or(0))
            .arg(self.score(now))
            .arg(self.config.max_entries)
            .invoke_async(&mut self.conn())
            .await;
        match result {
            Ok(evicted) => {
                if evicted > 0 {
                    tracing::debug!(
                        evicted,
                        "entries evicted to keep --max-entries across the cluster"
                    );
                }
            }
            Err(err) => return self.failed(err),
        }
        if self.config.strict && self.waitaof.load(Ordering::Relaxed) {
            let synced: redis::RedisResult<Vec<u64>> = redis::cmd("WAITAOF")
                .arg(1)
                .arg(0)
                .arg(1000)
                .query_async(&mut self.conn())
                .await;
            match synced {
                Ok(counts) if counts.first() == Some(&1) => {}
                Ok(_) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("Redis did not confirm the entry in its append-only file within 1 s");
                }
                Err(err) => return self.failed(err),
            }
        }
        Ok(())
    }

    async fn remove_ids(&self, ids: &[u64], tenant: Option<&[u8; 32]>) -> Result<usize, Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.remove.key(&self.keys.ids);
        invocation
            .key(&self.keys.log)
            .arg(&self.keys.prefix)
            .arg(now_ms())
            .arg(LOG_LENGTH)
            .arg(tenant.map(hex::encode).unwrap_or_default());
        for id in ids {
            invocation.arg(id);
        }
        match invocation.invoke_async::<usize>(&mut self.conn()).await {
            Ok(removed) => Ok(removed),
            Err(err) => self.failed(err),
        }
    }

    /// Removes one entry, whichever node stored it; returns whether it was there.
    pub async fn remove_one(&self, id: u64) -> Result<bool, Error> {
        Ok(self.remove_ids(&[id], None).await? == 1)
    }

    async fn save_feedback(&self, id: u64, counts: super::Counts) -> Result<(), Error> {
        let result: redis::RedisResult<u64> = self
            .feedback
            .key(self.keys.entry(id))
            .key(&self.keys.log)
            .key(&self.keys.seq)
            .arg(id)
            .arg(counts.own_threshold.to_string())
            .arg(counts.wrong_reports)
            .arg(now_ms())
            .arg(LOG_LENGTH)
            .invoke_async(&mut self.conn())
            .await;
        result.map(drop).or_else(|err| self.failed(err))
    }

    /// Removes every entry, or every entry of one tenant, from Redis (whichever node stored
    /// it); each removal goes into the log, so every node drops it. Returns how many.
    pub async fn clear(&self, tenant: Option<&[u8; 32]>) -> Result<usize, Error> {
        let (mut cursor, mut removed) = (0, 0);
        loop {
            let (next, ids) = match self.id_page(&mut self.conn(), cursor).await {
                Ok(page) => page,
                Err(err) => return self.failed(err),
            };
            removed += self.remove_ids(&ids, tenant).await?;
            cursor = next;
            if cursor == 0 {
                return Ok(removed);
            }
        }
    }

    /// One page of entry ids from `ids` (`ZSCAN`) and the cursor of the next (0: none). An id
    /// may come twice across pages.
    async fn id_page(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        cursor: u64,
    ) -> redis::RedisResult<(u64, Vec<u64>)> {
        let (next, page): (u64, Vec<String>) = redis::cmd("ZSCAN")
            .arg(&self.keys.ids)
            .arg(cursor)
            .arg("COUNT")
            .arg(BATCH)
            .query_async(conn)
            .await?;
        // Members and scores alternate.
        Ok((
            next,
            page.iter().step_by(2).filter_map(|id| id.parse().ok()).collect(),
        ))
    }

    /// Counts a hit on an entry and says whether it may be served: whether it is still in
    /// Redis.
    pub async fn confirm(&self, id: u64) -> Result<bool, Error> {
        let now = now_ms();
        let result: redis::RedisResult<u64> = self
            .confirm
            .key(self.keys.entry(id))
            .key(&self.keys.ids)
            .arg(id)
            .arg(now)
            .arg(match self.config.eviction {
                Eviction::Lru => "lru",
                Eviction::Lfu => "lfu",
            })
            .arg(self.lfu_increment(now))
            .invoke_async(&mut self.conn())
            .await;
        match result {
            Ok(found) => Ok(found == 1),
            Err(err) => self.failed(err),
        }
    }

    /// The entry stored for an exact key by any node, if it is still there.
    pub async fn exact(&self, exact: &[u8; 32]) -> Result<Option<Record>, Error> {
        let result: redis::RedisResult<Value> = self
            .exact
            .key(self.keys.exact(exact))
            .arg(&self.keys.prefix)
            .invoke_async(&mut self.conn())
            .await;
        let value = match result {
            Ok(value) => value,
            Err(err) => return self.failed(err),
        };
        let parts: Option<Vec<Option<Vec<u8>>>> =
            redis::from_redis_value(value).map_err(|err| Error::Db(err.to_string()))?;
        let Some(mut parts) = parts else {
            return Ok(None);
        };
        if parts.len() != 1 + scripts::FIELDS.len() {
            return Err(Error::Db("redis: unexpected reply to the exact lookup".into()));
        }
        let id = parts
            .remove(0)
            .and_then(|id| String::from_utf8(id).ok()?.parse().ok())
            .ok_or_else(|| Error::Db("redis: unexpected entry id".into()))?;
        record_from(id, parts).map(Some)
    }

    /// Asks for the lease on the upstream call for an exact key.
    pub async fn lease(&self, exact: &[u8; 32]) -> Result<Lease, Error> {
        let token = format!("{:032x}", rand::random::<u128>());
        let result: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(self.keys.lease(exact))
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(self.config.lease.as_millis() as u64)
            .query_async(&mut self.conn())
            .await;
        match result {
            Ok(Some(_)) => Ok(Lease::Granted(token)),
            Ok(None) => Ok(Lease::Held),
            Err(err) => self.failed(err),
        }
    }

    /// Whether another node still holds the lease for an exact key.
    pub async fn leased(&self, exact: &[u8; 32]) -> Result<bool, Error> {
        match self.conn().exists(self.keys.lease(exact)).await {
            Ok(found) => Ok(found),
            Err(err) => self.failed(err),
        }
    }

    /// Ends a lease this node holds (its call failed, or gave nothing to store).
    pub async fn release(&self, exact: &[u8; 32], token: &str) {
        let result: redis::RedisResult<u64> = self
            .release
            .key(self.keys.lease(exact))
            .arg(token)
            .invoke_async(&mut self.conn())
            .await;
        if let Err(err) = result {
            let _ = self.failed::<()>(err);
        }
    }

    /// Saves settings for every node; each applies them from the log.
    pub async fn save_settings(&self, settings: &Settings) -> Result<(), Error> {
        let json = crate::settings::to_json(settings);
        let result: redis::RedisResult<u64> = self
            .settings
            .key(&self.keys.settings)
            .key(&self.keys.log)
            .key(&self.keys.seq)
            .arg(json)
            .arg(now_ms())
            .arg(LOG_LENGTH)
            .invoke_async(&mut self.conn())
            .await;
        result.map(drop).or_else(|err| self.failed(err))
    }

    /// Adds this node's figures to the ones kept for the whole cluster.
    pub async fn add_cluster_figures(&self, deltas: &[(&str, f64)]) -> Result<(), Error> {
        let key = &self.keys.stats;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (field, delta) in deltas {
            if *delta != 0.0 {
                pipe.cmd("HINCRBYFLOAT").arg(key).arg(*field).arg(*delta).ignore();
            }
        }
        match pipe.query_async::<()>(&mut self.conn()).await {
            Ok(()) => Ok(()),
            Err(err) => self.failed(err),
        }
    }

    /// The figures summed over every node.
    pub async fn cluster_figures(&self) -> Result<HashMap<String, f64>, Error> {
        match self.conn().hgetall(&self.keys.stats).await {
            Ok(map) => Ok(map
                .into_iter()
                .filter_map(|(field, value)| Some((field, value.parse().ok()?)))
                .collect()),
            Err(err) => self.failed(err),
        }
    }

    /// Whether entries can be looked up and stored now.
    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::SeqCst)
    }

    /// Loads every entry into `cache`, then follows the log, until the cache is dropped.
    /// Whenever Redis goes away the store is marked unavailable (requests go through as
    /// through a plain proxy); once it is back, everything is loaded again.
    pub fn follow(self: &Arc<Self>, cache: Weak<Cache>, settings: SharedSettings, current: EmbedderId) {
        let store = Arc::clone(self);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                if cache.strong_count() == 0 {
                    return;
                }
                match store.sync(&cache, &settings, &current).await {
                    Ok((conn, position)) => {
                        backoff = Duration::from_millis(100);
                        let err = store.tail(conn, position, &cache, &settings).await;
                        match err {
                            Error::WriterGone => return,
                            err => store.fail(err.to_string()),
                        }
                    }
                    Err(Error::WriterGone) => return,
                    Err(err) => store.fail(err.to_string()),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    async fn follower_connection(&self) -> Result<MultiplexedConnection, Error> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(FOLLOW_BLOCK + Duration::from_secs(2)));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(redis_error)
    }

    /// Connects, checks the namespace, takes the log position, loads every entry into the
    /// cache and applies the saved settings. Returns the connection to follow the log on and
    /// the position to follow it from.
    async fn sync(
        &self,
        cache: &Weak<Cache>,
        settings: &SharedSettings,
        current: &EmbedderId,
    ) -> Result<(MultiplexedConnection, Position), Error> {
        let started = Instant::now();
        let mut conn = self.follower_connection().await?;
        self.check_meta(&mut conn, current).await?;
        // The position is taken before the load: every change made while it runs is applied
        // after it (changes are applied by id, so one seen twice does nothing more).
        let (id, line): (String, u64) = self
            .position
            .key(&self.keys.log)
            .key(&self.keys.seq)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let position = Position { id, line };
        let saved: Option<String> = conn.get(&self.keys.settings).await.map_err(redis_error)?;
        if let Some(saved) = saved.as_deref().and_then(crate::settings::from_json) {
            settings.store(Arc::new(saved));
        }
        let loaded = self.load(&mut conn).await?;
        let count = loaded.records.len();
        let cache = cache.upgrade().ok_or(Error::WriterGone)?;
        let cache_for_load = Arc::clone(&cache);
        tokio::task::spawn_blocking(move || cache_for_load.reload(loaded))
            .await
            .map_err(|err| Error::Db(format!("loading the entries failed: {err}")))?;
        // The connection requests use reconnects on its first use after a failure: make that
        // use this one, so that no request's store is the one that fails.
        let mut attempts = 0;
        while let Err(err) = self.conn().ping().await {
            attempts += 1;
            if attempts == 5 {
                return Err(redis_error(err));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.replication.loads.fetch_add(1, Ordering::Relaxed);
        self.replication.loaded.store(count as u64, Ordering::Relaxed);
        *self.problem.lock() = None;
        self.available.store(true, Ordering::SeqCst);
        tracing::info!(
            entries = cache.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            store = %redacted(&self.config.url),
            namespace = %self.config.namespace,
            "shared store loaded; following its log"
        );
        Ok((conn, position))
    }

    /// Records this build's format and embedder in a new namespace, or refuses one whose
    /// vectors another embedder made (they cannot be compared with ours; embedding them again
    /// on one node while others serve would mix both).
    async fn check_meta(&self, conn: &mut MultiplexedConnection, current: &EmbedderId) -> Result<(), Error> {
        let key = &self.keys.meta;
        let now = now_ms().to_string();
        let dimensions = current.dimensions.to_string();
        let version = FORMAT_VERSION.to_string();
        let mut pipe = redis::pipe();
        for (field, value) in [
            ("format_version", version.as_str()),
            ("model", current.model.as_str()),
            ("backend", current.backend.as_str()),
            ("dimensions", dimensions.as_str()),
            ("weights", current.weights.as_str()),
            ("epoch_ms", now.as_str()),
        ] {
            pipe.cmd("HSETNX").arg(key).arg(field).arg(value).ignore();
        }
        pipe.cmd("HGETALL").arg(key);
        pipe.cmd("INFO").arg("server");
        let (meta, info): (HashMap<String, String>, String) =
            pipe.query_async(conn).await.map_err(redis_error)?;
        let field = |name: &str| meta.get(name).cloned().unwrap_or_default();
        if field("format_version").parse().is_ok_and(upgrades_from) {
            // Its records read as they are; new ones are written in this format.
            redis::cmd("HSET")
                .arg(key)
                .arg("format_version")
                .arg(&version)
                .query_async::<()>(conn)
                .await
                .map_err(redis_error)?;
        } else if field("format_version") != version {
            return Err(Error::Db(format!(
                "the namespace {:?} has format version {}; this semcache reads version {FORMAT_VERSION}: \
                 use another --namespace, or the release that wrote it",
                self.config.namespace,
                field("format_version")
            )));
        }
        let stored = EmbedderId {
            model: field("model"),
            backend: field("backend"),
            dimensions: field("dimensions").parse().unwrap_or(0),
            weights: field("weights"),
        };
        if !stored.same_vectors(current) {
            return Err(Error::Db(format!(
                "the namespace {:?} holds vectors made by {stored}; this node embeds with {current}. \
                 Start every node with the same --embedder and model, or use another --namespace",
                self.config.namespace
            )));
        }
        if let Ok(epoch) = field("epoch_ms").parse() {
            self.epoch_ms.store(epoch, Ordering::Relaxed);
        }
        self.waitaof.store(server_has_waitaof(&info), Ordering::Relaxed);
        Ok(())
    }

    /// Every entry in Redis, with the progress line every tenth of the way.
    async fn load(&self, conn: &mut MultiplexedConnection) -> Result<Loaded, Error> {
        let total: usize = conn.zcard(&self.keys.ids).await.map_err(redis_error)?;
        let mut loaded = Loaded::with_capacity(total);
        let mut progress = super::every_tenth("loading the shared store", "entries", 10_000);
        let mut cursor: u64 = 0;
        let mut seen = std::collections::HashSet::new();
        loop {
            let (next, page) = self.id_page(conn, cursor).await.map_err(redis_error)?;
            let ids: Vec<u64> = page.into_iter().filter(|id| seen.insert(*id)).collect();
            for record in self.fetch(conn, &ids).await?.into_iter().flatten() {
                loaded.push(record, total);
            }
            progress(loaded.records.len(), total);
            cursor = next;
            if cursor == 0 {
                return Ok(loaded);
            }
        }
    }

    /// The records of these ids, `None` for those no longer there.
    async fn fetch(
        &self,
        conn: &mut MultiplexedConnection,
        ids: &[u64],
    ) -> Result<Vec<Option<Record>>, Error> {
        let mut records = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HMGET")
                    .arg(self.keys.entry(*id))
                    .arg(&scripts::FIELDS[..]);
            }
            let replies: Vec<Vec<Option<Vec<u8>>>> = pipe.query_async(conn).await.map_err(redis_error)?;
            for (id, fields) in chunk.iter().zip(replies) {
                records.push(match fields.first() {
                    Some(Some(_)) => Some(record_from(*id, fields)?),
                    _ => None,
                });
            }
        }
        Ok(records)
    }

    /// Applies the log from `position` until the connection fails or a line is missing (the
    /// log was trimmed past what was applied: then the caller loads everything again).
    async fn tail(
        &self,
        mut conn: MultiplexedConnection,
        mut position: Position,
        cache: &Weak<Cache>,
        settings: &SharedSettings,
    ) -> Error {
        let log = &self.keys.log;
        loop {
            let reply: redis::RedisResult<ReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(BATCH)
                .arg("BLOCK")
                .arg(FOLLOW_BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(log)
                .arg(&position.id)
                .query_async(&mut conn)
                .await;
            let Some(cache) = cache.upgrade() else {
                return Error::WriterGone;
            };
            let changes: Vec<Change> = match reply {
                Ok(Some(streams)) => streams.into_iter().flat_map(|(_, changes)| changes).collect(),
                Ok(None) => Vec::new(),
                Err(err) => return redis_error(err),
            };
            let Some((last, _)) = changes.last() else {
                continue;
            };
            let next = last.clone();
            let mut line = position.line;
            for (_, fields) in &changes {
                let number = fields
                    .iter()
                    .find(|(name, _)| name == "n")
                    .and_then(|(_, value)| redis::from_redis_value_ref::<u64>(value).ok());
                if number != Some(line + 1) {
                    return Error::Db(format!(
                        "this node fell behind the change log (it expected line {}, the log goes on at {number:?}): loading everything again",
                        line + 1
                    ));
                }
                line += 1;
            }
            if let Err(err) = self.apply(&mut conn, &cache, settings, changes).await {
                return err;
            }
            position = Position { id: next, line };
        }
    }

    async fn apply(
        &self,
        conn: &mut MultiplexedConnection,
        cache: &Arc<Cache>,
        settings: &SharedSettings,
        changes: Vec<Change>,
    ) -> Result<(), Error> {
        let changes: Vec<HashMap<String, Value>> = changes
            .into_iter()
            .map(|(_, fields)| fields.into_iter().collect())
            .collect();
        let field = |change: &HashMap<String, Value>, name: &str| -> Option<String> {
            redis::from_redis_value_ref(change.get(name)?).ok()
        };
        let puts: Vec<u64> = changes
            .iter()
            .filter(|change| field(change, "op").as_deref() == Some("put"))
            .filter_map(|change| field(change, "id")?.parse().ok())
            .filter(|id| cache.get(*id).is_none())
            .collect();
        let mut fetched: HashMap<u64, Record> = self
            .fetch(conn, &puts)
            .await?
            .into_iter()
            .flatten()
            .map(|record| (record.id, record))
            .collect();
        let now = now_ms();
        for change in &changes {
            let id = field(change, "id").and_then(|id| id.parse::<u64>().ok());
            match (field(change, "op").as_deref(), id) {
                (Some("put"), Some(id)) => {
                    if let Some(record) = fetched.remove(&id) {
                        cache.adopt(record);
                    }
                    if let Some(ms) = field(change, "ms").and_then(|ms| ms.parse::<u64>().ok()) {
                        self.replication.lag(now.saturating_sub(ms));
                    }
                }
                (Some("del"), Some(id)) => {
                    cache.forget(id);
                }
                (Some("fb"), Some(id)) => {
                    let threshold = field(change, "th").and_then(|th| th.parse().ok()).unwrap_or(0.0);
                    let wrong = field(change, "w").and_then(|w| w.parse().ok()).unwrap_or(0);
                    cache.apply_feedback(id, threshold, wrong);
                }
                (Some("set"), _) => {
                    if let Some(saved) = field(change, "settings")
                        .as_deref()
                        .and_then(crate::settings::from_json)
                    {
                        settings.store(Arc::new(saved));
                    }
                }
                _ => tracing::warn!("an unknown change in the shared store's log was skipped"),
            }
            self.replication.applied.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Where a node is in the log: the id of the last line it applied and that line's number.
struct Position {
    id: String,
    line: u64,
}

/// One change in the log: its id and fields.
type Change = (String, Vec<(String, Value)>);
/// `XREAD`'s reply: per stream, its changes.
type ReadReply = Option<Vec<(String, Vec<Change>)>>;

/// Whether `INFO server` names a Redis (or Valkey) of version 7.2 or later.
fn server_has_waitaof(info: &str) -> bool {
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap_or("0");
    let mut parts = version
        .trim()
        .split('.')
        .map(|part| part.parse::<u64>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (7, 2)
}

/// A record from an entry's fields in [`scripts::FIELDS`] order.
fn record_from(id: u64, fields: Vec<Option<Vec<u8>>>) -> Result<Record, Error> {
    let mut fields = fields.into_iter();
    let bytes = fields.next().flatten().ok_or(Error::Decode {
        id,
        message: "no record".into(),
    })?;
    let mut record = Record::decode(&bytes).map_err(|message| Error::Decode { id, message })?;
    let mut text = || -> Option<String> { String::from_utf8(fields.next().flatten()?).ok() };
    let (hits, last, threshold, wrong) = (text(), text(), text(), text());
    record.id = id;
    record.hits = hits.and_then(|v| v.parse().ok()).unwrap_or(0);
    record.last_hit_ms = last.and_then(|v| v.parse().ok()).unwrap_or(record.created_ms);
    record.own_threshold = threshold.and_then(|v| v.parse().ok()).unwrap_or(0.0);
    record.wrong_reports = wrong.and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(record)
}

async fn save_removals(store: &RedisStore, removals: &mut Vec<u64>) {
    if let Err(err) = store.remove_ids(&std::mem::take(removals), None).await {
        tracing::warn!(error = %err, "removals not saved to the shared store");
    }
}

/// Saves queued changes (removals, feedback) in order, in the background.
async fn drain(store: Weak<RedisStore>, mut queued: mpsc::UnboundedReceiver<Queued>) {
    while let Some(first) = queued.recv().await {
        let Some(store) = store.upgrade() else {
            return;
        };
        let mut batch = vec![first];
        while let Ok(more) = queued.try_recv() {
            batch.push(more);
            if batch.len() >= BATCH {
                break;
            }
        }
        // Removals are sent together, and before anything queued after them.
        let mut removals = Vec::new();
        for item in batch {
            if let Queued::Op(Op::Delete(id)) = item {
                removals.push(id);
                continue;
            }
            save_removals(&store, &mut removals).await;
            match item {
                Queued::Op(Op::Delete(_)) => unreachable!("collected above"),
                Queued::Op(Op::Touch { id, counts }) => {
                    if let Err(err) = store.save_feedback(id, counts).await {
                        tracing::warn!(error = %err, entry = id, "feedback not saved to the shared store");
                    }
                }
                Queued::Op(Op::Judged { .. }) => {}
                Queued::Op(Op::Put(record)) => {
                    if let Err(err) = store.put(&record).await {
                        tracing::warn!(error = %err, entry = record.id, "entry not saved to the shared store");
                    }
                }
                Queued::Flushed(done) => {
                    let _ = done.send(());
                }
            }
        }
        save_removals(&store, &mut removals).await;
    }
}

impl EntryStore for RedisStore {
    fn write(&self, op: Op) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            match op {
                Op::Put(record) => self.put(&record).await,
                other => {
                    self.submit(other);
                    self.flush().await
                }
            }
        })
    }

    fn submit(&self, op: Op) {
        // Hit counts are kept in Redis by every hit's confirmation; only feedback is sent.
        match &op {
            Op::Touch { counts, .. } if counts.own_threshold == 0.0 && counts.wrong_reports == 0 => return,
            // Verdicts stay on the node that got them, for now (see `Record::verdicts`).
            Op::Judged { .. } => return,
            _ => {}
        }
        let _ = self.queue.send(Queued::Op(op));
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let (done, flushed) = oneshot::channel();
            self.queue
                .send(Queued::Flushed(done))
                .map_err(|_| Error::WriterGone)?;
            flushed.await.map_err(|_| Error::WriterGone)
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), Error>> {
        self.flush()
    }

    fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    fn lost(&self) -> Option<String> {
        self.problem.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redacted("redis://:hunter2@10.0.0.1:6379/2"),
            "redis://***@10.0.0.1:6379/2"
        );
        assert_eq!(redacted("rediss://user:p@ss@host:6380"), "rediss://***@host:6380");
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn waitaof_needs_7_2() {
        assert!(!server_has_waitaof("# Server\r\nredis_version:7.0.15\r\n"));
        assert!(server_has_waitaof("redis_version:7.2.4\r\n"));
        assert!(server_has_waitaof("redis_version:8.0.0\r\n"));
    }
}
