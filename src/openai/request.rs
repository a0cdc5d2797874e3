//! Chat-completion requests: validation, and what of them the cache keys on.

use serde_json::{Map, Value};

pub use crate::cache::{CacheInput, Invalid};
use crate::cache::{Conversation, Digest32, Fingerprint};
use crate::context::Turn;

/// Request fields that do not change the answer, left out of the fingerprint.
pub(super) const NOT_IN_FINGERPRINT: &[&str] = &[
    "stream",
    "stream_options",
    "user",
    "metadata",
    "store",
    "service_tier",
];

pub(super) fn invalid(message: impl Into<String>, param: impl Into<String>) -> Invalid {
    Invalid {
        message: message.into(),
        param: Some(param.into()),
    }
}

/// A request body as a JSON object, in OpenAI's words when it is not one.
pub(super) fn object_of(bytes: &[u8]) -> Result<Map<String, Value>, Invalid> {
    let value: Value = serde_json::from_slice(bytes).map_err(|err| Invalid {
        message: format!("We could not parse the JSON body of your request: {err}"),
        param: None,
    })?;
    match value {
        Value::Object(body) => Ok(body),
        _ => Err(Invalid {
            message: "The request body must be a JSON object.".to_owned(),
            param: None,
        }),
    }
}

/// The `model` every surface asks for.
pub(super) fn model_of(body: &Map<String, Value>) -> Result<String, Invalid> {
    match body.get("model") {
        Some(Value::String(model)) if !model.is_empty() => Ok(model.clone()),
        Some(_) => Err(invalid("'model' must be a non-empty string.", "model")),
        None => Err(invalid("you must provide a model parameter", "model")),
    }
}

/// Fields that must be numbers, and fields that must be integers, when present.
pub(super) fn numbers_and_integers(
    body: &Map<String, Value>,
    numbers: &[&str],
    integers: &[&str],
) -> Result<(), Invalid> {
    for field in numbers {
        if !matches!(
            body.get(*field),
            None | Some(Value::Null) | Some(Value::Number(_))
        ) {
            return Err(invalid(format!("'{field}' must be a number."), *field));
        }
    }
    for field in integers {
        if !matches!(body.get(*field), None | Some(Value::Null))
            && body.get(*field).and_then(Value::as_i64).is_none()
        {
            return Err(invalid(format!("'{field}' must be an integer."), *field));
        }
    }
    Ok(())
}

/// `stop`, when present: a string or an array of strings.
pub(super) fn stop_of(body: &Map<String, Value>) -> Result<(), Invalid> {
    if matches!(
        body.get("stop"),
        None | Some(Value::Null) | Some(Value::String(_)) | Some(Value::Array(_))
    ) {
        Ok(())
    } else {
        Err(invalid("'stop' must be a string or an array of strings.", "stop"))
    }
}

/// A validated `POST /chat/completions` body.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    body: Map<String, Value>,
    pub model: String,
    pub stream: bool,
    /// Whether the client asked for a final usage chunk when streaming.
    pub include_usage: bool,
    /// Number of choices asked for.
    pub n: u64,
}

impl ChatRequest {
    pub fn parse(bytes: &[u8]) -> Result<Self, Invalid> {
        let body = object_of(bytes)?;
        let model = model_of(&body)?;
        validate_messages(body.get("messages"))?;
        let stream = optional_bool(&body, "stream")?.unwrap_or(false);
        let include_usage = stream_options(&body)?;
        let n = match body.get("n") {
            None | Some(Value::Null) => 1,
            Some(value) => match value.as_u64() {
                Some(n) if n >= 1 => n,
                _ => return Err(invalid("'n' must be an integer of at least 1.", "n")),
            },
        };
        numbers_and_integers(
            &body,
            &["temperature", "top_p", "presence_penalty", "frequency_penalty"],
            &["max_tokens", "max_completion_tokens", "seed", "top_logprobs"],
        )?;
        stop_of(&body)?;
        for field in ["tools", "functions"] {
            if !matches!(body.get(field), None | Some(Value::Null) | Some(Value::Array(_))) {
                return Err(invalid(format!("'{field}' must be an array."), field));
            }
        }
        optional_bool(&body, "logprobs")?;

        Ok(Self {
            body,
            model,
            stream,
            include_usage,
            n,
        })
    }

    /// The messages and the index of the last user message among them, if there is one.
    fn last_user_message(&self) -> Option<(&[Value], usize)> {
        let messages = self.body.get("messages")?.as_array()?;
        let last_user = messages
            .iter()
            .rposition(|m| m.get("role") == Some(&Value::from("user")))?;
        Some((messages, last_user))
    }

    /// What the cache keys on, or `None` when the request has no user message to key on.
    pub fn cache_input(&self) -> Option<CacheInput> {
        let (_, last_user) = self.last_user_message()?;

        let mut context = self.body.clone();
        for field in NOT_IN_FINGERPRINT {
            context.remove(*field);
        }
        let mut prompt_parts = Vec::new();
        if let Some(Value::Array(messages)) = context.get_mut("messages") {
            let message = messages[last_user].as_object_mut()?;
            // The prompt's text is compared by meaning; anything else in it (images, audio)
            // stays in the context and must match exactly.
            let remaining = match message.remove("content") {
                Some(Value::String(text)) => {
                    prompt_parts.push(text);
                    Value::Null
                }
                Some(Value::Array(parts)) => Value::Array(
                    parts
                        .into_iter()
                        .filter_map(|part| match part.get("type").and_then(Value::as_str) {
                            Some("text") => {
                                prompt_parts.push(part.get("text")?.as_str()?.to_owned());
                                None
                            }
                            _ => Some(part),
                        })
                        .collect(),
                ),
                other => other.unwrap_or(Value::Null),
            };
            message.insert("content".to_owned(), remaining);
            message.insert("semcache_prompt_slot".to_owned(), Value::Bool(true));
        }

        let conversation = self
            .earlier_turns()
            .filter(|turns| !turns.is_empty())
            .map(|turns| Conversation {
                fingerprint: fingerprint_of(without_earlier_turns(context.clone(), last_user)),
                turns,
            });
        Some(CacheInput {
            fingerprint: fingerprint_of(context),
            prompt: prompt_parts.join("\n"),
            conversation,
        })
    }

    /// The user and assistant messages before the last user message, oldest first, when all of
    /// them are plain text: what a conversation is compared by in semantic context mode.
    /// `None` when one is not (tool calls and results, images, a message after the last user
    /// one): such a history is only ever matched exactly.
    pub fn earlier_turns(&self) -> Option<Vec<Turn>> {
        let (messages, last_user) = self.last_user_message()?;
        if last_user + 1 != messages.len() {
            return None;
        }
        let mut turns = Vec::new();
        for message in &messages[..last_user] {
            let user = match message.get("role").and_then(Value::as_str) {
                Some("system" | "developer") => continue,
                Some("user") => true,
                Some("assistant")
                    if message.get("tool_calls").is_none() && message.get("function_call").is_none() =>
                {
                    false
                }
                _ => return None,
            };
            let text = match message.get("content") {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|part| match part.get("type").and_then(Value::as_str) {
                        Some("text") => part.get("text").and_then(Value::as_str),
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

    /// The body to send upstream for a streamed miss: the client's own, with the final usage
    /// chunk asked for, so that the stored answer knows its token counts.
    pub fn body_with_usage(&self) -> Vec<u8> {
        with_usage(&self.body)
    }
}

/// A streamed request's body asking for the final usage chunk too.
pub(super) fn with_usage(body: &Map<String, Value>) -> Vec<u8> {
    let mut body = body.clone();
    let options = body
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(options) = options {
        options.insert("include_usage".to_owned(), Value::Bool(true));
    }
    serde_json::to_vec(&body).expect("a JSON map serialises")
}

/// Whether `stream_options` asks for a final usage chunk.
pub(super) fn stream_options(body: &Map<String, Value>) -> Result<bool, Invalid> {
    match body.get("stream_options") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Object(options)) => Ok(optional_bool(options, "include_usage")
            .map_err(|_| {
                invalid(
                    "'include_usage' must be a boolean.",
                    "stream_options.include_usage",
                )
            })?
            .unwrap_or(false)),
        Some(_) => Err(invalid("'stream_options' must be an object.", "stream_options")),
    }
}

pub(super) fn optional_bool(map: &Map<String, Value>, field: &str) -> Result<Option<bool>, Invalid> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(_) => Err(invalid(format!("'{field}' must be a boolean."), field)),
    }
}

fn validate_messages(messages: Option<&Value>) -> Result<(), Invalid> {
    let messages = match messages {
        Some(Value::Array(messages)) if !messages.is_empty() => messages,
        Some(Value::Array(_)) => return Err(invalid("'messages' must not be empty.", "messages")),
        Some(_) => return Err(invalid("'messages' must be an array.", "messages")),
        None => return Err(invalid("Missing required parameter: 'messages'.", "messages")),
    };
    for (i, message) in messages.iter().enumerate() {
        let Some(message) = message.as_object() else {
            return Err(invalid(
                format!("'messages[{i}]' must be an object."),
                format!("messages[{i}]"),
            ));
        };
        if !matches!(message.get("role"), Some(Value::String(_))) {
            return Err(invalid(
                format!("'messages[{i}].role' must be a string."),
                format!("messages[{i}].role"),
            ));
        }
        match message.get("content") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    let typed = part.get("type").and_then(Value::as_str);
                    let text_ok = typed != Some("text") || part.get("text").is_some_and(Value::is_string);
                    if typed.is_none() || !text_ok {
                        return Err(invalid(
                            format!("'messages[{i}].content[{j}]' must be an object with a 'type' (and a string 'text' for text parts)."),
                            format!("messages[{i}].content[{j}]"),
                        ));
                    }
                }
            }
            Some(_) => {
                return Err(invalid(
                    format!("'messages[{i}].content' must be a string or an array of content parts."),
                    format!("messages[{i}].content"),
                ))
            }
        }
    }
    Ok(())
}

/// Writes JSON with object keys sorted and numbers in one form, so that key order, white space
/// and `1` versus `1.0` do not change the fingerprint.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(&Value::String(key.clone()), out);
                out.push(b':');
                write_canonical(&map[key], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Number(number) => match number.as_f64() {
            Some(float) if float.fract() == 0.0 && float.abs() < 9.0e15 => {
                out.extend_from_slice((float as i64).to_string().as_bytes())
            }
            _ => out.extend_from_slice(number.to_string().as_bytes()),
        },
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

fn fingerprint_of(context: Map<String, Value>) -> Fingerprint {
    fingerprint_in("semcache/context/v1", context)
}

/// The fingerprint of a context, in a surface's own domain: two surfaces' contexts never meet.
pub(super) fn fingerprint_in(domain: &str, context: Map<String, Value>) -> Fingerprint {
    let mut canonical = Vec::new();
    write_canonical(&Value::Object(context), &mut canonical);
    Fingerprint(Digest32::of(domain, &[&canonical]))
}

/// `context` without the user and assistant messages before the one at `last_user`: what a
/// request without those turns would have as its context.
fn without_earlier_turns(mut context: Map<String, Value>, last_user: usize) -> Map<String, Value> {
    if let Some(Value::Array(messages)) = context.get_mut("messages") {
        let mut index = 0;
        messages.retain(|message| {
            let earlier = index < last_user;
            index += 1;
            !(earlier
                && matches!(
                    message.get("role").and_then(Value::as_str),
                    Some("user" | "assistant")
                ))
        });
    }
    context
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn input(body: Value) -> CacheInput {
        ChatRequest::parse(body.to_string().as_bytes())
            .expect("valid request")
            .cache_input()
            .expect("has a user message")
    }

    #[test]
    fn earlier_turns_leave_the_conversation_fingerprint_alone() {
        let chat = |turns: &[(&str, &str)], system: &str| {
            let mut messages = vec![json!({"role": "system", "content": system})];
            for (role, text) in turns {
                messages.push(json!({"role": role, "content": text}));
            }
            messages.push(json!({"role": "user", "content": "Cancel it."}));
            input(json!({"model": "gpt-4o-mini", "messages": messages}))
        };
        let single = chat(&[], "You are terse.");
        assert_eq!(single.conversation, None);
        let history = [
            ("user", "My plan is Premium."),
            ("assistant", "What should I do?"),
        ];
        let first = chat(&history, "You are terse.");
        let conversation = first.conversation.clone().expect("earlier turns");
        assert_eq!(conversation.turns.len(), 2);
        assert!(conversation.turns[0].user && !conversation.turns[1].user);
        assert_eq!(
            conversation.fingerprint, single.fingerprint,
            "as if the turns were not there"
        );
        assert_ne!(
            first.fingerprint, single.fingerprint,
            "the whole context still differs"
        );
        let other = chat(
            &[("user", "My plan is Basic."), ("assistant", "And?")],
            "You are terse.",
        );
        assert_eq!(other.conversation.unwrap().fingerprint, conversation.fingerprint);
        assert_ne!(other.fingerprint, first.fingerprint);
        let other_system = chat(&history, "You are verbose.");
        assert_ne!(
            other_system.conversation.unwrap().fingerprint,
            conversation.fingerprint
        );
    }

    fn base() -> Value {
        json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "How do I reset my password?"}
            ],
            "temperature": 0.2
        })
    }

    #[test]
    fn prompt_is_the_last_user_message() {
        let mut body = base();
        body["messages"]
            .as_array_mut()
            .unwrap()
            .push(json!({"role": "assistant", "content": "Sure"}));
        body["messages"].as_array_mut().unwrap().push(json!({
            "role": "user",
            "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
        }));
        assert_eq!(input(body).prompt, "first\nsecond");
    }

    #[test]
    fn fingerprint_ignores_key_order_whitespace_number_form_and_streaming() {
        let a = input(base());
        let reordered = r#"{ "temperature": 0.2, "messages": [{"content": "You are terse.", "role": "system"},
            {"role": "user", "content": "How do I reset my password?"}], "model": "gpt-4o-mini",
            "stream": true, "user": "u-1" }"#;
        let b = ChatRequest::parse(reordered.as_bytes())
            .unwrap()
            .cache_input()
            .unwrap();
        assert_eq!(a, b);
        let mut one = base();
        one["temperature"] = json!(1);
        let mut one_float = base();
        one_float["temperature"] = json!(1.0);
        assert_eq!(input(one).fingerprint, input(one_float).fingerprint);
    }

    #[test]
    fn fingerprint_changes_with_everything_that_changes_the_answer() {
        let reference = input(base()).fingerprint;
        let changes: Vec<(&str, Value)> = vec![
            ("model", json!("gpt-4o")),
            ("temperature", json!(0.3)),
            ("top_p", json!(0.5)),
            ("max_tokens", json!(10)),
            ("max_completion_tokens", json!(10)),
            ("stop", json!(["\n"])),
            ("seed", json!(1)),
            ("presence_penalty", json!(0.1)),
            ("frequency_penalty", json!(0.1)),
            ("logit_bias", json!({"50256": -100})),
            ("logprobs", json!(true)),
            ("tools", json!([{"type": "function", "function": {"name": "f"}}])),
            ("tool_choice", json!("auto")),
            ("response_format", json!({"type": "json_object"})),
        ];
        for (field, value) in changes {
            let mut body = base();
            body[field] = value;
            assert_ne!(
                input(body).fingerprint,
                reference,
                "{field} must change the fingerprint"
            );
        }
        let mut system = base();
        system["messages"][0]["content"] = json!("You are verbose.");
        assert_ne!(input(system).fingerprint, reference);
        let mut earlier_turn = base();
        earlier_turn["messages"]
            .as_array_mut()
            .unwrap()
            .insert(1, json!({"role": "user", "content": "hi"}));
        assert_ne!(input(earlier_turn).fingerprint, reference);
    }

    #[test]
    fn prompt_text_is_not_in_the_fingerprint_but_images_are() {
        let mut other_prompt = base();
        other_prompt["messages"][1]["content"] = json!("How can I reset my password?");
        assert_eq!(input(other_prompt).fingerprint, input(base()).fingerprint);

        let with_image = |url: &str| {
            let mut body = base();
            body["messages"][1]["content"] = json!([
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": url}}
            ]);
            input(body)
        };
        assert_ne!(
            with_image("https://a/1.png").fingerprint,
            with_image("https://a/2.png").fingerprint
        );
        assert_eq!(with_image("https://a/1.png").prompt, "What is this?");
    }

    #[test]
    fn earlier_turns_are_the_text_before_the_last_user_message_unless_tools_are_in_it() {
        let chat = |messages: Value| {
            ChatRequest::parse(&serde_json::to_vec(&json!({"model": "m", "messages": messages})).unwrap())
                .unwrap()
                .earlier_turns()
        };
        let turns = chat(json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "I'm on Core."},
            {"role": "assistant", "content": [{"type": "text", "text": "Noted."}]},
            {"role": "user", "content": "How much is roaming?"}
        ]))
        .unwrap();
        assert_eq!(
            turns,
            [
                Turn {
                    user: true,
                    text: "I'm on Core.".into()
                },
                Turn {
                    user: false,
                    text: "Noted.".into()
                }
            ]
        );
        let with_tools = chat(json!([
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "1", "content": "sunny"},
            {"role": "user", "content": "And tomorrow?"}
        ]));
        assert_eq!(with_tools, None);
    }

    #[test]
    fn no_user_message_means_nothing_to_key_on() {
        let body = json!({"model": "m", "messages": [{"role": "system", "content": "x"}]});
        assert_eq!(
            ChatRequest::parse(body.to_string().as_bytes())
                .unwrap()
                .cache_input(),
            None
        );
    }

    #[test]
    fn invalid_requests_name_the_parameter() {
        let check = |body: &str, param: Option<&str>| {
            let err = ChatRequest::parse(body.as_bytes()).expect_err(body);
            assert_eq!(err.param.as_deref(), param, "{body}");
        };
        check("{not json", None);
        check("[1]", None);
        check(
            r#"{"messages": [{"role": "user", "content": "x"}]}"#,
            Some("model"),
        );
        check(r#"{"model": 3, "messages": []}"#, Some("model"));
        check(r#"{"model": "m"}"#, Some("messages"));
        check(r#"{"model": "m", "messages": []}"#, Some("messages"));
        check(
            r#"{"model": "m", "messages": [{"content": "x"}]}"#,
            Some("messages[0].role"),
        );
        check(
            r#"{"model": "m", "messages": [{"role": "user", "content": 5}]}"#,
            Some("messages[0].content"),
        );
        check(
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}"#,
            Some("stream"),
        );
        check(
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
            Some("temperature"),
        );
        check(
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}"#,
            Some("n"),
        );
        check(
            r#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}"#,
            Some("max_tokens"),
        );
    }

    #[test]
    fn streamed_miss_asks_upstream_for_usage() {
        let request =
            ChatRequest::parse(br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}"#)
                .unwrap();
        let body: Value = serde_json::from_slice(&request.body_with_usage()).unwrap();
        assert_eq!(body["stream_options"]["include_usage"], json!(true));
        assert!(!request.include_usage);
    }
}
