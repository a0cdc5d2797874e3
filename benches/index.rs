//! Index search and insert at 10k and 100k entries, with recall@1 against brute force.
//!
//! `cargo bench --bench index` (10,000 and 100,000 entries; building the 100k graph takes about
//! 100 s on 2 cores), `-- 20000` for other sizes. Without `--bench` (as `cargo test
//! --all-targets` runs it) it checks 2,200 entries (past the graph threshold) and asserts recall.
//!
//! The vectors are a stand-in for prompt embeddings: random unit vectors are all nearly
//! orthogonal in 384 dimensions, which real embeddings are not, so entries are drawn around
//! 500 topic centroids (cosine about 0.6 to their centroid) and queries are paraphrase-like
//! perturbations of stored entries (cosine about 0.9 to the entry), as cache lookups are.
//! Search time is compared with one embedding's time measured in the proxy bench.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use semcache::index::{dot, Index, PartitionId};

const DIMENSIONS: usize = 384;
const TOPICS: usize = 500;
const QUERIES: usize = 1000;

fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

fn gaussian(rng: &mut StdRng) -> f32 {
    // Box-Muller.
    let (u, v): (f32, f32) = (rng.gen_range(f32::EPSILON..1.0), rng.gen());
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// `base` moved by noise of norm `spread` (relative), normalised.
fn around(base: &[f32], spread: f32, rng: &mut StdRng) -> Vec<f32> {
    let scale = spread / (DIMENSIONS as f32).sqrt();
    normalised(base.iter().map(|x| x + scale * gaussian(rng)).collect())
}

fn brute_force(vectors: &[Vec<f32>], query: &[f32]) -> u64 {
    let mut best = (f32::MIN, 0);
    for (id, vector) in vectors.iter().enumerate() {
        let similarity = dot(vector, query);
        if similarity > best.0 {
            best = (similarity, id as u64);
        }
    }
    best.1
}

struct Figures {
    entries: usize,
    build: Duration,
    insert_per_entry: Duration,
    search_median: Duration,
    search_p99: Duration,
    brute_median: Duration,
    recall_at_1: f64,
}

fn measure(entries: usize, seed: u64) -> Figures {
    let mut rng = StdRng::seed_from_u64(seed);
    let topics: Vec<Vec<f32>> = (0..TOPICS)
        .map(|_| normalised((0..DIMENSIONS).map(|_| gaussian(&mut rng)).collect()))
        .collect();
    let vectors: Vec<Vec<f32>> = (0..entries)
        .map(|_| around(&topics[rng.gen_range(0..TOPICS)], 1.3, &mut rng))
        .collect();
    let queries: Vec<Vec<f32>> = (0..QUERIES)
        .map(|_| around(&vectors[rng.gen_range(0..entries)], 0.45, &mut rng))
        .collect();

    let index = Index::new();
    let partition = PartitionId([7; 32]);
    let started = Instant::now();
    for (id, vector) in vectors.iter().enumerate() {
        index.insert(partition, id as u64, vector.clone());
    }
    // Inserting puts vectors in the exact tail; the graph catches up in the background upkeep.
    index.catch_up(&partition);
    let build = started.elapsed();

    let mut times = Vec::with_capacity(QUERIES);
    let mut found = 0;
    for query in &queries {
        let started = Instant::now();
        let top = index.top(&partition, query, 1);
        times.push(started.elapsed());
        if top.first().map(|n| n.entry_id) == Some(brute_force(&vectors, query)) {
            found += 1;
        }
    }
    times.sort();
    let mut brute = Vec::with_capacity(100);
    for query in queries.iter().take(100) {
        let started = Instant::now();
        std::hint::black_box(brute_force(&vectors, query));
        brute.push(started.elapsed());
    }
    brute.sort();
    Figures {
        entries,
        build,
        insert_per_entry: build / entries as u32,
        search_median: times[times.len() / 2],
        search_p99: times[times.len() * 99 / 100],
        brute_median: brute[brute.len() / 2],
        recall_at_1: found as f64 / QUERIES as f64,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|arg| arg == "--bench");
    let sizes: Vec<usize> = args.iter().filter_map(|arg| arg.parse().ok()).collect();
    let sizes = match (full, sizes.is_empty()) {
        (_, false) => sizes,
        (true, true) => vec![10_000, 100_000],
        (false, true) => vec![2_200],
    };
    println!("| entries | build (insert + graph) | per insert | search median | search p99 | brute force median | recall@1 |");
    println!("|---|---|---|---|---|---|---|");
    for entries in sizes {
        let f = measure(entries, 42);
        println!(
            "| {} | {:.1} s | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.3} |",
            f.entries,
            f.build.as_secs_f64(),
            f.insert_per_entry.as_secs_f64() * 1e6,
            f.search_median.as_secs_f64() * 1e6,
            f.search_p99.as_secs_f64() * 1e6,
            f.brute_median.as_secs_f64() * 1e6,
            f.recall_at_1,
        );
        if !full {
            assert!(f.recall_at_1 >= 0.95, "recall@1 {}", f.recall_at_1);
        }
    }
}
