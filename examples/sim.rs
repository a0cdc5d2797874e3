use semcache::embed::{cosine, BertEmbedder, Embedder};
fn main() {
    let e = BertEmbedder::load(std::path::Path::new("models/all-MiniLM-L6-v2")).unwrap();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let v = e
        .embed(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    for i in 1..v.len() {
        println!("{:.4} {:?} / {:?}", cosine(&v[0], &v[i]), args[0], args[i]);
    }
}
