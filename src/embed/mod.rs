//! Text embeddings: the `Embedder` trait, the candle BERT backend, and dynamic batching.
//!
//! Embedding is CPU-bound. Callers on the async runtime go through a [`Batcher`], whose own
//! thread runs the forward passes and lets concurrent prompts share them.

mod batch;
mod bert;
#[cfg(test)]
pub(crate) mod testing;

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

/// Which embedder made a vector: vectors from two embedders cannot be compared, so the store
/// records this and refuses, at start, a store written by another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedderId {
    /// The model's name, for people (the folder it was loaded from); not compared.
    pub model: String,
    /// How it runs, e.g. `candle f32 mean-pooled`: the same weights run another way give
    /// other vectors.
    pub backend: String,
    pub dimensions: usize,
    /// A digest of the weights (hex), so that a retrained model under the same name differs.
    pub weights: String,
}

impl EmbedderId {
    /// Whether vectors from `self` and `other` can be compared.
    pub fn same_vectors(&self, other: &EmbedderId) -> bool {
        self.backend == other.backend && self.dimensions == other.dimensions && self.weights == other.weights
    }
}

impl std::fmt::Display for EmbedderId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let weights = self.weights.get(..12).unwrap_or(&self.weights);
        write!(
            f,
            "{} on {} ({} dimensions, weights {weights}…)",
            self.model, self.backend, self.dimensions
        )
    }
}

/// Which embedding backend runs the model (`--embedder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// candle: pure Rust, f32 on the CPU.
    Candle,
}

/// Loads the model in `model_dir` with `backend`. Slow (reads and hashes the weights): call it
/// on a blocking thread.
pub fn load(backend: Backend, model_dir: &std::path::Path) -> Result<std::sync::Arc<dyn Embedder>, Error> {
    match backend {
        Backend::Candle => Ok(std::sync::Arc::new(BertEmbedder::load(model_dir)?)),
    }
}

/// Maps texts to L2-normalised vectors, so that a dot product is a cosine similarity.
pub trait Embedder: Send + Sync {
    /// What makes this embedder's vectors: model, dimensions, weights.
    fn model_id(&self) -> EmbedderId;

    /// Number of dimensions of every vector this embedder returns.
    fn dimensions(&self) -> usize;

    /// Embeds each text; the result has one vector per text, in order.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error>;

    /// How much of `text` the model reads: `None` when all of it, else the byte offset where
    /// its window ends. Two texts that differ only past that point get the same vector, so the
    /// verifier needs this to be right: every backend must say.
    fn seen_len(&self, text: &str) -> Option<usize>;
}

/// Cosine similarity of two L2-normalised vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    crate::index::dot(a, b).clamp(-1.0, 1.0)
}
