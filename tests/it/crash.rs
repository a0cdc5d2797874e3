//! Crash safety: the real binary is killed with SIGKILL while taking writes, again and again.
//! After every restart the store must open, every acknowledged entry must be served with its
//! answer, the index must agree with the store, and nothing may have panicked.
//!
//! `SEMCACHE_CRASH_LOOPS=200 cargo test --test it crash -- --nocapture` runs a longer loop.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::support::{ask_at, fresh_data_dir, spawn_binary, Process, Reply, TestUpstream};

fn spawn(upstream: &str, data_dir: &Path) -> Process {
    let data_dir = data_dir.to_str().unwrap();
    spawn_binary(
        &[
            "--threshold",
            "1.0",
            "--upstream",
            upstream,
            "--data-dir",
            data_dir,
        ],
        &[("RUST_LOG", "info")],
    )
}

async fn ask(client: &reqwest::Client, addr: SocketAddr, prompt: &str) -> Result<Reply, reqwest::Error> {
    ask_at(client, addr, prompt, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_entries_survive_sigkill_in_a_loop() {
    let loops: usize = std::env::var("SEMCACHE_CRASH_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let upstream = TestUpstream::start().await;
    let data_dir = fresh_data_dir();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let acknowledged: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);

    for round in 0..loops {
        let mut process = spawn(&upstream.base_url(), &data_dir);

        let known = acknowledged.lock().clone();
        for (prompt, content) in &known {
            let reply = ask(&client, process.addr, prompt).await.unwrap();
            assert_eq!(
                reply.cache(),
                "hit",
                "round {round}: acknowledged {prompt:?} was lost"
            );
            assert_eq!(
                &reply.content(),
                content,
                "round {round}: {prompt:?} came back different"
            );
        }
        let stats: Value = client
            .get(format!("http://{}/stats", process.addr))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let entries = stats["entries"].as_u64().unwrap();
        assert!(entries >= known.len() as u64, "round {round}: {stats}");
        assert_eq!(
            stats["indexed"], stats["entries"],
            "round {round}: index and store disagree"
        );

        // Writers store new entries until the process is killed under them.
        let writers: Vec<_> = (0..4)
            .map(|writer| {
                let client = client.clone();
                let acknowledged = Arc::clone(&acknowledged);
                let addr = process.addr;
                tokio::spawn(async move {
                    for n in 0.. {
                        let prompt =
                            format!("round {round} writer {writer} question {n}: zebra{n}x{writer}?");
                        match ask(&client, addr, &prompt).await {
                            Ok(reply) if reply.status == 200 && reply.cache() == "miss" => {
                                acknowledged.lock().push((prompt, reply.content()));
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
        process.child.kill().unwrap();
        process.child.wait().unwrap();
        for writer in writers {
            writer.await.unwrap();
        }
        let output = process.output.lock().join("\n");
        assert!(!output.contains("panicked"), "round {round}: a panic:\n{output}");
    }

    let process = spawn(&upstream.base_url(), &data_dir);
    let total = acknowledged.lock().len();
    eprintln!("crash loop: {loops} SIGKILLs survived, {total} acknowledged entries kept");
    assert!(
        total > loops,
        "the writers acknowledged too little to test anything: {total}"
    );
    let mut process = process;
    process.child.kill().unwrap();
    process.child.wait().unwrap();
    std::fs::remove_dir_all(&data_dir).unwrap();
}
