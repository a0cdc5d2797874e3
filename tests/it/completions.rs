//! Legacy completions (`POST /v1/completions`) through HTTP, with the real model: matched by
//! meaning like chat, replayed as that endpoint's JSON and SSE, never across surfaces, and
//! nothing incomplete or failed stored.

use serde_json::{json, Value};

use crate::support::{chat_body, Mode, Reply, Semcache, TestUpstream, KEY_A};

async fn complete(semcache: &Semcache, body: &Value) -> Reply {
    let response = semcache
        .http
        .post(semcache.url("/v1/completions"))
        .bearer_auth(KEY_A)
        .json(body)
        .send()
        .await
        .unwrap();
    Reply::from(response).await
}

fn body(prompt: &str) -> Value {
    json!({"model": "gpt-3.5-turbo-instruct", "prompt": prompt, "max_tokens": 40, "temperature": 0})
}

fn streamed(prompt: &str) -> Value {
    let mut body = body(prompt);
    body["stream"] = json!(true);
    body
}

/// The text of a streamed completion's events.
fn streamed_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|data| data.as_str() != "[DONE]")
        .map(|data| {
            let chunk: Value = serde_json::from_str(data).unwrap();
            assert_eq!(chunk["object"], "text_completion", "{chunk}");
            chunk["choices"][0]["text"].as_str().unwrap_or("").to_owned()
        })
        .collect()
}

#[tokio::test]
async fn a_reworded_prompt_is_served_as_a_text_completion() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;

    let miss = complete(&semcache, &body("How do I reset my password?")).await;
    assert_eq!((miss.status, miss.cache()), (200, "miss"));
    let stored = miss.json();
    assert_eq!(stored["object"], "text_completion");

    let hit = complete(&semcache, &body("How can I reset my password?")).await;
    assert_eq!((hit.status, hit.cache()), (200, "hit"));
    assert!(hit.similarity() > 0.82, "{}", hit.similarity());
    let served = hit.json();
    assert_eq!(served["object"], "text_completion");
    assert_eq!(served["choices"], stored["choices"]);
    assert_eq!(served["usage"], stored["usage"]);
    assert_eq!(served["model"], stored["model"]);
    assert!(
        served["id"].as_str().unwrap().starts_with("cmpl-semcache-"),
        "{served}"
    );
    assert_eq!(upstream.completion_calls(), 1);

    // Another prompt, or the same one with other parameters, is asked upstream.
    assert_eq!(
        complete(&semcache, &body("Where is my order?")).await.cache(),
        "miss"
    );
    let mut longer = body("How do I reset my password?");
    longer["max_tokens"] = json!(400);
    assert_eq!(complete(&semcache, &longer).await.cache(), "miss");
    assert_eq!(upstream.completion_calls(), 3);
    assert_eq!(upstream.chat_calls(), 0);

    // Each surface is a row of its own in the figures.
    let stats = semcache.get_json("/stats").await;
    let row = |surface: &str| {
        let row = &stats["by_surface"][surface];
        (row["requests"].as_u64(), row["hits"].as_u64())
    };
    assert_eq!(row("completions"), (Some(4), Some(1)), "{stats}");
    assert_eq!(row("chat_completions"), (Some(0), Some(0)), "{stats}");
    assert_eq!(stats["semantic_hits"], 1, "{stats}");
    let metrics = semcache.get_text("/metrics").await;
    assert!(
        metrics.contains("semcache_surface_requests_total{surface=\"completions\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("semcache_surface_hits_total{surface=\"completions\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("semcache_surface_hits_total{surface=\"chat_completions\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_streamed_miss_is_relayed_and_stored_and_hits_replay_both_ways() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;

    let miss = complete(&semcache, &streamed("What are your opening hours on Sunday?")).await;
    assert_eq!((miss.status, miss.cache()), (200, "miss"));
    let events = miss.sse_events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text = streamed_text(&events);
    assert!(
        text.contains("Completion #1 of: What are your opening hours on Sunday?"),
        "{text}"
    );
    // The usage chunk semcache asked for is not passed on to a client that did not.
    assert!(
        events.iter().all(|data| !data.contains("\"usage\"")),
        "{events:?}"
    );

    let replayed = complete(&semcache, &streamed("When are you open on Sundays?")).await;
    assert_eq!(replayed.cache(), "hit");
    assert_eq!(streamed_text(&replayed.sse_events()), text);

    let mut with_usage = streamed("When are you open on Sundays?");
    with_usage["stream_options"] = json!({"include_usage": true});
    let replayed = complete(&semcache, &with_usage).await.sse_events();
    let usage: Vec<Value> = replayed
        .iter()
        .filter(|data| data.as_str() != "[DONE]")
        .map(|data| serde_json::from_str::<Value>(data).unwrap()["usage"].clone())
        .filter(|usage| !usage.is_null())
        .collect();
    assert_eq!(
        usage,
        [json!({"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14})]
    );

    let json = complete(&semcache, &body("When are you open on Sundays?")).await;
    assert_eq!(json.cache(), "hit");
    assert_eq!(json.json()["choices"][0]["text"], text.as_str());
    assert_eq!(json.json()["choices"][0]["finish_reason"], "length");
    assert_eq!(upstream.completion_calls(), 1);
}

#[tokio::test]
async fn an_answer_is_served_only_on_the_surface_that_stored_it() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let prompt = "How do I cancel my subscription?";
    let chat = semcache.chat(&chat_body(prompt)).await;
    assert_eq!(chat.cache(), "miss");
    let completion = complete(&semcache, &json!({"model": "gpt-4o-mini", "prompt": prompt})).await;
    assert_eq!(completion.cache(), "miss");
    assert_eq!(completion.json()["object"], "text_completion");
    assert_eq!(
        semcache.chat(&chat_body(prompt)).await.json()["object"],
        "chat.completion"
    );
    assert_eq!((upstream.chat_calls(), upstream.completion_calls()), (1, 1));
}

#[tokio::test]
async fn requests_for_several_answers_or_an_echo_are_forwarded_and_not_stored() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    for extra in [
        json!({"n": 2}),
        json!({"best_of": 3}),
        json!({"echo": true}),
        json!({"prompt": ["How do I reset my password?", "Where is my order?"]}),
        json!({"prompt": [101, 2129, 2079]}),
    ] {
        let mut request = body("How do I reset my password?");
        for (field, value) in extra.as_object().unwrap() {
            request[field] = value.clone();
        }
        for _ in 0..2 {
            let reply = complete(&semcache, &request).await;
            assert_eq!((reply.status, reply.cache()), (200, "bypass"), "{request}");
        }
    }
    assert_eq!(upstream.completion_calls(), 10);
}

#[tokio::test]
async fn bad_bodies_and_upstream_failures_get_openai_errors_and_store_nothing() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    for (bad, param) in [
        (json!({"prompt": "hi"}), "model"),
        (json!({"model": "m", "prompt": 42}), "prompt"),
        (json!({"model": "m", "prompt": "hi", "n": 0}), "n"),
        (json!({"model": "m", "prompt": "hi", "stream": "yes"}), "stream"),
    ] {
        let reply = complete(&semcache, &bad).await;
        assert_eq!(reply.status, 400, "{bad}");
        let error = &reply.json()["error"];
        assert_eq!(error["type"], "invalid_request_error", "{error}");
        assert_eq!(error["param"], param, "{error}");
    }
    assert_eq!(upstream.completion_calls(), 0);
    assert_eq!(semcache.get_json("/stats").await["entries"], 0);

    upstream.set_mode(Mode::Status(503));
    let failed = complete(&semcache, &body("How do I reset my password?")).await;
    assert_eq!(failed.status, 503);
    assert_eq!(failed.json()["error"]["message"], "upstream says no");

    upstream.set_mode(Mode::BrokenStream);
    let broken = complete(&semcache, &streamed("How do I reset my password?")).await;
    let events = broken.sse_events();
    assert!(
        events
            .last()
            .is_some_and(|data| data.contains("upstream_stream_broken")),
        "{events:?}"
    );
    assert_eq!(semcache.get_json("/stats").await["entries"], 0);

    upstream.set_mode(Mode::Normal);
    let answered = complete(&semcache, &body("How do I reset my password?")).await;
    assert_eq!((answered.status, answered.cache()), (200, "miss"));
    assert_eq!(
        complete(&semcache, &body("How do I reset my password?"))
            .await
            .cache(),
        "hit"
    );
}
