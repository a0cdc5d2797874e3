//! Conversations compared by meaning: what a chat's last user message asks once its context is
//! read, and whether two chats' contexts let one's answer serve the other.
//!
//! A conversation is read as the request (the last user message without its chatter: greetings,
//! thanks, "Unrelated, but") and, when the request refers back ("cancel it", "how much is
//! it?", "so what do I pay then?") or is too short to stand alone, its antecedent: the nearest
//! earlier user turn that says something (chatter is skipped; a turn that closes a topic,
//! "perfect, that worked", ends the search unless the request points back explicitly). What
//! is compared by meaning is the antecedent and the request together, or the request alone.
//!
//! Earlier turns are also compared for what a conversation fixes, on every user turn: a number,
//! a day, a name or a negation set against another refuses ([`verify::contrasts`]), and so does
//! a decision taken on one side and not the other ("cancel" / "pause", "don't cancel").
//!
//! This is the matcher of the semantic context mode; `semcache eval conversations --context
//! semantic` measures it on labelled chats.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::verify::{self, Analysis, Reason, Rejection};

/// User text kept of a conversation's earlier turns for the contrast check, from the newest
/// back: about a model window's worth of words. Earlier text is not compared.
pub const MAX_FACTS_BYTES: usize = 4096;

/// One earlier message of a chat: who said it and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub user: bool,
    pub text: String,
}

/// A conversation as the matcher reads it. An entry stored with a context keeps this (bounded
/// by [`MAX_FACTS_BYTES`] of user text and [`PROMPT_BYTES`] of each assistant turn).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// The last user message without its chatter.
    pub request: String,
    /// The earlier user turn the request refers back to, if it does.
    pub antecedent: Option<String>,
    /// The user turns, the last message included, oldest first: the newest of them that fit
    /// in [`MAX_FACTS_BYTES`] (the newest alone, cut, when it does not).
    pub turns: Vec<UserTurn>,
}

/// A user turn, with the end of the assistant message it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserTurn {
    /// The last [`PROMPT_BYTES`] of the assistant message before it (empty when none).
    pub after: String,
    pub text: String,
}

/// What is kept of the assistant message a user turn answers: its end, where its question is.
pub const PROMPT_BYTES: usize = 160;

/// A context with the analyses its checks need, computed once.
#[derive(Debug, Clone)]
pub struct Analysed {
    pub context: Context,
    compared: Analysis,
    facts: Analysis,
    decisions: Decisions,
    turns: Vec<AnalysedTurn>,
}

/// One user turn as the turn-by-turn checks read it.
#[derive(Debug, Clone)]
struct AnalysedTurn {
    analysis: Analysis,
    decisions: Decisions,
    stems: BTreeSet<String>,
    after: BTreeSet<String>,
}

impl Context {
    /// Reads a conversation: its earlier turns, oldest first, and its last user message.
    pub fn of(turns: &[Turn], last: &str) -> Context {
        let request = Request::parse(last);
        let users: Vec<&str> = turns.iter().filter(|t| t.user).map(|t| t.text.as_str()).collect();
        let previous_assistant = turns.iter().rev().find(|t| !t.user).map(|t| t.text.as_str());
        let antecedent = match request.dependence {
            Dependence::None => None,
            // A short request after the assistant closed the topic ("Anything else?") is new.
            Dependence::Implicit if previous_assistant.is_some_and(closes_topic) => None,
            dependence => antecedent(&users, dependence),
        };
        Context {
            request: request.text,
            antecedent,
            turns: newest_turns(user_turns(turns, last), MAX_FACTS_BYTES),
        }
    }

    /// The text compared by meaning: the antecedent and the request, or the request alone.
    pub fn compared_text(&self) -> String {
        match &self.antecedent {
            Some(antecedent) => format!("{antecedent}\n{}", self.request),
            None => self.request.clone(),
        }
    }

    /// The user turns kept, joined.
    fn user_text(&self) -> String {
        let texts: Vec<&str> = self.turns.iter().map(|turn| turn.text.as_str()).collect();
        texts.join("\n")
    }

    pub fn analysed(self) -> Analysed {
        let user_text = self.user_text();
        Analysed {
            compared: Analysis::of(&self.compared_text()),
            facts: Analysis::of(&user_text),
            decisions: Decisions::of(&user_text),
            turns: self
                .turns
                .iter()
                .map(|turn| AnalysedTurn {
                    analysis: Analysis::of(&turn.text),
                    decisions: Decisions::of(&turn.text),
                    stems: stems(&turn.text),
                    after: stems(&turn.after),
                })
                .collect(),
            context: self,
        }
    }
}

/// Whether the answer stored for the conversation `stored` may be served for `asked`, by what
/// they say (their similarity is the caller's): the compared texts (each request with its
/// antecedent) pass the hit verifier, the user turns show no contrast, and no decision
/// differs.
pub fn check(stored: &Analysed, asked: &Analysed) -> Result<(), Rejection> {
    verify::check(&stored.compared, &asked.compared)?;
    verify::contrasts(&stored.facts, &asked.facts)?;
    stored.decisions.against(&asked.decisions)?;
    // A turn said on both sides with one thing changed ("I'm on the Unlimited plan" / "I'm on
    // the Core plan") must agree in its names and decisions too.
    for turn in &stored.turns {
        let aligned = asked
            .turns
            .iter()
            .map(|other| (alignment(turn, other), other))
            .filter(|(alignment, _)| *alignment > 0.0)
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((_, other)) = aligned {
            verify::aligned(&turn.analysis, &other.analysis)?;
            turn.decisions.same_as(&other.decisions)?;
        }
    }
    Ok(())
}

/// How surely two turns are the same turn said with something changed, 0 when they are not:
/// they share at least [`ALIGNED_WORDS`] content words, and differ in at most
/// [`CHANGED_WORDS`] on each side or share half of the longer's words; or they answer the same
/// question ("What device are you using?": "A Windows laptop." / "A Chromebook.").
fn alignment(a: &AnalysedTurn, b: &AnalysedTurn) -> f32 {
    let same_question = a.after.len() >= ALIGNED_WORDS && overlap(&a.after, &b.after) >= 0.8;
    let common = a.stems.intersection(&b.stems).count();
    let changed = a
        .stems
        .difference(&b.stems)
        .count()
        .max(b.stems.difference(&a.stems).count());
    let share = overlap(&a.stems, &b.stems);
    if common >= ALIGNED_WORDS && (changed <= CHANGED_WORDS || share >= 0.5) || same_question {
        share.max(0.01)
    } else {
        0.0
    }
}

const ALIGNED_WORDS: usize = 2;
const CHANGED_WORDS: usize = 2;

/// Content-word stems of a text: its words without function words, cut to five letters.
fn stems(text: &str) -> BTreeSet<String> {
    words(text)
        .into_iter()
        .filter(|w| !FUNCTION_WORDS.contains(&w.as_str()) && !CHATTER.contains(&w.as_str()))
        .map(|w| w.trim_end_matches('s').chars().take(5).collect())
        .collect()
}

/// Words in common over the larger set's size.
fn overlap(a: &BTreeSet<String>, b: &BTreeSet<String>) -> f32 {
    let larger = a.len().max(b.len());
    if larger == 0 {
        return 0.0;
    }
    a.intersection(b).count() as f32 / larger as f32
}

/// How a request leans on what came before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dependence {
    /// It stands alone.
    None,
    /// It is too short to stand alone ("How do I make a claim?").
    Implicit,
    /// It points back: a pronoun early on, "instead", "again".
    Explicit,
}

struct Request {
    text: String,
    dependence: Dependence,
}

impl Request {
    fn parse(message: &str) -> Request {
        let mut sentences: Vec<&str> = sentences(message);
        // A topic opened inside the message ("Nice, ordered. Oh and what's…", "I'll think about
        // it. Meanwhile, how…") starts the request: what came before it was about the last one.
        let opened = sentences.iter().rposition(|s| opens_topic(s));
        if let Some(at) = opened {
            sentences.drain(..at);
        }
        let mut shift = opened.is_some();
        // Leading remarks that close the last topic go too ("Perfect, that worked.").
        while sentences.len() > 1 && (is_chatter(sentences[0]) || is_closing(sentences[0])) {
            shift |= is_closing(sentences[0]);
            sentences.remove(0);
        }
        let kept: Vec<&str> = sentences.iter().copied().filter(|s| !is_chatter(s)).collect();
        let sentences = if kept.is_empty() { sentences } else { kept };
        // The questions are the request. A question that leans on what comes before it
        // ("Where is it?", "What should I do?") keeps its own sentence whole and the statement
        // just before it. (What else the message says is still checked, with the earlier
        // turns.)
        let sentences = match sentences.iter().position(|s| s.contains('?')) {
            Some(first) => {
                let (question, part) = (sentences[first], question_part(sentences[first]));
                let mut kept = if !leans(part) {
                    vec![part]
                } else if first > 0 && leans(question) {
                    vec![sentences[first - 1], question]
                } else {
                    vec![question]
                };
                kept.extend(sentences[first + 1..].iter().filter(|s| s.contains('?')));
                kept
            }
            None => sentences,
        };
        let text = without_leading_markers(&sentences.join(" ")).to_owned();
        let words = words(&text);
        let dependence = if points_back(&words) {
            Dependence::Explicit
        } else if !shift && content_words(&words) <= SHORT {
            Dependence::Implicit
        } else {
            Dependence::None
        };
        Request { text, dependence }
    }
}

/// A request of at most this many content words does not stand alone ("How do I make a
/// claim?").
const SHORT: usize = 2;

/// Whether a text leans on what came before it: it points back, or is too short to stand alone.
fn leans(text: &str) -> bool {
    let words = words(text);
    points_back(&words) || content_words(&words) <= SHORT
}

/// Whether a sentence opens another topic ("Unrelated, but…", "Also, what…", "Oh and…").
fn opens_topic(sentence: &str) -> bool {
    let lower = sentence.to_lowercase();
    let lower = lower.trim_start_matches(|c: char| !c.is_alphanumeric());
    let lower = [
        "yes", "yeah", "ok", "okay", "oh", "and", "but", "right", "actually", "well",
    ]
    .iter()
    .fold(lower, |rest, word| {
        rest.strip_prefix(word)
            .filter(|after| !after.starts_with(|c: char| c.is_alphanumeric()))
            .map_or(rest, |after| {
                after.trim_start_matches(|c: char| !c.is_alphanumeric())
            })
    });
    TOPIC_SHIFTS.iter().any(|marker| {
        lower
            .strip_prefix(marker)
            .is_some_and(|after| !after.starts_with(|c: char| c.is_alphanumeric()))
    })
}

/// The question of a sentence, without a lead-in set off by a dash or colon ("Sorry to be a
/// pain - how do I…").
fn question_part(sentence: &str) -> &str {
    for separator in [" - ", " – ", ": "] {
        if let Some(at) = sentence.rfind(separator) {
            let rest = sentence[at + separator.len()..].trim_start();
            let opens_question = |text: &str| {
                let first = words(text).into_iter().find(|w| !LEADING.contains(&w.as_str()));
                first.is_some_and(|w| QUESTION_WORDS.contains(&w.as_str()))
            };
            // A lead-in that is a question itself ("how does fuel work - do I…") stays.
            if opens_question(rest) && !opens_question(&sentence[..at]) {
                return rest;
            }
        }
    }
    sentence
}

/// The nearest earlier user turn that says something: chatter is skipped; a turn closing a
/// topic ends the search, unless the request points back explicitly.
fn antecedent(users: &[&str], dependence: Dependence) -> Option<String> {
    for turn in users.iter().rev() {
        let sentences = sentences(turn);
        if sentences.iter().all(|s| is_chatter(s)) {
            continue;
        }
        if sentences.iter().all(|s| is_chatter(s) || is_closing(s)) {
            match dependence {
                Dependence::Explicit => continue,
                _ => return None,
            }
        }
        return Some(Request::parse(turn).text);
    }
    None
}

/// Whether a pronoun or another word pointing back comes before the request has said much of
/// its own ("cancel it" points back; "I got a new number, how do I change it" does not).
fn points_back(words: &[String]) -> bool {
    let mut said = 0;
    for (i, word) in words.iter().enumerate() {
        let word = word.as_str();
        let before = if i > 0 { words[i - 1].as_str() } else { "" };
        let after = words.get(i + 1).map_or("", String::as_str);
        if matches!(word, "instead" | "again" | "else" | "either") {
            return true;
        }
        let expletive = match word {
            "it" => matches!(
                after,
                "possible" | "ok" | "okay" | "true" | "normal" | "worth" | "safe" | "likely"
            ),
            "there" => matches!(before, "is" | "are" | "was" | "were" | "be"),
            // "that" introduces a clause more often than it points back, unless it ends the
            // request or names a thing ("that one", "that slot").
            "that" => i > 0 && !after.is_empty() && !THAT_NOUNS.contains(&after),
            "one" | "ones" => !matches!(
                before,
                "that" | "this" | "the" | "which" | "other" | "new" | "old"
            ),
            _ => false,
        };
        if POINTING.contains(&word) && !expletive && said < 3 {
            return true;
        }
        if !FUNCTION_WORDS.contains(&word) {
            said += 1;
        }
    }
    false
}

/// What a conversation's user turns decide: each kind of action, taken or refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Decisions {
    taken: BTreeSet<usize>,
    refused: BTreeSet<usize>,
}

impl Decisions {
    fn of(text: &str) -> Decisions {
        let words = words(text);
        let mut decisions = Decisions::default();
        for (i, word) in words.iter().enumerate() {
            for (kind, verbs) in ACTIONS.iter().enumerate() {
                let Some(verb) = verbs.iter().find(|verb| is_form_of(word, verb)) else {
                    continue;
                };
                let kind = match not_decided(&words, i, verb) {
                    Reading::Decision => kind,
                    Reading::Kind(other) => other,
                    Reading::NoDecision => continue,
                };
                let refused = words[i.saturating_sub(4)..i]
                    .iter()
                    .any(|w| REFUSING.contains(&w.as_str()));
                if refused {
                    decisions.refused.insert(kind);
                } else {
                    decisions.taken.insert(kind);
                }
            }
        }
        decisions
    }

    /// Refuses unless both decide the same (for one turn said on both sides).
    fn same_as(&self, other: &Decisions) -> Result<(), Rejection> {
        if self == other {
            Ok(())
        } else {
            Err(self.rejection(other))
        }
    }

    fn rejection(&self, other: &Decisions) -> Rejection {
        let names = |kinds: &BTreeSet<usize>| kinds.iter().map(|&k| ACTIONS[k][0]).collect::<Vec<_>>();
        Rejection {
            reason: Reason::Intent,
            detail: format!(
                "decided {:?} (not {:?}) vs {:?} (not {:?})",
                names(&self.taken),
                names(&self.refused),
                names(&other.taken),
                names(&other.refused)
            ),
        }
    }

    /// Refuses when one side refuses what the other takes, or each takes an action the other
    /// does not.
    fn against(&self, other: &Decisions) -> Result<(), Rejection> {
        let reversed = !self.taken.is_disjoint(&other.refused) || !other.taken.is_disjoint(&self.refused);
        let apart = !self.taken.is_subset(&other.taken) && !other.taken.is_subset(&self.taken);
        if reversed || apart {
            return Err(self.rejection(other));
        }
        Ok(())
    }
}

/// Whether `word` is a form of the action `verb`: the verb, the verb with an ending of up to
/// three letters ("cancelled", "pausing"), or a long verb missing its last letter ("delet").
fn is_form_of(word: &str, verb: &str) -> bool {
    word == verb
        || word.starts_with(verb) && word.len() <= verb.len() + 3
        || verb.len() >= 6 && word.len() + 1 == verb.len() && verb.starts_with(word)
}

/// How an action word found at `words[at]` reads.
enum Reading {
    Decision,
    /// A decision of another kind ("take me off" the list is a drop, not an acceptance).
    Kind(usize),
    /// No decision: a state ("it's closed", "the class was cancelled"), a habit ("I keep
    /// running out"), a noun ("annual leave", "my first pay", "pocket money", "the card
    /// ending 4410"), or a count ("I've taken 9 days").
    NoDecision,
}

/// Reads an action word in its sentence: what happened to the user, or what they do anyway, is
/// not a decision they take.
fn not_decided(words: &[String], at: usize, verb: &str) -> Reading {
    let before = |n: usize| at.checked_sub(n).map_or("", |i| words[i].as_str());
    let after = |n: usize| words.get(at + n).map_or("", String::as_str);
    let within = |n: usize, wanted: &dyn Fn(&str) -> bool| (1..=n).any(|k| wanted(after(k)));
    let is_number = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_digit());
    let passive = matches!(
        before(1),
        "is" | "its" | "was" | "were" | "been" | "are" | "got" | "being"
    );
    let no_decision = passive
        || match verb {
            "keep" => after(1).ends_with("ing"),
            "leave" => matches!(
                before(1),
                "annual" | "sick" | "parental" | "maternity" | "paternity" | "unpaid" | "of"
            ),
            "pay" => matches!(
                before(1),
                "my" | "your" | "his" | "her" | "our" | "their" | "first" | "the" | "sick" | "holiday"
            ),
            "money" => !within(3, &|w| w == "back"),
            "send" => !within(3, &|w| w == "back"),
            "end" => within(2, &is_number),
            "take" => within(2, &is_number) || within(3, &|w| w == "off") && !within(2, &is_pronoun),
            _ => false,
        };
    if no_decision {
        Reading::NoDecision
    } else if verb == "take" && within(3, &|w| w == "off") {
        Reading::Kind(DROP)
    } else {
        Reading::Decision
    }
}

fn is_pronoun(word: &str) -> bool {
    matches!(
        word,
        "me" | "it" | "him" | "her" | "us" | "them" | "that" | "this"
    )
}

/// The assistant ended a topic: "Anything else?", "Glad that worked".
fn closes_topic(text: &str) -> bool {
    let lower = text.to_lowercase();
    ["anything else", "anything more", "else i can", "glad"]
        .iter()
        .any(|phrase| lower.contains(phrase))
}

/// Lower-case words, apostrophes dropped ("what's" is "whats").
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'' && c != '’')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase().replace(['\'', '’'], ""))
        .collect()
}

fn content_words(words: &[String]) -> usize {
    words
        .iter()
        .filter(|w| !FUNCTION_WORDS.contains(&w.as_str()))
        .count()
}

/// Sentences, each with its closing punctuation.
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if matches!(c, '.' | '!' | '?' | ';' | '\n') {
            let sentence = text[start..i + c.len_utf8()].trim();
            // "really??": a mark alone is no sentence.
            if sentence.chars().any(char::is_alphanumeric) {
                out.push(sentence);
            }
            start = i + c.len_utf8();
        }
    }
    let rest = text[start..].trim();
    if !rest.is_empty() || out.is_empty() {
        out.push(rest);
    }
    out
}

/// A sentence of greetings, thanks and pleasantries (no question): its words are all
/// pleasantries, or it opens with a greeting and is short, or it thanks, apologises or laughs
/// and says little else (no number, at most four other words).
fn is_chatter(sentence: &str) -> bool {
    let words = words(sentence);
    !sentence.contains('?')
        && (words.iter().all(|w| CHATTER.contains(&w.as_str()))
            || words.len() <= 4 && words.first().is_some_and(|w| GREETINGS.contains(&w.as_str()))
            || words.iter().any(|w| EMOTING.contains(&w.as_str()))
                && words
                    .iter()
                    .filter(|w| !CHATTER.contains(&w.as_str()) && !FUNCTION_WORDS.contains(&w.as_str()))
                    .count()
                    <= 4
                && !words.iter().any(|w| w.chars().any(|c| c.is_ascii_digit())))
}

/// A short remark that closes a topic ("Perfect, that worked.", "Restarting the app fixed
/// it."), deciding nothing.
fn is_closing(sentence: &str) -> bool {
    let words = words(sentence);
    !sentence.contains('?')
        && words.len() <= 10
        && words.iter().any(|w| CLOSING.contains(&w.as_str()))
        && Decisions::of(sentence) == Decisions::default()
}

/// The request without the discourse words it opens with ("Unrelated, but", "Yes -", "Oh and
/// also,"), up to their punctuation.
fn without_leading_markers(text: &str) -> &str {
    let mut cut = 0;
    let mut word_start = 0;
    for (i, c) in text.char_indices() {
        if c.is_alphanumeric() || c == '\'' || c == '’' {
            continue;
        }
        let word = text[word_start..i].to_lowercase();
        if !word.is_empty() && !LEADING.contains(&word.as_str()) {
            break;
        }
        if matches!(c, ',' | ':' | '-' | '–') {
            cut = i + c.len_utf8();
        }
        word_start = i + c.len_utf8();
    }
    let mut rest = text[cut..].trim();
    // "Unrelated, but how…": a conjunction left after the markers goes too.
    while let Some((first, after)) = rest.split_once(' ') {
        let conjunction = matches!(first.to_lowercase().as_str(), "but" | "and" | "so" | "also");
        if !conjunction || after.trim().is_empty() {
            break;
        }
        rest = after.trim_start();
    }
    if rest.is_empty() {
        text
    } else {
        rest
    }
}

/// The user turns of a conversation and its last message, each with the end of the assistant
/// message before it.
fn user_turns<'a>(turns: &'a [Turn], last: &'a str) -> Vec<UserTurn> {
    let mut out = Vec::new();
    let mut after = "";
    for turn in turns {
        if turn.user {
            out.push(UserTurn {
                after: newest_bytes(after, PROMPT_BYTES).to_owned(),
                text: turn.text.clone(),
            });
        } else {
            after = &turn.text;
        }
    }
    out.push(UserTurn {
        after: newest_bytes(after, PROMPT_BYTES).to_owned(),
        text: last.to_owned(),
    });
    out
}

/// The newest turns that fit in `max` bytes, oldest first; the newest alone, cut to its last
/// `max` bytes, when it does not fit.
fn newest_turns(turns: Vec<UserTurn>, max: usize) -> Vec<UserTurn> {
    let mut kept = Vec::new();
    let mut size = 0;
    for turn in turns.into_iter().rev() {
        let bytes = turn.after.len() + turn.text.len();
        if size + bytes > max {
            if kept.is_empty() {
                kept.push(UserTurn {
                    after: String::new(),
                    text: newest_bytes(&turn.text, max).to_owned(),
                });
            }
            break;
        }
        size += bytes;
        kept.push(turn);
    }
    kept.reverse();
    kept
}

/// The last `max` bytes of `text`, on a character boundary.
fn newest_bytes(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

const GREETINGS: &[&str] = &[
    "hi",
    "hello",
    "hey",
    "hiya",
    "morning",
    "evening",
    "afternoon",
    "hope",
    "thanks",
    "thank",
    "cheers",
    "haha",
    "lol",
];

const CHATTER: &[&str] = &[
    "hi",
    "hello",
    "hey",
    "hiya",
    "morning",
    "evening",
    "afternoon",
    "good",
    "thanks",
    "thank",
    "ta",
    "cheers",
    "appreciate",
    "appreciated",
    "ok",
    "okay",
    "great",
    "perfect",
    "cool",
    "nice",
    "lovely",
    "brilliant",
    "awesome",
    "excellent",
    "got",
    "sure",
    "yes",
    "yeah",
    "yep",
    "alright",
    "right",
    "fine",
    "wonderful",
    "amazing",
    "fab",
    "fantastic",
    "super",
    "sounds",
    "haha",
    "lol",
    "hah",
    "lmao",
    "sorry",
    "apologies",
    "please",
    "much",
    "so",
    "very",
    "really",
    "you",
    "it",
    "that",
    "thats",
    "i",
    "im",
    "me",
    "a",
    "the",
    "and",
    "oh",
    "well",
    "anyway",
    "btw",
    "all",
    "for",
    "help",
    "helpful",
    "there",
    "just",
    "again",
    "no",
    "worries",
    "problem",
    "bye",
    "goodbye",
    "day",
    "have",
    "hope",
    "youre",
    "your",
    "too",
    "ah",
    "um",
    "hmm",
    "kind",
    "of",
    "is",
    "this",
    "one",
    "bit",
    "quick",
    "question",
    "to",
    "be",
    "am",
    "was",
    "now",
    "with",
    "in",
    "on",
    "wow",
    "lots",
    "understood",
    "noted",
    "see",
    "ill",
];

/// Words of thanks, apology and laughter.
const EMOTING: &[&str] = &[
    "thanks",
    "thank",
    "thx",
    "ta",
    "cheers",
    "sorry",
    "apologies",
    "haha",
    "hahaha",
    "lol",
    "lmao",
    "hah",
];

/// Words a question opens with.
const QUESTION_WORDS: &[&str] = &[
    "how", "what", "whats", "what's", "when", "where", "why", "which", "who", "can", "could", "do", "does",
    "is", "are", "will", "would", "should", "may",
];

/// Words of a remark that closes a topic.
const CLOSING: &[&str] = &[
    "worked",
    "working",
    "works",
    "fixed",
    "sorted",
    "resolved",
    "done",
    "helped",
    "helps",
    "thanks",
    "thank",
    "perfect",
    "great",
    "brilliant",
    "ordered",
    "booked",
    "switched",
];

/// Phrases that open another topic.
const TOPIC_SHIFTS: &[&str] = &[
    "unrelated",
    "another question",
    "different question",
    "different thing",
    "separately",
    "meanwhile",
    "also",
    "oh and",
    "one more",
    "last question",
    "last thing",
    "by the way",
    "btw",
    "anyway",
    "quick question",
    "new question",
    "other question",
    "while i have you",
    "on another note",
    "changing the subject",
    "totally different",
    "something else",
];

/// Discourse words a request may open with.
const LEADING: &[&str] = &[
    "yes",
    "yeah",
    "yep",
    "ok",
    "okay",
    "so",
    "oh",
    "and",
    "but",
    "well",
    "right",
    "hmm",
    "um",
    "actually",
    "sure",
    "cool",
    "great",
    "nice",
    "perfect",
    "thanks",
    "thank",
    "you",
    "hi",
    "hello",
    "hey",
    "no",
    "nope",
    "alright",
    "just",
    "a",
    "quick",
    "one",
    "question",
    "thing",
    "more",
    "last",
    "another",
    "different",
    "totally",
    "unrelated",
    "separately",
    "meanwhile",
    "also",
    "anyway",
    "btw",
    "by",
    "the",
    "way",
    "general",
    "new",
    "other",
    "ah",
    "now",
];

/// Words that point back to something said before.
const POINTING: &[&str] = &[
    "it", "its", "that", "this", "these", "those", "them", "they", "their", "one", "ones", "same", "both",
    "such", "there", "him", "her", "he", "she",
];

/// Nouns after "that" that make it point back ("that one", "that slot").
const THAT_NOUNS: &[&str] = &["one", "slot", "order", "booking", "plan", "card", "item", "one?"];

/// Words that carry no content of their own.
const FUNCTION_WORDS: &[&str] = &[
    "a", "an", "the", "i", "im", "me", "my", "you", "your", "we", "our", "is", "are", "was", "were", "be",
    "to", "of", "in", "on", "at", "for", "do", "does", "did", "can", "could", "would", "will", "should",
    "how", "what", "whats", "when", "where", "why", "which", "who", "and", "or", "but", "if", "so", "with",
    "from", "by", "as", "any", "some", "have", "has", "had", "get", "there", "it", "its", "that", "this",
    "please", "ok", "okay", "yes", "no", "just", "much", "many", "about", "up", "out", "am", "ill", "id",
    "ive", "want", "need", "like", "know", "tell",
];

/// Kinds of action a conversation decides, each with the verbs that take it.
/// The kind of [`ACTIONS`] that drops or removes.
const DROP: usize = 5;

const ACTIONS: &[&[&str]] = &[
    &["cancel", "stop", "end", "terminate", "close", "quit"],
    &["pause", "freeze", "suspend", "hold"],
    &["keep", "stay", "retain", "continue"],
    &["renew", "extend"],
    &[
        "add",
        "include",
        "join",
        "enrol",
        "enroll",
        "sign",
        "subscribe",
        "book",
        "reserve",
    ],
    &[
        "drop",
        "remove",
        "leave",
        "unsubscribe",
        "skip",
        "decline",
        "release",
    ],
    &["upgrade"],
    &["downgrade"],
    &["refund", "money"],
    &["replace", "replacement", "swap", "exchange"],
    &["return", "send"],
    &["claim"],
    &["delete", "erase", "wipe"],
    &["confirm", "accept", "take"],
    &["transfer", "move", "switch", "change"],
    &["pay", "paid"],
];

/// Words that, just before an action, refuse it ("don't cancel", "rather than renew").
const REFUSING: &[&str] = &[
    "not", "dont", "no", "never", "wont", "doesnt", "didnt", "cant", "rather", "instead", "without",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn turns(texts: &[&str]) -> Vec<Turn> {
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| Turn {
                user: i % 2 == 0,
                text: (*text).to_owned(),
            })
            .collect()
    }

    #[test]
    fn a_request_that_points_back_takes_the_turn_it_points_to() {
        let context = Context::of(
            &turns(&[
                "When is my next bill due?",
                "On the 5th.",
                "I added the international calls bundle last month but hardly used it.",
                "Would you like to remove it?",
            ]),
            "Yes, please cancel it.",
        );
        assert_eq!(context.request, "please cancel it.");
        assert_eq!(
            context.antecedent.as_deref(),
            Some("I added the international calls bundle last month but hardly used it.")
        );
    }

    #[test]
    fn a_request_that_stands_alone_after_another_topic_takes_nothing() {
        let context = Context::of(
            &turns(&[
                "Can I share a single notebook with someone?",
                "Yes: open it and click Share.",
                "Perfect, that worked, she can see it now.",
                "Great to hear!",
            ]),
            "Unrelated, but how can I reset my password?",
        );
        assert_eq!(context.request, "how can I reset my password?");
        assert_eq!(context.antecedent, None);
        // A short request after the topic was closed is new too.
        let closed = Context::of(
            &turns(&[
                "Can I get an extra pillow?",
                "Of course.",
                "Perfect, thanks.",
                "Anything else?",
            ]),
            "Yes - what's the latest I can check out?",
        );
        assert_eq!(closed.antecedent, None);
        assert_eq!(closed.request, "what's the latest I can check out?");
    }

    #[test]
    fn chatter_is_skipped_on_the_way_back_to_what_the_request_points_to() {
        let context = Context::of(
            &turns(&[
                "Order HC-41877 was due yesterday and hasn't arrived.",
                "It is delayed at the depot.",
                "Ah ok, thanks so much.",
                "You're welcome!",
            ]),
            "Anyway, one more thing: can I cancel the order instead?",
        );
        assert_eq!(
            context.antecedent.as_deref(),
            Some("Order HC-41877 was due yesterday and hasn't arrived.")
        );
    }

    #[test]
    fn a_pronoun_after_the_request_said_its_own_piece_does_not_point_back() {
        let context = Context::of(
            &turns(&["The new app design is so much nicer btw", "Thank you!"]),
            "I got a new phone number, how do I change it on my account?",
        );
        assert_eq!(context.antecedent, None);
    }

    fn check_of(stored: (&[&str], &str), asked: (&[&str], &str)) -> Result<(), Rejection> {
        check(
            &Context::of(&turns(stored.0), stored.1).analysed(),
            &Context::of(&turns(asked.0), asked.1).analysed(),
        )
    }

    #[test]
    fn a_detail_or_a_decision_set_against_another_earlier_refuses() {
        let day = check_of(
            (
                &["I need to cancel an appointment on Tuesday at 9am.", "Sure."],
                "Will I be charged?",
            ),
            (
                &["I need to cancel an appointment on Wednesday at 9am.", "Sure."],
                "Will I be charged?",
            ),
        );
        assert_eq!(day.unwrap_err().reason, Reason::DateTime);
        let flipped = check_of(
            (
                &["I'd like to cancel my gym membership.", "Sure."],
                "What happens next?",
            ),
            (
                &["I'd like to pause my gym membership.", "Sure."],
                "What happens next?",
            ),
        );
        assert_eq!(flipped.unwrap_err().reason, Reason::Intent);
        let negated = check_of(
            (
                &["Just cancel it, I'll re-join later.", "Done."],
                "What happens next?",
            ),
            (
                &["Don't cancel it. Freeze it for two months.", "Done."],
                "What happens next?",
            ),
        );
        assert!(negated.is_err());
    }

    fn decided(text: &str) -> Vec<&'static str> {
        let decisions = Decisions::of(text);
        assert!(
            decisions.refused.is_empty(),
            "{text:?} refuses {:?}",
            decisions.refused
        );
        decisions.taken.iter().map(|&kind| ACTIONS[kind][0]).collect()
    }

    #[test]
    fn only_what_the_user_decides_is_a_decision() {
        assert_eq!(ACTIONS[DROP][0], "drop");
        // States, habits, nouns and counts decide nothing.
        for text in [
            "I've also got Outlook on my laptop, but it's closed.",
            "My kids keep fighting over the telly.",
            "I've taken 9 days of annual leave so far.",
            "When will I get my first pay?",
            "A monthly one, $200, on the 1st. Pocket money, really.",
            "It's the card ending 4410.",
            "I want to take time off in March.",
        ] {
            assert_eq!(decided(text), Vec::<&str>::new(), "{text:?}");
        }
        // What happened to the user is not their decision: the class was cancelled for them.
        assert_eq!(decided("I cancelled my spot in the 7am class."), ["cancel"]);
        assert_eq!(decided("The 7am class was cancelled."), Vec::<&str>::new());
        assert_eq!(decided("Please take me off the waitlist."), ["drop"]);
        assert_eq!(decided("I'd like to send it back."), ["return"]);
        assert_eq!(decided("Can I get my money back?"), ["refund"]);
        assert_eq!(decided("how do i delet my account"), ["delete"]);
        assert_eq!(decided("That's fine, I'll pay it."), ["pay"]);
    }

    #[test]
    fn what_only_one_side_mentions_does_not_refuse() {
        assert_eq!(
            check_of(
                (
                    &["Where can I download my March statement?", "Under Statements."],
                    "How do I update my phone number?"
                ),
                (&["hi"], "How do I update my phone number?"),
            ),
            Ok(())
        );
    }

    #[test]
    fn long_histories_keep_their_newest_user_text() {
        let long = "word ".repeat(2000);
        let context = Context::of(&turns(&[&long, "ok", "the newest"]), "How much is it?");
        let texts: Vec<&str> = context.turns.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(texts, ["the newest", "How much is it?"]);
        assert_eq!(context.turns[0].after, "ok");
        let huge = "word ".repeat(2000);
        let alone = Context::of(&[], &huge);
        assert_eq!(alone.turns.len(), 1);
        assert!(alone.turns[0].text.len() <= MAX_FACTS_BYTES);
    }
}
