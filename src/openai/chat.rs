//! Chat completions as a [`Protocol`]: the first surface the caching core serves.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::Rng;
use serde_json::{json, Value};

use super::request::ChatRequest;
use super::sse::{self, Assembler, Parser};
use crate::cache::{CacheInput, Invalid, Protocol, Replay, StreamItem, StreamReader, Surface, Usage};

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChatCompletions;

impl Protocol for ChatCompletions {
    type Request = ChatRequest;

    fn surface(&self) -> Surface {
        Surface::ChatCompletions
    }

    fn parse(&self, body: &[u8]) -> Result<ChatRequest, Invalid> {
        ChatRequest::parse(body)
    }

    /// Answers with several choices are not stored, so they are not looked up either.
    fn cache_input(&self, request: &ChatRequest) -> Option<CacheInput> {
        (request.n == 1).then(|| request.cache_input()).flatten()
    }

    fn model<'a>(&self, request: &'a ChatRequest) -> &'a str {
        &request.model
    }

    fn streams(&self, request: &ChatRequest) -> bool {
        request.stream
    }

    fn upstream_path(&self) -> &'static str {
        "/chat/completions"
    }

    /// A stream asks for the final usage chunk, so that the entry knows its token counts; the
    /// reader drops that chunk again unless the client asked for it.
    fn miss_body(&self, request: &ChatRequest, body: Bytes) -> Bytes {
        if request.stream {
            Bytes::from(request.body_with_usage())
        } else {
            body
        }
    }

    fn storable(&self, answer: &[u8]) -> Option<Usage> {
        storable_choices(answer)
    }

    fn stream_reader(&self, request: &ChatRequest) -> Box<dyn StreamReader> {
        Box::new(ChatStream {
            parser: Parser::default(),
            assembler: Assembler::default(),
            include_usage: request.include_usage,
        })
    }

    /// A fresh completion: new `id` and `created`, the stored choices and usage.
    fn replay(&self, request: &ChatRequest, answer: &[u8]) -> Replay {
        let mut completion: Value = serde_json::from_slice(answer).unwrap_or_else(|_| json!({}));
        let id: u64 = rand::thread_rng().gen();
        completion["id"] = json!(format!("chatcmpl-semcache-{id:016x}"));
        completion["created"] = json!(SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()));
        if request.stream {
            Replay::Events(sse::replay(&completion, request.include_usage))
        } else {
            Replay::Body(Bytes::from(
                serde_json::to_vec(&completion).expect("a JSON value serialises"),
            ))
        }
    }
}

/// One streamed chat completion: SSE events in, the same events out (less the usage chunk
/// the client did not ask for), assembled into one `chat.completion` at the end.
struct ChatStream {
    parser: Parser,
    assembler: Assembler,
    include_usage: bool,
}

impl StreamReader for ChatStream {
    fn feed(&mut self, bytes: &[u8]) -> Vec<StreamItem> {
        let mut items = Vec::new();
        for data in self.parser.feed(bytes) {
            if data == sse::DONE {
                items.push(StreamItem::End);
                break;
            }
            let usage_only = self.assembler.push(&data);
            if let Some(broken) = self.assembler.broken() {
                // Garbage is not passed on: the client's SDK would fail on it anyway.
                items.push(StreamItem::Broken(broken.to_string()));
                break;
            }
            if self.include_usage || !usage_only {
                items.push(StreamItem::Event(sse::event(&data)));
            }
        }
        items
    }

    fn finish(self: Box<Self>) -> Result<(Bytes, Usage), String> {
        let completion = self
            .assembler
            .finish()
            .map_err(|incomplete| incomplete.to_string())?;
        let answer = Bytes::from(serde_json::to_vec(&completion).expect("a JSON value serialises"));
        let usage = ChatCompletions
            .storable(&answer)
            .ok_or("a choice is unfinished or filtered")?;
        Ok((answer, usage))
    }

    fn end(&self) -> Bytes {
        sse::event(sse::DONE)
    }

    fn error(&self, reason: &str) -> Bytes {
        stream_error(reason)
    }
}

/// Whether an answer may be stored, and its token usage: every choice finished, and not by
/// the content filter (chat and legacy completions alike).
pub(super) fn storable_choices(answer: &[u8]) -> Option<Usage> {
    let completion: Value = match serde_json::from_slice(answer) {
        Ok(completion) => completion,
        Err(err) => {
            tracing::warn!(error = %err, "upstream answered 2xx with a body that is not JSON; not stored");
            return None;
        }
    };
    let choices = completion.get("choices")?.as_array()?;
    if choices.is_empty() {
        return None;
    }
    let all_finished = choices.iter().all(|choice| {
        matches!(choice.get("finish_reason").and_then(Value::as_str), Some(reason) if reason != "content_filter")
    });
    if !all_finished {
        return None;
    }
    let usage = completion.get("usage");
    let tokens = |field: &str| {
        usage
            .and_then(|u| u.get(field))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Some(Usage {
        prompt_tokens: tokens("prompt_tokens"),
        completion_tokens: tokens("completion_tokens"),
    })
}

/// The last event of a stream that broke, as OpenAI's SDKs report an error.
pub(super) fn stream_error(reason: &str) -> Bytes {
    let body = json!({"error": {
        "message": format!("The upstream stream ended early: {reason}"),
        "type": "upstream_error",
        "param": null,
        "code": "upstream_stream_broken",
    }});
    sse::event(&body.to_string())
}
