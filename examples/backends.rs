//! How far the embedding backends' vectors are from each other on real prompts: embeds the
//! first N prompts of a JSONL file of `{"prompt": ...}` objects (such as ShareGPT's first
//! turns) with every backend built in, one prompt per pass, and prints, for each pair of
//! backends, the least, the 1st percentile and the mean cosine between their vectors of the
//! same prompt.
//! `cargo run --release --example backends -- FILE.jsonl [N, default 1000]`.

use semcache::embed::{self, cosine, Backend, ModelPaths};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(file) = args.next() else {
        eprintln!("usage: backends FILE.jsonl [N]");
        std::process::exit(2);
    };
    let n: usize = args.next().map_or(1000, |n| n.parse().expect("N is a number"));
    let text = std::fs::read_to_string(&file).unwrap_or_else(|err| panic!("{file}: {err}"));
    let prompts: Vec<String> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|value| value["prompt"].as_str().map(str::to_owned))
        .take(n)
        .collect();
    let paths = ModelPaths {
        model_dir: std::env::var("SEMCACHE_MODEL_DIR")
            .unwrap_or_else(|_| "models/all-MiniLM-L6-v2".into())
            .into(),
        onnxruntime: std::env::var_os("SEMCACHE_ONNXRUNTIME").map(Into::into),
    };
    let mut vectors = Vec::new();
    for backend in <Backend as clap::ValueEnum>::value_variants() {
        let embedder = embed::load(*backend, &paths).unwrap_or_else(|err| panic!("{err}"));
        let name = embedder.model_id().backend;
        let of_backend: Vec<Vec<f32>> = prompts
            .iter()
            .map(|prompt| embedder.embed(&[prompt]).expect("embedding").remove(0))
            .collect();
        vectors.push((name, of_backend));
    }
    println!("{} prompts from {file}", prompts.len());
    println!("| backends | least cosine | 1st percentile | mean |");
    println!("|---|---|---|---|");
    for (i, (a, of_a)) in vectors.iter().enumerate() {
        for (b, of_b) in &vectors[i + 1..] {
            let mut cosines: Vec<f32> = of_a.iter().zip(of_b).map(|(x, y)| cosine(x, y)).collect();
            cosines.sort_by(f32::total_cmp);
            let mean = cosines.iter().sum::<f32>() / cosines.len() as f32;
            let p1 = cosines[cosines.len() / 100];
            println!("| {a} / {b} | {:.4} | {p1:.4} | {mean:.4} |", cosines[0]);
        }
    }
}
