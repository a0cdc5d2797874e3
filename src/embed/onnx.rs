//! all-MiniLM-L6-v2 on ONNX Runtime through fastembed: an int8 graph by default, an exact f32
//! graph on request. Both graphs are built by `models/fetch` from the same safetensors the
//! candle backend reads, and ONNX Runtime's shared library comes from its Python wheel, loaded
//! at run time: nothing is downloaded when building.
//!
//! One session per core, and as many batcher workers (`Embedder::concurrent_passes`), so that
//! passes overlap under load: a pass takes the first free session, and the first runs on every
//! core (a lone prompt, while the others are idle, gets the lowest latency), the others on one
//! thread each. On 2 cores two sessions went through 2.3-2.5 x candle's misses per second in
//! the load bench against 1.9-2.1 x with one session on both cores. The sessions share the
//! weights file's mapping (see `load`); each holds its own repacked projections and tokenizer.
//! ONNX Runtime's threads spin while waiting for work by default; on a few cores shared with
//! the HTTP server that only burns the time the requests need, so spinning is off.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use fastembed::{InitOptionsUserDefined, TextEmbedding, TokenizerFiles, UserDefinedEmbeddingModel};

use super::model::{digest, digest_file, ModelFiles, Pooling};
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

    /// The graph's weights (ONNX external data), which ONNX Runtime maps from the file.
    fn weights(self) -> &'static str {
        match self {
            Precision::Int8 => "model_int8.onnx.data",
            Precision::F32 => "model.onnx.data",
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
    /// One per core; a pass takes the first that is free.
    sessions: Vec<Mutex<TextEmbedding>>,
    files: ModelFiles,
    id: EmbedderId,
}

impl OnnxEmbedder {
    /// Loads the graph for `precision` from `model_dir` and ONNX Runtime from `runtime`.
    pub fn load(model_dir: &Path, precision: Precision, runtime: &Path) -> Result<Self, Error> {
        let files = ModelFiles::read(model_dir)?;
        let graph = files.file(precision.graph())?;
        // The graph names its weights file relative to the folder given here. ONNX Runtime maps
        // that file rather than reading it onto the heap: every session shares the mapping, so
        // only the weights a session repacks for its kernels (the projections) are its own, and
        // of the word-embedding table only the rows of tokens that occur are ever read in. With
        // the weights inside the graph, each session held its own copy of all of them.
        let weights = model_dir.join(precision.weights());
        let weights_digest = digest_file(&weights)?;
        let folder = model_dir
            .canonicalize()
            .map_err(|err| Error::ModelFiles(format!("cannot open {}: {err}", model_dir.display())))?;
        let folder = folder.to_str().ok_or_else(|| {
            Error::ModelFiles(format!(
                "ONNX Runtime needs a UTF-8 path, not {}",
                folder.display()
            ))
        })?;
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
            weights: digest(format!("{}{weights_digest}", digest(&graph)).as_bytes()),
        };
        share_one_heap();
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let sessions = (0..cores)
            .map(|n| {
                let model = UserDefinedEmbeddingModel::new(graph.clone(), tokenizer_files.clone())
                    .with_pooling(pooling.clone());
                // Without the arena, a pass's working memory goes back when it ends: with it,
                // the arena keeps the largest a pass ever needed (a batch of long prompts).
                let cpu = ort::ep::CPU::default().with_arena_allocator(false).build();
                let options = InitOptionsUserDefined::new()
                    .with_environment(environment.clone())
                    .with_execution_providers(vec![cpu])
                    .with_max_length(files.max_tokens)
                    .with_intra_threads(if n == 0 { cores } else { 1 })
                    .with_session_config("session.intra_op.allow_spinning", "0")
                    .with_session_config("session.model_external_initializers_file_folder_path", folder);
                TextEmbedding::try_new_from_user_defined(model, options)
                    .map(Mutex::new)
                    .map_err(|err| {
                        Error::Model(format!(
                            "ONNX Runtime could not load {}: {err}",
                            precision.graph()
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Parsing and optimising the graphs left their working copies on the heap's free lists.
        give_back_free_memory();
        Ok(Self { sessions, files, id })
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
        self.sessions.len()
    }

    fn idle(&self) {
        give_back_free_memory();
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let mut session = self
            .sessions
            .iter()
            .find_map(|session| session.try_lock().ok())
            .unwrap_or_else(|| self.sessions[0].lock().unwrap_or_else(PoisonError::into_inner));
        session
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

/// Makes threads started from now on share the C heap's main arena rather than take one each.
/// ONNX Runtime's pool threads and the batcher each took an arena of their own, and every arena
/// kept its own free blocks of a pass's working memory: with one heap (and then one session) the
/// load bench's misses per second rose to 72-81 req/s from 66-73 (candle at 36-41 alongside),
/// and the resident memory at the end fell to 109-113 MiB from 124-126 (after warm-up about the
/// same). Threads that already hold an arena keep it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn share_one_heap() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: mallopt only sets a tunable of the allocator, under its own lock; glibc reads
        // M_ARENA_MAX when a thread first needs an arena, so a later change is safe to make.
        #[allow(unsafe_code)]
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    });
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn share_one_heap() {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::cosine;

    /// Sessions run on different thread counts: a prompt's vector must not depend on which one
    /// its pass took, or whether it hit would depend on the load.
    #[test]
    fn every_session_gives_a_prompt_the_same_vector() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
        let embedder = OnnxEmbedder::load(&dir, Precision::Int8, &default_runtime(&dir))
            .expect("the tests need the real model: run `make model` first");
        assert_eq!(
            embedder.sessions.len(),
            std::thread::available_parallelism().map_or(1, usize::from)
        );
        let texts = [
            "How can I reset my password?",
            "a somewhat longer sentence that pads the batch",
        ];
        let first = embedder.embed(&texts).unwrap();
        for n in 1..embedder.sessions.len() {
            // With the sessions before it held, the pass takes session n.
            let held: Vec<_> = embedder.sessions[..n].iter().map(|s| s.lock().unwrap()).collect();
            let other = embedder.embed(&texts).unwrap();
            drop(held);
            for ((text, a), b) in texts.iter().zip(&first).zip(&other) {
                let same = cosine(a, b);
                assert!(same > 0.9999, "session {n} on {text:?}: {same}");
            }
        }
    }
}
