//! The on-disk form of an entry. Encoded with postcard (a compact, stable serde format); the
//! table's format version covers this layout, so a change here means a new `FORMAT_VERSION`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub tenant: [u8; 32],
    pub fingerprint: [u8; 32],
    pub prompt: String,
    /// Absent for prompts matched only exactly (no text to embed).
    pub embedding: Option<Vec<f32>>,
    /// The `chat.completion` JSON.
    pub completion: Vec<u8>,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub upstream_latency_us: u64,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub hits: u64,
    pub last_hit_ms: u64,
    /// Raised by wrong-answer reports; 0 when the entry has no threshold of its own.
    pub own_threshold: f32,
    pub wrong_reports: u64,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a record always encodes")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        postcard::from_bytes(bytes).map_err(|err| err.to_string())
    }

    #[cfg(test)]
    pub(crate) fn sample(id: u64) -> Self {
        Self {
            id,
            tenant: [1; 32],
            fingerprint: [2; 32],
            prompt: format!("prompt {id}"),
            embedding: Some(vec![0.6, 0.8]),
            completion: br#"{"choices":[]}"#.to_vec(),
            model: "gpt-4o-mini".into(),
            prompt_tokens: 3,
            completion_tokens: 4,
            upstream_latency_us: 1_500_000,
            created_ms: 1_700_000_000_000,
            expires_ms: Some(1_800_000_000_000),
            hits: 0,
            last_hit_ms: 0,
            own_threshold: 0.0,
            wrong_reports: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_an_error() {
        let record = Record::sample(7);
        assert_eq!(Record::decode(&record.encode()).unwrap(), record);
        assert!(Record::decode(&[0xff, 0xff, 0xff]).is_err());
        let encoded = record.encode();
        assert!(Record::decode(&encoded[..encoded.len() / 2]).is_err());
    }
}
