//! The on-disk form of an entry. Encoded with postcard (a compact, stable serde format); the
//! table's format version covers this layout, so a change here means a new `FORMAT_VERSION`.

use serde::{Deserialize, Serialize};

use crate::cache::{Digest32, ExactKey, Fingerprint, TenantId};
use crate::context::Context;
use crate::judge::Verdicts;

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
    /// The conversation an entry was stored in, for entries stored in the semantic context
    /// mode with earlier turns (format version 2; absent in version 1 records).
    pub context: Option<RecordContext>,
    /// The judge's verdicts on the entry. Not part of the record's bytes: the redb store keeps
    /// them in a table of their own, rewritten at each verdict (the shared store does not keep
    /// them yet).
    #[serde(skip)]
    pub verdicts: Verdicts,
}

/// What an entry stored in a conversation keeps of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordContext {
    /// The exact key of the whole conversation: `fingerprint` and `prompt` leave the earlier
    /// turns out, so it cannot be derived from them.
    pub exact: [u8; 32],
    /// The conversation as the matcher read it (bounded, see `context::MAX_FACTS_BYTES`).
    pub context: Context,
}

/// A record as format version 1 wrote it: the same fields, without `context`.
#[derive(Deserialize)]
struct RecordV1 {
    id: u64,
    tenant: [u8; 32],
    fingerprint: [u8; 32],
    prompt: String,
    embedding: Option<Vec<f32>>,
    completion: Vec<u8>,
    model: String,
    prompt_tokens: u64,
    completion_tokens: u64,
    upstream_latency_us: u64,
    created_ms: u64,
    expires_ms: Option<u64>,
    hits: u64,
    last_hit_ms: u64,
    own_threshold: f32,
    wrong_reports: u64,
}

impl From<RecordV1> for Record {
    fn from(v1: RecordV1) -> Self {
        Self {
            id: v1.id,
            tenant: v1.tenant,
            fingerprint: v1.fingerprint,
            prompt: v1.prompt,
            embedding: v1.embedding,
            completion: v1.completion,
            model: v1.model,
            prompt_tokens: v1.prompt_tokens,
            completion_tokens: v1.completion_tokens,
            upstream_latency_us: v1.upstream_latency_us,
            created_ms: v1.created_ms,
            expires_ms: v1.expires_ms,
            hits: v1.hits,
            last_hit_ms: v1.last_hit_ms,
            own_threshold: v1.own_threshold,
            wrong_reports: v1.wrong_reports,
            context: None,
            verdicts: Verdicts::default(),
        }
    }
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a record always encodes")
    }

    /// Reads a record of this format or of version 1 (which ends where `context` begins, so
    /// it fails to read as this format and is read as the older one).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        postcard::from_bytes(bytes)
            .or_else(|err| {
                postcard::from_bytes::<RecordV1>(bytes)
                    .map(Record::from)
                    .map_err(|_| err)
            })
            .map_err(|err| err.to_string())
    }

    /// The entry's exact key: its conversation's, or that of its tenant, fingerprint and prompt.
    pub fn exact_key(&self) -> ExactKey {
        match &self.context {
            Some(context) => ExactKey(Digest32(context.exact)),
            None => ExactKey::of(
                TenantId(Digest32(self.tenant)),
                Fingerprint(Digest32(self.fingerprint)),
                &self.prompt,
            ),
        }
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
            context: None,
            verdicts: Verdicts::default(),
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

    #[test]
    fn version_1_records_still_read_and_contexts_round_trip() {
        let record = Record {
            hits: 5,
            own_threshold: 0.9,
            wrong_reports: 1,
            ..Record::sample(7)
        };
        // Version 1 wrote the same fields without the context: this one's `None` is its last
        // byte.
        let mut v1 = record.encode();
        assert_eq!(v1.pop(), Some(0));
        let read = Record::decode(&v1).unwrap();
        assert_eq!((read.hits, read.own_threshold, read.wrong_reports), (5, 0.9, 1));
        assert_eq!(read.context, None);
        assert_eq!(read, record);
        assert_eq!(read.exact_key(), record.exact_key());

        let turns = [crate::context::Turn {
            user: true,
            text: "My Netflix plan renews on the 3rd.".into(),
        }];
        let in_context = Record {
            context: Some(RecordContext {
                exact: [9; 32],
                context: Context::of(&turns, "Cancel it"),
            }),
            ..record
        };
        let read = Record::decode(&in_context.encode()).unwrap();
        assert_eq!(read, in_context);
        assert_eq!(read.exact_key(), ExactKey(Digest32([9; 32])));
    }
}
