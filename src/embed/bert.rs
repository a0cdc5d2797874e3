//! all-MiniLM-L6-v2 (or any BERT sentence-transformer) on candle, in f32 on the CPU.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use serde::Deserialize;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use sha2::{Digest, Sha256};

use super::{Embedder, EmbedderId, Error};

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
enum Pooling {
    Cls,
    Mean,
}

#[derive(Debug, Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
}

pub struct BertEmbedder {
    model: BertModel,
    tokenizer: Tokenizer,
    pooling: Pooling,
    dimensions: usize,
    device: Device,
    /// The window, in tokens, special tokens included.
    max_tokens: usize,
    id: EmbedderId,
}

impl BertEmbedder {
    /// Loads the model from a sentence-transformers folder.
    pub fn load(model_dir: &Path) -> Result<Self, Error> {
        let read = |name: &str| {
            std::fs::read(model_dir.join(name)).map_err(|err| {
                Error::ModelFiles(format!(
                    "cannot read {}: {err} (run `models/fetch` or `make model` to download the model)",
                    model_dir.join(name).display()
                ))
            })
        };
        let parse_err = |name: &str, err: serde_json::Error| Error::ModelFiles(format!("{name}: {err}"));

        let config: BertConfig =
            serde_json::from_slice(&read("config.json")?).map_err(|err| parse_err("config.json", err))?;
        let pooling_config: PoolingConfig = serde_json::from_slice(&read("1_Pooling/config.json")?)
            .map_err(|err| parse_err("1_Pooling/config.json", err))?;
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
                    .map_err(|err| parse_err("sentence_bert_config.json", err))?
                    .max_seq_length
            }
            Err(_) => config.max_position_embeddings,
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

        let device = Device::Cpu;
        // The weights are read into memory rather than memory-mapped, which needs no unsafe.
        let weights = read("model.safetensors")?;
        let name = model_dir
            .file_name()
            .map_or_else(|| "model".to_owned(), |name| name.to_string_lossy().into_owned());
        let id = EmbedderId {
            model: name,
            backend: match pooling {
                Pooling::Mean => "candle f32 mean-pooled",
                Pooling::Cls => "candle f32 cls-pooled",
            }
            .to_owned(),
            dimensions: config.hidden_size,
            weights: hex::encode(Sha256::digest(&weights)),
        };
        let tensors = candle_core::safetensors::load_buffer(&weights, &device)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let model = BertModel::load(vb, &config)?;

        Ok(Self {
            model,
            tokenizer,
            pooling,
            dimensions: config.hidden_size,
            device,
            max_tokens,
            id,
        })
    }
}

impl Embedder for BertEmbedder {
    fn model_id(&self) -> EmbedderId {
        self.id.clone()
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    fn seen_len(&self, text: &str) -> Option<usize> {
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

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|err| Error::Tokenizer(err.to_string()))?;
        let n_texts = encodings.len();
        let n_tokens = encodings[0].len();

        let mut ids: Vec<u32> = Vec::with_capacity(n_texts * n_tokens);
        let mut type_ids: Vec<u32> = Vec::with_capacity(n_texts * n_tokens);
        let mut mask: Vec<u32> = Vec::with_capacity(n_texts * n_tokens);
        for encoding in &encodings {
            ids.extend(encoding.get_ids());
            type_ids.extend(encoding.get_type_ids());
            mask.extend(encoding.get_attention_mask());
        }
        let shape = (n_texts, n_tokens);
        let ids = Tensor::from_vec(ids, shape, &self.device)?;
        let type_ids = Tensor::from_vec(type_ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;

        // An explicit mask keeps padding out of attention: without it, batched texts of
        // different lengths get different vectors than the same texts alone.
        let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?;

        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                let counts = mask.sum(1)?.clamp(1e-9, f32::MAX)?;
                summed.broadcast_div(&counts)?
            }
        };
        let norms = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
        let normalised = pooled.broadcast_div(&norms)?;
        Ok(normalised.to_vec2::<f32>()?)
    }
}
