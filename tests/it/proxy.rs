//! The caching proxy end to end: real model, real HTTP, a test upstream that counts its calls.

use std::time::Duration;

use semcache::config::Scope;
use serde_json::json;

use crate::support::{chat_body, stream_body, Mode, Semcache, TestUpstream, KEY_A, KEY_B};

#[tokio::test]
async fn a_repeated_prompt_calls_the_upstream_once() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let body = chat_body("What are your opening hours on weekdays?");

    let first = semcache.chat(&body).await;
    assert_eq!((first.status, first.cache()), (200, "miss"));
    let second = semcache.chat(&body).await;
    assert_eq!((second.status, second.cache()), (200, "hit"));
    assert_eq!(second.header("x-semcache-similarity"), Some("1.0000"));
    assert!(second.header("x-semcache-entry").is_some());

    assert_eq!(upstream.chat_calls(), 1);
    assert_eq!(second.content(), first.content());
    let (a, b) = (first.json(), second.json());
    assert_ne!(a["id"], b["id"], "a hit gets a fresh id");
    assert_eq!(b["object"], "chat.completion");
    assert_eq!(b["usage"], a["usage"], "a hit keeps the stored usage");
    assert_eq!(b["choices"], a["choices"]);
}

#[tokio::test]
async fn a_paraphrase_is_a_semantic_hit_and_an_unrelated_prompt_a_miss() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;

    let original = semcache.chat(&chat_body("How do I reset my password?")).await;
    let paraphrase = semcache.chat(&chat_body("How can I reset my password?")).await;
    assert_eq!(paraphrase.cache(), "hit");
    let similarity = paraphrase.similarity();
    assert!((0.82..1.0).contains(&similarity), "similarity {similarity}");
    assert_eq!(paraphrase.content(), original.content());
    assert_eq!(upstream.chat_calls(), 1);

    let unrelated = semcache
        .chat(&chat_body("What is the capital of Australia?"))
        .await;
    assert_eq!(unrelated.cache(), "miss");
    assert_eq!(upstream.chat_calls(), 2);
    assert!(unrelated.content().contains("capital of Australia"));
}

#[tokio::test]
async fn a_different_context_is_never_served_the_same_answer() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let prompt = "How do I reset my password?";
    semcache.chat(&chat_body(prompt)).await;

    let mut other_system = chat_body(prompt);
    other_system["messages"][0]["content"] = json!("You are a pirate. Answer like one.");
    assert_eq!(semcache.chat(&other_system).await.cache(), "miss");

    let mut other_turns = chat_body(prompt);
    other_turns["messages"].as_array_mut().unwrap().splice(
        1..1,
        [
            json!({"role": "user", "content": "I use the mobile app."}),
            json!({"role": "assistant", "content": "Noted."}),
        ],
    );
    assert_eq!(semcache.chat(&other_turns).await.cache(), "miss");

    let mut other_params = chat_body(prompt);
    other_params["temperature"] = json!(1.5);
    assert_eq!(semcache.chat(&other_params).await.cache(), "miss");

    let mut other_model = chat_body(prompt);
    other_model["model"] = json!("gpt-4o");
    assert_eq!(semcache.chat(&other_model).await.cache(), "miss");

    assert_eq!(upstream.chat_calls(), 5);
}

#[tokio::test]
async fn tenants_are_isolated_unless_the_scope_is_shared() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let body = chat_body("Where is my parcel?");
    semcache.chat_as(KEY_A, &body, &[]).await;
    let other_key = semcache.chat_as(KEY_B, &body, &[]).await;
    assert_eq!(other_key.cache(), "miss");
    assert_eq!(upstream.chat_calls(), 2);
    assert_eq!(semcache.chat_as(KEY_B, &body, &[]).await.cache(), "hit");
    // Each client's own key went upstream, since no upstream key is configured.
    assert_eq!(
        upstream.authorizations(),
        vec![format!("Bearer {KEY_A}"), format!("Bearer {KEY_B}")]
    );

    let shared_upstream = TestUpstream::start().await;
    let shared = Semcache::start_with(&shared_upstream, |args| {
        args.scope = Scope::Shared;
        args.upstream_api_key = Some("sk-upstream-secret".into());
    })
    .await;
    shared.chat_as(KEY_A, &body, &[]).await;
    assert_eq!(shared.chat_as(KEY_B, &body, &[]).await.cache(), "hit");
    assert_eq!(
        shared_upstream.authorizations(),
        vec!["Bearer sk-upstream-secret".to_owned()]
    );
}

#[tokio::test]
async fn streamed_misses_and_hits_are_proper_sse_and_interchange_with_plain_answers() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;

    let streamed_miss = semcache
        .chat(&stream_body("Tell me a fact about octopuses."))
        .await;
    assert_eq!(streamed_miss.cache(), "miss");
    assert_eq!(streamed_miss.header("content-type"), Some("text/event-stream"));
    let content = streamed_miss.content();
    assert_eq!(content, "Answer #1 to: Tell me a fact about octopuses.");
    // semcache asked upstream for usage, but the client did not: no usage chunk reaches it.
    assert!(streamed_miss
        .sse_events()
        .iter()
        .all(|e| !e.contains("\"usage\":{")));

    let streamed_hit = semcache
        .chat(&stream_body("Tell me a fact about octopuses."))
        .await;
    assert_eq!(streamed_hit.cache(), "hit");
    assert_eq!(streamed_hit.content(), content);

    let plain_hit = semcache.chat(&chat_body("Tell me a fact about octopuses.")).await;
    assert_eq!(plain_hit.cache(), "hit");
    assert_eq!(plain_hit.content(), content);
    assert_eq!(
        plain_hit.json()["usage"]["total_tokens"],
        18,
        "usage of a streamed answer is kept"
    );

    semcache.chat(&chat_body("Tell me a fact about dolphins.")).await;
    let mut with_usage = stream_body("Tell me a fact about dolphins.");
    with_usage["stream_options"] = json!({"include_usage": true});
    let replayed = semcache.chat(&with_usage).await;
    assert_eq!(replayed.cache(), "hit");
    assert_eq!(replayed.content(), "Answer #2 to: Tell me a fact about dolphins.");
    let usage_chunk = replayed.sse_events().iter().rev().nth(1).cloned().unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&usage_chunk).unwrap()["usage"]["total_tokens"],
        18
    );

    assert_eq!(upstream.chat_calls(), 2);
}

#[tokio::test]
async fn upstream_errors_pass_through_and_are_not_stored() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let body = chat_body("Is the service up?");

    upstream.set_mode(Mode::Status(500));
    let failed = semcache.chat(&body).await;
    assert_eq!(failed.status, 500);
    assert_eq!(failed.json()["error"]["message"], "upstream says no");
    assert_eq!(failed.header("retry-after"), Some("7"));

    upstream.set_mode(Mode::Status(429));
    assert_eq!(
        semcache.chat(&stream_body("Is the service up?")).await.status,
        429
    );

    upstream.set_mode(Mode::Normal);
    assert_eq!(semcache.chat(&body).await.cache(), "miss");
    assert_eq!(upstream.chat_calls(), 3);
}

#[tokio::test]
async fn broken_or_unfinished_streams_are_not_stored() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let body = stream_body("Summarise the plot of Hamlet.");

    upstream.set_mode(Mode::BrokenStream);
    let broken = semcache.chat(&body).await;
    assert_eq!(broken.status, 200, "the stream had started");
    let events = broken.sse_events();
    assert_ne!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        events.last().unwrap().contains("upstream_stream_broken"),
        "{events:?}"
    );

    upstream.set_mode(Mode::UnfinishedStream);
    semcache.chat(&body).await;

    upstream.set_mode(Mode::Normal);
    assert_eq!(semcache.chat(&body).await.cache(), "miss");
    assert_eq!(semcache.chat(&body).await.cache(), "hit");
    assert_eq!(upstream.chat_calls(), 3);
}

#[tokio::test]
async fn no_cache_refreshes_and_no_store_leaves_no_trace() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let body = chat_body("What's new in the latest release?");
    semcache.chat(&body).await;

    let refreshed = semcache
        .chat_as(KEY_A, &body, &[("cache-control", "no-cache")])
        .await;
    assert_eq!(refreshed.cache(), "miss");
    assert_eq!(
        refreshed.content(),
        "Answer #2 to: What's new in the latest release?"
    );
    let after = semcache.chat(&body).await;
    assert_eq!(
        (after.cache(), after.content()),
        ("hit", refreshed.content()),
        "the fresh answer replaced the old"
    );

    let private = chat_body("My account number is 12345, what is my balance?");
    let unstored = semcache
        .chat_as(KEY_A, &private, &[("cache-control", "no-store")])
        .await;
    assert_eq!(unstored.cache(), "bypass");
    assert_eq!(
        semcache.chat(&private).await.cache(),
        "miss",
        "no-store stored nothing"
    );
    let no_store_on_hit = semcache
        .chat_as(KEY_A, &private, &[("cache-control", "no-store")])
        .await;
    assert_eq!(
        no_store_on_hit.cache(),
        "bypass",
        "no-store does not look up either"
    );
    assert_eq!(upstream.chat_calls(), 5);
}

#[tokio::test]
async fn identical_concurrent_misses_make_one_upstream_call() {
    let upstream = TestUpstream::start().await;
    upstream.set_delay(Duration::from_millis(400));
    let semcache = Semcache::start(&upstream).await;
    let body = chat_body("Explain the refund policy in one sentence.");

    let requests = (0..10).map(|i| {
        let body = if i % 2 == 0 {
            body.clone()
        } else {
            let mut streamed = body.clone();
            streamed["stream"] = json!(true);
            streamed
        };
        let semcache = &semcache;
        async move { semcache.chat(&body).await }
    });
    let replies = futures::future::join_all(requests).await;
    assert_eq!(upstream.chat_calls(), 1);
    for reply in &replies {
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.content(),
            "Answer #1 to: Explain the refund policy in one sentence."
        );
    }
    assert_eq!(replies.iter().filter(|r| r.cache() == "miss").count(), 1);
}

#[tokio::test]
async fn bad_requests_get_openai_errors_and_never_reach_the_upstream() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| args.max_body_bytes = 4096).await;
    let post = |body: String| {
        let request = semcache
            .http
            .post(semcache.url("/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .header("content-type", "application/json")
            .body(body);
        async move { crate::support::Reply::from(request.send().await.unwrap()).await }
    };

    for (body, param) in [
        ("{\"model\": \"m\", \"messages\": [".to_owned(), None),
        (
            json!({"model": "m", "messages": "hi"}).to_string(),
            Some("messages"),
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "warm"})
                .to_string(),
            Some("temperature"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}]}).to_string(),
            Some("model"),
        ),
    ] {
        let reply = post(body.clone()).await;
        assert_eq!(reply.status, 400, "{body}");
        let error = &reply.json()["error"];
        assert_eq!(error["type"], "invalid_request_error", "{body}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(error["param"].as_str(), param, "{body}");
    }

    let huge = chat_body(&"x".repeat(10_000));
    let reply = post(huge.to_string()).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.json()["error"]["code"], "request_too_large");

    let low = semcache
        .chat_as(KEY_A, &chat_body("hi"), &[("x-semcache-threshold", "0.5")])
        .await;
    assert_eq!(low.status, 400);
    assert_eq!(low.json()["error"]["param"], "x-semcache-threshold");
    let garbage = semcache
        .chat_as(KEY_A, &chat_body("hi"), &[("x-semcache-threshold", "high")])
        .await;
    assert_eq!(garbage.status, 400);

    assert_eq!(upstream.chat_calls(), 0);
}

#[tokio::test]
async fn thresholds_can_be_made_stricter_per_request_and_changed_at_run_time() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    semcache.chat(&chat_body("How do I reset my password?")).await;
    let paraphrase = chat_body("How can I reset my password?");

    // Their similarity is 0.9917.
    let strict = semcache
        .chat_as(KEY_A, &paraphrase, &[("x-semcache-threshold", "0.995")])
        .await;
    assert_eq!(strict.cache(), "miss");
    let lenient = semcache
        .chat_as(
            KEY_A,
            &chat_body("How can I reset my password, please?"),
            &[("x-semcache-threshold", "0.9")],
        )
        .await;
    assert_eq!(lenient.cache(), "hit");

    let set_threshold = |threshold: f32| {
        semcache
            .settings
            .store(std::sync::Arc::new(semcache::settings::Settings {
                threshold,
                verify: true,
                context: semcache::config::ContextMode::Exact,
                context_threshold: semcache::config::DEFAULT_CONTEXT_THRESHOLD,
            }));
    };
    set_threshold(0.999);
    assert_eq!(
        semcache
            .chat(&chat_body("How could I reset my password?"))
            .await
            .cache(),
        "miss"
    );
    set_threshold(0.95);
    assert_eq!(
        semcache
            .chat(&chat_body("How can I reset the password?"))
            .await
            .cache(),
        "hit"
    );
    assert_eq!(upstream.chat_calls(), 3);
}

#[tokio::test]
async fn several_choices_and_other_routes_pass_through_uncached() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let mut body = chat_body("Give me a name for a cat.");
    body["n"] = json!(2);
    assert_eq!(semcache.chat(&body).await.cache(), "bypass");
    assert_eq!(semcache.chat(&body).await.cache(), "bypass");
    assert_eq!(upstream.chat_calls(), 2);

    for _ in 0..2 {
        let models = semcache
            .http
            .get(semcache.url("/v1/models"))
            .bearer_auth(KEY_A)
            .send()
            .await
            .unwrap();
        assert_eq!(models.status(), 200);
        assert!(models.headers().get("x-semcache").is_none());
        let models: serde_json::Value = models.json().await.unwrap();
        assert_eq!(models["data"][0]["id"], "test-model");
    }
    assert_eq!(upstream.other_calls(), 2);

    let health = semcache.http.get(semcache.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

/// The real model, slowed down: a long prompt on a busy machine.
struct SlowModel(std::sync::Arc<dyn semcache::embed::Embedder>);

impl semcache::embed::Embedder for SlowModel {
    fn model_id(&self) -> semcache::embed::EmbedderId {
        self.0.model_id()
    }

    fn seen_len(&self, text: &str) -> Option<usize> {
        self.0.seen_len(text)
    }

    fn dimensions(&self) -> usize {
        self.0.dimensions()
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, semcache::embed::Error> {
        std::thread::sleep(Duration::from_millis(600));
        self.0.embed(texts)
    }
}

#[tokio::test]
async fn a_prompt_with_nothing_to_compare_with_is_embedded_while_the_upstream_works() {
    let upstream = TestUpstream::start().await;
    let model = std::sync::Arc::new(SlowModel(crate::support::embedder()));
    let semcache = Semcache::start_with_embedder(&upstream, model, |_| {}).await;
    upstream.set_delay(Duration::from_millis(600));

    // A new conversation: its context has no entries, so no lookup by meaning can hit and the
    // upstream call need not wait for the model (one after the other would take 1.2 s).
    let started = std::time::Instant::now();
    let first = semcache.chat(&chat_body("How do I reset my password?")).await;
    let took = started.elapsed();
    assert_eq!(first.cache(), "miss");
    assert!(took < Duration::from_millis(1100), "{took:?}");

    // The vector was still stored: a paraphrase is served by meaning.
    let paraphrase = semcache.chat(&chat_body("How can I reset my password?")).await;
    assert_eq!(paraphrase.cache(), "hit");
    assert_eq!(upstream.chat_calls(), 1);
}
