//! What an outside probe found, each tried as an attacker or a clumsy client would: tenants
//! merged through odd keys, paths that leave the upstream's base, slow clients, operator routes
//! reachable from web pages, overflowing lifetimes, a data directory deleted under a running
//! server, and bodies sent without their length.

use std::time::{Duration, Instant};

use reqwest::header::{HeaderValue, AUTHORIZATION};
use serde_json::{json, Value};

use crate::support::{
    chat_body, raw_request, spawn_binary, sse_content, stream_body, Raw, Reply, Semcache, TestUpstream, KEY_A,
};

impl Semcache {
    /// Posts a chat completion with these exact Authorization bytes, or none.
    async fn chat_with_authorization(&self, authorization: Option<&[u8]>, body: &Value) -> Reply {
        let mut request = self.http.post(self.url("/v1/chat/completions")).json(body);
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, HeaderValue::from_bytes(value).unwrap());
        }
        Reply::from(request.send().await.unwrap()).await
    }
}

#[tokio::test]
async fn keys_that_are_not_ascii_are_tenants_of_their_own() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let body = chat_body("What are your opening hours on Sunday?");
    let first = "Bearer sk-tenant1-\u{fc}-secret".as_bytes();
    let stored = semcache.chat_with_authorization(Some(first), &body).await;
    assert_eq!((stored.status, stored.cache()), (200, "miss"));
    for other in [
        Some("Bearer sk-tenant2-\u{f6}-other".as_bytes()),
        Some(&b"Bearer sk-\xff"[..]),
        None,
    ] {
        let reply = semcache.chat_with_authorization(other, &body).await;
        assert_eq!(
            (reply.status, reply.cache()),
            (200, "miss"),
            "{:?} must not be served tenant 1's answer",
            other.map(String::from_utf8_lossy)
        );
    }
    // The key itself still finds its own entry.
    let again = semcache.chat_with_authorization(Some(first), &body).await;
    assert_eq!(again.cache(), "hit");
    assert_eq!(upstream.chat_calls(), 4);
}

#[tokio::test]
async fn headers_that_cannot_hold_a_key_are_refused_in_openais_shape() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let body = chat_body("What are your opening hours on Sunday?");
    for bad in [
        &b"Bearer"[..],
        b"Bearer  ",
        b"Basic dXNlcjpwYXNz",
        b"Bearer sk-a sk-b",
    ] {
        let reply = semcache.chat_with_authorization(Some(bad), &body).await;
        assert_eq!(reply.status, 401, "{:?}", String::from_utf8_lossy(bad));
        assert_eq!(reply.json()["error"]["code"], "invalid_api_key");
        assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
    }
    let feedback = semcache
        .http
        .post(semcache.url("/v1/semcache/feedback"))
        .header(AUTHORIZATION, "Basic dXNlcjpwYXNz")
        .json(&json!({"entry_id": 1, "correct": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(feedback.status(), 401);
    assert_eq!(upstream.chat_calls(), 0);
    assert_eq!(semcache.get_json("/stats").await["rejected"], 4);
}

#[tokio::test]
async fn forwarded_paths_stay_under_the_upstream_base_path() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| {
        args.upstream_api_key = Some("sk-operator-secret".to_owned());
    })
    .await;
    for path in [
        "/v1/../__reset",
        "/v1/../../internal/secret",
        "/v1/..\\admin",
        "/v1/%2e%2e/__reset",
        "/v1/%2E%2E/%2E%2E/internal/secret",
        "/v1/.%2e/__reset",
        "/v1/%252e%252e/__reset",
        "/v1/models/..%2f..%2f__reset",
        "/v1/..;/__reset",
    ] {
        for method in ["POST", "GET"] {
            let mut raw = Raw::connect(semcache.addr).await;
            raw.send(&raw_request(method, path, &["Connection: close"], b"{}"))
                .await;
            let reply = raw.response().await;
            assert_eq!(reply.status, 400, "{method} {path}");
            // Either semcache refuses it in OpenAI's shape, or the HTTP parser already refused
            // a target that is not a URI at all (a raw backslash), with an empty 400.
            if !reply.body.is_empty() {
                assert_eq!(reply.json()["error"]["code"], "invalid_path", "{method} {path}");
            }
        }
    }
    assert_eq!(upstream.strays(), Vec::new(), "nothing reached the upstream");
    // A plain path is still forwarded, under the base path.
    let mut raw = Raw::connect(semcache.addr).await;
    raw.send(&raw_request("GET", "/v1/files/abc", &["Connection: close"], b""))
        .await;
    assert_eq!(raw.response().await.status, 404);
    let strays = upstream.strays();
    assert_eq!(strays.len(), 1);
    assert_eq!(strays[0].0, "GET");
    assert_eq!(strays[0].1, "/v1/files/abc");
}

#[tokio::test]
async fn trickled_bodies_hold_no_turn_and_get_408() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| {
        args.max_in_flight = 2;
        args.max_waiting = 2;
        args.body_timeout_secs = 2;
        args.min_body_rate = 64;
    })
    .await;
    let body = serde_json::to_vec(&chat_body("What are your opening hours on Sunday?")).unwrap();
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut raw = Raw::connect(semcache.addr).await;
        let request = raw_request(
            "POST",
            "/v1/chat/completions",
            &[
                "Content-Type: application/json",
                &format!("Authorization: Bearer {KEY_A}"),
            ],
            &body,
        );
        // Headers and the first byte of the body; the rest never comes.
        let head = request.len() - body.len() + 1;
        raw.send(&request[..head]).await;
        slow.push(raw);
    }
    let started = Instant::now();
    let reply = semcache.chat(&chat_body("Do you ship to Canada?")).await;
    assert_eq!((reply.status, reply.cache()), (200, "miss"), "{:?}", reply.body);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered while the others trickle"
    );
    for mut raw in slow {
        let reply = raw.response().await;
        assert_eq!(reply.status, 408);
        assert_eq!(reply.json()["error"]["code"], "request_timeout");
        assert_eq!(reply.header("connection"), Some("close"));
    }
    assert_eq!(upstream.chat_calls(), 1);
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_closed() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| {
        args.header_timeout_secs = 1;
        args.idle_timeout_secs = 3;
    })
    .await;
    // Headers that never end, and a connection that never says anything.
    let mut slow = Raw::connect(semcache.addr).await;
    slow.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1")
        .await;
    let mut silent = Raw::connect(semcache.addr).await;
    // A keep-alive connection that asks once, then says nothing.
    let mut idle = Raw::connect(semcache.addr).await;
    idle.send(&raw_request("GET", "/healthz", &[], b"")).await;
    assert_eq!(idle.response().await.status, 200);
    let asked = Instant::now();
    assert!(
        slow.closed_within(Duration::from_secs(5)).await,
        "slow headers closed"
    );
    assert!(
        silent.closed_within(Duration::from_secs(5)).await,
        "a silent connection closed"
    );
    // Between requests, the idle timeout applies, not the header timeout.
    let still_open = Duration::from_millis(1500).saturating_sub(asked.elapsed());
    assert!(
        !idle.closed_within(still_open).await,
        "closed before --idle-timeout-secs"
    );
    idle.send(&raw_request("GET", "/healthz", &[], b"")).await;
    assert_eq!(idle.response().await.status, 200, "the connection is reused");
    assert!(
        idle.closed_within(Duration::from_secs(6)).await,
        "idle connection closed"
    );
}

#[tokio::test]
async fn open_connections_are_bounded() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| {
        args.max_connections = 2;
    })
    .await;
    let mut first = Raw::connect(semcache.addr).await;
    first.send(&raw_request("GET", "/healthz", &[], b"")).await;
    assert_eq!(first.response().await.status, 200);
    let mut second = Raw::connect(semcache.addr).await;
    second.send(&raw_request("GET", "/healthz", &[], b"")).await;
    assert_eq!(second.response().await.status, 200);
    // A third waits to be accepted while both are open...
    let mut third = Raw::connect(semcache.addr).await;
    third
        .send(&raw_request("GET", "/healthz", &["Connection: close"], b""))
        .await;
    let early = tokio::time::timeout(Duration::from_millis(500), third.response()).await;
    assert!(
        early.is_err(),
        "a third connection was served while two were open"
    );
    // ...and is served once one closes.
    drop(first);
    let reply = tokio::time::timeout(Duration::from_secs(5), third.response()).await;
    assert_eq!(reply.expect("served after a slot freed").status, 200);
}

#[tokio::test]
async fn operator_routes_refuse_other_web_pages() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    semcache
        .chat(&chat_body("What are your opening hours on Sunday?"))
        .await;
    let entries = || async { semcache.get_json("/stats").await["entries"].clone() };
    assert_eq!(entries().await, 1);
    let flush = |headers: Vec<(&'static str, String)>| {
        let mut request = semcache.http.post(semcache.url("/admin/flush")).body("{}");
        for (name, value) in headers {
            request = request.header(name, value);
        }
        async move { Reply::from(request.send().await.unwrap()).await }
    };
    // The form a page can send to another origin without asking first.
    let cross_site = flush(vec![
        ("origin", "http://evil.example".to_owned()),
        ("content-type", "text/plain".to_owned()),
    ])
    .await;
    assert_eq!(cross_site.status, 403, "{:?}", cross_site.body);
    let no_type = flush(vec![]).await;
    assert_eq!(no_type.status, 415);
    assert_eq!(no_type.json()["error"]["code"], "unsupported_media_type");
    let foreign_json = flush(vec![
        ("origin", "http://evil.example".to_owned()),
        ("content-type", "application/json".to_owned()),
    ])
    .await;
    assert_eq!(foreign_json.status, 403);
    assert_eq!(entries().await, 1, "nothing was flushed");
    // DNS rebinding: a foreign name that resolves to 127.0.0.1.
    for path in ["/admin/entries", "/stats", "/metrics", "/admin/config"] {
        let rebound = semcache
            .http
            .get(semcache.url(path))
            .header("host", "evil.example")
            .send()
            .await
            .unwrap();
        assert_eq!(rebound.status(), 403, "{path}");
        let body = rebound.text().await.unwrap();
        assert!(!body.contains("opening hours"), "{path}: {body}");
    }
    // The server's own page, and curl, still get in.
    let own = flush(vec![
        ("origin", format!("http://{}", semcache.addr)),
        ("content-type", "application/json".to_owned()),
    ])
    .await;
    assert_eq!(own.status, 200, "{:?}", own.body);
    assert_eq!(own.json()["removed"], 1);
    let dashboard = semcache
        .http
        .get(semcache.url("/dashboard"))
        .send()
        .await
        .unwrap();
    let csp = dashboard.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'sha256-") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(dashboard.headers()["x-frame-options"], "DENY");
}

#[tokio::test]
async fn names_given_in_allowed_hosts_reach_operator_routes() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| {
        args.allowed_hosts = vec!["semcache.internal".to_owned()];
    })
    .await;
    let status = |host: &'static str| {
        let request = semcache.http.get(semcache.url("/stats")).header("host", host);
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(status("semcache.internal:8080").await, 200);
    assert_eq!(status("localhost:8080").await, 200);
    assert_eq!(status("semcache.internal.evil.example").await, 403);
}

#[tokio::test]
async fn huge_max_ages_are_capped_not_a_panic() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    for (i, max_age) in [
        "18446744073709551615",
        "9223372036854775807",
        "999999999999999999999999",
    ]
    .iter()
    .enumerate()
    {
        let control = format!("max-age={max_age}");
        let headers = [("cache-control", control.as_str())];
        // A model of its own for each request that must miss, so that nothing else can hit.
        let prompt = "What are your opening hours on Sunday?";
        let mut body = chat_body(prompt);
        body["model"] = json!(format!("gpt-4o-mini-{i}"));
        let stored = semcache.chat_as(KEY_A, &body, &headers).await;
        assert_eq!((stored.status, stored.cache()), (200, "miss"), "{max_age}");
        assert!(stored.header("x-semcache-entry").is_some(), "stored");
        let hit = semcache.chat_as(KEY_A, &body, &headers).await;
        assert_eq!(hit.cache(), "hit", "{max_age}");
        let mut streamed = stream_body(prompt);
        streamed["model"] = json!(format!("gpt-4o-mini-streamed-{i}"));
        let streamed = semcache.chat_as(KEY_A, &streamed, &headers).await;
        assert_eq!((streamed.status, streamed.cache()), (200, "miss"));
        sse_content(&streamed.sse_events());
    }
    assert_eq!(upstream.chat_calls(), 6);
}

#[tokio::test]
async fn a_deleted_data_directory_is_noticed() {
    let upstream = TestUpstream::start().await;
    let data_dir = crate::support::fresh_data_dir();
    let _removed = crate::support::RemovedOnDrop(data_dir.clone());
    let semcache = Semcache::start_with(&upstream, |args| args.data_dir = data_dir.clone()).await;
    let before = semcache
        .chat(&chat_body("What are your opening hours on Sunday?"))
        .await;
    assert_eq!(before.cache(), "miss");
    assert_eq!(semcache.get_json("/healthz").await["status"], "ok");
    assert_eq!(semcache.get_json("/stats").await["store_failures"], 0);

    std::fs::remove_dir_all(&data_dir).unwrap();
    let after = semcache.chat(&chat_body("Do you ship to Canada?")).await;
    assert_eq!(after.status, 200, "still answered");

    let health = semcache.get_json("/healthz").await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["store"].as_str().unwrap().contains("removed"), "{health}");
    let stats = semcache.get_json("/stats").await;
    assert!(stats["store_failures"].as_u64().unwrap() >= 1, "{stats}");
    assert!(stats["store_lost"].is_string(), "{stats}");
    let metrics = semcache.get_text("/metrics").await;
    assert!(metrics.contains("\nsemcache_store_ok 0\n"), "{metrics}");
}

#[tokio::test]
async fn a_data_directory_that_cannot_be_opened_is_named_at_start() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_semcache"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "/proc/semcache-no-such-dir",
        ])
        .arg("--model-dir")
        .arg(crate::support::model_dir())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let printed =
        String::from_utf8_lossy(&output.stderr).into_owned() + &String::from_utf8_lossy(&output.stdout);
    let error = printed
        .lines()
        .find(|line| line.starts_with("Error:"))
        .unwrap_or_else(|| panic!("{printed}"));
    assert!(error.contains("data directory"), "{error}");
    assert!(!error.contains("upstream"), "{error}");
}

#[tokio::test]
async fn answers_of_known_size_have_a_content_length() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let body = serde_json::to_vec(&chat_body("What are your opening hours on Sunday?")).unwrap();
    let headers = [
        "Content-Type: application/json",
        &format!("Authorization: Bearer {KEY_A}") as &str,
        "Connection: keep-alive",
    ];
    // An HTTP/1.0 keep-alive client (ApacheBench -k): every answer needs its length to reuse
    // the connection.
    let mut raw = Raw::connect(semcache.addr).await;
    for expected in ["miss", "hit", "hit"] {
        let mut request = raw_request("POST", "/v1/chat/completions", &headers, &body);
        let line_end = request.iter().position(|b| *b == b'\r').unwrap();
        request.splice(line_end - 8..line_end, b"HTTP/1.0".iter().copied());
        raw.send(&request).await;
        let reply = raw.response().await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-semcache"), Some(expected));
        assert_eq!(reply.header("transfer-encoding"), None);
        let length: usize = reply.header("content-length").expect("a length").parse().unwrap();
        assert_eq!(length, reply.body.len());
        assert_eq!(reply.header("cache-control"), Some("private"));
    }
    // Bypassed answers carry the upstream's length.
    let bypass = semcache
        .chat_as(KEY_A, &chat_body("Anything"), &[("cache-control", "no-store")])
        .await;
    assert_eq!(bypass.cache(), "bypass");
    assert_eq!(
        bypass.header("content-length"),
        Some(bypass.body.len().to_string().as_str())
    );
    assert_eq!(bypass.header("cache-control"), Some("private"));
}

#[tokio::test]
async fn forwarded_bodies_keep_to_the_size_limit() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| args.max_body_bytes = 1000).await;
    let reply = semcache
        .http
        .post(semcache.url("/v1/files"))
        .bearer_auth(KEY_A)
        .body(vec![b'x'; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 413);
    let error: Value = reply.json().await.unwrap();
    assert_eq!(error["error"]["code"], "request_too_large");
    assert_eq!(upstream.strays(), Vec::new());
    let small = semcache
        .http
        .post(semcache.url("/v1/files"))
        .bearer_auth(KEY_A)
        .body(vec![b'x'; 500])
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 404, "the test upstream has no /v1/files");
    assert_eq!(upstream.strays().len(), 1);
}

#[tokio::test]
async fn operator_views_are_not_kept_by_http_caches_and_cap_prompts() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let long = "Please summarise this. ".repeat(300);
    semcache.chat(&chat_body(&long)).await;
    for path in ["/admin/entries", "/stats", "/metrics", "/admin/config"] {
        let reply = semcache.http.get(semcache.url(path)).send().await.unwrap();
        assert_eq!(reply.headers()["cache-control"], "no-store", "{path}");
    }
    let entries = semcache.get_json("/admin/entries").await;
    let entry = &entries["data"][0];
    assert_eq!(entry["prompt"].as_str().unwrap().chars().count(), 1000);
    assert_eq!(entry["prompt_truncated"], true);
    assert_eq!(entry["prompt_chars"], long.chars().count());
}

#[tokio::test]
async fn the_start_line_names_the_threshold_in_effect() {
    let data_dir = crate::support::fresh_data_dir();
    let _removed = crate::support::RemovedOnDrop(data_dir.clone());
    semcache::settings::SettingsStore::new(&data_dir)
        .save(&semcache::settings::Settings {
            threshold: 0.93,
            verify: true,
            context: semcache::config::ContextMode::Exact,
            context_threshold: semcache::config::DEFAULT_CONTEXT_THRESHOLD,
        })
        .unwrap();
    let mut process = spawn_binary(
        &["--threshold", "0.85", "--data-dir", data_dir.to_str().unwrap()],
        &[],
    );
    // The reader threads push the line just after they report the address.
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let found = process
            .output
            .lock()
            .iter()
            .find(|line| line.contains("semcache is serving"))
            .cloned();
        match found {
            Some(line) => break line,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => panic!("no start line"),
        }
    };
    process.child.kill().unwrap();
    let _ = process.child.wait();
    assert!(line.contains("threshold=0.93"), "{line}");
}
