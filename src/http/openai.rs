//! The OpenAI-compatible routes: cached chat completions, legacy completions, responses and
//! embeddings, and plain forwarding of the rest.
//!
//! Each cached surface is converted here and nothing more: wire format and headers to a
//! [`CacheRequest`], and the core's [`Served`] back to a response. The flow itself (lookup,
//! coalescing, what is stored and when) is `cache::Service`'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_stream::wrappers::ReceiverStream;

use super::auth::tenant_of;
use super::error::ApiError;
use super::json::JsonBody;
use super::AppState;
use crate::cache::{
    CacheRequest, Controls, Criteria, Feedback, Invalid, ItemsRequest, ItemsServed, Outcome, Protocol,
    Replay, Served, ServedBody, TenantId,
};
use crate::openai::embeddings::{self, Embeddings, EmbeddingsRequest};
use crate::openai::{responses, ChatCompletions, Completions, Responses};
use crate::settings::Settings;
use crate::upstream::FORWARDED_RESPONSE_HEADERS;

const X_SEMCACHE: HeaderName = HeaderName::from_static("x-semcache");
const X_SIMILARITY: HeaderName = HeaderName::from_static("x-semcache-similarity");
const X_ENTRY: HeaderName = HeaderName::from_static("x-semcache-entry");
/// On a hit the judge approved, `yes`; on one its entry's learned bound let through, `learned`.
const X_JUDGED: HeaderName = HeaderName::from_static("x-semcache-judged");
/// Why a request that could have been cached was forwarded as it is.
const X_BYPASS: HeaderName = HeaderName::from_static("x-semcache-bypass");
const X_THRESHOLD: &str = "x-semcache-threshold";
const X_CACHED_ITEMS: HeaderName = HeaderName::from_static("x-semcache-cached-items");
/// Answers belong to one tenant: no shared HTTP cache in front of semcache may keep them.
const PRIVATE: HeaderValue = HeaderValue::from_static("private");
const PRIVATE_STREAM: &str = "private, no-cache";

/// How the cache treated a request, as told in the `x-semcache` header.
fn outcome_header(outcome: Outcome) -> HeaderValue {
    HeaderValue::from_static(match outcome {
        Outcome::Hit => "hit",
        Outcome::Miss => "miss",
        Outcome::Bypass => "bypass",
    })
}

/// What the client asked of the cache, from `Cache-Control` and `x-semcache-threshold`.
fn controls_from_headers(headers: &HeaderMap, settings: &Settings) -> Result<Controls, ApiError> {
    let configured_threshold = settings.threshold;
    let mut controls = Controls {
        skip_lookup: false,
        skip_store: false,
        criteria: Criteria {
            threshold: configured_threshold,
            context_threshold: settings.context_threshold,
            max_age: None,
            verify: settings.verify,
            judge: None,
        },
        ttl: None,
        context: settings.context,
    };
    for value in headers.get_all(CACHE_CONTROL) {
        let value = value.to_str().map_err(|_| ApiError::BadHeader {
            header: "cache-control",
            message: "not valid ASCII".to_owned(),
        })?;
        for directive in value.split(',').map(|d| d.trim().to_ascii_lowercase()) {
            match directive.as_str() {
                "no-cache" => controls.skip_lookup = true,
                "no-store" => {
                    controls.skip_lookup = true;
                    controls.skip_store = true;
                }
                directive => {
                    if let Some(seconds) = directive.strip_prefix("max-age=") {
                        let seconds =
                            delta_seconds(seconds.trim_matches('"')).ok_or_else(|| ApiError::BadHeader {
                                header: "cache-control",
                                message: format!(
                                    "max-age must be a whole number of seconds, got {seconds:?}"
                                ),
                            })?;
                        // Serve nothing older, and keep the new answer that long.
                        let max_age = Duration::from_secs(seconds);
                        controls.criteria.max_age = Some(max_age);
                        controls.ttl = Some(max_age);
                    }
                }
            }
        }
    }
    if let Some(value) = headers.get(X_THRESHOLD) {
        let bad = |message: String| ApiError::BadHeader {
            header: X_THRESHOLD,
            message,
        };
        let threshold: f32 = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|t: &f32| (0.0..=1.0).contains(t))
            .ok_or_else(|| bad("must be a number between 0 and 1".to_owned()))?;
        if threshold < configured_threshold {
            return Err(bad(format!(
                "{threshold} is below the configured threshold {configured_threshold}; a request may only ask for a stricter one"
            )));
        }
        // Stricter for conversations too: no match below what the request asked for.
        controls.criteria.threshold = threshold;
        controls.criteria.context_threshold = controls.criteria.context_threshold.max(threshold);
    }
    Ok(controls)
}

/// A `max-age` value: digits only. As RFC 9111 asks, a value too large to represent is taken as
/// the largest one rather than refused; the cache caps lifetimes at [`crate::cache::MAX_TTL`].
fn delta_seconds(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(value.parse().unwrap_or(u64::MAX))
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    cached(&ChatCompletions, state, headers, body).await
}

/// `POST /v1/completions`, the legacy text completions.
pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    cached(&Completions, state, headers, body).await
}

/// `POST /v1/responses`, the Responses API.
pub async fn responses(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    cached(&Responses, state, headers, body).await
}

/// `POST /v1/embeddings`: each text of the input cached on its own, word for word; a batch
/// partly cached sends only the rest upstream, and `usage` counts only what was sent.
/// `x-semcache` is `hit` when every item came from the cache, and `x-semcache-cached-items`
/// says how many did.
pub async fn embeddings(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (tenant, bytes, request, controls) =
        prepare(&state, &headers, body, EmbeddingsRequest::parse).await?;
    let upstream = Arc::clone(&state.upstream);
    let call = |body| async move { upstream.post_json("/embeddings", &headers, body).await };
    let served = match request.items() {
        None => {
            state
                .service
                .forward_items(&request.model, tenant, call, bytes)
                .await?
        }
        Some(items) => {
            let items_request = ItemsRequest {
                tenant,
                fingerprint: request.fingerprint(),
                items,
                model: &request.model,
                controls,
                started,
            };
            state
                .service
                .answer_items(&Embeddings(&request), items_request, call)
                .await?
        }
    };
    Ok(match served {
        ItemsServed::Answers { items, cached, sent } => {
            let (model, prompt_tokens) = match &sent {
                Some((model, usage)) if !model.is_empty() => (model.as_str(), usage.prompt_tokens),
                Some((_, usage)) => (request.model.as_str(), usage.prompt_tokens),
                None => (request.model.as_str(), 0),
            };
            let mut response = Response::new(Body::from(embeddings::list(model, &items, prompt_tokens)));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(CACHE_CONTROL, PRIVATE);
            let outcome = if sent.is_none() {
                Outcome::Hit
            } else {
                Outcome::Miss
            };
            headers.insert(X_SEMCACHE, outcome_header(outcome));
            headers.insert(X_CACHED_ITEMS, HeaderValue::from(cached));
            response
        }
        ItemsServed::Relayed {
            outcome,
            status,
            headers,
            body,
        } => passthrough_response(status, &headers, Body::from(body), outcome),
    })
}

/// What every cached surface reads of a request before the core sees it: the tenant, the body
/// within its limit, the request `parse` makes of it and the client's cache controls. A request
/// refused here is counted as rejected.
async fn prepare<R>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    parse: impl FnOnce(&[u8]) -> Result<R, Invalid>,
) -> Result<(TenantId, Bytes, R, Controls), ApiError> {
    let prepared = async {
        let tenant = tenant_of(state.scope, headers)?;
        let bytes = read_body(body, state.body_limits.max_bytes).await?;
        let request = parse(&bytes).map_err(ApiError::InvalidRequest)?;
        let controls = controls_from_headers(headers, &state.settings.load())?;
        Ok((tenant, bytes, request, controls))
    };
    prepared.await.inspect_err(|_| state.stats.record_rejected())
}

/// One request to a cached surface: read and validated here, answered by the core.
async fn cached<P: Protocol>(
    protocol: &P,
    state: AppState,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (tenant, bytes, request, controls) =
        prepare(&state, &headers, body, |bytes| protocol.parse(bytes)).await?;
    let bytes = protocol.upstream_body(&request, bytes);
    let credential = headers.get(http::header::AUTHORIZATION).cloned();
    let upstream = Arc::clone(&state.upstream);
    let path = protocol.upstream_path();
    let call = |body| async move { upstream.post_json(path, &headers, body).await };
    let served = state
        .service
        .answer(
            protocol,
            CacheRequest {
                tenant,
                request: &request,
                body: bytes,
                controls,
                started,
                credential,
            },
            call,
        )
        .await?;
    Ok(respond(protocol, &request, served))
}

/// The core's answer as an HTTP response.
fn respond<P: Protocol>(protocol: &P, request: &P::Request, served: Served) -> Response {
    match served {
        Served::Hit(hit) => {
            let mut response = match protocol.replay(request, &hit.entry.answer.completion) {
                Replay::Events(events) => {
                    let stream =
                        futures::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>));
                    event_stream(Body::from_stream(stream))
                }
                Replay::Body(body) => {
                    let mut response = Response::new(Body::from(body));
                    let headers = response.headers_mut();
                    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    headers.insert(CACHE_CONTROL, PRIVATE);
                    response
                }
            };
            let headers = response.headers_mut();
            headers.insert(X_SEMCACHE, outcome_header(Outcome::Hit));
            headers.insert(
                X_SIMILARITY,
                HeaderValue::from_str(&format!("{:.4}", hit.similarity)).expect("a number is a header value"),
            );
            headers.insert(X_ENTRY, HeaderValue::from(hit.entry.id));
            if let Some(vouched) = hit.vouched.header() {
                headers.insert(X_JUDGED, HeaderValue::from_static(vouched));
            }
            response
        }
        Served::Upstream {
            outcome,
            status,
            headers,
            body,
            entry,
        } => {
            let mut response = match body {
                ServedBody::Complete(bytes) => {
                    passthrough_response(status, &headers, Body::from(bytes), outcome)
                }
                ServedBody::Passthrough(stream) => {
                    let mut response =
                        passthrough_response(status, &headers, Body::from_stream(stream), outcome);
                    // Relayed as it comes, but with the upstream's length when it gave one.
                    if let Some(length) = headers.get(CONTENT_LENGTH) {
                        if !headers.contains_key(TRANSFER_ENCODING) {
                            response.headers_mut().insert(CONTENT_LENGTH, length.clone());
                        }
                    }
                    response
                }
                ServedBody::Events(receiver) => {
                    let stream = ReceiverStream::new(receiver).map(Ok::<_, std::convert::Infallible>);
                    let mut response = event_stream(Body::from_stream(stream));
                    response.headers_mut().insert(X_SEMCACHE, outcome_header(outcome));
                    response
                }
            };
            if outcome == Outcome::Bypass {
                if let Some(reason) = protocol.bypass_reason(request) {
                    response
                        .headers_mut()
                        .insert(X_BYPASS, HeaderValue::from_static(reason));
                }
            }
            if let Some(entry_id) = entry {
                // The new entry's id, so that feedback can name the answer this client got.
                response
                    .headers_mut()
                    .insert(X_ENTRY, HeaderValue::from(entry_id));
            }
            response
        }
    }
}

fn event_stream(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static(PRIVATE_STREAM));
    response
}

fn passthrough_response(
    status: StatusCode,
    upstream_headers: &HeaderMap,
    body: Body,
    outcome: Outcome,
) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for name in FORWARDED_RESPONSE_HEADERS {
        if let Some(value) = upstream_headers.get(*name) {
            headers.insert(HeaderName::from_static(name), value.clone());
        }
    }
    headers.insert(X_SEMCACHE, outcome_header(outcome));
    headers.insert(CACHE_CONTROL, PRIVATE);
    response
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    entry_id: u64,
    correct: bool,
    /// The `x-semcache-similarity` the answer was served with; the last one when absent.
    similarity: Option<f32>,
}

/// `POST /v1/semcache/feedback`: the application says whether an answer it was served was
/// right. Only the tenant that was served the entry can report on it.
pub async fn feedback(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<FeedbackRequest>,
) -> Result<Response, ApiError> {
    if request.similarity.is_some_and(|s| !(0.0..=1.0).contains(&s)) {
        return Err(ApiError::InvalidRequest(crate::openai::Invalid {
            message: "'similarity' must be within [0, 1].".to_owned(),
            param: Some("similarity".to_owned()),
        }));
    }
    let tenant = tenant_of(state.scope, &headers)?;
    let not_found = || ApiError::NotFound(format!("No entry with id {} for this API key.", request.entry_id));
    let entry = state.cache.get(request.entry_id).ok_or_else(not_found)?;
    if entry.tenant != tenant {
        return Err(not_found());
    }
    let outcome = state
        .cache
        .report(request.entry_id, request.correct, request.similarity)
        .ok_or_else(not_found)?;
    state
        .cache
        .flush_store()
        .await
        .map_err(|err| ApiError::Store(err.to_string()))?;
    state.stats.record_feedback(request.correct);
    Ok(axum::Json(feedback_json(request.entry_id, outcome)).into_response())
}

/// What a feedback report did, for the application and the dashboard alike.
pub(crate) fn feedback_json(entry_id: u64, outcome: Feedback) -> Value {
    match outcome {
        Feedback::Noted => json!({"entry_id": entry_id, "action": "noted"}),
        Feedback::Raised(threshold) => json!({
            "entry_id": entry_id,
            "action": "threshold_raised",
            "threshold": (f64::from(threshold) * 10_000.0).round() / 10_000.0,
        }),
        Feedback::Evicted => json!({"entry_id": entry_id, "action": "evicted"}),
    }
}

/// Any other `/v1/*` call: forwarded as it is, streamed both ways, never cached.
pub async fn forward(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    confined(parts.uri.path())?;
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let path_and_query = path_and_query.strip_prefix("/v1").unwrap_or(path_and_query);
    // A response semcache served is known upstream by the id it came with.
    let translated = upstream_response_path(path_and_query);
    let path_and_query = translated.as_deref().unwrap_or(path_and_query);
    // Read whole already (`body::buffered`): this takes it, with its length.
    let body = read_body(body, state.body_limits.max_bytes).await?;
    let reply = state
        .upstream
        .send(parts.method, path_and_query, &parts.headers, body)
        .await?;
    let mut forwarded = Response::new(Body::empty());
    *forwarded.status_mut() = reply.status;
    for (name, value) in &reply.headers {
        if !is_hop_by_hop(name) {
            forwarded.headers_mut().append(name.clone(), value.clone());
        }
    }
    // What the upstream says about caching stands; by default, an answer is its caller's.
    if !forwarded.headers().contains_key(CACHE_CONTROL) {
        forwarded.headers_mut().insert(CACHE_CONTROL, PRIVATE);
    }
    *forwarded.body_mut() = Body::from_stream(reply.body);
    Ok(forwarded)
}

/// `/responses/{id}…` with the upstream's id in place of one semcache minted for a hit, or
/// `None` when the path names no such id.
fn upstream_response_path(path_and_query: &str) -> Option<String> {
    let rest = path_and_query.strip_prefix("/responses/")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let original = responses::upstream_id(&rest[..end])?;
    Some(format!("/responses/{original}{}", &rest[end..]))
}

/// Refuses a path that could leave the upstream's base path once the upstream, or a proxy in
/// front of it, resolves it: dot segments and backslashes, percent-encoded (even twice) or not,
/// and `..;` path parameters. The operator's upstream key goes with every forwarded call, so
/// a client must not be able to aim it anywhere else on that host.
fn confined(path: &str) -> Result<(), ApiError> {
    let mut decoded = path.as_bytes().to_vec();
    for _ in 0..3 {
        let once = percent_decoded(&decoded);
        if once == decoded {
            break;
        }
        decoded = once;
    }
    let escapes = decoded.contains(&b'\\')
        || decoded.split(|b| *b == b'/').any(|segment| {
            let segment = segment.split(|b| *b == b';').next().unwrap_or_default();
            segment == b"." || segment == b".."
        });
    if escapes {
        return Err(ApiError::BadPath(path.to_owned()));
    }
    Ok(())
}

fn percent_decoded(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade" | "te" | "trailer"
    )
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok(bytes),
        Err(err) => {
            let too_large = std::error::Error::source(&err)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            if too_large {
                Err(ApiError::BodyTooLarge { limit })
            } else {
                Err(ApiError::BodyUnreadable)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use proptest::prelude::*;

    use super::*;

    fn controls(cache_control: &str, threshold: Option<&str>) -> Option<Result<Controls, ApiError>> {
        let mut headers = HeaderMap::new();
        headers.insert(CACHE_CONTROL, HeaderValue::from_str(cache_control).ok()?);
        if let Some(threshold) = threshold {
            headers.insert(X_THRESHOLD, HeaderValue::from_str(threshold).ok()?);
        }
        let settings = Settings {
            threshold: 0.82,
            verify: true,
            context: crate::config::ContextMode::Exact,
            context_threshold: crate::config::DEFAULT_CONTEXT_THRESHOLD,
        };
        Some(controls_from_headers(&headers, &settings))
    }

    #[test]
    fn huge_max_ages_saturate() {
        for value in [
            "18446744073709551615",
            "9223372036854775807",
            "99999999999999999999999999",
        ] {
            let parsed = controls(&format!("max-age={value}"), None).unwrap().unwrap();
            let now = SystemTime::now();
            let expires = crate::cache::expiry(now, parsed.ttl.unwrap());
            assert_eq!(expires.duration_since(now).unwrap(), crate::cache::MAX_TTL);
        }
        assert!(controls("max-age=-1", None).unwrap().is_err());
        assert!(controls("max-age=1e9", None).unwrap().is_err());
    }

    #[test]
    fn a_stricter_threshold_asked_for_holds_for_conversations_too() {
        let plain = controls("", None).unwrap().unwrap().criteria;
        assert_eq!(
            (plain.threshold, plain.context_threshold),
            (0.82, crate::config::DEFAULT_CONTEXT_THRESHOLD)
        );
        let strict = controls("", Some("0.9")).unwrap().unwrap().criteria;
        assert_eq!((strict.threshold, strict.context_threshold), (0.9, 0.9));
        assert!(
            controls("", Some("0.75")).unwrap().is_err(),
            "below the configured 0.82"
        );
    }

    proptest! {
        /// No per-request control, however odd, panics: neither parsing it nor the lifetime it
        /// gives the entry the request stores.
        #[test]
        fn per_request_controls_never_panic(
            directive in "[ -~]{0,40}",
            seconds in any::<u64>(),
            digits in "[0-9]{1,40}",
            threshold in "[ -~]{0,12}",
        ) {
            let now = SystemTime::now();
            for header in [
                directive.clone(),
                format!("max-age={seconds}"),
                format!("no-cache, max-age={digits}"),
                format!("max-age=\"{digits}\", {directive}"),
            ] {
                for threshold in [None, Some(threshold.as_str())] {
                    if let Some(Ok(controls)) = controls(&header, threshold) {
                        prop_assert!((0.0..=1.0).contains(&controls.criteria.threshold));
                        if let Some(max_age) = controls.ttl {
                            let expires = crate::cache::expiry(now, max_age);
                            prop_assert!(expires >= now);
                            prop_assert!(expires.duration_since(now).unwrap() <= crate::cache::MAX_TTL);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn paths_stay_under_the_base() {
        for good in [
            "/v1/models",
            "/v1/files/file-abc/content",
            "/v1/models/ft:gpt-4o:org:x",
            "/v1/a.b/c..d",
            "/v1/models/meta-llama%2FLlama-3",
        ] {
            assert!(confined(good).is_ok(), "{good}");
        }
        for bad in [
            "/v1/../__reset",
            "/v1/../../internal/secret",
            "/v1/..\\admin",
            "/v1/%2e%2e/__reset",
            "/v1/%2E%2e/x",
            "/v1/.%2e/x",
            "/v1/%252e%252e/x",
            "/v1/models/%2e%2e%2f%2e%2e/x",
            "/v1/a/%5c..",
            "/v1/..;/admin",
            "/v1/./models",
            "/v1/models/..",
        ] {
            assert!(confined(bad).is_err(), "{bad}");
        }
    }
}
