//! Operator routes: live settings, entries, flushing. `guard.rs` stands in front of them.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::json::JsonBody;
use super::AppState;
use crate::cache::{Entry, TenantId};
use crate::config::ContextMode;
use crate::config::Scope;
use crate::openai::Invalid;
use crate::settings::Settings;

const MAX_LIMIT: usize = 1000;

/// Most characters of a prompt that `/admin/entries` shows; a longer one is cut there and
/// marked `prompt_truncated`, with its whole length in `prompt_chars`.
pub const SHOWN_PROMPT_CHARS: usize = 1000;

fn config_json(state: &AppState) -> Value {
    let settings = state.settings.load();
    json!({
        "threshold": super::rounded(settings.threshold),
        "verify": settings.verify,
        "context": settings.context.as_str(),
        "context_threshold": super::rounded(settings.context_threshold),
        "scope": match state.scope {
            Scope::Tenant => "tenant",
            Scope::Shared => "shared",
        },
        "max_body_bytes": state.body_limits.max_bytes,
        "admin_token_set": state.admin_token.is_some(),
    })
}

pub async fn get_config(State(state): State<AppState>) -> Json<Value> {
    Json(config_json(&state))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    threshold: Option<f32>,
    verify: Option<bool>,
    context: Option<ContextMode>,
    context_threshold: Option<f32>,
}

pub async fn patch_config(
    State(state): State<AppState>,
    JsonBody(patch): JsonBody<ConfigPatch>,
) -> Result<Json<Value>, ApiError> {
    let mut settings: Settings = (**state.settings.load()).clone();
    for (name, value) in [
        ("threshold", patch.threshold),
        ("context_threshold", patch.context_threshold),
    ] {
        if let Some(value) = value.filter(|value| !(0.0..=1.0).contains(value)) {
            return Err(ApiError::InvalidRequest(Invalid {
                message: format!("'{name}' must be within [0, 1], got {value}."),
                param: Some(name.to_owned()),
            }));
        }
    }
    if let Some(threshold) = patch.threshold {
        settings.threshold = threshold;
    }
    if let Some(threshold) = patch.context_threshold {
        settings.context_threshold = threshold;
    }
    if let Some(verify) = patch.verify {
        settings.verify = verify;
    }
    if let Some(context) = patch.context {
        settings.context = context;
    }
    // Saved first: a change that cannot be kept is not applied.
    state.settings_store.keep(&settings).await?;
    tracing::info!(
        threshold = settings.threshold,
        verify = settings.verify,
        context = settings.context.as_str(),
        context_threshold = settings.context_threshold,
        "settings changed through the admin API"
    );
    state.settings.store(Arc::new(settings));
    Ok(Json(config_json(&state)))
}

#[derive(Debug, Deserialize)]
pub struct EntriesQuery {
    query: Option<String>,
    limit: Option<usize>,
}

fn entry_json(entry: &Entry, similarity: Option<f32>) -> Value {
    let created = entry
        .created
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let chars = entry.prompt.chars().count();
    let shown = match entry.prompt.char_indices().nth(SHOWN_PROMPT_CHARS) {
        Some((end, _)) => &entry.prompt[..end],
        None => entry.prompt.as_str(),
    };
    let mut value = json!({
        "id": entry.id,
        "prompt": shown,
        "prompt_chars": chars,
        "prompt_truncated": chars > SHOWN_PROMPT_CHARS,
        "model": entry.answer.model,
        "tenant": entry.tenant.short_hex(),
        "hits": entry.hits(),
        "wrong_reports": entry.wrong_reports(),
        // Raised by wrong-answer reports; null while the entry has none of its own.
        "own_threshold": (entry.own_threshold() > 0.0).then(|| super::rounded(entry.own_threshold())),
        "created": rfc3339(created),
        "prompt_tokens": entry.answer.usage.prompt_tokens,
        "completion_tokens": entry.answer.usage.completion_tokens,
        "upstream_latency_ms": entry.answer.upstream_latency.as_secs_f64() * 1000.0,
    });
    if let Some(similarity) = similarity {
        value["similarity"] = json!((similarity * 10_000.0).round() / 10_000.0);
    }
    value
}

pub async fn list_entries(
    State(state): State<AppState>,
    query: Result<Query<EntriesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|err| {
        ApiError::InvalidRequest(Invalid {
            message: format!("Invalid query: {err}"),
            param: Some("limit".to_owned()),
        })
    })?;
    let limit = query.limit.unwrap_or(20);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::InvalidRequest(Invalid {
            message: format!("'limit' must be between 1 and {MAX_LIMIT}."),
            param: Some("limit".to_owned()),
        }));
    }
    let data: Vec<Value> = match query.query.filter(|q| !q.trim().is_empty()) {
        Some(text) => state
            .cache
            .nearest_anywhere(&text, limit)
            .await?
            .iter()
            .map(|(entry, similarity)| entry_json(entry, Some(*similarity)))
            .collect(),
        None => state
            .cache
            .recent(limit)
            .iter()
            .map(|entry| entry_json(entry, None))
            .collect(),
    };
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn delete_entry(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let removed = match id.parse::<u64>() {
        Ok(id) => state.cache.delete(id).await?,
        Err(_) => false,
    };
    if !removed {
        return Err(ApiError::NotFound(format!("No entry with id {id:?}.")));
    }
    Ok(Json(
        json!({"id": id.parse::<u64>().unwrap_or_default(), "deleted": true}),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryFeedback {
    correct: bool,
}

/// `POST /admin/entries/{id}/feedback`: an operator's verdict on a stored answer, as the
/// application's `POST /v1/semcache/feedback` but for any tenant's entry (the dashboard's
/// "wrong" button). No similarity is given: the last one the entry was served at is used.
pub async fn entry_feedback(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<EntryFeedback>,
) -> Result<Json<Value>, ApiError> {
    let not_found = || ApiError::NotFound(format!("No entry with id {id:?}."));
    let entry_id = id.parse::<u64>().map_err(|_| not_found())?;
    let outcome = state
        .cache
        .report(entry_id, request.correct, None)
        .ok_or_else(not_found)?;
    state
        .cache
        .flush_store()
        .await
        .map_err(|err| ApiError::Store(err.to_string()))?;
    state.stats.record_feedback(request.correct);
    Ok(Json(super::openai::feedback_json(entry_id, outcome)))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlushRequest {
    /// Only this client key's entries; hashed like every tenant key, never kept.
    api_key: Option<String>,
}

/// An empty body flushes everything.
pub async fn flush(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<Option<FlushRequest>>,
) -> Result<Json<Value>, ApiError> {
    let request = request.unwrap_or_default();
    let tenant = request.api_key.as_deref().map(TenantId::from_api_key);
    let removed = state.cache.clear(tenant).await?;
    tracing::info!(
        removed,
        one_tenant = tenant.is_some(),
        "cache flushed through the admin API"
    );
    Ok(Json(json!({"removed": removed})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvalidateRequest {
    prompt: String,
    /// Defaults to the live threshold.
    min_similarity: Option<f32>,
    /// Only this client key's entries; every tenant's without it.
    api_key: Option<String>,
}

/// Removes every entry whose prompt is at least `min_similarity` similar to `prompt`: for
/// when the facts behind a family of answers change.
pub async fn invalidate(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<InvalidateRequest>,
) -> Result<Json<Value>, ApiError> {
    let min_similarity = request
        .min_similarity
        .unwrap_or_else(|| state.settings.load().threshold);
    if !(0.0..=1.0).contains(&min_similarity) {
        return Err(ApiError::InvalidRequest(Invalid {
            message: format!("'min_similarity' must be within [0, 1], got {min_similarity}."),
            param: Some("min_similarity".to_owned()),
        }));
    }
    if request.prompt.trim().is_empty() {
        return Err(ApiError::InvalidRequest(Invalid {
            message: "'prompt' must not be empty.".to_owned(),
            param: Some("prompt".to_owned()),
        }));
    }
    let tenant = request.api_key.as_deref().map(TenantId::from_api_key);
    let removed = state
        .cache
        .invalidate(&request.prompt, min_similarity, tenant)
        .await?;
    tracing::info!(
        removed,
        min_similarity,
        one_tenant = tenant.is_some(),
        "entries invalidated"
    );
    Ok(Json(
        json!({"removed": removed, "min_similarity": min_similarity}),
    ))
}

/// Seconds since the epoch as an RFC 3339 UTC time, without a date-time crate.
fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs_of_day = unix_secs % 86_400;
    // Civil-from-days, after Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}
