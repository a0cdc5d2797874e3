//! all-MiniLM-L6-v2 (or any BERT sentence-transformer) on candle, in f32 on the CPU.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};

use super::model::{digest, ModelFiles, Pooling};
use super::{Embedder, EmbedderId, Error};

pub struct BertEmbedder {
    model: BertModel,
    files: ModelFiles,
    device: Device,
    id: EmbedderId,
}

impl BertEmbedder {
    /// Loads the model from a sentence-transformers folder.
    pub fn load(model_dir: &Path) -> Result<Self, Error> {
        let files = ModelFiles::read(model_dir)?;
        let config: BertConfig = serde_json::from_slice(&files.config)
            .map_err(|err| Error::ModelFiles(format!("config.json: {err}")))?;
        let device = Device::Cpu;
        // The weights are read into memory rather than memory-mapped, which needs no unsafe.
        let weights = files.file("model.safetensors")?;
        let id = EmbedderId {
            model: files.name.clone(),
            backend: format!("candle f32 {}", files.pooling.as_str()),
            dimensions: files.dimensions,
            weights: digest(&weights),
        };
        let tensors = candle_core::safetensors::load_buffer(&weights, &device)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let model = BertModel::load(vb, &config)?;
        Ok(Self {
            model,
            files,
            device,
            id,
        })
    }
}

impl Embedder for BertEmbedder {
    fn model_id(&self) -> EmbedderId {
        self.id.clone()
    }

    fn dimensions(&self) -> usize {
        self.files.dimensions
    }

    fn seen_len(&self, text: &str) -> Option<usize> {
        self.files.seen_len(text)
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .files
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

        let pooled = match self.files.pooling {
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
