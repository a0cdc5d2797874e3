//! all-MiniLM-L6-v2 on ONNX Runtime through fastembed: an int8 graph by default, an exact f32
//! graph on request. Both graphs are built by `models/fetch` from the same safetensors the
//! candle backend reads, and ONNX Runtime's shared library comes from its Python wheel, loaded
//! at run time: nothing is downloaded when building.
//!
//! One session runs every pass, on every core: each session holds its own copy of the weights
//! and working memory, and one pass of many prompts on every core goes through as many prompts a
//! second as one pass per core side by side (see the README's figures), so the batcher runs one
//! worker for this backend (`Embedder::concurrent_passes`) and lets concurrent prompts share its
//! passes. ONNX Runtime's threads spin while waiting for work by default; on a few cores shared
//! with the HTTP server that only burns the time the requests need, so spinning is off.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use fastembed::{InitOptionsUserDefined, TextEmbedding, TokenizerFiles, UserDefinedEmbeddingModel};

use super::model::{digest, ModelFiles, Pooling};
use super::{Embedder, EmbedderId, Error};

/// Which graph runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Weights in 8 bits with a scale per block of 32 (`MatMulNBits`), activations quantised
    /// per row and block at run time, so a prompt's vector does not depend on its batch; the
    /// word-embedding table in int8 rows.
    Int8,
    /// The weights as trained.
    F32,
}

impl Precision {
    fn graph(self) -> &'static str {
        match self {
            Precision::Int8 => "model_int8.onnx",
            Precision::F32 => "model.onnx",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Precision::Int8 => "int8",
            Precision::F32 => "f32",
        }
    }
}

/// Where ONNX Runtime's library is looked for when not given: beside the model folder, where
/// `models/fetch` puts it.
pub fn default_runtime(model_dir: &Path) -> PathBuf {
    model_dir
        .parent()
        .unwrap_or(Path::new("."))
        .join("onnxruntime/libonnxruntime.so")
}

pub struct OnnxEmbedder {
    session: Mutex<TextEmbedding>,
    files: ModelFiles,
    id: EmbedderId,
}

impl OnnxEmbedder {
    /// Loads the graph for `precision` from `model_dir` and ONNX Runtime from `runtime`.
    pub fn load(model_dir: &Path, precision: Precision, runtime: &Path) -> Result<Self, Error> {
        let files = ModelFiles::read(model_dir)?;
        let graph = files.file(precision.graph())?;
        let environment = environment(runtime)?;
        let tokenizer_files = TokenizerFiles {
            tokenizer_file: files.file("tokenizer.json")?,
            config_file: files.config.clone(),
            special_tokens_map_file: files.file("special_tokens_map.json")?,
            tokenizer_config_file: files.file("tokenizer_config.json")?,
        };
        let pooling = match files.pooling {
            Pooling::Mean => fastembed::Pooling::Mean,
            Pooling::Cls => fastembed::Pooling::Cls,
        };
        let id = EmbedderId {
            model: files.name.clone(),
            backend: format!("onnxruntime {} {}", precision.as_str(), files.pooling.as_str()),
            dimensions: files.dimensions,
            weights: digest(&graph),
        };
        let model = UserDefinedEmbeddingModel::new(graph, tokenizer_files).with_pooling(pooling);
        // Without the arena, a pass's working memory goes back when it ends: with it, the arena
        // keeps the largest a pass ever needed (a batch of long prompts) for good.
        let cpu = ort::ep::CPU::default().with_arena_allocator(false).build();
        let options = InitOptionsUserDefined::new()
            .with_environment(environment)
            .with_execution_providers(vec![cpu])
            .with_max_length(files.max_tokens)
            .with_intra_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
            .with_session_config("session.intra_op.allow_spinning", "0");
        let session = TextEmbedding::try_new_from_user_defined(model, options).map_err(|err| {
            Error::Model(format!(
                "ONNX Runtime could not load {}: {err}",
                precision.graph()
            ))
        })?;
        Ok(Self {
            session: Mutex::new(session),
            files,
            id,
        })
    }
}

/// ONNX Runtime, loaded once per process from `runtime`; ort refuses a library older than the
/// API it was built for, before using it.
fn environment(runtime: &Path) -> Result<ort::environment::Environment, Error> {
    static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    ENVIRONMENT
        .get_or_init(|| {
            if !runtime.exists() {
                return Err(format!(
                    "ONNX Runtime's library is not at {} (run `models/fetch` or `make model` to fetch it, or pass --onnxruntime)",
                    runtime.display()
                ));
            }
            ort::init_from(runtime)
                .map_err(|err| format!("cannot load ONNX Runtime: {err}"))?
                .with_name("semcache")
                .with_telemetry(false)
                .build()
                .map_err(|err| format!("cannot start ONNX Runtime: {err}"))
        })
        .clone()
        .map_err(Error::Model)
}

impl Embedder for OnnxEmbedder {
    fn model_id(&self) -> EmbedderId {
        self.id.clone()
    }

    fn dimensions(&self) -> usize {
        self.files.dimensions
    }

    fn seen_len(&self, text: &str) -> Option<usize> {
        self.files.seen_len(text)
    }

    fn concurrent_passes(&self) -> usize {
        1
    }

    fn idle(&self) {
        give_back_free_memory();
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        self.session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .embed(texts, Some(texts.len()))
            .map_err(|err| Error::Model(err.to_string()))
    }
}

/// Returns the C heap's free pages to the system. ONNX Runtime's passes allocate their working
/// memory through the C allocator (its own arena is off, see `load`), which keeps freed blocks
/// of a few MiB for reuse rather than unmapping them: after a burst of long prompts the process
/// went on holding the largest working set any pass had needed. Trimming takes 3 to 7 ms, and
/// runs only when no prompt waits. Lowering glibc's mmap threshold instead halved the misses
/// per second (every pass then mapped and faulted in its buffers afresh).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn give_back_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists, under its locks.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn give_back_free_memory() {}
