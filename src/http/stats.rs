//! `/stats` as JSON and `/metrics` in Prometheus' text format, from one snapshot.

use std::fmt::Write;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::AppState;
use crate::stats::{Snapshot, BUCKETS};

fn edges() -> Vec<f64> {
    (0..=BUCKETS).map(|i| i as f64 / BUCKETS as f64).collect()
}

/// The shared store's part of `/stats`: this node's replica, and the figures summed over every
/// node (`null` when the store cannot be asked).
async fn shared_json(state: &AppState) -> Value {
    let Some(shared) = state.cache.shared() else {
        return Value::Null;
    };
    let replication = &shared.replication;
    let lag = replication.lag_percentiles();
    let cluster = match shared.is_available() {
        true => shared.cluster_figures().await.ok(),
        false => None,
    };
    let cluster = cluster.map(|figures| {
        let figure = |name: &str| figures.get(name).copied().unwrap_or(0.0);
        json!({
            "requests": figure("requests") as u64,
            "hits": figure("hits") as u64,
            "tokens_saved": figure("tokens_saved") as u64,
            "cost_saved_usd": (figure("cost_saved_usd") * 1e6).round() / 1e6,
        })
    });
    json!({
        "available": shared.is_available(),
        "namespace": shared.config().namespace,
        "applied": replication.applied.load(std::sync::atomic::Ordering::Relaxed),
        "loads": replication.loads.load(std::sync::atomic::Ordering::Relaxed),
        "lag_ms": {"p50": lag.map(|(p50, _)| p50), "p99": lag.map(|(_, p99)| p99)},
        "cluster": cluster,
    })
}

/// The judge's part of `/stats`: `null` without one.
fn judge_json(state: &AppState, s: &Snapshot) -> Value {
    let Some(judge) = state.service.judge() else {
        return Value::Null;
    };
    let j = &s.judge;
    json!({
        "model": judge.model,
        "floor": super::rounded(judge.policy.floor),
        "max_error": super::rounded(judge.policy.max_error),
        "calls": j.calls,
        "approved": j.approved,
        "rejected": j.rejected,
        "failed": j.failed(),
        "failures": j.failures.iter().map(|(kind, count)| ((*kind).to_owned(), json!(count))).collect::<Map<String, Value>>(),
        "remembered": j.remembered,
        "judged_hits": j.judged_hits,
        "learned_hits": j.learned_hits,
        "passed_over": j.passed_over,
        "prompt_tokens": j.prompt_tokens,
        "completion_tokens": j.completion_tokens,
        "cost_usd": j.cost_usd,
        "mean_latency_ms": (j.mean_latency_ms() * 1000.0).round() / 1000.0,
    })
}

pub async fn stats(State(state): State<AppState>) -> Json<Value> {
    let shared = shared_json(&state).await;
    let s = state.stats.snapshot();
    let breakdown = |requests: u64, hits: u64, tokens: u64, cost: f64| json!({"requests": requests, "hits": hits, "tokens_saved": tokens, "cost_saved_usd": cost});
    let by_model: Map<String, Value> = s
        .by_model
        .iter()
        .map(|(model, row, priced)| {
            let mut value = breakdown(row.requests, row.hits, row.tokens_saved, row.cost_saved_usd);
            value["priced"] = json!(priced);
            (model.clone(), value)
        })
        .collect();
    let by_surface: Map<String, Value> = s
        .by_surface
        .iter()
        .map(|(surface, row)| {
            (
                surface.name().to_owned(),
                breakdown(row.requests, row.hits, row.tokens_saved, row.cost_saved_usd),
            )
        })
        .collect();
    let by_tenant: Map<String, Value> = s
        .by_tenant
        .iter()
        .map(|(tenant, row)| {
            (
                tenant.short_hex(),
                breakdown(row.requests, row.hits, row.tokens_saved, row.cost_saved_usd),
            )
        })
        .collect();
    let history: Vec<Value> = s
        .history
        .iter()
        .map(|i| json!({"t": i.unix_secs, "requests": i.requests, "hits": i.hits}))
        .collect();
    Json(json!({
        "requests": s.requests,
        "hits": s.hits,
        "exact_hits": s.exact_hits,
        "semantic_hits": s.semantic_hits,
        "conversation_hits": s.conversation_hits,
        "conversation_refusals": s.conversation_refusals,
        "context": state.settings.load().context.as_str(),
        "misses": s.misses,
        "bypassed": s.bypassed,
        "rejected": s.rejected,
        "shed": s.shed,
        "in_flight": state.admission.in_flight(),
        "waiting": state.admission.waiting(),
        "cache_failures": s.cache_failures,
        "store_failures": state.cache.store_failures(),
        "store_lost": state.cache.store_lost(),
        "hit_rate": (s.hit_rate() * 10_000.0).round() / 10_000.0,
        "upstream_calls": s.upstream_calls,
        "upstream_errors": s.upstream_errors,
        "tokens_saved": s.tokens_saved(),
        "prompt_tokens_saved": s.prompt_tokens_saved,
        "completion_tokens_saved": s.completion_tokens_saved,
        "cost_saved_usd": s.cost_saved_usd,
        "cost_saved_net_usd": s.cost_saved_net_usd(),
        "judge": judge_json(&state, &s),
        "unpriced_models": s.unpriced_models(),
        "latency_saved_ms": s.latency_saved_ms,
        "entries": state.cache.len(),
        "indexed": state.cache.indexed(),
        "threshold": super::rounded(state.settings.load().threshold),
        "context_threshold": super::rounded(state.settings.load().context_threshold),
        "similarity": {
            "edges": edges(),
            "hits": s.hit_similarity,
            "near_misses": s.near_miss_similarity,
            "conversation_near_misses": s.conversation_near_miss_similarity,
        },
        "verifier_refusals": s.refusals.iter().map(|(reason, count)| (reason.as_str().to_owned(), json!(count))).collect::<Map<String, Value>>(),
        "feedback": {"correct": s.feedback_correct, "wrong": s.feedback_wrong},
        "by_surface": by_surface,
        "by_model": by_model,
        "by_tenant": by_tenant,
        "history": history,
        "shared_store": shared,
    }))
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let snapshot = state.stats.snapshot();
    let live = Live {
        entries: state.cache.len(),
        store_failures: state.cache.store_failures(),
        store_lost: state.cache.store_lost().is_some(),
        in_flight: state.admission.in_flight(),
        waiting: state.admission.waiting(),
        threshold: state.settings.load().threshold,
        context_threshold: state.settings.load().context_threshold,
        hit_sum: state.stats.hit_similarity.sum(),
        near_sum: state.stats.near_miss_similarity.sum(),
        conversation_near_sum: state.stats.conversation_near_miss_similarity.sum(),
    };
    let mut text = prometheus_text(&snapshot, &live);
    if let Some(shared) = state.cache.shared() {
        shared_metrics(&mut text, shared);
    }
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// This node's replica of the shared store. Figures summed over the cluster are not exposed
/// here: Prometheus sums the nodes' own.
fn shared_metrics(text: &mut String, shared: &crate::store::redis::RedisStore) {
    use std::sync::atomic::Ordering::Relaxed;
    let replication = &shared.replication;
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    metric(
        "semcache_shared_store_available",
        "gauge",
        "1 while the shared store (Redis) can be used; 0 while requests go through as a plain proxy.",
        if shared.is_available() { 1.0 } else { 0.0 },
    );
    metric(
        "semcache_replication_applied_total",
        "counter",
        "Changes applied from the shared store's log.",
        replication.applied.load(Relaxed) as f64,
    );
    metric(
        "semcache_replication_loads_total",
        "counter",
        "Whole loads of the shared store: at start, after it came back, or after falling behind its log.",
        replication.loads.load(Relaxed) as f64,
    );
    if let Some((p50, p99)) = replication.lag_percentiles() {
        let _ = writeln!(
            text,
            "# HELP semcache_replication_lag_ms From an entry stored on any node to its change applied on this one, over the last changes.\n# TYPE semcache_replication_lag_ms gauge\nsemcache_replication_lag_ms{{quantile=\"0.5\"}} {p50}\nsemcache_replication_lag_ms{{quantile=\"0.99\"}} {p99}"
        );
    }
}

/// Escapes a label value as the exposition format requires.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What `/metrics` reads from the live service besides the stats snapshot.
#[derive(Clone, Copy)]
struct Live {
    entries: usize,
    store_failures: u64,
    store_lost: bool,
    in_flight: usize,
    waiting: usize,
    threshold: f32,
    context_threshold: f32,
    hit_sum: f64,
    near_sum: f64,
    conversation_near_sum: f64,
}

fn prometheus_text(s: &Snapshot, live: &Live) -> String {
    let Live {
        entries,
        store_failures,
        store_lost,
        in_flight,
        waiting,
        threshold,
        context_threshold,
        hit_sum,
        near_sum,
        conversation_near_sum,
    } = *live;
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let plain = |value: f64| vec![(String::new(), value)];
    family(
        "semcache_requests_total",
        "counter",
        "Chat completion requests by how the cache answered them.",
        &[
            ("{outcome=\"exact_hit\"}".to_owned(), s.exact_hits as f64),
            ("{outcome=\"semantic_hit\"}".to_owned(), s.semantic_hits as f64),
            (
                "{outcome=\"conversation_hit\"}".to_owned(),
                s.conversation_hits as f64,
            ),
            ("{outcome=\"miss\"}".to_owned(), s.misses as f64),
            ("{outcome=\"bypass\"}".to_owned(), s.bypassed as f64),
        ],
    );
    // One sample each, no labels.
    let single: [(&str, &str, &str, f64); 10] = [
        (
            "semcache_rejected_requests_total",
            "counter",
            "Requests refused before the cache (bad body or header).",
            s.rejected as f64,
        ),
        (
            "semcache_shed_requests_total",
            "counter",
            "Requests turned away with 503 because the service was overloaded.",
            s.shed as f64,
        ),
        (
            "semcache_in_flight_requests",
            "gauge",
            "Proxied requests holding a turn now (bounded by --max-in-flight).",
            in_flight as f64,
        ),
        (
            "semcache_waiting_requests",
            "gauge",
            "Proxied requests waiting for a turn now (bounded by --max-waiting).",
            waiting as f64,
        ),
        (
            "semcache_cache_failures_total",
            "counter",
            "Requests forwarded without the cache because embedding or lookup failed.",
            s.cache_failures as f64,
        ),
        (
            "semcache_conversation_refusals_total",
            "counter",
            "Misses of requests compared in their conversation (--context semantic) whose best candidate the matcher refused.",
            s.conversation_refusals as f64,
        ),
        (
            "semcache_store_failures_total",
            "counter",
            "Changes the store could not save (disk full, I/O error); the entries stay in memory.",
            store_failures as f64,
        ),
        (
            "semcache_store_ok",
            "gauge",
            "1 while the store file is the one opened at start; 0 once it was removed or replaced (new entries then live in memory only).",
            if store_lost { 0.0 } else { 1.0 },
        ),
        (
            "semcache_upstream_calls_total",
            "counter",
            "Calls sent to the upstream.",
            s.upstream_calls as f64,
        ),
        (
            "semcache_upstream_errors_total",
            "counter",
            "Upstream calls that timed out, failed, answered an error status or broke mid-stream.",
            s.upstream_errors as f64,
        ),
    ];
    for (name, kind, help, value) in single {
        family(name, kind, help, &plain(value));
    }
    family(
        "semcache_tokens_saved_total",
        "counter",
        "Tokens of answers served from the cache, from their stored usage.",
        &[
            ("{kind=\"prompt\"}".to_owned(), s.prompt_tokens_saved as f64),
            (
                "{kind=\"completion\"}".to_owned(),
                s.completion_tokens_saved as f64,
            ),
        ],
    );
    family(
        "semcache_cost_saved_dollars_total",
        "counter",
        "Upstream cost of the answers served from the cache, for models with a known price.",
        &plain(s.cost_saved_usd),
    );
    let j = &s.judge;
    family(
        "semcache_judge_calls_total",
        "counter",
        "Calls to the judge model, by outcome (a failed call is a miss).",
        &[
            ("{outcome=\"approved\"}".to_owned(), j.approved as f64),
            ("{outcome=\"rejected\"}".to_owned(), j.rejected as f64),
            ("{outcome=\"failed\"}".to_owned(), j.failed() as f64),
        ],
    );
    family(
        "semcache_judge_failures_total",
        "counter",
        "Judge calls that gave no verdict, by kind.",
        &j.failures
            .iter()
            .map(|(kind, count)| (format!("{{kind=\"{kind}\"}}"), *count as f64))
            .collect::<Vec<_>>(),
    );
    family(
        "semcache_judge_remembered_total",
        "counter",
        "Verdicts used again for a request the judge had ruled on before, without a call.",
        &plain(j.remembered as f64),
    );
    family(
        "semcache_judge_hits_total",
        "counter",
        "Semantic hits by what vouched for them: the judge, or the entry's learned bound.",
        &[
            ("{vouched=\"judge\"}".to_owned(), j.judged_hits as f64),
            ("{vouched=\"learned\"}".to_owned(), j.learned_hits as f64),
        ],
    );
    family(
        "semcache_judge_passed_over_total",
        "counter",
        "Candidates passed over without a judge call: their entry's verdicts said no.",
        &plain(j.passed_over as f64),
    );
    family(
        "semcache_judge_tokens_total",
        "counter",
        "Tokens the judge calls used.",
        &[
            ("{kind=\"prompt\"}".to_owned(), j.prompt_tokens as f64),
            ("{kind=\"completion\"}".to_owned(), j.completion_tokens as f64),
        ],
    );
    family(
        "semcache_judge_cost_dollars_total",
        "counter",
        "Cost of the judge calls, for a judge model with a known price.",
        &plain(j.cost_usd),
    );
    family(
        "semcache_judge_latency_seconds_total",
        "counter",
        "Time spent waiting for the judge; divided by the calls, the latency it adds.",
        &plain(j.latency_ms / 1000.0),
    );
    family(
        "semcache_latency_saved_seconds_total",
        "counter",
        "Upstream time of the answers served from the cache minus the time the hits took.",
        &plain(s.latency_saved_ms / 1000.0),
    );
    family(
        "semcache_entries",
        "gauge",
        "Entries in the cache.",
        &plain(entries as f64),
    );
    family(
        "semcache_similarity_threshold",
        "gauge",
        "The live similarity threshold.",
        &plain(super::rounded(threshold)),
    );
    family(
        "semcache_context_similarity_threshold",
        "gauge",
        "The live similarity threshold for conversations (semantic context mode).",
        &plain(super::rounded(context_threshold)),
    );
    let per_surface = |pick: &dyn Fn(&crate::stats::BreakdownSnapshot) -> f64| -> Vec<(String, f64)> {
        s.by_surface
            .iter()
            .map(|(surface, row)| (format!("{{surface=\"{}\"}}", surface.name()), pick(row)))
            .collect()
    };
    family(
        "semcache_surface_requests_total",
        "counter",
        "Requests per API surface (chat_completions, completions).",
        &per_surface(&|row| row.requests as f64),
    );
    family(
        "semcache_surface_hits_total",
        "counter",
        "Cache hits per API surface.",
        &per_surface(&|row| row.hits as f64),
    );
    family(
        "semcache_surface_tokens_saved_total",
        "counter",
        "Tokens saved per API surface.",
        &per_surface(&|row| row.tokens_saved as f64),
    );
    let per_model = |pick: &dyn Fn(&crate::stats::BreakdownSnapshot) -> f64| -> Vec<(String, f64)> {
        s.by_model
            .iter()
            .map(|(model, row, _)| (format!("{{model=\"{}\"}}", label(model)), pick(row)))
            .collect()
    };
    family(
        "semcache_model_requests_total",
        "counter",
        "Cached-surface requests per model.",
        &per_model(&|row| row.requests as f64),
    );
    family(
        "semcache_model_hits_total",
        "counter",
        "Cache hits per model.",
        &per_model(&|row| row.hits as f64),
    );
    family(
        "semcache_model_cost_saved_dollars_total",
        "counter",
        "Cost saved per model.",
        &per_model(&|row| row.cost_saved_usd),
    );
    for (name, help, counts, sum) in [
        (
            "semcache_hit_similarity",
            "Similarity of the entries that answered hits.",
            &s.hit_similarity,
            hit_sum,
        ),
        (
            "semcache_near_miss_similarity",
            "Similarity of the best candidate when a lookup missed.",
            &s.near_miss_similarity,
            near_sum,
        ),
        (
            "semcache_conversation_near_miss_similarity",
            "Similarity of the best candidate when a lookup compared in its conversation missed.",
            &s.conversation_near_miss_similarity,
            conversation_near_sum,
        ),
    ] {
        let mut samples = Vec::new();
        let mut cumulative = 0;
        for (i, count) in counts.iter().enumerate() {
            cumulative += count;
            let upper = (i + 1) as f64 / BUCKETS as f64;
            let le = if i + 1 == BUCKETS {
                "+Inf".to_owned()
            } else {
                format!("{upper}")
            };
            samples.push((format!("_bucket{{le=\"{le}\"}}"), cumulative as f64));
        }
        samples.push(("_sum".to_owned(), sum));
        samples.push(("_count".to_owned(), cumulative as f64));
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (suffix, value) in samples {
            let _ = writeln!(out, "{name}{suffix} {value}");
        }
    }
    out
}
