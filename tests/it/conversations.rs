//! Conversations compared by meaning (`--context semantic`) end to end: real model, real HTTP.

use semcache::config::ContextMode;
use serde_json::{json, Value};

use crate::support::{histogram_total, Semcache, TestUpstream};

/// A chat of `turns` (user first, then alternating) before the last user message `last`.
fn chat(turns: &[&str], last: &str) -> Value {
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful support assistant."})];
    for (i, text) in turns.iter().enumerate() {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": text}));
    }
    messages.push(json!({"role": "user", "content": last}));
    json!({"model": "gpt-4o-mini", "messages": messages})
}

const STREAMING: [&str; 2] = [
    "Hi, I want to stop paying for my Netflix Premium subscription.",
    "I can help with your Netflix Premium subscription. What would you like to do?",
];
const STREAMING_REWORDED: [&str; 2] = [
    "Hello, I'd like to stop paying for my Netflix Premium subscription.",
    "Sure, I can help with the Netflix Premium subscription. What should I do?",
];
const GYM: [&str; 2] = [
    "Hi, I want to stop paying for my FitLife gym membership.",
    "I can help with your FitLife gym membership. What would you like to do?",
];

async fn patch_config(semcache: &Semcache, body: Value) -> (u16, Value) {
    let reply = semcache
        .admin(reqwest::Method::PATCH, "/admin/config", Some(body))
        .await;
    (reply.status, reply.json())
}

/// How the cache answered the chat of `turns` before `last` (the `x-semcache` header).
async fn cache_outcome(semcache: &Semcache, turns: &[&str], last: &str) -> String {
    semcache.chat(&chat(turns, last)).await.cache().to_owned()
}

/// A settings change the admin API refuses, in the OpenAI error shape.
async fn assert_patch_refused(semcache: &Semcache, bad: Value) {
    let (status, body) = patch_config(semcache, bad.clone()).await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{bad}");
}

#[tokio::test]
async fn a_reworded_conversation_hits_and_a_swapped_subject_does_not() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| args.context = ContextMode::Semantic).await;

    let stored = semcache.chat(&chat(&STREAMING, "Please cancel it.")).await;
    assert_eq!((stored.status, stored.cache()), (200, "miss"));
    let reworded = semcache
        .chat(&chat(&STREAMING_REWORDED, "Please cancel it."))
        .await;
    assert_eq!(
        reworded.cache(),
        "hit",
        "similarity {:?}",
        reworded.header("x-semcache-similarity")
    );
    assert_eq!(reworded.content(), stored.content());
    let swapped = semcache.chat(&chat(&GYM, "Please cancel it.")).await;
    assert_eq!(
        swapped.cache(),
        "miss",
        "the same last message about another subject"
    );
    assert_ne!(swapped.content(), stored.content());
    // The same conversation word for word is an exact hit in this mode too.
    let again = semcache.chat(&chat(&STREAMING, "Please cancel it.")).await;
    assert_eq!((again.cache(), again.similarity()), ("hit", 1.0));
    assert_eq!(upstream.chat_calls(), 2);

    // Another amount in an earlier turn: close in meaning, refused for the detail.
    let charged = |amount: &str| {
        let first = format!("I was charged {amount} twice this month for my Netflix Premium subscription.");
        chat(
            &[&first, "Sorry about that! I can look into the duplicate charge."],
            "Can you refund it?",
        )
    };
    semcache.chat(&charged("$49.99")).await;
    let other_amount = semcache.chat(&charged("$19.99")).await;
    assert_eq!(other_amount.cache(), "miss");
    assert_eq!(upstream.chat_calls(), 4);

    let stats = semcache.get_json("/stats").await;
    assert_eq!(stats["context"], "semantic");
    assert_eq!(stats["conversation_hits"], 1, "{stats}");
    // The gym chat (its request's decision differs) and the other amount.
    assert_eq!(stats["conversation_refusals"], 2, "{stats}");
    assert_eq!(stats["verifier_refusals"]["intent"], 1, "{stats}");
    assert_eq!(stats["verifier_refusals"]["number"], 1, "{stats}");
    assert_eq!(stats["semantic_hits"], 0, "{stats}");
    assert_eq!(stats["exact_hits"], 1, "{stats}");
    assert_eq!(
        histogram_total(&stats, "conversation_near_misses"),
        3,
        "the traps' nearest candidate is in the conversation histogram: {stats}"
    );
    let metrics = semcache.get_text("/metrics").await;
    assert!(metrics.contains("semcache_requests_total{outcome=\"conversation_hit\"} 1"));
    semcache.stop().await;
}

#[tokio::test]
async fn in_exact_mode_earlier_turns_match_word_for_word_and_the_mode_switches_live() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    assert_eq!(semcache.get_json("/admin/config").await["context"], "exact");

    semcache.chat(&chat(&STREAMING, "Please cancel it.")).await;
    let reworded = chat(&STREAMING_REWORDED, "Please cancel it.");
    assert_eq!(semcache.chat(&reworded).await.cache(), "miss");
    // An entry stored in a conversation, in semantic mode, serves nothing once back in exact.
    let (status, config) = patch_config(&semcache, json!({"context": "semantic"})).await;
    assert_eq!((status, &config["context"]), (200, &json!("semantic")));
    semcache.chat(&chat(&GYM, "Please cancel it.")).await;
    let gym_reworded = [
        "Hello, I'd like to stop paying for my FitLife gym membership.",
        "Sure, I can help with the FitLife gym membership. What should I do?",
    ];
    assert_eq!(
        cache_outcome(&semcache, &gym_reworded, "Please cancel it.").await,
        "hit"
    );

    for bad in [json!({"context": "fuzzy"}), json!({"context": 1})] {
        assert_patch_refused(&semcache, bad).await;
    }
    let (status, _) = patch_config(&semcache, json!({"context": "exact"})).await;
    assert_eq!(status, 200);
    let third = [
        "Hey, I want to stop paying for my FitLife gym membership.",
        "Of course, I can help with the FitLife gym membership. What would you like?",
    ];
    assert_eq!(
        cache_outcome(&semcache, &third, "Please cancel it.").await,
        "miss"
    );
    // Nor does an entry stored in a conversation serve a first message in exact mode, even one
    // that says word for word what was compared.
    let listed = semcache.get_json("/admin/entries").await;
    let compared = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["prompt"].as_str().unwrap().to_owned())
        .find(|prompt| prompt.contains("FitLife"))
        .expect("the gym conversation's entry");
    assert!(compared.ends_with("Please cancel it."), "{compared}");
    assert_eq!(semcache.chat(&chat(&[], &compared)).await.cache(), "miss");
    // A first message still hits by meaning in either mode.
    semcache.chat(&chat(&[], "How do I reset my password?")).await;
    assert_eq!(
        cache_outcome(&semcache, &[], "How can I reset my password?").await,
        "hit"
    );
    semcache.stop().await;
}

#[tokio::test]
async fn an_entry_stored_in_a_conversation_keeps_its_context_across_a_restart() {
    let upstream = TestUpstream::start().await;
    let data_dir = crate::support::fresh_data_dir();
    let _removed = crate::support::RemovedOnDrop(data_dir.clone());
    let start = || {
        Semcache::start_with(&upstream, |args| {
            args.data_dir = data_dir.clone();
            args.context = ContextMode::Semantic;
        })
    };
    let semcache = start().await;
    semcache.chat(&chat(&STREAMING, "Please cancel it.")).await;
    semcache.stop().await;

    let restarted = start().await;
    let reworded = restarted
        .chat(&chat(&STREAMING_REWORDED, "Please cancel it."))
        .await;
    assert_eq!(reworded.cache(), "hit");
    assert_eq!(
        restarted.chat(&chat(&GYM, "Please cancel it.")).await.cache(),
        "miss"
    );
    assert_eq!(
        restarted
            .chat(&chat(&STREAMING, "Please cancel it."))
            .await
            .similarity(),
        1.0
    );
    assert_eq!(upstream.chat_calls(), 2);
    restarted.stop().await;
}

#[tokio::test]
async fn conversations_have_a_threshold_of_their_own() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| args.context = ContextMode::Semantic).await;
    let config = semcache.get_json("/admin/config").await;
    assert_eq!(
        (config["threshold"].as_f64(), config["context_threshold"].as_f64()),
        (Some(0.82), Some(0.7)),
        "{config}"
    );
    semcache.chat(&chat(&STREAMING, "Please cancel it.")).await;
    semcache.chat(&chat(&[], "How do I reset my password?")).await;

    // Conversations above the single-message threshold, by their own.
    let (status, config) = patch_config(&semcache, json!({"context_threshold": 0.999})).await;
    assert_eq!((status, config["context_threshold"].as_f64()), (200, Some(0.999)));
    assert_eq!(
        cache_outcome(&semcache, &STREAMING_REWORDED, "Please cancel it.").await,
        "miss"
    );
    let first_message = chat(&[], "How can I reset my password?");
    assert_eq!(semcache.chat(&first_message).await.cache(), "hit");

    // And below it: a single message no longer hits, a conversation still does.
    let (status, _) = patch_config(&semcache, json!({"threshold": 0.999, "context_threshold": 0.7})).await;
    assert_eq!(status, 200);
    assert_eq!(
        cache_outcome(&semcache, &[], "How could I reset my password?").await,
        "miss"
    );
    let another = [
        "Hello there, I would like to stop paying for the Netflix Premium subscription I have.",
        "Sure thing, I can help with that Netflix Premium subscription. What should I do?",
    ];
    let reply = semcache.chat(&chat(&another, "Please cancel it.")).await;
    assert_eq!(reply.cache(), "hit");
    let similarity: f64 = reply.header("x-semcache-similarity").unwrap().parse().unwrap();
    assert!((0.7..1.0).contains(&similarity), "{similarity}");

    for bad in [
        json!({"context_threshold": 1.5}),
        json!({"context_threshold": "high"}),
    ] {
        assert_patch_refused(&semcache, bad).await;
    }
    let config = semcache.get_json("/admin/config").await;
    assert_eq!(config["context_threshold"].as_f64(), Some(0.7), "{config}");
    assert_eq!(
        semcache.get_json("/stats").await["context_threshold"].as_f64(),
        Some(0.7)
    );
    let metrics = semcache.get_text("/metrics").await;
    assert!(
        metrics.contains("semcache_context_similarity_threshold 0.7"),
        "{metrics}"
    );
    semcache.stop().await;
}
