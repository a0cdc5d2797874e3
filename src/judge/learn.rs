//! What verdicts teach: for each entry, how similar a request must be before the judge need
//! not be asked.
//!
//! The idea is vCache's (Schroeder et al., "vCache: Verified Semantic Prompt Caching",
//! arXiv 2502.03771, ICLR 2026): learn a bound per cached entry, online, from verdicts on that
//! entry, so that the judge is asked less as the entry proves itself while the share of wrong
//! hits stays under a target. vCache fits a sigmoid of correctness against similarity per
//! entry and explores at random with a probability it derives from the fit. What is built here
//! is a deterministic Bayesian version of the same model:
//!
//! - Each entry is taken to have a threshold `t`: its answer is right for requests at least
//!   `t` similar to it and wrong below (`t` above 1 for an entry no paraphrase may share).
//! - Before any verdict, `t` is "never" with probability [`NEVER`] and otherwise uniform over
//!   the judge's floor to 1, in steps of 0.01.
//! - A verdict at similarity `s` says whether `s >= t`, and is wrong with probability
//!   [`NOISE`] (judges and users err; one verdict never settles an entry alone).
//! - The expected share of wrong hits at `s` is the posterior probability that `t > s`, from
//!   the entry's last [`KEPT`] verdicts. The judge is skipped when it is at most
//!   `--judge-max-error`. It falls as `s` rises, so each entry has one bound: the lowest `s`
//!   where it holds, which moves with every verdict.
//!
//! With these numbers an entry is served without the judge from about the similarity of its
//! second approval up, and one rejection above an approval sends the requests between back to
//! the judge.

use serde::{Deserialize, Serialize};

/// Verdicts kept per entry, newest last.
pub const KEPT: usize = 32;
/// Requests whose verdict an entry remembers (so that a repeated question costs one call).
pub const REMEMBERED: usize = 64;
/// The probability, before any verdict, that no request but the entry's own is answered by it.
pub const NEVER: f64 = 0.5;
/// Below this probability that the entry is right, the judge is not asked and the candidate is
/// passed over: a miss costs nothing in wrong answers.
pub const HOPELESS: f64 = 0.05;
/// The probability that a verdict is wrong: a judge right nine times in ten is assumed, so
/// that a better one only makes the bound safer.
pub const NOISE: f64 = 0.10;

/// What an entry's verdicts say of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confidence {
    /// Right with at most the target's chance of error: served without the judge.
    Serve,
    /// Unsure: the judge is asked.
    Ask,
    /// Almost surely wrong ([`HOPELESS`]): passed over without asking.
    PassOver,
}

/// One entry's verdicts, and the requests they were given on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdicts {
    /// (similarity, approved), oldest first; at most [`KEPT`].
    pub seen: Vec<(f32, bool)>,
    /// The exact keys of requests judged, with the verdict; at most [`REMEMBERED`].
    pub asked: Vec<([u8; 32], bool)>,
}

/// Thresholds in steps of 0.01, from 0 to 1; one more step stands for "never".
const STEPS: usize = 102;

fn step_of(similarity: f32) -> usize {
    ((similarity.clamp(0.0, 1.0) * 100.0).ceil() as usize).min(100)
}

impl Verdicts {
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty() && self.asked.is_empty()
    }

    /// The verdict already given on this entry for the request with this exact key.
    pub fn on(&self, request: &[u8; 32]) -> Option<bool> {
        self.asked
            .iter()
            .find(|(key, _)| key == request)
            .map(|&(_, approved)| approved)
    }

    /// A verdict from the judge on one request.
    pub fn add(&mut self, request: [u8; 32], similarity: f32, approved: bool) {
        self.learn(similarity, approved);
        self.asked.retain(|(key, _)| *key != request);
        if self.asked.len() == REMEMBERED {
            self.asked.remove(0);
        }
        self.asked.push((request, approved));
    }

    /// A verdict at a similarity, from the judge or from feedback on a served answer.
    pub fn learn(&mut self, similarity: f32, approved: bool) {
        if self.seen.len() == KEPT {
            self.seen.remove(0);
        }
        self.seen.push((similarity, approved));
    }

    /// Wrong-answer feedback: the answer was wrong at `similarity`. Approvals remembered for
    /// requests are dropped too, so that none is served again without a fresh verdict.
    pub fn refute(&mut self, similarity: f32) {
        self.learn(similarity, false);
        self.asked.retain(|&(_, approved)| !approved);
    }

    /// The posterior over the entry's threshold, step by step from `floor` (index 101 is
    /// "never"); unnormalised.
    fn posterior(&self, floor: f32) -> [f64; STEPS] {
        let first = step_of(floor);
        let mut weights = [0.0; STEPS];
        let spread = (1.0 - NEVER) / (101 - first) as f64;
        for (step, weight) in weights.iter_mut().enumerate().skip(first) {
            *weight = if step == STEPS - 1 { NEVER } else { spread };
            let threshold = step as f32 / 100.0;
            for &(similarity, approved) in &self.seen {
                let right = step < STEPS - 1 && similarity >= threshold;
                *weight *= if approved == right { 1.0 - NOISE } else { NOISE };
            }
        }
        weights
    }

    /// The expected share of wrong hits if this entry were served at `similarity` without
    /// asking the judge: the posterior probability that its threshold is above `similarity`.
    pub fn expected_error(&self, similarity: f32, floor: f32) -> f64 {
        let weights = self.posterior(floor);
        let total: f64 = weights.iter().sum();
        let above = step_of(floor).max((similarity.clamp(0.0, 1.0) * 100.0).floor() as usize + 1);
        weights[above.min(STEPS - 1)..].iter().sum::<f64>() / total
    }

    /// Whether a request at `similarity` may be served without the judge.
    pub fn confident(&self, similarity: f32, floor: f32, max_error: f32) -> bool {
        self.confidence(similarity, floor, max_error) == Confidence::Serve
    }

    /// What the entry's verdicts say of a request at `similarity`. A `max_error` of 0 means
    /// the judge is always asked.
    pub fn confidence(&self, similarity: f32, floor: f32, max_error: f32) -> Confidence {
        if max_error <= 0.0 || self.seen.is_empty() {
            return Confidence::Ask;
        }
        let error = self.expected_error(similarity, floor);
        if error <= f64::from(max_error) {
            Confidence::Serve
        } else if 1.0 - error < HOPELESS {
            Confidence::PassOver
        } else {
            Confidence::Ask
        }
    }

    /// The lowest similarity (in steps of 0.01, from `floor`) at which the entry is served
    /// without the judge, if any: its acceptance bound, as the admin API shows it.
    pub fn bound(&self, floor: f32, max_error: f32) -> Option<f32> {
        (step_of(floor)..=100)
            .map(|step| step as f32 / 100.0)
            .find(|&s| self.confident(s, floor, max_error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn a_verdict_is_remembered_per_request_and_the_oldest_go_first() {
        let mut verdicts = Verdicts::default();
        verdicts.add(key(1), 0.8, true);
        verdicts.add(key(2), 0.8, false);
        assert_eq!(
            (verdicts.on(&key(1)), verdicts.on(&key(2)), verdicts.on(&key(3))),
            (Some(true), Some(false), None)
        );
        for n in 0..200u8 {
            verdicts.add(key(n), 0.9, true);
        }
        assert_eq!((verdicts.seen.len(), verdicts.asked.len()), (KEPT, REMEMBERED));
        assert_eq!(verdicts.on(&key(199)), Some(true));
        assert_eq!(verdicts.on(&key(2)), None);
        verdicts.refute(0.95);
        assert_eq!(
            verdicts.on(&key(199)),
            None,
            "no approval outlives a wrong-answer report"
        );
    }

    #[test]
    fn the_bound_falls_with_approvals_and_rises_with_a_rejection() {
        let mut verdicts = Verdicts::default();
        assert_eq!(verdicts.bound(0.7, 0.02), None, "never judged: always asked");
        verdicts.add(key(1), 0.90, true);
        assert_eq!(verdicts.bound(0.7, 0.02), None, "one approval is not enough");
        verdicts.add(key(2), 0.91, true);
        let two = verdicts.bound(0.7, 0.02);
        assert!(
            two.is_none_or(|b| b > 0.95),
            "two approvals: only close requests skip it: {two:?}"
        );
        verdicts.add(key(3), 0.90, true);
        assert_eq!(
            verdicts.bound(0.7, 0.02),
            Some(0.90),
            "three: from the lowest approval up"
        );
        verdicts.add(key(4), 0.80, true);
        verdicts.add(key(5), 0.81, true);
        verdicts.add(key(6), 0.80, true);
        let bound = verdicts.bound(0.7, 0.02);
        assert!(bound.is_some_and(|b| b < 0.85), "{bound:?}");
        // Refused closer than two of its approvals: the band up to there goes back to the judge.
        verdicts.add(key(7), 0.86, false);
        verdicts.add(key(8), 0.88, false);
        let bound = verdicts.bound(0.7, 0.02);
        assert!(bound.is_some_and(|b| b > 0.88), "{bound:?}");
        assert!(!verdicts.confident(0.85, 0.7, 0.02));
        assert!(verdicts.expected_error(0.95, 0.7) < verdicts.expected_error(0.85, 0.7));
        // A target of zero means the judge is always asked.
        assert_eq!(verdicts.bound(0.7, 0.0), None);
    }

    #[test]
    fn an_entry_refused_twice_is_passed_over_below_its_refusals() {
        let mut verdicts = Verdicts::default();
        verdicts.add(key(1), 0.90, false);
        verdicts.add(key(2), 0.92, false);
        assert_eq!(verdicts.confidence(0.85, 0.7, 0.02), Confidence::PassOver);
        assert_eq!(verdicts.confidence(0.91, 0.7, 0.02), Confidence::PassOver);
        assert_eq!(
            verdicts.confidence(0.99, 0.7, 0.02),
            Confidence::Ask,
            "closer than any refusal"
        );
        assert_eq!(
            verdicts.confidence(0.85, 0.7, 0.0),
            Confidence::Ask,
            "a target of 0: always asked"
        );
    }

    #[test]
    fn one_wrong_verdict_among_many_does_not_undo_an_entry() {
        let mut verdicts = Verdicts::default();
        for n in 0..6u8 {
            verdicts.add(key(n), 0.84 + f32::from(n) * 0.02, true);
        }
        let (before, error) = (verdicts.bound(0.7, 0.02), verdicts.expected_error(0.9, 0.7));
        verdicts.add(key(9), 0.97, false);
        let after = verdicts.bound(0.7, 0.02);
        assert!(before.is_some() && after.is_some(), "{before:?} {after:?}");
        assert!(verdicts.expected_error(0.9, 0.7) > error, "it still counts");
    }

    /// A small deterministic generator (splitmix64), so that the simulation reads the same
    /// every run.
    struct Draws(u64);

    impl Draws {
        fn next(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as f64 / u64::MAX as f64
        }
    }

    /// A repeated workload: 40 entries, each right for requests above a threshold of its own
    /// (0.74 to 0.92), asked 150 times each at similarities from the floor (0.70) up, with a
    /// judge that is right 95% of the time. What a cache with the judge serves, per share of
    /// the run.
    #[test]
    fn on_a_repeated_workload_the_judge_is_asked_less_while_wrong_hits_stay_under_the_target() {
        const ENTRIES: usize = 40;
        const REQUESTS: usize = 6000;
        const ACCURACY: f64 = 0.95;
        const MAX_ERROR: f32 = 0.02;
        const FLOOR: f32 = 0.70;
        let mut draws = Draws(7);
        let bounds: Vec<f64> = (0..ENTRIES).map(|_| 0.74 + 0.18 * draws.next()).collect();
        let mut entries = vec![Verdicts::default(); ENTRIES];
        let (mut asked_first, mut asked_last) = (0usize, 0usize);
        let (mut skipped, mut skipped_wrong, mut served, mut served_wrong) = (0usize, 0, 0, 0);
        let (mut passed_over, mut rights) = (0, 0);
        for request in 0..REQUESTS {
            let entry = (draws.next() * ENTRIES as f64) as usize % ENTRIES;
            let similarity = (f64::from(FLOOR) + 0.30 * draws.next()) as f32;
            let right = f64::from(similarity) >= bounds[entry];
            rights += usize::from(right);
            let verdicts = &mut entries[entry];
            match verdicts.confidence(similarity, FLOOR, MAX_ERROR) {
                Confidence::Serve => {
                    skipped += 1;
                    served += 1;
                    skipped_wrong += usize::from(!right);
                    served_wrong += usize::from(!right);
                    continue;
                }
                Confidence::PassOver => {
                    passed_over += 1;
                    continue;
                }
                Confidence::Ask => {}
            }
            if request < REQUESTS / 4 {
                asked_first += 1;
            } else if request >= REQUESTS * 3 / 4 {
                asked_last += 1;
            }
            let approved = if draws.next() < ACCURACY { right } else { !right };
            let mut request_key = [0u8; 32];
            request_key[..8].copy_from_slice(&(request as u64).to_le_bytes());
            verdicts.add(request_key, similarity, approved);
            if approved {
                served += 1;
                served_wrong += usize::from(!right);
            }
        }
        let quarter = (REQUESTS / 4) as f64;
        let (first, last) = (asked_first as f64 / quarter, asked_last as f64 / quarter);
        let skipped_error = skipped_wrong as f64 / skipped.max(1) as f64;
        let served_error = served_wrong as f64 / served.max(1) as f64;
        println!(
            "judge asked for {:.1}% of the first quarter's requests, {:.1}% of the last's; \
             served without it: {skipped}, {:.1}% wrong; passed over without it: {passed_over}; \
             all hits: {served} (of {rights} requests an entry answers), {:.1}% wrong",
            100.0 * first,
            100.0 * last,
            100.0 * skipped_error,
            100.0 * served_error
        );
        assert!(
            last < 0.6 * first,
            "the judge is asked less over time: {first} then {last}"
        );
        assert!(skipped > REQUESTS / 5, "{skipped}");
        assert!(skipped_error <= f64::from(MAX_ERROR), "{skipped_error}");
        assert!(served_error <= f64::from(MAX_ERROR), "{served_error}");
    }
}
