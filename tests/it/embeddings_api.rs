//! The embeddings endpoint (`POST /v1/embeddings`) through HTTP: each text item cached on its
//! own, word for word, per tenant and per model, dimensions and format; a batch partly cached
//! sends only the rest upstream and counts only that in `usage`; entries outlive a restart;
//! errors and token ids go through uncached.

use serde_json::{json, Value};

use crate::support::{fresh_data_dir, Mode, Reply, Semcache, TestUpstream, KEY_A, KEY_B};

async fn embed_as(semcache: &Semcache, key: &str, body: &Value) -> Reply {
    let response = semcache
        .http
        .post(semcache.url("/v1/embeddings"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    Reply::from(response).await
}

async fn embed(semcache: &Semcache, body: &Value) -> Reply {
    embed_as(semcache, KEY_A, body).await
}

fn batch(texts: &[&str]) -> Value {
    json!({"model": "text-embedding-3-small", "input": texts})
}

/// The vectors of a list, by index.
fn vectors(reply: &Reply) -> Vec<Value> {
    let list = reply.json();
    assert_eq!(list["object"], "list", "{list}");
    let data = list["data"].as_array().unwrap();
    for (i, item) in data.iter().enumerate() {
        assert_eq!(
            (item["object"].as_str(), item["index"].as_u64()),
            (Some("embedding"), Some(i as u64))
        );
    }
    data.iter().map(|item| item["embedding"].clone()).collect()
}

#[tokio::test]
async fn a_batch_partly_cached_sends_only_the_rest_and_counts_only_that() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let first = embed(&semcache, &batch(&["alpha one", "beta two two", "gamma"])).await;
    assert_eq!((first.status, first.cache()), (200, "miss"));
    assert_eq!(first.header("x-semcache-cached-items"), Some("0"));
    assert_eq!(
        first.json()["usage"],
        json!({"prompt_tokens": 6, "total_tokens": 6})
    );
    let stored = vectors(&first);

    let again = embed(&semcache, &batch(&["alpha one", "beta two two", "gamma"])).await;
    assert_eq!(
        (again.cache(), again.header("x-semcache-cached-items")),
        ("hit", Some("3"))
    );
    assert_eq!(vectors(&again), stored);
    assert_eq!(again.json()["usage"]["prompt_tokens"], 0);

    // Two of four known, one of them twice: only the new text goes upstream, once.
    let mixed = embed(&semcache, &batch(&["gamma", "delta four", "alpha one", "gamma"])).await;
    assert_eq!(
        (mixed.cache(), mixed.header("x-semcache-cached-items")),
        ("miss", Some("3"))
    );
    assert_eq!(mixed.json()["usage"]["prompt_tokens"], 2, "only what was sent");
    let got = vectors(&mixed);
    assert_eq!((&got[0], &got[2], &got[3]), (&stored[2], &stored[0], &stored[2]));
    assert_eq!(got[1], json!([10.0, 2.0, 0.5]), "made by the second call");
    assert_eq!(
        upstream.embedding_inputs(),
        [
            json!(["alpha one", "beta two two", "gamma"]),
            json!(["delta four"])
        ]
    );

    let stats = semcache.get_json("/stats").await;
    let row = &stats["by_surface"]["embeddings"];
    assert_eq!(
        (row["requests"].as_u64(), row["hits"].as_u64()),
        (Some(3), Some(1)),
        "{stats}"
    );
    // 6 tokens for the whole repeat, and the share of the two cached texts in the mixed batch.
    assert!(row["tokens_saved"].as_u64().unwrap() > 6, "{stats}");
    semcache.stop().await;
}

#[tokio::test]
async fn items_are_kept_per_tenant_and_context_and_never_matched_by_meaning() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    let single = json!({"model": "text-embedding-3-small", "input": "How do I reset my password?"});
    assert_eq!(embed(&semcache, &single).await.cache(), "miss");
    assert_eq!(embed(&semcache, &single).await.cache(), "hit");
    assert_eq!(
        embed(&semcache, &batch(&["How do I reset my password?"]))
            .await
            .cache(),
        "hit"
    );
    assert_eq!(
        embed_as(&semcache, KEY_B, &single).await.cache(),
        "miss",
        "another tenant"
    );
    let reworded = json!({"model": "text-embedding-3-small", "input": "How can I reset my password?"});
    assert_eq!(
        embed(&semcache, &reworded).await.cache(),
        "miss",
        "never by meaning"
    );
    for (field, value) in [
        ("dimensions", json!(256)),
        ("encoding_format", json!("base64")),
        ("model", json!("text-embedding-3-large")),
    ] {
        let mut other = single.clone();
        other[field] = value;
        assert_eq!(embed(&semcache, &other).await.cache(), "miss", "{field}");
    }
    let mut float = single.clone();
    float["encoding_format"] = json!("float");
    assert_eq!(
        embed(&semcache, &float).await.cache(),
        "hit",
        "float is the default format"
    );
    assert_eq!(upstream.embedding_inputs().len(), 6);
    semcache.stop().await;
}

#[tokio::test]
async fn stored_items_outlive_a_restart() {
    let upstream = TestUpstream::start().await;
    let data_dir = fresh_data_dir();
    let start = || Semcache::start_with(&upstream, |args| args.data_dir = data_dir.clone());
    let semcache = start().await;
    let stored = vectors(&embed(&semcache, &batch(&["kept one", "kept two"])).await);
    semcache.stop().await;
    let restarted = start().await;
    let again = embed(&restarted, &batch(&["kept two", "kept one"])).await;
    assert_eq!(again.cache(), "hit");
    assert_eq!(vectors(&again), [stored[1].clone(), stored[0].clone()]);
    assert_eq!(upstream.embedding_inputs().len(), 1);
    restarted.stop().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[tokio::test]
async fn bad_bodies_errors_and_token_ids_store_nothing() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start(&upstream).await;
    for (bad, param) in [
        (json!({"input": "x"}), "model"),
        (json!({"model": "e"}), "input"),
        (json!({"model": "e", "input": []}), "input"),
        (json!({"model": "e", "input": ["a", 3]}), "input"),
        (
            json!({"model": "e", "input": "a", "encoding_format": "int8"}),
            "encoding_format",
        ),
    ] {
        let reply = embed(&semcache, &bad).await;
        assert_eq!(reply.status, 400, "{bad}");
        let error = &reply.json()["error"];
        assert_eq!(
            (error["type"].as_str(), error["param"].as_str()),
            (Some("invalid_request_error"), Some(param))
        );
    }
    assert!(upstream.embedding_inputs().is_empty());

    upstream.set_mode(Mode::Status(500));
    let failed = embed(&semcache, &batch(&["fails"])).await;
    assert_eq!((failed.status, failed.cache()), (500, "miss"));
    assert_eq!(failed.json()["error"]["message"], "upstream says no");
    upstream.set_mode(Mode::Normal);
    assert_eq!(
        embed(&semcache, &batch(&["fails"])).await.cache(),
        "miss",
        "the error was not stored"
    );

    let tokens = json!({"model": "text-embedding-3-small", "input": [[101, 2023], [101]]});
    for _ in 0..2 {
        let reply = embed(&semcache, &tokens).await;
        assert_eq!((reply.status, reply.cache()), (200, "bypass"));
    }
    assert_eq!(semcache.get_json("/stats").await["entries"], 1);
    semcache.stop().await;
}
