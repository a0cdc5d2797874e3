//! Reading labelled data: JSONL pairs and CSV intents.

use std::path::Path;

use anyhow::Context;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;

/// Two questions and whether they ask the same thing (an answer to one serves the other).
#[derive(Debug, Clone, Deserialize)]
pub struct Pair {
    pub a: String,
    pub b: String,
    /// Also read as `same_answer`, the name the trap suite uses.
    #[serde(alias = "same_answer")]
    pub duplicate: bool,
}

/// A query and its intent.
#[derive(Debug, Clone, Deserialize)]
pub struct Intent {
    pub text: String,
    pub category: String,
}

/// Reads JSONL lines of `{"a": "...", "b": "...", "duplicate": true|false}`.
pub fn read_pairs(path: &Path) -> anyhow::Result<Vec<Pair>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read labelled pairs from {}", path.display()))?;
    let pairs = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line).with_context(|| {
                format!(
                    "{}:{}: expected {{\"a\": ..., \"b\": ..., \"duplicate\": true|false}}",
                    path.display(),
                    n + 1
                )
            })
        })
        .collect::<anyhow::Result<Vec<Pair>>>()?;
    anyhow::ensure!(!pairs.is_empty(), "{} holds no pairs", path.display());
    Ok(pairs)
}

/// Reads a CSV file with a header and the columns `text` and `category`.
pub fn read_intents(path: &Path) -> anyhow::Result<Vec<Intent>> {
    let mut reader = csv::Reader::from_path(path)
        .with_context(|| format!("cannot read intents from {}", path.display()))?;
    let intents = reader
        .deserialize()
        .enumerate()
        .map(|(n, row)| {
            row.with_context(|| {
                format!(
                    "{}: record {}: expected the columns text,category",
                    path.display(),
                    n + 1
                )
            })
        })
        .collect::<anyhow::Result<Vec<Intent>>>()?;
    anyhow::ensure!(!intents.is_empty(), "{} holds no queries", path.display());
    Ok(intents)
}

/// `n` items chosen at random with `seed` (all of them when `n` is `None` or too large), in
/// their original order.
pub fn sample<T>(items: Vec<T>, n: Option<usize>, seed: u64) -> Vec<T> {
    let Some(n) = n.filter(|&n| n < items.len()) else {
        return items;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut chosen: Vec<usize> = (0..items.len()).collect();
    chosen.shuffle(&mut rng);
    chosen.truncate(n);
    chosen.sort_unstable();
    let mut keep = vec![false; items.len()];
    for i in chosen {
        keep[i] = true;
    }
    items
        .into_iter()
        .zip(keep)
        .filter_map(|(item, keep)| keep.then_some(item))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_seeded_and_keeps_order() {
        let items: Vec<u32> = (0..100).collect();
        let a = sample(items.clone(), Some(10), 7);
        assert_eq!(a.len(), 10);
        assert_eq!(a, sample(items.clone(), Some(10), 7));
        assert_ne!(a, sample(items.clone(), Some(10), 8));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sample(items.clone(), None, 7), items);
        assert_eq!(sample(items.clone(), Some(1000), 7), items);
    }

    #[test]
    fn reads_quoted_csv_and_reports_bad_lines() {
        let dir = std::env::temp_dir().join(format!("semcache-eval-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("intents.csv");
        std::fs::write(
            &csv,
            "text,category\n\"Hi, where is my card?\",card_arrival\nok,other\n",
        )
        .unwrap();
        let intents = read_intents(&csv).unwrap();
        assert_eq!(intents.len(), 2);
        assert_eq!(intents[0].text, "Hi, where is my card?");
        assert_eq!(intents[0].category, "card_arrival");

        let jsonl = dir.join("pairs.jsonl");
        std::fs::write(
            &jsonl,
            "{\"a\":\"x\",\"b\":\"y\",\"duplicate\":true}\n{\"a\":1}\n",
        )
        .unwrap();
        let err = read_pairs(&jsonl).unwrap_err().to_string();
        assert!(err.contains("pairs.jsonl:2"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
