//! A test upstream that answers like OpenAI and misbehaves on demand, and a way to start
//! semcache against it on a free port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use futures::StreamExt;
use parking_lot::Mutex;
use semcache::config::ServeArgs;
use semcache::embed::{self, Backend, Embedder, ModelPaths};
use semcache::settings::SharedSettings;
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// How the test upstream answers the next chat completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Answers with this status and an OpenAI error body.
    Status(u16),
    /// Streams part of the answer, then drops the connection.
    BrokenStream,
    /// Streams the whole answer and `[DONE]`, but no choice has a finish_reason.
    UnfinishedStream,
    /// Streams a chunk that is not JSON, then the rest and `[DONE]`.
    GarbageStream,
    /// Streams part of the answer, then sends nothing more and never closes.
    StalledStream,
}

#[derive(Default)]
struct UpstreamState {
    chat_calls: AtomicUsize,
    completion_calls: AtomicUsize,
    response_calls: AtomicUsize,
    /// The `input` of every call to `/v1/embeddings`, in order.
    embedding_inputs: Mutex<Vec<Value>>,
    other_calls: AtomicUsize,
    mode: Mutex<Option<Mode>>,
    delay: Mutex<Duration>,
    authorizations: Mutex<Vec<String>>,
    /// Method, path and Authorization of every call to a route it does not serve.
    strays: Mutex<Vec<(String, String, String)>>,
}

pub struct TestUpstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
}

impl TestUpstream {
    pub async fn start() -> Self {
        let state = Arc::new(UpstreamState::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completion))
            .route("/v1/responses", post(response))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/models", get(models))
            .fallback(stray)
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn chat_calls(&self) -> usize {
        self.state.chat_calls.load(Ordering::SeqCst)
    }

    /// Calls to `/v1/completions` (legacy completions).
    pub fn completion_calls(&self) -> usize {
        self.state.completion_calls.load(Ordering::SeqCst)
    }

    /// Calls to `/v1/responses` (the Responses API).
    pub fn response_calls(&self) -> usize {
        self.state.response_calls.load(Ordering::SeqCst)
    }

    /// The `input` of every call to `/v1/embeddings`, in order.
    pub fn embedding_inputs(&self) -> Vec<Value> {
        self.state.embedding_inputs.lock().clone()
    }

    pub fn other_calls(&self) -> usize {
        self.state.other_calls.load(Ordering::SeqCst)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock() = Some(mode);
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock() = delay;
    }

    /// Calls to routes the test upstream does not serve: (method, path, authorization).
    pub fn strays(&self) -> Vec<(String, String, String)> {
        self.state.strays.lock().clone()
    }

    /// The Authorization headers the upstream received, in order.
    pub fn authorizations(&self) -> Vec<String> {
        self.state.authorizations.lock().clone()
    }
}

fn last_user_text(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|messages| messages.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// What every route answers in `Mode::Status`: that status, an OpenAI error body and a
/// `Retry-After`.
fn refusal(code: u16) -> Response {
    let status = StatusCode::from_u16(code).unwrap();
    let error = json!({"error": {"message": "upstream says no", "type": "server_error", "param": null, "code": null}});
    (status, [("retry-after", "7")], Json(error)).into_response()
}

async fn chat(
    State(state): State<Arc<UpstreamState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let call = state.chat_calls.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        state.authorizations.lock().push(auth.to_owned());
    }
    let delay = *state.delay.lock();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mode = state.mode.lock().unwrap_or(Mode::Normal);
    if let Mode::Status(code) = mode {
        return refusal(code);
    }
    let content = format!("Answer #{call} to: {}", last_user_text(&body));
    let model = body["model"].as_str().unwrap_or("unknown").to_owned();
    let n = body["n"].as_u64().unwrap_or(1);
    let usage = json!({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18});
    if body["stream"] != json!(true) {
        let choices: Vec<Value> = (0..n)
            .map(|i| json!({"index": i, "message": {"role": "assistant", "content": content}, "logprobs": null, "finish_reason": "stop"}))
            .collect();
        return Json(json!({
            "id": format!("chatcmpl-up{call}"), "object": "chat.completion", "created": 1_700_000_000,
            "model": model, "choices": choices, "usage": usage
        }))
        .into_response();
    }

    let chunk = |delta: Value, finish: Value| {
        json!({"id": format!("chatcmpl-up{call}"), "object": "chat.completion.chunk", "created": 1_700_000_000,
               "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    };
    let finish = if mode == Mode::UnfinishedStream {
        Value::Null
    } else {
        json!("stop")
    };
    let (head, tail) = content.split_at(content.len() / 2);
    let mut events: Vec<Value> = vec![
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": head}), Value::Null),
        chunk(json!({"content": tail}), Value::Null),
        chunk(json!({}), finish),
    ];
    if body["stream_options"]["include_usage"] == json!(true) {
        events.push(json!({"id": format!("chatcmpl-up{call}"), "object": "chat.completion.chunk", "created": 1_700_000_000,
                           "model": model, "choices": [], "usage": usage}));
    }
    let mut frames: Vec<Result<Bytes, std::io::Error>> = events
        .iter()
        .map(|e| Ok(Bytes::from(format!("data: {e}\n\n"))))
        .collect();
    match mode {
        Mode::BrokenStream => {
            frames.truncate(2);
            frames.push(Err(std::io::Error::other("connection reset by test upstream")));
        }
        Mode::GarbageStream => {
            frames.insert(2, Ok(Bytes::from("data: {\"choices\": [{\"delta\": oops\n\n")));
            frames.push(Ok(Bytes::from("data: [DONE]\n\n")));
        }
        Mode::StalledStream => {
            frames.truncate(2);
            let stream = futures::stream::iter(frames).chain(futures::stream::pending());
            return Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap();
        }
        _ => frames.push(Ok(Bytes::from("data: [DONE]\n\n"))),
    }
    // Frames go out one by one with a pause, as a real model's tokens do.
    let stream = futures::stream::iter(frames).then(|frame| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        frame
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Legacy completions: the answer names the call and the prompt, as `chat` does; the same
/// modes (status, broken stream).
async fn completion(State(state): State<Arc<UpstreamState>>, Json(body): Json<Value>) -> Response {
    let call = state.completion_calls.fetch_add(1, Ordering::SeqCst) + 1;
    let mode = state.mode.lock().unwrap_or(Mode::Normal);
    if let Mode::Status(code) = mode {
        return refusal(code);
    }
    let prompt = match &body["prompt"] {
        Value::Array(items) => items.first().and_then(Value::as_str).unwrap_or("").to_owned(),
        prompt => prompt.as_str().unwrap_or("").to_owned(),
    };
    let text = format!(" Completion #{call} of: {prompt}");
    let model = body["model"].as_str().unwrap_or("unknown").to_owned();
    let usage = json!({"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14});
    let id = format!("cmpl-up{call}");
    if body["stream"] != json!(true) {
        return Json(json!({
            "id": id, "object": "text_completion", "created": 1_700_000_000, "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": "length"}], "usage": usage
        }))
        .into_response();
    }
    let chunk = |text: &str, finish: Value| {
        json!({"id": id, "object": "text_completion", "created": 1_700_000_000, "model": model,
               "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]})
    };
    let (head, tail) = text.split_at(text.len() / 2);
    let mut events = vec![
        chunk(head, Value::Null),
        chunk(tail, Value::Null),
        chunk("", json!("length")),
    ];
    if body["stream_options"]["include_usage"] == json!(true) {
        events.push(
            json!({"id": id, "object": "text_completion", "created": 1_700_000_000, "model": model,
                           "choices": [], "usage": usage}),
        );
    }
    let mut frames: Vec<Result<Bytes, std::io::Error>> = events
        .iter()
        .map(|e| Ok(Bytes::from(format!("data: {e}\n\n"))))
        .collect();
    if mode == Mode::BrokenStream {
        frames.truncate(1);
        frames.push(Err(std::io::Error::other("connection reset by test upstream")));
    } else {
        frames.push(Ok(Bytes::from("data: [DONE]\n\n")));
    }
    let stream = futures::stream::iter(frames).then(|frame| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        frame
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// The Responses API: "Response #n to: prompt" as one message, or a call of the first tool
/// when tools are given. `Mode::UnfinishedStream` makes the response `incomplete` (streamed
/// or not); streamed, it arrives as the API sends it, the text in two deltas.
async fn response(State(state): State<Arc<UpstreamState>>, Json(body): Json<Value>) -> Response {
    let call = state.response_calls.fetch_add(1, Ordering::SeqCst) + 1;
    let mode = state.mode.lock().unwrap_or(Mode::Normal);
    if let Mode::Status(code) = mode {
        return refusal(code);
    }
    let prompt = match &body["input"] {
        Value::String(text) => text.clone(),
        Value::Array(items) => items
            .iter()
            .rev()
            .find(|item| item["role"] == "user")
            .map(|item| match &item["content"] {
                Value::String(text) => text.clone(),
                parts => parts
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|part| part["text"].as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
            })
            .unwrap_or_default(),
        _ => String::new(),
    };
    let id = format!("resp_up{call}");
    let text = format!("Response #{call} to: {prompt}");
    let item = match body["tools"].as_array().and_then(|tools| tools.first()) {
        Some(tool) => json!({
            "type": "function_call", "id": format!("fc_up{call}"), "call_id": format!("call_up{call}"),
            "name": tool["name"], "arguments": json!({"query": prompt}).to_string(), "status": "completed"
        }),
        None => json!({
            "type": "message", "id": format!("msg_up{call}"), "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        }),
    };
    let incomplete = mode == Mode::UnfinishedStream;
    let whole = json!({
        "id": id, "object": "response", "created_at": 1_700_000_000,
        "status": if incomplete { "incomplete" } else { "completed" },
        "error": null,
        "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "instructions": body.get("instructions").cloned().unwrap_or(Value::Null),
        "model": body["model"], "output": [item],
        "parallel_tool_calls": true, "previous_response_id": body.get("previous_response_id").cloned().unwrap_or(Value::Null),
        "store": true, "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
        "tools": body.get("tools").cloned().unwrap_or(json!([])), "top_p": 1.0, "truncation": "disabled",
        "usage": {"input_tokens": 6, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": 10, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 16},
        "user": null, "metadata": body.get("metadata").cloned().unwrap_or(json!({}))
    });
    if body["stream"] != json!(true) {
        return Json(whole).into_response();
    }
    let mut started = whole.clone();
    started["status"] = json!("in_progress");
    started["output"] = json!([]);
    started["usage"] = Value::Null;
    let mut events = vec![
        json!({"type": "response.created", "response": started}),
        json!({"type": "response.in_progress", "response": started}),
    ];
    let at = json!({"item_id": item["id"], "output_index": 0});
    let with = |mut fields: Value| {
        for (key, value) in at.as_object().unwrap() {
            fields[key] = value.clone();
        }
        fields
    };
    if item["type"] == "message" {
        let mut added = item.clone();
        added["status"] = json!("in_progress");
        added["content"] = json!([]);
        let (head, tail) = text.split_at(text.len() / 2);
        let part =
            |text: &str| json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
        events.extend([
            json!({"type": "response.output_item.added", "output_index": 0, "item": added}),
            with(json!({"type": "response.content_part.added", "content_index": 0, "part": part("")})),
            with(json!({"type": "response.output_text.delta", "content_index": 0, "delta": head, "logprobs": []})),
            with(json!({"type": "response.output_text.delta", "content_index": 0, "delta": tail, "logprobs": []})),
            with(json!({"type": "response.output_text.done", "content_index": 0, "text": text, "logprobs": []})),
            with(json!({"type": "response.content_part.done", "content_index": 0, "part": part(&text)})),
        ]);
    } else {
        let mut added = item.clone();
        added["status"] = json!("in_progress");
        added["arguments"] = json!("");
        events.extend([
            json!({"type": "response.output_item.added", "output_index": 0, "item": added}),
            with(json!({"type": "response.function_call_arguments.delta", "delta": item["arguments"]})),
            with(json!({"type": "response.function_call_arguments.done", "arguments": item["arguments"]})),
        ]);
    }
    events.push(json!({"type": "response.output_item.done", "output_index": 0, "item": item}));
    let terminal = if incomplete {
        "response.incomplete"
    } else {
        "response.completed"
    };
    events.push(json!({"type": terminal, "response": whole}));
    let mut frames: Vec<Result<Bytes, std::io::Error>> = events
        .iter_mut()
        .enumerate()
        .map(|(n, e)| {
            e["sequence_number"] = json!(n);
            Ok(Bytes::from(format!(
                "event: {}\ndata: {e}\n\n",
                e["type"].as_str().unwrap()
            )))
        })
        .collect();
    match mode {
        Mode::BrokenStream => {
            frames.truncate(4);
            frames.push(Err(std::io::Error::other("connection reset by test upstream")));
        }
        Mode::GarbageStream => frames.insert(
            3,
            Ok(Bytes::from(
                "event: response.output_text.delta\ndata: {not json\n\n",
            )),
        ),
        _ => {}
    }
    let stream = futures::stream::iter(frames).then(|frame| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        frame
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

/// Embeddings: each text's vector is [its length, the call's number, its place in the call],
/// so that a test can tell which call made it, as floats or base64 as asked; usage counts one
/// token per word.
async fn embeddings(State(state): State<Arc<UpstreamState>>, Json(body): Json<Value>) -> Response {
    let call = {
        let mut inputs = state.embedding_inputs.lock();
        inputs.push(body["input"].clone());
        inputs.len()
    };
    if let Some(Mode::Status(code)) = *state.mode.lock() {
        return refusal(code);
    }
    let texts: Vec<String> = match &body["input"] {
        Value::String(text) => vec![text.clone()],
        Value::Array(items) => items
            .iter()
            .map(|item| item.as_str().map_or_else(|| item.to_string(), str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let base64 = body["encoding_format"] == "base64";
    let data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let vector = [text.len() as f32, call as f32, i as f32 + 0.5];
            // As the API sends it: the little-endian f32s, base64-encoded.
            let embedding = if base64 {
                use base64::Engine as _;
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens: usize = texts.iter().map(|text| text.split_whitespace().count()).sum();
    Json(
        json!({"object": "list", "data": data, "model": "text-embedding-3-small",
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
    .into_response()
}

async fn stray(
    State(state): State<Arc<UpstreamState>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> StatusCode {
    let auth = headers
        .get("authorization")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    state
        .strays
        .lock()
        .push((method.to_string(), uri.path().to_owned(), auth));
    StatusCode::NOT_FOUND
}

async fn models(State(state): State<Arc<UpstreamState>>) -> Json<Value> {
    state.other_calls.fetch_add(1, Ordering::SeqCst);
    Json(json!({"object": "list", "data": [{"id": "test-model", "object": "model"}]}))
}

pub fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2")
}

pub fn model_paths() -> ModelPaths {
    ModelPaths {
        model_dir: model_dir(),
        onnxruntime: None,
    }
}

/// The real model on `backend`, loaded once per test run.
pub fn embedder_on(backend: Backend) -> Arc<dyn Embedder> {
    static EMBEDDERS: Mutex<Vec<(Backend, Arc<dyn Embedder>)>> = Mutex::new(Vec::new());
    let mut loaded = EMBEDDERS.lock();
    if let Some((_, embedder)) = loaded.iter().find(|(b, _)| *b == backend) {
        return Arc::clone(embedder);
    }
    let embedder = embed::load(backend, &model_paths())
        .unwrap_or_else(|err| panic!("{err}\nThe tests need the real model: run `make model` first."));
    loaded.push((backend, Arc::clone(&embedder)));
    embedder
}

/// The real model on the default backend, loaded once per test run.
pub fn embedder() -> Arc<dyn Embedder> {
    embedder_on(Backend::DEFAULT)
}

/// A data directory of its own for each semcache a test starts.
pub fn fresh_data_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "semcache-it-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub struct Semcache {
    pub addr: SocketAddr,
    pub settings: SharedSettings,
    pub http: reqwest::Client,
    shutdown: oneshot::Sender<()>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The data directory when the test did not choose one: removed with the instance.
    _data_dir: Option<RemovedOnDrop>,
}

/// A directory removed when this is dropped, so that test runs do not fill the temp directory.
pub struct RemovedOnDrop(pub PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub const KEY_A: &str = "sk-test-tenant-a-0123456789";
pub const KEY_B: &str = "sk-test-tenant-b-9876543210";

impl Semcache {
    pub async fn start(upstream: &TestUpstream) -> Self {
        Self::start_with(upstream, |_| {}).await
    }

    pub async fn start_with(upstream: &TestUpstream, configure: impl FnOnce(&mut ServeArgs)) -> Self {
        Self::start_with_embedder(upstream, embedder(), configure).await
    }

    pub async fn start_with_embedder(
        upstream: &TestUpstream,
        embedder: Arc<dyn Embedder>,
        configure: impl FnOnce(&mut ServeArgs),
    ) -> Self {
        let mut args = ServeArgs::parse_from(["serve", "--upstream", &upstream.base_url()]);
        args.model.model_dir = model_dir();
        let own_dir = fresh_data_dir();
        args.data_dir = own_dir.clone();
        configure(&mut args);
        let data_dir = (args.data_dir == own_dir).then_some(RemovedOnDrop(own_dir));
        args.validate().unwrap();
        let app = semcache::app(&args, embedder).unwrap();
        let settings = app.settings.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(semcache::run(app, listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            settings,
            http: reqwest::Client::new(),
            shutdown,
            served,
            _data_dir: data_dir,
        }
    }

    /// Shuts down gracefully and waits until the store is closed.
    pub async fn stop(self) {
        let _ = self.shutdown.send(());
        self.served.await.unwrap().unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GETs a route that must answer 200 with text.
    pub async fn get_text(&self, path: &str) -> String {
        let reply = Reply::from(self.http.get(self.url(path)).send().await.unwrap()).await;
        assert_eq!(reply.status, 200, "{path}: {:?}", reply.body);
        String::from_utf8(reply.body.to_vec()).unwrap()
    }

    /// GETs a route that must answer 200 with JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let reply = Reply::from(self.http.get(self.url(path)).send().await.unwrap()).await;
        assert_eq!(reply.status, 200, "{path}: {:?}", reply.body);
        reply.json()
    }

    /// Waits until `/stats` reports `value` for `field` (an event in the server, seen from
    /// outside), for at most 10 s.
    pub async fn wait_for_stat(&self, field: &str, value: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let stats = self.get_json("/stats").await;
            if stats[field] == value {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{field} never reached {value}: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Posts a chat completion with tenant A's key.
    pub async fn chat(&self, body: &Value) -> Reply {
        self.chat_as(KEY_A, body, &[]).await
    }

    pub async fn chat_as(&self, key: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
        let mut request = self
            .http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Reply::from(request.send().await.unwrap()).await
    }
}

/// A response with its body read.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub async fn from(response: reqwest::Response) -> Self {
        Self {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.bytes().await.unwrap(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `hit`, `miss` or `bypass`.
    pub fn cache(&self) -> &str {
        self.header("x-semcache").unwrap_or("<none>")
    }

    pub fn similarity(&self) -> f32 {
        self.header("x-semcache-similarity")
            .expect("a hit has x-semcache-similarity")
            .parse()
            .unwrap()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("{err}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The answer's text, from a JSON completion or a stream of chunks.
    pub fn content(&self) -> String {
        if self.header("content-type") == Some("text/event-stream") {
            sse_content(&self.sse_events())
        } else {
            self.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    }

    /// Data of each SSE event, parsed independently of semcache's own parser.
    pub fn sse_events(&self) -> Vec<String> {
        let text = String::from_utf8(self.body.to_vec()).unwrap();
        text.split("\n\n")
            .filter(|event| !event.trim().is_empty())
            .map(|event| {
                event
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not an SSE data event: {event:?}"))
                    .to_owned()
            })
            .collect()
    }
}

/// Joins the content deltas of a stream that must end in `[DONE]`, checking each chunk's shape.
pub fn sse_content(events: &[String]) -> String {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "stream ends with [DONE]: {events:?}"
    );
    let mut content = String::new();
    let mut finished = false;
    for data in &events[..events.len() - 1] {
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk", "{chunk}");
        assert!(chunk["id"].is_string() && chunk["created"].is_u64(), "{chunk}");
        for choice in chunk["choices"].as_array().unwrap() {
            if let Some(text) = choice["delta"]["content"].as_str() {
                content.push_str(text);
            }
            finished |= choice["finish_reason"].is_string();
        }
    }
    assert!(finished, "a choice finished: {events:?}");
    content
}

pub fn chat_body(prompt: &str) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful support assistant."},
            {"role": "user", "content": prompt}
        ]
    })
}

pub fn stream_body(prompt: &str) -> Value {
    let mut body = chat_body(prompt);
    body["stream"] = json!(true);
    body
}

/// The real binary, running `serve` in a child process.
pub struct Process {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    /// Every line it printed, stdout and stderr.
    pub output: Arc<Mutex<Vec<String>>>,
}

/// Posts `chat_body(prompt)` with tenant A's key and `headers` to a semcache at `addr` (a
/// process of its own, as `spawn_binary` starts).
pub async fn ask_at(
    client: &reqwest::Client,
    addr: SocketAddr,
    prompt: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, reqwest::Error> {
    let mut request = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(KEY_A)
        .json(&chat_body(prompt));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

impl Drop for Process {
    /// A test that fails midway leaves no server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `semcache serve --listen 127.0.0.1:0 --model-dir … ARGS` with `envs`, and waits for
/// the line that says where it listens.
pub fn spawn_binary(args: &[&str], envs: &[(&str, &str)]) -> Process {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_semcache"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--model-dir")
        .arg(model_dir())
        .args(args)
        .env("NO_COLOR", "1")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the semcache binary starts");
    let output = Arc::new(Mutex::new(Vec::new()));
    let (found, listen) = std::sync::mpsc::channel();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let output = Arc::clone(&output);
        let found = found.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if line.contains("semcache is serving") {
                    let addr = line
                        .split("listen=")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next());
                    let _ = found.send(addr.unwrap_or_default().to_owned());
                }
                output.lock().push(line);
            }
        });
    }
    let addr = listen
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("semcache did not start:\n{}", output.lock().join("\n")));
    Process {
        child,
        addr: addr.parse().unwrap(),
        output,
    }
}

/// An HTTP/1 exchange written and read byte for byte, for what a client library would not
/// send (dot segments, odd headers, trickled bodies).
pub struct Raw {
    pub stream: tokio::net::TcpStream,
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|err| panic!("{err}: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: tokio::net::TcpStream::connect(addr).await.unwrap(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads one response with a `Content-Length` (or up to the end of the connection).
    pub async fn response(&mut self) -> RawReply {
        use tokio::io::AsyncReadExt;
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let read = self.stream.read(&mut chunk).await.unwrap();
            assert!(
                read > 0,
                "connection closed before a response: {:?}",
                String::from_utf8_lossy(&buffer)
            );
            buffer.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut body = buffer[head_end + 4..].to_vec();
        let length = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse::<usize>().unwrap());
        match length {
            Some(length) => {
                while body.len() < length {
                    let read = self.stream.read(&mut chunk).await.unwrap();
                    assert!(read > 0, "connection closed inside a body");
                    body.extend_from_slice(&chunk[..read]);
                }
            }
            None => {
                let _ = self.stream.read_to_end(&mut body).await;
            }
        }
        RawReply {
            status,
            headers,
            body,
        }
    }

    /// Whether the server closes the connection within `within` (reading and dropping
    /// whatever it sends first).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 1024];
        tokio::time::timeout(within, async {
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }
}

/// A request line and headers, with `Content-Length` for `body`.
pub fn raw_request(method: &str, path: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Waits until `condition` holds, checking every few milliseconds, for at most 10 s.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How many lookups a similarity histogram of `/stats` counts (`similarity.NAME`).
pub fn histogram_total(stats: &Value, name: &str) -> u64 {
    stats["similarity"][name]
        .as_array()
        .unwrap_or_else(|| panic!("no histogram {name}: {stats}"))
        .iter()
        .map(|count| count.as_u64().unwrap())
        .sum()
}
