//! Answer quality through HTTP: the hit verifier and application feedback.

use serde_json::json;

use crate::support::{chat_body, Reply, Semcache, TestUpstream, KEY_A, KEY_B};

#[tokio::test]
async fn the_verifier_refuses_near_identical_prompts_that_need_another_answer() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    semcache
        .chat(&chat_body("Is the pharmacy open on Christmas Day?"))
        .await;
    semcache
        .chat(&chat_body("What is the status of order 1182?"))
        .await;

    for trap in [
        "Is the pharmacy closed on Christmas Day?",
        "What is the status of order 1183?",
    ] {
        assert_eq!(semcache.chat(&chat_body(trap)).await.cache(), "miss", "{trap}");
    }
    let stats = semcache.get_json("/stats").await;
    assert_eq!(stats["verifier_refusals"]["negation"], 1, "{stats}");
    assert_eq!(stats["verifier_refusals"]["number"], 1, "{stats}");

    // Turned off through the admin API, the same trap is served: the threshold alone cannot tell.
    let patch = semcache
        .http
        .patch(semcache.url("/admin/config"))
        .json(&json!({"verify": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(patch.status(), 200);
    let trap = semcache
        .chat(&chat_body("Is the pharmacy shut on Christmas Day?"))
        .await;
    assert_eq!(trap.cache(), "hit");
}

#[tokio::test]
async fn wrong_answer_reports_raise_the_entry_threshold_then_evict_it() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    semcache.chat(&chat_body("How do I reset my password?")).await;
    let paraphrase = semcache.chat(&chat_body("How can I reset my password?")).await;
    assert_eq!(paraphrase.cache(), "hit");
    let entry_id: u64 = paraphrase.header("x-semcache-entry").unwrap().parse().unwrap();
    let similarity = paraphrase.similarity();

    let report = |key: &str, body: serde_json::Value| {
        let request = semcache
            .http
            .post(semcache.url("/v1/semcache/feedback"))
            .bearer_auth(key)
            .json(&body);
        async move { Reply::from(request.send().await.unwrap()).await }
    };
    let other_tenant = report(KEY_B, json!({"entry_id": entry_id, "correct": false})).await;
    assert_eq!(
        other_tenant.status, 404,
        "another key cannot report on this tenant's entry"
    );
    assert_eq!(report(KEY_A, json!({"entry_id": "x"})).await.status, 400);

    let raised = report(
        KEY_A,
        json!({"entry_id": entry_id, "correct": false, "similarity": similarity}),
    )
    .await;
    assert_eq!(raised.json()["action"], "threshold_raised");
    assert!(raised.json()["threshold"].as_f64().unwrap() > f64::from(similarity));
    assert_eq!(
        semcache
            .chat(&chat_body("How can I reset my password?"))
            .await
            .cache(),
        "miss"
    );
    assert_eq!(
        semcache
            .chat(&chat_body("How do I reset my password?"))
            .await
            .cache(),
        "hit",
        "exact still served"
    );

    assert_eq!(
        report(KEY_A, json!({"entry_id": entry_id, "correct": true}))
            .await
            .json()["action"],
        "noted"
    );
    report(
        KEY_A,
        json!({"entry_id": entry_id, "correct": false, "similarity": 0.9}),
    )
    .await;
    let evicted = report(
        KEY_A,
        json!({"entry_id": entry_id, "correct": false, "similarity": 0.9}),
    )
    .await;
    assert_eq!(evicted.json()["action"], "evicted");
    let gone = semcache
        .http
        .delete(semcache.url(&format!("/admin/entries/{entry_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404, "the evicted entry is gone");

    let stats = semcache.get_json("/stats").await;
    assert_eq!(stats["feedback"], json!({"correct": 1, "wrong": 3}));
}

/// A document of about 400 tokens, longer than the model's 256-token window.
fn long_document() -> String {
    let sentence = "The committee reviewed the quarterly report on regional water supplies, \
                    noting that reservoir levels in the northern district had recovered after \
                    the spring rains while the southern pumping stations still ran below capacity. ";
    sentence.repeat(10)
}

#[tokio::test]
async fn long_prompts_that_differ_past_the_model_window_are_not_served_as_each_other() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let document = long_document();
    let ask = |question: &str| format!("{document}\n\nand now {question}");

    semcache
        .chat(&chat_body(&ask("summarise it in a short paragraph.")))
        .await;
    // The model reads only the first 256 tokens: to it both prompts are the document alone
    // and score about 1.0. Only the text decides.
    let other = semcache
        .chat(&chat_body(&ask("list the risks it mentions as bullet points.")))
        .await;
    assert_eq!(other.cache(), "miss");
    let stats = semcache.get_json("/stats").await;
    assert_eq!(stats["verifier_refusals"]["beyond_model_window"], 1, "{stats}");

    // Differences inside the window are still the model's to judge: the same document after a
    // reworded instruction is the same request.
    let document_first = format!("Summarise the following text.\n\n{document}");
    semcache.chat(&chat_body(&document_first)).await;
    let reworded = semcache
        .chat(&chat_body(&format!("Please summarize this text.\n\n{document}")))
        .await;
    assert_eq!(reworded.cache(), "hit", "{:?}", reworded.body);
}
