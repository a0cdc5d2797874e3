//! The OpenAI-compatible routes: cached chat completions and plain forwarding of the rest.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::auth::tenant_of;
use super::error::{error_body, ApiError};
use super::AppState;
use crate::cache::{
    Answer, Criteria, Feedback, Flight, Hit, HitKind, Join, Lookup, RequestKey, TenantId, Usage,
};
use crate::embed;
use crate::openai::sse::{self, Assembler, Parser};
use crate::openai::ChatRequest;
use crate::settings::Settings;
use crate::upstream::FORWARDED_RESPONSE_HEADERS;

const X_SEMCACHE: HeaderName = HeaderName::from_static("x-semcache");
const X_SIMILARITY: HeaderName = HeaderName::from_static("x-semcache-similarity");
const X_ENTRY: HeaderName = HeaderName::from_static("x-semcache-entry");
const X_THRESHOLD: &str = "x-semcache-threshold";
/// Answers belong to one tenant: no shared HTTP cache in front of semcache may keep them.
const PRIVATE: HeaderValue = HeaderValue::from_static("private");
const PRIVATE_STREAM: &str = "private, no-cache";

/// How the cache treated a request, as told in the `x-semcache` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Hit,
    Miss,
    Bypass,
}

impl Outcome {
    fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Bypass => "bypass",
        })
    }
}

/// What the client asked of the cache for this request.
#[derive(Debug, Clone, Copy)]
struct Controls {
    /// `Cache-Control: no-cache`: do not look up, but store the fresh answer.
    skip_lookup: bool,
    /// `Cache-Control: no-store`: neither look up nor store.
    skip_store: bool,
    threshold: f32,
    /// `Cache-Control: max-age=N`: serve nothing older, and keep the new answer that long.
    max_age: Option<Duration>,
    verify: bool,
}

impl Controls {
    fn from_headers(headers: &HeaderMap, settings: &Settings) -> Result<Self, ApiError> {
        let configured_threshold = settings.threshold;
        let mut controls = Controls {
            skip_lookup: false,
            skip_store: false,
            threshold: configured_threshold,
            max_age: None,
            verify: settings.verify,
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
                            let seconds = delta_seconds(seconds.trim_matches('"')).ok_or_else(|| {
                                ApiError::BadHeader {
                                    header: "cache-control",
                                    message: format!(
                                        "max-age must be a whole number of seconds, got {seconds:?}"
                                    ),
                                }
                            })?;
                            controls.max_age = Some(Duration::from_secs(seconds));
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
            controls.threshold = threshold;
        }
        Ok(controls)
    }

    fn criteria(&self) -> Criteria {
        Criteria {
            threshold: self.threshold,
            max_age: self.max_age,
            verify: self.verify,
        }
    }
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
    let started = Instant::now();
    let (bytes, request, controls, tenant) = match prepare(&state, &headers, body).await {
        Ok(prepared) => prepared,
        Err(err) => {
            state.stats.record_rejected();
            return Err(err);
        }
    };

    // Answers with several choices are not stored, so they are not looked up either.
    let cache_input = (!controls.skip_store && request.n == 1)
        .then(|| request.cache_input())
        .flatten();
    let Some(cache_input) = cache_input else {
        state.stats.record_bypass(&request.model, tenant);
        return forward_chat(&state, &headers, bytes).await;
    };
    let key = RequestKey::new(tenant, cache_input.fingerprint, cache_input.prompt);

    let mut embedding = None;
    let mut nearest = None;
    let mut refused = None;
    let mut flight = None;
    if !controls.skip_lookup {
        match state.cache.lookup(&key, &controls.criteria()).await {
            Ok(Lookup::Hit(hit)) => return Ok(serve_hit(&state, &request, &hit, started)),
            Ok(Lookup::Miss(miss)) => {
                (embedding, nearest) = (miss.embedding, miss.nearest);
                refused = miss.refused.map(|rejection| rejection.reason);
            }
            Err(err) => {
                // The cache failing must not fail the call: act as a plain proxy.
                tracing::error!(error = %err, "lookup failed; forwarding without the cache");
                state.stats.record_bypass(&request.model, tenant);
                state.stats.record_cache_failure();
                return forward_chat(&state, &headers, bytes).await;
            }
        }
        match state.cache.join(&key) {
            Join::Leader(leader) => {
                // The previous leader may have stored the answer since our lookup.
                if let Some(hit) = state.cache.lookup_exact(&key, &controls.criteria()) {
                    leader.complete(Arc::clone(&hit.entry));
                    return Ok(serve_hit(&state, &request, &hit, started));
                }
                flight = Some(leader);
            }
            Join::Follower(receiver) => {
                if let Some(entry) = Join::wait(receiver).await {
                    let hit = Hit {
                        entry,
                        similarity: 1.0,
                        kind: HitKind::Exact,
                    };
                    return Ok(serve_hit(&state, &request, &hit, started));
                }
                // The leader got nothing storable: make our own call.
            }
        }
    }

    state.stats.record_miss(&request.model, tenant, nearest, refused);
    let embedding = match embedding {
        Some(vector) => Embedding::Ready(vector),
        // Not embedded yet (nothing to compare with, or no lookup): embed while the upstream
        // works, so that storing the answer does not wait for it.
        None if key.is_semantic() => Embedding::Pending(EarlyEmbedding::start(&state, &key.prompt)),
        None => Embedding::Absent,
    };
    let miss = Miss {
        state: state.clone(),
        key,
        embedding,
        flight,
        model: request.model.clone(),
        ttl: controls.max_age,
    };
    if request.stream {
        miss.stream(&headers, &request).await
    } else {
        miss.complete(&headers, bytes).await
    }
}

/// Reads and validates what the client sent.
async fn prepare(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, ChatRequest, Controls, TenantId), ApiError> {
    let tenant = tenant_of(state.scope, headers)?;
    let bytes = read_body(body, state.body_limits.max_bytes).await?;
    let request = ChatRequest::parse(&bytes).map_err(ApiError::InvalidRequest)?;
    let controls = Controls::from_headers(headers, &state.settings.load())?;
    Ok((bytes, request, controls, tenant))
}

/// Sends a chat completion upstream, counting the call and its failure.
async fn call_upstream(
    state: &AppState,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<reqwest::Response, ApiError> {
    state.stats.record_upstream_call();
    match state.upstream.chat(headers, body).await {
        Ok(response) => {
            if !response.status().is_success() {
                state.stats.record_upstream_error();
            }
            Ok(response)
        }
        Err(err) => {
            state.stats.record_upstream_error();
            Err(err.into())
        }
    }
}

/// The prompt's vector for storing a miss.
enum Embedding {
    /// Computed by the lookup.
    Ready(Vec<f32>),
    /// Being computed alongside the upstream call.
    Pending(EarlyEmbedding),
    /// The prompt has no text to embed.
    Absent,
}

/// An embedding computed in the background; dropped unfinished (the upstream call failed),
/// it stops.
struct EarlyEmbedding(Option<tokio::task::JoinHandle<Result<Vec<f32>, embed::Error>>>);

impl EarlyEmbedding {
    fn start(state: &AppState, prompt: &str) -> Self {
        let (cache, prompt) = (Arc::clone(&state.cache), prompt.to_owned());
        Self(Some(tokio::spawn(async move { cache.embed(&prompt).await })))
    }

    async fn finish(mut self) -> Result<Vec<f32>, embed::Error> {
        let handle = self.0.take().expect("finished once");
        handle.await.map_err(|err| embed::Error::Task(err.to_string()))?
    }
}

impl Drop for EarlyEmbedding {
    fn drop(&mut self) {
        if let Some(handle) = &self.0 {
            handle.abort();
        }
    }
}

/// A request that goes to the upstream and whose answer is stored when it is complete.
struct Miss {
    state: AppState,
    key: RequestKey,
    embedding: Embedding,
    flight: Option<Flight>,
    model: String,
    ttl: Option<Duration>,
}

impl Miss {
    async fn complete(self, headers: &HeaderMap, body: Bytes) -> Result<Response, ApiError> {
        let started = Instant::now();
        let response = call_upstream(&self.state, headers, body).await?;
        let status = response.status();
        let response_headers = response.headers().clone();
        let body = response.bytes().await.map_err(crate::upstream::Error::from)?;
        let latency = started.elapsed();
        let mut stored = None;
        if status.is_success() {
            match serde_json::from_slice::<Value>(&body) {
                Ok(completion) => {
                    if let Some(answer) = storable(&completion, body.clone(), &self.model, latency) {
                        stored = Some(self.store(answer).await);
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "upstream answered 2xx with a body that is not JSON; not stored")
                }
            }
        }
        let mut response = passthrough_response(status, &response_headers, Body::from(body), Outcome::Miss);
        if let Some(entry_id) = stored {
            // The new entry's id, so that feedback can name the answer this client got.
            response
                .headers_mut()
                .insert(X_ENTRY, HeaderValue::from(entry_id));
        }
        Ok(response)
    }

    async fn stream(self, headers: &HeaderMap, request: &ChatRequest) -> Result<Response, ApiError> {
        let started = Instant::now();
        let response = call_upstream(&self.state, headers, request.body_with_usage().into()).await?;
        let status = response.status();
        if !status.is_success() {
            let response_headers = response.headers().clone();
            let body = response.bytes().await.map_err(crate::upstream::Error::from)?;
            return Ok(passthrough_response(
                status,
                &response_headers,
                Body::from(body),
                Outcome::Miss,
            ));
        }
        let (sender, receiver) = mpsc::channel::<Result<Bytes, Infallible>>(64);
        let include_usage = request.include_usage;
        // The relay runs on its own task: if the client goes away, it still reads the upstream
        // to the end and stores the answer, which coalesced waiters are owed.
        tokio::spawn(self.relay(response, sender, include_usage, started));
        let mut response = Response::new(Body::from_stream(ReceiverStream::new(receiver)));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static(PRIVATE_STREAM));
        headers.insert(X_SEMCACHE, Outcome::Miss.header());
        Ok(response)
    }

    async fn relay(
        self,
        response: reqwest::Response,
        sender: mpsc::Sender<Result<Bytes, Infallible>>,
        include_usage: bool,
        started: Instant,
    ) {
        let mut client = Client(Some(sender));
        let mut parser = Parser::default();
        let mut assembler = Assembler::default();
        let mut stream = response.bytes_stream();
        let mut done = false;
        let mut failure: Option<String> = None;
        'read: while let Some(chunk) = stream.next().await {
            let bytes = match chunk {
                Ok(bytes) => bytes,
                Err(err) => {
                    failure = Some(crate::upstream::Error::from(err).to_string());
                    break;
                }
            };
            for data in parser.feed(&bytes) {
                if data == sse::DONE {
                    done = true;
                    break 'read;
                }
                let usage_only = assembler.push(&data);
                if let Some(broken) = assembler.broken() {
                    // Garbage is not passed on: the client's SDK would fail on it anyway.
                    failure = Some(broken.to_string());
                    break 'read;
                }
                if include_usage || !usage_only {
                    client.send(sse::event(&data)).await;
                }
            }
        }
        if !done {
            let reason = failure.unwrap_or_else(|| "the upstream closed the stream before [DONE]".to_owned());
            tracing::warn!(%reason, "upstream stream broke; nothing stored");
            self.state.stats.record_upstream_error();
            let body = error_body(
                &format!("The upstream stream ended early: {reason}"),
                "upstream_error",
                Some("upstream_stream_broken"),
                None,
            );
            client.send(sse::event(&body.to_string())).await;
            return;
        }
        match assembler.finish() {
            Ok(completion) => {
                let bytes = Bytes::from(serde_json::to_vec(&completion).expect("a JSON value serialises"));
                if let Some(answer) = storable(&completion, bytes, &self.model, started.elapsed()) {
                    self.store(answer).await;
                }
            }
            Err(incomplete) => tracing::warn!(%incomplete, "streamed answer not stored"),
        }
        // [DONE] goes out only after the answer is stored, so a client that asks again at
        // once is answered from the cache.
        client.send(sse::event(sse::DONE)).await;
    }

    /// Stores the answer, wakes coalesced waiters, and lets the index graph catch up in the
    /// background. Returns the new entry's id.
    async fn store(self, answer: Answer) -> u64 {
        let Miss {
            state,
            key,
            embedding,
            flight,
            ttl,
            ..
        } = self;
        let embedding = match embedding {
            Embedding::Ready(embedding) => Some(embedding),
            Embedding::Pending(early) => match early.finish().await {
                Ok(embedding) => Some(embedding),
                Err(err) => {
                    tracing::error!(error = %err, "embedding for storage failed; stored for exact matches only");
                    state.stats.record_cache_failure();
                    None
                }
            },
            Embedding::Absent => None,
        };
        let entry = state.cache.insert(&key, embedding, answer, ttl).await;
        let entry_id = entry.id;
        if let Some(flight) = flight {
            flight.complete(entry);
        }
        let cache = Arc::clone(&state.cache);
        tokio::task::spawn_blocking(move || cache.catch_up(&key));
        entry_id
    }
}

/// The streaming client's end of the relay; it goes quiet once the client has gone.
struct Client(Option<mpsc::Sender<Result<Bytes, Infallible>>>);

impl Client {
    async fn send(&mut self, bytes: Bytes) {
        if let Some(sender) = &self.0 {
            if sender.send(Ok(bytes)).await.is_err() {
                tracing::debug!(
                    "streaming client went away; reading the upstream to the end to store the answer"
                );
                self.0 = None;
            }
        }
    }
}

/// The answer to keep from a successful completion, or `None` when it must not be stored.
/// `bytes` is `completion` as JSON: the upstream's own body, or the assembled stream.
fn storable(completion: &Value, bytes: Bytes, model: &str, latency: Duration) -> Option<Answer> {
    let choices = completion.get("choices")?.as_array()?;
    if choices.is_empty() {
        return None;
    }
    let all_finished = choices.iter().all(|choice| {
        matches!(choice.get("finish_reason").and_then(Value::as_str), Some(reason) if reason != "content_filter")
    });
    if !all_finished {
        return None;
    }
    let usage = completion.get("usage");
    let tokens = |field: &str| {
        usage
            .and_then(|u| u.get(field))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Some(Answer {
        completion: bytes,
        model: model.to_owned(),
        usage: Usage {
            prompt_tokens: tokens("prompt_tokens"),
            completion_tokens: tokens("completion_tokens"),
        },
        upstream_latency: latency,
    })
}

/// A cached answer as a fresh completion: new `id` and `created`, the stored choices and usage.
fn serve_hit(state: &AppState, request: &ChatRequest, hit: &Hit, started: Instant) -> Response {
    let answer = &hit.entry.answer;
    state.stats.record_hit(
        &request.model,
        hit.entry.tenant,
        hit.kind,
        hit.similarity,
        answer.usage,
        answer.upstream_latency.saturating_sub(started.elapsed()),
    );
    let mut completion: Value =
        serde_json::from_slice(&hit.entry.answer.completion).unwrap_or_else(|_| json!({}));
    let id: u64 = rand::thread_rng().gen();
    completion["id"] = json!(format!("chatcmpl-semcache-{id:016x}"));
    completion["created"] = json!(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()));

    let mut response = if request.stream {
        let events = sse::replay(&completion, request.include_usage);
        let stream = futures::stream::iter(events.into_iter().map(Ok::<_, Infallible>));
        let mut response = Response::new(Body::from_stream(stream));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        response
            .headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static(PRIVATE_STREAM));
        response
    } else {
        let mut response = axum::Json(completion).into_response();
        response.headers_mut().insert(CACHE_CONTROL, PRIVATE);
        response
    };
    let headers = response.headers_mut();
    headers.insert(X_SEMCACHE, Outcome::Hit.header());
    headers.insert(
        X_SIMILARITY,
        HeaderValue::from_str(&format!("{:.4}", hit.similarity)).expect("a number is a header value"),
    );
    headers.insert(X_ENTRY, HeaderValue::from(hit.entry.id));
    response
}

/// Sends the chat request upstream unchanged and passes the answer through, stored nowhere.
async fn forward_chat(state: &AppState, headers: &HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let response = call_upstream(state, headers, body).await?;
    let status = response.status();
    let response_headers = response.headers().clone();
    let body = Body::from_stream(response.bytes_stream());
    let mut response = passthrough_response(status, &response_headers, body, Outcome::Bypass);
    // Relayed as it comes, but with the upstream's length when it gave one.
    if let Some(length) = response_headers.get(CONTENT_LENGTH) {
        if !response_headers.contains_key(TRANSFER_ENCODING) {
            response.headers_mut().insert(CONTENT_LENGTH, length.clone());
        }
    }
    Ok(response)
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
    headers.insert(X_SEMCACHE, outcome.header());
    headers.insert(CACHE_CONTROL, PRIVATE);
    response
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackRequest {
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
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(body, state.body_limits.max_bytes).await?;
    let request: FeedbackRequest = serde_json::from_slice(&bytes).map_err(|err| {
        ApiError::InvalidRequest(crate::openai::Invalid {
            message: format!("Invalid feedback: {err}. Expected {{\"entry_id\": 42, \"correct\": false}}."),
            param: None,
        })
    })?;
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
    // Read whole already (`body::buffered`): this takes it, with its length.
    let body = reqwest::Body::from(read_body(body, state.body_limits.max_bytes).await?);
    let response = state
        .upstream
        .send(parts.method, path_and_query, &parts.headers, body)
        .await?;
    let mut forwarded = Response::new(Body::empty());
    *forwarded.status_mut() = response.status();
    for (name, value) in response.headers() {
        if !is_hop_by_hop(name) {
            forwarded.headers_mut().append(name.clone(), value.clone());
        }
    }
    // What the upstream says about caching stands; by default, an answer is its caller's.
    if !forwarded.headers().contains_key(CACHE_CONTROL) {
        forwarded.headers_mut().insert(CACHE_CONTROL, PRIVATE);
    }
    *forwarded.body_mut() = Body::from_stream(response.bytes_stream());
    Ok(forwarded)
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
        };
        Some(Controls::from_headers(&headers, &settings))
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
            let expires = crate::cache::expiry(now, parsed.max_age.unwrap());
            assert_eq!(expires.duration_since(now).unwrap(), crate::cache::MAX_TTL);
        }
        assert!(controls("max-age=-1", None).unwrap().is_err());
        assert!(controls("max-age=1e9", None).unwrap().is_err());
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
                        prop_assert!((0.0..=1.0).contains(&controls.threshold));
                        if let Some(max_age) = controls.max_age {
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
