//! Tokens: a prompt split into lower-cased words, with what the rules ask of each word (its
//! stem, whether it looks like a name, whether it follows a number) and of the whole prompt
//! (its numbers, relative times and parts of the day).

use std::collections::BTreeSet;

use super::lexicon::{DATE_TIME_WORDS, LOOSE_TIME_WORDS, NUMBER_WORDS, RELATIVE_TIME, TIME_NOUNS};

#[derive(Debug, Clone)]
pub(super) struct Token {
    /// Lower-cased.
    pub(super) word: String,
    /// The word's crude stem, computed once: the rules compare stems over and over.
    pub(super) stem: String,
    /// A name: capitalised inside the sentence, or letters mixed with digits ("i32", "mp3").
    pub(super) name_like: bool,
    /// Follows a number ("7 pm", "5 miles").
    pub(super) after_number: bool,
}

impl Token {
    /// The same word, or another form of it ("opens" / "opened").
    pub(super) fn same_stem(&self, other: &Token) -> bool {
        self.stem == other.stem
    }

    /// The same word as `word`, or another form of it.
    pub(super) fn same_stem_as(&self, word: &str) -> bool {
        self.word == word || self.stem == stem(word)
    }
}

pub(super) fn is_numeric(word: &str) -> bool {
    !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | ',' | ':' | '$' | '%'))
        && word.chars().any(|c| c.is_ascii_digit())
}

/// Splits into words, expanding contractions so that "isn't" and "is not" agree, and parting
/// numbers from their suffixes ("6:45pm" is "6:45", "pm").
pub(super) fn tokens(text: &str) -> Vec<Token> {
    let text = text
        .replace('\u{2019}', "'")
        .replace("a.m.", "am")
        .replace("p.m.", "pm")
        .replace("A.M.", "am")
        .replace("P.M.", "pm")
        .replace(['?', '!'], ". ");
    let text = without_thousands_separators(&text);
    let mut words: Vec<(String, bool)> = Vec::new();
    let mut sentence_start = true;
    for raw in text.split(|c: char| {
        c.is_whitespace() || matches!(c, ',' | ';' | '(' | ')' | '"' | '/' | '!' | '?' | '-' | '[' | ']')
    }) {
        let trimmed = raw
            .trim_matches(|c: char| !(c.is_alphanumeric() || matches!(c, '+' | '#' | '$' | '\'')))
            .trim_matches('\'');
        if trimmed.is_empty() {
            continue;
        }
        let capitalised = !sentence_start
            && trimmed.chars().count() > 1
            && trimmed.chars().next().is_some_and(char::is_uppercase)
            && trimmed != "I";
        sentence_start = raw.ends_with('.') && !trimmed.ends_with(|c: char| c.is_ascii_digit());
        let lower = trimmed.to_lowercase();
        let expanded: Vec<String> = match lower.as_str() {
            "can't" | "cannot" => vec!["can".into(), "not".into()],
            "won't" => vec!["will".into(), "not".into()],
            "shan't" => vec!["shall".into(), "not".into()],
            word if word.ends_with("n't") => vec![word[..word.len() - 3].into(), "not".into()],
            word if word.contains('\'') => vec![word.split('\'').next().unwrap_or_default().into()],
            // "Rs.500": a unit and an amount.
            word if word.split_once('.').is_some_and(|(unit, amount)| {
                !unit.is_empty() && unit.chars().all(char::is_alphabetic) && is_numeric(amount)
            }) =>
            {
                let (unit, amount) = word.split_once('.').unwrap_or_default();
                vec![unit.into(), amount.into()]
            }
            word => {
                // A number glued to a unit or time of day: keep them apart.
                let digits_end = word
                    .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | ':' | '$')))
                    .unwrap_or(word.len());
                let (number, rest) = word.split_at(digits_end);
                if is_numeric(number) && !rest.is_empty() && rest.chars().all(char::is_alphabetic) {
                    vec![number.into(), rest.into()]
                } else {
                    vec![word.into()]
                }
            }
        };
        for word in expanded.into_iter().filter(|w| !w.is_empty()) {
            let mixed = word.chars().any(|c| c.is_ascii_digit()) && word.chars().any(char::is_alphabetic);
            words.push((word, capitalised || mixed));
        }
    }
    let mut out: Vec<Token> = Vec::with_capacity(words.len());
    for (word, name_like) in same_times(words) {
        let after_number = out.last().is_some_and(|t| is_numeric(&t.word));
        out.push(Token {
            stem: stem(&word),
            word,
            name_like,
            after_number,
        });
    }
    out
}

/// Times said two ways, written one way: "last night" is "yesterday night", "month to month"
/// is "monthly", "yearly" and "annually" are "annual".
fn same_times(words: Vec<(String, bool)>) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = Vec::with_capacity(words.len());
    let mut rest = words.into_iter().peekable();
    while let Some((word, name_like)) = rest.next() {
        match word.as_str() {
            "last" if rest.peek().is_some_and(|(next, _)| next == "night") => {
                out.push(("yesterday".into(), false));
            }
            "yearly" | "annually" => out.push(("annual".into(), name_like)),
            "month"
                if out.last().is_some_and(|(w, _)| w == "to")
                    && out.len() >= 2
                    && out[out.len() - 2].0 == "month" =>
            {
                out.truncate(out.len() - 2);
                out.push(("monthly".into(), name_like));
            }
            _ => out.push((word, name_like)),
        }
    }
    out
}

/// "15,000" is "15000"; "2, 3" and "1,2" are left alone.
fn without_thousands_separators(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        let separator = c == ','
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.len() > i + 3
            && chars[i + 1..i + 4].iter().all(char::is_ascii_digit)
            && !chars.get(i + 4).is_some_and(char::is_ascii_digit);
        if !separator {
            out.push(c);
        }
    }
    out
}

/// A crude stem: enough for "opens", "opened", "opening" to meet "open", and "banned" "ban".
pub(super) fn stem(word: &str) -> String {
    for suffix in ["ing", "ed", "es", "s", "d"] {
        if let Some(stem) = word.strip_suffix(suffix) {
            if stem.len() >= 3 {
                // A doubled last letter goes ("banned" is "ban"), by characters: prompts are
                // not all ASCII.
                let mut last = stem.chars().rev();
                let doubled = stem.len() >= 4 && last.next().is_some_and(|c| Some(c) == last.next());
                let stem = match stem.chars().next_back() {
                    Some(c) if doubled && matches!(suffix, "ing" | "ed") => {
                        &stem[..stem.len() - c.len_utf8()]
                    }
                    _ => stem,
                };
                return stem.to_owned();
            }
        }
    }
    word.to_owned()
}

/// Every number in the text, digits or words: "2+2" and "2 + 2" agree, "9:00" is "9" and
/// "30k" is "30000". Letters followed by digits ("mp4", "i32") are names, not numbers.
pub(super) fn numbers(tokens: &[Token]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, token) in tokens.iter().enumerate() {
        if let Some((_, value)) = NUMBER_WORDS.iter().find(|(name, _)| *name == token.word) {
            found.insert(value.to_string());
            continue;
        }
        // "Rs.500" is the amount; "mp4" and "i32" are names.
        let word = match token.word.split_once('.') {
            Some((unit, amount)) if unit.chars().all(char::is_alphabetic) && is_numeric(amount) => amount,
            _ => token.word.as_str(),
        };
        if word.starts_with(|c: char| c.is_alphabetic()) {
            continue;
        }
        let thousands = tokens.get(i + 1).is_some_and(|next| next.word == "k") && is_numeric(&token.word);
        let mut current = String::new();
        let chars: Vec<char> = word.chars().collect();
        let mut runs = Vec::new();
        for (i, &c) in chars.iter().enumerate() {
            let inner = matches!(c, '.' | ',')
                && !current.is_empty()
                && chars.get(i + 1).is_some_and(char::is_ascii_digit);
            if c.is_ascii_digit() {
                current.push(c);
            } else if inner {
                if c == '.' {
                    current.push('.');
                }
            } else if !current.is_empty() {
                runs.push((std::mem::take(&mut current), c == ':'));
            }
        }
        if !current.is_empty() {
            runs.push((current, false));
        }
        for (i, (run, _)) in runs.iter().enumerate() {
            let minutes_after_colon = i > 0 && runs[i - 1].1;
            if minutes_after_colon && run.chars().all(|c| c == '0') {
                continue;
            }
            let run = match run.trim_start_matches('0') {
                "" => "0",
                run => run,
            };
            if thousands && !run.contains('.') {
                found.insert(format!("{run}000"));
            } else {
                found.insert(run.to_owned());
            }
        }
    }
    found
}
/// Morning or evening, whichever way it is written.
pub(super) fn parts_of_day(tokens: &[Token]) -> BTreeSet<&'static str> {
    tokens
        .iter()
        .filter_map(|t| match t.word.as_str() {
            "am" if t.after_number => Some("morning"),
            "morning" => Some("morning"),
            "pm" if t.after_number => Some("later"),
            "afternoon" | "evening" | "night" | "tonight" => Some("later"),
            "noon" => Some("noon"),
            "midnight" => Some("midnight"),
            _ => None,
        })
        .collect()
}

/// Relative times, as "next weekend" or "last year".
pub(super) fn relative_times(tokens: &[Token]) -> BTreeSet<String> {
    tokens
        .windows(2)
        .filter(|w| {
            RELATIVE_TIME.contains(&w[0].word.as_str())
                && (TIME_NOUNS.iter().any(|n| w[1].same_stem_as(n))
                    || DATE_TIME_WORDS.contains(&w[1].word.as_str())
                    || LOOSE_TIME_WORDS.contains(&w[1].word.as_str()))
        })
        .map(|w| format!("{} {}", w[0].word, w[1].stem))
        .collect()
}
