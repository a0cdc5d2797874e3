//! Text embeddings: the `Embedder` trait, the candle BERT backend, and dynamic batching.
//!
//! Embedding is CPU-bound. Callers on the async runtime go through a [`Batcher`], whose own
//! thread runs the forward passes and lets concurrent prompts share them.

mod batch;
mod bert;

pub use batch::{Batcher, MAX_BATCH, MAX_WAIT};
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

    /// How much of `text` the model reads: `None` when all of it, else the byte offset where
    /// its window ends. Two texts that differ only past that point get the same vector.
    fn seen_len(&self, _text: &str) -> Option<usize> {
        None
    }
}

/// Cosine similarity of two L2-normalised vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    crate::index::dot(a, b).clamp(-1.0, 1.0)
}
