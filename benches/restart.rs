//! Restart cost of the durable store: fills a store with N entries, then measures, in this
//! process, how long opening it takes until the service answers, how long until every HNSW
//! graph is built, the bytes on disk per entry and the resident memory per entry.
//!
//! `cargo bench --bench restart` (N = 10,000 and 100,000), or `-- 2000` for other sizes.
//! Vectors are random unit vectors (the index cost does not depend on where they come from);
//! answers are 1 KiB of JSON; entries are spread over 8 contexts, so partitions are large.

use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use rand::{rngs::StdRng, Rng, SeedableRng};
use semcache::cache::{Digest32, Fingerprint, RequestKey, TenantId};
use semcache::config::ServeArgs;
use semcache::embed::{self, Embedder};
use semcache::store::{Op, Record, Store};

const DIMENSIONS: usize = 384;
const CONTEXTS: u64 = 8;

/// Restart needs no real model: nothing is embedded while loading.
struct NoModel;

impl Embedder for NoModel {
    fn model_id(&self) -> semcache::embed::EmbedderId {
        semcache::embed::EmbedderId {
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
        Err(embed::Error::Task("not used while restarting".into()))
    }
}

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

fn fill(store: &Store, n: usize, rng: &mut StdRng) {
    let completion = format!(
        r#"{{"id":"chatcmpl-x","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":20,"completion_tokens":200,"total_tokens":220}}}}"#,
        "lorem ipsum ".repeat(70)
    );
    let tenant = TenantId::from_api_key("sk-bench");
    let batch = 1000;
    for start in (0..n).step_by(batch) {
        let ops: Vec<Op> = (start..(start + batch).min(n))
            .map(|i| {
                let mut v: Vec<f32> = (0..DIMENSIONS).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter_mut().for_each(|x| *x /= norm);
                let fingerprint = Fingerprint(Digest32::of("bench", &[&(i as u64 % CONTEXTS).to_le_bytes()]));
                let key = RequestKey::new(tenant, fingerprint, format!("benchmark prompt number {i}"));
                Op::Put(Box::new(Record {
                    id: i as u64 + 1,
                    tenant: key.tenant.0 .0,
                    fingerprint: key.fingerprint.0 .0,
                    prompt: key.prompt,
                    embedding: Some(v),
                    completion: completion.as_bytes().to_vec(),
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
                }))
            })
            .collect();
        store.apply(&ops).unwrap();
    }
}

fn measure(n: usize) {
    let dir = std::env::temp_dir().join(format!("semcache-restart-bench-{n}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut rng = StdRng::seed_from_u64(7);
    {
        let store = Store::open(&dir).unwrap();
        fill(&store, n, &mut rng);
    }
    let disk_bytes = std::fs::metadata(dir.join("semcache.redb")).unwrap().len();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let before_kib = resident_kib();
    let started = Instant::now();
    let args = ServeArgs::parse_from([
        "serve",
        "--data-dir",
        dir.to_str().unwrap(),
        "--max-entries",
        "0",
        "--upstream",
        "http://127.0.0.1:9/v1",
    ]);
    let app = runtime.block_on(async { semcache::app(&args, Arc::new(NoModel)).unwrap() });
    let answering = started.elapsed();
    let loaded_kib = resident_kib();
    let cache = Arc::clone(&app.cache);
    let graphs_started = Instant::now();
    cache.maintain();
    let graphs = graphs_started.elapsed();
    let indexed_kib = resident_kib();
    assert_eq!(cache.len(), n);
    assert_eq!(cache.indexed(), n);
    let completion_bytes = 1000.0;

    println!(
        "| {n} | {:.2} s | {:.1} s | {:.0} B | {:.0} B | {:.0} B |",
        answering.as_secs_f64(),
        graphs.as_secs_f64(),
        disk_bytes as f64 / n as f64,
        (loaded_kib - before_kib) as f64 * 1024.0 / n as f64,
        (indexed_kib - before_kib) as f64 * 1024.0 / n as f64 - completion_bytes,
    );
    drop(app);
    drop(cache);
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    // `cargo test --all-targets` runs this without `--bench`: a small smoke run then.
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let sizes = match (sizes.is_empty(), benchmarking) {
        (false, _) => sizes,
        (true, true) => vec![10_000, 100_000],
        (true, false) => vec![300],
    };
    println!("| entries | open until answering | HNSW graphs built | disk per entry | RSS per entry after load | RSS per entry with graphs, minus ~1 KB answer |");
    println!("|---|---|---|---|---|---|");
    for n in sizes {
        measure(n);
    }
}
