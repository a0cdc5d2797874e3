//! The dashboard in a real headless Chromium (Debian's, driven by playwright-core): it loads
//! with no console errors, shows live numbers, its threshold control changes the config, and
//! its "Wrong" button reports an answer.
//! `make test` installs what it needs (`tests/browser/setup`).

use std::path::PathBuf;

use serde_json::Value;

use crate::support::{chat_body, Semcache, TestUpstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_numbers_and_tunes_the_threshold() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    for prompt in [
        "How do I reset my password?",
        "How can I reset my password?",
        "What is the capital of Australia?",
    ] {
        semcache.chat(&chat_body(prompt)).await;
        semcache.chat(&chat_body(prompt)).await;
    }

    let driver = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.mjs");
    let output = tokio::process::Command::new("node")
        .arg(&driver)
        .arg(format!("http://{}", semcache.addr))
        .arg("6")
        .arg("0.9")
        .output()
        .await
        .expect("node runs (make test installs it with tests/browser/setup)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|err| panic!("{err}: {stdout}"));
    assert_eq!(report["requests"], 6, "{report}");
    // The paraphrase is a hit the first time too: four hits.
    assert_eq!(report["hits"], 4, "{report}");
    assert_eq!(report["console_errors"], serde_json::json!([]));

    // The newest entry's "Wrong" button: that answer was only ever served word for word, so a
    // wrong report evicts it.
    assert_eq!(report["feedback"]["status"], 200, "{report}");
    assert_eq!(report["feedback"]["body"]["action"], "evicted", "{report}");
    let stats = semcache.get_json("/stats").await;
    assert_eq!(stats["feedback"]["wrong"], 1, "{stats}");
    let entries = semcache.get_json("/admin/entries").await;
    assert!(!entries.to_string().contains("capital of Australia"), "{entries}");

    let config = semcache.get_json("/admin/config").await;
    assert_eq!(
        config["threshold"], 0.9,
        "the page's control changed the live config"
    );
}
