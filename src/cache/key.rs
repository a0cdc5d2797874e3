//! What identifies a cached answer: the tenant, the context fingerprint and the prompt.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::ContextMode;
use crate::context::{Analysed, Context, Turn};
use crate::index::PartitionId;

/// A SHA-256 digest, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest32(pub [u8; 32]);

impl Digest32 {
    /// Hashes the parts under a domain label, with lengths so that part boundaries count.
    pub fn of(domain: &str, parts: &[&[u8]]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update((domain.len() as u64).to_le_bytes());
        hasher.update(domain.as_bytes());
        for part in parts {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        Self(hasher.finalize().into())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Digest32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

/// Whose cache an entry belongs to: a one-way hash of the client's bearer key, never the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TenantId(pub Digest32);

impl TenantId {
    /// The tenant of everyone under `--scope shared`.
    pub fn shared() -> Self {
        Self(Digest32::of("semcache/tenant/v1", &[b"shared"]))
    }

    /// The tenant of clients that send no key under `--scope tenant`: apart from the shared
    /// one, so that entries stored under `--scope shared` are not served to them later.
    pub fn anonymous() -> Self {
        Self(Digest32::of("semcache/tenant/v1", &[b"anonymous"]))
    }

    /// The first 16 hex digits of the hash: how operators see a tenant.
    pub fn short_hex(self) -> String {
        self.0.to_hex()[..16].to_owned()
    }

    /// The key's bytes, hashed: UTF-8 or not, every key has its own tenant.
    pub fn from_api_key(api_key: impl AsRef<[u8]>) -> Self {
        Self(Digest32::of("semcache/tenant/v1", &[b"key", api_key.as_ref()]))
    }
}

/// A hash of everything in a request, other than the embedded prompt, that changes the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub Digest32);

/// The parts of a request the cache keys on, as a protocol derives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInput {
    pub fingerprint: Fingerprint,
    /// The text compared by meaning (for chat completions, the last user message's text
    /// parts, joined by newlines).
    pub prompt: String,
    /// The earlier turns, for the semantic context mode: present when the request has user or
    /// assistant turns before its last user message and all of them are plain text.
    pub conversation: Option<Conversation>,
}

/// A request's earlier turns, apart from the rest of its context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// The fingerprint without the user and assistant turns before the last user message: what
    /// stays exact in the semantic context mode (model, system prompt, tools, parameters). A
    /// request without earlier turns has this fingerprint as its own.
    pub fingerprint: Fingerprint,
    /// The earlier user and assistant turns, oldest first; never empty.
    pub turns: Vec<Turn>,
}

/// The exact-match key: tenant, fingerprint and the prompt byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExactKey(pub Digest32);

impl ExactKey {
    pub fn of(tenant: TenantId, fingerprint: Fingerprint, prompt: &str) -> Self {
        Self(Digest32::of(
            "semcache/exact/v1",
            &[&tenant.0 .0, &fingerprint.0 .0, prompt.as_bytes()],
        ))
    }
}

/// Everything the cache needs to know about a request.
#[derive(Debug, Clone)]
pub struct RequestKey {
    pub tenant: TenantId,
    pub fingerprint: Fingerprint,
    /// The text that is embedded: the last user message.
    pub prompt: String,
    pub exact: ExactKey,
    /// The conversation, read by the matcher, when the request is compared in its context (the
    /// semantic context mode, earlier turns present): then `fingerprint` leaves the earlier turns
    /// out, `prompt` is the request with what it refers back to ([`Context::compared_text`]),
    /// and `exact` still covers the whole conversation.
    pub context: Option<Arc<Analysed>>,
    /// Whether entries stored with a context may answer (the semantic context mode).
    pub conversations: bool,
}

impl RequestKey {
    pub fn new(tenant: TenantId, fingerprint: Fingerprint, prompt: String) -> Self {
        let exact = ExactKey::of(tenant, fingerprint, &prompt);
        Self {
            tenant,
            fingerprint,
            prompt,
            exact,
            context: None,
            conversations: false,
        }
    }

    /// The key of a request under `mode`. A request without earlier turns has the same key in
    /// both modes, so single-message entries serve either.
    pub fn of_input(tenant: TenantId, input: CacheInput, mode: ContextMode) -> Self {
        let semantic = mode == ContextMode::Semantic;
        match input.conversation {
            Some(conversation) if semantic => {
                let exact = ExactKey::of(tenant, input.fingerprint, &input.prompt);
                let context = Context::of(&conversation.turns, &input.prompt);
                Self {
                    tenant,
                    fingerprint: conversation.fingerprint,
                    prompt: context.compared_text(),
                    exact,
                    context: Some(Arc::new(context.analysed())),
                    conversations: true,
                }
            }
            _ => Self {
                conversations: semantic,
                ..Self::new(tenant, input.fingerprint, input.prompt)
            },
        }
    }

    /// The index partition this request may be answered from.
    pub fn partition(&self) -> PartitionId {
        partition_of(self.tenant, self.fingerprint)
    }

    /// Whether the prompt carries text to compare by meaning. A prompt of images alone is
    /// only ever matched exactly.
    pub fn is_semantic(&self) -> bool {
        !self.prompt.trim().is_empty()
    }
}

pub fn partition_of(tenant: TenantId, fingerprint: Fingerprint) -> PartitionId {
    PartitionId(Digest32::of("semcache/partition/v1", &[&tenant.0 .0, &fingerprint.0 .0]).0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_tenant_fingerprint_and_prompt() {
        let fp = Fingerprint(Digest32::of("t", &[b"ctx"]));
        let other_fp = Fingerprint(Digest32::of("t", &[b"ctx2"]));
        let a = TenantId::from_api_key("sk-a");
        let b = TenantId::from_api_key("sk-b");
        let base = RequestKey::new(a, fp, "hi".into());
        assert_ne!(base.exact, RequestKey::new(b, fp, "hi".into()).exact);
        assert_ne!(base.exact, RequestKey::new(a, other_fp, "hi".into()).exact);
        assert_ne!(base.exact, RequestKey::new(a, fp, "hi!".into()).exact);
        assert_eq!(base.exact, RequestKey::new(a, fp, "hi".into()).exact);
        assert_ne!(base.partition(), RequestKey::new(b, fp, "hi".into()).partition());
    }

    #[test]
    fn part_boundaries_count() {
        assert_ne!(
            Digest32::of("d", &[b"ab", b"c"]),
            Digest32::of("d", &[b"a", b"bc"])
        );
    }

    #[test]
    fn tenant_id_does_not_contain_the_key() {
        let tenant = TenantId::from_api_key("sk-secret-123456");
        assert!(!tenant.0.to_hex().contains("secret"));
        assert_ne!(tenant, TenantId::shared());
    }
}
