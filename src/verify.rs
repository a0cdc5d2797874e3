//! Hit verification: a candidate found by meaning is refused when the two prompts differ in a
//! way that changes the answer, which embeddings barely see ("open" / "closed" scores 0.95).
//!
//! The verifier compares the words only one prompt has. A difference is a reason to refuse
//! when it is a negation (an odd number more of "not", "never", "without", …), an antonym or
//! an un-/dis-/il- prefix ("lock" / "unlock"), a number or amount, a date or time, a name
//! (capitalised or a known product), or a quantifier ("all" / "first"). Anything else, such as
//! "store" / "shop", is left to the similarity threshold.

use std::collections::BTreeSet;

/// Why a candidate was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Negation,
    Number,
    DateTime,
    Entity,
    Scope,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::Negation,
        Reason::Number,
        Reason::DateTime,
        Reason::Entity,
        Reason::Scope,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Negation => "negation",
            Reason::Number => "number",
            Reason::DateTime => "date_time",
            Reason::Entity => "entity",
            Reason::Scope => "scope",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    /// The words that made the difference, for logs and the admin API.
    pub detail: String,
}

const NEGATIONS: &[&str] = &[
    "not", "no", "never", "none", "nothing", "nobody", "nowhere", "neither", "nor", "without", "cannot",
    "unable", "lack", "lacks", "missing", "non", "avoid", "prevent", "stop", "against",
];

/// Pairs of words of opposite meaning, compared after stemming.
const ANTONYMS: &[(&str, &str)] = &[
    ("open", "close"),
    ("open", "closed"),
    ("open", "shut"),
    ("on", "off"),
    ("enable", "disable"),
    ("allow", "ban"),
    ("allow", "block"),
    ("allow", "forbid"),
    ("allow", "deny"),
    ("allow", "prohibit"),
    ("permit", "ban"),
    ("permit", "forbid"),
    ("include", "exclude"),
    ("with", "without"),
    ("before", "after"),
    ("increase", "decrease"),
    ("increase", "reduce"),
    ("raise", "lower"),
    ("add", "remove"),
    ("add", "delete"),
    ("add", "subtract"),
    ("create", "delete"),
    ("start", "stop"),
    ("start", "end"),
    ("start", "finish"),
    ("begin", "end"),
    ("upload", "download"),
    ("accept", "reject"),
    ("accept", "decline"),
    ("approve", "reject"),
    ("approve", "deny"),
    ("buy", "sell"),
    ("import", "export"),
    ("login", "logout"),
    ("in", "out"),
    ("up", "down"),
    ("grant", "revoke"),
    ("win", "lose"),
    ("push", "pull"),
    ("send", "receive"),
    ("max", "min"),
    ("maximum", "minimum"),
    ("more", "less"),
    ("more", "fewer"),
    ("most", "least"),
    ("high", "low"),
    ("higher", "lower"),
    ("highest", "lowest"),
    ("best", "worst"),
    ("better", "worse"),
    ("true", "false"),
    ("yes", "no"),
    ("pass", "fail"),
    ("hot", "cold"),
    ("warm", "cold"),
    ("cheap", "expensive"),
    ("fast", "slow"),
    ("early", "late"),
    ("above", "below"),
    ("over", "under"),
    ("inside", "outside"),
    ("internal", "external"),
    ("positive", "negative"),
    ("safe", "dangerous"),
    ("legal", "illegal"),
    ("hire", "fire"),
    ("join", "leave"),
    ("arrive", "depart"),
    ("arrival", "departure"),
    ("entry", "exit"),
    ("left", "right"),
    ("north", "south"),
    ("east", "west"),
    ("male", "female"),
    ("men", "women"),
    ("man", "woman"),
    ("boy", "girl"),
    ("input", "output"),
    ("encode", "decode"),
    ("encrypt", "decrypt"),
    ("compress", "decompress"),
    ("zip", "unzip"),
    ("mount", "unmount"),
    ("attach", "detach"),
    ("show", "hide"),
    ("visible", "hidden"),
    ("public", "private"),
    ("online", "offline"),
    ("delayed", "time"),
    ("late", "time"),
    ("pro", "con"),
    ("pros", "cons"),
    ("advantage", "disadvantage"),
    ("benefit", "risk"),
    ("love", "hate"),
    ("like", "dislike"),
    ("agree", "disagree"),
    ("success", "failure"),
    ("succeed", "fail"),
    ("lend", "borrow"),
    ("debit", "credit"),
    ("deposit", "withdraw"),
    ("charge", "refund"),
    ("import", "export"),
    ("ascending", "descending"),
    ("asc", "desc"),
    ("uppercase", "lowercase"),
    ("upper", "lower"),
    ("first", "last"),
    ("oldest", "newest"),
    ("old", "new"),
    ("older", "newer"),
    ("big", "small"),
    ("large", "small"),
    ("long", "short"),
    ("light", "dark"),
    ("light", "heavy"),
    ("wet", "dry"),
    ("full", "empty"),
    ("strong", "weak"),
    ("easy", "hard"),
    ("easy", "difficult"),
];

const NEGATING_PREFIXES: &[&str] = &["un", "dis", "in", "il", "im", "ir", "non", "de", "anti"];

/// Quantifiers: a different one usually asks a different question.
const SCOPE_WORDS: &[&str] = &[
    "all",
    "every",
    "each",
    "any",
    "some",
    "only",
    "most",
    "few",
    "several",
    "both",
    "either",
    "single",
    "entire",
    "whole",
    "half",
    "first",
    "last",
    "everything",
    "everyone",
    "anything",
    "anyone",
    "something",
    "someone",
    "always",
    "sometimes",
    "often",
    "usually",
];

/// Units of time: a difference counts when both prompts name one ("per month" / "per year").
const TIME_UNITS: &[&str] = &[
    "second",
    "seconds",
    "minute",
    "minutes",
    "hour",
    "hours",
    "day",
    "days",
    "week",
    "weeks",
    "month",
    "months",
    "year",
    "years",
    "decade",
    "decades",
    "century",
    "centuries",
];

/// Days, months and relative times: a difference counts even when one prompt has none.
const DATE_TIME_WORDS: &[&str] = &[
    "today",
    "tomorrow",
    "yesterday",
    "tonight",
    "weekend",
    "weekday",
    "weekdays",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "january",
    "february",
    "march",
    "april",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
    "next",
    "last",
    "previous",
    "daily",
    "weekly",
    "monthly",
    "yearly",
    "annual",
    "annually",
    "spring",
    "summer",
    "autumn",
    "winter",
    "christmas",
    "easter",
    "ago",
    "before",
    "after",
    "hourly",
    "overnight",
    "tonight's",
    "today's",
    "tomorrow's",
];

/// Number words. "one" is left out: it is as often an article as a number.
const NUMBER_WORDS: &[(&str, u32)] = &[
    ("zero", 0),
    ("two", 2),
    ("three", 3),
    ("four", 4),
    ("five", 5),
    ("six", 6),
    ("seven", 7),
    ("eight", 8),
    ("nine", 9),
    ("ten", 10),
    ("eleven", 11),
    ("twelve", 12),
    ("thirteen", 13),
    ("fourteen", 14),
    ("fifteen", 15),
    ("sixteen", 16),
    ("seventeen", 17),
    ("eighteen", 18),
    ("nineteen", 19),
    ("twenty", 20),
    ("thirty", 30),
    ("forty", 40),
    ("fifty", 50),
    ("sixty", 60),
    ("seventy", 70),
    ("eighty", 80),
    ("ninety", 90),
    ("hundred", 100),
    ("thousand", 1000),
    ("million", 1_000_000),
    ("billion", 1_000_000_000),
    ("dozen", 12),
    ("twice", 2),
    ("third", 3),
    ("fourth", 4),
    ("fifth", 5),
    ("double", 2),
    ("triple", 3),
];

/// Names written in lower case as often as not: platforms, languages, tools, services.
const KNOWN_NAMES: &[&str] = &[
    "windows",
    "mac",
    "macos",
    "osx",
    "linux",
    "ubuntu",
    "debian",
    "fedora",
    "centos",
    "android",
    "ios",
    "iphone",
    "ipad",
    "chrome",
    "firefox",
    "safari",
    "edge",
    "python",
    "java",
    "javascript",
    "typescript",
    "rust",
    "golang",
    "ruby",
    "php",
    "perl",
    "kotlin",
    "swift",
    "scala",
    "haskell",
    "c++",
    "c#",
    "sql",
    "mysql",
    "postgres",
    "postgresql",
    "sqlite",
    "mongodb",
    "redis",
    "excel",
    "pip",
    "npm",
    "yarn",
    "cargo",
    "conda",
    "brew",
    "apt",
    "docker",
    "kubernetes",
    "git",
    "github",
    "gitlab",
    "aws",
    "azure",
    "gcp",
    "react",
    "vue",
    "angular",
    "django",
    "flask",
    "rails",
    "node",
    "pandas",
    "numpy",
    "tensorflow",
    "pytorch",
    "bash",
    "zsh",
    "powershell",
    "vim",
    "emacs",
    "vscode",
    "word",
    "powerpoint",
    "outlook",
    "gmail",
    "slack",
    "zoom",
    "teams",
    "whatsapp",
    "instagram",
    "facebook",
    "twitter",
    "tiktok",
    "youtube",
    "netflix",
    "spotify",
    "amazon",
    "google",
    "apple",
    "microsoft",
    "paypal",
    "visa",
    "mastercard",
    "bitcoin",
    "ethereum",
    "usd",
    "eur",
    "gbp",
    "dollars",
    "euros",
    "pounds",
    "yen",
];

#[derive(Debug, Clone)]
struct Token {
    /// Lower-cased.
    word: String,
    /// A name: capitalised inside the sentence, or letters mixed with digits ("i32", "mp3").
    name_like: bool,
    /// Follows a number ("7 pm", "5 miles").
    after_number: bool,
}

fn is_numeric(word: &str) -> bool {
    !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | ',' | ':' | '$' | '%'))
        && word.chars().any(|c| c.is_ascii_digit())
}

/// Splits into words, expanding contractions so that "isn't" and "is not" agree, and parting
/// numbers from their suffixes ("6:45pm" is "6:45", "pm").
fn tokens(text: &str) -> Vec<Token> {
    let text = text
        .replace('\u{2019}', "'")
        .replace("a.m.", "am")
        .replace("p.m.", "pm")
        .replace("A.M.", "am")
        .replace("P.M.", "pm");
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
    for (word, name_like) in words {
        let after_number = out.last().is_some_and(|t| is_numeric(&t.word));
        out.push(Token {
            word,
            name_like,
            after_number,
        });
    }
    out
}

/// A crude stem: enough for "opens", "opened", "opening" to meet "open", and "banned" "ban".
fn stem(word: &str) -> String {
    for suffix in ["ing", "ed", "es", "s", "d"] {
        if let Some(stem) = word.strip_suffix(suffix) {
            if stem.len() >= 3 {
                let bytes = stem.as_bytes();
                let doubled = bytes.len() >= 4 && bytes[bytes.len() - 1] == bytes[bytes.len() - 2];
                let stem = if doubled && matches!(suffix, "ing" | "ed") {
                    &stem[..stem.len() - 1]
                } else {
                    stem
                };
                return stem.to_owned();
            }
        }
    }
    word.to_owned()
}

fn same_stem(a: &str, b: &str) -> bool {
    a == b || stem(a) == stem(b)
}

/// Every number in the text, digits or words, sorted: "2+2" and "2 + 2" agree, and "9:00"
/// is "9".
fn numbers(tokens: &[Token]) -> Vec<String> {
    let mut found = Vec::new();
    for token in tokens {
        if let Some((_, value)) = NUMBER_WORDS.iter().find(|(name, _)| *name == token.word) {
            found.push(value.to_string());
            continue;
        }
        let mut current = String::new();
        let chars: Vec<char> = token.word.chars().collect();
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
            found.push(run.trim_start_matches('0').to_owned());
        }
    }
    found.sort();
    found
}

/// Negations, counting a negating prefix when the other prompt has the bare word
/// ("unsafe" against "safe").
fn polarity(tokens: &[Token], other: &[Token]) -> usize {
    tokens
        .iter()
        .filter(|t| {
            NEGATIONS.contains(&t.word.as_str())
                || NEGATING_PREFIXES.iter().any(|prefix| {
                    t.word
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.len() >= 3 && other.iter().any(|o| same_stem(&o.word, rest)))
                })
        })
        .count()
}

fn is_name(token: &Token) -> bool {
    token.name_like || KNOWN_NAMES.contains(&token.word.as_str())
}

/// Words present in `a` but not in `b` (by stem), in order.
fn only_in<'a>(a: &'a [Token], b: &[Token]) -> Vec<&'a Token> {
    a.iter()
        .filter(|t| !b.iter().any(|u| same_stem(&t.word, &u.word)))
        .collect()
}

fn antonyms(a: &str, b: &str) -> bool {
    // Prefixed opposites ("lock" / "unlock") are counted by `polarity`, which also lets
    // "aren't safe" meet "unsafe".
    ANTONYMS
        .iter()
        .any(|(x, y)| (same_stem(a, x) && same_stem(b, y)) || (same_stem(a, y) && same_stem(b, x)))
}

/// Morning or evening, whichever way it is written.
fn parts_of_day(tokens: &[Token]) -> BTreeSet<&'static str> {
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

fn words_in<'a>(tokens: &[&'a Token], list: &[&str]) -> BTreeSet<&'a str> {
    tokens
        .iter()
        .filter(|t| list.contains(&t.word.as_str()))
        .map(|t| t.word.as_str())
        .collect()
}

/// Quantifiers present; "other" counts only in "every other", "each other" and the like.
fn scope_words<'a>(tokens: &[&'a Token], all: &'a [Token]) -> BTreeSet<&'a str> {
    let mut found = words_in(tokens, SCOPE_WORDS);
    for (i, token) in all.iter().enumerate() {
        let scoped = i > 0 && SCOPE_WORDS.contains(&all[i - 1].word.as_str());
        if token.word == "other" && scoped && tokens.iter().any(|t| std::ptr::eq(*t, token)) {
            found.insert("other");
        }
    }
    found
}

/// Checks whether the answer stored for `stored` may be served for `asked`.
pub fn verify(stored: &str, asked: &str) -> Result<(), Rejection> {
    let a = tokens(stored);
    let b = tokens(asked);
    let reject = |reason, detail: String| Err(Rejection { reason, detail });

    if polarity(&a, &b) % 2 != polarity(&b, &a) % 2 {
        return reject(Reason::Negation, "one prompt is negated".to_owned());
    }

    let (numbers_a, numbers_b) = (numbers(&a), numbers(&b));
    if numbers_a != numbers_b {
        return reject(Reason::Number, format!("{numbers_a:?} vs {numbers_b:?}"));
    }

    let only_a = only_in(&a, &b);
    let only_b = only_in(&b, &a);
    for x in &only_a {
        if let Some(y) = only_b.iter().find(|y| antonyms(&x.word, &y.word)) {
            return reject(Reason::Negation, format!("{:?} vs {:?}", x.word, y.word));
        }
    }

    let (dates_a, dates_b) = (
        words_in(&only_a, DATE_TIME_WORDS),
        words_in(&only_b, DATE_TIME_WORDS),
    );
    if !dates_a.is_empty() || !dates_b.is_empty() {
        return reject(Reason::DateTime, format!("{dates_a:?} vs {dates_b:?}"));
    }
    let (units_a, units_b) = (words_in(&only_a, TIME_UNITS), words_in(&only_b, TIME_UNITS));
    if !units_a.is_empty() && !units_b.is_empty() {
        return reject(Reason::DateTime, format!("{units_a:?} vs {units_b:?}"));
    }
    let (day_a, day_b) = (parts_of_day(&a), parts_of_day(&b));
    if !day_a.is_empty() && !day_b.is_empty() && day_a.is_disjoint(&day_b) {
        return reject(Reason::DateTime, format!("{day_a:?} vs {day_b:?}"));
    }

    let names = |tokens: &[&Token]| -> BTreeSet<String> {
        tokens
            .iter()
            .filter(|t| is_name(t))
            .map(|t| t.word.clone())
            .collect()
    };
    let (names_a, names_b) = (names(&only_a), names(&only_b));
    if !names_a.is_empty() && !names_b.is_empty() {
        return reject(Reason::Entity, format!("{names_a:?} vs {names_b:?}"));
    }

    let (scope_a, scope_b) = (scope_words(&only_a, &a), scope_words(&only_b, &b));
    if !scope_a.is_empty() || !scope_b.is_empty() {
        return reject(Reason::Scope, format!("{scope_a:?} vs {scope_b:?}"));
    }
    Ok(())
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
        for line in include_str!("../tests/data/traps.jsonl")
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
    }
}
