//! Overload: past the bound on requests in flight and waiting, clients get 503 with
//! `Retry-After` at once, in OpenAI's error shape, and nothing else changes.

use std::time::{Duration, Instant};

use crate::support::{chat_body, Reply, Semcache, TestUpstream, KEY_A};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_bounds_the_service_sheds_load_quickly() {
    let upstream = TestUpstream::start().await;
    upstream.set_delay(Duration::from_millis(800));
    let semcache = Semcache::start_with(&upstream, |args| {
        args.max_in_flight = 1;
        args.max_waiting = 1;
        args.max_wait_ms = 300;
    })
    .await;

    // One in flight, one waiting (and giving up after 300 ms), one turned away at once.
    let slow = |prompt: &'static str| {
        let request = semcache
            .http
            .post(semcache.url("/v1/chat/completions"))
            .bearer_auth(KEY_A)
            .json(&chat_body(prompt));
        tokio::spawn(async move { Reply::from(request.send().await.unwrap()).await })
    };
    let first = slow("What is the tallest mountain in Europe?");
    semcache.wait_for_stat("in_flight", 1).await;
    let waiting = slow("How many moons does Jupiter have?");
    semcache.wait_for_stat("waiting", 1).await;
    let started = Instant::now();
    let turned_away = semcache.chat(&chat_body("Who wrote Don Quixote?")).await;
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "no wait: {:?}",
        started.elapsed()
    );
    assert_eq!(turned_away.status, 503);
    assert_eq!(turned_away.header("retry-after"), Some("1"));
    let error = &turned_away.json()["error"];
    assert_eq!(error["type"], "server_error");
    assert_eq!(error["code"], "overloaded");

    let waiting = waiting.await.unwrap();
    assert_eq!(
        waiting.status, 503,
        "the waiting request gave up after --max-wait-ms"
    );
    assert_eq!(first.await.unwrap().status, 200);

    // Health, stats and feedback are never shed; once the load is gone, requests go through.
    assert_eq!(
        semcache
            .http
            .get(semcache.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let stats = semcache.get_json("/stats").await;
    assert_eq!(stats["shed"], 2, "{stats}");
    assert_eq!(
        upstream.chat_calls(),
        1,
        "shed requests never reached the upstream"
    );
    let after = semcache.chat(&chat_body("Who wrote Don Quixote?")).await;
    assert_eq!(after.status, 200);
}
