//! The evaluation commands, on the repository's own labelled data and the real model.

use std::path::Path;
use std::process::Command;

use semcache::eval::{self, Grid};
use serde_json::Value;

use crate::support::{embedder, fresh_data_dir, model_dir, RemovedOnDrop};

const TRAPS: &str = "tests/data/traps.jsonl";

fn semcache(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_semcache"))
        .args(args)
        .env("SEMCACHE_MODEL_DIR", model_dir())
        .output()
        .expect("the semcache binary runs")
}

/// What `semcache args` prints, once it has succeeded (its errors shown when it has not).
fn semcache_stdout(args: &[&str]) -> Vec<u8> {
    let output = semcache(args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// On the trap suite, where the threshold alone serves most traps, the verifier removes most
/// of them and keeps the paraphrases: measured through the server's lookup.
#[tokio::test]
async fn the_verifier_removes_trap_hits_and_keeps_paraphrase_hits() {
    let pairs = eval::read_pairs(Path::new(TRAPS)).unwrap();
    let grid = Grid::parse("0.70:0.98:0.02").unwrap().with(0.82);
    let report = eval::eval_pairs(&embedder(), &pairs, &grid).await.unwrap();
    assert_eq!(report.pairs, pairs.len());
    let (plain, verified) = report.at(0.82).unwrap();
    assert!(
        plain.false_hit_rate > 0.5,
        "the threshold alone serves most traps: {plain:?}"
    );
    assert!(
        verified.false_hit_rate < 0.1,
        "the verifier refuses them: {verified:?}"
    );
    assert!(
        verified.duplicates_served * 100 >= plain.duplicates_served * 95,
        "paraphrase hits kept: {verified:?} of {plain:?}"
    );
    // Recall can only fall as the threshold rises.
    for rows in [&report.plain, &report.verified] {
        assert!(rows.windows(2).all(|w| w[0].recall >= w[1].recall), "{rows:?}");
    }
}

#[test]
fn eval_pairs_prints_json_and_draws_a_plot() {
    let guard = RemovedOnDrop(fresh_data_dir());
    let dir = &guard.0;
    std::fs::create_dir_all(dir).unwrap();
    let plot = dir.join("pairs.png");
    let output = semcache_stdout(&[
        "eval",
        "pairs",
        TRAPS,
        "--sample",
        "40",
        "--json",
        "--plot",
        plot.to_str().unwrap(),
    ]);
    let report: Value = serde_json::from_slice(&output).unwrap();
    assert_eq!(report["pairs"], 40);
    assert_eq!(report["plain"].as_array().unwrap().len(), 15);
    let png = std::fs::read(&plot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG file");
    assert!(png.len() > 10_000, "with curves and labels: {} bytes", png.len());
}

/// Through a simulated judge that is always right, on the trap suite: no wrong hit, every right
/// hit the verifier alone serves still served, more from the floor up; the row without a judge
/// makes no call. The same run twice gives the same rows, but for the time the calls took.
#[test]
fn eval_pairs_runs_through_simulated_judges() {
    let args = ["eval", "pairs", TRAPS, "--json", "--judge-simulated", "1.0,0.9"];
    let output = semcache_stdout(&args);
    let report: Value = serde_json::from_slice(&output).unwrap();
    let rows = report["judged"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|row| row["judge"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "verifier alone",
            "simulated, 100.0% right",
            "simulated, 90.0% right"
        ]
    );
    let count = |row: &Value, field: &str| row[field].as_u64().unwrap();
    let (alone, perfect, noisy) = (&rows[0], &rows[1], &rows[2]);
    assert_eq!(count(alone, "judge_calls"), 0, "{alone}");
    assert!(
        count(alone, "wrong") > 0,
        "the suite has traps the verifier serves: {alone}"
    );
    assert_eq!(count(perfect, "wrong"), 0, "{perfect}");
    assert!(
        count(perfect, "hits") > count(alone, "hits") - count(alone, "wrong"),
        "{perfect} against {alone}"
    );
    assert!(
        count(perfect, "judge_calls") >= count(perfect, "hits"),
        "{perfect}"
    );
    assert_eq!(
        count(noisy, "judge_calls"),
        count(perfect, "judge_calls"),
        "{noisy}"
    );
    assert!(count(perfect, "judge_prompt_tokens") > 0, "{perfect}");
    // Everything but the time the calls took.
    let timeless = |report: &Value| {
        let mut rows = report["judged"].clone();
        for row in rows.as_array_mut().unwrap() {
            row.as_object_mut().unwrap().remove("judge_mean_latency_ms");
        }
        rows
    };
    let again: Value = serde_json::from_slice(&semcache_stdout(&args)).unwrap();
    assert_eq!(timeless(&again), timeless(&report));

    let refused = semcache(&["eval", "pairs", TRAPS, "--judge-simulated", "1.5"]);
    assert!(!refused.status.success());
    let bad_conversations = semcache(&[
        "eval",
        "conversations",
        "tests/data/conversations.jsonl",
        "--judge-simulated",
        "0.9",
    ]);
    assert!(!bad_conversations.status.success());
}

#[test]
fn eval_intents_reports_wrong_answers_by_intent() {
    let guard = RemovedOnDrop(fresh_data_dir());
    let dir = &guard.0;
    std::fs::create_dir_all(dir).unwrap();
    let (train, test) = (dir.join("train.csv"), dir.join("test.csv"));
    std::fs::write(
        &train,
        "text,category\n\
         How do I reset my card PIN?,change_pin\n\
         Where is my new card?,card_arrival\n\
         \"My card, the new one, has not arrived yet\",card_arrival\n",
    )
    .unwrap();
    std::fs::write(
        &test,
        "text,category\n\
         How can I reset the PIN of my card?,change_pin\n\
         Where is the new card I ordered?,card_arrival\n\
         What is the exchange rate for euros today?,exchange_rate\n",
    )
    .unwrap();
    let output = semcache_stdout(&[
        "eval",
        "intents",
        train.to_str().unwrap(),
        test.to_str().unwrap(),
        "--json",
    ]);
    let report: Value = serde_json::from_slice(&output).unwrap();
    assert_eq!(report["stored"], 3);
    assert_eq!(report["asked"], 3);
    let at = |rows: &Value| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|row| (row["threshold"].as_f64().unwrap() - 0.82).abs() < 1e-4)
            .cloned()
            .unwrap()
    };
    let row = at(&report["verified"]);
    assert_eq!(
        row["hits"], 2,
        "the two paraphrases hit, the exchange rate does not: {row}"
    );
    assert_eq!(row["wrong"], 0, "{row}");

    let table = semcache(&["eval", "intents", train.to_str().unwrap(), test.to_str().unwrap()]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("| **0.82** |"), "{table}");
}

#[test]
fn calibrate_recommends_a_threshold_and_refuses_an_impossible_rate() {
    let output = semcache_stdout(&["calibrate", TRAPS, "--max-false-hit-rate", "0.05"]);
    let text = String::from_utf8(output).unwrap();
    assert!(text.contains("Recommended threshold: 0."), "{text}");
    assert!(text.contains("\"threshold\""), "{text}");

    // A "non-duplicate" asked word for word is served at every threshold.
    let guard = RemovedOnDrop(fresh_data_dir());
    let dir = &guard.0;
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.join("pairs.jsonl");
    std::fs::write(
        &file,
        "{\"a\": \"Hello there\", \"b\": \"Hello there\", \"duplicate\": false}\n",
    )
    .unwrap();
    let output = semcache(&["calibrate", file.to_str().unwrap(), "--max-false-hit-rate", "0.5"]);
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("no threshold up to 0.99"), "{err}");
}

#[test]
fn bad_data_gets_a_clear_error() {
    let missing = semcache(&["eval", "pairs", "no/such/file.jsonl"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no/such/file.jsonl"));
    let bad_grid = semcache(&["eval", "pairs", TRAPS, "--thresholds", "0.9:0.5:0.1"]);
    assert!(!bad_grid.status.success());
    assert!(String::from_utf8_lossy(&bad_grid.stderr).contains("empty range"));
}

/// One pair of each kind, written for this test (the labelled suite is a separate file).
const CONVERSATION_PAIRS: &str = r#"{"id": "t1", "kind": "reworded", "should_hit": true, "domain": "telecom", "stored": [{"role": "system", "content": "You are a mobile operator's support assistant."}, {"role": "user", "content": "My plan is Unlimited 5G."}, {"role": "assistant", "content": "Thanks, I can see your Unlimited 5G plan."}, {"role": "user", "content": "How do I turn on roaming?"}], "asked": [{"role": "system", "content": "You are a mobile operator's support assistant."}, {"role": "user", "content": "I'm on the Unlimited 5G plan."}, {"role": "assistant", "content": "Got it, Unlimited 5G."}, {"role": "user", "content": "How can I switch roaming on?"}]}
{"id": "t2", "kind": "irrelevant_history", "should_hit": true, "domain": "retail", "stored": [{"role": "system", "content": "You are a shop's support assistant."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "How do I reset my password?"}], "asked": [{"role": "system", "content": "You are a shop's support assistant."}, {"role": "user", "content": "How long does shipping to Spain take?"}, {"role": "assistant", "content": "Usually 3 to 5 working days."}, {"role": "user", "content": "How can I reset my password?"}]}
{"id": "t3", "kind": "extra_chatter", "should_hit": true, "domain": "banking", "stored": [{"role": "system", "content": "You are a bank's support assistant."}, {"role": "user", "content": "Where can I see my IBAN?"}, {"role": "assistant", "content": "In the app, under Account details."}, {"role": "user", "content": "Can I order a new debit card?"}], "asked": [{"role": "system", "content": "You are a bank's support assistant."}, {"role": "user", "content": "Hello there! Where can I see my IBAN please?"}, {"role": "assistant", "content": "Hi! In the app, under Account details."}, {"role": "user", "content": "Great, thanks a lot. Can I order a new debit card?"}]}
{"id": "t4", "kind": "context_swap", "should_hit": false, "domain": "subscriptions", "stored": [{"role": "user", "content": "I want to stop my streaming plan."}, {"role": "assistant", "content": "I can cancel your streaming plan now. Shall I?"}, {"role": "user", "content": "Yes, cancel it."}], "asked": [{"role": "user", "content": "I want to stop my gym membership."}, {"role": "assistant", "content": "I can cancel your gym membership now. Shall I?"}, {"role": "user", "content": "Yes, cancel it."}]}
{"id": "t5", "kind": "detail_swap", "should_hit": false, "domain": "travel", "stored": [{"role": "user", "content": "I booked a room for March 3."}, {"role": "assistant", "content": "I found your booking."}, {"role": "user", "content": "Is breakfast included?"}], "asked": [{"role": "user", "content": "I booked a room for March 4."}, {"role": "assistant", "content": "I found your booking."}, {"role": "user", "content": "Is breakfast included?"}]}
{"id": "t6", "kind": "intent_flip", "should_hit": false, "domain": "subscriptions", "stored": [{"role": "user", "content": "Please cancel my subscription."}, {"role": "assistant", "content": "Understood."}, {"role": "user", "content": "What happens to my data?"}], "asked": [{"role": "user", "content": "Don't cancel my subscription, just pause it."}, {"role": "assistant", "content": "Understood."}, {"role": "user", "content": "What happens to my data?"}]}
"#;

/// Pairs go through the chat protocol's own keying: today's exact context serves none of the
/// traps, and of the follow-ups only those whose earlier turns are the same word for word.
#[tokio::test]
async fn conversation_pairs_are_keyed_as_the_server_keys_chats() {
    let guard = RemovedOnDrop(fresh_data_dir());
    std::fs::create_dir_all(&guard.0).unwrap();
    let file = guard.0.join("conversations.jsonl");
    std::fs::write(&file, CONVERSATION_PAIRS).unwrap();
    let pairs = eval::read_conversations(&file).unwrap();
    assert_eq!(pairs.len(), 6);
    let grid = Grid::parse("0.70:0.98:0.02").unwrap().with(0.82);
    let report = eval::eval_conversations(&embedder(), &pairs, &grid)
        .await
        .unwrap();
    assert_eq!((report.should_hit, report.traps, report.context), (3, 3, "exact"));
    let at = |rows: &[eval::ConversationsRow]| {
        rows.iter()
            .find(|row| (row.threshold - 0.70).abs() < 1e-4)
            .cloned()
            .unwrap()
    };
    for row in [at(&report.plain), at(&report.verified)] {
        assert_eq!(row.traps_served, 0, "exact context serves no trap: {row:?}");
        // Only the pair whose history is word for word the same keeps its context.
        assert_eq!(row.served_by_kind["reworded"], 0, "{row:?}");
        assert_eq!(row.served_by_kind["irrelevant_history"], 0, "{row:?}");
    }

    let output = semcache_stdout(&["eval", "conversations", file.to_str().unwrap()]);
    let table = String::from_utf8(output).unwrap();
    assert!(
        table.contains("6 conversation pairs") && table.contains("context compared exact"),
        "{table}"
    );
    assert!(table.contains("| context_swap (trap) | 1 |"), "{table}");
    let semantic = semcache_stdout(&[
        "eval",
        "conversations",
        file.to_str().unwrap(),
        "--context",
        "semantic",
    ]);
    let table = String::from_utf8(semantic).unwrap();
    assert!(table.contains("context compared semantic"), "{table}");

    let bad = guard.0.join("bad.jsonl");
    std::fs::write(
        &bad,
        r#"{"id": "x", "kind": "context_swap", "should_hit": true, "stored": [{"role": "user", "content": "hi"}], "asked": [{"role": "user", "content": "hi"}]}"#,
    )
    .unwrap();
    let refused = semcache(&["eval", "conversations", bad.to_str().unwrap()]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("bad.jsonl:1") && message.contains("should_hit"),
        "{message}"
    );
}

const CONVERSATIONS: &str = "tests/data/conversations.jsonl";

/// The team's conversation suite: at least 150 labelled pairs over the six kinds, 3 to 40+
/// messages, several domains. Today's exact keying of the context serves no trap whose
/// earlier turns differ (a trap can only get through where the whole history is the same and
/// the last messages slip past the verifier), and misses most follow-ups: the baseline that
/// matching the context by meaning must beat.
#[tokio::test]
async fn the_conversation_suite_is_labelled_and_exact_context_is_its_baseline() {
    let pairs = eval::read_conversations(Path::new(CONVERSATIONS)).unwrap();
    assert!(pairs.len() >= 150, "{} pairs", pairs.len());
    for kind in eval::Kind::ALL {
        let of_kind = pairs.iter().filter(|pair| pair.kind == kind).count();
        assert!(of_kind >= 25, "{}: {of_kind} pairs", kind.name());
    }
    let lengths: Vec<usize> = pairs
        .iter()
        .flat_map(|pair| [pair.stored.len(), pair.asked.len()])
        .collect();
    assert!(
        lengths.iter().all(|&n| n >= 3),
        "every chat has at least 3 messages"
    );
    assert!(lengths.iter().filter(|&&n| n >= 40).count() >= 10, "long chats");
    let domains: std::collections::HashSet<&str> = pairs.iter().map(|pair| pair.domain.as_str()).collect();
    assert!(domains.len() >= 8, "{domains:?}");
    let mut ids = std::collections::HashSet::new();
    assert!(
        pairs.iter().all(|pair| ids.insert(pair.id.as_str())),
        "ids are unique"
    );

    let same_history = |pair: &eval::ConversationPair| {
        pair.stored[..pair.stored.len() - 1] == pair.asked[..pair.asked.len() - 1]
    };
    let traps_with_the_same_history = pairs
        .iter()
        .filter(|pair| !pair.should_hit && same_history(pair))
        .count();
    let grid = Grid::parse("0.70:0.98:0.02").unwrap().with(0.82);
    let report = eval::eval_conversations(&embedder(), &pairs, &grid)
        .await
        .unwrap();
    assert_eq!((report.pairs, report.context), (pairs.len(), "exact"));
    for row in report.plain.iter().chain(&report.verified) {
        assert!(
            row.traps_served <= traps_with_the_same_history,
            "exact context serves no trap whose history differs: {row:?}"
        );
    }
    let at_default = report
        .verified
        .iter()
        .find(|row| (row.threshold - 0.82).abs() < 1e-4)
        .unwrap();
    assert!(
        at_default.should_hit_rate < 0.5,
        "the baseline misses most follow-ups: {at_default:?}"
    );
}

/// The semantic conversation matcher on the team's suite, at the default threshold for
/// conversations: it serves at least half of the follow-ups (exact context serves none) and at
/// most 5% of the traps, no more than 2 of a kind, and no asked conversation would get another
/// pair's answer; at the single-message threshold it serves fewer. `eval conversations
/// --context semantic` says which context it compared. The bounds sit just below today's
/// figures (README) so that a change that loses follow-ups or lets traps through fails here.
#[tokio::test]
async fn the_semantic_matcher_serves_follow_ups_and_refuses_traps_on_the_suite() {
    let pairs = eval::read_conversations(Path::new(CONVERSATIONS)).unwrap();
    let default = semcache::config::DEFAULT_CONTEXT_THRESHOLD;
    let grid = Grid::parse("0.70:0.98:0.02").unwrap().with(default).with(0.82);
    let report = eval::eval_conversations_semantic(&embedder(), &pairs, &grid)
        .await
        .unwrap();
    assert_eq!(report.context, "semantic");
    let at = |threshold: f32| {
        report
            .verified
            .iter()
            .find(|row| (row.threshold - threshold).abs() < 1e-4)
            .unwrap()
    };
    let at_default = at(default);
    assert!(
        at_default.should_hit_rate >= 0.5,
        "follow-ups served: {at_default:?}"
    );
    assert!(at_default.trap_rate <= 0.05, "traps served: {at_default:?}");
    for kind in eval::Kind::ALL.iter().filter(|kind| !kind.should_hit()) {
        assert!(
            at_default.served_by_kind[kind.name()] <= 2,
            "{}: {at_default:?}",
            kind.name()
        );
    }
    assert_eq!(at_default.others_served, Some(0), "{at_default:?}");
    assert!(at(0.82).should_hit_served < at_default.should_hit_served);
    // By similarity alone, other conversations of the same bot come that close: the matcher
    // is what keeps their answers apart.
    let plain = report
        .plain
        .iter()
        .find(|row| (row.threshold - default).abs() < 1e-4)
        .unwrap();
    assert!(plain.others_served.unwrap() > 0, "{plain:?}");
}
