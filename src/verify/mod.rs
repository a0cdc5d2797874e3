//! Hit verification: a candidate found by meaning is refused when the two prompts differ in a
//! way that changes the answer, which embeddings barely see ("open" / "closed" scores 0.95).
//!
//! The verifier compares the words only one prompt has, and refuses on a contrast: each prompt
//! takes a side of the same kind. That is a negation one prompt has about something both
//! say ("is available" / "is not available", "safe" / "unsafe"), an antonym pair, a number in
//! place of another, a day or time against another, a name against another, or a quantifier
//! against another ("all" / "first"). Detail only one prompt adds ("in 2016", "some",
//! "today") is left to the similarity threshold: on Quora's duplicates, refusing it cost more
//! right answers than it saved wrong ones. A few words count even alone: days ("on Monday"),
//! "next"/"last" before a time, "every other", and a number before a superlative ("the five
//! tallest").
//!
//! `lexicon` holds the word lists, `tokens` splits a prompt and reads what the rules need of
//! it, once per prompt ([`Analysis`]), and `rules` compares two analyses.

use std::collections::BTreeSet;

mod lexicon;
mod rules;
mod tokens;

use tokens::Token;

/// Why a candidate was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Negation,
    Number,
    DateTime,
    Entity,
    Scope,
    /// Two conversations decide differently: an action taken on one side is refused or not
    /// taken on the other ("cancel it" / "don't cancel, pause it").
    Intent,
    /// The prompts differ past the end of the model's window, where the embedding cannot see.
    Unseen,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::Negation,
        Reason::Number,
        Reason::DateTime,
        Reason::Entity,
        Reason::Scope,
        Reason::Intent,
        Reason::Unseen,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Negation => "negation",
            Reason::Number => "number",
            Reason::DateTime => "date_time",
            Reason::Entity => "entity",
            Reason::Scope => "scope",
            Reason::Intent => "intent",
            Reason::Unseen => "beyond_model_window",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    /// The words that made the difference, for logs and the admin API.
    pub detail: String,
}

/// What the rules need of one prompt, computed once: a request's prompt is analysed once for all
/// its candidates, and an entry's analysis is kept with the entry.
#[derive(Debug, Clone)]
pub struct Analysis {
    tokens: Vec<Token>,
    numbers: BTreeSet<String>,
    relative_times: BTreeSet<String>,
    parts_of_day: BTreeSet<&'static str>,
}

impl Analysis {
    pub fn of(text: &str) -> Analysis {
        let tokens = tokens::tokens(text);
        Analysis {
            numbers: tokens::numbers(&tokens),
            relative_times: tokens::relative_times(&tokens),
            parts_of_day: tokens::parts_of_day(&tokens),
            tokens,
        }
    }
}

/// Checks whether the answer stored for the prompt analysed as `stored` may be served for the
/// one analysed as `asked`.
pub fn check(stored: &Analysis, asked: &Analysis) -> Result<(), Rejection> {
    rules::check(stored, asked, rules::Strictness::Requests)
}

/// Checks two conversations' user turns (as analysed) for a contrast only: each names its
/// own value of the same kind (a number, a day, a time), or one negates or reverses what the
/// other says. What only one side mentions does not refuse, nor do names (over a whole chat
/// they mostly belong to other topics) or quantifiers.
pub fn contrasts(stored: &Analysis, asked: &Analysis) -> Result<(), Rejection> {
    rules::check(stored, asked, rules::Strictness::Contrasts)
}

/// Checks one turn said on both sides of two conversations (as analysed) for a contrast, as
/// [`contrasts`] does, names included ("I'm on the Unlimited plan" / "on the Core plan").
pub fn aligned(stored: &Analysis, asked: &Analysis) -> Result<(), Rejection> {
    rules::check(stored, asked, rules::Strictness::Aligned)
}

/// Checks whether the answer stored for `stored` may be served for `asked`, analysing both.
pub fn verify(stored: &str, asked: &str) -> Result<(), Rejection> {
    check(&Analysis::of(stored), &Analysis::of(asked))
}

/// Refuses when two prompts differ where the model does not read them, past the end of its
/// window (`*_seen`: the bytes it reads, `None` for all): there the vectors are blind. Both
/// prompts must end with the longer of their unread tails, so that every difference lies in
/// text the model has read.
pub fn unseen(
    query: &str,
    query_seen: Option<usize>,
    stored: &str,
    stored_seen: Option<usize>,
) -> Result<(), Rejection> {
    if query_seen.is_none() && stored_seen.is_none() {
        return Ok(());
    }
    let unread = |text: &str, seen: Option<usize>| seen.map_or(0, |seen| text.len().saturating_sub(seen));
    let (query_unread, stored_unread) = (unread(query, query_seen), unread(stored, stored_seen));
    let tail = if query_unread >= stored_unread {
        &query[query.len() - query_unread..]
    } else {
        &stored[stored.len() - stored_unread..]
    };
    if query.ends_with(tail) && stored.ends_with(tail) {
        Ok(())
    } else {
        Err(Rejection {
            reason: Reason::Unseen,
            detail: format!(
                "the prompts differ past the model's window ({query_unread} and {stored_unread} bytes unread)"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The labelled trap suite in `tests/data/traps.jsonl`: near-identical prompts that need
    /// different answers, by category, and true paraphrases that must still be served.
    #[test]
    fn trap_suite() {
        let mut outcomes: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut failures = Vec::new();
        for line in include_str!("../../tests/data/traps.jsonl")
            .lines()
            .filter(|l| !l.trim().is_empty())
        {
            let pair: serde_json::Value = serde_json::from_str(line).unwrap();
            let (a, b) = (pair["a"].as_str().unwrap(), pair["b"].as_str().unwrap());
            let same_answer = pair["same_answer"].as_bool().unwrap();
            let served = verify(a, b).is_ok() && verify(b, a).is_ok();
            let right = served == same_answer;
            let counts = outcomes
                .entry(pair["category"].as_str().unwrap().to_owned())
                .or_default();
            counts.0 += usize::from(right);
            counts.1 += 1;
            if !right {
                failures.push(format!("{a:?} / {b:?}: {:?}", verify(a, b).err()));
            }
        }
        for (category, (right, total)) in &outcomes {
            eprintln!("{category}: {right}/{total}");
        }
        eprintln!("wrong:\n{}", failures.join("\n"));
        let (right, total) = outcomes
            .values()
            .fold((0, 0), |acc, (r, t)| (acc.0 + r, acc.1 + t));
        assert!(total >= 150, "the suite has {total} pairs");
        for (category, (right, total)) in &outcomes {
            assert!(right * 100 >= total * 90, "{category}: {right}/{total}");
        }
        assert!(right * 100 >= total * 97, "{right}/{total} right");
    }

    fn check(a: &str, b: &str, expected: Option<Reason>) {
        let got = verify(a, b).err().map(|r| r.reason);
        assert_eq!(got, expected, "{a:?} / {b:?}: {:?}", verify(a, b));
    }

    #[test]
    fn the_traps_from_the_brief_are_refused() {
        check(
            "Is the pharmacy open on Christmas Day?",
            "Is the pharmacy closed on Christmas Day?",
            Some(Reason::Negation),
        );
        check(
            "How do I enable dark mode?",
            "How do I disable dark mode?",
            Some(Reason::Negation),
        );
        check(
            "What is the status of order 1182?",
            "What is the status of order 1183?",
            Some(Reason::Number),
        );
    }

    #[test]
    fn a_time_said_two_ways_is_one_time() {
        check(
            "I left my card at a restaurant last night.",
            "I left my card at a restaurant yesterday evening.",
            None,
        );
        check(
            "What would annual billing cost us?",
            "What would yearly billing cost us?",
            None,
        );
        check(
            "We pay monthly, what does switching cost?",
            "We pay month to month, what does switching cost?",
            None,
        );
        check(
            "We pay month to month, what does switching cost?",
            "We pay yearly, what does switching cost?",
            Some(Reason::DateTime),
        );
        check(
            "Can I return the speaker if it's still sealed?",
            "Can I return the speaker if it's opened?",
            Some(Reason::Negation),
        );
    }

    #[test]
    fn paraphrases_pass() {
        check(
            "What time does the store close?",
            "When does the shop close?",
            None,
        );
        check(
            "How do I reset my password?",
            "How can I reset my password?",
            None,
        );
        check(
            "Why isn't my printer working?",
            "Why is my printer not working?",
            None,
        );
        check("What's 2+2?", "What is 2 + 2?", None);
        // "Oh no" is dismay, not a negation; "the one" points at a thing, it counts nothing.
        check(
            "Oh no, water is coming through my ceiling, what do I do?",
            "Water is coming through my ceiling, what do I do?",
            None,
        );
        check(
            "Can you freeze the one ending 4410?",
            "Can you freeze the card ending 4410?",
            None,
        );
        check(
            "Can you freeze one card ending 4410?",
            "Can you freeze two cards ending 4410?",
            Some(Reason::Number),
        );
    }

    /// Duplicates from Quora that earlier rules refused: idioms, added detail, other spellings.
    #[test]
    fn detail_and_spelling_pass() {
        for (a, b) in [
            (
                "How do I know when a girl is interested in me?",
                "How can I know whether or not a girl is interested in me?",
            ),
            (
                "Is herpes classified as a retrovirus? Why or why not?",
                "Is herpes classified as a retrovirus?",
            ),
            (
                "How can I increase the traffic on my website without investing?",
                "How do I increase traffic on my site?",
            ),
            (
                "What are the best one-minute life hacks?",
                "What are the best 1 minute life hacks?",
            ),
            (
                "Which phone would be the best for ₹15,000?",
                "Which is the best phone to buy within Rs.15000?",
            ),
            (
                "Why did the US attack Iraq?",
                "Why did the USA attack & destroy Iraq?",
            ),
            (
                "Which US universities should I apply for MS in Computer Science?",
                "Which US universities should I apply to for MS in CS?",
            ),
            (
                "What are the best male-female duet songs of all time?",
                "What are some of the best male-female duet songs?",
            ),
            ("Why are all flamingos pink?", "Why are flamingos pink?"),
            (
                "Who is behind the coup attempt in Turkey (July 2016)?",
                "Who is most likely to be behind the Turkey coup?",
            ),
            (
                "Why do people ask questions on Quora that Google answers?",
                "Why do Quorans ask questions that Googling answers?",
            ),
        ] {
            check(a, b, None);
            check(b, a, None);
        }
    }

    #[test]
    fn numbers_in_other_forms_still_count() {
        check(
            "Is it safe to drive after one beer?",
            "Is it safe to drive after five beers?",
            Some(Reason::Number),
        );
        check(
            "Name the tallest building.",
            "Name the five tallest buildings.",
            Some(Reason::Number),
        );
        check(
            "What does a single asterisk mean?",
            "What does a double asterisk mean?",
            Some(Reason::Number),
        );
        check("Is a phone for 15k good?", "Is a phone for 15,000 good?", None);
    }

    /// A doubled last character before "ed" or "ing" used to be cut one byte short, which
    /// panicked on text in other scripts ("ကကed": the last two bytes of "က" are equal).
    #[test]
    fn prompts_in_any_script_are_compared_without_a_panic() {
        assert!(verify("ကကed", "hello").is_ok());
        assert_eq!(tokens::stem("ကကed"), "က");
        assert_eq!(tokens::stem("banned"), "ban");
        check("Ist das Café geöffnet?", "Ist das Café geöffnet?", None);
    }

    proptest::proptest! {
        /// Any two prompts are compared without a panic, both ways, and a prompt never
        /// contrasts with itself.
        #[test]
        fn any_text_is_compared_without_a_panic(a in "\\PC{0,40}", b in "\\PC{0,40}") {
            let _ = verify(&a, &b);
            let _ = verify(&b, &a);
            proptest::prop_assert!(verify(&a, &a).is_ok(), "{:?}", verify(&a, &a));
        }
    }
}
