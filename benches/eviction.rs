//! Which eviction policy keeps more hits: LRU or LFU, on the real cache, with exact lookups.
//!
//! Workloads (seeded): prompts drawn from a Zipf distribution (s = 1.0, the usual fit for
//! repeated chatbot questions) over 100,000 distinct prompts, with a cache of 5,000 entries;
//! and the same with popularity that shifts every 100,000 requests (a new set of popular
//! prompts, like a news cycle), where recency matters more. The cache's upkeep (which ages LFU
//! frequencies) runs every 5,000 requests, as every 5 s at 1,000 requests a second.
//!
//! `cargo bench --bench eviction`

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::{rngs::StdRng, Rng, SeedableRng};
use semcache::cache::{
    Answer, Cache, Config, Criteria, Digest32, Eviction, Fingerprint, RequestKey, TenantId, Usage,
};
use semcache::embed::{self, Embedder};

const DISTINCT: usize = 100_000;
const CAPACITY: usize = 5_000;
const REQUESTS: usize = 600_000;
const SHIFT_EVERY: usize = 100_000;

/// `cargo test --all-targets` runs this without `--bench`: a small smoke run then.
fn scale() -> usize {
    if std::env::args().any(|arg| arg == "--bench") {
        1
    } else {
        100
    }
}

struct NoModel;

impl Embedder for NoModel {
    fn model_id(&self) -> semcache::embed::EmbedderId {
        semcache::embed::EmbedderId {
            model: "none".into(),
            backend: "bench".into(),
            dimensions: 1,
            weights: "0".into(),
        }
    }

    fn seen_len(&self, _: &str) -> Option<usize> {
        None
    }

    fn dimensions(&self) -> usize {
        1
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, embed::Error> {
        Ok(texts.iter().map(|_| vec![1.0]).collect())
    }
}

/// Zipf sampling by inverse transform over precomputed cumulative weights.
struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(s);
                total
            })
            .collect();
        Self { cumulative }
    }

    fn sample(&self, rng: &mut StdRng) -> usize {
        let target = rng.gen_range(0.0..*self.cumulative.last().unwrap());
        self.cumulative.partition_point(|&c| c < target)
    }
}

fn hit_rate(policy: Eviction, shifting: bool) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let config = Config {
        max_entries: CAPACITY,
        eviction: policy,
        default_ttl: None,
        ..Config::default()
    };
    let cache = Cache::new(Arc::new(NoModel), config);
    let zipf = Zipf::new(DISTINCT, 1.0);
    let mut rng = StdRng::seed_from_u64(11);
    let fingerprint = Fingerprint(Digest32::of("bench", &[b"ctx"]));
    let criteria = Criteria {
        threshold: 1.0,
        context_threshold: 1.0,
        max_age: None,
        verify: false,
        judge: None,
    };
    let answer = Answer {
        completion: Bytes::from_static(b"{}"),
        model: "m".into(),
        usage: Usage::default(),
        upstream_latency: Duration::from_millis(500),
    };
    let mut hits = 0;
    let requests = REQUESTS / scale();
    for request in 0..requests {
        let rank = zipf.sample(&mut rng);
        // A shift relabels which prompts are popular.
        let epoch = if shifting {
            request / (SHIFT_EVERY / scale())
        } else {
            0
        };
        let prompt = format!("prompt {}", (rank + epoch * 7919) % DISTINCT);
        let key = RequestKey::new(TenantId::shared(), fingerprint, prompt);
        // The server's upkeep runs every 5 s; at 1,000 requests a second, every 5,000.
        if request % 5_000 == 0 {
            cache.maintain();
        }
        if cache.lookup_exact(&key, &criteria).is_some() {
            hits += 1;
        } else {
            runtime.block_on(cache.insert(&key, None, answer.clone(), None));
        }
    }
    hits as f64 / requests as f64
}

fn resident_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Random unit vectors, a fresh one per text: every insert lands in the index.
struct RandomVectors;

impl Embedder for RandomVectors {
    fn model_id(&self) -> semcache::embed::EmbedderId {
        semcache::embed::EmbedderId {
            model: "random".into(),
            backend: "bench".into(),
            dimensions: 384,
            weights: "0".into(),
        }
    }

    fn seen_len(&self, _: &str) -> Option<usize> {
        None
    }

    fn dimensions(&self) -> usize {
        384
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, embed::Error> {
        let mut rng = rand::thread_rng();
        Ok(texts
            .iter()
            .map(|_| {
                let v: Vec<f32> = (0..384).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.into_iter().map(|x| x / norm).collect()
            })
            .collect())
    }
}

/// Resident memory while a bounded cache takes a long stream of new entries, with the upkeep
/// the service runs every 5 s (expiry, index compaction, graph catch-up) after every batch.
fn memory_under_churn() {
    const BOUND: usize = 5_000;
    const INSERTS: usize = 60_000;
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let config = Config {
        max_entries: BOUND,
        eviction: Eviction::Lfu,
        default_ttl: None,
        ..Config::default()
    };
    let cache = Cache::new(Arc::new(RandomVectors), config);
    let answer = Answer {
        completion: Bytes::from(vec![b'x'; 1000]),
        model: "m".into(),
        usage: Usage::default(),
        upstream_latency: Duration::from_millis(500),
    };
    let mut readings = Vec::new();
    for i in 0..INSERTS {
        let fingerprint = Fingerprint(Digest32::of("bench", &[&(i as u64 % 8).to_le_bytes()]));
        let key = RequestKey::new(TenantId::shared(), fingerprint, format!("churn prompt {i}"));
        let embedding = RandomVectors.embed(&[&key.prompt]).unwrap().remove(0);
        runtime.block_on(cache.insert(&key, Some(embedding), answer.clone(), None));
        if (i + 1) % 5_000 == 0 {
            cache.maintain();
            readings.push(format!("{}k: {:.0} MiB", (i + 1) / 1000, resident_mib()));
        }
    }
    assert_eq!(cache.len(), BOUND);
    assert_eq!(cache.indexed(), BOUND);
    println!(
        "RSS with {BOUND} entries bound while {INSERTS} are stored: {}",
        readings.join(", ")
    );
}

fn main() {
    if std::env::args().any(|arg| arg == "memory") && scale() == 1 {
        memory_under_churn();
        return;
    }
    println!("| workload | LRU hit rate | LFU hit rate |");
    println!("|---|---|---|");
    for (name, shifting) in [
        ("Zipf s=1.0, static popularity", false),
        ("Zipf s=1.0, popularity shifts every 100k requests", true),
    ] {
        println!(
            "| {name} | {:.1}% | {:.1}% |",
            hit_rate(Eviction::Lru, shifting) * 100.0,
            hit_rate(Eviction::Lfu, shifting) * 100.0
        );
    }
    println!(
        "({} requests, {DISTINCT} distinct prompts, {CAPACITY} entries, sampled eviction)",
        REQUESTS / scale()
    );
}
