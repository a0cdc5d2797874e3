//! The operator's side: admin API, access rules, stats that add up, Prometheus metrics.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::Request;
use clap::Parser;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::support::{
    chat_body, embedder, histogram_total, model_dir, Reply, Semcache, TestUpstream, KEY_A, KEY_B,
};

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

impl Semcache {
    pub(crate) async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Reply {
        let mut request = self
            .http
            .request(method, self.url(path))
            .header("content-type", "application/json");
        if let Some(body) = body {
            request = request.json(&body);
        }
        Reply::from(request.send().await.unwrap()).await
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("semcache-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test]
async fn the_threshold_is_tuned_live_validated_and_kept_across_a_restart() {
    let upstream = TestUpstream::start().await;
    let data_dir = temp_dir("config");
    let start = || Semcache::start_with(&upstream, |args| args.data_dir = data_dir.clone());
    let semcache = start().await;
    assert_eq!(
        semcache.get_json("/admin/config").await["threshold"]
            .as_f64()
            .unwrap() as f32,
        0.82
    );

    semcache.chat(&chat_body("How do I reset my password?")).await;
    let patched = semcache
        .admin(
            reqwest::Method::PATCH,
            "/admin/config",
            Some(json!({"threshold": 0.995})),
        )
        .await;
    assert_eq!(patched.status, 200);
    assert_eq!(patched.json()["threshold"].as_f64().unwrap() as f32, 0.995);
    // 0.9917 similar: a hit at 0.82, a miss at 0.995.
    assert_eq!(
        semcache
            .chat(&chat_body("How can I reset my password?"))
            .await
            .cache(),
        "miss"
    );

    for bad in [
        json!({"threshold": 1.5}),
        json!({"threshold": -0.1}),
        json!({"threshold": "0.9"}),
        json!({"threshold": 0.9, "colour": "blue"}),
        json!([0.9]),
    ] {
        let reply = semcache
            .admin(reqwest::Method::PATCH, "/admin/config", Some(bad.clone()))
            .await;
        assert_eq!(reply.status, 400, "{bad}");
        assert_eq!(reply.json()["error"]["type"], "invalid_request_error", "{bad}");
    }
    let not_json = semcache
        .http
        .patch(semcache.url("/admin/config"))
        .header("content-type", "application/json")
        .body("{threshold")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    assert_eq!(
        semcache.get_json("/admin/config").await["threshold"]
            .as_f64()
            .unwrap() as f32,
        0.995
    );

    semcache.stop().await;
    let restarted = start().await;
    assert_eq!(
        restarted.get_json("/admin/config").await["threshold"]
            .as_f64()
            .unwrap() as f32,
        0.995
    );
    std::fs::remove_dir_all(&data_dir).unwrap();
}

#[tokio::test]
async fn entries_can_be_searched_deleted_and_flushed_per_tenant() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    semcache
        .chat_as(KEY_A, &chat_body("How do I reset my password?"), &[])
        .await;
    semcache
        .chat_as(KEY_A, &chat_body("What is the capital of Australia?"), &[])
        .await;
    semcache
        .chat_as(KEY_B, &chat_body("How do I reset my password?"), &[])
        .await;

    let found = semcache
        .get_json("/admin/entries?query=forgot%20my%20password&limit=2")
        .await;
    let data = found["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert!(
        data.iter().all(|e| e["prompt"] == "How do I reset my password?"),
        "{found}"
    );
    assert!(data[0]["similarity"].as_f64().unwrap() > 0.5);
    assert_ne!(data[0]["tenant"], data[1]["tenant"]);
    let serialized = found.to_string();
    assert!(
        !serialized.contains(KEY_A) && !serialized.contains(KEY_B),
        "keys never appear"
    );

    let recent = semcache.get_json("/admin/entries").await;
    assert_eq!(recent["data"].as_array().unwrap().len(), 3);
    assert_eq!(
        recent["data"][0]["prompt"], "How do I reset my password?",
        "newest first"
    );
    let bad_limit = semcache
        .admin(reqwest::Method::GET, "/admin/entries?limit=0", None)
        .await;
    assert_eq!(bad_limit.status, 400);
    let bad_limit = semcache
        .admin(reqwest::Method::GET, "/admin/entries?limit=many", None)
        .await;
    assert_eq!(bad_limit.status, 400);

    let capital_id = recent["data"][1]["id"].as_u64().unwrap();
    let deleted = semcache
        .admin(
            reqwest::Method::DELETE,
            &format!("/admin/entries/{capital_id}"),
            None,
        )
        .await;
    assert_eq!(
        (deleted.status, deleted.json()["deleted"].clone()),
        (200, json!(true))
    );
    let again = semcache
        .admin(
            reqwest::Method::DELETE,
            &format!("/admin/entries/{capital_id}"),
            None,
        )
        .await;
    assert_eq!(again.status, 404);
    assert_eq!(again.json()["error"]["code"], "not_found");
    assert_eq!(
        semcache
            .chat(&chat_body("What is the capital of Australia?"))
            .await
            .cache(),
        "miss"
    );

    let flushed = semcache
        .admin(
            reqwest::Method::POST,
            "/admin/flush",
            Some(json!({"api_key": KEY_A})),
        )
        .await;
    assert_eq!(flushed.json()["removed"], 2);
    assert_eq!(
        semcache
            .chat_as(KEY_A, &chat_body("How do I reset my password?"), &[])
            .await
            .cache(),
        "miss"
    );
    assert_eq!(
        semcache
            .chat_as(KEY_B, &chat_body("How do I reset my password?"), &[])
            .await
            .cache(),
        "hit"
    );

    let all = semcache.admin(reqwest::Method::POST, "/admin/flush", None).await;
    assert_eq!(all.json()["removed"], 2);
    assert_eq!(semcache.get_json("/stats").await["entries"], 0);
    let bad_flush = semcache
        .admin(reqwest::Method::POST, "/admin/flush", Some(json!({"api_key": 5})))
        .await;
    assert_eq!(bad_flush.status, 400);
}

/// Sends one request through the router as if from `peer`, without a socket.
async fn oneshot(router: &axum::Router, peer: [u8; 4], path: &str, auth: Option<&str>) -> u16 {
    let mut request = Request::get(path);
    if let Some(auth) = auth {
        request = request.header("authorization", format!("Bearer {auth}"));
    }
    let router = router
        .clone()
        .layer(MockConnectInfo(SocketAddr::from((peer, 40_000))));
    router
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn operator_routes_need_the_token_or_loopback() {
    let upstream = TestUpstream::start().await;
    let data_dirs = crate::support::RemovedOnDrop(crate::support::fresh_data_dir());
    let build = |token: Option<&str>| {
        let mut args = semcache::config::ServeArgs::parse_from(["serve", "--upstream", &upstream.base_url()]);
        args.model.model_dir = model_dir();
        args.data_dir = data_dirs.0.join(if token.is_some() { "guarded" } else { "open" });
        args.admin_token = token.map(str::to_owned);
        semcache::app(&args, embedder()).unwrap().router
    };
    let remote = [192, 0, 2, 10];
    let loopback = [127, 0, 0, 1];

    let open = build(None);
    for path in ["/admin/config", "/admin/entries", "/stats", "/metrics"] {
        assert_eq!(oneshot(&open, loopback, path, None).await, 200, "{path}");
        assert_eq!(oneshot(&open, remote, path, None).await, 403, "{path}");
    }
    assert_eq!(
        oneshot(&open, remote, "/dashboard", None).await,
        200,
        "the page holds no data"
    );
    assert_eq!(oneshot(&open, remote, "/healthz", None).await, 200);

    let guarded = build(Some(ADMIN_TOKEN));
    for path in ["/admin/config", "/stats", "/metrics"] {
        assert_eq!(oneshot(&guarded, loopback, path, None).await, 401, "{path}");
        assert_eq!(
            oneshot(&guarded, remote, path, Some("wrong-token-0123456789")).await,
            401
        );
        assert_eq!(
            oneshot(&guarded, remote, path, Some(KEY_A)).await,
            401,
            "a proxy key is no admin token"
        );
        assert_eq!(
            oneshot(&guarded, remote, path, Some(ADMIN_TOKEN)).await,
            200,
            "{path}"
        );
    }
}

#[tokio::test]
async fn stats_add_up_after_a_mix_of_hits_misses_and_bypasses() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let mut served_tokens = 0;
    let mut hits = 0;
    let mut track = |reply: &Reply| {
        if reply.cache() == "hit" {
            hits += 1;
            served_tokens += reply.json()["usage"]["total_tokens"].as_u64().unwrap();
        }
    };

    track(&semcache.chat(&chat_body("How do I reset my password?")).await); // miss
    track(&semcache.chat(&chat_body("How do I reset my password?")).await); // exact hit
    track(&semcache.chat(&chat_body("How can I reset my password?")).await); // semantic hit
    track(
        &semcache
            .chat(&chat_body("What is the capital of Australia?"))
            .await,
    ); // miss, near miss
    track(
        &semcache
            .chat_as(KEY_A, &chat_body("Private"), &[("cache-control", "no-store")])
            .await,
    ); // bypass
    let mut local = chat_body("How do I reset my password?");
    local["model"] = json!("my-local-model");
    track(&semcache.chat(&local).await); // miss
    track(&semcache.chat(&local).await); // exact hit, unpriced
    let bad = semcache.chat(&json!({"model": "gpt-4o-mini"})).await; // rejected
    assert_eq!(bad.status, 400);

    let stats = semcache.get_json("/stats").await;
    let n = |field: &str| {
        stats[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field}: {stats}"))
    };
    assert_eq!(n("requests"), 7);
    assert_eq!(n("hits") + n("misses") + n("bypassed"), n("requests"));
    assert_eq!((n("hits"), n("exact_hits"), n("semantic_hits")), (hits, 2, 1));
    assert_eq!((n("misses"), n("bypassed"), n("rejected")), (3, 1, 1));
    assert_eq!(n("upstream_calls"), upstream.chat_calls() as u64);
    assert_eq!(n("tokens_saved"), served_tokens);
    assert_eq!(
        n("prompt_tokens_saved") + n("completion_tokens_saved"),
        served_tokens
    );
    // Two hits on gpt-4o-mini (11 prompt and 7 completion tokens each, $0.15 and $0.60 per
    // million); the local model's hit saves tokens but no money.
    let expected_cost = 2.0 * (11.0 * 0.15 + 7.0 * 0.60) / 1e6;
    assert!(
        (stats["cost_saved_usd"].as_f64().unwrap() - expected_cost).abs() < 1e-12,
        "{stats}"
    );
    assert_eq!(stats["unpriced_models"], json!(["my-local-model"]));
    assert_eq!(stats["by_model"]["my-local-model"]["priced"], false);
    assert_eq!(stats["by_model"]["gpt-4o-mini"]["hits"], 2);
    assert_eq!(stats["by_tenant"].as_object().unwrap().len(), 1);
    assert!(!stats.to_string().contains(KEY_A));
    assert_eq!(n("entries"), 3);
    assert!((stats["hit_rate"].as_f64().unwrap() - 3.0 / 7.0).abs() < 1e-3);

    assert_eq!(histogram_total(&stats, "hits"), hits);
    let near_misses = histogram_total(&stats, "near_misses");
    assert_eq!(
        near_misses, 1,
        "the capital question had a candidate below the threshold"
    );
    assert_eq!(stats["similarity"]["edges"].as_array().unwrap().len(), 21);

    let metrics = semcache.admin(reqwest::Method::GET, "/metrics", None).await;
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for line in [
        "semcache_requests_total{outcome=\"exact_hit\"} 2",
        "semcache_requests_total{outcome=\"semantic_hit\"} 1",
        "semcache_requests_total{outcome=\"miss\"} 3",
        "semcache_requests_total{outcome=\"bypass\"} 1",
        "semcache_entries 3",
        "semcache_hit_similarity_bucket{le=\"+Inf\"} 3",
        "semcache_hit_similarity_count 3",
        "semcache_model_hits_total{model=\"my-local-model\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        assert!(name.starts_with("semcache_"), "{line:?}");
    }
}

#[tokio::test]
async fn operators_report_wrong_answers_for_any_tenant() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let stored = semcache
        .chat_as(KEY_A, &chat_body("How do I reset my password?"), &[])
        .await;
    let id: u64 = stored.header("x-semcache-entry").unwrap().parse().unwrap();
    let hit = semcache
        .chat_as(KEY_A, &chat_body("How can I reset my password?"), &[])
        .await;
    assert_eq!(hit.cache(), "hit");
    let served_at = hit.similarity();

    let path = format!("/admin/entries/{id}/feedback");
    let bad = semcache
        .admin(reqwest::Method::POST, &path, Some(json!({"correct": "no"})))
        .await;
    assert_eq!(bad.status, 400, "{:?}", bad.json());
    assert_eq!(bad.json()["error"]["type"], "invalid_request_error");
    let unknown = semcache
        .admin(
            reqwest::Method::POST,
            "/admin/entries/999999/feedback",
            Some(json!({"correct": false})),
        )
        .await;
    assert_eq!(unknown.status, 404);

    // No tenant key needed: the operator sees every tenant's entries.
    let raised = semcache
        .admin(reqwest::Method::POST, &path, Some(json!({"correct": false})))
        .await;
    assert_eq!(raised.status, 200);
    assert_eq!(raised.json()["action"], "threshold_raised");
    let threshold = raised.json()["threshold"].as_f64().unwrap() as f32;
    assert!(threshold > served_at, "{threshold} > {served_at}");
    let again = semcache
        .chat_as(KEY_A, &chat_body("How can I reset my password?"), &[])
        .await;
    assert_eq!(again.cache(), "miss", "no longer served at that similarity");
    assert_eq!(semcache.get_json("/stats").await["feedback"]["wrong"], 1);
}
