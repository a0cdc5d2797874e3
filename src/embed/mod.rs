//! Text embeddings: the `Embedder` trait, its two backends (ONNX Runtime through fastembed, and
//! candle in pure Rust) reading one model folder, and dynamic batching.
//!
//! Embedding is CPU-bound. Callers on the async runtime go through a [`Batcher`], whose own
//! thread runs the forward passes and lets concurrent prompts share them.

mod batch;
#[cfg(feature = "candle")]
mod bert;
mod model;
#[cfg(feature = "onnx")]
mod onnx;
#[cfg(test)]
pub(crate) mod testing;

pub use batch::{Batcher, MAX_BATCH, MAX_WAIT};
#[cfg(feature = "candle")]
pub use bert::BertEmbedder;
#[cfg(feature = "onnx")]
pub use onnx::{default_runtime, OnnxEmbedder, Precision};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model files: {0}")]
    ModelFiles(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("model: {0}")]
    Model(String),
    #[error("embedding task failed: {0}")]
    Task(String),
}

#[cfg(feature = "candle")]
impl From<candle_core::Error> for Error {
    fn from(err: candle_core::Error) -> Self {
        Error::Model(err.to_string())
    }
}

/// Which embedder made a vector: vectors from two embedders cannot be compared, so the store
/// records this, and a store written by another is embedded again at start.
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
    /// ONNX Runtime with int8 weights: the fastest on a CPU.
    #[cfg(feature = "onnx")]
    Onnx,
    /// ONNX Runtime with the weights as trained (f32).
    #[cfg(feature = "onnx")]
    OnnxF32,
    /// candle: pure Rust, f32.
    #[cfg(feature = "candle")]
    Candle,
}

impl Backend {
    /// The backend used unless one is asked for.
    #[cfg(feature = "onnx")]
    pub const DEFAULT: Backend = Backend::Onnx;
    #[cfg(not(feature = "onnx"))]
    pub const DEFAULT: Backend = Backend::Candle;
}

/// Where a backend finds what it loads: the model folder, and ONNX Runtime's library (by
/// default beside the model folder, where `models/fetch` puts it).
#[derive(Debug, Clone)]
pub struct ModelPaths {
    pub model_dir: std::path::PathBuf,
    pub onnxruntime: Option<std::path::PathBuf>,
}

/// Loads the model with `backend`. Slow (reads and hashes the weights): call it on a blocking
/// thread.
pub fn load(backend: Backend, paths: &ModelPaths) -> Result<std::sync::Arc<dyn Embedder>, Error> {
    #[cfg(feature = "onnx")]
    let onnx = |precision| -> Result<std::sync::Arc<dyn Embedder>, Error> {
        let runtime = paths
            .onnxruntime
            .clone()
            .unwrap_or_else(|| default_runtime(&paths.model_dir));
        Ok(std::sync::Arc::new(OnnxEmbedder::load(
            &paths.model_dir,
            precision,
            &runtime,
        )?))
    };
    match backend {
        #[cfg(feature = "onnx")]
        Backend::Onnx => onnx(Precision::Int8),
        #[cfg(feature = "onnx")]
        Backend::OnnxF32 => onnx(Precision::F32),
        #[cfg(feature = "candle")]
        Backend::Candle => Ok(std::sync::Arc::new(BertEmbedder::load(&paths.model_dir)?)),
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

    /// How many passes are worth running at once: the batcher's workers unless
    /// `--embed-workers` says otherwise. By default one per core, each pass on its own core.
    fn concurrent_passes(&self) -> usize {
        std::thread::available_parallelism().map_or(1, usize::from)
    }

    /// Called when the batcher's queue has stayed dry for a moment after a pass (200 ms,
    /// `batch::IDLE_AFTER`), once per dry spell: a backend whose passes leave
    /// memory the process no longer uses can give it back here. By default, nothing.
    fn idle(&self) {}
}

/// A vector the index can take: the model's dimensions, and no NaN or infinity (which a model
/// run in the wrong precision produces, and which would make every comparison with it false).
/// Every vector that enters the cache passes here: from the batcher, and when a store is
/// embedded again at start.
pub fn usable(vector: Vec<f32>, dimensions: usize) -> Result<Vec<f32>, Error> {
    if vector.len() != dimensions {
        return Err(Error::Task(format!(
            "the model returned {} dimensions instead of {dimensions}",
            vector.len()
        )));
    }
    if !vector.iter().all(|x| x.is_finite()) {
        return Err(Error::Task(
            "the model returned a vector that is not finite".to_owned(),
        ));
    }
    Ok(vector)
}

/// Cosine similarity of two L2-normalised vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    crate::index::dot(a, b).clamp(-1.0, 1.0)
}
