//! Requests of several items, each answered on its own and matched only word for word: the
//! embeddings endpoint. Each item is an entry of its own, without a vector (never searched by
//! meaning), keyed by the tenant, the request's shared context and the item's text. A batch
//! whose items are partly cached sends only the others upstream, once each, and stores what
//! comes back item by item.
//!
//! The same rules hold as for one answer: only a complete, successful reply that splits into
//! exactly the items sent is stored; an upstream error reaches the client as it came and
//! stores nothing; when the cache fails, the request goes through as through a plain proxy,
//! counted.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::service::{Controls, Outcome, Service};
use super::{Answer, Entry, Fingerprint, HitKind, RequestKey, Surface, TenantId, Usage};
use crate::stats::Origin;
use crate::upstream::{self, UpstreamReply};

/// One request of items, as the core sees it.
pub struct ItemsRequest<'a> {
    pub tenant: TenantId,
    /// What every item shares (model, parameters).
    pub fingerprint: Fingerprint,
    pub items: &'a [String],
    pub model: &'a str,
    pub controls: Controls,
    pub started: Instant,
}

/// How one request of items was answered.
pub enum ItemsServed {
    /// Every item's answer, in order: `cached` of them from the cache, the others from the
    /// upstream just now, whose model and usage (of what was sent) are given.
    Answers {
        items: Vec<Bytes>,
        cached: usize,
        sent: Option<(String, Usage)>,
    },
    /// The upstream's reply as it came: an error, or a body that does not split into the items
    /// sent (a miss), or a request not cached (a bypass). Nothing was stored.
    Relayed {
        outcome: Outcome,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
}

/// How a protocol of items reads the upstream: the body for some texts, and the reply split
/// into one answer per text sent (with the model and usage), or `None`.
pub trait ItemsProtocol {
    fn body(&self, texts: &[&str]) -> Bytes;
    fn split(&self, reply: &[u8], sent: usize) -> Option<(Vec<Bytes>, String, Usage)>;
}

impl Service {
    /// Answers a request of items: each from the cache when its exact key is there, the rest
    /// from one upstream call (`call` sends a body to the surface's upstream path).
    pub async fn answer_items<P, C, F>(
        &self,
        protocol: &P,
        request: ItemsRequest<'_>,
        call: C,
    ) -> Result<ItemsServed, upstream::Error>
    where
        P: ItemsProtocol,
        C: FnOnce(Bytes) -> F,
        F: Future<Output = Result<UpstreamReply, upstream::Error>>,
    {
        let ItemsRequest {
            tenant,
            fingerprint,
            items,
            model,
            controls,
            started,
        } = request;
        let origin = Origin {
            surface: Surface::Embeddings,
            model,
            tenant,
        };
        let all: Vec<&str> = items.iter().map(String::as_str).collect();
        if controls.skip_store {
            self.stats.record_bypass(origin);
            return self.relay(call, protocol.body(&all)).await;
        }
        if let Some(why) = self.cache.unavailable() {
            tracing::debug!(%why, "shared store unavailable; forwarding embeddings without the cache");
            self.stats.record_bypass(origin);
            self.stats.record_cache_failure();
            return self.relay(call, protocol.body(&all)).await;
        }
        let keys: Vec<RequestKey> = items
            .iter()
            .map(|item| RequestKey::new(tenant, fingerprint, item.clone()))
            .collect();
        let mut found: Vec<Option<Arc<Entry>>> = vec![None; items.len()];
        if !controls.skip_lookup {
            for (slot, key) in found.iter_mut().zip(&keys) {
                match self.cache.lookup_exact_confirmed(key, &controls.criteria).await {
                    Ok(hit) => *slot = hit.map(|hit| hit.entry),
                    Err(err) => {
                        tracing::error!(error = %err, "lookup failed; forwarding embeddings without the cache");
                        self.stats.record_bypass(origin);
                        self.stats.record_cache_failure();
                        return self.relay(call, protocol.body(&all)).await;
                    }
                }
            }
        }
        let cached = found.iter().filter(|entry| entry.is_some()).count();
        let saved = found.iter().flatten().fold(Usage::default(), |sum, entry| Usage {
            prompt_tokens: sum.prompt_tokens + entry.answer.usage.prompt_tokens,
            completion_tokens: sum.completion_tokens + entry.answer.usage.completion_tokens,
        });
        if cached == items.len() {
            let upstream_latency = found.iter().flatten().map(|e| e.answer.upstream_latency).max();
            self.stats.record_hit(
                origin,
                HitKind::Exact,
                1.0,
                saved,
                upstream_latency
                    .unwrap_or_default()
                    .saturating_sub(started.elapsed()),
            );
            return Ok(ItemsServed::Answers {
                items: found
                    .into_iter()
                    .flatten()
                    .map(|e| e.answer.completion.clone())
                    .collect(),
                cached,
                sent: None,
            });
        }

        // Each text not found is sent once, however often the batch repeats it: `sent` holds the
        // index of its first item, `slot` each missing item's place among them.
        let mut sent: Vec<usize> = Vec::new();
        let mut slot: Vec<Option<usize>> = vec![None; items.len()];
        let mut first: HashMap<&str, usize> = HashMap::new();
        for (at, (item, entry)) in all.iter().zip(&found).enumerate() {
            if entry.is_none() {
                slot[at] = Some(*first.entry(item).or_insert_with(|| {
                    sent.push(at);
                    sent.len() - 1
                }));
            }
        }
        let texts: Vec<&str> = sent.iter().map(|&at| all[at]).collect();
        self.stats.record_miss(origin, None, None, false);
        self.stats.record_saved(origin, saved);
        let upstream_started = Instant::now();
        let reply = self.call(call, protocol.body(&texts)).await?;
        let (status, headers) = (reply.status, reply.headers.clone());
        let body = reply.bytes().await?;
        let split = status
            .is_success()
            .then(|| protocol.split(&body, texts.len()))
            .flatten();
        let Some((answers, upstream_model, usage)) = split else {
            return Ok(ItemsServed::Relayed {
                outcome: Outcome::Miss,
                status,
                headers,
                body,
            });
        };
        let latency = upstream_started.elapsed();
        let lengths: Vec<usize> = texts.iter().map(|text| text.len()).collect();
        // All at once: the store commits them together (one sync for the batch, not one each).
        let inserts = sent.iter().zip(&answers).enumerate().map(|(n, (&at, answer))| {
            let answer = Answer {
                completion: answer.clone(),
                model: upstream_model.clone(),
                usage: Usage {
                    prompt_tokens: share(usage.prompt_tokens, &lengths, n),
                    completion_tokens: 0,
                },
                upstream_latency: latency,
            };
            self.cache.insert(&keys[at], None, answer, controls.ttl)
        });
        futures::future::join_all(inserts).await;
        let items = found
            .into_iter()
            .zip(slot)
            .map(|(entry, slot)| match (entry, slot) {
                (Some(entry), _) => entry.answer.completion.clone(),
                (None, slot) => answers[slot.expect("every missing item was sent")].clone(),
            })
            .collect();
        Ok(ItemsServed::Answers {
            items,
            cached,
            sent: Some((upstream_model, usage)),
        })
    }

    /// A request of items that is not cached (token ids): sent upstream as it is, counted.
    pub async fn forward_items<C, F>(
        &self,
        model: &str,
        tenant: TenantId,
        call: C,
        body: Bytes,
    ) -> Result<ItemsServed, upstream::Error>
    where
        C: FnOnce(Bytes) -> F,
        F: Future<Output = Result<UpstreamReply, upstream::Error>>,
    {
        self.stats.record_bypass(Origin {
            surface: Surface::Embeddings,
            model,
            tenant,
        });
        self.relay(call, body).await
    }

    /// Sends a body upstream and hands its reply back whole, stored nowhere.
    async fn relay<C, F>(&self, call: C, body: Bytes) -> Result<ItemsServed, upstream::Error>
    where
        C: FnOnce(Bytes) -> F,
        F: Future<Output = Result<UpstreamReply, upstream::Error>>,
    {
        let reply = self.call(call, body).await?;
        let (status, headers) = (reply.status, reply.headers.clone());
        let body = reply.bytes().await?;
        Ok(ItemsServed::Relayed {
            outcome: Outcome::Bypass,
            status,
            headers,
            body,
        })
    }
}

/// Item `n`'s share of a batch's tokens, by its length among `lengths` (the upstream counts
/// tokens for the whole batch only); the shares add up to `total`.
fn share(total: u64, lengths: &[usize], n: usize) -> u64 {
    let sum: u64 = lengths.iter().map(|&l| l as u64).sum::<u64>().max(1);
    let upto = |k: usize| lengths[..k].iter().map(|&l| l as u64).sum::<u64>() * total / sum;
    upto(n + 1) - upto(n)
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_of_a_batch_add_up_to_its_tokens() {
        let lengths = [10, 30, 20];
        let shares: Vec<u64> = (0..3).map(|n| share(13, &lengths, n)).collect();
        assert_eq!(shares.iter().sum::<u64>(), 13);
        assert!(shares[1] > shares[0], "{shares:?}");
        assert_eq!(share(5, &[4], 0), 5);
        assert_eq!(share(0, &[4, 4], 1), 0);
    }
}
