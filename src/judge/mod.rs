//! The judge: a model asked whether an uncertain semantic candidate's answer serves the new
//! request too, and what its verdicts teach about each entry ([`learn`]).
//!
//! A candidate from `--judge-floor` up that passed the verifier is served only once the judge
//! says yes, unless its entry has been approved often enough near that similarity to skip it
//! ([`learn::Verdicts::confident`]). Every fault (an error status, a timeout, a refusal, an
//! answer that is neither yes nor no) is a miss, never a hit.

pub mod learn;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use serde_json::{json, Value};

use crate::cache::Usage;
use crate::context::Context;
use crate::upstream::{self, Upstream};

pub use learn::{Confidence, Verdicts};

/// The system message of every judge call.
pub const SYSTEM: &str = "You decide whether a cached answer can be reused. Reply with one word: yes or no.";

/// The question every judge call asks, before the two requests.
pub const QUESTION: &str = "An assistant answered request A. Would exactly the same answer be correct and \
complete for request B? Wording does not matter. Anything that changes the answer does: another person, \
place, product, amount, date, time, negation, action or intent. Answer yes or no.";

/// What the judge is asked about: the two requests, verbatim, and the conversations they were
/// made in (semantic context mode).
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    /// The request the entry answered.
    pub stored: &'a str,
    pub stored_context: Option<&'a Context>,
    /// The new request.
    pub asked: &'a str,
    pub asked_context: Option<&'a Context>,
}

/// The user message of a judge call: [`QUESTION`], then each request quoted between `<<<` and
/// `>>>` lines, after its conversation when it has one (the user turns the context keeps, each
/// after the end of the assistant message it answers).
pub fn prompt(question: &Question<'_>) -> String {
    let mut text = String::from(QUESTION);
    for (name, request, context) in [
        ("A", question.stored, question.stored_context),
        ("B", question.asked, question.asked_context),
    ] {
        let turns = context.map_or(&[][..], |context| &context.turns[..]);
        if let Some((last, earlier)) = turns
            .split_last()
            .filter(|(last, earlier)| !earlier.is_empty() || !last.after.is_empty())
        {
            text.push_str(&format!("\n\nConversation before request {name}:\n<<<\n"));
            for turn in earlier {
                push_assistant(&mut text, &turn.after);
                text.push_str(&format!("user: {}\n", turn.text));
            }
            push_assistant(&mut text, &last.after);
            text.push_str(">>>");
        }
        text.push_str(&format!("\n\nRequest {name}:\n<<<\n{request}\n>>>"));
    }
    text
}

/// An assistant turn of a quoted conversation: what the context keeps of it, its end.
fn push_assistant(text: &mut String, end: &str) {
    if !end.is_empty() {
        text.push_str(&format!("assistant: {end}\n"));
    }
}

/// The request in a question: the last user message when there is a conversation (the entry's
/// `prompt` is then the request with what it refers back to), the prompt otherwise.
pub fn request_of<'a>(prompt: &'a str, context: Option<&'a Context>) -> &'a str {
    context
        .and_then(|context| context.turns.last())
        .map_or(prompt, |turn| turn.text.as_str())
}

/// The judge's answer read as a verdict: `yes` or `no`, case, white space and punctuation
/// around it ignored; anything else is none.
pub fn verdict_of(answer: &str) -> Option<bool> {
    let word = answer.trim_matches(|c: char| c.is_whitespace() || c.is_ascii_punctuation());
    if word.eq_ignore_ascii_case("yes") {
        Some(true)
    } else if word.eq_ignore_ascii_case("no") {
        Some(false)
    } else {
        None
    }
}

/// Why a judge call gave no verdict. Each is a miss.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("the judge did not answer within its timeout")]
    Timeout,
    #[error("the judge could not be reached: {0}")]
    Transport(String),
    #[error("the judge answered with status {0}")]
    Status(u16),
    #[error("the judge's answer was neither yes nor no")]
    Unreadable,
}

impl Failure {
    pub const ALL: [&'static str; 4] = ["timeout", "transport", "status", "unreadable"];

    pub fn as_str(&self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Transport(_) => "transport",
            Failure::Status(_) => "status",
            Failure::Unreadable => "unreadable",
        }
    }
}

/// A judge call's answer: the verdict (none when unreadable) and the tokens it cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub verdict: Option<bool>,
    pub usage: Usage,
}

/// Something that answers judge questions: a model behind an OpenAI-compatible API, or (in
/// the evals) labels read with a stated accuracy.
pub trait Ask: Send + Sync {
    /// `credential` is the client's `Authorization`, for a judge that shares the upstream and
    /// its key handling.
    fn ask<'a>(
        &'a self,
        question: &'a Question<'a>,
        credential: Option<&'a HeaderValue>,
    ) -> BoxFuture<'a, Result<Reply, Failure>>;
}

/// Where the judge is and how it is reached.
#[derive(Debug, Clone)]
pub struct Config {
    pub model: String,
    /// The judge's API, including the version path, without a trailing slash.
    pub base_url: String,
    /// The key sent to the judge; without one, the client's own key goes with the call, but
    /// only when the judge is the main upstream.
    pub api_key: Option<String>,
    pub forwards_client_key: bool,
    pub timeout: Duration,
    pub policy: Policy,
}

/// Which candidates the judge is asked about.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Semantic candidates from this similarity up are judged (below the threshold too).
    pub floor: f32,
    /// The expected share of wrong hits an entry may have for its judge to be skipped; 0: the
    /// judge is always asked.
    pub max_error: f32,
}

/// The judge behind an OpenAI-compatible chat completions API.
pub struct HttpJudge {
    upstream: Upstream,
    model: String,
    forwards_client_key: bool,
}

impl HttpJudge {
    pub fn new(config: &Config) -> Result<Self, upstream::Error> {
        let upstream = Upstream::new(upstream::Config {
            base_url: config.base_url.clone(),
            api_key: config.api_key.clone(),
            connect_timeout: config.timeout,
            timeout: config.timeout,
        })?;
        Ok(Self {
            upstream,
            model: config.model.clone(),
            forwards_client_key: config.forwards_client_key,
        })
    }

    /// The body of a judge call: temperature 0, one token.
    pub fn body(&self, question: &Question<'_>) -> Value {
        json!({
            "model": self.model,
            "temperature": 0,
            "max_tokens": 1,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": prompt(question)},
            ],
        })
    }
}

impl Ask for HttpJudge {
    fn ask<'a>(
        &'a self,
        question: &'a Question<'a>,
        credential: Option<&'a HeaderValue>,
    ) -> BoxFuture<'a, Result<Reply, Failure>> {
        Box::pin(async move {
            let mut headers = HeaderMap::new();
            if let Some(credential) = credential.filter(|_| self.forwards_client_key) {
                headers.insert(http::header::AUTHORIZATION, credential.clone());
            }
            let body = Bytes::from(self.body(question).to_string());
            let reply = self
                .upstream
                .post_json("/chat/completions", &headers, body)
                .await
                .map_err(failure_of)?;
            if !reply.status.is_success() {
                return Err(Failure::Status(reply.status.as_u16()));
            }
            let bytes = reply.bytes().await.map_err(failure_of)?;
            Ok(reply_of(&bytes))
        })
    }
}

fn failure_of(err: upstream::Error) -> Failure {
    match err {
        upstream::Error::Timeout => Failure::Timeout,
        upstream::Error::Transport(message) => Failure::Transport(message),
    }
}

/// A chat completion read as a judge's reply: the first choice's text and the usage.
fn reply_of(body: &[u8]) -> Reply {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Reply {
            verdict: None,
            usage: Usage::default(),
        };
    };
    let tokens = |name: &str| value["usage"][name].as_u64().unwrap_or(0);
    Reply {
        verdict: value["choices"][0]["message"]["content"]
            .as_str()
            .and_then(verdict_of),
        usage: Usage {
            prompt_tokens: tokens("prompt_tokens"),
            completion_tokens: tokens("completion_tokens"),
        },
    }
}

/// The judge as the cache uses it.
pub struct Judge {
    asker: Arc<dyn Ask>,
    pub model: String,
    pub policy: Policy,
    timeout: Duration,
}

/// What became of asking about one candidate.
#[derive(Debug, Clone, PartialEq)]
pub enum Ruling {
    /// This entry was judged on this very request before: its verdict, at no cost.
    Remembered(bool),
    /// The judge answered.
    Judged {
        approved: bool,
        usage: Usage,
        latency: Duration,
    },
    /// No verdict: a miss.
    Failed {
        failure: Failure,
        usage: Usage,
        latency: Duration,
    },
}

impl Ruling {
    pub fn approved(&self) -> bool {
        matches!(
            self,
            Ruling::Remembered(true) | Ruling::Judged { approved: true, .. }
        )
    }
}

impl Judge {
    pub fn new(asker: Arc<dyn Ask>, model: String, policy: Policy, timeout: Duration) -> Self {
        Self {
            asker,
            model,
            policy,
            timeout,
        }
    }

    /// The judge of `config`, over HTTP.
    pub fn over_http(config: &Config) -> Result<Self, upstream::Error> {
        Ok(Self::new(
            Arc::new(HttpJudge::new(config)?),
            config.model.clone(),
            config.policy,
            config.timeout,
        ))
    }

    /// Asks the judge, within its timeout.
    pub async fn ask(&self, question: &Question<'_>, credential: Option<&HeaderValue>) -> Ruling {
        let started = Instant::now();
        let answer = tokio::time::timeout(self.timeout, self.asker.ask(question, credential)).await;
        let latency = started.elapsed();
        match answer {
            Ok(Ok(Reply {
                verdict: Some(approved),
                usage,
            })) => Ruling::Judged {
                approved,
                usage,
                latency,
            },
            Ok(Ok(Reply { verdict: None, usage })) => Ruling::Failed {
                failure: Failure::Unreadable,
                usage,
                latency,
            },
            Ok(Err(failure)) => Ruling::Failed {
                failure,
                usage: Usage::default(),
                latency,
            },
            Err(_) => Ruling::Failed {
                failure: Failure::Timeout,
                usage: Usage::default(),
                latency,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::Turn;

    #[test]
    fn only_a_plain_yes_or_no_is_a_verdict() {
        for yes in ["yes", "Yes", " YES.", "\nyes!\n", "\"Yes\""] {
            assert_eq!(verdict_of(yes), Some(true), "{yes:?}");
        }
        for no in ["no", "No.", "  NO ", "no!"] {
            assert_eq!(verdict_of(no), Some(false), "{no:?}");
        }
        for neither in [
            "",
            "maybe",
            "yes, but",
            "Yes no",
            "y",
            "nope",
            "I cannot help with that",
        ] {
            assert_eq!(verdict_of(neither), None, "{neither:?}");
        }
    }

    #[test]
    fn the_prompt_quotes_both_requests_and_their_conversations_verbatim() {
        let plain = prompt(&Question {
            stored: "How do I reset my password?",
            stored_context: None,
            asked: "how can I reset my password",
            asked_context: None,
        });
        assert!(plain.starts_with(QUESTION));
        assert!(
            plain.contains("Request A:\n<<<\nHow do I reset my password?\n>>>"),
            "{plain}"
        );
        assert!(
            plain.ends_with("Request B:\n<<<\nhow can I reset my password\n>>>"),
            "{plain}"
        );
        assert!(!plain.contains("Conversation"));

        let turns = [
            Turn {
                user: true,
                text: "My Netflix plan renews on the 3rd.".into(),
            },
            Turn {
                user: false,
                text: "Would you like to change it?".into(),
            },
        ];
        let context = Context::of(&turns, "Cancel it");
        let in_context = prompt(&Question {
            stored: request_of("ignored", Some(&context)),
            stored_context: Some(&context),
            asked: "Cancel it",
            asked_context: None,
        });
        assert!(
            in_context.contains(
                "Conversation before request A:\n<<<\nuser: My Netflix plan renews on the 3rd.\n\
                 assistant: Would you like to change it?\n>>>\n\nRequest A:\n<<<\nCancel it\n>>>"
            ),
            "{in_context}"
        );
    }

    #[test]
    fn a_reply_is_read_from_the_first_choice_and_its_usage() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"Yes"}}],"usage":{"prompt_tokens":80,"completion_tokens":1}}"#;
        assert_eq!(
            reply_of(body),
            Reply {
                verdict: Some(true),
                usage: Usage {
                    prompt_tokens: 80,
                    completion_tokens: 1
                }
            }
        );
        let refusal = br#"{"choices":[{"message":{"role":"assistant","content":null,"refusal":"no"}}]}"#;
        assert_eq!(reply_of(refusal).verdict, None);
        assert_eq!(reply_of(b"not json").verdict, None);
    }
}
