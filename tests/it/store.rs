//! The durable store through the HTTP API: restart, expiry, eviction, invalidation.

use semcache::cache::Eviction;
use serde_json::json;

use crate::support::{chat_body, fresh_data_dir, Semcache, TestUpstream, KEY_A, KEY_B};

#[tokio::test]
async fn entries_survive_a_restart_with_the_same_answers() {
    let upstream = TestUpstream::start().await;
    let data_dir = fresh_data_dir();
    let start = || Semcache::start_with(&upstream, |args| args.data_dir = data_dir.clone());
    let prompts = [
        "How do I reset my password?",
        "What is the capital of Australia?",
        "Tell me a fact about octopuses.",
    ];

    let semcache = start().await;
    let mut answers = Vec::new();
    for prompt in prompts {
        let reply = semcache.chat(&chat_body(prompt)).await;
        assert_eq!(reply.cache(), "miss");
        answers.push(reply.content());
    }
    semcache.stop().await;

    let restarted = start().await;
    for (prompt, answer) in prompts.iter().zip(&answers) {
        let reply = restarted.chat(&chat_body(prompt)).await;
        assert_eq!((reply.cache(), &reply.content()), ("hit", answer), "{prompt}");
    }
    let paraphrase = restarted.chat(&chat_body("How can I reset my password?")).await;
    assert_eq!(
        (paraphrase.cache(), paraphrase.content()),
        ("hit", answers[0].clone())
    );
    assert_eq!(upstream.chat_calls(), 3);
    restarted.stop().await;
    std::fs::remove_dir_all(&data_dir).unwrap();
}

#[tokio::test]
async fn max_age_sets_the_lifetime_and_bounds_what_is_served() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;

    let short = chat_body("What is today's exchange rate?");
    semcache
        .chat_as(KEY_A, &short, &[("cache-control", "max-age=0")])
        .await;
    assert_eq!(
        semcache.chat(&short).await.cache(),
        "miss",
        "an entry that lived 0 s is never served"
    );

    let long = chat_body("What are your opening hours?");
    semcache
        .chat_as(KEY_A, &long, &[("cache-control", "max-age=3600")])
        .await;
    assert_eq!(semcache.chat(&long).await.cache(), "hit");
    let fresh_only = semcache
        .chat_as(KEY_A, &long, &[("cache-control", "max-age=0")])
        .await;
    assert_eq!(
        fresh_only.cache(),
        "miss",
        "a request that accepts nothing older gets a fresh answer"
    );

    let bad = semcache
        .chat_as(KEY_A, &long, &[("cache-control", "max-age=soon")])
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(upstream.chat_calls(), 4);
}

async fn eviction_leaves(policy: Eviction, use_pattern: &[&str]) -> Vec<String> {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| {
        args.max_entries = 3;
        args.eviction = policy;
    })
    .await;
    for prompt in ["alpha question", "bravo question", "charlie question"] {
        semcache.chat(&chat_body(prompt)).await;
    }
    for prompt in use_pattern {
        assert_eq!(semcache.chat(&chat_body(prompt)).await.cache(), "hit");
    }
    semcache.chat(&chat_body("delta question")).await;
    let entries = semcache
        .http
        .get(semcache.url("/admin/entries?limit=10"))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let mut prompts: Vec<String> = entries["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["prompt"].as_str().unwrap().to_owned())
        .collect();
    prompts.sort();
    prompts
}

#[tokio::test]
async fn lru_evicts_the_least_recently_used_entry() {
    // Bravo was stored before charlie, and alpha was used since: bravo is the least recent.
    let kept = eviction_leaves(Eviction::Lru, &["alpha question"]).await;
    assert_eq!(kept, ["alpha question", "charlie question", "delta question"]);
}

#[tokio::test]
async fn lfu_evicts_the_least_frequently_used_entry() {
    // Alpha is used most, bravo and charlie once each; charlie was used last, so bravo goes.
    let pattern = [
        "alpha question",
        "alpha question",
        "bravo question",
        "charlie question",
    ];
    let kept = eviction_leaves(Eviction::Lfu, &pattern).await;
    assert_eq!(kept, ["alpha question", "charlie question", "delta question"]);
}

#[tokio::test]
async fn invalidation_purges_similar_answers_for_one_tenant_or_all() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    for key in [KEY_A, KEY_B] {
        semcache
            .chat_as(key, &chat_body("How much does the premium plan cost?"), &[])
            .await;
        // Close enough to the first to hit it; no-cache makes it an entry of its own.
        let monthly = chat_body("What does the premium plan cost per month?");
        semcache
            .chat_as(key, &monthly, &[("cache-control", "no-cache")])
            .await;
        semcache
            .chat_as(key, &chat_body("How do I reset my password?"), &[])
            .await;
    }
    let invalidate = |body: serde_json::Value| {
        let request = semcache.http.post(semcache.url("/admin/invalidate")).json(&body);
        async move { crate::support::Reply::from(request.send().await.unwrap()).await }
    };

    let one_tenant =
        invalidate(json!({"prompt": "price of the premium plan", "min_similarity": 0.7, "api_key": KEY_A}))
            .await;
    assert_eq!(one_tenant.status, 200);
    assert_eq!(one_tenant.json()["removed"], 2);
    let premium = chat_body("How much does the premium plan cost?");
    assert_eq!(semcache.chat_as(KEY_A, &premium, &[]).await.cache(), "miss");
    assert_eq!(semcache.chat_as(KEY_B, &premium, &[]).await.cache(), "hit");
    let password = chat_body("How do I reset my password?");
    assert_eq!(
        semcache.chat_as(KEY_A, &password, &[]).await.cache(),
        "hit",
        "unrelated entries stay"
    );

    let everyone = invalidate(json!({"prompt": "price of the premium plan", "min_similarity": 0.7})).await;
    assert_eq!(
        everyone.json()["removed"],
        3,
        "tenant A's fresh entry and tenant B's two"
    );
    assert_eq!(semcache.chat_as(KEY_B, &premium, &[]).await.cache(), "miss");

    for bad in [
        json!({"prompt": "x", "min_similarity": 2}),
        json!({"prompt": ""}),
        json!({"min_similarity": 0.5}),
    ] {
        assert_eq!(invalidate(bad.clone()).await.status, 400, "{bad}");
    }
}

/// A small tmpfs, unmounted when dropped; `None` where this user may not mount.
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(megabytes: usize) -> Option<Self> {
        let dir = fresh_data_dir();
        std::fs::create_dir_all(&dir).ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !mounted {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(Self { dir })
    }

    /// Writes a file until the disk is full; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_full_disk_costs_durability_not_answers_and_the_store_recovers() {
    // A real full disk needs a small filesystem of its own: a tmpfs, which only root may mount.
    let Some(disk) = SmallDisk::mount(16) else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let upstream = TestUpstream::start().await;
    let data_dir = disk.dir.join("data");
    let start = || Semcache::start_with(&upstream, |args| args.data_dir = data_dir.clone());
    let semcache = start().await;
    let before = chat_body("What is the capital of Australia?");
    assert_eq!(semcache.chat(&before).await.cache(), "miss");

    let filler = disk.fill();
    // Prompts large enough that the database file must grow (strict durability: each is
    // committed before its answer is sent).
    let large = |n: usize| {
        chat_body(&format!(
            "Question {n}: {}",
            "lorem ipsum dolor sit amet ".repeat(20_000)
        ))
    };
    for n in 0..2 {
        let reply = semcache.chat(&large(n)).await;
        assert_eq!((reply.status, reply.cache()), (200, "miss"), "{:?}", reply.body);
        assert_eq!(
            semcache.chat(&large(n)).await.cache(),
            "hit",
            "served from memory"
        );
    }
    let stats = semcache.get_json("/stats").await;
    assert!(stats["store_failures"].as_u64().unwrap() >= 2, "{stats}");

    // Space again: entries are saved again, without a restart, once the store has reopened
    // (at most once a second): the first miss whose write does not fail shows it.
    std::fs::remove_file(&filler).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut n = 0;
    let after = loop {
        n += 1;
        let failures = semcache.get_json("/stats").await["store_failures"].clone();
        let after = chat_body(&format!("Question {n}: what is the capital of Canada?"));
        assert_eq!(semcache.chat(&after).await.cache(), "miss");
        if semcache.get_json("/stats").await["store_failures"] == failures {
            break after;
        }
        assert!(std::time::Instant::now() < deadline, "the store never recovered");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    semcache.stop().await;

    let restarted = start().await;
    assert_eq!(restarted.chat(&before).await.cache(), "hit", "saved before");
    assert_eq!(restarted.chat(&after).await.cache(), "hit", "saved after");
    assert_eq!(
        restarted.chat(&large(0)).await.cache(),
        "miss",
        "never saved, as /stats said"
    );
    restarted.stop().await;
}

/// An embedder that fails every embedding, under another identity: a backend that cannot run.
#[cfg(all(feature = "onnx", feature = "candle"))]
struct BrokenModel;

#[cfg(all(feature = "onnx", feature = "candle"))]
impl semcache::embed::Embedder for BrokenModel {
    fn model_id(&self) -> semcache::embed::EmbedderId {
        let mut id = crate::support::embedder().model_id();
        id.weights = "0123456789abcdef".repeat(4);
        id
    }

    fn seen_len(&self, text: &str) -> Option<usize> {
        crate::support::embedder().seen_len(text)
    }

    fn dimensions(&self) -> usize {
        crate::support::embedder().dimensions()
    }

    fn embed(&self, _texts: &[&str]) -> Result<Vec<Vec<f32>>, semcache::embed::Error> {
        Err(semcache::embed::Error::Task("the model is broken".into()))
    }
}

/// A data directory written by one backend (candle) opened with another (onnx): the prompts
/// are embedded again at start, so the cache keeps serving paraphrases; an embedder that
/// cannot do it is refused with a message that names both, and the store is left as it was.
#[cfg(all(feature = "onnx", feature = "candle"))]
#[tokio::test]
async fn a_store_written_by_another_embedder_is_re_embedded_at_start() {
    use semcache::embed::Backend;

    let upstream = TestUpstream::start().await;
    let data_dir = fresh_data_dir();
    let _removed = crate::support::RemovedOnDrop(data_dir.clone());
    let in_dir = |args: &mut semcache::config::ServeArgs| args.data_dir = data_dir.clone();
    let candle = crate::support::embedder_on(Backend::Candle);
    let semcache = Semcache::start_with_embedder(&upstream, candle.clone(), in_dir).await;
    semcache.chat(&chat_body("How do I reset my password?")).await;
    let first_id = semcache
        .chat(&chat_body("What is the capital of Australia?"))
        .await
        .header("x-semcache-entry")
        .unwrap()
        .parse::<u64>()
        .unwrap();
    semcache.stop().await;

    let mut args = <semcache::config::ServeArgs as clap::Parser>::parse_from([
        "serve",
        "--upstream",
        &upstream.base_url(),
    ]);
    args.data_dir = data_dir.clone();
    let refused = semcache::app(&args, std::sync::Arc::new(BrokenModel))
        .err()
        .expect("refused");
    let message = refused.to_string();
    assert!(
        message.contains(&candle.model_id().weights[..12]),
        "names the store's embedder: {message}"
    );
    assert!(message.contains("0123456789ab"), "names the new one: {message}");
    assert!(message.contains("the model is broken"), "says why: {message}");

    let onnx = crate::support::embedder_on(Backend::Onnx);
    assert!(!onnx.model_id().same_vectors(&candle.model_id()));
    let restarted = Semcache::start_with_embedder(&upstream, onnx.clone(), in_dir).await;
    let calls = upstream.chat_calls();
    let paraphrase = restarted.chat(&chat_body("How can I reset my password?")).await;
    assert_eq!(paraphrase.cache(), "hit", "the stored prompt was embedded again");
    assert_eq!(upstream.chat_calls(), calls);
    let new_id = restarted
        .chat(&chat_body("Tell me a fact about octopuses."))
        .await
        .header("x-semcache-entry")
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert_ne!(new_id, first_id);
    assert!(new_id < 1 << 53, "ids stay exact in JavaScript");
    assert_eq!(restarted.get_json("/stats").await["entries"], 3);
    restarted.stop().await;

    // The store now records the new embedder: the old one is the other one.
    let store = semcache::store::Store::open(&data_dir).unwrap();
    assert_eq!(store.check_embedder(&onnx.model_id()).unwrap(), None);
    assert_eq!(
        store
            .check_embedder(&candle.model_id())
            .unwrap()
            .map(|id| id.backend),
        Some(onnx.model_id().backend)
    );
}
