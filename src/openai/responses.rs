//! The Responses API (`POST /v1/responses`) as a [`Protocol`].
//!
//! The prompt is the last user input: a string `input`, or the text parts of the last user
//! message among the input items. Everything else (`instructions`, the other input items, the
//! model, tools, `text.format`, reasoning and the generation parameters) is context. A request
//! that depends on state kept upstream (`previous_response_id`, `conversation`, a stored
//! `prompt` template, `background`) is forwarded as it is, and the reply says why
//! ([`Protocol::bypass_reason`]).
//!
//! Only a `completed` response is stored: failed, incomplete and cancelled ones never are. A
//! hit is the stored response with fresh ids (the response's and its items'), each of which
//! carries the id the upstream gave: a later request naming one (`previous_response_id`, an
//! input item's `id`, `GET /v1/responses/{id}`) reaches the upstream with the upstream's id
//! ([`upstream_id`]), so that a conversation can go on from a hit. `store` is part of the
//! context: a response the upstream did not keep never answers a request that asks it to keep
//! one. A streamed hit
//! replays the events the SDKs read (`response.created`, `response.output_item.added`,
//! `response.output_text.delta`, … , `response.completed`). A streamed miss is relayed event by
//! event and stored from its `response.completed` event, which is held back until the entry is
//! stored.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::Rng;
use serde_json::{json, Map, Value};

use super::request::{fingerprint_in, invalid, model_of, numbers_and_integers, object_of, optional_bool};
use super::sse::Parser;
use crate::cache::{
    CacheInput, Conversation, Invalid, Protocol, Replay, StreamItem, StreamReader, Surface, Usage,
};
use crate::context::Turn;

/// `POST /v1/responses`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Responses;

/// Request fields that do not change the answer, left out of the fingerprint.
const NOT_IN_FINGERPRINT: &[&str] = &[
    "stream",
    "stream_options",
    "user",
    "metadata",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// The fingerprint domain of the Responses API: its contexts never meet another surface's.
const DOMAIN: &str = "semcache/context/responses/v1";

/// A validated `POST /responses` body.
#[derive(Debug, Clone)]
pub struct ResponsesRequest {
    body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// Why the request is forwarded without the cache, when it depends on upstream state.
    stateful: Option<&'static str>,
    /// Whether ids semcache minted for a hit appear (`previous_response_id`, input items'
    /// `id`): the body then goes upstream with the upstream's own ids.
    names_minted_ids: bool,
}

impl ResponsesRequest {
    pub fn parse(bytes: &[u8]) -> Result<Self, Invalid> {
        let body = object_of(bytes)?;
        let model = model_of(&body)?;
        match body.get("input") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(Value::Array(items)) => {
                if let Some(index) = items.iter().position(|item| !item.is_object()) {
                    return Err(invalid(
                        format!("Invalid type for 'input[{index}]': expected an object."),
                        format!("input[{index}]"),
                    ));
                }
            }
            Some(_) => {
                return Err(invalid(
                    "'input' must be a string or an array of input items.",
                    "input",
                ))
            }
        }
        for field in ["instructions", "previous_response_id"] {
            if !matches!(body.get(field), None | Some(Value::Null) | Some(Value::String(_))) {
                return Err(invalid(format!("'{field}' must be a string."), field));
            }
        }
        if !matches!(
            body.get("tools"),
            None | Some(Value::Null) | Some(Value::Array(_))
        ) {
            return Err(invalid("'tools' must be an array.", "tools"));
        }
        for field in ["text", "reasoning", "metadata"] {
            if !matches!(body.get(field), None | Some(Value::Null) | Some(Value::Object(_))) {
                return Err(invalid(format!("'{field}' must be an object."), field));
            }
        }
        numbers_and_integers(
            &body,
            &["temperature", "top_p"],
            &["max_output_tokens", "top_logprobs", "max_tool_calls"],
        )?;
        let stream = optional_bool(&body, "stream")?.unwrap_or(false);
        optional_bool(&body, "store")?;
        optional_bool(&body, "parallel_tool_calls")?;
        let background = optional_bool(&body, "background")?.unwrap_or(false);
        let present = |field: &str| body.get(field).is_some_and(|value| !value.is_null());
        let stateful = if present("previous_response_id") {
            Some("previous_response_id")
        } else if present("conversation") {
            Some("conversation")
        } else if present("prompt") {
            Some("prompt_template")
        } else if background {
            Some("background")
        } else {
            None
        };
        let item_ids = body
            .get("input")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|item| item.get("id"));
        let names_minted_ids = body
            .get("previous_response_id")
            .into_iter()
            .chain(item_ids)
            .filter_map(Value::as_str)
            .any(|id| upstream_id(id).is_some());
        Ok(Self {
            body,
            model,
            stream,
            stateful,
            names_minted_ids,
        })
    }

    /// The input items and the index of the last user message among them, if there is one.
    fn last_user_item(&self) -> Option<(&[Value], usize)> {
        let items = self.body.get("input")?.as_array()?;
        let last_user = items.iter().rposition(is_user_message)?;
        Some((items, last_user))
    }

    /// What the cache keys on, or `None` when the request is forwarded as it is.
    pub fn cache_input(&self) -> Option<CacheInput> {
        if self.stateful.is_some() {
            return None;
        }
        let mut context = self.body.clone();
        for field in NOT_IN_FINGERPRINT {
            context.remove(*field);
        }
        // Left out, the upstream keeps the response: the same as `true`.
        let store = !matches!(context.get("store"), Some(Value::Bool(false)));
        context.insert("store".to_owned(), Value::Bool(store));
        if let Some(Value::Array(items)) = context.get_mut("input") {
            // An item's id names it, and changes with every hit that served it: not its meaning.
            for item in items.iter_mut().filter_map(Value::as_object_mut) {
                item.remove("id");
            }
        }
        let prompt = match context.remove("input")? {
            // A string is one user message: the same context as that message given as an item.
            Value::String(text) => {
                let slot = json!([{"role": "user", "content": null, "semcache_prompt_slot": true}]);
                context.insert("input".to_owned(), slot);
                text
            }
            Value::Array(mut items) => {
                let (_, last_user) = self.last_user_item()?;
                let message = items[last_user].as_object_mut()?;
                if message.get("type").and_then(Value::as_str) == Some("message") {
                    message.remove("type");
                }
                // The prompt's text is compared by meaning; anything else in the message
                // (images, files, audio) stays in the context and must match exactly.
                let mut texts = Vec::new();
                let remaining = match message.remove("content") {
                    Some(Value::String(text)) => {
                        texts.push(text);
                        Value::Null
                    }
                    Some(Value::Array(parts)) => Value::Array(
                        parts
                            .into_iter()
                            .filter_map(|part| match part.get("type").and_then(Value::as_str) {
                                Some("input_text") => match part.get("text") {
                                    Some(Value::String(text)) => {
                                        texts.push(text.clone());
                                        None
                                    }
                                    _ => Some(part),
                                },
                                _ => Some(part),
                            })
                            .collect(),
                    ),
                    other => other.unwrap_or(Value::Null),
                };
                let remaining = match remaining {
                    Value::Array(parts) if parts.is_empty() => Value::Null,
                    remaining => remaining,
                };
                message.insert("content".to_owned(), remaining);
                message.insert("semcache_prompt_slot".to_owned(), Value::Bool(true));
                context.insert("input".to_owned(), Value::Array(items));
                texts.join("\n")
            }
            _ => return None,
        };
        if prompt.trim().is_empty() {
            return None;
        }
        let conversation = self
            .earlier_turns()
            .filter(|turns| !turns.is_empty())
            .map(|turns| Conversation {
                fingerprint: fingerprint_in(DOMAIN, without_earlier_turns(context.clone())),
                turns,
            });
        Some(CacheInput {
            fingerprint: fingerprint_in(DOMAIN, context),
            prompt,
            conversation,
        })
    }

    /// The user and assistant messages before the last user message, oldest first, when all
    /// of them are plain text and the last user message ends the input: what a conversation is
    /// compared by in semantic context mode. `None` otherwise (tool calls and their outputs,
    /// reasoning items, images): such a history is only ever matched exactly.
    fn earlier_turns(&self) -> Option<Vec<Turn>> {
        let (items, last_user) = self.last_user_item()?;
        if last_user + 1 != items.len() {
            return None;
        }
        let mut turns = Vec::new();
        for item in &items[..last_user] {
            if !matches!(item.get("type").and_then(Value::as_str), None | Some("message")) {
                return None;
            }
            let user = match item.get("role").and_then(Value::as_str) {
                Some("system" | "developer") => continue,
                Some("user") => true,
                Some("assistant") => false,
                _ => return None,
            };
            let text = match item.get("content") {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|part| match part.get("type").and_then(Value::as_str) {
                        Some("input_text" | "output_text") => part.get("text").and_then(Value::as_str),
                        _ => None,
                    })
                    .collect::<Option<Vec<&str>>>()?
                    .join("\n"),
                _ => return None,
            };
            turns.push(Turn { user, text });
        }
        Some(turns)
    }
}

/// An input item that is a user message (`type` "message" or left out).
fn is_user_message(item: &Value) -> bool {
    matches!(item.get("type").and_then(Value::as_str), None | Some("message"))
        && item.get("role").and_then(Value::as_str) == Some("user")
}

/// `context` without the user and assistant messages before the prompt's: what a request
/// without those turns would have as its context.
fn without_earlier_turns(mut context: Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::Array(items)) = context.get_mut("input") {
        items.retain(|item| {
            item.get("semcache_prompt_slot").is_some()
                || !matches!(
                    item.get("role").and_then(Value::as_str),
                    Some("user" | "assistant")
                )
        });
    }
    context
}

impl Protocol for Responses {
    type Request = ResponsesRequest;

    fn surface(&self) -> Surface {
        Surface::Responses
    }

    fn parse(&self, body: &[u8]) -> Result<ResponsesRequest, Invalid> {
        ResponsesRequest::parse(body)
    }

    fn cache_input(&self, request: &ResponsesRequest) -> Option<CacheInput> {
        request.cache_input()
    }

    fn bypass_reason(&self, request: &ResponsesRequest) -> Option<&'static str> {
        request.stateful
    }

    fn model<'a>(&self, request: &'a ResponsesRequest) -> &'a str {
        &request.model
    }

    fn streams(&self, request: &ResponsesRequest) -> bool {
        request.stream
    }

    fn upstream_path(&self) -> &'static str {
        "/responses"
    }

    fn upstream_body(&self, request: &ResponsesRequest, body: Bytes) -> Bytes {
        if !request.names_minted_ids {
            return body;
        }
        let mut translated = request.body.clone();
        let upstream = |value: &mut Value| {
            if let Some(original) = value.as_str().and_then(upstream_id) {
                *value = Value::String(original.to_owned());
            }
        };
        if let Some(id) = translated.get_mut("previous_response_id") {
            upstream(id);
        }
        if let Some(Value::Array(items)) = translated.get_mut("input") {
            for id in items.iter_mut().filter_map(|item| item.get_mut("id")) {
                upstream(id);
            }
        }
        Bytes::from(serde_json::to_vec(&translated).expect("a JSON value serialises"))
    }

    /// A streamed response carries its usage in `response.completed`: nothing to ask for.
    fn miss_body(&self, _: &ResponsesRequest, body: Bytes) -> Bytes {
        body
    }

    fn storable(&self, answer: &[u8]) -> Option<Usage> {
        let response: Value = match serde_json::from_slice(answer) {
            Ok(response) => response,
            Err(err) => {
                tracing::warn!(error = %err, "upstream answered 2xx with a body that is not JSON; not stored");
                return None;
            }
        };
        storable_response(&response)
    }

    fn stream_reader(&self, _: &ResponsesRequest) -> Box<dyn StreamReader> {
        Box::new(ResponseStream::default())
    }

    fn replay(&self, request: &ResponsesRequest, answer: &[u8]) -> Replay {
        let mut response: Value = serde_json::from_slice(answer).unwrap_or_else(|_| json!({}));
        refresh(&mut response, &request.body);
        if request.stream {
            Replay::Events(replay_events(&response))
        } else {
            Replay::Body(Bytes::from(
                serde_json::to_vec(&response).expect("a JSON value serialises"),
            ))
        }
    }
}

/// The token usage of a response that may be stored: `completed`, with no error, and some
/// output. A refusal is a complete answer and is stored; a response cut short is not.
fn storable_response(response: &Value) -> Option<Usage> {
    if response.get("object").and_then(Value::as_str) != Some("response")
        || response.get("status").and_then(Value::as_str) != Some("completed")
        || response.get("error").is_some_and(|error| !error.is_null())
        || response
            .get("incomplete_details")
            .is_some_and(|details| !details.is_null())
    {
        return None;
    }
    let output = response.get("output")?.as_array()?;
    let unfinished = |item: &Value| {
        item.get("status")
            .and_then(Value::as_str)
            .is_some_and(|status| status != "completed")
    };
    if output.is_empty() || output.iter().any(unfinished) {
        return None;
    }
    let usage = response.get("usage");
    let tokens = |field: &str| {
        usage
            .and_then(|u| u.get(field))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Some(Usage {
        prompt_tokens: tokens("input_tokens"),
        completion_tokens: tokens("output_tokens"),
    })
}

/// What every id semcache mints starts with, after its kind (`resp`, `msg`, `fc`).
const MINTED: &str = "_semcache";
/// The random part's length, in hex digits.
const MINTED_RANDOM: usize = 32;

/// A fresh id for a served copy of the upstream's `original` (`resp_…`, `msg_…`, `fc_…`): its
/// kind, `_semcache`, 32 random hex digits, `_` and the original, so that the upstream's id can
/// be found again ([`upstream_id`]) and no two hits share an id.
fn minted_id(original: &str) -> Option<String> {
    let (kind, _) = original.split_once('_')?;
    if !is_plain_id(original) || upstream_id(original).is_some() {
        return None;
    }
    let (a, b): (u64, u64) = rand::thread_rng().gen();
    Some(format!("{kind}{MINTED}{a:016x}{b:016x}_{original}"))
}

/// The upstream's id inside an id semcache minted for a hit, or `None` for any other id.
pub fn upstream_id(id: &str) -> Option<&str> {
    let (kind, rest) = id.split_once('_')?;
    let rest = rest.strip_prefix(&MINTED[1..])?;
    let random = rest.get(..MINTED_RANDOM)?;
    let original = rest[MINTED_RANDOM..].strip_prefix('_')?;
    (random.bytes().all(|b| b.is_ascii_hexdigit())
        && is_plain_id(original)
        && original
            .strip_prefix(kind)
            .is_some_and(|tail| tail.starts_with('_')))
    .then_some(original)
}

/// Letters, digits, `_` and `-` only: an id that is safe to put in a path segment.
fn is_plain_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A stored response as this request gets it: fresh ids for it and its items, created now,
/// and the request's own `metadata` and `user`.
fn refresh(response: &mut Value, request: &Map<String, Value>) {
    if let Some(id) = response.get("id").and_then(Value::as_str).and_then(minted_id) {
        response["id"] = json!(id);
    }
    response["created_at"] = json!(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()));
    for field in ["metadata", "user"] {
        if response.get(field).is_some() || request.contains_key(field) {
            let default = if field == "metadata" {
                json!({})
            } else {
                Value::Null
            };
            response[field] = request.get(field).cloned().unwrap_or(default);
        }
    }
    if let Some(items) = response.get_mut("output").and_then(Value::as_array_mut) {
        for item in items {
            if let Some(id) = item.get("id").and_then(Value::as_str).and_then(minted_id) {
                item["id"] = json!(id);
            }
        }
    }
}

/// One event of a Responses stream, framed as the API frames them.
fn event(data: &Value) -> Bytes {
    let kind = data.get("type").and_then(Value::as_str).unwrap_or("message");
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// A stored response as the events of a stream: created and in progress (no output yet), then
/// each output item as it would have arrived (its text or arguments in one delta), then
/// `response.completed` with the whole response.
fn replay_events(response: &Value) -> Vec<Bytes> {
    let mut events = Vec::new();
    let mut push = |mut data: Value| {
        data["sequence_number"] = json!(events.len());
        events.push(event(&data));
    };
    let mut started = response.clone();
    started["status"] = json!("in_progress");
    started["output"] = json!([]);
    started["usage"] = Value::Null;
    push(json!({"type": "response.created", "response": started}));
    push(json!({"type": "response.in_progress", "response": started}));
    let output = response["output"].as_array().cloned().unwrap_or_default();
    for (output_index, item) in output.iter().enumerate() {
        let item_id = item.get("id").cloned().unwrap_or(Value::Null);
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                let mut added = item.clone();
                added["status"] = json!("in_progress");
                added["content"] = json!([]);
                push(
                    json!({"type": "response.output_item.added", "output_index": output_index, "item": added}),
                );
                let parts = item["content"].as_array().cloned().unwrap_or_default();
                for (content_index, part) in parts.iter().enumerate() {
                    let at = |kind: &str| json!({"type": kind, "item_id": item_id, "output_index": output_index, "content_index": content_index});
                    let (field, delta_kind, done_kind) = match part.get("type").and_then(Value::as_str) {
                        Some("refusal") => ("refusal", "response.refusal.delta", "response.refusal.done"),
                        _ => ("text", "response.output_text.delta", "response.output_text.done"),
                    };
                    let mut empty = part.clone();
                    empty[field] = json!("");
                    if let Some(annotations) = empty.get_mut("annotations") {
                        *annotations = json!([]);
                    }
                    let mut added = at("response.content_part.added");
                    added["part"] = empty;
                    push(added);
                    let text = part.get(field).cloned().unwrap_or(json!(""));
                    let mut delta = at(delta_kind);
                    delta["delta"] = text.clone();
                    if field == "text" {
                        delta["logprobs"] = json!([]);
                    }
                    push(delta);
                    let mut done = at(done_kind);
                    done[field] = text;
                    if field == "text" {
                        done["logprobs"] = json!([]);
                    }
                    push(done);
                    let mut part_done = at("response.content_part.done");
                    part_done["part"] = part.clone();
                    push(part_done);
                }
            }
            Some("function_call") => {
                let mut added = item.clone();
                added["status"] = json!("in_progress");
                added["arguments"] = json!("");
                push(
                    json!({"type": "response.output_item.added", "output_index": output_index, "item": added}),
                );
                let arguments = item.get("arguments").cloned().unwrap_or(json!(""));
                push(
                    json!({"type": "response.function_call_arguments.delta", "item_id": item_id,
                            "output_index": output_index, "delta": arguments}),
                );
                push(
                    json!({"type": "response.function_call_arguments.done", "item_id": item_id,
                            "output_index": output_index, "arguments": arguments}),
                );
            }
            _ => push(
                json!({"type": "response.output_item.added", "output_index": output_index, "item": item}),
            ),
        }
        push(json!({"type": "response.output_item.done", "output_index": output_index, "item": item}));
    }
    push(json!({"type": "response.completed", "response": response}));
    events
}

/// One streamed response: its events passed on as they come, the terminal one
/// (`response.completed`, `.failed`, `.incomplete`, or an `error` event) held back as the end,
/// and the completed response kept for storing.
#[derive(Default)]
struct ResponseStream {
    parser: Parser,
    /// The terminal event, framed: what the client gets last.
    end: Option<Bytes>,
    /// The response of `response.completed`.
    completed: Option<Value>,
    /// Why the stream must not be stored, when its terminal event says so.
    failed: Option<String>,
    /// The last `sequence_number` seen, so that an error event follows it.
    sequence: Option<u64>,
}

impl StreamReader for ResponseStream {
    fn feed(&mut self, bytes: &[u8]) -> Vec<StreamItem> {
        let mut items = Vec::new();
        for data in self.parser.feed(bytes) {
            if self.end.is_some() {
                break;
            }
            let Ok(event_data @ Value::Object(_)) = serde_json::from_str::<Value>(&data) else {
                items.push(StreamItem::Broken(format!(
                    "an event is not a JSON object: {data}"
                )));
                break;
            };
            if let Some(sequence) = event_data.get("sequence_number").and_then(Value::as_u64) {
                self.sequence = Some(sequence);
            }
            let kind = event_data.get("type").and_then(Value::as_str).unwrap_or("");
            match kind {
                "response.completed" => {
                    self.completed = event_data.get("response").cloned();
                }
                "response.failed" | "response.incomplete" | "response.cancelled" | "error" => {
                    self.failed = Some(format!("the stream ended with {kind}"));
                }
                _ => {
                    items.push(StreamItem::Event(event(&event_data)));
                    continue;
                }
            }
            self.end = Some(event(&event_data));
            items.push(StreamItem::End);
            break;
        }
        items
    }

    fn finish(self: Box<Self>) -> Result<(Bytes, Usage), String> {
        if let Some(why) = self.failed {
            return Err(why);
        }
        let response = self.completed.ok_or("response.completed carried no response")?;
        let usage = storable_response(&response).ok_or("the response is not complete")?;
        Ok((
            Bytes::from(serde_json::to_vec(&response).expect("a JSON value serialises")),
            usage,
        ))
    }

    fn end(&self) -> Bytes {
        self.end.clone().unwrap_or_default()
    }

    fn error(&self, reason: &str) -> Bytes {
        event(&json!({
            "type": "error",
            "code": "upstream_stream_broken",
            "message": format!("The upstream stream ended early: {reason}"),
            "param": null,
            "sequence_number": self.sequence.map_or(0, |n| n + 1),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<ResponsesRequest, Invalid> {
        ResponsesRequest::parse(&serde_json::to_vec(&body).unwrap())
    }

    fn keyed(body: Value) -> Option<CacheInput> {
        parse(body).unwrap().cache_input()
    }

    #[test]
    fn the_prompt_is_the_last_user_input_and_the_rest_is_context() {
        let text = keyed(json!({"model": "m", "input": "Say hi", "instructions": "Be brief."})).unwrap();
        assert_eq!(text.prompt, "Say hi");
        let items = keyed(json!({"model": "m", "instructions": "Be brief.", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Say hi"}]}]}))
        .unwrap();
        assert_eq!(items.prompt, "Say hi");
        // A string input is one user message: the same context however it is written.
        assert_eq!(items.fingerprint, text.fingerprint);
        let typed = keyed(json!({"model": "m", "instructions": "Be brief.", "input": [
            {"type": "message", "role": "user", "content": "Say hi"}]}))
        .unwrap();
        assert_eq!(typed.fingerprint, text.fingerprint);
        // Streaming, metadata and the user do not change the answer; instructions, tools, the
        // output format and parameters do.
        let streamed = keyed(
            json!({"model": "m", "input": "Say hi", "instructions": "Be brief.",
                                    "stream": true, "user": "u", "metadata": {"a": "b"}}),
        );
        assert_eq!(streamed.unwrap().fingerprint, text.fingerprint);
        for other in [
            json!({"model": "m", "input": "Say hi", "instructions": "Be long."}),
            json!({"model": "m", "input": "Say hi", "instructions": "Be brief.", "temperature": 0}),
            json!({"model": "m", "input": "Say hi", "instructions": "Be brief.",
                   "text": {"format": {"type": "json_object"}}}),
            json!({"model": "m", "input": "Say hi", "instructions": "Be brief.", "reasoning": {"effort": "low"}}),
            json!({"model": "m", "input": "Say hi", "instructions": "Be brief.",
                   "tools": [{"type": "function", "name": "f", "parameters": {}}]}),
            json!({"model": "m2", "input": "Say hi", "instructions": "Be brief."}),
        ] {
            assert_ne!(
                keyed(other.clone()).unwrap().fingerprint,
                text.fingerprint,
                "{other}"
            );
        }
        // An earlier item is context: a different one, a different context.
        let history = |earlier: &str| {
            keyed(json!({"model": "m", "input": [
                {"role": "user", "content": earlier},
                {"role": "assistant", "content": [{"type": "output_text", "text": "OK."}]},
                {"role": "user", "content": "And in French?"}]}))
            .unwrap()
        };
        let (a, b) = (history("Say hi"), history("Say bye"));
        assert_eq!(a.prompt, "And in French?");
        assert_ne!(a.fingerprint, b.fingerprint);
        // In semantic context mode the earlier turns are compared by meaning, apart.
        let (ca, cb) = (a.conversation.unwrap(), b.conversation.unwrap());
        assert_eq!(ca.fingerprint, cb.fingerprint);
        assert_eq!(ca.turns.len(), 2);
        assert_eq!(ca.turns[0].text, "Say hi");
        // An image next to the text stays in the context.
        let image = keyed(json!({"model": "m", "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "Say hi"},
            {"type": "input_image", "image_url": "https://example.com/a.png"}]}]}))
        .unwrap();
        assert_eq!(image.prompt, "Say hi");
        assert_ne!(image.fingerprint, items.fingerprint);
    }

    #[test]
    fn a_completion_chat_and_response_never_share_a_context() {
        let response =
            keyed(json!({"model": "m", "input": [{"role": "user", "content": "Say hi"}]})).unwrap();
        let chat = super::super::ChatRequest::parse(
            &serde_json::to_vec(&json!({"model": "m", "messages": [{"role": "user", "content": "Say hi"}]}))
                .unwrap(),
        )
        .unwrap()
        .cache_input()
        .unwrap();
        assert_eq!(response.prompt, chat.prompt);
        assert_ne!(response.fingerprint, chat.fingerprint);
    }

    #[test]
    fn requests_that_depend_on_upstream_state_are_forwarded_and_say_why() {
        for (body, why) in [
            (
                json!({"model": "m", "input": "And then?", "previous_response_id": "resp_1"}),
                "previous_response_id",
            ),
            (
                json!({"model": "m", "input": "And then?", "conversation": "conv_1"}),
                "conversation",
            ),
            (
                json!({"model": "m", "prompt": {"id": "pmpt_1"}, "input": "x"}),
                "prompt_template",
            ),
            (
                json!({"model": "m", "input": "x", "background": true}),
                "background",
            ),
        ] {
            let request = parse(body.clone()).unwrap();
            assert!(request.cache_input().is_none(), "{body}");
            assert_eq!(Responses.bypass_reason(&request), Some(why), "{body}");
        }
        // Nothing to key on: forwarded, with no state to name.
        for body in [
            json!({"model": "m"}),
            json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}),
            json!({"model": "m", "input": "   "}),
        ] {
            let request = parse(body.clone()).unwrap();
            assert!(request.cache_input().is_none(), "{body}");
            assert_eq!(Responses.bypass_reason(&request), None);
        }
    }

    #[test]
    fn bad_bodies_name_the_parameter() {
        for (body, param) in [
            (json!({"input": "x"}), "model"),
            (json!({"model": "m", "input": 7}), "input"),
            (json!({"model": "m", "input": ["x"]}), "input[0]"),
            (
                json!({"model": "m", "input": "x", "instructions": 1}),
                "instructions",
            ),
            (json!({"model": "m", "input": "x", "stream": "yes"}), "stream"),
            (
                json!({"model": "m", "input": "x", "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"model": "m", "input": "x", "max_output_tokens": 1.5}),
                "max_output_tokens",
            ),
            (json!({"model": "m", "input": "x", "tools": {}}), "tools"),
            (json!({"model": "m", "input": "x", "text": "plain"}), "text"),
            (
                json!({"model": "m", "input": "x", "previous_response_id": 3}),
                "previous_response_id",
            ),
        ] {
            assert_eq!(
                parse(body.clone()).unwrap_err().param.as_deref(),
                Some(param),
                "{body}"
            );
        }
        assert!(ResponsesRequest::parse(b"[1]").unwrap_err().param.is_none());
    }

    fn completed_response() -> Value {
        json!({"id": "resp_up", "object": "response", "created_at": 1, "status": "completed", "error": null,
               "incomplete_details": null, "model": "m", "metadata": {},
               "output": [
                   {"type": "message", "id": "msg_up", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hello there", "annotations": []}]},
                   {"type": "function_call", "id": "fc_up", "call_id": "call_1", "name": "wave",
                    "arguments": "{\"times\":2}", "status": "completed"}],
               "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}})
    }

    #[test]
    fn only_completed_responses_are_stored() {
        let bytes = |v: &Value| serde_json::to_vec(v).unwrap();
        let usage = Responses.storable(&bytes(&completed_response())).unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (7, 3));
        for (field, value) in [
            ("status", json!("incomplete")),
            ("status", json!("failed")),
            ("incomplete_details", json!({"reason": "max_output_tokens"})),
            ("error", json!({"code": "server_error", "message": "x"})),
            ("output", json!([])),
        ] {
            let mut response = completed_response();
            response[field] = value;
            assert!(Responses.storable(&bytes(&response)).is_none(), "{field}");
        }
        let mut unfinished = completed_response();
        unfinished["output"][0]["status"] = json!("incomplete");
        assert!(Responses.storable(&bytes(&unfinished)).is_none());
        assert!(Responses.storable(b"oops").is_none());
    }

    #[test]
    fn a_hit_gets_fresh_ids_and_the_requests_metadata() {
        let request = parse(json!({"model": "m", "input": "Say hi", "metadata": {"trace": "t1"}})).unwrap();
        let answer = serde_json::to_vec(&completed_response()).unwrap();
        let Replay::Body(body) = Responses.replay(&request, &answer) else {
            panic!("a request that does not stream replays as a body");
        };
        let replayed: Value = serde_json::from_slice(&body).unwrap();
        let id = replayed["id"].as_str().unwrap();
        assert!(id.starts_with("resp_") && id != "resp_up", "{id}");
        assert!(replayed["output"][0]["id"].as_str().unwrap().starts_with("msg_"));
        assert_ne!(replayed["output"][0]["id"], "msg_up");
        assert!(replayed["output"][1]["id"].as_str().unwrap().starts_with("fc_"));
        assert_eq!(replayed["output"][1]["call_id"], "call_1");
        assert_eq!(replayed["metadata"], json!({"trace": "t1"}));
        assert_eq!(
            replayed["output"][0]["content"],
            completed_response()["output"][0]["content"]
        );
        let again = Responses.replay(&request, &answer);
        let Replay::Body(again) = again else { panic!() };
        let again: Value = serde_json::from_slice(&again).unwrap();
        assert_ne!(again["id"], replayed["id"]);
    }

    #[test]
    fn a_conversation_goes_on_from_a_hit_with_the_upstreams_ids() {
        let request = parse(json!({"model": "m", "input": "Say hi"})).unwrap();
        let answer = serde_json::to_vec(&completed_response()).unwrap();
        let Replay::Body(body) = Responses.replay(&request, &answer) else {
            panic!()
        };
        let replayed: Value = serde_json::from_slice(&body).unwrap();
        let minted = replayed["id"].as_str().unwrap();
        assert_eq!(upstream_id(minted), Some("resp_up"), "{minted}");
        let message = replayed["output"][0]["id"].as_str().unwrap();
        assert_eq!(upstream_id(message), Some("msg_up"), "{message}");
        // Ids semcache did not mint, or that would leave a path segment, are left alone.
        for id in [
            "resp_up",
            "resp_semcache_resp_up",
            "resp_semcache0123456789abcdef0123456789abcdef_msg_up",
            "resp_semcache0123456789abcdef0123456789abcdef_resp_..%2f",
            "resp_semcache0123456789abcdefg123456789abcdef_resp_up",
        ] {
            assert_eq!(upstream_id(id), None, "{id}");
        }

        let follow_up = json!({"model": "m", "input": [
            {"id": message, "type": "message", "role": "assistant", "content": "hi"},
            {"role": "user", "content": "And then?"}
        ], "previous_response_id": minted});
        let bytes = Bytes::from(follow_up.to_string());
        let request = ResponsesRequest::parse(&bytes).unwrap();
        let sent: Value = serde_json::from_slice(&Responses.upstream_body(&request, bytes)).unwrap();
        assert_eq!(sent["previous_response_id"], "resp_up");
        assert_eq!(sent["input"][0]["id"], "msg_up");
        assert_eq!(sent["input"][1], follow_up["input"][1]);
        // A body naming nothing semcache minted goes as the client sent it, byte for byte.
        let plain = Bytes::from_static(br#"{"model":"m",  "input":"x","previous_response_id":"resp_up"}"#);
        let request = ResponsesRequest::parse(&plain).unwrap();
        assert_eq!(Responses.upstream_body(&request, plain.clone()), plain);
    }

    #[test]
    fn whether_the_upstream_keeps_the_response_is_context_and_item_ids_are_not() {
        let fingerprint = |body: Value| keyed(body).unwrap().fingerprint;
        let kept = fingerprint(json!({"model": "m", "input": "Say hi"}));
        assert_eq!(
            kept,
            fingerprint(json!({"model": "m", "input": "Say hi", "store": true}))
        );
        assert_ne!(
            kept,
            fingerprint(json!({"model": "m", "input": "Say hi", "store": false}))
        );
        let history = |id: &str| {
            json!({"model": "m", "input": [
                {"id": id, "type": "message", "role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Say hi"}
            ]})
        };
        assert_eq!(fingerprint(history("msg_a")), fingerprint(history("msg_b")));
    }

    /// The events a stream of `response` carries, as the upstream sends them.
    fn wire(response: &Value) -> String {
        replay_events(response)
            .iter()
            .map(|event| String::from_utf8(event.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn a_stream_is_relayed_stored_from_its_completed_event_and_replayed_as_it_came() {
        let request = parse(json!({"model": "m", "input": "Say hi", "stream": true})).unwrap();
        let mut reader = Responses.stream_reader(&request);
        let upstream = wire(&completed_response());
        // Fed in two pieces, split inside an event.
        let (a, b) = upstream.split_at(upstream.len() / 2);
        let mut items = reader.feed(a.as_bytes());
        items.extend(reader.feed(b.as_bytes()));
        assert_eq!(items.last(), Some(&StreamItem::End));
        let relayed: Vec<Value> = items
            .iter()
            .filter_map(|item| match item {
                StreamItem::Event(bytes) => Parser::default().feed(bytes).pop(),
                _ => None,
            })
            .map(|data| serde_json::from_str(&data).unwrap())
            .collect();
        let kinds: Vec<&str> = relayed.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(kinds.first(), Some(&"response.created"));
        assert!(!kinds.contains(&"response.completed"), "held back as the end");
        let end = String::from_utf8(reader.end().to_vec()).unwrap();
        assert!(end.starts_with("event: response.completed\n"), "{end}");
        let (answer, usage) = reader.finish().unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (7, 3));
        let stored: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(stored, completed_response());

        // Replayed: the same sequence of event kinds, numbered from 0, with the same text and
        // arguments, and fresh ids throughout.
        let Replay::Events(events) = Responses.replay(&request, &answer) else {
            panic!("a streamed request replays as events");
        };
        let mut parser = Parser::default();
        let replayed: Vec<Value> = events
            .iter()
            .flat_map(|e| parser.feed(e))
            .map(|d| serde_json::from_str(&d).unwrap())
            .collect();
        let replayed_kinds: Vec<&str> = replayed.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(&replayed_kinds[..replayed_kinds.len() - 1], kinds.as_slice());
        assert_eq!(replayed_kinds.last(), Some(&"response.completed"));
        for (n, event) in replayed.iter().enumerate() {
            assert_eq!(event["sequence_number"], n, "{event}");
        }
        let text: String = replayed
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .map(|e| e["delta"].as_str().unwrap())
            .collect();
        assert_eq!(text, "Hello there");
        let completed = &replayed.last().unwrap()["response"];
        assert_ne!(completed["id"], "resp_up");
        assert_eq!(replayed[0]["response"]["id"], completed["id"]);
        assert_eq!(completed["output"][1]["arguments"], "{\"times\":2}");
        let delta_item = replayed
            .iter()
            .find(|e| e["type"] == "response.output_text.delta")
            .unwrap();
        assert_eq!(delta_item["item_id"], completed["output"][0]["id"]);
    }

    #[test]
    fn failed_incomplete_and_broken_streams_are_passed_on_and_not_stored() {
        let request = parse(json!({"model": "m", "input": "Say hi", "stream": true})).unwrap();
        for (kind, status) in [
            ("response.failed", "failed"),
            ("response.incomplete", "incomplete"),
        ] {
            let mut response = completed_response();
            response["status"] = json!(status);
            let mut reader = Responses.stream_reader(&request);
            let created =
                event(&json!({"type": "response.created", "sequence_number": 0, "response": response}));
            let last = event(&json!({"type": kind, "sequence_number": 1, "response": response}));
            let mut items = reader.feed(&created);
            items.extend(reader.feed(&last));
            assert!(
                matches!(items.as_slice(), [StreamItem::Event(_), StreamItem::End]),
                "{kind}"
            );
            assert_eq!(reader.end(), last, "the client gets the upstream's last event");
            assert!(reader.finish().is_err(), "{kind}");
        }
        // A completed event whose response is not complete is not stored either.
        let mut response = completed_response();
        response["incomplete_details"] = json!({"reason": "max_output_tokens"});
        let mut reader = Responses.stream_reader(&request);
        reader.feed(&event(
            &json!({"type": "response.completed", "sequence_number": 4, "response": response}),
        ));
        assert!(reader.finish().is_err());

        let mut garbled = Responses.stream_reader(&request);
        garbled.feed(&event(
            &json!({"type": "response.created", "sequence_number": 0, "response": {}}),
        ));
        let items = garbled.feed(b"event: response.output_text.delta\ndata: {oops\n\n");
        assert!(matches!(items.as_slice(), [StreamItem::Broken(_)]));
        let error = String::from_utf8(garbled.error("garbage").to_vec()).unwrap();
        assert!(error.starts_with("event: error\n"), "{error}");
        let data: Value = serde_json::from_str(&Parser::default().feed(error.as_bytes())[0]).unwrap();
        assert_eq!(data["sequence_number"], 1);
        assert_eq!(data["code"], "upstream_stream_broken");
    }
}
