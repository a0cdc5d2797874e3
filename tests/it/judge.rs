//! The judge end to end: real model, real HTTP, and a test judge that answers the judge prompt
//! from a labelled table, or errs, times out, answers garbage or answers slowly on demand.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::support::{RemovedOnDrop, Semcache, TestUpstream};

/// How the test judge answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// From the table: "Yes." for a labelled paraphrase, "No" for anything else.
    Table,
    /// This status and an OpenAI error body.
    Status(u16),
    /// Neither yes nor no.
    Garbage,
}

/// Every call is 100 prompt tokens and 1 completion token.
const JUDGE_PROMPT_TOKENS: u64 = 100;
const JUDGE_KEY: &str = "sk-judge-only-key-42";
const JUDGE_MODEL: &str = "gpt-4o-mini";

#[derive(Default)]
struct JudgeState {
    /// Groups of requests that the table says share an answer.
    same: Vec<Vec<String>>,
    mode: Mutex<Option<Mode>>,
    delay: Mutex<Duration>,
    calls: AtomicUsize,
    /// Every body and Authorization the judge received.
    bodies: Mutex<Vec<Value>>,
    authorizations: Mutex<Vec<String>>,
}

pub(crate) struct TestJudge {
    addr: SocketAddr,
    state: Arc<JudgeState>,
}

impl TestJudge {
    pub(crate) async fn start(same: &[&[&str]]) -> Self {
        let state = Arc::new(JudgeState {
            same: same
                .iter()
                .map(|group| group.iter().map(|text| (*text).to_owned()).collect())
                .collect(),
            ..JudgeState::default()
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(judge))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock() = Some(mode);
    }

    fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock() = delay;
    }

    fn last_body(&self) -> Value {
        self.state
            .bodies
            .lock()
            .last()
            .cloned()
            .expect("the judge was called")
    }
}

/// The text quoted after `Request {name}:` in a judge prompt.
fn quoted(prompt: &str, name: &str) -> Option<String> {
    let start = prompt.find(&format!("Request {name}:\n<<<\n"))? + format!("Request {name}:\n<<<\n").len();
    let end = start + prompt[start..].find("\n>>>")?;
    Some(prompt[start..end].to_owned())
}

async fn judge(
    State(state): State<Arc<JudgeState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    state.calls.fetch_add(1, Ordering::SeqCst);
    if let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        state.authorizations.lock().push(auth.to_owned());
    }
    state.bodies.lock().push(body.clone());
    let delay = *state.delay.lock();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let answer = match state.mode.lock().unwrap_or(Mode::Table) {
        Mode::Status(code) => {
            let error = json!({"error": {"message": "judge says no", "type": "server_error", "param": null, "code": null}});
            return (StatusCode::from_u16(code).unwrap(), Json(error)).into_response();
        }
        Mode::Garbage => "I am not sure; it depends.",
        Mode::Table => {
            let prompt = body["messages"][1]["content"].as_str().unwrap_or("");
            let (a, b) = (quoted(prompt, "A"), quoted(prompt, "B"));
            let same = state.same.iter().any(|group| {
                [&a, &b]
                    .iter()
                    .all(|text| text.as_ref().is_some_and(|text| group.contains(text)))
            });
            if same {
                " Yes."
            } else {
                "No"
            }
        }
    };
    Json(json!({
        "id": "chatcmpl-judge", "object": "chat.completion", "created": 1_700_000_000, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": JUDGE_PROMPT_TOKENS, "completion_tokens": 1, "total_tokens": JUDGE_PROMPT_TOKENS + 1}
    }))
    .into_response()
}

/// Similarity 0.81 with the real model: below the default threshold, above the judge's floor.
const PYTHON: &str = "What is the best way to learn Python quickly?";
const PYTHON_REWORDED: &str = "How do I get good at Python programming fast?";
/// More ways to ask it.
const PYTHON_MORE: [&str; 3] = [
    "How do I get good at programming in Python fast?",
    "How can I get good at Python programming fast?",
    "What's the fastest way to learn Python?",
];
const PYTHON_ALL: [&str; 5] = [
    PYTHON,
    PYTHON_REWORDED,
    PYTHON_MORE[0],
    PYTHON_MORE[1],
    PYTHON_MORE[2],
];
/// Similarity 0.90: above the threshold, served by similarity alone, but another answer.
const EGGS: &str = "How do I make pancakes without eggs?";
const MILK: &str = "How do I make pancakes without milk?";
/// Similarity 0.78, below the threshold, another answer too.
const CAPITAL: &str = "What is the capital of Australia?";
const LARGEST: &str = "What is the largest city in Australia?";

fn ask(prompt: &str) -> Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]})
}

pub(crate) async fn with_judge(upstream: &TestUpstream, judge: &TestJudge, timeout_ms: u64) -> Semcache {
    let url = judge.base_url();
    Semcache::start_with(upstream, |args| {
        args.judge.judge_model = Some(JUDGE_MODEL.to_owned());
        args.judge.judge_upstream = Some(url);
        args.judge.judge_api_key = Some(JUDGE_KEY.to_owned());
        args.judge.judge_timeout_ms = timeout_ms;
    })
    .await
}

#[tokio::test]
async fn a_paraphrase_below_the_threshold_is_served_only_after_the_judge_says_yes() {
    let upstream = TestUpstream::start().await;
    let judge = TestJudge::start(&[&PYTHON_ALL]).await;
    let semcache = with_judge(&upstream, &judge, 2000).await;

    let stored = semcache.chat(&ask(PYTHON)).await;
    assert_eq!((stored.status, stored.cache()), (200, "miss"));
    assert_eq!(judge.calls(), 0, "nothing to judge in an empty cache");

    let reworded = semcache.chat(&ask(PYTHON_REWORDED)).await;
    assert_eq!(
        (reworded.status, reworded.cache()),
        (200, "hit"),
        "{:?}",
        reworded.body
    );
    assert_eq!(reworded.header("x-semcache-judged"), Some("yes"));
    assert!(
        reworded.similarity() < 0.82,
        "below the threshold: {}",
        reworded.similarity()
    );
    assert_eq!(reworded.content(), stored.content());
    assert_eq!((judge.calls(), upstream.chat_calls()), (1, 1));

    // The call: the judge model, deterministic, one token, both requests verbatim, the
    // judge's own key and not the client's.
    let body = judge.last_body();
    assert_eq!(body["model"], JUDGE_MODEL);
    assert_eq!(
        (body["temperature"].as_f64(), body["max_tokens"].as_u64()),
        (Some(0.0), Some(1))
    );
    let prompt = body["messages"][1]["content"].as_str().unwrap();
    assert!(prompt.starts_with(semcache::judge::QUESTION), "{prompt}");
    assert_eq!(quoted(prompt, "A").as_deref(), Some(PYTHON));
    assert_eq!(quoted(prompt, "B").as_deref(), Some(PYTHON_REWORDED));
    assert_eq!(
        *judge.state.authorizations.lock(),
        vec![format!("Bearer {JUDGE_KEY}")]
    );
    assert!(upstream.strays().is_empty(), "no judge call went to the upstream");

    // The same question again: the verdict is remembered, no second call.
    let again = semcache.chat(&ask(PYTHON_REWORDED)).await;
    assert_eq!(
        (again.cache(), again.header("x-semcache-judged")),
        ("hit", Some("yes"))
    );
    assert_eq!((judge.calls(), upstream.chat_calls()), (1, 1));

    // Accounting: one call, its tokens at the judge model's price, savings net of it.
    let stats = semcache.get_json("/stats").await;
    let j = &stats["judge"];
    assert_eq!(
        (j["model"].as_str(), j["calls"].as_u64()),
        (Some(JUDGE_MODEL), Some(1))
    );
    assert_eq!(
        (
            j["approved"].as_u64(),
            j["rejected"].as_u64(),
            j["failed"].as_u64()
        ),
        (Some(1), Some(0), Some(0))
    );
    assert_eq!(
        (j["remembered"].as_u64(), j["judged_hits"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(j["prompt_tokens"].as_u64(), Some(JUDGE_PROMPT_TOKENS));
    assert_eq!(j["completion_tokens"].as_u64(), Some(1));
    let judge_cost = (JUDGE_PROMPT_TOKENS as f64 * 0.15 + 0.60) / 1e6;
    assert!(
        (j["cost_usd"].as_f64().unwrap() - judge_cost).abs() < 1e-12,
        "{j}"
    );
    let saved = stats["cost_saved_usd"].as_f64().unwrap();
    assert!(saved > 0.0, "{stats}");
    assert!(
        (stats["cost_saved_net_usd"].as_f64().unwrap() - (saved - judge_cost)).abs() < 1e-12,
        "{stats}"
    );
    let metrics = semcache.get_text("/metrics").await;
    for line in [
        "semcache_judge_calls_total{outcome=\"approved\"} 1",
        "semcache_judge_remembered_total 1",
        "semcache_judge_hits_total{vouched=\"judge\"} 2",
        "semcache_judge_tokens_total{kind=\"prompt\"} 100",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    semcache.stop().await;
}

#[tokio::test]
async fn a_trap_the_judge_rejects_is_never_served() {
    let upstream = TestUpstream::start().await;
    // Without a judge, pancakes without eggs answer for pancakes without milk.
    let plain = Semcache::start(&upstream).await;
    plain.chat(&ask(EGGS)).await;
    let served = plain.chat(&ask(MILK)).await;
    assert_eq!(served.cache(), "hit", "similarity alone serves this trap");
    plain.stop().await;

    let judge = TestJudge::start(&[]).await;
    let semcache = with_judge(&upstream, &judge, 2000).await;
    for (stored, trap) in [(EGGS, MILK), (CAPITAL, LARGEST)] {
        let first = semcache.chat(&ask(stored)).await;
        let before = (judge.calls(), upstream.chat_calls());
        let asked = semcache.chat(&ask(trap)).await;
        assert_eq!((asked.status, asked.cache()), (200, "miss"), "{trap}");
        assert_ne!(asked.content(), first.content());
        assert_eq!(
            (judge.calls(), upstream.chat_calls()),
            (before.0 + 1, before.1 + 1),
            "{trap}"
        );
    }
    let stats = semcache.get_json("/stats").await;
    assert_eq!(
        (stats["judge"]["rejected"].as_u64(), stats["hits"].as_u64()),
        (Some(2), Some(0)),
        "{stats}"
    );
    semcache.stop().await;
}

#[tokio::test]
async fn judge_faults_are_misses_and_are_counted() {
    let upstream = TestUpstream::start().await;
    let judge = TestJudge::start(&[&PYTHON_ALL]).await;
    let semcache = with_judge(&upstream, &judge, 300).await;
    semcache.chat(&ask(PYTHON)).await;

    let faults = [
        ("status", Mode::Status(500), Duration::ZERO),
        ("unreadable", Mode::Garbage, Duration::ZERO),
        ("timeout", Mode::Table, Duration::from_millis(1500)),
    ];
    // Each fault on another wording: a miss stores its answer, and a stored request would be an
    // exact hit.
    let wordings = [PYTHON_MORE[0], PYTHON_MORE[1], PYTHON_REWORDED];
    for ((kind, mode, delay), wording) in faults.into_iter().zip(wordings) {
        judge.set_mode(mode);
        judge.set_delay(delay);
        let before = upstream.chat_calls();
        let reply = semcache.chat(&ask(wording)).await;
        assert_eq!(
            (reply.status, reply.cache()),
            (200, "miss"),
            "{kind}: {:?}",
            reply.body
        );
        assert_eq!(reply.header("x-semcache-judged"), None);
        assert_eq!(
            upstream.chat_calls(),
            before + 1,
            "{kind}: answered by the upstream"
        );
        let stats = semcache.get_json("/stats").await;
        assert_eq!(stats["judge"]["failures"][kind], 1, "{kind}: {stats}");
    }
    // No verdict came of any of them: once the judge answers again, it is asked.
    judge.set_delay(Duration::ZERO);
    let calls = judge.calls();
    let reply = semcache.chat(&ask(PYTHON_MORE[2])).await;
    assert_eq!((reply.cache(), judge.calls()), ("hit", calls + 1));
    let stats = semcache.get_json("/stats").await;
    assert_eq!(
        (stats["judge"]["failed"].as_u64(), stats["hits"].as_u64()),
        (Some(3), Some(1)),
        "{stats}"
    );
    semcache.stop().await;

    // A judge that cannot be reached at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let semcache = Semcache::start_with(&upstream, |args| {
        args.judge.judge_model = Some(JUDGE_MODEL.to_owned());
        args.judge.judge_upstream = Some(nowhere);
    })
    .await;
    semcache.chat(&ask(PYTHON)).await;
    let reply = semcache.chat(&ask(PYTHON_REWORDED)).await;
    assert_eq!((reply.status, reply.cache()), (200, "miss"));
    let stats = semcache.get_json("/stats").await;
    assert_eq!(stats["judge"]["failures"]["transport"], 1, "{stats}");
    semcache.stop().await;
}

#[tokio::test]
async fn verdicts_are_kept_with_the_entry_across_a_restart() {
    let upstream = TestUpstream::start().await;
    let judge = TestJudge::start(&[&PYTHON_ALL]).await;
    let data_dir = crate::support::fresh_data_dir();
    let _removed = RemovedOnDrop(data_dir.clone());
    let start = |dir: std::path::PathBuf| {
        let url = judge.base_url();
        Semcache::start_with(&upstream, move |args| {
            args.data_dir = dir;
            args.judge.judge_model = Some(JUDGE_MODEL.to_owned());
            args.judge.judge_upstream = Some(url);
        })
    };
    let semcache = start(data_dir.clone()).await;
    let stored = semcache.chat(&ask(PYTHON)).await;
    semcache.chat(&ask(EGGS)).await;
    assert_eq!(semcache.chat(&ask(PYTHON_REWORDED)).await.cache(), "hit");
    assert_eq!(semcache.chat(&ask(MILK)).await.cache(), "miss");
    assert_eq!(judge.calls(), 2);
    semcache.stop().await;

    let semcache = start(data_dir.clone()).await;
    let approved = semcache.chat(&ask(PYTHON_REWORDED)).await;
    assert_eq!((approved.cache(), approved.content()), ("hit", stored.content()));
    // MILK's own answer was stored on its miss: asked again, it is an exact hit, no judging.
    assert_eq!(semcache.chat(&ask(MILK)).await.header("x-semcache-judged"), None);
    assert_eq!(
        judge.calls(),
        2,
        "no verdict was asked for again after the restart"
    );
    let stats = semcache.get_json("/stats").await;
    assert_eq!(stats["judge"]["remembered"], 1, "{stats}");
    semcache.stop().await;
}

#[tokio::test]
async fn the_judge_adds_its_latency_to_judged_hits_only() {
    let upstream = TestUpstream::start().await;
    let judge = TestJudge::start(&[&PYTHON_ALL]).await;
    judge.set_delay(Duration::from_millis(120));
    let semcache = with_judge(&upstream, &judge, 2000).await;
    semcache.chat(&ask(PYTHON)).await;
    assert_eq!(
        semcache.chat(&ask(PYTHON)).await.header("x-semcache-judged"),
        None,
        "exact: no judge"
    );
    assert_eq!(judge.calls(), 0);
    assert_eq!(semcache.chat(&ask(PYTHON_REWORDED)).await.cache(), "hit");
    let stats = semcache.get_json("/stats").await;
    let mean = stats["judge"]["mean_latency_ms"].as_f64().unwrap();
    // What /stats reports is what the call took: at least the judge's own delay.
    assert!(mean >= 120.0, "{stats}");
    semcache.stop().await;
}

#[tokio::test]
async fn a_judge_on_the_main_upstream_gets_the_clients_key_and_only_there() {
    let upstream = TestUpstream::start().await;
    let semcache = Semcache::start_with(&upstream, |args| {
        args.judge.judge_model = Some(JUDGE_MODEL.to_owned());
    })
    .await;
    semcache.chat(&ask(PYTHON)).await;
    let reply = semcache.chat(&ask(PYTHON_REWORDED)).await;
    // The test upstream answers the judge's question with a sentence: no verdict, a miss.
    assert_eq!((reply.status, reply.cache()), (200, "miss"));
    assert_eq!(
        upstream.chat_calls(),
        3,
        "the stored request, the judge call, the miss"
    );
    let key = format!("Bearer {}", crate::support::KEY_A);
    assert_eq!(upstream.authorizations(), vec![key.clone(), key.clone(), key]);
    let stats = semcache.get_json("/stats").await;
    assert_eq!(stats["judge"]["failures"]["unreadable"], 1, "{stats}");
    semcache.stop().await;
}

#[test]
fn bad_judge_settings_are_refused_at_start() {
    use clap::Parser;
    for (flag, value) in [
        ("--judge-floor", "1.5"),
        ("--judge-max-error", "1"),
        ("--judge-timeout-ms", "0"),
        ("--judge-upstream", "ftp://judge.example/v1"),
        ("--judge-model", " "),
    ] {
        let args = semcache::config::ServeArgs::parse_from([
            "serve",
            "--upstream",
            "http://127.0.0.1:9/v1",
            flag,
            value,
        ]);
        let error = args.validate().expect_err(flag);
        assert!(error.to_string().contains(flag), "{flag}: {error}");
    }
}
