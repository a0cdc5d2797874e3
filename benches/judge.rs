//! What a judge adds to a hit's latency, against a test judge that answers yes after a fixed
//! delay (as a small hosted model would, faster, to keep the run short). Through HTTP, in
//! alternating pairs so that both sides see the same machine:
//!
//! - a semantic hit without a judge against the same hit that the judge is asked about (a fresh
//!   entry, in a tenant of its own, every time, so that no verdict is reused): what the judge
//!   adds, set against one call straight to the test judge with the body semcache sent;
//! - the same hit asked again: served on the remembered verdict, without a call.
//!
//! `cargo bench --bench judge`; needs the model (`make model`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use parking_lot::Mutex;
use semcache::config::ServeArgs;
use semcache::embed::{self, Backend, ModelPaths};
use serde_json::{json, Value};

/// How long the test judge takes to answer.
const JUDGE_DELAY: Duration = Duration::from_millis(50);
/// Pairs measured, after a few to warm up.
const PAIRS: usize = 100;
const WARMUP: usize = 10;

const STORED: &str = "How do I reset my password?";
const PARAPHRASE: &str = "How can I reset my password?";

fn completion(content: &str, prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}
    })
}

fn request(prompt: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "You are a helpful support assistant."},
        {"role": "user", "content": prompt}]})
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// The test judge: yes to everything, after [`JUDGE_DELAY`]; keeps the last body it was sent.
async fn judge(State(last): State<Arc<Mutex<Option<Value>>>>, Json(body): Json<Value>) -> Json<Value> {
    *last.lock() = Some(body);
    tokio::time::sleep(JUDGE_DELAY).await;
    Json(completion("Yes", 120, 1))
}

async fn start_semcache(args: &[&str], embedder: Arc<dyn embed::Embedder>) -> SocketAddr {
    let args = ServeArgs::parse_from(args);
    let app = semcache::app(&args, embedder).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(semcache::run(app, listener, std::future::pending()));
    addr
}

fn main() {
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    let paths = ModelPaths {
        model_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/models/all-MiniLM-L6-v2").into(),
        onnxruntime: None,
    };
    let backend = <Backend as clap::ValueEnum>::value_variants()[0];
    let embedder = embed::load(backend, &paths).expect("the model: run `make model` first");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let base = std::env::temp_dir().join(format!("semcache-bench-judge-{}", std::process::id()));
    let last_body = Arc::new(Mutex::new(None));
    let (plain, judged, judge_addr) = runtime.block_on(async {
        let upstream = serve(Router::new().route(
            "/v1/chat/completions",
            post(|| async {
                Json(completion(
                    "Open Settings, then Security, then Reset password.",
                    20,
                    12,
                ))
            }),
        ))
        .await;
        let judge_addr = serve(
            Router::new()
                .route("/v1/chat/completions", post(judge))
                .with_state(Arc::clone(&last_body)),
        )
        .await;
        let upstream = format!("http://{upstream}/v1");
        let (plain_dir, judged_dir) = (base.join("plain"), base.join("judged"));
        let plain = start_semcache(
            &[
                "serve",
                "--upstream",
                &upstream,
                "--data-dir",
                plain_dir.to_str().unwrap(),
            ],
            Arc::clone(&embedder),
        )
        .await;
        let judge_url = format!("http://{judge_addr}/v1");
        let judged = start_semcache(
            &[
                "serve",
                "--upstream",
                &upstream,
                "--data-dir",
                judged_dir.to_str().unwrap(),
                "--judge-model",
                "gpt-4o-mini",
                "--judge-upstream",
                &judge_url,
                "--judge-api-key",
                "sk-bench-judge",
            ],
            Arc::clone(&embedder),
        )
        .await;
        (plain, judged, judge_addr)
    });

    let client = reqwest::Client::new();
    // POSTs `body` as tenant `key`; returns the x-semcache and x-semcache-judged headers.
    let post = |addr: SocketAddr, path: &str, key: &str, body: &Value| {
        runtime.block_on(async {
            let response = client
                .post(format!("http://{addr}{path}"))
                .bearer_auth(key)
                .json(body)
                .send()
                .await
                .unwrap();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            let headers = (header("x-semcache"), header("x-semcache-judged"));
            response.bytes().await.unwrap();
            headers
        })
    };
    let chat = "/v1/chat/completions";
    let (stored, paraphrase) = (request(STORED), request(PARAPHRASE));
    // Every pair asks in a tenant of its own, whose one entry was stored first: the judge has
    // never ruled on it.
    let tenants: Vec<String> = (0..WARMUP + PAIRS)
        .map(|n| format!("sk-bench-tenant-{n}"))
        .collect();
    for key in &tenants {
        for addr in [plain, judged] {
            assert_eq!(post(addr, chat, key, &stored).0.as_deref(), Some("miss"));
        }
    }

    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64() * 1000.0
    };
    let (mut without, mut with, mut direct, mut remembered) = (vec![], vec![], vec![], vec![]);
    for (n, key) in tenants.iter().enumerate() {
        let mut plain_hit = || {
            let headers = post(plain, chat, key, &paraphrase);
            assert_eq!(headers, (Some("hit".to_owned()), None));
        };
        let mut judged_hit = || {
            let headers = post(judged, chat, key, &paraphrase);
            assert_eq!(headers, (Some("hit".to_owned()), Some("yes".to_owned())));
        };
        // Each goes first in every other pair, so neither always runs on a warmer machine.
        let (a, b) = if n % 2 == 0 {
            (time(&mut plain_hit), time(&mut judged_hit))
        } else {
            let b = time(&mut judged_hit);
            (time(&mut plain_hit), b)
        };
        let body = last_body.lock().clone().expect("the judge was asked");
        let c = time(&mut || {
            post(judge_addr, chat, "sk-bench-judge", &body);
        });
        // The same request again: the verdict is remembered.
        let d = time(&mut judged_hit);
        if n >= WARMUP {
            without.push(a);
            with.push(b);
            direct.push(c);
            remembered.push(d);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (without, with) = (median(&mut without), median(&mut with));
    let (direct, remembered) = (median(&mut direct), median(&mut remembered));
    println!(
        "judge/http: medians of {PAIRS} alternating pairs, test judge answering after {} ms",
        JUDGE_DELAY.as_millis()
    );
    println!("  semantic hit, no judge:            {without:8.3} ms");
    println!("  semantic hit, judge asked:         {with:8.3} ms");
    println!("  the judge's call, straight to it:  {direct:8.3} ms");
    println!("  semantic hit, verdict remembered:  {remembered:8.3} ms");
    println!(
        "ratio judge/http/judged_hit over semantic_hit: {:.2} x; added {:.3} ms, of which {:.3} ms beyond the judge's own call",
        with / without,
        with - without,
        with - without - direct
    );
    println!(
        "ratio judge/http/remembered_verdict over semantic_hit: {:.2} x",
        remembered / without
    );
    let _ = std::fs::remove_dir_all(&base);
}
