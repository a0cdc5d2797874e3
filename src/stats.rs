//! What the cache did and what it saved: counters, similarity histograms, per-model and
//! per-tenant breakdowns, and a short history for the dashboard.
//!
//! Totals are atomics. The breakdown maps take a read lock to find their row (a write lock only
//! the first time a model or tenant is seen).

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::Deserialize;

use crate::cache::{HitKind, Surface, TenantId, Usage, Vouched};
use crate::judge::{Failure, Ruling};
use crate::verify::Reason;

/// Number of equal-width similarity buckets between 0 and 1.
pub const BUCKETS: usize = 20;
/// How many history intervals are kept (one hour at the default interval).
const HISTORY_LEN: usize = 360;
pub const HISTORY_INTERVAL: Duration = Duration::from_secs(10);
/// Money is counted in pico-dollars, so that sums of tiny per-token prices stay exact.
const PICO: f64 = 1e12;

/// Input and output prices of a model, in dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

/// List prices of common OpenAI models, dollars per million tokens (input, output). Override or
/// extend them with `--prices FILE`.
const DEFAULT_PRICES: &[(&str, f64, f64)] = &[
    ("gpt-4o-mini", 0.15, 0.60),
    ("gpt-4o", 2.50, 10.00),
    ("gpt-4.1-nano", 0.10, 0.40),
    ("gpt-4.1-mini", 0.40, 1.60),
    ("gpt-4.1", 2.00, 8.00),
    ("gpt-4-turbo", 10.00, 30.00),
    ("gpt-4", 30.00, 60.00),
    ("gpt-3.5-turbo", 0.50, 1.50),
    ("gpt-5-nano", 0.05, 0.40),
    ("gpt-5-mini", 0.25, 2.00),
    ("gpt-5", 1.25, 10.00),
    ("o1-mini", 1.10, 4.40),
    ("o1", 15.00, 60.00),
    ("o3-mini", 1.10, 4.40),
    ("o3", 2.00, 8.00),
    ("o4-mini", 1.10, 4.40),
    ("gpt-3.5-turbo-instruct", 1.50, 2.00),
    ("text-embedding-3-small", 0.02, 0.0),
    ("text-embedding-3-large", 0.13, 0.0),
    ("text-embedding-ada-002", 0.10, 0.0),
];

#[derive(Debug, Clone)]
pub struct PriceTable {
    prices: HashMap<String, Price>,
}

impl Default for PriceTable {
    fn default() -> Self {
        let prices = DEFAULT_PRICES
            .iter()
            .map(|(model, input, output)| {
                (
                    (*model).to_owned(),
                    Price {
                        input: *input,
                        output: *output,
                    },
                )
            })
            .collect();
        Self { prices }
    }
}

impl PriceTable {
    /// The defaults, overridden and extended by a JSON file `{"model": {"input": x, "output": y}}`.
    pub fn with_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
        let extra: HashMap<String, Price> =
            serde_json::from_str(&text).map_err(|err| format!("{}: {err}", path.display()))?;
        if let Some((model, _)) = extra.iter().find(|(_, p)| !(p.input >= 0.0 && p.output >= 0.0)) {
            return Err(format!(
                "{}: prices of {model} must not be negative",
                path.display()
            ));
        }
        let mut table = Self::default();
        table.prices.extend(extra);
        Ok(table)
    }

    /// The price of a model: its own, or that of the longest known name it starts with, so that
    /// dated snapshots such as `gpt-4o-mini-2024-07-18` are priced like their family.
    pub fn price(&self, model: &str) -> Option<Price> {
        if let Some(price) = self.prices.get(model) {
            return Some(*price);
        }
        self.prices
            .iter()
            .filter(|(name, _)| {
                model.starts_with(name.as_str()) && model.as_bytes().get(name.len()) == Some(&b'-')
            })
            .max_by_key(|(name, _)| name.len())
            .map(|(_, price)| *price)
    }
}

fn bucket_of(similarity: f32) -> usize {
    ((similarity.clamp(0.0, 1.0) * BUCKETS as f32) as usize).min(BUCKETS - 1)
}

#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS],
    /// Sum of observed similarities, in millionths, for Prometheus' `_sum`.
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, similarity: f32) {
        self.counts[bucket_of(similarity)].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add((similarity.clamp(0.0, 1.0) as f64 * 1e6) as u64, Relaxed);
    }

    pub fn counts(&self) -> [u64; BUCKETS] {
        std::array::from_fn(|i| self.counts[i].load(Relaxed))
    }

    pub fn sum(&self) -> f64 {
        self.sum_micros.load(Relaxed) as f64 / 1e6
    }
}

/// Whose request a figure counts: the surface it came in on, the model it asked for, its tenant.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub surface: Surface,
    pub model: &'a str,
    pub tenant: TenantId,
}

/// Counters of one surface, model or tenant.
#[derive(Debug, Default)]
pub struct Breakdown {
    requests: AtomicU64,
    hits: AtomicU64,
    tokens_saved: AtomicU64,
    cost_saved_pico: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakdownSnapshot {
    pub requests: u64,
    pub hits: u64,
    pub tokens_saved: u64,
    pub cost_saved_usd: f64,
}

impl Breakdown {
    fn snapshot(&self) -> BreakdownSnapshot {
        BreakdownSnapshot {
            requests: self.requests.load(Relaxed),
            hits: self.hits.load(Relaxed),
            tokens_saved: self.tokens_saved.load(Relaxed),
            cost_saved_usd: self.cost_saved_pico.load(Relaxed) as f64 / PICO,
        }
    }
}

/// One interval of the history: requests and hits counted in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub unix_secs: u64,
    pub requests: u64,
    pub hits: u64,
}

#[derive(Debug, Default)]
pub struct Stats {
    prices: PriceTable,
    rejected: AtomicU64,
    shed: AtomicU64,
    cache_failures: AtomicU64,
    exact_hits: AtomicU64,
    semantic_hits: AtomicU64,
    /// Semantic hits compared in a conversation (semantic context mode); not in `semantic_hits`.
    conversation_hits: AtomicU64,
    /// Misses of requests compared in a conversation whose best candidate was refused.
    conversation_refusals: AtomicU64,
    misses: AtomicU64,
    bypassed: AtomicU64,
    upstream_calls: AtomicU64,
    upstream_errors: AtomicU64,
    prompt_tokens_saved: AtomicU64,
    completion_tokens_saved: AtomicU64,
    cost_saved_pico: AtomicU64,
    latency_saved_micros: AtomicU64,
    pub hit_similarity: Histogram,
    /// Best candidates of lookups that missed, for requests compared without a conversation.
    pub near_miss_similarity: Histogram,
    /// The same for requests compared in a conversation: the similarity of the request with
    /// what it refers back to.
    pub conversation_near_miss_similarity: Histogram,
    /// Candidates above the threshold refused by the verifier, by reason (`Reason::ALL` order).
    refusals: [AtomicU64; Reason::ALL.len()],
    feedback_correct: AtomicU64,
    feedback_wrong: AtomicU64,
    /// In [`Surface::ALL`] order.
    by_surface: [Breakdown; Surface::ALL.len()],
    by_model: Rows<String>,
    by_tenant: Rows<TenantId>,
    history: Mutex<History>,
    judge: JudgeCounters,
}

/// What the judge did and what it cost.
#[derive(Debug, Default)]
struct JudgeCounters {
    approved: AtomicU64,
    rejected: AtomicU64,
    /// Verdicts used again for a request judged before, without a call.
    remembered: AtomicU64,
    /// Calls that gave no verdict, by kind ([`Failure::ALL`] order).
    failures: [AtomicU64; Failure::ALL.len()],
    /// Hits the judge approved (now or before), and hits served on an entry's learned bound.
    judged_hits: AtomicU64,
    learned_hits: AtomicU64,
    /// Candidates passed over without a call: their entry's verdicts said no.
    passed_over: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cost_pico: AtomicU64,
    latency_micros: AtomicU64,
}

/// The judge's figures at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JudgeSnapshot {
    /// Calls made: approved + rejected + failed.
    pub calls: u64,
    pub approved: u64,
    pub rejected: u64,
    pub remembered: u64,
    pub failures: Vec<(&'static str, u64)>,
    pub judged_hits: u64,
    pub learned_hits: u64,
    pub passed_over: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    /// Total time spent waiting for the judge, for the mean latency it adds.
    pub latency_ms: f64,
}

impl JudgeSnapshot {
    pub fn failed(&self) -> u64 {
        self.failures.iter().map(|(_, count)| count).sum()
    }

    /// Mean time a judge call took, in milliseconds.
    pub fn mean_latency_ms(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.latency_ms / self.calls as f64
        }
    }
}

/// Most rows in a breakdown. Model names and keys come from clients: past this, new ones are
/// counted together, so that a client cannot grow the service's memory without bound.
const MAX_ROWS: usize = 1024;
/// The row for models past [`MAX_ROWS`].
pub const OTHER_MODELS: &str = "(other models)";

/// The row for tenants past [`MAX_ROWS`]: a digest no key hashes to.
pub fn other_tenants() -> TenantId {
    TenantId(crate::cache::Digest32([0xff; 32]))
}

/// Counters per model or per tenant, read without a lock: a request loads the map and bumps
/// atomics; only a key never seen before copies the map (read-copy-update).
#[derive(Debug)]
struct Rows<K> {
    map: ArcSwap<HashMap<K, Arc<Breakdown>>>,
}

impl<K> Default for Rows<K> {
    fn default() -> Self {
        Self {
            map: ArcSwap::from_pointee(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Rows<K> {
    fn row<Q>(&self, key: &Q, owned: impl Fn() -> K, overflow: impl Fn() -> K) -> Arc<Breakdown>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let map = self.map.load();
        if let Some(row) = map.get(key) {
            return Arc::clone(row);
        }
        if map.len() >= MAX_ROWS {
            if let Some(row) = map.get(overflow().borrow()) {
                return Arc::clone(row);
            }
        }
        let mut found = None;
        self.map.rcu(|map| {
            let mut map = HashMap::clone(map);
            let key = if map.len() >= MAX_ROWS && !map.contains_key(key) {
                overflow()
            } else {
                owned()
            };
            found = Some(Arc::clone(map.entry(key).or_default()));
            map
        });
        found.expect("rcu runs its closure")
    }
}

#[derive(Debug, Default)]
struct History {
    intervals: VecDeque<Interval>,
    /// Totals at the end of the last interval.
    last_requests: u64,
    last_hits: u64,
}

/// Everything in [`Stats`] at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub rejected: u64,
    /// Requests turned away with 503 under overload.
    pub shed: u64,
    /// Requests forwarded without the cache because embedding or lookup failed.
    pub cache_failures: u64,
    pub requests: u64,
    pub hits: u64,
    pub exact_hits: u64,
    pub semantic_hits: u64,
    pub conversation_hits: u64,
    pub conversation_refusals: u64,
    pub misses: u64,
    pub bypassed: u64,
    pub upstream_calls: u64,
    pub upstream_errors: u64,
    pub prompt_tokens_saved: u64,
    pub completion_tokens_saved: u64,
    pub cost_saved_usd: f64,
    pub latency_saved_ms: f64,
    pub hit_similarity: [u64; BUCKETS],
    pub near_miss_similarity: [u64; BUCKETS],
    pub conversation_near_miss_similarity: [u64; BUCKETS],
    pub refusals: Vec<(Reason, u64)>,
    pub feedback_correct: u64,
    pub feedback_wrong: u64,
    pub by_surface: Vec<(Surface, BreakdownSnapshot)>,
    pub by_model: Vec<(String, BreakdownSnapshot, bool)>,
    pub by_tenant: Vec<(TenantId, BreakdownSnapshot)>,
    pub history: Vec<Interval>,
    pub judge: JudgeSnapshot,
}

impl Snapshot {
    pub fn hit_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.hits as f64 / self.requests as f64
        }
    }

    /// What hits saved, less what the judge cost.
    pub fn cost_saved_net_usd(&self) -> f64 {
        self.cost_saved_usd - self.judge.cost_usd
    }

    pub fn tokens_saved(&self) -> u64 {
        self.prompt_tokens_saved + self.completion_tokens_saved
    }

    /// Models whose savings are counted in tokens only, for want of a price.
    pub fn unpriced_models(&self) -> Vec<&str> {
        self.by_model
            .iter()
            .filter(|(_, _, priced)| !priced)
            .map(|(model, _, _)| model.as_str())
            .collect()
    }
}

impl Stats {
    pub fn new(prices: PriceTable) -> Self {
        Self {
            prices,
            ..Self::default()
        }
    }

    /// The surface, model and tenant rows a request counts in.
    fn rows_of(&self, origin: Origin<'_>) -> (&Breakdown, Arc<Breakdown>, Arc<Breakdown>) {
        let Origin {
            surface,
            model,
            tenant,
        } = origin;
        let model_row = self
            .by_model
            .row(model, || model.to_owned(), || OTHER_MODELS.to_owned());
        let tenant_row = self.by_tenant.row(&tenant, || tenant, other_tenants);
        (self.surface_row(surface), model_row, tenant_row)
    }

    fn count_request(&self, origin: Origin<'_>) -> (&Breakdown, Arc<Breakdown>, Arc<Breakdown>) {
        let rows = self.rows_of(origin);
        for row in [rows.0, &rows.1, &rows.2] {
            row.requests.fetch_add(1, Relaxed);
        }
        rows
    }

    /// Adds the tokens `usage` saved, and their cost at `model`'s price, to the totals and to
    /// `rows`.
    fn count_saved(&self, rows: [&Breakdown; 3], model: &str, usage: Usage) {
        let tokens = usage.prompt_tokens + usage.completion_tokens;
        let cost_pico = self.cost_pico(model, usage);
        self.prompt_tokens_saved.fetch_add(usage.prompt_tokens, Relaxed);
        self.completion_tokens_saved
            .fetch_add(usage.completion_tokens, Relaxed);
        self.cost_saved_pico.fetch_add(cost_pico, Relaxed);
        for row in rows {
            row.tokens_saved.fetch_add(tokens, Relaxed);
            row.cost_saved_pico.fetch_add(cost_pico, Relaxed);
        }
    }

    fn surface_row(&self, surface: Surface) -> &Breakdown {
        let slot = Surface::ALL
            .iter()
            .position(|s| *s == surface)
            .expect("every surface is listed");
        &self.by_surface[slot]
    }

    /// What asking the judge about one candidate came to. `model` is the judge's.
    pub fn record_ruling(&self, model: &str, ruling: &Ruling) {
        let judge = &self.judge;
        let (usage, latency) = match ruling {
            Ruling::Remembered(_) => {
                judge.remembered.fetch_add(1, Relaxed);
                return;
            }
            Ruling::Judged {
                approved,
                usage,
                latency,
            } => {
                let verdicts = if *approved {
                    &judge.approved
                } else {
                    &judge.rejected
                };
                verdicts.fetch_add(1, Relaxed);
                (*usage, *latency)
            }
            Ruling::Failed {
                failure,
                usage,
                latency,
            } => {
                let slot = Failure::ALL
                    .iter()
                    .position(|kind| *kind == failure.as_str())
                    .expect("every failure is listed");
                judge.failures[slot].fetch_add(1, Relaxed);
                (*usage, *latency)
            }
        };
        judge.prompt_tokens.fetch_add(usage.prompt_tokens, Relaxed);
        judge
            .completion_tokens
            .fetch_add(usage.completion_tokens, Relaxed);
        judge.cost_pico.fetch_add(self.cost_pico(model, usage), Relaxed);
        judge
            .latency_micros
            .fetch_add(latency.as_micros() as u64, Relaxed);
    }

    /// Candidates a lookup passed over on what their verdicts said, without asking the judge.
    pub fn record_passed_over(&self, candidates: u32) {
        if candidates > 0 {
            self.judge.passed_over.fetch_add(u64::from(candidates), Relaxed);
        }
    }

    /// A hit, by what vouched for it besides similarity.
    pub fn record_vouched(&self, vouched: Vouched) {
        match vouched {
            Vouched::Nothing => {}
            Vouched::Judge => {
                self.judge.judged_hits.fetch_add(1, Relaxed);
            }
            Vouched::Learned => {
                self.judge.learned_hits.fetch_add(1, Relaxed);
            }
        }
    }

    fn judge_snapshot(&self) -> JudgeSnapshot {
        let judge = &self.judge;
        let failures: Vec<_> = Failure::ALL
            .iter()
            .zip(&judge.failures)
            .map(|(kind, count)| (*kind, count.load(Relaxed)))
            .collect();
        let (approved, rejected) = (judge.approved.load(Relaxed), judge.rejected.load(Relaxed));
        let failed: u64 = failures.iter().map(|(_, count)| count).sum();
        JudgeSnapshot {
            calls: approved + rejected + failed,
            approved,
            rejected,
            remembered: judge.remembered.load(Relaxed),
            failures,
            judged_hits: judge.judged_hits.load(Relaxed),
            learned_hits: judge.learned_hits.load(Relaxed),
            passed_over: judge.passed_over.load(Relaxed),
            prompt_tokens: judge.prompt_tokens.load(Relaxed),
            completion_tokens: judge.completion_tokens.load(Relaxed),
            cost_usd: judge.cost_pico.load(Relaxed) as f64 / PICO,
            latency_ms: judge.latency_micros.load(Relaxed) as f64 / 1000.0,
        }
    }

    /// A request refused before it reached the cache (bad body, bad header).
    pub fn record_rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }

    /// A request forwarded as a plain proxy because the cache failed (fail-open).
    pub fn record_cache_failure(&self) {
        self.cache_failures.fetch_add(1, Relaxed);
    }

    /// A request turned away with 503 because the service was overloaded.
    pub fn record_shed(&self) {
        self.shed.fetch_add(1, Relaxed);
    }

    /// A request answered from the cache. `saved_latency` is the stored answer's upstream time
    /// minus the time this hit took.
    pub fn record_hit(
        &self,
        origin: Origin<'_>,
        kind: HitKind,
        similarity: f32,
        usage: Usage,
        saved_latency: Duration,
    ) {
        let (surface_row, model_row, tenant_row) = self.count_request(origin);
        match kind {
            HitKind::Exact => self.exact_hits.fetch_add(1, Relaxed),
            HitKind::Semantic => self.semantic_hits.fetch_add(1, Relaxed),
            HitKind::Conversation => self.conversation_hits.fetch_add(1, Relaxed),
        };
        self.hit_similarity.observe(similarity);
        self.count_saved([surface_row, &model_row, &tenant_row], origin.model, usage);
        self.latency_saved_micros
            .fetch_add(saved_latency.as_micros() as u64, Relaxed);
        for row in [surface_row, &model_row, &tenant_row] {
            row.hits.fetch_add(1, Relaxed);
        }
    }

    /// Tokens (and their cost) a request saved without being a hit: the cached items of a
    /// batch that went upstream for the others.
    pub fn record_saved(&self, origin: Origin<'_>, usage: Usage) {
        if usage.prompt_tokens + usage.completion_tokens == 0 {
            return;
        }
        let (surface_row, model_row, tenant_row) = self.rows_of(origin);
        self.count_saved([surface_row, &model_row, &tenant_row], origin.model, usage);
    }

    fn cost_pico(&self, model: &str, usage: Usage) -> u64 {
        self.prices.price(model).map_or(0, |price| {
            let dollars = (usage.prompt_tokens as f64 * price.input
                + usage.completion_tokens as f64 * price.output)
                / 1e6;
            (dollars * PICO).round() as u64
        })
    }

    /// A request that went to the upstream after a lookup; `nearest` is the best candidate
    /// not served (below the threshold, or refused by the verifier for `refused`);
    /// `conversation` when the request was compared in its conversation.
    pub fn record_miss(
        &self,
        origin: Origin<'_>,
        nearest: Option<f32>,
        refused: Option<Reason>,
        conversation: bool,
    ) {
        self.count_request(origin);
        self.misses.fetch_add(1, Relaxed);
        if let Some(similarity) = nearest {
            if conversation {
                self.conversation_near_miss_similarity.observe(similarity);
            } else {
                self.near_miss_similarity.observe(similarity);
            }
        }
        if conversation && refused.is_some() {
            self.conversation_refusals.fetch_add(1, Relaxed);
        }
        if let Some(reason) = refused {
            let slot = Reason::ALL
                .iter()
                .position(|r| *r == reason)
                .expect("every reason is listed");
            self.refusals[slot].fetch_add(1, Relaxed);
        }
    }

    /// A feedback report from an application on an answer it was served.
    pub fn record_feedback(&self, correct: bool) {
        if correct {
            self.feedback_correct.fetch_add(1, Relaxed);
        } else {
            self.feedback_wrong.fetch_add(1, Relaxed);
        }
    }

    /// A request forwarded without the cache (no-store, n > 1, nothing to key on, cache failure).
    pub fn record_bypass(&self, origin: Origin<'_>) {
        self.count_request(origin);
        self.bypassed.fetch_add(1, Relaxed);
    }

    /// A call sent to the upstream.
    pub fn record_upstream_call(&self) {
        self.upstream_calls.fetch_add(1, Relaxed);
    }

    /// An upstream call that failed: no answer in time, an error status, or a broken stream.
    pub fn record_upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Relaxed);
    }

    pub fn prices(&self) -> &PriceTable {
        &self.prices
    }

    /// Closes the current history interval; called every [`HISTORY_INTERVAL`].
    pub fn tick(&self) {
        let snapshot_requests = self.requests();
        let snapshot_hits = self.hits();
        let unix_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut history = self.history.lock();
        let interval = Interval {
            unix_secs,
            requests: snapshot_requests - history.last_requests,
            hits: snapshot_hits - history.last_hits,
        };
        history.last_requests = snapshot_requests;
        history.last_hits = snapshot_hits;
        history.intervals.push_back(interval);
        if history.intervals.len() > HISTORY_LEN {
            history.intervals.pop_front();
        }
    }

    fn hits(&self) -> u64 {
        self.exact_hits.load(Relaxed)
            + self.semantic_hits.load(Relaxed)
            + self.conversation_hits.load(Relaxed)
    }

    fn requests(&self) -> u64 {
        self.hits() + self.misses.load(Relaxed) + self.bypassed.load(Relaxed)
    }

    /// The closed intervals, then the one still open, so that a fresh service shows traffic at
    /// once.
    fn history_with_current(&self) -> Vec<Interval> {
        let requests = self.requests();
        let hits = self.hits();
        let history = self.history.lock();
        let mut intervals: Vec<Interval> = history.intervals.iter().copied().collect();
        intervals.push(Interval {
            unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            requests: requests - history.last_requests,
            hits: hits - history.last_hits,
        });
        intervals
    }

    pub fn snapshot(&self) -> Snapshot {
        let exact_hits = self.exact_hits.load(Relaxed);
        let semantic_hits = self.semantic_hits.load(Relaxed);
        let conversation_hits = self.conversation_hits.load(Relaxed);
        let misses = self.misses.load(Relaxed);
        let bypassed = self.bypassed.load(Relaxed);
        let mut by_model: Vec<_> = self
            .by_model
            .map
            .load()
            .iter()
            .map(|(model, row)| (model.clone(), row.snapshot(), self.prices.price(model).is_some()))
            .collect();
        by_model.sort_by(|a, b| a.0.cmp(&b.0));
        let mut by_tenant: Vec<_> = self
            .by_tenant
            .map
            .load()
            .iter()
            .map(|(tenant, row)| (*tenant, row.snapshot()))
            .collect();
        by_tenant.sort_by_key(|(tenant, _)| tenant.0);
        Snapshot {
            rejected: self.rejected.load(Relaxed),
            shed: self.shed.load(Relaxed),
            cache_failures: self.cache_failures.load(Relaxed),
            requests: exact_hits + semantic_hits + conversation_hits + misses + bypassed,
            hits: exact_hits + semantic_hits + conversation_hits,
            exact_hits,
            semantic_hits,
            conversation_hits,
            conversation_refusals: self.conversation_refusals.load(Relaxed),
            misses,
            bypassed,
            upstream_calls: self.upstream_calls.load(Relaxed),
            upstream_errors: self.upstream_errors.load(Relaxed),
            prompt_tokens_saved: self.prompt_tokens_saved.load(Relaxed),
            completion_tokens_saved: self.completion_tokens_saved.load(Relaxed),
            cost_saved_usd: self.cost_saved_pico.load(Relaxed) as f64 / PICO,
            latency_saved_ms: self.latency_saved_micros.load(Relaxed) as f64 / 1000.0,
            hit_similarity: self.hit_similarity.counts(),
            near_miss_similarity: self.near_miss_similarity.counts(),
            conversation_near_miss_similarity: self.conversation_near_miss_similarity.counts(),
            refusals: Reason::ALL
                .iter()
                .zip(&self.refusals)
                .map(|(reason, count)| (*reason, count.load(Relaxed)))
                .collect(),
            feedback_correct: self.feedback_correct.load(Relaxed),
            feedback_wrong: self.feedback_wrong.load(Relaxed),
            by_surface: Surface::ALL
                .iter()
                .zip(&self.by_surface)
                .map(|(surface, row)| (*surface, row.snapshot()))
                .collect(),
            by_model,
            by_tenant,
            history: self.history_with_current(),
            judge: self.judge_snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(surface: Surface, model: &str, tenant: TenantId) -> Origin<'_> {
        Origin {
            surface,
            model,
            tenant,
        }
    }

    #[test]
    fn clients_cannot_grow_the_breakdowns_without_bound() {
        let stats = Stats::default();
        let tenant = TenantId::from_api_key("sk-one");
        for i in 0..MAX_ROWS + 100 {
            stats.record_bypass(origin(
                Surface::ChatCompletions,
                &format!("model-{i}"),
                TenantId::from_api_key(format!("sk-{i}")),
            ));
        }
        stats.record_bypass(origin(Surface::ChatCompletions, "model-0", tenant));
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.by_model.len(), MAX_ROWS + 1);
        assert_eq!(snapshot.by_tenant.len(), MAX_ROWS + 1);
        let other = snapshot
            .by_model
            .iter()
            .find(|(model, _, _)| model == OTHER_MODELS)
            .unwrap();
        assert_eq!(other.1.requests, 100);
        let first = snapshot
            .by_model
            .iter()
            .find(|(model, _, _)| model == "model-0")
            .unwrap();
        assert_eq!(first.1.requests, 2, "known rows keep counting");
        let requests: u64 = snapshot.by_tenant.iter().map(|(_, row)| row.requests).sum();
        assert_eq!(requests, snapshot.requests);
    }

    #[test]
    fn dated_snapshots_are_priced_like_their_family() {
        let prices = PriceTable::default();
        assert_eq!(
            prices.price("gpt-4o-mini-2024-07-18"),
            prices.price("gpt-4o-mini")
        );
        assert_eq!(prices.price("gpt-4o-2024-08-06"), prices.price("gpt-4o"));
        assert_ne!(prices.price("gpt-4o-mini"), prices.price("gpt-4o"));
        assert_eq!(prices.price("gpt-4oops"), None);
        assert_eq!(prices.price("my-local-llama"), None);
    }

    #[test]
    fn hits_add_up_tokens_and_money() {
        let stats = Stats::new(PriceTable::default());
        let tenant = TenantId::shared();
        let usage = Usage {
            prompt_tokens: 1_000_000,
            completion_tokens: 1_000_000,
        };
        stats.record_hit(
            origin(Surface::ChatCompletions, "gpt-4o-mini", tenant),
            HitKind::Exact,
            1.0,
            usage,
            Duration::from_millis(900),
        );
        stats.record_hit(
            origin(Surface::Completions, "local", tenant),
            HitKind::Semantic,
            0.9,
            usage,
            Duration::ZERO,
        );
        stats.record_miss(
            origin(Surface::ChatCompletions, "gpt-4o-mini", tenant),
            Some(0.5),
            Some(Reason::Number),
            false,
        );
        stats.record_miss(
            origin(Surface::ChatCompletions, "gpt-4o-mini", tenant),
            Some(0.7),
            Some(Reason::Intent),
            true,
        );
        stats.record_hit(
            origin(Surface::ChatCompletions, "local", tenant),
            HitKind::Conversation,
            0.9,
            usage,
            Duration::ZERO,
        );
        stats.record_bypass(origin(Surface::ChatCompletions, "gpt-4o-mini", tenant));
        let s = stats.snapshot();
        assert_eq!((s.requests, s.hits, s.misses, s.bypassed), (6, 3, 2, 1));
        assert_eq!(
            (s.semantic_hits, s.conversation_hits, s.conversation_refusals),
            (1, 1, 1)
        );
        assert_eq!(s.tokens_saved(), 6_000_000);
        assert!((s.cost_saved_usd - 0.75).abs() < 1e-9, "{}", s.cost_saved_usd);
        assert_eq!(s.unpriced_models(), vec!["local"]);
        assert_eq!(s.hit_similarity[BUCKETS - 1], 1);
        assert_eq!(s.hit_similarity[18], 2);
        assert_eq!(s.near_miss_similarity[10], 1);
        assert_eq!(
            s.near_miss_similarity.iter().sum::<u64>(),
            1,
            "a conversation's apart"
        );
        assert_eq!(s.conversation_near_miss_similarity[14], 1);
        assert!(s.refusals.contains(&(Reason::Number, 1)));
        assert_eq!(s.latency_saved_ms, 900.0);
        let surface = |wanted: Surface| {
            let (_, row) = s
                .by_surface
                .iter()
                .find(|(surface, _)| *surface == wanted)
                .unwrap();
            (row.requests, row.hits, row.tokens_saved)
        };
        assert_eq!(surface(Surface::ChatCompletions), (5, 2, 4_000_000));
        assert_eq!(surface(Surface::Completions), (1, 1, 2_000_000));
    }

    #[test]
    fn history_records_per_interval_counts() {
        let stats = Stats::default();
        stats.record_miss(
            origin(Surface::ChatCompletions, "m", TenantId::shared()),
            None,
            None,
            false,
        );
        stats.tick();
        stats.record_bypass(origin(Surface::ChatCompletions, "m", TenantId::shared()));
        stats.record_bypass(origin(Surface::ChatCompletions, "m", TenantId::shared()));
        stats.tick();
        stats.record_bypass(origin(Surface::ChatCompletions, "m", TenantId::shared()));
        let requests: Vec<u64> = stats.snapshot().history.iter().map(|i| i.requests).collect();
        assert_eq!(requests, vec![1, 2, 1], "closed intervals, then the open one");
    }
}
