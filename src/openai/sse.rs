//! Server-sent events of streamed chat completions: parsing the upstream's stream, assembling
//! it into one `chat.completion`, and replaying a stored completion as a stream.

use bytes::Bytes;
use serde_json::{json, Map, Value};

/// Splits a byte stream into SSE events and yields each event's `data`.
#[derive(Debug, Default)]
pub struct Parser {
    buffer: Vec<u8>,
}

impl Parser {
    /// Feeds bytes; returns the data of every event completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((end, separator_len)) = find_event_end(&self.buffer) {
            let raw: Vec<u8> = self.buffer.drain(..end + separator_len).take(end).collect();
            let text = String::from_utf8_lossy(&raw);
            let mut data: Option<String> = None;
            for line in text.split('\n') {
                let line = line.strip_suffix('\r').unwrap_or(line);
                if let Some(value) = line.strip_prefix("data:") {
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match &mut data {
                        Some(data) => {
                            data.push('\n');
                            data.push_str(value);
                        }
                        None => data = Some(value.to_owned()),
                    }
                }
            }
            events.extend(data);
        }
        events
    }

    /// Whether bytes of an unfinished event are left over.
    pub fn has_partial(&self) -> bool {
        self.buffer.iter().any(|b| !b.is_ascii_whitespace())
    }
}

fn find_event_end(buffer: &[u8]) -> Option<(usize, usize)> {
    (0..buffer.len()).find_map(|i| {
        if buffer[i..].starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else if buffer[i..].starts_with(b"\n\n") {
            Some((i, 2))
        } else {
            None
        }
    })
}

/// One SSE event carrying `data`.
pub fn event(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

pub const DONE: &str = "[DONE]";

/// Why an assembled stream cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incomplete {
    #[error("a chunk is not a JSON object: {0}")]
    BadChunk(String),
    #[error("the stream carried no choices")]
    NoChoices,
    #[error("choice {0} has no finish_reason")]
    Unfinished(u64),
}

#[derive(Debug, Default)]
struct ChoiceState {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Vec<Map<String, Value>>,
    finish_reason: Option<Value>,
    logprobs: Option<Value>,
}

/// Rebuilds a `chat.completion` from the chunks of a stream.
#[derive(Debug, Default)]
pub struct Assembler {
    id: Option<Value>,
    model: Option<Value>,
    created: Option<Value>,
    system_fingerprint: Option<Value>,
    choices: Vec<(u64, ChoiceState)>,
    usage: Option<Value>,
    error: Option<Incomplete>,
}

impl Assembler {
    /// Why the stream can no longer be assembled, once a chunk was not JSON.
    pub fn broken(&self) -> Option<&Incomplete> {
        self.error
            .as_ref()
            .filter(|e| matches!(e, Incomplete::BadChunk(_)))
    }

    /// Takes one chunk's JSON. Returns whether it is only a usage report (no choices), which
    /// clients that did not ask for usage should not see.
    pub fn push(&mut self, data: &str) -> bool {
        let chunk: Map<String, Value> = match serde_json::from_str(data) {
            Ok(Value::Object(chunk)) => chunk,
            _ => {
                self.error
                    .get_or_insert(Incomplete::BadChunk(data.chars().take(80).collect()));
                return false;
            }
        };
        for (field, slot) in [
            ("id", &mut self.id),
            ("model", &mut self.model),
            ("created", &mut self.created),
            ("system_fingerprint", &mut self.system_fingerprint),
        ] {
            if let Some(value) = chunk.get(field).filter(|v| !v.is_null()) {
                slot.get_or_insert_with(|| value.clone());
            }
        }
        if let Some(usage) = chunk.get("usage").filter(|v| !v.is_null()) {
            self.usage = Some(usage.clone());
        }
        let choices = chunk.get("choices").and_then(Value::as_array);
        for choice in choices.into_iter().flatten() {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let state = self.choice(index);
            if let Some(delta) = choice.get("delta") {
                if let Some(role) = delta.get("role").and_then(Value::as_str) {
                    state.role = Some(role.to_owned());
                }
                if let Some(text) = delta.get("content").and_then(Value::as_str) {
                    state.content.get_or_insert_with(String::new).push_str(text);
                }
                if let Some(text) = delta.get("refusal").and_then(Value::as_str) {
                    state.refusal.get_or_insert_with(String::new).push_str(text);
                }
                for call in delta
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    merge_tool_call(&mut state.tool_calls, call);
                }
            }
            if let Some(reason) = choice.get("finish_reason").filter(|v| !v.is_null()) {
                state.finish_reason = Some(reason.clone());
            }
            if let Some(logprobs) = choice.get("logprobs").filter(|v| !v.is_null()) {
                merge_logprobs(&mut state.logprobs, logprobs);
            }
        }
        choices.is_none_or(Vec::is_empty) && chunk.contains_key("usage")
    }

    fn choice(&mut self, index: u64) -> &mut ChoiceState {
        let position = match self.choices.iter().position(|(i, _)| *i == index) {
            Some(position) => position,
            None => {
                self.choices.push((index, ChoiceState::default()));
                self.choices.len() - 1
            }
        };
        &mut self.choices[position].1
    }

    /// The whole completion, once every choice has finished.
    pub fn finish(mut self) -> Result<Value, Incomplete> {
        if let Some(error) = self.error {
            return Err(error);
        }
        if self.choices.is_empty() {
            return Err(Incomplete::NoChoices);
        }
        self.choices.sort_by_key(|(index, _)| *index);
        let mut choices = Vec::new();
        for (index, state) in self.choices {
            let finish_reason = state.finish_reason.ok_or(Incomplete::Unfinished(index))?;
            let mut message = Map::new();
            message.insert(
                "role".into(),
                json!(state.role.unwrap_or_else(|| "assistant".into())),
            );
            message.insert("content".into(), state.content.map_or(Value::Null, Value::String));
            if let Some(refusal) = state.refusal {
                message.insert("refusal".into(), Value::String(refusal));
            }
            if !state.tool_calls.is_empty() {
                // In stream order of their `index`, which a whole message has no field for.
                let mut calls = state.tool_calls;
                calls.sort_by_key(|call| call.get("index").and_then(Value::as_u64));
                for call in &mut calls {
                    call.remove("index");
                }
                message.insert(
                    "tool_calls".into(),
                    Value::Array(calls.into_iter().map(Value::Object).collect()),
                );
            }
            choices.push(json!({
                "index": index,
                "message": message,
                "logprobs": state.logprobs.unwrap_or(Value::Null),
                "finish_reason": finish_reason,
            }));
        }
        let mut completion = json!({
            "id": self.id.unwrap_or_else(|| json!("chatcmpl-semcache")),
            "object": "chat.completion",
            "created": self.created.unwrap_or_else(|| json!(0)),
            "model": self.model.unwrap_or(Value::Null),
            "choices": choices,
        });
        if let Some(fingerprint) = self.system_fingerprint {
            completion["system_fingerprint"] = fingerprint;
        }
        if let Some(usage) = self.usage {
            completion["usage"] = usage;
        }
        Ok(completion)
    }
}

/// Tool-call deltas arrive in pieces keyed by `index`; names and arguments are concatenated.
fn merge_tool_call(calls: &mut Vec<Map<String, Value>>, delta: &Value) {
    let index = delta.get("index").and_then(Value::as_u64).unwrap_or(0);
    let position = calls
        .iter()
        .position(|call| call.get("index").and_then(Value::as_u64) == Some(index));
    let call = match position {
        Some(position) => &mut calls[position],
        None => {
            let mut call = Map::new();
            call.insert("index".into(), json!(index));
            calls.push(call);
            calls.last_mut().expect("just pushed")
        }
    };
    for field in ["id", "type"] {
        if let Some(value) = delta.get(field).filter(|v| !v.is_null()) {
            call.insert(field.into(), value.clone());
        }
    }
    if let Some(function) = delta.get("function").and_then(Value::as_object) {
        let target = call
            .entry("function")
            .or_insert_with(|| json!({"name": "", "arguments": ""}));
        for field in ["name", "arguments"] {
            if let Some(piece) = function.get(field).and_then(Value::as_str) {
                let joined = format!("{}{piece}", target[field].as_str().unwrap_or(""));
                target[field] = Value::String(joined);
            }
        }
    }
}

fn merge_logprobs(target: &mut Option<Value>, delta: &Value) {
    let target = target.get_or_insert_with(|| json!({"content": []}));
    for field in ["content", "refusal"] {
        if let Some(items) = delta.get(field).and_then(Value::as_array) {
            let list = target
                .as_object_mut()
                .expect("logprobs is an object")
                .entry(field)
                .or_insert_with(|| json!([]));
            if let Some(list) = list.as_array_mut() {
                list.extend(items.iter().cloned());
            }
        }
    }
}

/// Replays a stored `chat.completion` as the chunks a streaming upstream would have sent, ending
/// with `data: [DONE]`.
pub fn replay(completion: &Value, include_usage: bool) -> Vec<Bytes> {
    let header = |choices: Value| {
        let mut chunk = json!({
            "id": completion["id"],
            "object": "chat.completion.chunk",
            "created": completion["created"],
            "model": completion["model"],
            "choices": choices,
        });
        if let Some(fingerprint) = completion.get("system_fingerprint") {
            chunk["system_fingerprint"] = fingerprint.clone();
        }
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    };
    let mut events = Vec::new();
    for choice in completion["choices"].as_array().into_iter().flatten() {
        let index = &choice["index"];
        let message = &choice["message"];
        let mut delta = json!({"role": message.get("role").cloned().unwrap_or(json!("assistant"))});
        if let Some(content) = message.get("content").and_then(Value::as_str) {
            delta["content"] = json!(content);
        }
        if let Some(refusal) = message.get("refusal").filter(|v| !v.is_null()) {
            delta["refusal"] = refusal.clone();
        }
        if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(i, call)| {
                    let mut call = call.clone();
                    call["index"] = json!(i);
                    call
                })
                .collect();
            delta["tool_calls"] = Value::Array(calls);
        }
        let logprobs = choice.get("logprobs").cloned().unwrap_or(Value::Null);
        events.push(header(
            json!([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": null}]),
        ));
        events.push(header(json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": choice["finish_reason"]}])));
    }
    if include_usage {
        let mut usage_chunk = header(json!([]));
        usage_chunk["usage"] = completion.get("usage").cloned().unwrap_or(Value::Null);
        events.push(usage_chunk);
    }
    let mut bytes: Vec<Bytes> = events.iter().map(|chunk| event(&chunk.to_string())).collect();
    bytes.push(event(DONE));
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_handles_split_events_crlf_and_comments() {
        let mut parser = Parser::default();
        assert!(parser.feed(b"data: {\"a\"").is_empty());
        assert!(parser.has_partial());
        assert_eq!(
            parser.feed(b":1}\n\n: keep-alive\n\ndata: x\r\n\r\ndata: [DONE]\n\n"),
            vec!["{\"a\":1}", "x", "[DONE]"]
        );
        assert!(!parser.has_partial());
    }

    #[test]
    fn assembler_rebuilds_content_tool_calls_and_usage() {
        let mut assembler = Assembler::default();
        let chunks = [
            r#"{"id":"c1","created":5,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"content":"lo","tool_calls":[{"index":0,"id":"t","type":"function","function":{"name":"f","arguments":"{\"a\""}}]}}]}"#,
            r#"{"id":"c1","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]},"finish_reason":"stop"}]}"#,
        ];
        for chunk in chunks {
            assert!(!assembler.push(chunk));
        }
        assert!(assembler.push(
            r#"{"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#
        ));
        let completion = assembler.finish().unwrap();
        assert_eq!(completion["choices"][0]["message"]["content"], "Hello");
        assert_eq!(
            completion["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(completion["choices"][0]["finish_reason"], "stop");
        assert_eq!(completion["usage"]["total_tokens"], 5);
        assert_eq!(completion["object"], "chat.completion");
    }

    #[test]
    fn unfinished_or_garbled_streams_are_incomplete() {
        let mut unfinished = Assembler::default();
        unfinished.push(r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#);
        assert_eq!(unfinished.finish(), Err(Incomplete::Unfinished(0)));
        let mut garbled = Assembler::default();
        garbled.push("not json");
        assert!(matches!(garbled.finish(), Err(Incomplete::BadChunk(_))));
        assert_eq!(Assembler::default().finish(), Err(Incomplete::NoChoices));
    }

    #[test]
    fn replay_round_trips_through_the_assembler() {
        let completion = json!({
            "id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        });
        let mut parser = Parser::default();
        let mut assembler = Assembler::default();
        let events: Vec<String> = replay(&completion, true)
            .iter()
            .flat_map(|b| parser.feed(b))
            .collect();
        assert_eq!(events.last().map(String::as_str), Some(DONE));
        for data in &events[..events.len() - 1] {
            assembler.push(data);
        }
        let rebuilt = assembler.finish().unwrap();
        assert_eq!(rebuilt["choices"], completion["choices"]);
        assert_eq!(rebuilt["usage"], completion["usage"]);
    }
}
