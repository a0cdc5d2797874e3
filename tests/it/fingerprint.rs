//! Property tests of the request fingerprint: stable under JSON key order and whitespace,
//! different whenever a field that changes the answer differs.

use proptest::prelude::*;
use semcache::openai::request::{CacheInput, ChatRequest};
use serde_json::{json, Map, Value};

/// Fields that change the answer, with a generator of values for each.
fn answer_fields() -> Vec<(&'static str, BoxedStrategy<Value>)> {
    vec![
        (
            "temperature",
            (0u32..=20).prop_map(|t| json!(f64::from(t) / 10.0)).boxed(),
        ),
        (
            "top_p",
            (1u32..=10).prop_map(|t| json!(f64::from(t) / 10.0)).boxed(),
        ),
        ("max_tokens", (1u64..5000).prop_map(|n| json!(n)).boxed()),
        ("seed", any::<u32>().prop_map(|n| json!(n)).boxed()),
        (
            "presence_penalty",
            (-20i32..=20).prop_map(|p| json!(f64::from(p) / 10.0)).boxed(),
        ),
        ("stop", "[a-z\\n]{1,4}".prop_map(|s| json!([s])).boxed()),
        (
            "response_format",
            prop_oneof![
                Just(json!({"type": "json_object"})),
                Just(json!({"type": "text"}))
            ]
            .boxed(),
        ),
    ]
}

fn request() -> impl Strategy<Value = Value> {
    let fields = answer_fields();
    let optional: Vec<_> = fields
        .into_iter()
        .map(|(name, values)| proptest::option::of(values).prop_map(move |v| (name, v)))
        .collect();
    (
        prop_oneof![Just("gpt-4o-mini"), Just("gpt-4o"), Just("o3-mini")],
        "[A-Za-z ,.?]{0,40}",
        "[A-Za-z ,.?]{1,60}",
        optional,
        any::<bool>(),
    )
        .prop_map(|(model, system, prompt, optional, stream)| {
            let mut body = Map::new();
            body.insert("model".into(), json!(model));
            let mut messages = Vec::new();
            if !system.is_empty() {
                messages.push(json!({"role": "system", "content": system}));
            }
            messages.push(json!({"role": "user", "content": prompt}));
            body.insert("messages".into(), Value::Array(messages));
            body.insert("stream".into(), json!(stream));
            for (name, value) in optional {
                if let Some(value) = value {
                    body.insert(name.into(), value);
                }
            }
            Value::Object(body)
        })
}

/// JSON text of `value` with object keys in an order drawn from `order` and whitespace from
/// `space`.
fn render(value: &Value, order: &mut impl Iterator<Item = u64>, space: &str) -> String {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            let shift = order.next().unwrap_or(0) as usize % entries.len().max(1);
            entries.rotate_left(shift);
            if order.next().unwrap_or(0) % 2 == 1 {
                entries.reverse();
            }
            let inner: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| {
                    format!(
                        "{space}{}{space}:{space}{}",
                        Value::String(k.clone()),
                        render(v, order, space)
                    )
                })
                .collect();
            format!("{{{}{space}}}", inner.join(","))
        }
        Value::Array(items) => {
            let inner: Vec<String> = items
                .iter()
                .map(|v| format!("{space}{}", render(v, order, space)))
                .collect();
            format!("[{}{space}]", inner.join(","))
        }
        other => other.to_string(),
    }
}

fn input(text: &str) -> CacheInput {
    ChatRequest::parse(text.as_bytes())
        .expect("a valid request")
        .cache_input()
        .expect("a user message")
}

proptest! {
    #[test]
    fn the_fingerprint_ignores_key_order_and_whitespace(
        body in request(),
        order in proptest::collection::vec(any::<u64>(), 64),
        space in prop_oneof![Just(""), Just(" "), Just("\n  "), Just("\t")],
    ) {
        let plain = input(&body.to_string());
        let shuffled = input(&render(&body, &mut order.into_iter(), space));
        prop_assert_eq!(plain, shuffled);
    }

    #[test]
    fn the_fingerprint_changes_with_every_answer_changing_field(
        body in request(),
        field in 0..answer_fields().len(),
        replacement in any::<u64>(),
    ) {
        let (name, _) = &answer_fields()[field];
        let mut changed = body.clone();
        let new_value = match *name {
            "max_tokens" | "seed" => json!(replacement % 100_000 + 100_000),
            "stop" => json!([format!("#{replacement}")]),
            "response_format" => json!({"type": "json_schema", "json_schema": {"name": format!("s{replacement}")}}),
            _ => json!((replacement % 1000) as f64 / 1000.0 + 3.0),
        };
        changed[*name] = new_value;
        prop_assume!(changed != body);
        let (before, after) = (input(&body.to_string()), input(&changed.to_string()));
        prop_assert_ne!(before.fingerprint, after.fingerprint, "{} changed", name);
        prop_assert_eq!(before.prompt, after.prompt);

        let mut other_model = body.clone();
        other_model["model"] = json!("another-model");
        prop_assert_ne!(input(&body.to_string()).fingerprint, input(&other_model.to_string()).fingerprint);
    }
}
