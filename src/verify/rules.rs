//! The rules: each compares two analysed prompts and refuses on a contrast of one kind.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use super::lexicon::*;
use super::tokens::{is_numeric, stem, Token};
use super::{Analysis, Reason, Rejection};

/// Whether each prompt names a number the other does not ("order 1182" / "order 1183"). A
/// number only one prompt adds is mostly detail ("lose weight in 3 months"). "one" is only a
/// number when the other prompt has a 1 in its place ("one-minute" / "1 minute").
fn numbers_differ(a: &Analysis, b: &Analysis, alone: bool) -> bool {
    // "one" as a pronoun ("the one ending 4410", "which one", "a new one") counts nothing.
    let has_one = |tokens: &[Token]| {
        tokens.iter().enumerate().any(|(i, t)| {
            t.word == "one"
                && !i.checked_sub(1).is_some_and(|before| {
                    matches!(
                        tokens[before].word.as_str(),
                        "the"
                            | "this"
                            | "that"
                            | "which"
                            | "new"
                            | "other"
                            | "another"
                            | "right"
                            | "wrong"
                            | "same"
                    )
                })
        })
    };
    let (one_a, one_b) = (has_one(&a.tokens), has_one(&b.tokens));
    // "one beer" / "five beers": "one" stands against another number.
    let with_one = |numbers: &BTreeSet<String>, one: bool, other: &BTreeSet<String>| {
        let mut numbers = numbers.clone();
        if one && !other.is_empty() && !other.contains("1") {
            numbers.insert("1".to_owned());
        }
        numbers
    };
    let numbers_a = with_one(&a.numbers, one_a, &b.numbers);
    let numbers_b = with_one(&b.numbers, one_b, &a.numbers);
    let extra = |x: &BTreeSet<String>, y: &BTreeSet<String>, y_one: bool| {
        x.difference(y).filter(|n| !(n.as_str() == "1" && y_one)).count()
    };
    let (extra_a, extra_b) = (
        extra(&numbers_a, &numbers_b, one_b),
        extra(&numbers_b, &numbers_a, one_a),
    );
    (extra_a > 0 && (extra_b > 0 || alone && counts_ranked(&a.tokens)))
        || (alone && extra_b > 0 && counts_ranked(&b.tokens))
}

/// A number that counts a superlative ("the five tallest"): without it, the question
/// asks for one.
fn counts_ranked(tokens: &[Token]) -> bool {
    tokens.windows(2).any(|w| {
        let number = |t: &Token| is_numeric(&t.word) || NUMBER_WORDS.iter().any(|(name, _)| *name == t.word);
        number(&w[0]) && w[1].word.len() > 4 && w[1].word.ends_with("est")
    })
}

/// Negations, counting a negating prefix when the other prompt has the bare word
/// ("unsafe" against "safe").
fn polarity(tokens: &[Token], other: &[Token]) -> usize {
    let word = |i: usize| tokens.get(i).map_or("", |t: &Token| t.word.as_str());
    tokens
        .iter()
        .enumerate()
        .filter(|&(i, t)| {
            let repeated = word(i.wrapping_sub(1)) == t.word;
            let negation = NEGATIONS.contains(&t.word.as_str())
                && !repeated
                && !negation_idiom(
                    &t.word,
                    word(i.wrapping_sub(1)),
                    word(i.wrapping_sub(2)),
                    tokens.get(i + 1),
                );
            let prefixed = negated_by_prefix(t, other);
            negation || prefixed
        })
        .count()
}

/// Whether a negation in `tokens` is about something `other` also says: a prefixed word whose
/// root `other` has, or a negation whose next content word `other` has ("is not available" /
/// "is available"). A negation about something only one prompt mentions is mostly detail.
fn negates_shared(tokens: &[Token], other: &[Token]) -> bool {
    tokens.iter().enumerate().any(|(i, t)| {
        let prefixed = negated_by_prefix(t, other);
        let negated = NEGATIONS.contains(&t.word.as_str())
            && tokens[i + 1..]
                .iter()
                .filter(|next| !FUNCTION_WORDS.contains(&next.word.as_str()))
                .take(1)
                .any(|next| other.iter().any(|o| o.same_stem(next)));
        prefixed || negated
    })
}

/// Negation words that negate nothing: "whether or not", "why or why not", "not only",
/// "not just", "no matter", "no doubt", "no. 1".
fn negation_idiom(word: &str, before: &str, before2: &str, next: Option<&Token>) -> bool {
    let next_word = next.map_or("", |t| t.word.as_str());
    match word {
        "not" => {
            matches!(before, "or" | "if")
                || (before == "why" && before2 == "or")
                || matches!(next_word, "only" | "just")
        }
        // "no matter", "no doubt", "no 2", "oh no", "no, wait".
        "no" => {
            matches!(next_word, "matter" | "doubt")
                || next.is_some_and(|t| is_numeric(&t.word))
                || matches!(before, "oh" | "uh" | "ah")
        }
        _ => false,
    }
}

fn is_name(token: &Token) -> bool {
    token.name_like || KNOWN_NAMES.contains(&token.word.as_str())
}

/// Words present in `a` but not in `b` (by stem), in order.
fn only_in<'a>(a: &'a [Token], b: &[Token]) -> Vec<&'a Token> {
    a.iter().filter(|t| !b.iter().any(|u| u.same_stem(t))).collect()
}

fn antonyms(a: &Token, b: &Token) -> bool {
    // Prefixed opposites ("lock" / "unlock") are counted by `polarity`, which also lets
    // "aren't safe" meet "unsafe".
    antonym_stems()
        .iter()
        .any(|(x, y)| (a.stem == *x && b.stem == *y) || (a.stem == *y && b.stem == *x))
}

/// The antonym pairs by stem, stemmed once.
fn antonym_stems() -> &'static [(String, String)] {
    static STEMS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    STEMS.get_or_init(|| ANTONYMS.iter().map(|(x, y)| (stem(x), stem(y))).collect())
}

/// A word made negative by a prefix whose root the other prompt has ("unsafe" / "safe"),
/// unless the other prompt has the prefixed word too.
fn negated_by_prefix(t: &Token, other: &[Token]) -> bool {
    !other.iter().any(|o| o.word == t.word)
        && NEGATING_PREFIXES.iter().any(|prefix| {
            t.word.strip_prefix(prefix).is_some_and(|rest| {
                rest.len() >= 3 && {
                    let root = stem(rest);
                    other.iter().any(|o| o.word == rest || o.stem == root)
                }
            })
        })
}

fn words_in<'a>(tokens: &[&'a Token], list: &[&str]) -> BTreeSet<&'a str> {
    tokens
        .iter()
        .filter(|t| list.contains(&t.word.as_str()))
        .map(|t| t.word.as_str())
        .collect()
}

/// Whether each prompt names something the other does not. A name matches another when one
/// is a form of the other ("Google" / "Googling", "Quora" / "Quorans"), an alias ("US" /
/// "USA") or the initials of the other's names ("CS" / "Computer Science").
fn names_differ(a: &[String], b: &[String]) -> bool {
    let unmatched = |x: &[String], y: &[String]| -> usize {
        x.iter()
            .filter(|name| !y.iter().any(|other| same_name(name, other)) && !is_initials(name, y))
            .count()
    };
    unmatched(a, b) > 0 && unmatched(b, a) > 0
}

fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.replace('.', ""), b.replace('.', ""));
    let (a, b) = (a.as_str(), b.as_str());
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let forms = a == b
        || short.len() >= 3 && long.starts_with(short)
        || short.chars().count() >= 5
            && long.starts_with(&short[..short.len() - short.chars().last().map_or(0, char::len_utf8)]);
    forms
        || NAME_ALIASES
            .iter()
            .any(|group| group.contains(&a) && group.contains(&b))
}

fn is_initials(name: &str, others: &[String]) -> bool {
    name.len() >= 2
        && name.len() == others.len()
        && name.chars().zip(others).all(|(c, other)| other.starts_with(c))
}

/// Quantifiers present; "other" counts only in "every other", and
/// "of all time", "at all", "after all" are no quantifiers.
fn scope_words<'a>(tokens: &[&'a Token], all: &'a [Token]) -> BTreeSet<&'a str> {
    let idiom = |token: &Token| {
        let Some(i) = all.iter().position(|t| std::ptr::eq(t, token)) else {
            return false;
        };
        let before = i.checked_sub(1).map_or("", |j| all[j].word.as_str());
        let after = all.get(i + 1).map_or("", |t| t.word.as_str());
        match token.word.as_str() {
            "all" => {
                matches!(before, "at" | "after" | "above")
                    || matches!(after, "time" | "times" | "over" | "along")
                    || (after == "the" && all.get(i + 2).is_some_and(|t| t.word == "time"))
            }
            "most" => before == "the" && after != "recent",
            "first" | "last" => matches!(after, "time" | "name" | "names"),
            "one" => {
                matches!(
                    before,
                    "no" | "any"
                        | "some"
                        | "every"
                        | "each"
                        | "the"
                        | "which"
                        | "that"
                        | "this"
                        | "can"
                        | "should"
                        | "does"
                        | "do"
                        | "would"
                        | "could"
                        | "might"
                        | "must"
                        | "will"
                        | "how"
                        | "if"
                        | "as"
                ) || matches!(after, "of" | "another")
            }
            _ => false,
        }
    };
    let mut found: BTreeSet<&str> = tokens
        .iter()
        .filter(|t| SCOPE_WORDS.contains(&t.word.as_str()) && !idiom(t))
        .map(|t| t.word.as_str())
        .collect();
    for (i, token) in all.iter().enumerate() {
        let scoped = i > 0 && all[i - 1].word == "every";
        if token.word == "other" && scoped && tokens.iter().any(|t| std::ptr::eq(*t, token)) {
            found.insert("other");
        }
    }
    found
}

/// How much a difference must show to refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Strictness {
    /// Two requests: a few words refuse even when only one prompt has them (a day, "next
    /// week", "the five tallest").
    Requests,
    /// Two conversations' user turns: only a contrast refuses, each side taking its own
    /// value of the same kind. Over a whole chat, detail one side alone mentions is mostly
    /// another topic, and so are names.
    Contrasts,
    /// One turn said on both sides of two conversations: a contrast refuses, names too.
    Aligned,
}

/// Checks whether the answer stored for the prompt analysed as `stored` may be served for the
/// one analysed as `asked`.
pub(super) fn check(stored: &Analysis, asked: &Analysis, strictness: Strictness) -> Result<(), Rejection> {
    let alone = strictness == Strictness::Requests;
    let (a, b) = (&stored.tokens[..], &asked.tokens[..]);
    let reject = |reason, detail: String| Err(Rejection { reason, detail });

    if polarity(a, b) % 2 != polarity(b, a) % 2 && (negates_shared(a, b) || negates_shared(b, a)) {
        return reject(Reason::Negation, "one prompt is negated".to_owned());
    }

    if numbers_differ(stored, asked, alone) {
        return reject(
            Reason::Number,
            format!("{:?} vs {:?}", stored.numbers, asked.numbers),
        );
    }

    let only_a = only_in(a, b);
    let only_b = only_in(b, a);
    for x in &only_a {
        if let Some(y) = only_b.iter().find(|y| antonyms(x, y)) {
            return reject(Reason::Negation, format!("{:?} vs {:?}", x.word, y.word));
        }
    }

    let (dates_a, dates_b) = (
        words_in(&only_a, DATE_TIME_WORDS),
        words_in(&only_b, DATE_TIME_WORDS),
    );
    // A day or time alone refuses between requests; between conversations, each must have one.
    let dates_refuse = if alone {
        !dates_a.is_empty() || !dates_b.is_empty()
    } else {
        !dates_a.is_empty() && !dates_b.is_empty()
    };
    if dates_refuse {
        return reject(Reason::DateTime, format!("{dates_a:?} vs {dates_b:?}"));
    }
    let (loose_a, loose_b) = (
        words_in(&only_a, LOOSE_TIME_WORDS),
        words_in(&only_b, LOOSE_TIME_WORDS),
    );
    if !loose_a.is_empty() && !loose_b.is_empty() {
        return reject(Reason::DateTime, format!("{loose_a:?} vs {loose_b:?}"));
    }
    let (relative_a, relative_b) = (&stored.relative_times, &asked.relative_times);
    let pointed = |relative: &BTreeSet<String>| relative.iter().any(|r| !r.starts_with("this "));
    let one_sided = if alone {
        relative_a.is_empty() || relative_b.is_empty()
    } else {
        // Over whole conversations: a contrast is a relative time each side has alone.
        relative_a.is_subset(relative_b) || relative_b.is_subset(relative_a)
    };
    if relative_a != relative_b && (!one_sided || alone && (pointed(relative_a) || pointed(relative_b))) {
        return reject(Reason::DateTime, format!("{relative_a:?} vs {relative_b:?}"));
    }
    let (units_a, units_b) = (words_in(&only_a, TIME_UNITS), words_in(&only_b, TIME_UNITS));
    if !units_a.is_empty() && !units_b.is_empty() {
        return reject(Reason::DateTime, format!("{units_a:?} vs {units_b:?}"));
    }
    let (day_a, day_b) = (&stored.parts_of_day, &asked.parts_of_day);
    if !day_a.is_empty() && !day_b.is_empty() && day_a.is_disjoint(day_b) {
        return reject(Reason::DateTime, format!("{day_a:?} vs {day_b:?}"));
    }

    let names = |tokens: &[&Token]| -> Vec<String> {
        tokens
            .iter()
            .filter(|t| is_name(t))
            .map(|t| t.word.clone())
            .collect()
    };
    let (names_a, names_b) = (names(&only_a), names(&only_b));
    // Over whole conversations, names mostly belong to other topics ("my March statement",
    // "my trip to Lisbon"): they are compared where the request is (its antecedent).
    if strictness != Strictness::Contrasts && names_differ(&names_a, &names_b) {
        return reject(Reason::Entity, format!("{names_a:?} vs {names_b:?}"));
    }

    let (scope_a, scope_b) = (scope_words(&only_a, a), scope_words(&only_b, b));
    let (classes_a, classes_b): (BTreeSet<_>, BTreeSet<_>) = (
        scope_a.iter().map(|w| scope_class(w)).collect(),
        scope_b.iter().map(|w| scope_class(w)).collect(),
    );
    let (scope_a, scope_b): (BTreeSet<_>, BTreeSet<_>) = (
        scope_a
            .iter()
            .filter(|w| !classes_b.contains(scope_class(w)))
            .copied()
            .collect(),
        scope_b
            .iter()
            .filter(|w| !classes_a.contains(scope_class(w)))
            .copied()
            .collect(),
    );
    let strong = |scope: &BTreeSet<&str>| scope.iter().any(|w| ONE_SIDED_SCOPE.contains(w));
    if alone && ((!scope_a.is_empty() && !scope_b.is_empty()) || strong(&scope_a) || strong(&scope_b)) {
        return reject(Reason::Scope, format!("{scope_a:?} vs {scope_b:?}"));
    }
    Ok(())
}
