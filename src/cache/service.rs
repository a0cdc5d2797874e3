//! The caching flow, protocol-neutral: given a request's tenant, what it keys on and its
//! controls, and a way to call the upstream, answer from the cache or relay the upstream's
//! answer and store it.
//!
//! Every storing and coalescing invariant is enforced here, not at the edges:
//! - a lookup searches only the request's own tenant and context;
//! - identical concurrent misses make one upstream call; the leader looks again before calling,
//!   since the previous leader may have stored the answer in between;
//! - only what the protocol calls storable is stored: 2xx, complete, and for a stream an end
//!   marker after well-formed events;
//! - an entry is in the cache before the client sees the end of its answer: the last byte of a
//!   body, the end event of a stream;
//! - a streaming client that goes away does not stop the relay: the answer is read to the end
//!   and stored, since it is paid for and coalesced waiters are owed it;
//! - when the cache fails, the request goes through as through a plain proxy, counted.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::mpsc;

use super::protocol::{Protocol, StreamItem, StreamReader};
use super::{vouch, Answer, Cache, Criteria, Flight, Hit, HitKind, Join, Lookup, RequestKey, TenantId};
use crate::config::ContextMode;
use crate::embed;
use crate::judge::Judge;
use crate::stats::{Origin, Stats};
use crate::upstream::{self, UpstreamReply};

/// What the client asked of the cache for one request.
#[derive(Debug, Clone, Copy)]
pub struct Controls {
    /// Do not look up, but store the fresh answer (`Cache-Control: no-cache`).
    pub skip_lookup: bool,
    /// Neither look up nor store (`Cache-Control: no-store`).
    pub skip_store: bool,
    pub criteria: Criteria,
    /// The lifetime of the entry this request stores, instead of the default.
    pub ttl: Option<Duration>,
    /// How the request's earlier turns are compared.
    pub context: ContextMode,
}

/// One request, as the core sees it.
pub struct CacheRequest<'a, P: Protocol> {
    pub tenant: TenantId,
    pub request: &'a P::Request,
    /// The body the client sent.
    pub body: Bytes,
    pub controls: Controls,
    /// When the request arrived, for the latency a hit saves.
    pub started: Instant,
    /// The client's `Authorization`, for a judge that shares the upstream's key handling.
    pub credential: Option<HeaderValue>,
}

/// How the cache treated a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Bypass,
}

/// The answer the edge sends back.
pub enum Served {
    /// From the cache: replay the entry through the protocol.
    Hit(Hit),
    /// From the upstream, relayed.
    Upstream {
        outcome: Outcome,
        status: StatusCode,
        headers: HeaderMap,
        body: ServedBody,
        /// The entry the answer was stored as (a complete body that was stored).
        entry: Option<u64>,
    },
}

pub enum ServedBody {
    /// The whole body, already read.
    Complete(Bytes),
    /// The upstream's body as it arrives, stored nowhere.
    Passthrough(BoxStream<'static, Result<Bytes, upstream::Error>>),
    /// A streamed miss: events framed by the protocol, ending with its end event once the
    /// answer is stored (or its error event if the stream broke).
    Events(mpsc::Receiver<Bytes>),
}

/// The caching core: the cache, the figures it keeps and the judge, if there is one.
pub struct Service {
    pub(super) cache: Arc<Cache>,
    pub(super) stats: Arc<Stats>,
    judge: Option<Judge>,
}

impl Service {
    pub fn new(cache: Arc<Cache>, stats: Arc<Stats>) -> Self {
        Self {
            cache,
            stats,
            judge: None,
        }
    }

    /// With a judge for the candidates a lookup is not sure of.
    pub fn with_judge(mut self, judge: Judge) -> Self {
        self.judge = Some(judge);
        self
    }

    pub fn judge(&self) -> Option<&Judge> {
        self.judge.as_ref()
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Answers one request. `call` sends a body to the upstream's `protocol.upstream_path()`.
    pub async fn answer<P, C, F>(
        &self,
        protocol: &P,
        request: CacheRequest<'_, P>,
        call: C,
    ) -> Result<Served, upstream::Error>
    where
        P: Protocol,
        C: FnOnce(Bytes) -> F,
        F: Future<Output = Result<UpstreamReply, upstream::Error>>,
    {
        let CacheRequest {
            tenant,
            request,
            body,
            mut controls,
            started,
            credential,
        } = request;
        controls.criteria.judge = self.judge.as_ref().map(|judge| judge.policy);
        let model = protocol.model(request);
        let origin = Origin {
            surface: protocol.surface(),
            model,
            tenant,
        };
        let input = (!controls.skip_store)
            .then(|| protocol.cache_input(request))
            .flatten();
        let Some(input) = input else {
            self.stats.record_bypass(origin);
            return self.pass_through(call, body).await;
        };
        if let Some(why) = self.cache.unavailable() {
            // A shared store that cannot be reached (or is still loading): a plain proxy,
            // whatever the request's controls, since nothing could be confirmed or kept.
            tracing::debug!(%why, "shared store unavailable; forwarding without the cache");
            self.stats.record_bypass(origin);
            self.stats.record_cache_failure();
            return self.pass_through(call, body).await;
        }
        let key = RequestKey::of_input(tenant, input, controls.context);

        let mut ticket = Ticket {
            cache: Arc::clone(&self.cache),
            key,
            embedding: None,
            flight: None,
            lease: None,
            ttl: controls.ttl,
        };
        let mut nearest = None;
        let mut refused = None;
        if !controls.skip_lookup {
            match self.cache.lookup(&ticket.key, &controls.criteria).await {
                Ok(Lookup::Hit(hit)) => return Ok(self.hit(origin, hit, started)),
                Ok(Lookup::Miss(miss)) => {
                    self.stats.record_passed_over(miss.passed_over);
                    if let (Some(judge), Some(candidate)) = (&self.judge, &miss.unsure) {
                        let ruling =
                            vouch(&self.cache, judge, &ticket.key, candidate, credential.as_ref()).await;
                        self.stats.record_ruling(&judge.model, &ruling);
                        if ruling.approved() {
                            return Ok(self.hit(origin, candidate.clone(), started));
                        }
                    }
                    ticket.embedding = miss.embedding;
                    nearest = miss.nearest;
                    refused = miss.refused.map(|rejection| rejection.reason);
                }
                Err(err) => {
                    // The cache failing must not fail the call: act as a plain proxy.
                    tracing::error!(error = %err, "lookup failed; forwarding without the cache");
                    self.stats.record_bypass(origin);
                    self.stats.record_cache_failure();
                    return self.pass_through(call, body).await;
                }
            }
            match self.cache.join(&ticket.key) {
                Join::Leader(leader) => {
                    // The previous leader may have stored the answer since our lookup.
                    if let Ok(Some(hit)) = self
                        .cache
                        .lookup_exact_confirmed(&ticket.key, &controls.criteria)
                        .await
                    {
                        leader.complete(Arc::clone(&hit.entry));
                        return Ok(self.hit(origin, hit, started));
                    }
                    // With other nodes, the call is theirs to make if one of them already is.
                    match self.cache.lease(&ticket.key).await {
                        Some(Ok(lease)) => ticket.lease = Some(lease),
                        Some(Err(())) => {
                            if let Some(hit) = self.cache.await_other_node(&ticket.key).await {
                                leader.complete(Arc::clone(&hit.entry));
                                return Ok(self.hit(origin, hit, started));
                            }
                        }
                        None => {}
                    }
                    ticket.flight = Some(leader);
                }
                Join::Follower(receiver) => {
                    if let Some(entry) = Join::wait(receiver).await {
                        let hit = Hit {
                            entry,
                            similarity: 1.0,
                            kind: HitKind::Exact,
                            vouched: super::Vouched::Nothing,
                        };
                        return Ok(self.hit(origin, hit, started));
                    }
                    // The leader got nothing storable: make our own call.
                }
            }
        }

        let conversation = ticket.key.context.is_some();
        self.stats.record_miss(origin, nearest, refused, conversation);
        let miss = InFlight {
            embedding: ticket.start_embedding(),
            ticket,
            stats: Arc::clone(&self.stats),
            model: model.to_owned(),
        };
        let upstream_started = Instant::now();
        let reply = self.call(call, protocol.miss_body(request, body)).await?;
        if !reply.status.is_success() {
            // Errors reach the client as they are and are not stored.
            let (status, headers) = (reply.status, reply.headers.clone());
            return Ok(Served::Upstream {
                outcome: Outcome::Miss,
                status,
                headers,
                body: ServedBody::Complete(reply.bytes().await?),
                entry: None,
            });
        }
        if protocol.streams(request) {
            let (sender, receiver) = mpsc::channel(64);
            let (status, headers) = (reply.status, reply.headers.clone());
            let reader = protocol.stream_reader(request);
            // The relay runs on its own task: if the client goes away, it still reads the
            // upstream to the end and stores the answer.
            tokio::spawn(miss.relay(reply, reader, sender, upstream_started));
            return Ok(Served::Upstream {
                outcome: Outcome::Miss,
                status,
                headers,
                body: ServedBody::Events(receiver),
                entry: None,
            });
        }
        let (status, headers) = (reply.status, reply.headers.clone());
        let body = reply.bytes().await?;
        let entry = match protocol.storable(&body) {
            Some(usage) => miss.store(body.clone(), usage, upstream_started.elapsed()).await,
            None => None,
        };
        Ok(Served::Upstream {
            outcome: Outcome::Miss,
            status,
            headers,
            body: ServedBody::Complete(body),
            entry,
        })
    }

    fn hit(&self, origin: Origin<'_>, hit: Hit, started: Instant) -> Served {
        let answer = &hit.entry.answer;
        self.stats.record_hit(
            Origin {
                tenant: hit.entry.tenant,
                ..origin
            },
            hit.kind,
            hit.similarity,
            answer.usage,
            answer.upstream_latency.saturating_sub(started.elapsed()),
        );
        self.stats.record_vouched(hit.vouched);
        Served::Hit(hit)
    }

    /// Sends a body upstream, counting the call and its failure.
    pub(super) async fn call<C, F>(&self, call: C, body: Bytes) -> Result<UpstreamReply, upstream::Error>
    where
        C: FnOnce(Bytes) -> F,
        F: Future<Output = Result<UpstreamReply, upstream::Error>>,
    {
        self.stats.record_upstream_call();
        match call(body).await {
            Ok(reply) => {
                if !reply.status.is_success() {
                    self.stats.record_upstream_error();
                }
                Ok(reply)
            }
            Err(err) => {
                self.stats.record_upstream_error();
                Err(err)
            }
        }
    }

    /// Sends the request upstream unchanged and relays the answer, stored nowhere.
    async fn pass_through<C, F>(&self, call: C, body: Bytes) -> Result<Served, upstream::Error>
    where
        C: FnOnce(Bytes) -> F,
        F: Future<Output = Result<UpstreamReply, upstream::Error>>,
    {
        let reply = self.call(call, body).await?;
        Ok(Served::Upstream {
            outcome: Outcome::Bypass,
            status: reply.status,
            headers: reply.headers,
            body: ServedBody::Passthrough(reply.body),
            entry: None,
        })
    }
}

/// What a miss needs to be stored: its key, the prompt's vector (or how to get it), the
/// coalesced waiters to wake, and the entry's lifetime.
struct Ticket {
    cache: Arc<Cache>,
    key: RequestKey,
    /// Computed by the lookup, when it needed one.
    embedding: Option<Vec<f32>>,
    flight: Option<Flight>,
    /// This node's lease on the call, when other nodes share the store.
    lease: Option<super::LeaseGuard>,
    ttl: Option<Duration>,
}

impl Ticket {
    /// The prompt's vector for storing: the lookup's, or (nothing to compare with, or no
    /// lookup) one computed while the upstream works, so that storing need not wait for it.
    fn start_embedding(&mut self) -> Embedding {
        match self.embedding.take() {
            Some(vector) => Embedding::Ready(vector),
            None if self.key.is_semantic() => {
                Embedding::Pending(EarlyEmbedding::start(&self.cache, &self.key.prompt))
            }
            None => Embedding::Absent,
        }
    }
}

/// The prompt's vector for storing a miss.
enum Embedding {
    Ready(Vec<f32>),
    /// Being computed alongside the upstream call.
    Pending(EarlyEmbedding),
    /// The prompt has no text to embed: stored for exact matches only.
    Absent,
}

/// An embedding computed in the background; dropped unfinished (the upstream call failed),
/// it stops.
struct EarlyEmbedding(Option<tokio::task::JoinHandle<Result<Vec<f32>, embed::Error>>>);

impl EarlyEmbedding {
    fn start(cache: &Arc<Cache>, prompt: &str) -> Self {
        let (cache, prompt) = (Arc::clone(cache), prompt.to_owned());
        Self(Some(tokio::spawn(async move { cache.embed(&prompt).await })))
    }

    async fn finish(mut self) -> Result<Vec<f32>, embed::Error> {
        let handle = self.0.take().expect("finished once");
        handle.await.map_err(|err| embed::Error::Task(err.to_string()))?
    }
}

impl Drop for EarlyEmbedding {
    fn drop(&mut self) {
        if let Some(handle) = &self.0 {
            handle.abort();
        }
    }
}

/// A request gone upstream whose answer is stored when it is complete. Dropped without
/// storing (an error, a broken stream), it tells coalesced waiters to make their own call.
struct InFlight {
    ticket: Ticket,
    embedding: Embedding,
    stats: Arc<Stats>,
    model: String,
}

impl InFlight {
    /// Relays a streamed answer event by event, and stores it before the end event goes out,
    /// so that a client that asks again at once is answered from the cache.
    async fn relay(
        self,
        reply: UpstreamReply,
        mut reader: Box<dyn StreamReader>,
        sender: mpsc::Sender<Bytes>,
        started: Instant,
    ) {
        let mut client = Client(Some(sender));
        let mut stream = reply.body;
        let mut ended = false;
        let mut failure: Option<String> = None;
        'read: while let Some(chunk) = stream.next().await {
            let bytes = match chunk {
                Ok(bytes) => bytes,
                Err(err) => {
                    failure = Some(err.to_string());
                    break;
                }
            };
            for item in reader.feed(&bytes) {
                match item {
                    StreamItem::Event(event) => client.send(event).await,
                    StreamItem::End => {
                        ended = true;
                        break 'read;
                    }
                    StreamItem::Broken(reason) => {
                        failure = Some(reason);
                        break 'read;
                    }
                }
            }
        }
        if !ended {
            let reason =
                failure.unwrap_or_else(|| "the upstream closed the stream before its end".to_owned());
            tracing::warn!(%reason, "upstream stream broke; nothing stored");
            self.stats.record_upstream_error();
            client.send(reader.error(&reason)).await;
            return;
        }
        let end = reader.end();
        match reader.finish() {
            Ok((answer, usage)) => {
                self.store(answer, usage, started.elapsed()).await;
            }
            Err(incomplete) => tracing::warn!(%incomplete, "streamed answer not stored"),
        }
        client.send(end).await;
    }

    /// Stores the answer, wakes coalesced waiters, and lets the index graph catch up in the
    /// background. Returns the new entry's id, if it is held (a shared store that did not
    /// acknowledge it leaves it out).
    async fn store(self, completion: Bytes, usage: super::Usage, latency: Duration) -> Option<u64> {
        let InFlight {
            ticket,
            embedding,
            stats,
            model,
        } = self;
        let Ticket {
            cache,
            key,
            flight,
            ttl,
            ..
        } = ticket;
        let embedding = match embedding {
            Embedding::Ready(embedding) => Some(embedding),
            Embedding::Pending(early) => match early.finish().await {
                Ok(embedding) => Some(embedding),
                Err(err) => {
                    tracing::error!(error = %err, "embedding for storage failed; stored for exact matches only");
                    stats.record_cache_failure();
                    None
                }
            },
            Embedding::Absent => None,
        };
        let answer = Answer {
            completion,
            model,
            usage,
            upstream_latency: latency,
        };
        let entry = cache.insert(&key, embedding, answer, ttl).await;
        let entry_id = cache.get(entry.id).map(|held| held.id);
        if let Some(flight) = flight {
            flight.complete(entry);
        }
        tokio::task::spawn_blocking(move || cache.catch_up(&key));
        entry_id
    }
}

/// The streaming client's end of the relay; it goes quiet once the client has gone.
struct Client(Option<mpsc::Sender<Bytes>>);

impl Client {
    async fn send(&mut self, bytes: Bytes) {
        if let Some(sender) = &self.0 {
            if sender.send(bytes).await.is_err() {
                tracing::debug!(
                    "streaming client went away; reading the upstream to the end to store the answer"
                );
                self.0 = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::cache::{CacheInput, Config, Digest32, Fingerprint, Invalid, Replay, Surface, Usage};
    use crate::embed::testing::FirstLetter;
    use crate::stats::PriceTable;

    /// A protocol of plain text, to show the flow knows nothing of OpenAI's: the body is the
    /// prompt (`stream:` first asks for a stream); an answer may be stored when it starts with
    /// `ok`; a stream is lines, `END` its end marker and `BAD` garbage.
    struct Text;

    struct TextRequest {
        prompt: String,
        stream: bool,
    }

    impl Protocol for Text {
        type Request = TextRequest;

        fn surface(&self) -> Surface {
            Surface::Completions
        }

        fn parse(&self, body: &[u8]) -> Result<TextRequest, Invalid> {
            let text = std::str::from_utf8(body).map_err(|_| Invalid {
                message: "not UTF-8".into(),
                param: None,
            })?;
            Ok(match text.strip_prefix("stream:") {
                Some(prompt) => TextRequest {
                    prompt: prompt.to_owned(),
                    stream: true,
                },
                None => TextRequest {
                    prompt: text.to_owned(),
                    stream: false,
                },
            })
        }

        fn cache_input(&self, request: &TextRequest) -> Option<CacheInput> {
            Some(CacheInput {
                fingerprint: Fingerprint(Digest32::of("test", &[b"context"])),
                prompt: request.prompt.clone(),
                conversation: None,
            })
        }

        fn model<'a>(&self, _: &'a TextRequest) -> &'a str {
            "text"
        }

        fn streams(&self, request: &TextRequest) -> bool {
            request.stream
        }

        fn upstream_path(&self) -> &'static str {
            "/text"
        }

        fn miss_body(&self, _: &TextRequest, body: Bytes) -> Bytes {
            body
        }

        fn storable(&self, answer: &[u8]) -> Option<Usage> {
            answer.starts_with(b"ok").then(Usage::default)
        }

        fn stream_reader(&self, _: &TextRequest) -> Box<dyn StreamReader> {
            Box::new(Lines::default())
        }

        fn replay(&self, _: &TextRequest, answer: &[u8]) -> Replay {
            Replay::Body(Bytes::copy_from_slice(answer))
        }
    }

    #[derive(Default)]
    struct Lines {
        seen: Vec<u8>,
    }

    impl StreamReader for Lines {
        fn feed(&mut self, bytes: &[u8]) -> Vec<StreamItem> {
            let mut items = Vec::new();
            for line in bytes.split(|b| *b == b'\n').filter(|line| !line.is_empty()) {
                match line {
                    b"END" => {
                        items.push(StreamItem::End);
                        break;
                    }
                    b"BAD" => {
                        items.push(StreamItem::Broken("garbage".into()));
                        break;
                    }
                    line => {
                        self.seen.extend_from_slice(line);
                        items.push(StreamItem::Event(Bytes::copy_from_slice(line)));
                    }
                }
            }
            items
        }

        fn finish(self: Box<Self>) -> Result<(Bytes, Usage), String> {
            Text.storable(&self.seen)
                .map(|usage| (Bytes::from(self.seen), usage))
                .ok_or_else(|| "not ok".into())
        }

        fn end(&self) -> Bytes {
            Bytes::from_static(b"<end>")
        }

        fn error(&self, reason: &str) -> Bytes {
            Bytes::from(format!("<error: {reason}>"))
        }
    }

    fn service(fails: bool) -> Service {
        let cache = Arc::new(Cache::new(Arc::new(FirstLetter { fails }), Config::default()));
        Service::new(cache, Arc::new(Stats::new(PriceTable::default())))
    }

    const CONTROLS: Controls = Controls {
        skip_lookup: false,
        skip_store: false,
        criteria: Criteria {
            threshold: 0.9,
            context_threshold: 0.9,
            max_age: None,
            verify: true,
            judge: None,
        },
        ttl: None,
        context: ContextMode::Exact,
    };

    /// An upstream that answers `chunks` with `status`, counting its calls.
    fn upstream(
        calls: &AtomicUsize,
        status: u16,
        chunks: &[&'static str],
    ) -> impl FnOnce(Bytes) -> futures::future::Ready<Result<UpstreamReply, upstream::Error>> {
        calls.fetch_add(1, Ordering::SeqCst);
        let chunks: Vec<Result<Bytes, upstream::Error>> = chunks
            .iter()
            .map(|c| Ok(Bytes::from_static(c.as_bytes())))
            .collect();
        move |_body| {
            futures::future::ready(Ok(UpstreamReply {
                status: StatusCode::from_u16(status).unwrap(),
                headers: HeaderMap::new(),
                body: futures::stream::iter(chunks).boxed(),
            }))
        }
    }

    async fn ask<F>(service: &Service, body: &'static str, call: impl FnOnce(Bytes) -> F) -> Served
    where
        F: Future<Output = Result<UpstreamReply, upstream::Error>>,
    {
        let request = Text.parse(body.as_bytes()).unwrap();
        service
            .answer(
                &Text,
                CacheRequest {
                    tenant: TenantId::anonymous(),
                    request: &request,
                    body: Bytes::from_static(body.as_bytes()),
                    controls: CONTROLS,
                    started: Instant::now(),
                    credential: None,
                },
                call,
            )
            .await
            .unwrap()
    }

    fn outcome(served: &Served) -> Outcome {
        match served {
            Served::Hit(_) => Outcome::Hit,
            Served::Upstream { outcome, .. } => *outcome,
        }
    }

    fn event_receiver(served: Served) -> mpsc::Receiver<Bytes> {
        let Served::Upstream {
            body: ServedBody::Events(receiver),
            ..
        } = served
        else {
            panic!("not a stream");
        };
        receiver
    }

    async fn events(served: Served) -> Vec<Bytes> {
        let mut receiver = event_receiver(served);
        let mut events = Vec::new();
        while let Some(event) = receiver.recv().await {
            events.push(event);
        }
        events
    }

    #[tokio::test]
    async fn a_stored_answer_is_served_and_errors_are_not_stored() {
        let service = service(false);
        let calls = AtomicUsize::new(0);
        let failed = ask(&service, "apples?", upstream(&calls, 500, &["ok but 500"])).await;
        assert_eq!(outcome(&failed), Outcome::Miss);
        let unstorable = ask(&service, "apples?", upstream(&calls, 200, &["refused"])).await;
        assert_eq!(outcome(&unstorable), Outcome::Miss);
        assert!(service.cache().is_empty());
        let stored = ask(&service, "apples?", upstream(&calls, 200, &["ok: apples"])).await;
        assert!(matches!(stored, Served::Upstream { entry: Some(_), .. }));
        // Same first letter: similar enough, and the upstream is not called.
        let hit = ask(&service, "avocados?", upstream(&calls, 200, &["ok: never"])).await;
        let Served::Hit(hit) = hit else {
            panic!("not a hit")
        };
        assert_eq!(&hit.entry.answer.completion[..], b"ok: apples");
        assert_eq!(calls.load(Ordering::SeqCst), 4, "four calls prepared");
    }

    #[tokio::test]
    async fn a_stream_is_stored_before_its_end_goes_out() {
        let service = service(false);
        let calls = AtomicUsize::new(0);
        let served = ask(
            &service,
            "stream:bananas?",
            upstream(&calls, 200, &["ok\n", "yes\nEND\n"]),
        )
        .await;
        let mut receiver = event_receiver(served);
        let mut seen = Vec::new();
        while let Some(event) = receiver.recv().await {
            if &event[..] == b"<end>" {
                assert_eq!(service.cache().len(), 1, "stored before the end event");
            }
            seen.push(event);
        }
        assert_eq!(seen, [&b"ok"[..], b"yes", b"<end>"]);
    }

    #[tokio::test]
    async fn a_broken_stream_ends_in_an_error_and_stores_nothing() {
        let service = service(false);
        let calls = AtomicUsize::new(0);
        let served = ask(
            &service,
            "stream:cherries?",
            upstream(&calls, 200, &["ok\nBAD\nEND\n"]),
        )
        .await;
        assert_eq!(events(served).await, [&b"ok"[..], b"<error: garbage>"]);
        let unended = ask(&service, "stream:cherries?", upstream(&calls, 200, &["ok\n"])).await;
        let last = events(unended).await.pop().unwrap();
        assert!(last.starts_with(b"<error:"), "{last:?}");
        assert!(service.cache().is_empty());
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_stream_still_gets_the_answer_stored() {
        let service = service(false);
        let calls = AtomicUsize::new(0);
        let served = ask(
            &service,
            "stream:dates?",
            upstream(&calls, 200, &["ok\n", "more\n", "END\n"]),
        )
        .await;
        drop(served);
        // The relay goes on without the client; the next ask finds its answer.
        while service.cache().is_empty() {
            tokio::task::yield_now().await;
        }
        let hit = ask(&service, "dates?", upstream(&calls, 200, &["ok: never"])).await;
        assert_eq!(outcome(&hit), Outcome::Hit);
    }

    #[tokio::test]
    async fn identical_misses_make_one_call() {
        let service = Arc::new(service(false));
        let gate = Arc::new(tokio::sync::Notify::new());
        let upstream_calls = Arc::new(AtomicUsize::new(0));
        let leader = {
            let (service, gate, upstream_calls) = (
                Arc::clone(&service),
                Arc::clone(&gate),
                Arc::clone(&upstream_calls),
            );
            tokio::spawn(async move {
                let call = |_body| async move {
                    upstream_calls.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    Ok(UpstreamReply {
                        status: StatusCode::OK,
                        headers: HeaderMap::new(),
                        body: futures::stream::iter([Ok(Bytes::from_static(b"ok: eggs"))]).boxed(),
                    })
                };
                outcome(&ask(&service, "eggs?", call).await)
            })
        };
        // The follower joins once the leader is waiting on its upstream.
        while upstream_calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let follower = {
            let service = Arc::clone(&service);
            tokio::spawn(async move {
                let call = |_body| async move { panic!("a follower makes no call of its own") };
                outcome(&ask(&service, "eggs?", call).await)
            })
        };
        while service.cache().coalesced() == 0 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        assert_eq!(leader.await.unwrap(), Outcome::Miss);
        assert_eq!(follower.await.unwrap(), Outcome::Hit);
        assert_eq!(upstream_calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failing_model_makes_a_plain_proxy() {
        let service = service(true);
        let calls = AtomicUsize::new(0);
        // An entry stored while the model worked: now a lookup by meaning is needed.
        let text = Text;
        let key = RequestKey::new(
            TenantId::anonymous(),
            text.cache_input(&text.parse(b"figs?").unwrap())
                .unwrap()
                .fingerprint,
            "figs?".to_owned(),
        );
        let mut vector = vec![0.0; 26];
        vector[5] = 1.0;
        let answer = Answer {
            completion: Bytes::from_static(b"ok: figs"),
            model: "text".into(),
            usage: Usage::default(),
            upstream_latency: Duration::from_millis(1),
        };
        service.cache().insert(&key, Some(vector), answer, None).await;
        let exact = ask(&service, "figs?", upstream(&calls, 200, &["ok: never"])).await;
        assert_eq!(outcome(&exact), Outcome::Hit, "exact matches need no model");
        let served = ask(&service, "grapes?", upstream(&calls, 200, &["ok: grapes"])).await;
        assert_eq!(outcome(&served), Outcome::Bypass);
        assert!(matches!(
            served,
            Served::Upstream {
                body: ServedBody::Passthrough(_),
                ..
            }
        ));
    }
}
