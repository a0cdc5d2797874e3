//! Prints the cosine similarity of the first text to each of the others, on every embedding
//! backend built in: `cargo run --release --example similarity -- "first text" "second" "third"`.

use semcache::embed::{self, cosine, Backend, ModelPaths};

fn main() {
    let texts: Vec<String> = std::env::args().skip(1).collect();
    if texts.len() < 2 {
        eprintln!("usage: similarity TEXT TEXT [TEXT ...]");
        std::process::exit(2);
    }
    let paths = ModelPaths {
        model_dir: std::env::var("SEMCACHE_MODEL_DIR")
            .unwrap_or_else(|_| "models/all-MiniLM-L6-v2".into())
            .into(),
        onnxruntime: std::env::var_os("SEMCACHE_ONNXRUNTIME").map(Into::into),
    };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    for backend in <Backend as clap::ValueEnum>::value_variants() {
        let embedder = embed::load(*backend, &paths).unwrap_or_else(|err| {
            eprintln!("{err}");
            std::process::exit(1);
        });
        println!("{}:", embedder.model_id().backend);
        let vectors = embedder.embed(&refs).expect("embedding");
        for (text, vector) in texts.iter().zip(&vectors).skip(1) {
            println!(
                "  {:.4}  {:?} / {:?}",
                cosine(&vectors[0], vector),
                texts[0],
                text
            );
        }
    }
}
