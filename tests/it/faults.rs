//! Upstream faults: whatever the upstream does, the client gets a clear answer or a clearly
//! broken stream, and nothing incomplete is stored.

use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use semcache::embed::{self, Embedder};
use serde_json::json;

use crate::support::{chat_body, embedder, stream_body, Mode, Semcache, TestUpstream};

/// The real model until it is broken, as by a corrupt file read or an out-of-memory.
struct BreakableModel {
    broken: AtomicBool,
}

impl Embedder for BreakableModel {
    fn model_id(&self) -> semcache::embed::EmbedderId {
        embedder().model_id()
    }

    fn seen_len(&self, text: &str) -> Option<usize> {
        embedder().seen_len(text)
    }

    fn dimensions(&self) -> usize {
        384
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, embed::Error> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(embed::Error::Task("the model is broken".to_owned()));
        }
        embedder().embed(texts)
    }
}

#[tokio::test]
async fn a_failing_model_degrades_to_exact_caching_and_is_counted() {
    let upstream = TestUpstream::start().await;
    let model = Arc::new(BreakableModel {
        broken: AtomicBool::new(false),
    });
    let semcache = Semcache::start_with_embedder(&upstream, Arc::clone(&model) as _, |_| {}).await;
    let stored = chat_body("What is the boiling point of water?");
    assert_eq!(semcache.chat(&stored).await.cache(), "miss");
    model.broken.store(true, Ordering::SeqCst);

    // A lookup by meaning needs the model: the call goes through as through a plain proxy,
    // and nothing is stored from it.
    let paraphrase = chat_body("At what temperature does water boil?");
    for _ in 0..2 {
        let reply = semcache.chat(&paraphrase).await;
        assert_eq!(reply.status, 200, "the call still succeeds");
        assert_eq!(reply.cache(), "bypass");
        assert!(reply.content().starts_with("Answer #"), "{}", reply.content());
    }
    // Exact matches need no model.
    assert_eq!(semcache.chat(&stored).await.cache(), "hit");
    // A new conversation has nothing to compare with by meaning: its answer is stored for
    // exact matches only.
    let new_context = json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "What is the boiling point of water?"}]});
    assert_eq!(semcache.chat(&new_context).await.cache(), "miss");
    assert_eq!(semcache.chat(&new_context).await.cache(), "hit");

    assert_eq!(upstream.chat_calls(), 4);
    let stats = semcache.get_json("/stats").await;
    assert_eq!(stats["cache_failures"], 3, "{stats}");
    assert_eq!(stats["bypassed"], 2, "{stats}");
    assert_eq!(stats["indexed"], 1, "{stats}");
    let metrics = semcache.get_text("/metrics").await;
    assert!(metrics.contains("semcache_cache_failures_total 3"), "{metrics}");
}

#[tokio::test]
async fn a_slow_upstream_times_out_with_504_and_nothing_is_stored() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| args.upstream_timeout_secs = 1).await;
    upstream.set_delay(Duration::from_millis(1500));
    let started = Instant::now();
    let late = semcache.chat(&chat_body("What is the speed of light?")).await;
    assert!(
        started.elapsed() < Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(late.status, 504);
    assert_eq!(late.json()["error"]["code"], "upstream_timeout");
    assert_eq!(late.json()["error"]["type"], "upstream_error");

    upstream.set_delay(Duration::ZERO);
    assert_eq!(
        semcache
            .chat(&chat_body("What is the speed of light?"))
            .await
            .cache(),
        "miss",
        "the timed-out call stored nothing"
    );
}

#[tokio::test]
async fn a_stalled_or_garbled_stream_ends_with_an_error_and_is_not_stored() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| args.upstream_timeout_secs = 1).await;
    let body = stream_body("Name the planets of the solar system.");

    for mode in [Mode::StalledStream, Mode::GarbageStream] {
        upstream.set_mode(mode);
        let reply = semcache.chat(&body).await;
        let events = reply.sse_events();
        assert_ne!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "{mode:?}: {events:?}"
        );
        assert!(
            events.last().is_some_and(|e| e.contains("\"error\"")),
            "{mode:?} ends with an error event: {events:?}"
        );
    }

    upstream.set_mode(Mode::Normal);
    assert_eq!(semcache.chat(&body).await.cache(), "miss", "neither was stored");
    assert_eq!(semcache.chat(&body).await.cache(), "hit");
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_that_names_no_address() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| {
        args.upstream = format!("http://127.0.0.1:{port}/v1");
    })
    .await;
    let reply = semcache.chat(&chat_body("Is anyone there?")).await;
    assert_eq!(reply.status, 502);
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "upstream_unreachable");
    assert!(!error.to_string().contains(&port.to_string()), "{error}");
    assert_eq!(semcache.get_json("/stats").await["entries"], 0);
}

/// An upstream whose accept queue is full: the kernel drops further connection attempts, so a
/// connect hangs as it does against a host that is down or firewalled.
async fn unanswered_listener() -> (tokio::net::TcpListener, Vec<std::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    // Fill the queue until a connect attempt goes unanswered.
    while let Ok(stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        queued.push(stream);
        assert!(queued.len() < 64, "the accept queue never filled");
    }
    (listener, queued)
}

#[tokio::test]
async fn a_connect_that_hangs_times_out_with_504_and_nothing_is_stored() {
    let (listener, _queued) = unanswered_listener().await;
    let port = listener.local_addr().unwrap().port();
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| {
        args.upstream = format!("http://127.0.0.1:{port}/v1");
        args.upstream_connect_timeout_secs = 1;
    })
    .await;
    let started = Instant::now();
    let reply = semcache.chat(&chat_body("Is anyone listening?")).await;
    let waited = started.elapsed();
    assert_eq!(reply.status, 504, "{:?}", reply.body);
    let error = &reply.json()["error"];
    assert_eq!(error["code"], "upstream_timeout");
    assert!(!error.to_string().contains(&port.to_string()), "{error}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "gave up after the connect timeout, not the overall one: {waited:?}"
    );
    assert_eq!(semcache.get_json("/stats").await["entries"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_does_not_lose_the_answer_for_others() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let prompt = "Explain photosynthesis in one paragraph.";
    let leaving = semcache
        .http
        .post(semcache.url("/v1/chat/completions"))
        .bearer_auth(crate::support::KEY_A)
        .json(&stream_body(prompt))
        .send()
        .await
        .unwrap();
    assert_eq!(leaving.status(), 200);
    // Headers received, stream begun: the client goes away.
    drop(leaving);
    let other = semcache.chat(&chat_body(prompt)).await;
    assert_eq!(other.status, 200);
    assert!(other.content().starts_with("Answer #1"), "{}", other.content());
    semcache.wait_for_stat("entries", 1).await;
    let later = semcache.chat(&chat_body(prompt)).await;
    assert_eq!(later.cache(), "hit", "the stream was read to the end and stored");
    assert_eq!(upstream.chat_calls(), 1);
}

/// A model whose vectors the index cannot take: the wrong size, or not finite (as a model run
/// in half precision on some CPUs returns).
struct MisshapenModel {
    finite: bool,
}

impl Embedder for MisshapenModel {
    fn model_id(&self) -> semcache::embed::EmbedderId {
        semcache::embed::EmbedderId {
            model: "misshapen".into(),
            backend: "test".into(),
            dimensions: 384,
            weights: "0".into(),
        }
    }

    fn seen_len(&self, _: &str) -> Option<usize> {
        None
    }

    fn dimensions(&self) -> usize {
        384
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, embed::Error> {
        let vector = if self.finite {
            vec![0.5; 7]
        } else {
            vec![f32::NAN; 384]
        };
        Ok(texts.iter().map(|_| vector.clone()).collect())
    }
}

#[tokio::test]
async fn vectors_the_index_cannot_take_are_refused_and_counted() {
    for finite in [true, false] {
        let upstream = TestUpstream::start().await;
        let model = Arc::new(MisshapenModel { finite });
        let semcache = Semcache::start_with_embedder(&upstream, model, |_| {}).await;
        for prompt in [
            "What is the boiling point of water?",
            "At what temperature does water boil?",
        ] {
            let reply = semcache.chat(&chat_body(prompt)).await;
            assert_eq!(reply.status, 200, "{:?}", reply.body);
            assert!(reply.content().starts_with("Answer #"), "{}", reply.content());
        }
        assert_eq!(
            upstream.chat_calls(),
            2,
            "finite: {finite}: nothing served from a bad vector"
        );
        let stats = semcache.get_json("/stats").await;
        assert_eq!(stats["cache_failures"], 2, "finite: {finite}: {stats}");
        assert_eq!(stats["indexed"], 0, "finite: {finite}: {stats}");
    }
}
