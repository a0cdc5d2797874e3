//! Secrets: client API keys, the upstream key and the admin token never appear in logs (at
//! debug level), `/stats`, `/metrics`, error bodies or the data directory; and no request can
//! point semcache at another upstream.

use std::path::Path;

use serde_json::json;

use crate::support::{chat_body, fresh_data_dir, spawn_binary, Mode, Reply, TestUpstream};

const CLIENT_KEY: &str = "sk-proj-Qv7TxW2mZc9RkPa4LdNf8HsJ";
const UPSTREAM_KEY: &str = "sk-upstream-Bq3YvH6nXe1UoTg5KwMz";
const ADMIN_TOKEN: &str = "admin-Jd8FpR2sLq6VnC0yHt4A";

/// Every 8-character piece of each secret (past its common prefix): none may show up.
fn fragments() -> Vec<String> {
    [CLIENT_KEY, UPSTREAM_KEY, ADMIN_TOKEN]
        .iter()
        .flat_map(|secret| {
            let chars: Vec<char> = secret.chars().collect();
            chars
                .windows(8)
                .map(|w| w.iter().collect::<String>())
                .filter(|piece| {
                    !matches!(
                        piece.as_str(),
                        "sk-proj-" | "sk-upstr" | "k-upstre" | "-upstrea" | "upstream"
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn assert_clean(place: &str, text: &str) {
    for piece in fragments() {
        assert!(!text.contains(&piece), "{place} holds {piece:?}:\n{text}");
    }
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_tokens_appear_nowhere() {
    let upstream = TestUpstream::start().await;
    let data_dir = fresh_data_dir();
    let mut process = spawn_binary(
        &[
            "--upstream",
            &upstream.base_url(),
            "--upstream-api-key",
            UPSTREAM_KEY,
            "--admin-token",
            ADMIN_TOKEN,
            "--data-dir",
            data_dir.to_str().unwrap(),
        ],
        &[("RUST_LOG", "debug")],
    );
    let base = format!("http://{}", process.addr);
    let http = reqwest::Client::new();
    let mut bodies = Vec::new();
    let send = |request: reqwest::RequestBuilder| {
        let request = request;
        async move { Reply::from(request.send().await.unwrap()).await }
    };

    let chat = |prompt: &str| {
        http.post(format!("{base}/v1/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .json(&chat_body(prompt))
    };
    let miss = send(chat("How do I rotate my API key?")).await;
    assert_eq!(miss.status, 200);
    let hit = send(chat("How do I rotate my API key?")).await;
    assert_eq!(hit.cache(), "hit");
    assert_eq!(
        upstream.authorizations(),
        vec![format!("Bearer {UPSTREAM_KEY}")],
        "the upstream got the configured key, not the client's"
    );

    // Error bodies: a bad request, the upstream failing, the wrong admin token.
    let bad = send(
        http.post(format!("{base}/v1/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .json(&json!({"model": "gpt-4o-mini", "messages": "not a list"})),
    )
    .await;
    assert_eq!(bad.status, 400);
    bodies.push(bad);
    upstream.set_mode(Mode::Status(500));
    let failed = send(chat("Why is the sky blue?")).await;
    assert_eq!(failed.status, 500);
    bodies.push(failed);
    upstream.set_mode(Mode::Normal);
    let wrong_token = send(http.get(format!("{base}/stats")).bearer_auth(CLIENT_KEY)).await;
    assert_eq!(wrong_token.status, 401);
    bodies.push(wrong_token);

    // A request cannot choose the upstream: fields and headers naming another are ignored.
    let calls = upstream.chat_calls();
    let redirected = send(
        http.post(format!("{base}/v1/chat/completions"))
            .bearer_auth(CLIENT_KEY)
            .header("x-upstream", "http://127.0.0.1:9/v1")
            .header("x-forwarded-host", "127.0.0.1:9")
            .json(
                &json!({"model": "gpt-4o-mini", "api_base": "http://127.0.0.1:9/v1",
                          "messages": [{"role": "user", "content": "Where do requests go?"}]}),
            ),
    )
    .await;
    assert_eq!(redirected.status, 200);
    assert_eq!(
        upstream.chat_calls(),
        calls + 1,
        "it went to the configured upstream"
    );

    for path in ["/stats", "/metrics", "/admin/entries", "/admin/config"] {
        let reply = send(http.get(format!("{base}{path}")).bearer_auth(ADMIN_TOKEN)).await;
        assert_eq!(reply.status, 200, "{path}");
        bodies.push(reply);
    }

    process.child.kill().unwrap();
    process.child.wait().unwrap();
    for reply in &bodies {
        assert_clean("a response body", &String::from_utf8_lossy(&reply.body));
        for (name, value) in &reply.headers {
            assert_clean(&format!("header {name}"), value.to_str().unwrap_or_default());
        }
    }
    let output = process.output.lock().join("\n");
    assert!(
        output.contains("DEBUG"),
        "the logs were at debug level:\n{output}"
    );
    assert_clean("the logs", &output);
    let files = files_under(&data_dir);
    assert!(!files.is_empty());
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        assert_clean(&file.display().to_string(), &String::from_utf8_lossy(&bytes));
    }
    std::fs::remove_dir_all(&data_dir).ok();
}
