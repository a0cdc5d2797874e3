//! Embeddings (`POST /v1/embeddings`): validation, what each input item is keyed on, and the
//! list the client gets back. Items are cached one by one and only word for word (see
//! `cache::Service::answer_items`): an embedding of other words is another embedding.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::request::{fingerprint_in, invalid, model_of, object_of, NOT_IN_FINGERPRINT};
use crate::cache::{Fingerprint, Invalid, ItemsProtocol, Usage};

/// A validated `POST /embeddings` body.
#[derive(Debug, Clone)]
pub struct EmbeddingsRequest {
    body: Map<String, Value>,
    pub model: String,
    /// The input's texts, when it is text (a string or an array of strings); token ids are
    /// forwarded uncached.
    items: Option<Vec<String>>,
}

impl EmbeddingsRequest {
    pub fn parse(bytes: &[u8]) -> Result<Self, Invalid> {
        let body = object_of(bytes)?;
        let model = model_of(&body)?;
        let wrong = || {
            invalid(
                "'input' must be a string, an array of strings, an array of token ids or an array of arrays of token ids, and not empty.",
                "input",
            )
        };
        let is_tokens = |v: &Value| {
            v.as_array()
                .is_some_and(|ids| !ids.is_empty() && ids.iter().all(Value::is_u64))
        };
        let items = match body.get("input") {
            None | Some(Value::Null) => return Err(invalid("you must provide an input parameter", "input")),
            Some(Value::String(text)) if !text.is_empty() => Some(vec![text.clone()]),
            Some(Value::Array(items)) if items.is_empty() => return Err(wrong()),
            Some(Value::Array(items)) if items.iter().all(|i| i.as_str().is_some_and(|t| !t.is_empty())) => {
                Some(
                    items
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect(),
                )
            }
            Some(Value::Array(items)) if items.iter().all(Value::is_u64) || items.iter().all(is_tokens) => {
                None
            }
            Some(_) => return Err(wrong()),
        };
        if !matches!(body.get("dimensions"), None | Some(Value::Null))
            && body
                .get("dimensions")
                .and_then(Value::as_u64)
                .is_none_or(|d| d == 0)
        {
            return Err(invalid("'dimensions' must be a positive integer.", "dimensions"));
        }
        match body.get("encoding_format") {
            None | Some(Value::Null) => {}
            Some(Value::String(format)) if format == "float" || format == "base64" => {}
            Some(_) => {
                return Err(invalid(
                    "'encoding_format' must be 'float' or 'base64'.",
                    "encoding_format",
                ))
            }
        }
        Ok(Self { body, model, items })
    }

    /// The input's texts, or `None` when it is token ids.
    pub fn items(&self) -> Option<&[String]> {
        self.items.as_deref()
    }

    /// What every item of this request shares: the model, `dimensions`, `encoding_format` (a
    /// missing one is `float`, as the API reads it) and any other field but `user`, in a
    /// digest domain of embeddings' own.
    pub fn fingerprint(&self) -> Fingerprint {
        let mut context = self.body.clone();
        for field in NOT_IN_FINGERPRINT.iter().chain(&["input"]) {
            context.remove(*field);
        }
        if context.get("encoding_format").is_none_or(Value::is_null) {
            context.insert("encoding_format".to_owned(), json!("float"));
        }
        if context.get("dimensions").is_some_and(Value::is_null) {
            context.remove("dimensions");
        }
        fingerprint_in("semcache/context/embeddings/v1", context)
    }

    /// The body to send upstream for these texts: the client's, with only them as input.
    pub fn upstream_body(&self, texts: &[&str]) -> Bytes {
        let mut body = self.body.clone();
        body.insert("input".to_owned(), json!(texts));
        Bytes::from(serde_json::to_vec(&body).expect("a JSON map serialises"))
    }
}

/// Embeddings as the core's items: the body for some texts, the reply split per text.
pub struct Embeddings<'a>(pub &'a EmbeddingsRequest);

impl ItemsProtocol for Embeddings<'_> {
    fn body(&self, texts: &[&str]) -> Bytes {
        self.0.upstream_body(texts)
    }

    fn split(&self, reply: &[u8], sent: usize) -> Option<(Vec<Bytes>, String, Usage)> {
        split_reply(reply, sent)
    }
}

/// An upstream list of `sent` embeddings, split: each item's `embedding` value (its JSON as it
/// came: the numbers are not read, only passed on), in the order sent, the model that made
/// them, and the usage. `None` when the reply is not such a list (it is then relayed, not
/// stored).
pub fn split_reply(reply: &[u8], sent: usize) -> Option<(Vec<Bytes>, String, Usage)> {
    #[derive(Deserialize)]
    struct List<'a> {
        #[serde(borrow)]
        data: Vec<Item<'a>>,
        #[serde(default)]
        model: String,
        usage: Option<ListUsage>,
    }
    #[derive(Deserialize)]
    struct Item<'a> {
        index: Option<usize>,
        #[serde(borrow)]
        embedding: &'a RawValue,
    }
    #[derive(Deserialize)]
    struct ListUsage {
        #[serde(default)]
        prompt_tokens: u64,
    }
    let list: List = serde_json::from_slice(reply).ok()?;
    if list.data.len() != sent {
        return None;
    }
    let mut items: Vec<Option<Bytes>> = vec![None; sent];
    for (position, item) in list.data.iter().enumerate() {
        let embedding = item.embedding.get();
        // A list of numbers, or the base64 string of them.
        if !embedding.starts_with(['[', '"']) {
            return None;
        }
        let slot = items.get_mut(item.index.unwrap_or(position))?;
        if slot.is_some() {
            return None;
        }
        *slot = Some(Bytes::copy_from_slice(embedding.as_bytes()));
    }
    let usage = Usage {
        prompt_tokens: list.usage.map_or(0, |usage| usage.prompt_tokens),
        completion_tokens: 0,
    };
    Some((items.into_iter().collect::<Option<Vec<_>>>()?, list.model, usage))
}

/// The list the client gets: every item's embedding in order (each stored as the JSON it came
/// as, written out as it is), the usage of what was sent upstream for this request only.
pub fn list(model: &str, embeddings: &[Bytes], prompt_tokens: u64) -> Bytes {
    let size: usize = embeddings.iter().map(|e| e.len() + 48).sum();
    let mut out = Vec::with_capacity(size + 128);
    out.extend_from_slice(br#"{"object":"list","data":["#);
    for (index, embedding) in embeddings.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!(r#"{{"object":"embedding","index":{index},"embedding":"#).as_bytes());
        out.extend_from_slice(embedding);
        out.push(b'}');
    }
    out.extend_from_slice(br#"],"model":"#);
    serde_json::to_writer(&mut out, model).expect("a string serialises");
    out.extend_from_slice(
        format!(r#","usage":{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens}}}}}"#)
            .as_bytes(),
    );
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: Value) -> Result<EmbeddingsRequest, Invalid> {
        EmbeddingsRequest::parse(&serde_json::to_vec(&body).unwrap())
    }

    #[test]
    fn texts_are_items_and_the_format_is_part_of_the_context() {
        let one = parse(json!({"model": "e", "input": "hello"})).unwrap();
        assert_eq!(one.items(), Some(&["hello".to_owned()][..]));
        let many = parse(json!({"model": "e", "input": ["a", "b"], "user": "u"})).unwrap();
        assert_eq!(many.items().map(<[String]>::len), Some(2));
        assert_eq!(
            one.fingerprint(),
            many.fingerprint(),
            "the input and the user are not context"
        );
        let float = parse(json!({"model": "e", "input": "a", "encoding_format": "float"})).unwrap();
        assert_eq!(float.fingerprint(), one.fingerprint(), "float is the default");
        for other in [
            json!({"model": "e", "input": "a", "encoding_format": "base64"}),
            json!({"model": "e", "input": "a", "dimensions": 256}),
            json!({"model": "e2", "input": "a"}),
        ] {
            assert_ne!(
                parse(other.clone()).unwrap().fingerprint(),
                one.fingerprint(),
                "{other}"
            );
        }
        assert!(parse(json!({"model": "e", "input": [1, 2, 3]}))
            .unwrap()
            .items()
            .is_none());
        assert!(parse(json!({"model": "e", "input": [[1, 2], [3]]}))
            .unwrap()
            .items()
            .is_none());
        let body: Value = serde_json::from_slice(&many.upstream_body(&["b"])).unwrap();
        assert_eq!(body["input"], json!(["b"]));
        assert_eq!(body["user"], "u");
    }

    #[test]
    fn bad_bodies_name_the_parameter() {
        for (body, param) in [
            (json!({"input": "x"}), "model"),
            (json!({"model": "e"}), "input"),
            (json!({"model": "e", "input": []}), "input"),
            (json!({"model": "e", "input": ""}), "input"),
            (json!({"model": "e", "input": ["a", 1]}), "input"),
            (json!({"model": "e", "input": "a", "dimensions": 0}), "dimensions"),
            (
                json!({"model": "e", "input": "a", "encoding_format": "int8"}),
                "encoding_format",
            ),
        ] {
            assert_eq!(
                parse(body.clone()).unwrap_err().param.as_deref(),
                Some(param),
                "{body}"
            );
        }
    }

    #[test]
    fn a_reply_is_split_by_index_and_refused_when_it_does_not_fit() {
        let reply = json!({"object": "list", "model": "e-1", "usage": {"prompt_tokens": 7, "total_tokens": 7},
            "data": [{"object": "embedding", "index": 1, "embedding": [0.5]},
                     {"object": "embedding", "index": 0, "embedding": [0.25, -1.0]}]});
        let bytes = serde_json::to_vec(&reply).unwrap();
        let (items, model, usage) = split_reply(&bytes, 2).unwrap();
        assert_eq!(
            items,
            [Bytes::from("[0.25,-1.0]"), Bytes::from("[0.5]")],
            "as they came"
        );
        assert_eq!((model.as_str(), usage.prompt_tokens), ("e-1", 7));
        assert!(split_reply(&bytes, 3).is_none());
        assert!(split_reply(b"{\"error\": {}}", 1).is_none());
        let numbers = serde_json::to_vec(&json!({"data": [{"index": 0, "embedding": 5}]})).unwrap();
        assert!(
            split_reply(&numbers, 1).is_none(),
            "an embedding is a list or a string"
        );
        let listed: Value = serde_json::from_slice(&list("e-1", &items, 0)).unwrap();
        assert_eq!(listed["data"][1]["embedding"], json!([0.5]));
        assert_eq!(listed["data"][1]["index"], 1);
        assert_eq!(listed["usage"]["prompt_tokens"], 0);
    }
}
