//! For each embedding backend built in (onnx int8, onnx f32, candle): latency of one
//! embedding, batches of 8 and 32 (per prompt), 32 concurrent clients through the dynamic
//! batcher against the same 32 prompts one at a time; then, through HTTP on each backend, an
//! exact and a semantic hit against a bare axum handler returning the same bytes, and a miss
//! against the same request sent straight to the test model (20 ms), and an embeddings batch of
//! 32 with half its texts cached against the same batch sent straight to the test model: all in
//! one run, so they can be compared as ratios.
//!
//! `make bench` (or `cargo bench --bench proxy`; `-- onnx` or `-- candle` for one backend's
//! figures); needs the model (`make model`).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use semcache::config::ServeArgs;
use semcache::embed::{self, Backend, Batcher, Embedder, ModelPaths};

/// 32 distinct short prompts, as support-bot users type them.
const PROMPTS: [&str; 32] = [
    "How can I reset my password?",
    "Where is my order?",
    "Can I change my delivery address?",
    "How do I cancel my subscription?",
    "What are your opening hours on Sunday?",
    "Why was my card declined?",
    "How long does a refund take?",
    "Do you ship to Canada?",
    "How do I update my billing details?",
    "Is there a student discount?",
    "My package arrived damaged, what should I do?",
    "How do I contact customer support?",
    "Can I pay with PayPal?",
    "What is your return policy?",
    "How do I track my parcel?",
    "Can I order without an account?",
    "How do I enable two-factor authentication?",
    "Why can't I log in to the app?",
    "Where can I find my invoice?",
    "How do I delete my account?",
    "Do you offer gift cards?",
    "What sizes does this jacket come in?",
    "Is this product in stock?",
    "How do I apply a promo code?",
    "Can I change my order after placing it?",
    "What payment methods do you accept?",
    "How do I unsubscribe from emails?",
    "Is my personal data safe with you?",
    "How much is express shipping?",
    "Can I pick up my order in store?",
    "How do I report a bug in the app?",
    "When will the item be back in stock?",
];
use serde_json::{json, Value};

/// The one-prompt embedding, and the paraphrase a semantic hit asks: the same text, so that the
/// hit can be set against the embedding it costs.
const SHORT_PROMPT: &str = PROMPTS[0];

/// How long the test model takes to answer a miss.
const UPSTREAM_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

fn completion() -> Value {
    json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Open Settings, then Security, then Reset password."},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32}
    })
}

/// The upstream's embeddings of a request's input: 1,536 floats a text, as the small OpenAI
/// model's.
fn embeddings_list(body: &Value) -> Value {
    let texts = body["input"].as_array().map_or(1, Vec::len);
    let data: Vec<Value> = (0..texts)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": vec![0.012_345_678_f32; 1536]}))
        .collect();
    json!({"object": "list", "data": data, "model": "text-embedding-3-small",
           "usage": {"prompt_tokens": 8 * texts, "total_tokens": 8 * texts}})
}

fn request(prompt: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "You are a helpful support assistant."},
        {"role": "user", "content": prompt}]})
}

/// A support chat about a streaming plan: `filler` rounds of small talk and settled questions,
/// then the plan, then `last`. `reworded` says the same in other words.
fn conversation(filler: usize, reworded: bool, last: &str) -> Value {
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful support assistant."})];
    let mut turn = |role: &str, content: String| messages.push(json!({"role": role, "content": content}));
    for n in 0..filler {
        turn(
            "user",
            format!("Quick one first: does invoice {n} include tax? Thanks."),
        );
        turn(
            "assistant",
            format!("Yes, invoice {n} includes VAT. Anything else?"),
        );
    }
    if reworded {
        turn(
            "user",
            "Hello, I'd like to stop paying for my Netflix Premium subscription.".into(),
        );
        turn(
            "assistant",
            "Sure, I can help with the Netflix Premium subscription. What should I do?".into(),
        );
    } else {
        turn(
            "user",
            "Hi, I want to stop paying for my Netflix Premium subscription.".into(),
        );
        turn(
            "assistant",
            "I can help with your Netflix Premium subscription. What would you like to do?".into(),
        );
    }
    turn("user", last.into());
    json!({"model": "gpt-4o-mini", "messages": messages})
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

fn benches(c: &mut Criterion) {
    let paths = ModelPaths {
        model_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/models/all-MiniLM-L6-v2").into(),
        onnxruntime: None,
    };
    for backend in <Backend as clap::ValueEnum>::value_variants() {
        let embedder = embed::load(*backend, &paths).expect("the model: run `make model` first");
        let name = clap::ValueEnum::to_possible_value(backend)
            .unwrap()
            .get_name()
            .to_owned();
        bench_backend(c, &name, embedder);
    }
}

fn bench_backend(c: &mut Criterion, name: &str, embedder: Arc<dyn Embedder>) {
    let runtime = tokio::runtime::Runtime::new().unwrap();

    c.bench_function(&format!("{name}/embed/one_short_prompt"), |b| {
        b.iter(|| embedder.embed(black_box(&[SHORT_PROMPT])).unwrap())
    });

    let mut batches = c.benchmark_group(format!("{name}/embed/batch"));
    for size in [8, 32] {
        batches.throughput(Throughput::Elements(size as u64));
        batches.bench_function(format!("{size}"), |b| {
            b.iter(|| embedder.embed(black_box(&PROMPTS[..size])).unwrap())
        });
    }
    batches.finish();

    // The same 32 prompts from 32 concurrent clients, through the service's batcher, against
    // the same prompts one after another (each alone in its forward pass).
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    let batcher = runtime.block_on(async { Batcher::new(Arc::clone(&embedder), workers) });
    // The short prompt above through the batcher, as a lone request's embedding runs: the
    // difference is the hand-over to a worker thread and back.
    c.bench_function(&format!("{name}/embed/one_short_prompt_batcher"), |b| {
        b.iter(|| runtime.block_on(batcher.embed(black_box(SHORT_PROMPT))).unwrap())
    });
    let mut clients = c.benchmark_group(format!("{name}/embed/clients"));
    clients.throughput(Throughput::Elements(PROMPTS.len() as u64));
    clients.bench_function("32_one_at_a_time", |b| {
        b.iter(|| {
            runtime.block_on(async {
                for prompt in PROMPTS {
                    batcher.embed(prompt).await.unwrap();
                }
            })
        })
    });
    clients.bench_function("32_concurrent_batched", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let clients = PROMPTS.iter().map(|prompt| {
                    let batcher = batcher.clone();
                    tokio::spawn(async move { batcher.embed(prompt).await.unwrap() })
                });
                futures::future::join_all(clients).await
            })
        })
    });
    clients.finish();

    let data_dir = std::env::temp_dir().join(format!("semcache-bench-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let (semcache, bare, upstream) = runtime.block_on(async {
        // The model answers after a fixed delay, as a real one would (faster, to keep the run short).
        let upstream = serve(
            Router::new()
                .route(
                    "/v1/chat/completions",
                    post(|| async {
                        tokio::time::sleep(UPSTREAM_DELAY).await;
                        Json(completion())
                    }),
                )
                .route(
                    "/v1/embeddings",
                    post(|Json(body): Json<Value>| async move {
                        tokio::time::sleep(UPSTREAM_DELAY).await;
                        Json(embeddings_list(&body))
                    }),
                ),
        )
        .await;
        let bare =
            serve(Router::new().route("/v1/chat/completions", post(|| async { Json(completion()) }))).await;
        let args = ServeArgs::parse_from([
            "serve",
            "--upstream",
            &format!("http://{upstream}/v1"),
            "--data-dir",
            data_dir.to_str().unwrap(),
            // A first message has the same key in both modes: only the conversation rows differ.
            "--context",
            "semantic",
        ]);
        let app = semcache::app(&args, Arc::clone(&embedder)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let semcache = listener.local_addr().unwrap();
        tokio::spawn(semcache::run(app, listener, std::future::pending()));
        (semcache, bare, upstream)
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
    let paraphrase = request(SHORT_PROMPT);
    assert_eq!(post(semcache, &stored).as_deref(), Some("miss"));
    assert_eq!(post(semcache, &stored).as_deref(), Some("hit"));
    assert_eq!(post(semcache, &paraphrase).as_deref(), Some("hit"));

    c.bench_function(&format!("{name}/http/bare_axum_same_bytes"), |b| {
        b.iter(|| post(bare, &stored))
    });
    c.bench_function(&format!("{name}/http/exact_hit"), |b| {
        b.iter(|| post(semcache, &stored))
    });
    c.bench_function(&format!("{name}/http/semantic_hit"), |b| {
        b.iter(|| post(semcache, &paraphrase))
    });
    // The same conversation reworded (`--context semantic`): the request and what it refers back
    // to are embedded, and the matcher reads every user turn. With 38 earlier messages the
    // matcher reads the newest 4 KiB of user text and the embedding the antecedent and request.
    paired(
        &format!("{name}/http/semantic_hit over {name}/embed/one_short_prompt"),
        || drop(black_box(embedder.embed(&[SHORT_PROMPT]).unwrap())),
        || drop(post(semcache, &paraphrase)),
    );
    for (case, filler, last) in [
        ("conversation_hit", 1, "Please cancel it."),
        (
            "conversation_hit_40_messages",
            18,
            "Could you pause it for a month?",
        ),
    ] {
        let stored = conversation(filler, false, last);
        let reworded = conversation(filler, true, last);
        assert_eq!(post(semcache, &stored).as_deref(), Some("miss"));
        assert_eq!(post(semcache, &reworded).as_deref(), Some("hit"), "{case}");
        c.bench_function(&format!("{name}/http/{case}"), |b| {
            b.iter(|| post(semcache, &reworded))
        });
        paired(
            &format!("{name}/http/{case} over {name}/http/semantic_hit"),
            || drop(post(semcache, &paraphrase)),
            || drop(post(semcache, &reworded)),
        );
    }

    // A miss: a prompt never asked before goes through the exact map, the model, the index and
    // the verifier (each order number contrasts with the others'), then to the model, and is
    // stored (fsynced, the default durability). Against the same request sent to the model
    // directly.
    let mut order = 1_000_000;
    let mut fresh = || {
        order += 1;
        request(&format!("What is the status of order {order}?"))
    };
    let mut misses = c.benchmark_group(format!("{name}/http/miss"));
    misses.sample_size(30);
    misses.bench_function("upstream_direct", |b| b.iter(|| post(upstream, &fresh())));
    misses.bench_function("through_semcache", |b| {
        b.iter(|| assert_eq!(post(semcache, &fresh()).as_deref(), Some("miss")))
    });
    // The first request of a conversation: its context holds no entries, so the prompt is
    // embedded while the model answers rather than before.
    let mut conversation = 0;
    let mut new_context = || {
        conversation += 1;
        json!({"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": format!("You are support assistant number {conversation}.")},
            {"role": "user", "content": "What is the status of my order?"}]})
    };
    misses.bench_function("through_semcache_new_context", |b| {
        b.iter(|| assert_eq!(post(semcache, &new_context()).as_deref(), Some("miss")))
    });
    misses.finish();

    // Embeddings: a batch of 32 texts, half of them cached (the upstream embeds the other 16),
    // against the same batch sent straight to the upstream.
    let post_embeddings = |addr: SocketAddr, body: &Value| {
        runtime.block_on(async {
            let response = client
                .post(format!("http://{addr}/v1/embeddings"))
                .bearer_auth("sk-bench")
                .json(body)
                .send()
                .await
                .unwrap();
            let cached = response
                .headers()
                .get("x-semcache-cached-items")
                .map(|v| v.to_str().unwrap().to_owned());
            response.bytes().await.unwrap();
            cached
        })
    };
    let mut round = 0;
    let mut half_cached = || {
        round += 1;
        let texts: Vec<String> = (0..32)
            .map(|i| {
                if i % 2 == 0 {
                    format!("A cached support article, part {i}.")
                } else {
                    format!("A new support article {round}, part {i}.")
                }
            })
            .collect();
        json!({"model": "text-embedding-3-small", "input": texts})
    };
    post_embeddings(semcache, &half_cached());
    let mut batches = c.benchmark_group(format!("{name}/http/embeddings_batch_32"));
    batches.sample_size(30);
    batches.bench_function("upstream_direct", |b| {
        b.iter(|| post_embeddings(upstream, &half_cached()))
    });
    batches.bench_function("half_cached", |b| {
        b.iter(|| assert_eq!(post_embeddings(semcache, &half_cached()).as_deref(), Some("16")))
    });
    batches.finish();
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// Prints how long `then` takes against `first`, timed in alternation: on a shared machine the
/// speed drifts from minute to minute, and rows that criterion measures one after another can
/// each catch a different spell. The medians of 200 alternating pairs, after 20 unmeasured.
fn paired(label: &str, mut first: impl FnMut(), mut then: impl FnMut()) {
    const PAIRS: usize = 200;
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64() * 1000.0
    };
    let (mut a, mut b) = (Vec::with_capacity(PAIRS), Vec::with_capacity(PAIRS));
    for n in 0..PAIRS + 20 {
        // Each goes first in every other pair, so neither always runs on a warmer machine.
        let (x, y) = if n % 2 == 0 {
            (time(&mut first), time(&mut then))
        } else {
            let y = time(&mut then);
            (time(&mut first), y)
        };
        if n >= 20 {
            a.push(x);
            b.push(y);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut a), median(&mut b));
    println!(
        "ratio {label}: {:.2} x ({b:.3} ms against {a:.3} ms, medians of {PAIRS} alternating pairs)",
        b / a
    );
}

criterion_group!(benches_group, benches);
criterion_main!(benches_group);
