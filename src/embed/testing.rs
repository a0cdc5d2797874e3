//! Embedders for unit tests, which control similarity exactly.

use super::{Embedder, EmbedderId, Error};

/// Embeds by the first letter: prompts that start alike are identical to it. `fails`: every
/// call fails, as a broken model would.
pub struct FirstLetter {
    pub fails: bool,
}

impl Embedder for FirstLetter {
    fn model_id(&self) -> EmbedderId {
        EmbedderId {
            model: "first-letter".into(),
            backend: "test".into(),
            dimensions: 26,
            weights: "0".into(),
        }
    }

    fn dimensions(&self) -> usize {
        26
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        if self.fails {
            return Err(Error::Task("the test model fails".into()));
        }
        Ok(texts
            .iter()
            .map(|text| {
                let mut v = vec![0.0; 26];
                let letter = text.bytes().next().unwrap_or(b'a').to_ascii_lowercase();
                v[usize::from(letter.saturating_sub(b'a')).min(25)] = 1.0;
                v
            })
            .collect())
    }

    fn seen_len(&self, _: &str) -> Option<usize> {
        None
    }
}
