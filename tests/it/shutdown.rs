//! SIGTERM: the real binary stops taking connections, lets requests in flight finish, closes
//! the store and exits 0; a restart right after serves every answer it acknowledged.

use std::time::Duration;

use crate::support::{chat_body, fresh_data_dir, spawn_binary, wait_until, Reply, TestUpstream, KEY_A};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_and_keeps_their_answers() {
    let upstream = TestUpstream::start().await;
    let data_dir = fresh_data_dir();
    let args = [
        "--upstream".to_owned(),
        upstream.base_url(),
        "--data-dir".to_owned(),
        data_dir.to_str().unwrap().to_owned(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut process = spawn_binary(&args, &[("RUST_LOG", "info")]);
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", process.addr);
    let ask = |prompt: &'static str| http.post(&url).bearer_auth(KEY_A).json(&chat_body(prompt)).send();
    assert_eq!(ask("What is the capital of Peru?").await.unwrap().status(), 200);

    upstream.set_delay(Duration::from_millis(1500));
    let in_flight = tokio::spawn(ask("What is the capital of Chile?"));
    wait_until("the upstream has the request", || upstream.chat_calls() == 2).await;
    let pid = process.child.id().to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(signalled.success());
    wait_until("the binary saw the signal", || {
        process
            .output
            .lock()
            .iter()
            .any(|line| line.contains("shutting down"))
    })
    .await;
    // The listener closes just after saying so.
    let refused = async {
        loop {
            if tokio::net::TcpStream::connect(process.addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(5), refused)
            .await
            .is_ok(),
        "no new connections after SIGTERM"
    );
    assert!(
        reqwest::Client::new().post(&url).send().await.is_err(),
        "no new connections after SIGTERM"
    );

    let finished = Reply::from(in_flight.await.unwrap().unwrap()).await;
    assert_eq!(finished.status, 200, "the request in flight finished");
    assert_eq!(finished.cache(), "miss");
    let output = std::sync::Arc::clone(&process.output);
    let status = tokio::task::spawn_blocking(move || process.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let output = output.lock().join("\n");
    assert!(!output.contains("panicked"), "{output}");

    upstream.set_delay(Duration::ZERO);
    let mut restarted = spawn_binary(&args, &[("RUST_LOG", "info")]);
    let url = format!("http://{}/v1/chat/completions", restarted.addr);
    for prompt in ["What is the capital of Peru?", "What is the capital of Chile?"] {
        let reply = Reply::from(
            http.post(&url)
                .bearer_auth(KEY_A)
                .json(&chat_body(prompt))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(reply.cache(), "hit", "{prompt} was acknowledged, so it is kept");
    }
    restarted.child.kill().unwrap();
    restarted.child.wait().unwrap();
    std::fs::remove_dir_all(&data_dir).ok();
}
