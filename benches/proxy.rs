//! Latency of one embedding, an exact hit and a semantic hit through HTTP, and of a bare axum
//! handler returning the same bytes, all measured in one run so they can be compared as ratios.
//!
//! `make bench` (or `cargo bench --bench proxy`); needs the model (`make model`).

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use criterion::{criterion_group, criterion_main, Criterion};
use semcache::config::ServeArgs;
use semcache::embed::{BertEmbedder, Embedder};
use serde_json::{json, Value};

fn completion() -> Value {
    json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Open Settings, then Security, then Reset password."},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32}
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

fn benches(c: &mut Criterion) {
    let embedder: Arc<dyn Embedder> = Arc::new(
        BertEmbedder::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/all-MiniLM-L6-v2"
        )))
        .expect("the model: run `make model` first"),
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();

    c.bench_function("embed/one_short_prompt", |b| {
        b.iter(|| {
            embedder
                .embed(black_box(&["How can I reset my password?"]))
                .unwrap()
        })
    });

    let (semcache, bare) = runtime.block_on(async {
        let upstream =
            serve(Router::new().route("/v1/chat/completions", post(|| async { Json(completion()) }))).await;
        let bare =
            serve(Router::new().route("/v1/chat/completions", post(|| async { Json(completion()) }))).await;
        let data_dir = std::env::temp_dir().join(format!("semcache-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        let args = ServeArgs::parse_from([
            "serve",
            "--upstream",
            &format!("http://{upstream}/v1"),
            "--data-dir",
            data_dir.to_str().unwrap(),
        ]);
        let app = semcache::app(&args, Arc::clone(&embedder)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let semcache = listener.local_addr().unwrap();
        tokio::spawn(semcache::run(app, listener, std::future::pending()));
        (semcache, bare)
    });
    let client = reqwest::Client::new();
    let post = |addr: SocketAddr, body: &Value| {
        let response = runtime.block_on(async {
            client
                .post(format!("http://{addr}/v1/chat/completions"))
                .bearer_auth("sk-bench")
                .json(body)
                .send()
                .await
                .unwrap()
        });
        let cache = response
            .headers()
            .get("x-semcache")
            .map(|v| v.to_str().unwrap().to_owned());
        runtime.block_on(response.bytes()).unwrap();
        cache
    };

    let stored = request("How do I reset my password?");
    let paraphrase = request("How can I reset my password?");
    assert_eq!(post(semcache, &stored).as_deref(), Some("miss"));
    assert_eq!(post(semcache, &stored).as_deref(), Some("hit"));
    assert_eq!(post(semcache, &paraphrase).as_deref(), Some("hit"));

    c.bench_function("http/bare_axum_same_bytes", |b| b.iter(|| post(bare, &stored)));
    c.bench_function("http/exact_hit", |b| b.iter(|| post(semcache, &stored)));
    c.bench_function("http/semantic_hit", |b| b.iter(|| post(semcache, &paraphrase)));
}

criterion_group!(benches_group, benches);
criterion_main!(benches_group);
