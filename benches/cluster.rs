//! Several nodes on one Redis, against one embedded node, in one run:
//!
//! 1. replication lag: entries stored on node A at 200 a second, until each is in node B's
//!    replica (its index included, so that B can serve it by meaning), p50 and p99;
//! 2. exact and semantic hits over HTTP on a Redis-backed node and on an embedded one (real
//!    model), with one Redis round trip (`PING`) measured alongside;
//! 3. start-up and resident memory per entry of a new node against a Redis holding N entries,
//!    and of an embedded node opening a data directory of N entries, each in a process of its
//!    own.
//!
//! `cargo bench --bench cluster` (N = 100,000; `-- --entries N` for another size); needs
//! `redis-server` (`tests/redis/setup`) and the model (`make model`). Redis runs on a free port
//! in a temporary directory, with its append-only file on `everysec`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use rand::{rngs::StdRng, Rng, SeedableRng};
use semcache::cache::{Answer, Digest32, Fingerprint, RequestKey, TenantId, Usage};
use semcache::config::ServeArgs;
use semcache::embed::{self, Embedder, ModelPaths};
use semcache::store::redis::{RedisConfig, RedisStore};
use semcache::store::{EntryStore, Op, Record, Store};
use serde_json::{json, Value};

const DIMENSIONS: usize = 384;

#[derive(Parser)]
struct Args {
    /// Entries for the start-up and memory figures.
    #[arg(long)]
    entries: Option<usize>,
    /// Seconds of stores at 200 a second for the lag figures.
    #[arg(long)]
    lag_secs: Option<u64>,
    /// Internal: measure one node's start-up in this process (`redis URL` or `embedded DIR`).
    #[arg(long, num_args = 2)]
    child: Option<Vec<String>>,
    #[arg(long, hide = true)]
    bench: bool,
}

/// A `redis-server` of the bench's own, removed at the end.
struct Redis {
    port: u16,
    dir: PathBuf,
    child: Child,
}

impl Redis {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("semcache-cluster-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--dir"])
            .arg(&dir)
            .args(["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server: run tests/redis/setup");
        let redis = Self { port, dir, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Start-up needs no real model: nothing is embedded while loading.
struct NoModel;

impl Embedder for NoModel {
    fn model_id(&self) -> embed::EmbedderId {
        embed::EmbedderId {
            model: "none".into(),
            backend: "bench".into(),
            dimensions: DIMENSIONS,
            weights: "0".into(),
        }
    }
    fn seen_len(&self, _: &str) -> Option<usize> {
        None
    }
    fn dimensions(&self) -> usize {
        DIMENSIONS
    }
    fn embed(&self, _texts: &[&str]) -> Result<Vec<Vec<f32>>, embed::Error> {
        Err(embed::Error::Task("not used here".into()))
    }
}

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmRSS:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn unit_vector(rng: &mut StdRng) -> Vec<f32> {
    let mut v: Vec<f32> = (0..DIMENSIONS).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

fn completion() -> Value {
    json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "lorem ipsum ".repeat(70)},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 200, "total_tokens": 220}
    })
}

/// Entry `i` of the start-up and memory figures: spread over 8 contexts, 1 KiB answers.
fn record(i: usize, rng: &mut StdRng) -> Record {
    let tenant = TenantId::from_api_key("sk-bench");
    let fingerprint = Fingerprint(Digest32::of("bench", &[&(i as u64 % 8).to_le_bytes()]));
    let key = RequestKey::new(tenant, fingerprint, format!("benchmark prompt number {i}"));
    Record {
        id: i as u64 + 1,
        tenant: key.tenant.0 .0,
        fingerprint: key.fingerprint.0 .0,
        prompt: key.prompt,
        embedding: Some(unit_vector(rng)),
        completion: completion().to_string().into_bytes(),
        model: "gpt-4o-mini".into(),
        prompt_tokens: 20,
        completion_tokens: 200,
        upstream_latency_us: 1_200_000,
        created_ms: 1_790_000_000_000,
        expires_ms: None,
        hits: 0,
        last_hit_ms: 0,
        own_threshold: 0.0,
        wrong_reports: 0,
        context: None,
        verdicts: Default::default(),
    }
}

fn serve_args(extra: &[&str]) -> ServeArgs {
    let mut args = vec![
        "serve",
        "--upstream",
        "http://127.0.0.1:9/v1",
        "--max-entries",
        "0",
    ];
    args.extend_from_slice(extra);
    ServeArgs::parse_from(args)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

/// Part 1: stores on A at 200 a second; the time until each is in B's replica.
async fn lag(redis: &Redis, seconds: u64) {
    let namespace = format!("lag{}", std::process::id());
    let nodes: Vec<_> = (0..2)
        .map(|_| {
            let data_dir = std::env::temp_dir().join(format!(
                "semcache-lag-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            let args = serve_args(&[
                "--store",
                &redis.url(),
                "--namespace",
                &namespace,
                "--data-dir",
                data_dir.to_str().unwrap(),
            ]);
            semcache::app(&args, Arc::new(NoModel)).unwrap()
        })
        .collect();
    for node in &nodes {
        while !node.cache.shared().unwrap().is_available() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let (a, b) = (Arc::clone(&nodes[0].cache), Arc::clone(&nodes[1].cache));
    let mut rng = StdRng::seed_from_u64(11);
    let mut pending: Vec<(u64, Instant)> = Vec::new();
    let mut lags = Vec::new();
    let total = seconds as usize * 200;
    let started = Instant::now();
    let mut stored = 0;
    while stored < total || !pending.is_empty() {
        let due = started + Duration::from_micros(5_000 * stored as u64);
        if stored < total && Instant::now() >= due {
            let key = RequestKey::new(
                TenantId::from_api_key("sk-lag"),
                Fingerprint(Digest32::of("lag", &[b"ctx"])),
                format!("lag prompt {stored}"),
            );
            let answer = Answer {
                completion: bytes::Bytes::from(completion().to_string()),
                model: "gpt-4o-mini".into(),
                usage: Usage {
                    prompt_tokens: 20,
                    completion_tokens: 200,
                },
                upstream_latency: Duration::from_secs(1),
            };
            let entry = a.insert(&key, Some(unit_vector(&mut rng)), answer, None).await;
            pending.push((entry.id, Instant::now()));
            stored += 1;
        }
        pending.retain(|(id, at)| {
            if b.get(*id).is_some() {
                lags.push(at.elapsed().as_secs_f64() * 1e3);
                false
            } else {
                true
            }
        });
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let lags = sorted(lags);
    println!(
        "replication lag, store on A to B's replica, {total} entries at 200/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&lags, 0.5),
        percentile(&lags, 0.99),
        lags[lags.len() - 1]
    );
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// Part 2: hits on a Redis-backed node and on an embedded one, alternately, with the real model.
async fn hits(redis: &Redis, rounds: usize) {
    let paths = ModelPaths {
        model_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/models/all-MiniLM-L6-v2").into(),
        onnxruntime: None,
    };
    let embedder = embed::load(embed::Backend::DEFAULT, &paths).expect("the model: run `make model` first");
    let upstream =
        serve(Router::new().route("/v1/chat/completions", post(|| async { Json(completion()) }))).await;
    let upstream = format!("http://{upstream}/v1");
    let dir = |name: &str| std::env::temp_dir().join(format!("semcache-hits-{name}-{}", std::process::id()));
    let namespace = format!("hits{}", std::process::id());
    let mut nodes = Vec::new();
    for (name, store) in [("embedded", None), ("redis", Some(redis.url()))] {
        let data_dir = dir(name);
        let _ = std::fs::remove_dir_all(&data_dir);
        let mut args = vec![
            "serve",
            "--upstream",
            &upstream,
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--namespace",
            &namespace,
        ];
        if let Some(store) = &store {
            args.extend(["--store", store.as_str()]);
        }
        let app = semcache::app(&ServeArgs::parse_from(args), Arc::clone(&embedder)).unwrap();
        if let Some(shared) = app.cache.shared() {
            while !shared.is_available() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        nodes.push((name, listener.local_addr().unwrap(), data_dir));
        tokio::spawn(semcache::run(app, listener, std::future::pending()));
    }
    let client = reqwest::Client::new();
    let ask = |addr: SocketAddr, prompt: &str| {
        let body = json!({"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": "You are a helpful support assistant."},
            {"role": "user", "content": prompt}]});
        let request = client
            .post(format!("http://{addr}/v1/chat/completions"))
            .bearer_auth("sk-bench")
            .json(&body);
        async move {
            let started = Instant::now();
            let response = request.send().await.unwrap();
            let cache = response
                .headers()
                .get("x-semcache")
                .map(|v| v.to_str().unwrap().to_owned());
            response.bytes().await.unwrap();
            (started.elapsed().as_secs_f64() * 1e3, cache)
        }
    };
    for (_, addr, _) in &nodes {
        assert_eq!(
            ask(*addr, "How do I reset my password?").await.1.as_deref(),
            Some("miss")
        );
        assert_eq!(
            ask(*addr, "How can I reset my password?").await.1.as_deref(),
            Some("hit")
        );
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let mut round_trips = Vec::new();
    let redis_client = redis::Client::open(redis.url()).unwrap();
    let mut conn = redis_client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..rounds {
        for (i, (_, addr, _)) in nodes.iter().enumerate() {
            let (exact, hit) = ask(*addr, "How do I reset my password?").await;
            assert_eq!(hit.as_deref(), Some("hit"));
            times[i * 2].push(exact);
            let (semantic, hit) = ask(*addr, "How can I reset my password?").await;
            assert_eq!(hit.as_deref(), Some("hit"));
            times[i * 2 + 1].push(semantic);
        }
        let started = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
        round_trips.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let median = |values: &[f64]| percentile(&sorted(values.to_vec()), 0.5);
    let [exact_embedded, semantic_embedded, exact_redis, semantic_redis] =
        [0, 1, 2, 3].map(|i| median(&times[i]));
    let round_trip = median(&round_trips);
    println!("hits over HTTP, medians of {rounds} (same run): one Redis round trip {round_trip:.3} ms");
    println!("| hit | embedded node | Redis-backed node | ratio | Redis-backed / (1.15 × embedded + one round trip) |");
    println!("|---|---|---|---|---|");
    for (name, embedded, shared) in [
        ("exact", exact_embedded, exact_redis),
        ("semantic", semantic_embedded, semantic_redis),
    ] {
        println!(
            "| {name} | {embedded:.3} ms | {shared:.3} ms | {:.2}× | {:.2} |",
            shared / embedded,
            shared / (1.15 * embedded + round_trip)
        );
    }
    for (_, _, data_dir) in nodes {
        let _ = std::fs::remove_dir_all(data_dir);
    }
}

/// Part 3, in a child process: one node starting against N entries; prints `seconds KiB`.
fn child(kind: &str, target: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let before = resident_kib();
    let started = Instant::now();
    let data_dir = std::env::temp_dir().join(format!("semcache-startup-{}", std::process::id()));
    let args = match kind {
        "redis" => serve_args(&[
            "--store",
            target,
            "--namespace",
            "startup",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ]),
        _ => serve_args(&["--data-dir", target]),
    };
    let app = runtime.block_on(async {
        let app = semcache::app(&args, Arc::new(NoModel)).unwrap();
        if let Some(shared) = app.cache.shared() {
            while !shared.is_available() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        app
    });
    let elapsed = started.elapsed();
    app.cache.maintain();
    let after = resident_kib();
    println!(
        "{} {} {}",
        elapsed.as_secs_f64(),
        after.saturating_sub(before),
        app.cache.len()
    );
}

fn measure_child(kind: &str, target: &str) -> (f64, f64, usize) {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--child", kind, target])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let mut fields = text.split_whitespace().map(str::to_owned);
    let mut next = || {
        fields
            .next()
            .unwrap_or_else(|| panic!("the {kind} child printed {text:?}"))
    };
    (
        next().parse().unwrap(),
        next().parse().unwrap(),
        next().parse().unwrap(),
    )
}

async fn fill_redis(redis: &Redis, entries: usize) {
    let store = RedisStore::new(RedisConfig {
        url: redis.url(),
        namespace: "startup".into(),
        max_entries: 0,
        eviction: semcache::cache::Eviction::Lfu,
        strict: false,
        lease: Duration::from_secs(30),
    })
    .unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    for start in (0..entries).step_by(200) {
        let puts =
            (start..(start + 200).min(entries)).map(|i| store.write(Op::Put(Box::new(record(i, &mut rng)))));
        for result in futures::future::join_all(puts.collect::<Vec<_>>()).await {
            result.unwrap();
        }
    }
    // The namespace's embedder is the one the child nodes run.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let id = NoModel.model_id();
    let _: () = redis::cmd("HSET")
        .arg("startup:meta")
        .arg(&[
            "format_version",
            &semcache::store::FORMAT_VERSION.to_string(),
            "model",
            &id.model,
            "backend",
            &id.backend,
        ])
        .arg(&["dimensions", &id.dimensions.to_string(), "weights", &id.weights])
        .query_async(&mut conn)
        .await
        .unwrap();
}

fn fill_embedded(dir: &Path, entries: usize) {
    let store = Store::open(dir).unwrap();
    store.check_embedder(&NoModel.model_id()).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    for start in (0..entries).step_by(1000) {
        let ops: Vec<Op> = (start..(start + 1000).min(entries))
            .map(|i| Op::Put(Box::new(record(i, &mut rng))))
            .collect();
        store.apply(&ops).unwrap();
    }
}

fn main() {
    let args = Args::parse();
    if let Some(child_args) = &args.child {
        return child(&child_args[0], &child_args[1]);
    }
    // `cargo test --all-targets` runs this without `--bench`: a small smoke run then.
    let (entries, lag_secs, rounds) = if args.bench {
        (args.entries.unwrap_or(100_000), args.lag_secs.unwrap_or(10), 300)
    } else {
        (args.entries.unwrap_or(500), args.lag_secs.unwrap_or(1), 10)
    };
    let redis = Redis::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(lag(&redis, lag_secs));
    runtime.block_on(hits(&redis, rounds));

    runtime.block_on(fill_redis(&redis, entries));
    let dir = std::env::temp_dir().join(format!("semcache-startup-embedded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    fill_embedded(&dir, entries);
    let (embedded_secs, embedded_kib, embedded_len) = measure_child("embedded", dir.to_str().unwrap());
    let (redis_secs, redis_kib, redis_len) = measure_child("redis", &redis.url());
    assert_eq!((embedded_len, redis_len), (entries, entries));
    println!("| {entries} entries, new node | start-up until serving from the cache | RSS per entry (1 KiB answers, graphs built) |");
    println!("|---|---|---|");
    println!(
        "| embedded (redb) | {embedded_secs:.2} s | {:.0} B |",
        embedded_kib * 1024.0 / entries as f64
    );
    println!(
        "| Redis-backed | {redis_secs:.2} s | {:.0} B |",
        redis_kib * 1024.0 / entries as f64
    );
    println!(
        "ratios, Redis-backed / embedded: start-up {:.2}×, memory per entry {:.2}×",
        redis_secs / embedded_secs,
        redis_kib / embedded_kib
    );
    let _ = std::fs::remove_dir_all(&dir);
}
