//! Legacy completions (`POST /v1/completions`) as a [`Protocol`]: a text prompt, matched by
//! meaning like a chat's last message, its answers replayed as that endpoint's JSON and SSE.
//!
//! Only a request for one answer to one text is cached: a prompt that is a string (or an array
//! holding one string), `n` and `best_of` at most 1, no `echo` (an echoed answer repeats the
//! prompt word for word, which a hit by meaning would get wrong). Anything else is forwarded
//! as it is. Every other field is part of the context, and the context of a completion never
//! meets a chat's: an answer is served only on the surface that stored it.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::Rng;
use serde_json::{json, Map, Value};

use super::chat::{storable_choices, stream_error};
use super::request::{
    fingerprint_in, invalid, model_of, numbers_and_integers, object_of, optional_bool, stop_of,
    stream_options, with_usage, NOT_IN_FINGERPRINT,
};
use super::sse::{self, Parser};
use crate::cache::{CacheInput, Invalid, Protocol, Replay, StreamItem, StreamReader, Surface, Usage};

/// `POST /v1/completions`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Completions;

/// A validated `POST /completions` body.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// Whether the client asked for a final usage chunk when streaming.
    pub include_usage: bool,
    /// The prompt, when it is one text.
    prompt: Option<String>,
    /// One answer asked for (`n` and `best_of` at most 1), and not one that echoes the prompt.
    single: bool,
}

impl CompletionRequest {
    pub fn parse(bytes: &[u8]) -> Result<Self, Invalid> {
        let body = object_of(bytes)?;
        let model = model_of(&body)?;
        let prompt = prompt_of(body.get("prompt"))?;
        let stream = optional_bool(&body, "stream")?.unwrap_or(false);
        let include_usage = stream_options(&body)?;
        let count = |field: &str| match body.get(field) {
            None | Some(Value::Null) => Ok(1),
            Some(value) => match value.as_u64() {
                Some(n) if n >= 1 => Ok(n),
                _ => Err(invalid(
                    format!("'{field}' must be an integer of at least 1."),
                    field,
                )),
            },
        };
        let (n, best_of) = (count("n")?, count("best_of")?);
        let echo = optional_bool(&body, "echo")?.unwrap_or(false);
        numbers_and_integers(
            &body,
            &["temperature", "top_p", "presence_penalty", "frequency_penalty"],
            &["max_tokens", "seed", "logprobs"],
        )?;
        stop_of(&body)?;
        if !matches!(
            body.get("suffix"),
            None | Some(Value::Null) | Some(Value::String(_))
        ) {
            return Err(invalid("'suffix' must be a string.", "suffix"));
        }
        if !matches!(
            body.get("logit_bias"),
            None | Some(Value::Null) | Some(Value::Object(_))
        ) {
            return Err(invalid("'logit_bias' must be an object.", "logit_bias"));
        }
        Ok(Self {
            body,
            model,
            stream,
            include_usage,
            prompt,
            single: n == 1 && best_of == 1 && !echo,
        })
    }

    /// What the cache keys on, or `None` when the request is forwarded as it is.
    pub fn cache_input(&self) -> Option<CacheInput> {
        if !self.single {
            return None;
        }
        let prompt = self.prompt.clone()?;
        let mut context = self.body.clone();
        for field in NOT_IN_FINGERPRINT.iter().chain(&["prompt"]) {
            context.remove(*field);
        }
        Some(CacheInput {
            fingerprint: fingerprint_in("semcache/context/completions/v1", context),
            prompt,
            conversation: None,
        })
    }
}

/// The prompt's text when it is one: a string, or an array holding one string. A prompt of
/// several texts or of token ids is valid, and is not cached.
fn prompt_of(prompt: Option<&Value>) -> Result<Option<String>, Invalid> {
    let wrong = || {
        invalid(
            "'prompt' must be a string, an array of strings, an array of token ids or an array of arrays of token ids.",
            "prompt",
        )
    };
    let is_tokens = |v: &Value| v.as_array().is_some_and(|ids| ids.iter().all(Value::is_u64));
    match prompt {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => match items.as_slice() {
            [Value::String(text)] => Ok(Some(text.clone())),
            _ => Ok(None),
        },
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) || items.iter().all(is_tokens) => {
            Ok(None)
        }
        Some(_) => Err(wrong()),
    }
}

impl Protocol for Completions {
    type Request = CompletionRequest;

    fn surface(&self) -> Surface {
        Surface::Completions
    }

    fn parse(&self, body: &[u8]) -> Result<CompletionRequest, Invalid> {
        CompletionRequest::parse(body)
    }

    fn cache_input(&self, request: &CompletionRequest) -> Option<CacheInput> {
        request.cache_input()
    }

    fn model<'a>(&self, request: &'a CompletionRequest) -> &'a str {
        &request.model
    }

    fn streams(&self, request: &CompletionRequest) -> bool {
        request.stream
    }

    fn upstream_path(&self) -> &'static str {
        "/completions"
    }

    /// A stream asks for the final usage chunk, as chat's does.
    fn miss_body(&self, request: &CompletionRequest, body: Bytes) -> Bytes {
        if request.stream {
            Bytes::from(with_usage(&request.body))
        } else {
            body
        }
    }

    fn storable(&self, answer: &[u8]) -> Option<Usage> {
        storable_choices(answer)
    }

    fn stream_reader(&self, request: &CompletionRequest) -> Box<dyn StreamReader> {
        Box::new(CompletionStream {
            parser: Parser::default(),
            include_usage: request.include_usage,
            head: Map::new(),
            choices: BTreeMap::new(),
            usage: None,
            unassembled: None,
        })
    }

    /// A fresh completion: new `id` and `created`, the stored choices and usage.
    fn replay(&self, request: &CompletionRequest, answer: &[u8]) -> Replay {
        let mut completion: Value = serde_json::from_slice(answer).unwrap_or_else(|_| json!({}));
        let id: u64 = rand::thread_rng().gen();
        completion["id"] = json!(format!("cmpl-semcache-{id:016x}"));
        completion["created"] = json!(SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()));
        if request.stream {
            Replay::Events(replay_events(&completion, request.include_usage))
        } else {
            Replay::Body(Bytes::from(
                serde_json::to_vec(&completion).expect("a JSON value serialises"),
            ))
        }
    }
}

/// A stored completion as the chunks of a stream: each choice's text, then its finish reason,
/// then the usage when the client asked for it.
fn replay_events(completion: &Value, include_usage: bool) -> Vec<Bytes> {
    let chunk = |choice: Value| {
        let mut chunk = json!({
            "id": completion["id"],
            "object": "text_completion",
            "created": completion["created"],
            "model": completion["model"],
            "choices": [choice],
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
        events.push(chunk(
            json!({"text": choice["text"], "index": index, "logprobs": null, "finish_reason": null}),
        ));
        events.push(chunk(
            json!({"text": "", "index": index, "logprobs": null, "finish_reason": choice["finish_reason"]}),
        ));
    }
    if include_usage {
        let mut usage = chunk(Value::Null);
        usage["choices"] = json!([]);
        usage["usage"] = completion.get("usage").cloned().unwrap_or(Value::Null);
        events.push(usage);
    }
    let mut bytes: Vec<Bytes> = events
        .iter()
        .map(|chunk| sse::event(&chunk.to_string()))
        .collect();
    bytes.push(sse::event(sse::DONE));
    bytes
}

/// One streamed completion: its chunks passed on (less the usage chunk the client did not ask
/// for) and assembled into one `text_completion` at the end.
struct CompletionStream {
    parser: Parser,
    include_usage: bool,
    /// `id`, `model`, `created` and `system_fingerprint`, from the first chunk with them.
    head: Map<String, Value>,
    /// Each choice's text so far and its finish reason, by index.
    choices: BTreeMap<u64, (String, Option<Value>)>,
    usage: Option<Value>,
    /// Why the stream can be relayed but not stored (per-token log probabilities).
    unassembled: Option<&'static str>,
}

impl StreamReader for CompletionStream {
    fn feed(&mut self, bytes: &[u8]) -> Vec<StreamItem> {
        let mut items = Vec::new();
        for data in self.parser.feed(bytes) {
            if data == sse::DONE {
                items.push(StreamItem::End);
                break;
            }
            let Ok(Value::Object(chunk)) = serde_json::from_str::<Value>(&data) else {
                items.push(StreamItem::Broken(format!(
                    "a chunk is not a JSON object: {data}"
                )));
                break;
            };
            for field in ["id", "model", "created", "system_fingerprint"] {
                if let Some(value) = chunk.get(field).filter(|v| !v.is_null()) {
                    self.head.entry(field).or_insert_with(|| value.clone());
                }
            }
            if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
                self.usage = Some(usage.clone());
            }
            let choices = chunk.get("choices").and_then(Value::as_array);
            for choice in choices.into_iter().flatten() {
                let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
                let (text, finish) = self.choices.entry(index).or_default();
                text.push_str(choice.get("text").and_then(Value::as_str).unwrap_or(""));
                if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
                    *finish = Some(reason.clone());
                }
                if choice.get("logprobs").is_some_and(|l| !l.is_null()) {
                    self.unassembled = Some("its log probabilities come token by token");
                }
            }
            let usage_only = choices.is_none_or(Vec::is_empty);
            if self.include_usage || !usage_only {
                items.push(StreamItem::Event(sse::event(&data)));
            }
        }
        items
    }

    fn finish(self: Box<Self>) -> Result<(Bytes, Usage), String> {
        if let Some(why) = self.unassembled {
            return Err(why.to_owned());
        }
        if self.choices.is_empty() {
            return Err("the stream carried no choices".to_owned());
        }
        let mut choices = Vec::with_capacity(self.choices.len());
        for (index, (text, finish)) in self.choices {
            let finish = finish.ok_or_else(|| format!("choice {index} has no finish_reason"))?;
            choices.push(json!({"text": text, "index": index, "logprobs": null, "finish_reason": finish}));
        }
        let mut completion = Value::Object(self.head);
        completion["object"] = json!("text_completion");
        completion["choices"] = Value::Array(choices);
        completion["usage"] = self.usage.unwrap_or(Value::Null);
        let answer = Bytes::from(serde_json::to_vec(&completion).expect("a JSON value serialises"));
        let usage = storable_choices(&answer).ok_or("a choice is filtered")?;
        Ok((answer, usage))
    }

    fn end(&self) -> Bytes {
        sse::event(sse::DONE)
    }

    fn error(&self, reason: &str) -> Bytes {
        stream_error(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<CompletionRequest, Invalid> {
        CompletionRequest::parse(&serde_json::to_vec(&body).unwrap())
    }

    #[test]
    fn one_text_for_one_answer_is_keyed_and_the_rest_is_forwarded() {
        let keyed = |body: Value| parse(body).unwrap().cache_input();
        let text = keyed(json!({"model": "m", "prompt": "Say hi", "max_tokens": 5})).unwrap();
        assert_eq!(text.prompt, "Say hi");
        let one = keyed(json!({"model": "m", "prompt": ["Say hi"], "max_tokens": 5})).unwrap();
        assert_eq!(one.fingerprint, text.fingerprint);
        // Streaming and the user do not change the answer; the parameters do.
        let streamed =
            keyed(json!({"model": "m", "prompt": "Say hi", "max_tokens": 5, "stream": true, "user": "u1"}));
        assert_eq!(streamed.unwrap().fingerprint, text.fingerprint);
        let longer = keyed(json!({"model": "m", "prompt": "Say hi", "max_tokens": 50})).unwrap();
        assert_ne!(longer.fingerprint, text.fingerprint);
        for body in [
            json!({"model": "m", "prompt": ["Say hi", "Say bye"]}),
            json!({"model": "m", "prompt": [1, 2, 3]}),
            json!({"model": "m", "prompt": [[1, 2], [3]]}),
            json!({"model": "m"}),
            json!({"model": "m", "prompt": "Say hi", "n": 2}),
            json!({"model": "m", "prompt": "Say hi", "best_of": 3}),
            json!({"model": "m", "prompt": "Say hi", "echo": true}),
        ] {
            assert!(keyed(body.clone()).is_none(), "{body}");
        }
    }

    #[test]
    fn a_completion_never_shares_a_context_with_a_chat() {
        let completion = parse(json!({"model": "m", "prompt": "Say hi"}))
            .unwrap()
            .cache_input()
            .unwrap();
        let chat = super::super::ChatRequest::parse(
            &serde_json::to_vec(&json!({"model": "m", "messages": [{"role": "user", "content": "Say hi"}]}))
                .unwrap(),
        )
        .unwrap()
        .cache_input()
        .unwrap();
        assert_eq!(completion.prompt, chat.prompt);
        assert_ne!(completion.fingerprint, chat.fingerprint);
    }

    #[test]
    fn bad_bodies_name_the_parameter() {
        for (body, param) in [
            (json!({"prompt": "x"}), "model"),
            (json!({"model": "m", "prompt": 7}), "prompt"),
            (json!({"model": "m", "prompt": [1, "x"]}), "prompt"),
            (json!({"model": "m", "prompt": "x", "n": 0}), "n"),
            (json!({"model": "m", "prompt": "x", "echo": "yes"}), "echo"),
            (json!({"model": "m", "prompt": "x", "suffix": 3}), "suffix"),
            (
                json!({"model": "m", "prompt": "x", "max_tokens": "5"}),
                "max_tokens",
            ),
            (
                json!({"model": "m", "prompt": "x", "stream_options": 1}),
                "stream_options",
            ),
        ] {
            assert_eq!(
                parse(body.clone()).unwrap_err().param.as_deref(),
                Some(param),
                "{body}"
            );
        }
        assert!(CompletionRequest::parse(b"not json").unwrap_err().param.is_none());
    }

    fn chunk(text: &str, finish: Value) -> String {
        json!({"id": "cmpl-up", "object": "text_completion", "created": 1, "model": "m",
               "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]})
        .to_string()
    }

    #[test]
    fn a_stream_is_relayed_and_assembled_and_replays_as_it_came() {
        let request = parse(json!({"model": "m", "prompt": "Say hi", "stream": true})).unwrap();
        let mut reader = Completions.stream_reader(&request);
        let usage = json!({"id": "cmpl-up", "object": "text_completion", "created": 1, "model": "m", "choices": [],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}});
        let wire: String = [
            chunk("Hel", Value::Null),
            chunk("lo", json!("stop")),
            usage.to_string(),
        ]
        .iter()
        .map(|data| format!("data: {data}\n\n"))
        .collect::<String>()
            + "data: [DONE]\n\n";
        let items = reader.feed(wire.as_bytes());
        // The usage chunk the client did not ask for is not passed on.
        assert_eq!(
            items.iter().filter(|i| matches!(i, StreamItem::Event(_))).count(),
            2
        );
        assert_eq!(items.last(), Some(&StreamItem::End));
        let (answer, usage) = reader.finish().unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 2));
        let stored: Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(stored["choices"][0]["text"], "Hello");
        assert_eq!(stored["object"], "text_completion");
        let Replay::Events(events) = Completions.replay(&request, &answer) else {
            panic!("a streamed request replays as events");
        };
        let mut replayed = Parser::default();
        let data: Vec<String> = events.iter().flat_map(|e| replayed.feed(e)).collect();
        assert_eq!(data.last().map(String::as_str), Some(sse::DONE));
        let text: String = data[..data.len() - 1]
            .iter()
            .map(|d| {
                serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(text, "Hello");
    }

    #[test]
    fn unfinished_garbled_or_token_by_token_streams_are_not_stored() {
        let request = parse(json!({"model": "m", "prompt": "Say hi", "stream": true})).unwrap();
        let mut unfinished = Completions.stream_reader(&request);
        unfinished.feed(format!("data: {}\n\ndata: [DONE]\n\n", chunk("Hel", Value::Null)).as_bytes());
        assert!(unfinished.finish().is_err());
        let mut garbled = Completions.stream_reader(&request);
        let items = garbled.feed(b"data: {\"choices\": oops\n\n");
        assert!(matches!(items.as_slice(), [StreamItem::Broken(_)]));
        let mut logprobs = Completions.stream_reader(&request);
        let data = json!({"choices": [{"text": "Hi", "index": 0, "logprobs": {"tokens": ["Hi"]}, "finish_reason": "stop"}]});
        logprobs.feed(format!("data: {data}\n\ndata: [DONE]\n\n").as_bytes());
        assert!(logprobs.finish().is_err());
    }
}
