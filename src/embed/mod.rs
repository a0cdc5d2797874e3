//! Text embeddings: the `Embedder` trait and the candle BERT backend.
//!
//! Embedding is CPU-bound. Callers on the async runtime go through
//! [`embed_blocking`], which moves the work to the blocking pool.

mod bert;

use std::sync::Arc;

pub use bert::BertEmbedder;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model files: {0}")]
    ModelFiles(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error("embedding task failed: {0}")]
    Task(String),
}

/// Maps texts to L2-normalised vectors, so that a dot product is a cosine similarity.
pub trait Embedder: Send + Sync {
    /// Number of dimensions of every vector this embedder returns.
    fn dimensions(&self) -> usize;

    /// Embeds each text; the result has one vector per text, in order.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error>;
}

/// Embeds one text on the blocking pool, keeping the async workers free.
pub async fn embed_blocking(embedder: &Arc<dyn Embedder>, text: &str) -> Result<Vec<f32>, Error> {
    let embedder = Arc::clone(embedder);
    let text = text.to_owned();
    tokio::task::spawn_blocking(move || embedder.embed(&[&text]))
        .await
        .map_err(|err| Error::Task(err.to_string()))?
        .map(|mut vectors| vectors.pop().expect("one vector per text"))
}

/// Cosine similarity of two L2-normalised vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    crate::index::dot(a, b).clamp(-1.0, 1.0)
}
