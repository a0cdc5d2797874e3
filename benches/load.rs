//! Load test of the whole service: throughput, latency percentiles and resident memory at target
//! hit ratios of 0%, 50% and 95%, against a model that takes a fixed time to answer.
//!
//! `cargo bench --bench load` (2,000 requests per ratio, 32 connections, prompts from
//! `../shared/data/sharegpt_first_prompts.jsonl`), `-- --help` for the options. Without `--bench`
//! (as `cargo test --all-targets` runs it) it makes a smoke run of 40 requests per ratio on 4
//! connections with built-in prompts and asserts that every request was answered and that the
//! hit ratios moved with the target.
//!
//! # What runs
//!
//! - The *model* is an in-process axum server that answers `POST /v1/chat/completions` with a
//!   well-formed `chat.completion` (usage included) after `--upstream-delay-ms` (200 ms by
//!   default), and counts its calls. Only non-streaming requests are sent; it refuses streams.
//! - The *service* is the real `semcache` binary in a child process (`serve --durability
//!   relaxed`, a fresh temporary data directory, the real embedding model), so its resident
//!   memory can be read from `/proc/<pid>/status` and nothing of this tool is counted in it.
//!   Each target ratio gets a fresh instance: every ratio starts from an empty cache, its memory
//!   figures are its own, and every ratio can ask the same prompts, so the prompt-length mix is
//!   the same across rows. `SEMCACHE_BIN` names another binary.
//! - With `--target URL`, the tool drives an endpoint that is already running, such as another
//!   cache pointed at this tool's test upstream: `--upstream-listen 127.0.0.1:9999` gives the
//!   upstream an address to configure the peer with beforehand (`--upstream-url` uses an external
//!   model instead). For LiteLLM's proxy (see `../shared/notes/litellm-peer.md`), add
//!   `--api-key <its master key> --hit-header x-litellm-cache-key`. That endpoint keeps its cache
//!   between ratios, so there each ratio takes fresh prompts from a range no earlier ratio used.
//!   Memory is only reported with `--pid`.
//!
//! # The workload
//!
//! A pool of distinct prompts (exact duplicates removed). For target ratio r, each request is,
//! with probability r, an exact repeat of a prompt this ratio already sent (an exact hit), and
//! otherwise a prompt never sent before (a miss). The sequence is drawn from a seeded RNG, so
//! every run asks the same prompts in the same order. The *achieved* ratio, counted from the
//! `x-semcache: hit` response header, is reported next to the target: a repeat sent while its
//! first request is still waiting for the model joins that call and is a hit that waited, and a
//! fresh real prompt can mean the same as an earlier one and be a semantic hit. When the pool
//! runs out (and always for the built-in prompts), fresh prompts are numbered variants, "Ticket
//! 12: ...": different numbers make the hit verifier refuse them as each other's answer.
//!
//! # How it is measured
//!
//! - Closed loop (default): `--concurrency` workers each send a request, read the whole answer
//!   and send the next, for `--requests` requests or `--seconds` seconds. Latency is from send
//!   to the answer's last byte. This measures the most the service sustains with that many
//!   clients; its latencies are only those clients' experience.
//! - Open loop (`--rate R`): request i is due at `start + i / R` whatever happened before it, and
//!   its latency is measured from when it was *due*, not from when a worker got to send it. A
//!   closed loop stops sending while the service stalls, so the requests that would have
//!   arrived during a stall are never timed ("coordinated omission") and the percentiles look
//!   better than any user saw. At most `--concurrency` requests are in flight; a request that
//!   finds them all busy waits in this tool, and that wait counts in its latency.
//! - Before each ratio, `--concurrency` requests (at most 32) with fresh prompts (not counted) open the
//!   connections and wake the service; memory is read a second after them ("after warm-up")
//!   and a second after the last answer ("at end"), once the writes they queued are done.
//! - Throughput is successful answers over the time from the first send to the last answer.
//!
//! This tool, its test upstream and the service share the machine's cores; on a small machine
//! the figures are the whole system's, with the tool's own cost in them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The prompts of the smoke run, and of a full run when the data file is missing. They are
/// always numbered ("Ticket 7: ..."), so they never run out and never answer each other.
const BUILTIN_PROMPTS: &[&str] = &[
    "How do I reverse a linked list in Python?",
    "Write a short poem about autumn leaves.",
    "What are the health benefits of green tea?",
    "Explain the difference between TCP and UDP.",
    "Suggest a three-day itinerary for Lisbon.",
    "How can I improve my sleep quality?",
    "Summarise the causes of the French Revolution.",
    "What is a good recipe for vegetarian lasagna?",
    "How does compound interest work?",
    "Draft a polite email asking my landlord to fix the heating.",
    "What should I pack for a winter hiking trip?",
    "Explain how vaccines train the immune system.",
    "Give me tips for a job interview at a startup.",
    "How do I center a div with CSS?",
    "What is the plot of Moby-Dick?",
    "Compare electric cars with hybrid cars.",
    "How do I train a puppy to stop biting?",
    "Write a SQL query that finds duplicate emails in a users table.",
    "What causes the northern lights?",
    "How do I start learning the guitar as an adult?",
    "Explain what a Kubernetes pod is.",
    "What are some ways to reduce food waste at home?",
    "Describe the rules of chess for a beginner.",
    "Why is the sky blue?",
];

const DATA_FILE: &str = "../shared/data/sharegpt_first_prompts.jsonl";
const MODEL: &str = "gpt-4o-mini";

/// Load generator for semcache (or any OpenAI-compatible endpoint).
#[derive(Parser, Debug)]
#[command(name = "load")]
struct Options {
    /// Set by `cargo bench`; without it, a fixed smoke run ignores every other option.
    #[arg(long)]
    bench: bool,
    /// A benchmark name filter, as `cargo bench FILTER` passes to every bench: runs only if
    /// "load" contains it.
    #[arg(hide = true)]
    filter: Option<String>,
    /// JSONL file of `{"id", "prompt"}` objects [default: ../shared/data/sharegpt_first_prompts.jsonl,
    /// or the built-in prompts when it is missing].
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Use the built-in prompts instead of a file.
    #[arg(long, conflicts_with = "prompts")]
    builtin_prompts: bool,
    /// Target hit ratios, one row each.
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 0.5, 0.95])]
    ratios: Vec<f64>,
    /// Connections (closed loop: clients; open loop: most requests in flight).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Requests per ratio [default: 2000, unless --seconds is given].
    #[arg(long)]
    requests: Option<usize>,
    /// Seconds per ratio.
    #[arg(long)]
    seconds: Option<f64>,
    /// Open loop: requests per second, each timed from when it was due.
    #[arg(long)]
    rate: Option<f64>,
    /// How long the test upstream takes to answer.
    #[arg(long, default_value_t = 200)]
    upstream_delay_ms: u64,
    /// Address for the test upstream, so that a peer can be configured with it in advance.
    #[arg(long, default_value = "127.0.0.1:0")]
    upstream_listen: SocketAddr,
    /// Use this OpenAI-compatible base URL as the model instead of the test upstream.
    #[arg(long)]
    upstream_url: Option<String>,
    /// Drive this running OpenAI-compatible base URL (e.g. http://127.0.0.1:4000/v1) instead of
    /// starting semcache.
    #[arg(long)]
    target: Option<String>,
    /// With --target: the process whose resident memory to report.
    #[arg(long, requires = "target")]
    pid: Option<u32>,
    /// Bearer key sent with every request (hidden in the printed command line).
    #[arg(long, env = "LOAD_API_KEY", hide_env_values = true, default_value = "sk-load")]
    api_key: String,
    /// Response header that marks a hit, `NAME` (present) or `NAME=VALUE`.
    #[arg(long, default_value = "x-semcache=hit")]
    hit_header: String,
    /// Seed of the workload's RNG.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print the results as JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
    /// Every this many seconds, print the time, the requests answered so far and the service's
    /// resident memory to stderr (for soak runs); the samples also go into the JSON report.
    #[arg(long)]
    memory_every: Option<f64>,
}

impl Options {
    fn smoke() -> Self {
        Self::parse_from([
            "load",
            "--builtin-prompts",
            "--ratios",
            "0,0.95",
            "--concurrency",
            "4",
            "--requests",
            "40",
            "--upstream-delay-ms",
            "20",
        ])
    }

    fn upstream_delay(&self) -> Duration {
        Duration::from_millis(self.upstream_delay_ms)
    }

    /// Requests per ratio, if the run is bounded by a count.
    fn request_limit(&self) -> Option<usize> {
        match (self.requests, self.seconds) {
            (None, None) => Some(2000),
            (requests, _) => requests,
        }
    }
}

/// The model: answers every chat completion the same way after a fixed delay.
struct TestUpstream {
    base_url: String,
    calls: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct UpstreamState {
    delay: Duration,
    calls: Arc<AtomicUsize>,
}

impl TestUpstream {
    async fn start(listen: SocketAddr, delay: Duration) -> anyhow::Result<Self> {
        let calls = Arc::new(AtomicUsize::new(0));
        let state = UpstreamState {
            delay,
            calls: Arc::clone(&calls),
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(answer))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the test upstream to {listen}"))?;
        let base_url = format!("http://{}/v1", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { base_url, calls })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }
}

async fn answer(State(state): State<UpstreamState>, Json(body): Json<Value>) -> Response {
    let call = state.calls.fetch_add(1, Ordering::Relaxed) + 1;
    if body["stream"] == json!(true) {
        let error = json!({"error": {"message": "the load test upstream does not stream", "type": "invalid_request_error", "param": "stream", "code": null}});
        return (StatusCode::BAD_REQUEST, Json(error)).into_response();
    }
    tokio::time::sleep(state.delay).await;
    let prompt = body["messages"]
        .as_array()
        .and_then(|messages| messages.last())
        .and_then(|message| message["content"].as_str())
        .unwrap_or("");
    // About 100 words, the size of a short real answer.
    let content = format!(
        "Here is an answer to: {prompt}. {}",
        "The answer goes on. ".repeat(25)
    );
    Json(json!({
        "id": format!("chatcmpl-load{call}"),
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": body["model"].clone(),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 120, "total_tokens": 160},
    }))
    .into_response()
}

/// A semcache child process with a data directory of its own; both go when it is dropped,
/// panics included.
struct Service {
    child: Child,
    base_url: String,
    data_dir: PathBuf,
}

impl Service {
    async fn start(upstream_url: &str, run: usize) -> anyhow::Result<Self> {
        let binary = semcache_binary()?;
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let model_dir = manifest_dir.join("models/all-MiniLM-L6-v2");
        ensure!(
            model_dir.join("model.safetensors").exists(),
            "no model in {}: run `make model` first",
            model_dir.display()
        );
        let data_dir = std::env::temp_dir().join(format!("semcache-load-{}-{run}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let listen = format!("127.0.0.1:{port}");
        let child = Command::new(&binary)
            .arg("serve")
            .args([
                "--listen",
                &listen,
                "--upstream",
                upstream_url,
                "--durability",
                "relaxed",
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--model-dir")
            .arg(&model_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut service = Self {
            child,
            base_url: format!("http://{listen}/v1"),
            data_dir,
        };
        service.wait_until_healthy(&listen).await?;
        Ok(service)
    }

    async fn wait_until_healthy(&mut self, listen: &str) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let url = format!("http://{listen}/healthz");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("semcache exited before it was ready: {status}");
            }
            let healthy = client
                .get(&url)
                .send()
                .await
                .map(|r| r.status() == StatusCode::OK);
            if healthy.unwrap_or(false) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "semcache did not answer {url} within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// `SEMCACHE_BIN`, else the binary cargo built alongside this bench (release under `cargo
/// bench`, debug under `cargo test`).
fn semcache_binary() -> anyhow::Result<PathBuf> {
    let binary = std::env::var_os("SEMCACHE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_semcache")));
    ensure!(
        binary.exists(),
        "no semcache binary at {}: run `cargo build --release` or set SEMCACHE_BIN",
        binary.display()
    );
    Ok(binary)
}

/// Resident memory of a process in MiB, from `/proc/<pid>/status`.
/// `pid`'s resident memory once it has had a second to finish what the last answers left to
/// do (stores, the embedder giving back its working memory).
async fn settled_resident_mib(pid: Option<u32>) -> Option<f64> {
    let pid = pid?;
    tokio::time::sleep(SETTLE).await;
    resident_mib(pid)
}

/// How long the service is left alone before its memory is read.
const SETTLE: Duration = Duration::from_secs(1);

fn resident_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// One line of the prompts file; other fields are ignored.
#[derive(Deserialize)]
struct PromptRecord {
    prompt: String,
}

/// Distinct prompts to draw fresh requests from.
struct Prompts {
    source: String,
    distinct: Vec<Arc<str>>,
    /// Whether every prompt is numbered, not only those past the end of the pool.
    always_numbered: bool,
}

impl Prompts {
    fn builtin() -> Self {
        Self {
            source: "built-in".into(),
            distinct: BUILTIN_PROMPTS.iter().map(|&prompt| prompt.into()).collect(),
            always_numbered: true,
        }
    }

    fn choose(options: &Options) -> anyhow::Result<Self> {
        if options.builtin_prompts {
            return Ok(Self::builtin());
        }
        if let Some(path) = &options.prompts {
            return Self::read(path);
        }
        let default = Path::new(env!("CARGO_MANIFEST_DIR")).join(DATA_FILE);
        if default.exists() {
            Self::read(&default)
        } else {
            eprintln!(
                "warning: {} is missing; using the {} built-in prompts instead",
                default.display(),
                BUILTIN_PROMPTS.len()
            );
            Ok(Self::builtin())
        }
    }

    fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading prompts from {}", path.display()))?;
        let mut seen = HashSet::new();
        let mut distinct = Vec::new();
        for (line_idx, line) in text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
        {
            let record: PromptRecord = serde_json::from_str(line).with_context(|| {
                format!(
                    "{}:{}: not a {{\"prompt\": ...}} object",
                    path.display(),
                    line_idx + 1
                )
            })?;
            if !record.prompt.trim().is_empty() && seen.insert(record.prompt.clone()) {
                distinct.push(record.prompt.into());
            }
        }
        ensure!(!distinct.is_empty(), "{} holds no prompts", path.display());
        Ok(Self {
            source: path.display().to_string(),
            distinct,
            always_numbered: false,
        })
    }

    /// The `index`-th fresh prompt; past the pool's end, numbered variants of it.
    fn fresh(&self, index: usize) -> Arc<str> {
        let base = &self.distinct[index % self.distinct.len()];
        if self.always_numbered || index >= self.distinct.len() {
            format!("Ticket {}: {base}", index + 1).into()
        } else {
            Arc::clone(base)
        }
    }
}

/// The seeded sequence of prompts of one ratio's run, shared by the workers.
struct Workload {
    prompts: Arc<Prompts>,
    hit_ratio: f64,
    rng: StdRng,
    next_fresh: usize,
    sent: Vec<Arc<str>>,
    issued: usize,
}

impl Workload {
    fn new(prompts: Arc<Prompts>, hit_ratio: f64, seed: u64, first_fresh: usize) -> Self {
        Self {
            prompts,
            hit_ratio,
            rng: StdRng::seed_from_u64(seed),
            next_fresh: first_fresh,
            sent: Vec::new(),
            issued: 0,
        }
    }

    /// A prompt never asked before, not remembered for repeats (warm-up).
    fn fresh(&mut self) -> Arc<str> {
        let prompt = self.prompts.fresh(self.next_fresh);
        self.next_fresh += 1;
        prompt
    }

    /// The next measured request's prompt.
    fn next(&mut self) -> Arc<str> {
        let repeat = !self.sent.is_empty() && self.rng.gen_bool(self.hit_ratio);
        let prompt = if repeat {
            Arc::clone(&self.sent[self.rng.gen_range(0..self.sent.len())])
        } else {
            let prompt = self.fresh();
            self.sent.push(Arc::clone(&prompt));
            prompt
        };
        self.issued += 1;
        prompt
    }
}

/// How a hit shows in a response.
struct HitHeader {
    name: String,
    value: Option<String>,
}

impl HitHeader {
    fn parse(spec: &str) -> Self {
        match spec.split_once('=') {
            Some((name, value)) => Self {
                name: name.into(),
                value: Some(value.into()),
            },
            None => Self {
                name: spec.into(),
                value: None,
            },
        }
    }

    fn is_hit(&self, headers: &reqwest::header::HeaderMap) -> bool {
        match (headers.get(&self.name), &self.value) {
            (Some(found), Some(value)) => found.as_bytes() == value.as_bytes(),
            (found, None) => found.is_some(),
            (None, Some(_)) => false,
        }
    }
}

/// Sends the requests of one ratio's run.
struct Driver {
    client: reqwest::Client,
    url: String,
    api_key: String,
    hit_header: HitHeader,
    errors_shown: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
}

/// One answered request. `status` is `None` when no response came.
struct Sample {
    latency: Duration,
    status: Option<u16>,
    hit: bool,
}

impl Driver {
    async fn send(&self, prompt: &str) -> Sample {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}]});
        let started = Instant::now();
        let sent = self
            .client
            .post(&self.url)
            .bearer_auth(&self.api_key)
            .json(&body)
            .send()
            .await;
        let (status, hit, error) = match sent {
            Ok(response) => {
                let status = response.status();
                let hit = self.hit_header.is_hit(response.headers());
                match response.bytes().await {
                    Ok(_) if status == StatusCode::OK => (Some(status.as_u16()), hit, None),
                    Ok(body) => (
                        Some(status.as_u16()),
                        false,
                        Some(String::from_utf8_lossy(&body).into_owned()),
                    ),
                    Err(err) => (None, false, Some(err.to_string())),
                }
            }
            Err(err) => (None, false, Some(err.to_string())),
        };
        if status == Some(200) {
            self.answered.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(error) = error {
            // A few are enough to see what went wrong.
            if self.errors_shown.fetch_add(1, Ordering::Relaxed) < 5 {
                eprintln!("error: status {status:?}: {error:.300}");
            }
        }
        Sample {
            latency: started.elapsed(),
            status,
            hit,
        }
    }

    /// Sends `n` fresh prompts at once, unmeasured, and requires every one to succeed.
    async fn warm_up(&self, workload: &mut Workload, n: usize) -> anyhow::Result<()> {
        let prompts: Vec<Arc<str>> = (0..n).map(|_| workload.fresh()).collect();
        let samples = futures::future::join_all(prompts.iter().map(|prompt| self.send(prompt))).await;
        let failed = samples.iter().filter(|sample| sample.status != Some(200)).count();
        ensure!(
            failed == 0,
            "{failed} of {n} warm-up requests to {} failed",
            self.url
        );
        Ok(())
    }

    /// Runs the measured requests; returns every sample and the time from the first send to
    /// the last answer.
    async fn run(&self, workload: &Arc<Mutex<Workload>>, options: &Options) -> (Vec<Sample>, Duration) {
        let request_limit = options.request_limit();
        let time_limit = options.seconds.map(Duration::from_secs_f64);
        let started = Instant::now();
        // The next request, when it is due (open loop), or `None` once the run is over.
        let next = move |workload: &mut Workload| {
            let index = workload.issued;
            let due = options
                .rate
                .map(|rate| started + Duration::from_secs_f64(index as f64 / rate));
            let past_count = request_limit.is_some_and(|limit| index >= limit);
            let past_time =
                time_limit.is_some_and(|limit| due.unwrap_or_else(Instant::now) - started >= limit);
            (!past_count && !past_time).then(|| (due, workload.next()))
        };
        let workers = (0..options.concurrency).map(|_| async {
            let mut samples = Vec::new();
            loop {
                // A statement of its own, so that the lock is released before the request.
                let Some((due, prompt)) = next(&mut workload.lock().unwrap()) else {
                    break;
                };
                if let Some(due) = due {
                    tokio::time::sleep_until(due.into()).await;
                }
                let mut sample = self.send(&prompt).await;
                if let Some(due) = due {
                    // Open loop: from when the request was due, however late it left.
                    sample.latency = due.elapsed();
                }
                samples.push(sample);
            }
            samples
        });
        let samples = futures::future::join_all(workers)
            .await
            .into_iter()
            .flatten()
            .collect();
        (samples, started.elapsed())
    }
}

/// One ratio's figures: a row of the table.
#[derive(Debug, Serialize)]
struct Row {
    target_hit_ratio: f64,
    requests: usize,
    achieved_hit_ratio: f64,
    throughput_rps: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    errors: usize,
    upstream_calls: Option<usize>,
    rss_after_warm_up_mib: Option<f64>,
    rss_at_end_mib: Option<f64>,
    /// With `--memory-every`: the service's resident memory during the run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    memory_samples: Vec<MemorySample>,
}

/// The service's resident memory at one moment of a run.
#[derive(Debug, Clone, Copy, Serialize)]
struct MemorySample {
    seconds: f64,
    answered: usize,
    rss_mib: f64,
}

/// Reads the service's resident memory every `every` until aborted, printing each reading.
async fn sample_memory(
    every: Duration,
    pid: u32,
    answered: Arc<AtomicUsize>,
    samples: Arc<Mutex<Vec<MemorySample>>>,
) {
    let started = Instant::now();
    let mut ticks = tokio::time::interval_at((started + every).into(), every);
    loop {
        ticks.tick().await;
        let Some(rss_mib) = resident_mib(pid) else {
            continue;
        };
        let sample = MemorySample {
            seconds: started.elapsed().as_secs_f64(),
            answered: answered.load(Ordering::Relaxed),
            rss_mib,
        };
        eprintln!(
            "{:>7.0} s  {:>8} answered  {:>6.0} MiB",
            sample.seconds, sample.answered, sample.rss_mib
        );
        samples.lock().unwrap().push(sample);
    }
}

impl Row {
    fn new(target_hit_ratio: f64, samples: &[Sample], elapsed: Duration) -> Self {
        let mut latencies: Vec<Duration> = samples
            .iter()
            .filter(|sample| sample.status == Some(200))
            .map(|sample| sample.latency)
            .collect();
        latencies.sort_unstable();
        let answered = latencies.len();
        let hits = samples.iter().filter(|sample| sample.hit).count();
        // Nearest rank: the smallest latency that at least this share of requests did not exceed.
        let percentile = |share: f64| {
            let rank = ((share * answered as f64).ceil() as usize).clamp(1, answered.max(1));
            latencies
                .get(rank - 1)
                .map_or(0.0, |latency| latency.as_secs_f64() * 1000.0)
        };
        Self {
            target_hit_ratio,
            requests: samples.len(),
            achieved_hit_ratio: hits as f64 / answered.max(1) as f64,
            throughput_rps: answered as f64 / elapsed.as_secs_f64(),
            p50_ms: percentile(0.50),
            p90_ms: percentile(0.90),
            p99_ms: percentile(0.99),
            max_ms: percentile(1.0),
            errors: samples.len() - answered,
            upstream_calls: None,
            rss_after_warm_up_mib: None,
            rss_at_end_mib: None,
            memory_samples: Vec::new(),
        }
    }
}

/// Everything printed about a run.
#[derive(Debug, Serialize)]
struct Report {
    command: String,
    machine: String,
    endpoint: String,
    upstream: String,
    prompts: String,
    load: String,
    rows: Vec<Row>,
}

impl Report {
    fn print_markdown(&self) {
        println!("Command: `{}`  ", self.command);
        println!("Machine: {}  ", self.machine);
        println!("Endpoint: {}; upstream: {}  ", self.endpoint, self.upstream);
        println!("Prompts: {}; load: {}\n", self.prompts, self.load);
        println!("| target hit ratio | requests | achieved hit ratio | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | upstream calls | RSS after warm-up | RSS at end |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        let optional = |value: Option<String>| value.unwrap_or_else(|| "–".into());
        for row in &self.rows {
            println!(
                "| {:.0}% | {} | {:.1}% | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} |",
                row.target_hit_ratio * 100.0,
                row.requests,
                row.achieved_hit_ratio * 100.0,
                row.throughput_rps,
                row.p50_ms,
                row.p90_ms,
                row.p99_ms,
                row.max_ms,
                row.errors,
                optional(row.upstream_calls.map(|calls| calls.to_string())),
                optional(row.rss_after_warm_up_mib.map(|mib| format!("{mib:.0} MiB"))),
                optional(row.rss_at_end_mib.map(|mib| format!("{mib:.0} MiB"))),
            );
        }
    }
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} CPUs, {cpu}")
}

async fn run(options: &Options) -> anyhow::Result<Report> {
    ensure!(options.concurrency > 0, "--concurrency must be at least 1");
    ensure!(
        options.rate.is_none_or(|rate| rate > 0.0),
        "--rate must be positive"
    );
    ensure!(
        options.ratios.iter().all(|ratio| (0.0..=1.0).contains(ratio)),
        "--ratios must lie between 0 and 1"
    );
    let prompts = Arc::new(Prompts::choose(options)?);
    let test_upstream = match &options.upstream_url {
        Some(_) => None,
        None => Some(TestUpstream::start(options.upstream_listen, options.upstream_delay()).await?),
    };
    let upstream_url = match (&options.upstream_url, &test_upstream) {
        (Some(url), _) => url.clone(),
        (None, Some(upstream)) => upstream.base_url.clone(),
        (None, None) => unreachable!("the test upstream starts when no --upstream-url is given"),
    };
    if let (Some(upstream), Some(_)) = (&test_upstream, &options.target) {
        eprintln!("test upstream: {}", upstream.base_url);
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.concurrency)
        .timeout(Duration::from_secs(120))
        .build()?;

    let mut rows = Vec::new();
    let mut next_fresh = 0;
    for (run_idx, &ratio) in options.ratios.iter().enumerate() {
        let service = match options.target {
            Some(_) => None,
            None => Some(Service::start(&upstream_url, run_idx).await?),
        };
        let (base_url, pid) = match (&service, &options.target) {
            (Some(service), _) => (service.base_url.clone(), Some(service.pid())),
            (None, Some(target)) => (target.trim_end_matches('/').to_owned(), options.pid),
            (None, None) => unreachable!("a service starts when no --target is given"),
        };
        let driver = Driver {
            client: client.clone(),
            url: format!("{base_url}/chat/completions"),
            api_key: options.api_key.clone(),
            hit_header: HitHeader::parse(&options.hit_header),
            errors_shown: Arc::new(AtomicUsize::new(0)),
            answered: Arc::new(AtomicUsize::new(0)),
        };
        // A fresh service has an empty cache, so it may see the same prompts as the last one.
        let first_fresh = if service.is_some() { 0 } else { next_fresh };
        let mut workload = Workload::new(Arc::clone(&prompts), ratio, options.seed, first_fresh);
        // Enough to open connections and wake the model, few enough not to overload a service
        // that sheds load (an overload run would otherwise fail before it starts).
        driver
            .warm_up(&mut workload, options.concurrency.min(WARM_UP_MAX))
            .await?;
        let rss_after_warm_up = settled_resident_mib(pid).await;
        let calls_before = test_upstream.as_ref().map(TestUpstream::calls);

        let workload = Arc::new(Mutex::new(workload));
        let memory_samples = Arc::new(Mutex::new(Vec::new()));
        let sampler = options.memory_every.zip(pid).map(|(every, pid)| {
            tokio::spawn(sample_memory(
                Duration::from_secs_f64(every),
                pid,
                Arc::clone(&driver.answered),
                Arc::clone(&memory_samples),
            ))
        });
        let (samples, elapsed) = driver.run(&workload, options).await;
        if let Some(sampler) = sampler {
            sampler.abort();
        }
        next_fresh = workload.lock().unwrap().next_fresh;
        let mut row = Row::new(ratio, &samples, elapsed);
        row.rss_after_warm_up_mib = rss_after_warm_up;
        row.rss_at_end_mib = settled_resident_mib(pid).await;
        row.memory_samples = std::mem::take(&mut *memory_samples.lock().unwrap());
        row.upstream_calls = test_upstream
            .as_ref()
            .zip(calls_before)
            .map(|(upstream, before)| upstream.calls() - before);
        rows.push(row);
    }

    let command = redacted_command_line();
    let endpoint = match &options.target {
        Some(target) => format!("{target} (running)"),
        None => format!(
            "{} (fresh per ratio, --durability relaxed)",
            semcache_binary()?.display()
        ),
    };
    let upstream = match &test_upstream {
        Some(_) => format!("in-process, {} ms per answer", options.upstream_delay_ms),
        None => upstream_url,
    };
    let limit = match (options.request_limit(), options.seconds) {
        (Some(requests), _) => format!("{requests} requests per ratio"),
        (None, Some(seconds)) => format!("{seconds} s per ratio"),
        (None, None) => unreachable!("request_limit() has a default"),
    };
    let load = match options.rate {
        Some(rate) => format!(
            "open loop at {rate} req/s, at most {} in flight, {limit}",
            options.concurrency
        ),
        None => format!("closed loop, {} connections, {limit}", options.concurrency),
    };
    Ok(Report {
        command,
        machine: machine(),
        endpoint,
        upstream,
        prompts: format!(
            "{} ({} distinct), seed {}",
            prompts.source,
            prompts.distinct.len(),
            options.seed
        ),
        load,
        rows,
    })
}

fn main() -> anyhow::Result<()> {
    // `cargo test --all-targets` runs this without `--bench`: a small smoke run then.
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let options = if benchmarking {
        Options::parse()
    } else {
        Options::smoke()
    };
    if options
        .filter
        .as_ref()
        .is_some_and(|filter| !"load".contains(filter.as_str()))
    {
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(run(&options))?;
    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print_markdown();
    }
    if !benchmarking {
        let ratio = |target: f64| {
            report
                .rows
                .iter()
                .find(|row| row.target_hit_ratio == target)
                .expect("the smoke run has this ratio")
        };
        for row in &report.rows {
            assert_eq!(row.errors, 0, "every request is answered: {row:?}");
        }
        assert!(ratio(0.95).achieved_hit_ratio >= 0.5, "{:?}", ratio(0.95));
        assert!(ratio(0.0).achieved_hit_ratio <= 0.5, "{:?}", ratio(0.0));
    }
    Ok(())
}

/// Most warm-up requests, sent at once before each ratio.
const WARM_UP_MAX: usize = 32;

/// The command line as typed, with the value of `--api-key` hidden: it is a secret, and the
/// command line is printed with every result.
fn redacted_command_line() -> String {
    let mut hide_next = false;
    std::env::args()
        .map(|arg| {
            if std::mem::take(&mut hide_next) {
                return "<hidden>".to_owned();
            }
            if arg == "--api-key" {
                hide_next = true;
            } else if arg.starts_with("--api-key=") {
                return "--api-key=<hidden>".to_owned();
            }
            arg
        })
        .collect::<Vec<_>>()
        .join(" ")
}
