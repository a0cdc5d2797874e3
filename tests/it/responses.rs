//! The Responses API (`POST /v1/responses`) through HTTP, with the real model: matched by
//! meaning like chat, replayed as the API's JSON and event stream with fresh ids, requests that
//! depend on upstream state forwarded and said so, a conversation going on from a hit, and
//! nothing failed, incomplete or broken stored.

use serde_json::{json, Value};

use crate::support::{chat_body, Mode, Reply, Semcache, TestUpstream, KEY_A};

async fn respond(semcache: &Semcache, body: &Value) -> Reply {
    let response = semcache
        .http
        .post(semcache.url("/v1/responses"))
        .bearer_auth(KEY_A)
        .json(body)
        .send()
        .await
        .unwrap();
    Reply::from(response).await
}

fn body(input: &str) -> Value {
    json!({"model": "gpt-4o-mini", "input": input, "instructions": "Answer in one sentence."})
}

fn streamed(input: &str) -> Value {
    let mut body = body(input);
    body["stream"] = json!(true);
    body
}

/// The events of a Responses stream, checked as the SDKs read them: each block an `event:`
/// line naming the data's `type` and one `data:` line, numbered from 0 in order.
fn events(reply: &Reply) -> Vec<Value> {
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let text = std::str::from_utf8(&reply.body).unwrap();
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .enumerate()
        .map(|(n, block)| {
            let (name, data) = block
                .strip_prefix("event: ")
                .and_then(|rest| rest.split_once("\ndata: "))
                .unwrap_or_else(|| panic!("not an event block: {block:?}"));
            let data: Value = serde_json::from_str(data).unwrap_or_else(|err| panic!("{err}: {data}"));
            assert_eq!(data["type"], name, "{data}");
            assert_eq!(data["sequence_number"], n, "{data}");
            data
        })
        .collect()
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

/// The text of a stream's `response.output_text.delta` events.
fn streamed_text(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect()
}

/// The output's text, as the SDKs' `output_text` joins it.
fn output_text(response: &Value) -> String {
    response["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["type"] == "message")
        .flat_map(|item| item["content"].as_array().unwrap())
        .filter_map(|part| part["text"].as_str())
        .collect()
}

#[tokio::test]
async fn a_reworded_input_is_served_as_a_response_with_fresh_ids() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;

    let miss = respond(&semcache, &body("How do I reset my password?")).await;
    assert_eq!((miss.status, miss.cache()), (200, "miss"));
    let stored = miss.json();
    assert_eq!(stored["id"], "resp_up1");

    let hit = respond(&semcache, &body("How can I reset my password?")).await;
    assert_eq!((hit.status, hit.cache()), (200, "hit"));
    assert!(hit.similarity() > 0.82, "{}", hit.similarity());
    let served = hit.json();
    assert_eq!(served["object"], "response");
    assert_eq!(served["status"], "completed");
    assert_eq!(
        output_text(&served),
        "Response #1 to: How do I reset my password?"
    );
    assert_eq!(served["usage"], stored["usage"]);
    assert_eq!(served["model"], stored["model"]);
    let id = served["id"].as_str().unwrap();
    assert!(id.starts_with("resp_semcache"), "{id}");
    let item = served["output"][0]["id"].as_str().unwrap();
    assert!(item.starts_with("msg_semcache"), "{item}");
    // The last user item's text is the prompt, as much as a string input is.
    let items = json!({"model": "gpt-4o-mini", "instructions": "Answer in one sentence.", "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "How can I reset my password?"}]}
    ]});
    let again = respond(&semcache, &items).await;
    assert_eq!(again.cache(), "hit");
    assert_ne!(again.json()["id"], served["id"]);
    assert_eq!(upstream.response_calls(), 1);

    // Other instructions, or not keeping the response upstream, are another context.
    let mut other = body("How can I reset my password?");
    other["instructions"] = json!("Answer in French.");
    assert_eq!(respond(&semcache, &other).await.cache(), "miss");
    let mut unkept = body("How can I reset my password?");
    unkept["store"] = json!(false);
    assert_eq!(respond(&semcache, &unkept).await.cache(), "miss");
    assert_eq!(upstream.response_calls(), 3);
    assert_eq!(upstream.chat_calls(), 0);

    let stats = semcache.get_json("/stats").await;
    let row = &stats["by_surface"]["responses"];
    assert_eq!(
        (row["requests"].as_u64(), row["hits"].as_u64()),
        (Some(5), Some(2)),
        "{stats}"
    );
    assert_eq!(stats["by_surface"]["chat_completions"]["requests"], 0, "{stats}");
    let metrics = semcache.get_text("/metrics").await;
    assert!(
        metrics.contains("semcache_surface_hits_total{surface=\"responses\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_streamed_miss_is_relayed_event_by_event_and_hits_replay_both_ways() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;

    let miss = respond(&semcache, &streamed("What are your opening hours on Sunday?")).await;
    assert_eq!((miss.status, miss.cache()), (200, "miss"));
    let relayed = events(&miss);
    assert_eq!(kinds(&relayed).first(), Some(&"response.created"));
    assert_eq!(kinds(&relayed).last(), Some(&"response.completed"));
    // As the upstream sent them: the text in two deltas.
    assert_eq!(
        kinds(&relayed)
            .iter()
            .filter(|kind| **kind == "response.output_text.delta")
            .count(),
        2
    );
    let text = streamed_text(&relayed);
    assert_eq!(text, "Response #1 to: What are your opening hours on Sunday?");
    assert_eq!(semcache.get_json("/stats").await["entries"], 1);

    let hit = respond(&semcache, &streamed("When are you open on Sundays?")).await;
    assert_eq!(hit.cache(), "hit");
    let replayed = events(&hit);
    assert_eq!(
        kinds(&replayed),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    assert_eq!(streamed_text(&replayed), text);
    let created = &replayed[0]["response"];
    assert_eq!(
        (&created["status"], &created["output"]),
        (&json!("in_progress"), &json!([]))
    );
    let completed = &replayed.last().unwrap()["response"];
    let original = &relayed.last().unwrap()["response"];
    assert_eq!(completed["usage"], original["usage"]);
    assert_eq!(output_text(completed), text);
    // One id throughout the replay, and not the upstream's.
    assert_eq!(created["id"], completed["id"]);
    assert_ne!(completed["id"], original["id"]);
    let item = &completed["output"][0]["id"];
    assert_eq!(replayed[2]["item"]["id"], *item);
    assert_eq!(replayed[4]["item_id"], *item);

    let json = respond(&semcache, &body("When are you open on Sundays?")).await;
    assert_eq!(json.cache(), "hit");
    assert_eq!(output_text(&json.json()), text);
    assert_eq!(upstream.response_calls(), 1);
}

#[tokio::test]
async fn tool_calls_are_stored_and_replayed() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let with_tools = |input: &str, stream: bool| {
        let mut request = body(input);
        request["tools"] = json!([{"type": "function", "name": "lookup_order",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}]);
        request["stream"] = json!(stream);
        request
    };
    let miss = respond(&semcache, &with_tools("Where is my order?", false)).await;
    assert_eq!(miss.cache(), "miss");
    let call = miss.json()["output"][0].clone();
    assert_eq!(call["type"], "function_call");

    let hit = respond(&semcache, &with_tools("Where is my order?", false)).await;
    assert_eq!(hit.cache(), "hit");
    let served = hit.json()["output"][0].clone();
    for field in ["type", "call_id", "name", "arguments", "status"] {
        assert_eq!(served[field], call[field], "{field}");
    }
    assert_ne!(served["id"], call["id"]);

    let streamed = respond(&semcache, &with_tools("Where is my order?", true)).await;
    assert_eq!(streamed.cache(), "hit");
    let replayed = events(&streamed);
    let arguments: String = replayed
        .iter()
        .filter(|e| e["type"] == "response.function_call_arguments.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(arguments, call["arguments"].as_str().unwrap());
    assert_eq!(
        replayed.last().unwrap()["response"]["output"][0]["call_id"],
        call["call_id"]
    );
    // Without the tools, the same input is another context.
    assert_eq!(
        respond(&semcache, &body("Where is my order?")).await.cache(),
        "miss"
    );
    assert_eq!(upstream.response_calls(), 2);
}

#[tokio::test]
async fn a_conversation_goes_on_upstream_from_a_hit_and_the_reply_says_why_it_bypassed() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    assert_eq!(
        respond(&semcache, &body("How do I reset my password?"))
            .await
            .cache(),
        "miss"
    );
    let hit = respond(&semcache, &body("How do I reset my password?")).await;
    assert_eq!(hit.cache(), "hit");
    let minted = hit.json()["id"].as_str().unwrap().to_owned();

    // The next turn depends on what the upstream kept: forwarded, every time, naming the
    // response the upstream knows.
    let mut next = body("And if I forgot my email too?");
    next["previous_response_id"] = json!(minted);
    for call in [2, 3] {
        let reply = respond(&semcache, &next).await;
        assert_eq!((reply.status, reply.cache()), (200, "bypass"));
        assert_eq!(reply.header("x-semcache-bypass"), Some("previous_response_id"));
        assert_eq!(reply.json()["previous_response_id"], "resp_up1");
        assert_eq!(upstream.response_calls(), call);
    }
    let mut other = body("And then?");
    other["previous_response_id"] = json!("resp_up2");
    let reply = respond(&semcache, &other).await;
    assert_eq!(reply.json()["previous_response_id"], "resp_up2");
    assert_eq!(semcache.get_json("/stats").await["entries"], 1);

    // Retrieving the served response asks the upstream for its own.
    let fetched = semcache
        .http
        .get(semcache.url(&format!("/v1/responses/{minted}/input_items?limit=5")))
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 404, "the test upstream does not serve it");
    let strays = upstream.strays();
    assert_eq!(strays.len(), 1, "{strays:?}");
    assert_eq!(
        (strays[0].0.as_str(), strays[0].1.as_str()),
        ("GET", "/v1/responses/resp_up1/input_items")
    );
}

#[tokio::test]
async fn an_answer_is_served_only_on_the_surface_that_stored_it() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let prompt = "How do I cancel my subscription?";
    assert_eq!(semcache.chat(&chat_body(prompt)).await.cache(), "miss");
    let response = respond(&semcache, &json!({"model": "gpt-4o-mini", "input": prompt})).await;
    assert_eq!(response.cache(), "miss");
    assert_eq!(response.json()["object"], "response");
    assert_eq!(
        semcache.chat(&chat_body(prompt)).await.json()["object"],
        "chat.completion"
    );
    assert_eq!((upstream.chat_calls(), upstream.response_calls()), (1, 1));
}

#[tokio::test]
async fn bad_bodies_and_failed_incomplete_or_broken_responses_store_nothing() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    for (bad, param) in [
        (json!({"input": "hi"}), "model"),
        (json!({"model": "m", "input": 42}), "input"),
        (json!({"model": "m", "input": ["hi"]}), "input[0]"),
        (json!({"model": "m", "input": "hi", "tools": "all"}), "tools"),
        (json!({"model": "m", "input": "hi", "stream": "yes"}), "stream"),
        (
            json!({"model": "m", "input": "hi", "temperature": "hot"}),
            "temperature",
        ),
    ] {
        let reply = respond(&semcache, &bad).await;
        assert_eq!(reply.status, 400, "{bad}");
        let error = &reply.json()["error"];
        assert_eq!(error["type"], "invalid_request_error", "{error}");
        assert_eq!(error["param"], param, "{error}");
    }
    assert_eq!(upstream.response_calls(), 0);

    let question = "How do I reset my password?";
    upstream.set_mode(Mode::Status(500));
    let failed = respond(&semcache, &body(question)).await;
    assert_eq!(failed.status, 500);
    assert_eq!(failed.json()["error"]["message"], "upstream says no");

    // Incomplete (cut at max_output_tokens): passed on as it came, not stored.
    upstream.set_mode(Mode::UnfinishedStream);
    let incomplete = respond(&semcache, &body(question)).await;
    assert_eq!(
        (incomplete.status, incomplete.json()["status"].as_str()),
        (200, Some("incomplete"))
    );
    let incomplete = events(&respond(&semcache, &streamed(question)).await);
    assert_eq!(kinds(&incomplete).last(), Some(&"response.incomplete"));

    upstream.set_mode(Mode::BrokenStream);
    let broken = events(&respond(&semcache, &streamed(question)).await);
    let last = broken.last().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["code"].as_str()),
        (Some("error"), Some("upstream_stream_broken"))
    );
    assert!(!kinds(&broken).contains(&"response.completed"));

    upstream.set_mode(Mode::GarbageStream);
    let garbled = events(&respond(&semcache, &streamed(question)).await);
    assert_eq!(garbled.last().unwrap()["type"], "error");
    assert_eq!(semcache.get_json("/stats").await["entries"], 0);

    upstream.set_mode(Mode::Normal);
    assert_eq!(respond(&semcache, &body(question)).await.cache(), "miss");
    assert_eq!(respond(&semcache, &streamed(question)).await.cache(), "hit");
    assert_eq!(upstream.response_calls(), 6);
}
