//! Several nodes, one cache: three semcache nodes on one real `redis-server` (started here on a
//! free port, in a temporary directory, with its append-only file on `everysec`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{
    ask_at, chat_body, fresh_data_dir, spawn_binary, Mode, Process, RemovedOnDrop, Reply, Semcache,
    TestUpstream, KEY_A, KEY_B,
};

/// A `redis-server` of the test's own.
pub struct Redis {
    port: u16,
    password: Option<&'static str>,
    dir: PathBuf,
    child: Option<Child>,
    _removed: RemovedOnDrop,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    pub fn start() -> Self {
        Self::start_with_password(None)
    }

    pub fn start_with_password(password: Option<&'static str>) -> Self {
        let dir = fresh_data_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Self {
            port: free_port(),
            password,
            dir: dir.clone(),
            child: None,
            _removed: RemovedOnDrop(dir),
        };
        redis.run();
        redis
    }

    /// Starts the server (again) on the same port and directory: its append-only file is read
    /// back.
    pub fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""])
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .args(
                self.password
                    .map(|password| ["--requirepass", password])
                    .into_iter()
                    .flatten(),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (tests/redis/setup installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.query(&["PING"]).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: nothing more reaches its append-only file.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        match self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Empties its directory: started again, it has lost everything.
    pub fn wipe(&self) {
        std::fs::remove_dir_all(&self.dir).unwrap();
        std::fs::create_dir_all(&self.dir).unwrap();
    }

    pub fn query(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut conn)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A node on `redis` (namespace `semcache`) with the given upstream.
async fn node(upstream: &TestUpstream, redis: &Redis) -> Semcache {
    node_with(upstream, redis, |_| {}).await
}

async fn node_with(
    upstream: &TestUpstream,
    redis: &Redis,
    configure: impl FnOnce(&mut semcache::config::ServeArgs),
) -> Semcache {
    if let Ok(filter) = std::env::var("SEMCACHE_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(filter)
            .try_init();
    }
    let url = redis.url();
    let node = Semcache::start_with(upstream, |args| {
        args.store = Some(url);
        configure(args);
    })
    .await;
    wait_available(&node).await;
    node
}

async fn wait_available(node: &Semcache) {
    eventually("the node has loaded the shared store", || async {
        node.get_json("/stats").await["shared_store"]["available"] == json!(true)
    })
    .await;
}

/// Waits up to 10 s for `condition`.
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `node`'s health says it cannot use the store, for a reason that says `why`.
async fn wait_degraded(node: &Semcache, why: &str) {
    eventually(
        &format!("the node says it cannot use the store: {why}"),
        || async {
            let health = node.get_json("/healthz").await;
            health["status"] == json!("degraded")
                && health["store"]
                    .as_str()
                    .is_some_and(|reason| reason.contains(why))
        },
    )
    .await;
}

async fn applied(node: &Semcache) -> u64 {
    node.get_json("/stats").await["shared_store"]["applied"]
        .as_u64()
        .unwrap()
}

/// Waits until `node` has applied at least `changes` changes from the log.
async fn wait_applied(node: &Semcache, changes: u64) {
    eventually("the node applied the log", || async {
        applied(node).await >= changes
    })
    .await;
}

async fn three_nodes(upstream: &TestUpstream, redis: &Redis) -> [Semcache; 3] {
    [
        node(upstream, redis).await,
        node(upstream, redis).await,
        node(upstream, redis).await,
    ]
}

/// A request that went to the (failing) upstream: not answered from the cache.
fn assert_not_served(reply: Reply) {
    assert_eq!((reply.status, reply.cache()), (500, "miss"), "{:?}", reply.body);
}

const ASKED: &str = "How do I reset my password?";
const REWORDED: &str = "How can I reset my password?";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_stored_through_one_node_is_served_by_every_node() {
    let upstream = TestUpstream::start().await;
    let redis = Redis::start();
    let [a, b, c] = three_nodes(&upstream, &redis).await;

    let stored = a.chat(&chat_body(ASKED)).await;
    assert_eq!(stored.cache(), "miss");
    // The exact repeat hits on B at once, before B's replica has seen anything.
    let exact = b.chat(&chat_body(ASKED)).await;
    assert_eq!(exact.cache(), "hit", "{:?}", exact.body);
    assert_eq!(exact.content(), stored.content());

    // The paraphrase hits by meaning on C as soon as its replica has the entry.
    wait_applied(&c, 1).await;
    let reworded = c.chat(&chat_body(REWORDED)).await;
    assert_eq!(reworded.cache(), "hit", "{:?}", reworded.body);
    assert!(reworded.similarity() < 0.9999, "a hit by meaning");
    assert_eq!(reworded.content(), stored.content());
    wait_applied(&b, 1).await;
    assert_eq!(b.chat(&chat_body(REWORDED)).await.cache(), "hit");
    assert_eq!(upstream.chat_calls(), 1);

    // Another tenant never gets it, on any node.
    for node in [&a, &b, &c] {
        let other = node.chat_as(KEY_B, &chat_body(ASKED), &[]).await;
        assert_ne!(
            other.content(),
            stored.content(),
            "tenant B served tenant A's answer"
        );
        // B's own answer is B's from then on; A still gets A's.
        let again = node.chat(&chat_body(ASKED)).await;
        assert_eq!(again.content(), stored.content());
    }

    // Every node reports its replica, and the cluster's figures add up every node's.
    let stats = a.get_json("/stats").await;
    assert!(stats["shared_store"]["lag_ms"]["p50"].is_u64(), "{stats}");
    eventually("cluster figures add up the three nodes", || async {
        let cluster = a.get_json("/stats").await["shared_store"]["cluster"].clone();
        cluster["requests"] == json!(10) && cluster["hits"] == json!(8)
    })
    .await;
    let metrics = b.get_text("/metrics").await;
    assert!(metrics.contains("semcache_shared_store_available 1"), "{metrics}");
    assert!(metrics.contains("semcache_replication_lag_ms{quantile=\"0.99\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_changes_through_one_node_apply_on_every_node() {
    let upstream = TestUpstream::start().await;
    let redis = Redis::start();
    let [a, b, c] = three_nodes(&upstream, &redis).await;
    let http = reqwest::Client::new();

    // A threshold change through C applies on A and B within a second, and is kept in Redis.
    let patched = http
        .patch(c.url("/admin/config"))
        .json(&json!({"threshold": 0.93, "verify": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let changed = Instant::now();
    for node in [&a, &b] {
        eventually("the threshold reaches every node", || async {
            node.get_json("/admin/config").await["threshold"] == json!(0.93)
        })
        .await;
    }
    assert!(
        changed.elapsed() < Duration::from_secs(1),
        "{:?}",
        changed.elapsed()
    );
    let later = node(&upstream, &redis).await;
    assert_eq!(
        later.get_json("/admin/config").await["verify"],
        json!(false),
        "a new node reads the saved settings"
    );
    http.patch(c.url("/admin/config"))
        .json(&json!({"threshold": 0.82, "verify": true}))
        .send()
        .await
        .unwrap();

    // Delete through C an entry stored through A: no node serves it.
    let first = a
        .chat(&chat_body("What are your opening hours on Sundays?"))
        .await;
    let id = first.header("x-semcache-entry").unwrap().to_owned();
    let deleted = http
        .delete(c.url(&format!("/admin/entries/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    // The upstream fails while nodes are asked, so that a miss stores nothing for the next.
    upstream.set_mode(Mode::Status(500));
    for node in [&a, &b, &c] {
        assert_not_served(
            node.chat(&chat_body("What are your opening hours on Sundays?"))
                .await,
        );
    }
    upstream.set_mode(Mode::Normal);

    // Wrong-answer feedback through C on an exact hit evicts the entry everywhere.
    let stored = a.chat(&chat_body("Can I change my delivery address?")).await;
    let id: u64 = stored.header("x-semcache-entry").unwrap().parse().unwrap();
    let feedback = http
        .post(c.url(&format!("/admin/entries/{id}/feedback")))
        .json(&json!({"correct": false}))
        .send()
        .await
        .unwrap();
    // C may not have applied the entry yet: then it says so, and the report is retried.
    if feedback.status() == 404 {
        wait_applied(&c, 1).await;
        eventually("C has the entry", || async {
            http.post(c.url(&format!("/admin/entries/{id}/feedback")))
                .json(&json!({"correct": false}))
                .send()
                .await
                .unwrap()
                .status()
                == 200
        })
        .await;
    }
    upstream.set_mode(Mode::Status(500));
    for node in [&a, &b] {
        assert_not_served(node.chat(&chat_body("Can I change my delivery address?")).await);
    }
    upstream.set_mode(Mode::Normal);

    // A wrong answer served by meaning on B raises the entry's own threshold on A as well.
    a.chat(&chat_body("How do I cancel my subscription?")).await;
    wait_applied(&b, applied(&a).await).await;
    let served = b.chat(&chat_body("How can I cancel my subscription?")).await;
    assert_eq!(served.cache(), "hit");
    let similarity = served.similarity();
    let id: u64 = served.header("x-semcache-entry").unwrap().parse().unwrap();
    let reported = http
        .post(b.url("/v1/semcache/feedback"))
        .bearer_auth(KEY_A)
        .json(&json!({"entry_id": id, "correct": false, "similarity": similarity}))
        .send()
        .await
        .unwrap();
    assert_eq!(reported.status(), 200);
    eventually("A applies the raised threshold", || async {
        a.get_json("/admin/entries").await["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|entry| entry["id"] == json!(id) && entry["wrong_reports"] == json!(1))
    })
    .await;
    upstream.set_mode(Mode::Status(500));
    assert_not_served(a.chat(&chat_body("How can I cancel my subscription?")).await);
    upstream.set_mode(Mode::Normal);
    assert_eq!(
        a.chat(&chat_body("How do I cancel my subscription?"))
            .await
            .cache(),
        "hit",
        "the exact prompt still hits"
    );

    // Invalidation through B removes what A stored, on A and C.
    a.chat(&chat_body("Do you ship to Norway?")).await;
    wait_applied(&b, applied(&a).await).await;
    let invalidated: Value = http
        .post(b.url("/admin/invalidate"))
        .json(&json!({"prompt": "Do you deliver to Norway?", "min_similarity": 0.7}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(invalidated["removed"].as_u64().unwrap() >= 1, "{invalidated}");
    upstream.set_mode(Mode::Status(500));
    for node in [&a, &c] {
        assert_not_served(node.chat(&chat_body("Do you ship to Norway?")).await);
    }
    upstream.set_mode(Mode::Normal);

    // A flush through C, of one tenant, reaches entries C never saw.
    let kept = a
        .chat_as(KEY_B, &chat_body("Is there a student discount?"), &[])
        .await;
    assert_eq!(kept.cache(), "miss");
    a.chat(&chat_body("Is there a student discount?")).await;
    let flushed: Value = http
        .post(c.url("/admin/flush"))
        .json(&json!({"api_key": KEY_A}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(flushed["removed"].as_u64().unwrap() >= 1, "{flushed}");
    upstream.set_mode(Mode::Status(500));
    for node in [&a, &b, &c] {
        assert_not_served(node.chat(&chat_body("Is there a student discount?")).await);
        assert_eq!(
            node.chat_as(KEY_B, &chat_body("Is there a student discount?"), &[])
                .await
                .cache(),
            "hit",
            "the other tenant's entries stay"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_gone_from_redis_are_never_served_even_before_the_log_says_so() {
    let upstream = TestUpstream::start().await;
    let redis = Redis::start();
    let [a, b, _c] = three_nodes(&upstream, &redis).await;
    let stored = a.chat(&chat_body(ASKED)).await;
    let id = stored.header("x-semcache-entry").unwrap().to_owned();
    wait_applied(&b, 1).await;
    assert_eq!(b.chat(&chat_body(REWORDED)).await.cache(), "hit");

    // Removed behind every node's back, with nothing in the log (as an expiry or an eviction by
    // Redis itself is): no node serves it, exactly or by meaning.
    redis.query(&["DEL", &format!("semcache:e:{id}")]).unwrap();
    // The upstream fails meanwhile, so that no miss stores a new answer for the next node.
    upstream.set_mode(Mode::Status(500));
    for node in [&a, &b] {
        assert_not_served(node.chat(&chat_body(REWORDED)).await);
    }
    upstream.set_mode(Mode::Normal);

    // Expired by Redis's own clock, before any node's upkeep has looked.
    let short = b.chat(&chat_body("Where is my parcel?")).await;
    let id = short.header("x-semcache-entry").unwrap().to_owned();
    wait_applied(&a, applied(&b).await).await;
    redis
        .query(&["PEXPIRE", &format!("semcache:e:{id}"), "1"])
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    upstream.set_mode(Mode::Status(500));
    assert_not_served(a.chat(&chat_body("Where's my parcel?")).await);
    assert_not_served(b.chat(&chat_body("Where is my parcel?")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_misses_on_several_nodes_make_one_upstream_call() {
    let upstream = TestUpstream::start().await;
    upstream.set_delay(Duration::from_millis(400));
    let redis = Redis::start();
    let nodes = three_nodes(&upstream, &redis).await;
    let body = chat_body("Explain the refund policy.");
    let asks = (0..10).map(|i| nodes[i % 3].chat(&body));
    let replies = futures::future::join_all(asks).await;
    assert_eq!(
        upstream.chat_calls(),
        1,
        "one call for ten identical requests on three nodes"
    );
    let content = replies[0].content();
    assert!(replies.iter().all(|reply| reply.content() == content));
    assert_eq!(replies.iter().filter(|reply| reply.cache() == "miss").count(), 1);

    // A leader that gets nothing storable lets the others make their own call.
    upstream.set_mode(Mode::Status(500));
    let body = chat_body("Explain the warranty.");
    let asks = (0..3).map(|i| nodes[i].chat(&body));
    let replies = futures::future::join_all(asks).await;
    assert!(replies.iter().all(|reply| reply.status == 500));
    assert_eq!(upstream.chat_calls(), 4);
}

fn spawn_node(upstream: &str, redis: &str, data_dir: &Path) -> Process {
    spawn_binary(
        &[
            "--upstream",
            upstream,
            "--store",
            redis,
            "--data-dir",
            data_dir.to_str().unwrap(),
        ],
        &[("RUST_LOG", "info")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_writes_comes_back_with_every_acknowledged_entry() {
    let upstream = TestUpstream::start().await;
    let redis = Redis::start();
    let data_dir = fresh_data_dir();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut process = spawn_node(&upstream.base_url(), &redis.url(), &data_dir);
    // `no-cache` on the writes: each is stored, none is served from another.
    let ask = move |addr: std::net::SocketAddr, prompt: String, cache_control: &'static str| {
        let client = client.clone();
        async move { ask_at(&client, addr, &prompt, &[("cache-control", cache_control)]).await }
    };
    // Writes keep coming while the node is killed; what was answered was acknowledged.
    let addr = process.addr;
    let writer = tokio::spawn({
        let ask = ask.clone();
        async move {
            let mut acknowledged = Vec::new();
            for i in 0.. {
                match ask(addr, format!("Order number {i}: where is it now?"), "no-cache").await {
                    Ok(reply) if reply.status == 200 && reply.cache() == "miss" => {
                        acknowledged.push((format!("Order number {i}: where is it now?"), reply.content()));
                    }
                    // Still loading the shared store: answered as a plain proxy, not stored.
                    Ok(reply) if reply.cache() == "bypass" => {}
                    _ => return acknowledged,
                }
            }
            acknowledged
        }
    });
    eventually("some writes", || async { upstream.chat_calls() >= 30 }).await;
    process.child.kill().unwrap();
    process.child.wait().unwrap();
    let acknowledged = writer.await.unwrap();
    assert!(acknowledged.len() >= 20);

    let mut restarted = spawn_node(&upstream.base_url(), &redis.url(), &data_dir);
    for (prompt, content) in &acknowledged {
        let mut reply = ask(restarted.addr, prompt.clone(), "max-age=3600").await.unwrap();
        // The restarted node may still be loading: it answers as a plain proxy meanwhile.
        while reply.cache() == "bypass" {
            tokio::time::sleep(Duration::from_millis(20)).await;
            reply = ask(restarted.addr, prompt.clone(), "max-age=3600").await.unwrap();
        }
        assert_eq!(reply.cache(), "hit", "acknowledged {prompt:?} was lost");
        assert_eq!(&reply.content(), content);
    }
    let _ = restarted.child.kill();
    let _ = restarted.child.wait();
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_every_node_is_a_plain_proxy_and_recovers_when_it_is_back() {
    let upstream = TestUpstream::start().await;
    let mut redis = Redis::start();
    let [a, b, _c] = three_nodes(&upstream, &redis).await;
    let stored = a.chat(&chat_body(ASKED)).await;
    // appendfsync everysec: what was acknowledged more than a second before a crash is kept.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    redis.kill();
    for node in [&a, &b] {
        let reply = node.chat(&chat_body(ASKED)).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.cache(),
            "bypass",
            "nothing is served that Redis cannot vouch for"
        );
    }
    eventually("health says degraded", || async {
        a.get_json("/healthz").await["status"] == json!("degraded")
    })
    .await;
    let health = a.get_text("/healthz").await;
    assert!(!health.contains(&redis.url()) || !redis.url().contains('@'));

    // Redis comes back with its append-only file: the nodes load again and serve what it kept.
    redis.run();
    for node in [&a, &b] {
        wait_available(node).await;
        let reply = node.chat(&chat_body(REWORDED)).await;
        assert_eq!(reply.cache(), "hit", "{:?}", reply.body);
        assert_eq!(reply.content(), stored.content());
    }
    assert!(
        a.get_json("/stats").await["shared_store"]["loads"]
            .as_u64()
            .unwrap()
            >= 2
    );

    // Redis comes back having lost everything (no persistence, a new server): the nodes load
    // again and serve nothing of what they held.
    redis.kill();
    redis.wipe();
    redis.run();
    upstream.set_mode(Mode::Status(500));
    for node in [&a, &b] {
        eventually("the node reloads the emptied store", || async {
            let stats = node.get_json("/stats").await;
            stats["shared_store"]["available"] == json!(true) && stats["entries"] == json!(0)
        })
        .await;
        assert_not_served(node.chat(&chat_body(ASKED)).await);
        assert_not_served(node.chat(&chat_body(REWORDED)).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_password_is_never_shown() {
    const PASSWORD: &str = "s3cret-redis-passw0rd";
    let upstream = TestUpstream::start().await;
    let mut redis = Redis::start_with_password(Some(PASSWORD));
    let data_dir = fresh_data_dir();
    let process = spawn_binary(
        &[
            "--upstream",
            &upstream.base_url(),
            "--data-dir",
            data_dir.to_str().unwrap(),
        ],
        &[("RUST_LOG", "debug"), ("SEMCACHE_STORE", &redis.url())],
    );
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://{}{path}", process.addr);
    eventually("the node loads", || async {
        let stats: Value = client
            .get(url("/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        stats["shared_store"]["available"] == json!(true)
    })
    .await;
    let ask = || async { ask_at(&client, process.addr, ASKED, &[]).await.unwrap() };
    ask().await;
    // Redis lost: errors are logged and shown in /healthz and /stats.
    redis.kill();
    ask().await;
    let mut shown = Vec::new();
    for path in ["/stats", "/healthz", "/metrics", "/admin/config", "/dashboard"] {
        shown.push(client.get(url(path)).send().await.unwrap().text().await.unwrap());
    }
    assert!(shown[1].contains("degraded"), "{}", shown[1]);
    let mut process = process;
    let _ = process.child.kill();
    let _ = process.child.wait();
    let logs = process.output.lock().join("\n");
    assert!(logs.contains("using a shared store"), "{logs}");
    for text in shown.iter().chain([&logs]) {
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
    }
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_redis_serves_as_a_proxy_then_joins() {
    let upstream = TestUpstream::start().await;
    let mut redis = Redis::start();
    redis.kill();
    let url = redis.url();
    let early = Semcache::start_with(&upstream, |args| args.store = Some(url)).await;
    let reply = early.chat(&chat_body(ASKED)).await;
    assert_eq!((reply.status, reply.cache()), (200, "bypass"));
    redis.run();
    wait_available(&early).await;
    assert_eq!(early.chat(&chat_body(ASKED)).await.cache(), "miss");
    assert_eq!(early.chat(&chat_body(ASKED)).await.cache(), "hit");
    let _ = redis.dir();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_entries_holds_across_the_cluster() {
    let upstream = TestUpstream::start().await;
    let redis = Redis::start();
    let a = node_with(&upstream, &redis, |args| args.max_entries = 5).await;
    let b = node_with(&upstream, &redis, |args| args.max_entries = 5).await;
    for i in 0..6 {
        a.chat(&chat_body(&format!("Question number {i} about invoices")))
            .await;
        b.chat(&chat_body(&format!("Question number {i} about shipping")))
            .await;
    }
    let count = redis.query(&["ZCARD", "semcache:ids"]).unwrap();
    assert_eq!(count, redis::Value::Int(5));
    eventually("the nodes drop what Redis evicted", || async {
        a.get_json("/stats").await["entries"] == json!(5) && b.get_json("/stats").await["entries"] == json!(5)
    })
    .await;
}

/// A private CA and a certificate for 127.0.0.1 signed by it, made with `openssl` in `dir`.
fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=semcache test CA",
    ]
    .into_iter()
    .chain(["-keyout", "ca.key", "-out", "ca.pem"])
    .collect::<Vec<_>>());
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_speak_tls_to_redis() {
    let upstream = TestUpstream::start().await;
    let dir = fresh_data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let _removed = RemovedOnDrop(dir.clone());
    certificates(&dir);
    let port = free_port();
    let mut server = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
        ])
        .args([
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.pem",
        ])
        .args(["--tls-auth-clients", "no", "--save", "", "--daemonize", "no"])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not listen for TLS");
        std::thread::sleep(Duration::from_millis(20));
    }
    let data_dir = dir.join("node");
    let store = format!("rediss://127.0.0.1:{port}");
    let ca = dir.join("ca.pem");
    let node = |trusted: bool| {
        let mut envs = vec![("RUST_LOG", "info"), ("SEMCACHE_STORE", store.as_str())];
        if trusted {
            envs.push(("SSL_CERT_FILE", ca.to_str().unwrap()));
        }
        spawn_binary(
            &[
                "--upstream",
                &upstream.base_url(),
                "--data-dir",
                data_dir.to_str().unwrap(),
            ],
            &envs,
        )
    };
    let client = reqwest::Client::new();
    let ask = |addr: std::net::SocketAddr| {
        let client = client.clone();
        async move {
            ask_at(&client, addr, ASKED, &[])
                .await
                .unwrap()
                .cache()
                .to_owned()
        }
    };
    // With the CA trusted, the node loads over TLS and caches.
    let trusted = node(true);
    eventually("the node loads over TLS", || async {
        let stats: Value = client
            .get(format!("http://{}/stats", trusted.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        stats["shared_store"]["available"] == json!(true)
    })
    .await;
    assert_eq!(ask(trusted.addr).await, "miss");
    assert_eq!(ask(trusted.addr).await, "hit");
    drop(trusted);
    // A server whose certificate is not trusted is never used: a plain proxy, saying why.
    let untrusted = node(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ask(untrusted.addr).await, "bypass");
    let health: Value = client
        .get(format!("http://{}/healthz", untrusted.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], json!("degraded"), "{health}");
    drop(untrusted);
    let _ = server.kill();
    let _ = server.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_the_trimmed_log_loads_everything_again() {
    let upstream = TestUpstream::start().await;
    let redis = Redis::start();
    let a = node(&upstream, &redis).await;
    let b = node(&upstream, &redis).await;
    let stored = a.chat(&chat_body(ASKED)).await;
    let id = stored.header("x-semcache-entry").unwrap().to_owned();
    wait_applied(&b, 1).await;
    let loads = |stats: &Value| stats["shared_store"]["loads"].as_u64().unwrap();
    let before = loads(&b.get_json("/stats").await);
    assert_eq!(b.get_json("/stats").await["entries"], json!(1));

    // A change no node can read: the entry removed, and its line trimmed from the log at once.
    // (Numbered as semcache numbers every line, so that the gap is one a node can see.)
    let script = "redis.call('DEL', KEYS[1]) \
                  local n = redis.call('INCR', KEYS[3]) \
                  redis.call('XADD', KEYS[2], '*', 'n', n, 'op', 'del', 'id', ARGV[1], 'ms', '0') \
                  redis.call('XTRIM', KEYS[2], 'MAXLEN', 0) return 1";
    let entry = format!("semcache:e:{id}");
    redis
        .query(&["EVAL", script, "3", &entry, "semcache:log", "semcache:seq", &id])
        .unwrap();
    // The next change shows B that it fell behind: it loads everything again, and the removed
    // entry is gone from its replica.
    a.chat(&chat_body("Can I get a copy of last month's invoice?"))
        .await;
    eventually("B loads again without the removed entry", || async {
        let stats = b.get_json("/stats").await;
        loads(&stats) > before && stats["entries"] == json!(1)
    })
    .await;
    let listed = b.get_json("/admin/entries").await;
    assert!(listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|entry| entry["id"] != json!(id.parse::<u64>().unwrap())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_keep_caches_on_one_redis_apart() {
    let upstream = TestUpstream::start().await;
    let redis = Redis::start();
    let one = node_with(&upstream, &redis, |args| args.namespace = "one".into()).await;
    let two = node_with(&upstream, &redis, |args| args.namespace = "two".into()).await;
    let stored = one.chat(&chat_body(ASKED)).await;
    assert_eq!(one.chat(&chat_body(ASKED)).await.cache(), "hit");
    let other = two.chat(&chat_body(ASKED)).await;
    assert_eq!(other.cache(), "miss", "another namespace is another cache");
    assert_ne!(other.content(), stored.content());
    assert_eq!(redis.query(&["ZCARD", "one:ids"]).unwrap(), redis::Value::Int(1));
    assert_eq!(redis.query(&["ZCARD", "two:ids"]).unwrap(), redis::Value::Int(1));
}

#[cfg(feature = "candle")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_whose_vectors_another_embedder_made_is_not_used() {
    let upstream = TestUpstream::start().await;
    let redis = Redis::start();
    let first = node(&upstream, &redis).await;
    first.chat(&chat_body(ASKED)).await;
    let url = redis.url();
    let other = Semcache::start_with_embedder(
        &upstream,
        crate::support::embedder_on(semcache::embed::Backend::Candle),
        |args| args.store = Some(url),
    )
    .await;
    wait_degraded(&other, "holds vectors made by").await;
    let health = other.get_json("/healthz").await;
    let why = health["store"].as_str().unwrap();
    assert!(
        why.contains("candle") && why.contains("onnx"),
        "names both embedders: {why}"
    );
    assert_eq!(other.chat(&chat_body(ASKED)).await.cache(), "bypass");
    assert_eq!(
        first.chat(&chat_body(ASKED)).await.cache(),
        "hit",
        "the first node is unaffected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_are_matched_on_every_node_and_stay_in_their_tenant() {
    let upstream = TestUpstream::start().await;
    let redis = Redis::start();
    let semantic =
        |args: &mut semcache::config::ServeArgs| args.context = semcache::config::ContextMode::Semantic;
    let a = node_with(&upstream, &redis, semantic).await;
    let b = node_with(&upstream, &redis, semantic).await;
    let chat = |first: &str, last: &str| {
        json!({"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": "You are a helpful support assistant."},
            {"role": "user", "content": first},
            {"role": "assistant", "content": "I can help with that subscription. What would you like to do?"},
            {"role": "user", "content": last}]})
    };
    let stored = a
        .chat(&chat(
            "Hi, I want to stop paying for my Netflix Premium subscription.",
            "Please cancel it.",
        ))
        .await;
    assert_eq!(stored.cache(), "miss");
    wait_applied(&b, 1).await;
    let reworded = chat(
        "Hello, I'd like to stop paying for my Netflix Premium subscription.",
        "Please cancel it.",
    );
    let hit = b.chat(&reworded).await;
    assert_eq!(hit.cache(), "hit", "{:?}", hit.body);
    assert_eq!(hit.content(), stored.content());
    let other_tenant = b.chat_as(KEY_B, &reworded, &[]).await;
    assert_ne!(
        other_tenant.content(),
        stored.content(),
        "tenant B served tenant A's answer"
    );
    let gym = chat(
        "Hi, I want to stop paying for my FitLife gym membership.",
        "Please cancel it.",
    );
    assert_eq!(b.chat(&gym).await.cache(), "miss");
    assert_eq!(upstream.chat_calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_of_format_version_1_is_used_and_marked_version_2() {
    let upstream = TestUpstream::start().await;
    let redis = Redis::start();
    redis
        .query(&["HSET", "semcache:meta", "format_version", "1"])
        .unwrap();
    let a = node(&upstream, &redis).await;
    a.chat(&chat_body(ASKED)).await;
    assert_eq!(a.chat(&chat_body(ASKED)).await.cache(), "hit");
    assert_eq!(
        redis.query(&["HGET", "semcache:meta", "format_version"]).unwrap(),
        redis::Value::BulkString(b"2".to_vec())
    );
    redis
        .query(&["HSET", "semcache:meta", "format_version", "3"])
        .unwrap();
    // A namespace a newer release wrote is refused, and the node says why.
    let url = redis.url();
    let newer = Semcache::start_with(&upstream, |args| args.store = Some(url)).await;
    wait_degraded(&newer, "format version 3").await;
    assert_eq!(newer.chat(&chat_body(ASKED)).await.cache(), "bypass");
}
