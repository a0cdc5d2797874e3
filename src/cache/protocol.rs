//! The protocol seam: what the caching core needs to know of one API surface's wire format.
//!
//! Chat completions (`openai::ChatCompletions`) is the first implementation. A new surface
//! (the Responses API, Anthropic's Messages) is a new implementation of [`Protocol`] and one
//! route; the flow in `service.rs` (lookup, coalescing, what is stored and when the client may
//! see the end of an answer) stays the same for all of them.

use bytes::Bytes;

use super::{CacheInput, Usage};

/// A request that failed validation; the message and parameter reach the client, in the
/// surface's own error shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub message: String,
    pub param: Option<String>,
}

/// The API surfaces the cache serves. An answer belongs to the surface that stored it (each
/// fingerprints its context in a domain of its own), and each is a row of the figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    ChatCompletions,
    Completions,
    /// Matched item by item, word for word only (`cache::ItemsProtocol`).
    Embeddings,
    /// The Responses API, matched by meaning like chat (`openai::Responses`).
    Responses,
}

impl Surface {
    pub const ALL: [Surface; 4] = [
        Surface::ChatCompletions,
        Surface::Completions,
        Surface::Embeddings,
        Surface::Responses,
    ];

    /// Its name in `/stats`, `/metrics` and the dashboard.
    pub fn name(self) -> &'static str {
        match self {
            Surface::ChatCompletions => "chat_completions",
            Surface::Completions => "completions",
            Surface::Embeddings => "embeddings",
            Surface::Responses => "responses",
        }
    }
}

/// One API surface.
pub trait Protocol: Send + Sync + 'static {
    /// A validated request.
    type Request: Send + Sync;

    /// Which surface this is.
    fn surface(&self) -> Surface;

    /// Reads and validates a request body.
    fn parse(&self, body: &[u8]) -> Result<Self::Request, Invalid>;

    /// What the cache keys on, or `None` when the answer to this request must not be cached
    /// at all (nothing to key on, several answers asked for): it is then forwarded as it is.
    fn cache_input(&self, request: &Self::Request) -> Option<CacheInput>;

    /// Why a request is forwarded without the cache although it could otherwise be keyed
    /// (it depends on state kept upstream): the `x-semcache-bypass` header of its reply.
    fn bypass_reason(&self, _request: &Self::Request) -> Option<&'static str> {
        None
    }

    /// The client's body as the upstream must see it, hit or not: the same bytes unless the
    /// request names something semcache minted (the Responses API's ids of a hit).
    fn upstream_body(&self, _request: &Self::Request, body: Bytes) -> Bytes {
        body
    }

    /// The model asked for, for the figures.
    fn model<'a>(&self, request: &'a Self::Request) -> &'a str;

    /// Whether the client asked for a stream.
    fn streams(&self, request: &Self::Request) -> bool;

    /// Where the upstream serves this surface, below its base URL (`/chat/completions`).
    fn upstream_path(&self) -> &'static str;

    /// The body to send upstream for a miss, given the client's: for a stream, with whatever
    /// the stored answer needs asked for too (token usage).
    fn miss_body(&self, request: &Self::Request, body: Bytes) -> Bytes;

    /// Whether a complete, successful answer may be stored, and its token usage if so.
    fn storable(&self, answer: &[u8]) -> Option<Usage>;

    /// A reader for one streamed answer, as the client asked for it.
    fn stream_reader(&self, request: &Self::Request) -> Box<dyn StreamReader>;

    /// A stored answer as this request gets it: a fresh body, or the events of a stream.
    fn replay(&self, request: &Self::Request, answer: &[u8]) -> Replay;
}

/// A stored answer, replayed.
pub enum Replay {
    Body(Bytes),
    Events(Vec<Bytes>),
}

/// What one read of a streamed answer yields, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamItem {
    /// An event to pass on to the client, framed.
    Event(Bytes),
    /// The upstream's end marker. It is not passed on: the core sends [`StreamReader::end`]
    /// once the answer is stored.
    End,
    /// The stream is broken (garbage, an answer that cannot be assembled): nothing more is
    /// passed on.
    Broken(String),
}

/// Reads one streamed answer as it arrives, and assembles it for storing.
pub trait StreamReader: Send {
    /// Takes the next bytes from the upstream.
    fn feed(&mut self, bytes: &[u8]) -> Vec<StreamItem>;

    /// The whole answer as the protocol stores it and its token usage, once the stream has
    /// ended; `Err` (why) when it must not be stored.
    fn finish(self: Box<Self>) -> Result<(Bytes, Usage), String>;

    /// The event that ends the stream for the client.
    fn end(&self) -> Bytes;

    /// The last event of a stream that broke: an error the client's SDK reports.
    fn error(&self, reason: &str) -> Bytes;
}
