//! Conformance with the official OpenAI client for JavaScript (`openai` on npm, pinned in
//! tests/sdk/package-lock.json; `make test` installs it with `tests/sdk/setup`): chat
//! completions and legacy completions, streamed and not, each a miss and then a hit on a
//! reworded prompt, whose parsed result (text, role, finish reason, usage) equals the miss's;
//! embeddings, as the client asks for them (base64), a batch partly cached.

use std::path::PathBuf;

use serde_json::Value;

use crate::support::{Semcache, TestUpstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_reads_hits_as_it_reads_misses() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let driver = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/openai.mjs");
    let output = tokio::process::Command::new("node")
        .arg(&driver)
        .arg(format!("http://{}", semcache.addr))
        .output()
        .await
        .expect("node runs (make test installs the client with tests/sdk/setup)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "SDK driver failed:\n{stdout}\n{stderr}");
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|err| panic!("{err}: {stdout}\n{stderr}"));

    for (case, id_prefix) in [
        ("chat", "chatcmpl-semcache-"),
        ("chat_stream", "chatcmpl-semcache-"),
        ("completions", "cmpl-semcache-"),
        ("completions_stream", "cmpl-semcache-"),
    ] {
        let calls = report[case]
            .as_array()
            .unwrap_or_else(|| panic!("{case}: {}", report[case]));
        let (miss, hit) = (&calls[0], &calls[1]);
        assert_eq!(
            (miss["cache"].as_str(), hit["cache"].as_str()),
            (Some("miss"), Some("hit")),
            "{case}: {report}"
        );
        let text = miss["text"].as_str().unwrap_or_default();
        assert!(
            text.contains("reset my password") || text.contains("Sunday"),
            "{case}: {miss}"
        );
        for field in ["text", "role", "tool_calls", "finish_reason", "usage", "object"] {
            assert_eq!(miss[field], hit[field], "{case}: {field} differs: {miss} / {hit}");
        }
        assert!(
            miss["usage"]["total_tokens"].as_u64().unwrap_or(0) > 0,
            "{case}: {miss}"
        );
        assert!(
            hit["id"].as_str().is_some_and(|id| id.starts_with(id_prefix)),
            "{case}: a hit has a fresh id: {hit}"
        );
    }
    assert_eq!((upstream.chat_calls(), upstream.completion_calls()), (2, 2));

    // Embeddings, as the client asks for them (base64, decoded by the client): the second
    // batch repeats two texts of the first, which come from the cache, and adds one.
    let calls = report["embeddings"]
        .as_array()
        .unwrap_or_else(|| panic!("embeddings: {}", report["embeddings"]));
    let (first, second) = (&calls[0], &calls[1]);
    assert_eq!(
        (first["cached_items"].as_str(), second["cached_items"].as_str()),
        (Some("0"), Some("2")),
        "{report}"
    );
    let vectors = |call: &Value, n: usize| call["vectors"][n].clone();
    assert_eq!(vectors(first, 0).as_array().map(Vec::len), Some(3), "{first}");
    assert_eq!(vectors(second, 0), vectors(first, 1), "{report}");
    assert_eq!(vectors(second, 2), vectors(first, 0), "{report}");
    assert_eq!(
        vectors(second, 1),
        serde_json::json!([10, 2, 0.5]),
        "the one text sent: {report}"
    );
    assert_eq!(
        second["usage"]["prompt_tokens"], 2,
        "only what was sent: {report}"
    );
    assert_eq!(upstream.embedding_inputs().len(), 2);
}
