//! The model folder every backend reads: its configuration, pooling, window and tokenizer, and
//! where the window ends in a text (`seen_len`), which must not depend on the backend.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::Error;

/// sentence-transformers' `1_Pooling/config.json`; only the modes we implement.
#[derive(Debug, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pooling {
    Cls,
    Mean,
}

impl Pooling {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Pooling::Cls => "cls-pooled",
            Pooling::Mean => "mean-pooled",
        }
    }
}

#[derive(Debug, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

/// The part of `config.json` every backend needs.
#[derive(Debug, Deserialize)]
struct Shape {
    hidden_size: usize,
    max_position_embeddings: usize,
}

/// A sentence-transformers model folder, read.
pub(super) struct ModelFiles {
    dir: PathBuf,
    /// The folder's name, for people.
    pub(super) name: String,
    pub(super) config: Vec<u8>,
    pub(super) dimensions: usize,
    pub(super) pooling: Pooling,
    /// The window, in tokens, special tokens included.
    pub(super) max_tokens: usize,
    /// Pads to the longest text of a batch and truncates to the window.
    pub(super) tokenizer: Tokenizer,
}

impl ModelFiles {
    pub(super) fn read(dir: &Path) -> Result<Self, Error> {
        let read = |name: &str| read_file(dir, name);
        let config = read("config.json")?;
        let shape: Shape = serde_json::from_slice(&config).map_err(|err| parse_error("config.json", err))?;
        let pooling_config: PoolingConfig = serde_json::from_slice(&read("1_Pooling/config.json")?)
            .map_err(|err| parse_error("1_Pooling/config.json", err))?;
        let pooling = match (
            pooling_config.pooling_mode_mean_tokens,
            pooling_config.pooling_mode_cls_token,
            pooling_config.pooling_mode_max_tokens || pooling_config.pooling_mode_mean_sqrt_len_tokens,
        ) {
            (true, false, false) => Pooling::Mean,
            (false, true, false) => Pooling::Cls,
            _ => {
                return Err(Error::ModelFiles(format!(
                    "unsupported pooling in 1_Pooling/config.json: {pooling_config:?}"
                )))
            }
        };
        // sentence-transformers truncates to max_seq_length (256 for all-MiniLM-L6-v2), which
        // is shorter than the position embeddings allow; without that file, use the model's limit.
        let max_tokens = match read("sentence_bert_config.json") {
            Ok(bytes) => {
                serde_json::from_slice::<SentenceBertConfig>(&bytes)
                    .map_err(|err| parse_error("sentence_bert_config.json", err))?
                    .max_seq_length
            }
            Err(_) => shape.max_position_embeddings,
        };
        let mut tokenizer = Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|err| Error::Tokenizer(err.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..PaddingParams::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|err| Error::Tokenizer(err.to_string()))?;
        let name = dir
            .file_name()
            .map_or_else(|| "model".to_owned(), |name| name.to_string_lossy().into_owned());
        Ok(Self {
            dir: dir.to_owned(),
            name,
            config,
            dimensions: shape.hidden_size,
            pooling,
            max_tokens,
            tokenizer,
        })
    }

    /// A file of the folder, read whole.
    pub(super) fn file(&self, name: &str) -> Result<Vec<u8>, Error> {
        read_file(&self.dir, name)
    }

    /// Where the model stops reading `text`; see `Embedder::seen_len`.
    pub(super) fn seen_len(&self, text: &str) -> Option<usize> {
        // Every token covers at least one byte, so a text shorter than the window (less its
        // [CLS] and [SEP]) always fits: no need to tokenize it.
        if text.len() + 2 <= self.max_tokens {
            return None;
        }
        let encoding = self.tokenizer.encode(text, true).ok()?;
        if encoding.get_overflowing().is_empty() {
            return None;
        }
        // The last token before [SEP] is the last the model reads.
        let seen = encoding
            .get_offsets()
            .iter()
            .zip(encoding.get_special_tokens_mask())
            .filter(|(_, &special)| special == 0)
            .map(|(&(_, end), _)| end)
            .max()?;
        (seen < text.len()).then_some(seen)
    }
}

/// A hex SHA-256 digest, for `EmbedderId::weights`.
pub(super) fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The sha256 of the file at `path`, read in pieces (a weights file is tens of MB).
#[cfg(feature = "onnx")]
pub(super) fn digest_file(path: &Path) -> Result<String, Error> {
    let mut hasher = Sha256::new();
    std::fs::File::open(path)
        .and_then(|mut file| std::io::copy(&mut file, &mut hasher))
        .map_err(|err| unreadable(path, err))?;
    Ok(hex::encode(hasher.finalize()))
}

fn read_file(dir: &Path, name: &str) -> Result<Vec<u8>, Error> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|err| unreadable(&path, err))
}

/// A model file that cannot be read, most likely not fetched yet.
fn unreadable(path: &Path, err: std::io::Error) -> Error {
    Error::ModelFiles(format!(
        "cannot read {}: {err} (run `models/fetch` or `make model` to download the model)",
        path.display()
    ))
}

fn parse_error(name: &str, err: serde_json::Error) -> Error {
    Error::ModelFiles(format!("{name}: {err}"))
}
