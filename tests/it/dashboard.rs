//! The dashboard in a real headless Chromium (Debian's, driven by playwright-core): it loads
//! with no console errors, shows live numbers (a row per surface too, and the judge's card), its
//! threshold control
//! changes the config, and its "Wrong" button reports an answer.
//! `make test` installs what it needs (`tests/browser/setup`).

use std::path::PathBuf;

use serde_json::Value;

use crate::judge::{with_judge, TestJudge};
use crate::support::{chat_body, TestUpstream};

const PASSWORD: &str = "How do I reset my password?";
const PASSWORD_AGAIN: &str = "How can I reset my password?";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_numbers_and_tunes_the_threshold() {
    let upstream = TestUpstream::start().await;
    // With a judge that calls the two password questions the same: its card shows the one call.
    let judge = TestJudge::start(&[&[PASSWORD, PASSWORD_AGAIN]]).await;
    let semcache = with_judge(&upstream, &judge, 5_000).await;
    // One legacy completion, first so that the newest entry stays a chat's: a row of its own
    // under "By surface".
    let completion = semcache
        .http
        .post(semcache.url("/v1/completions"))
        .json(&serde_json::json!({"model": "gpt-3.5-turbo-instruct", "prompt": "Say hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(completion.status(), 200);
    for prompt in [PASSWORD, PASSWORD_AGAIN, "What is the capital of Australia?"] {
        semcache.chat(&chat_body(prompt)).await;
        semcache.chat(&chat_body(prompt)).await;
    }

    let driver = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.mjs");
    let output = tokio::process::Command::new("node")
        .arg(&driver)
        .arg(format!("http://{}", semcache.addr))
        .arg("7")
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
    assert_eq!(report["requests"], 7, "{report}");
    // The paraphrase is a hit the first time too: four hits.
    assert_eq!(report["hits"], 4, "{report}");
    // Surface, requests, hit rate: busiest first.
    let surfaces: Vec<Vec<String>> = serde_json::from_value(report["surfaces"].clone()).unwrap();
    let columns: Vec<[&str; 3]> = surfaces
        .iter()
        .map(|row| [row[0].as_str(), row[1].as_str(), row[2].as_str()])
        .collect();
    assert_eq!(
        columns,
        [
            ["chat_completions", "6", "67%"],
            ["completions", "1", "0%"],
            ["embeddings", "0", "–"],
            ["responses", "0", "–"]
        ],
        "{report}"
    );
    assert_eq!(report["console_errors"], serde_json::json!([]));
    // The judge was asked about the paraphrase once and said yes; asked again, the paraphrase
    // was served on that verdict.
    let card = &report["judge"];
    assert_eq!(card["calls"], "1 call", "{report}");
    let line = card["line"].as_str().unwrap_or_default();
    assert!(
        line.starts_with(
            "1 approved · 0 rejected · 0 failed · 1 verdict reused · 2 hits vouched by the judge"
        ),
        "{report}"
    );
    assert!(
        card["cost"].as_str().unwrap_or_default().contains("judge tokens"),
        "{report}"
    );

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
