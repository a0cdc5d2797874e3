//! A small HNSW graph (Malkov and Yashunin, 2016) over a partition's own vectors.
//!
//! The graph holds links only: vectors stay in the partition's one flat array and are read
//! through it, so each vector is in memory once, and links are `u32` slot numbers (a node's
//! layer-0 list is 33 `u32`s, 132 bytes). Similarity is the dot product of unit vectors.
//!
//! An insert is split in two so that searches are never held up by the slow part: planning
//! (finding the new node's neighbours, a search with `EF_CONSTRUCTION`) needs only to read the
//! graph, and applying the plan (writing links both ways) is short. Only one inserter runs at a
//! time, so nothing changes the graph between the two.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use rand::Rng;

use super::dot;

/// Links per node above layer 0.
const M: usize = 16;
/// Links per node on layer 0.
const M0: usize = 2 * M;
/// Candidates kept while finding a new node's neighbours.
const EF_CONSTRUCTION: usize = 100;
const MAX_LEVEL: usize = 12;

/// The vectors of a partition, slot after slot.
#[derive(Clone, Copy)]
pub(super) struct Vectors<'a> {
    pub flat: &'a [f32],
    pub dims: usize,
}

impl Vectors<'_> {
    fn get(&self, slot: u32) -> &[f32] {
        let start = slot as usize * self.dims;
        &self.flat[start..start + self.dims]
    }

    fn similarity(&self, query: &[f32], slot: u32) -> f32 {
        dot(query, self.get(slot))
    }
}

/// A slot and its similarity to the query; ordered by similarity.
#[derive(Debug, Clone, Copy)]
struct Scored {
    similarity: f32,
    slot: u32,
}

impl PartialEq for Scored {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Scored {}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        self.similarity
            .total_cmp(&other.similarity)
            .then(self.slot.cmp(&other.slot))
    }
}

/// Slots already seen by one search.
struct Visited(Vec<u64>);

impl Visited {
    fn new(len: usize) -> Self {
        Self(vec![0; len.div_ceil(64)])
    }

    /// Marks the slot; whether it was new.
    fn insert(&mut self, slot: u32) -> bool {
        let (word, bit) = (slot as usize / 64, 1u64 << (slot % 64));
        let new = self.0[word] & bit == 0;
        self.0[word] |= bit;
        new
    }
}

/// Where a new node goes: its level and its neighbours on each layer, bottom first.
pub(super) struct Plan {
    slot: u32,
    level: usize,
    neighbours: Vec<Vec<u32>>,
}

#[derive(Default)]
pub(super) struct Graph {
    /// Layer-0 links, `M0 + 1` per slot: the count, then the slots.
    base: Vec<u32>,
    /// Links above layer 0, for the few nodes that reach higher: per node, layer 1 first.
    upper: HashMap<u32, Vec<Vec<u32>>>,
    entry: Option<u32>,
    top_level: usize,
    len: usize,
}

/// A new node's level: 0 for most, each level up `M` times rarer.
pub(super) fn random_level(rng: &mut impl Rng) -> usize {
    let unit: f64 = rng.gen_range(f64::EPSILON..1.0);
    ((-unit.ln() / (M as f64).ln()) as usize).min(MAX_LEVEL)
}

impl Graph {
    /// Nodes in the graph: slots `0..len`.
    pub fn len(&self) -> usize {
        self.len
    }

    fn links(&self, slot: u32, layer: usize) -> &[u32] {
        if layer == 0 {
            let start = slot as usize * (M0 + 1);
            let count = self.base[start] as usize;
            &self.base[start + 1..start + 1 + count]
        } else {
            self.upper
                .get(&slot)
                .and_then(|layers| layers.get(layer - 1))
                .map_or(&[], Vec::as_slice)
        }
    }

    fn set_links(&mut self, slot: u32, layer: usize, links: &[u32]) {
        if layer == 0 {
            let start = slot as usize * (M0 + 1);
            self.base[start] = links.len() as u32;
            self.base[start + 1..start + 1 + links.len()].copy_from_slice(links);
        } else {
            let layers = self.upper.entry(slot).or_default();
            if layers.len() < layer {
                layers.resize(layer, Vec::new());
            }
            layers[layer - 1] = links.to_vec();
        }
    }

    /// Moves greedily towards the query on one layer.
    fn greedy(&self, vectors: Vectors, query: &[f32], mut best: Scored, layer: usize) -> Scored {
        loop {
            let mut moved = false;
            for &next in self.links(best.slot, layer) {
                let similarity = vectors.similarity(query, next);
                if similarity > best.similarity {
                    best = Scored {
                        similarity,
                        slot: next,
                    };
                    moved = true;
                }
            }
            if !moved {
                return best;
            }
        }
    }

    /// The `ef` most similar nodes reachable on one layer from `entries`, most similar first.
    fn search_layer(
        &self,
        vectors: Vectors,
        query: &[f32],
        entries: &[Scored],
        ef: usize,
        layer: usize,
    ) -> Vec<Scored> {
        let mut visited = Visited::new(self.len);
        let mut candidates: BinaryHeap<Scored> = BinaryHeap::new();
        // The results, least similar on top so that it is the one dropped.
        let mut results: BinaryHeap<std::cmp::Reverse<Scored>> = BinaryHeap::new();
        for &entry in entries {
            if visited.insert(entry.slot) {
                candidates.push(entry);
                results.push(std::cmp::Reverse(entry));
            }
        }
        while results.len() > ef {
            results.pop();
        }
        while let Some(candidate) = candidates.pop() {
            let worst = results.peek().map_or(f32::MIN, |r| r.0.similarity);
            if candidate.similarity < worst && results.len() >= ef {
                break;
            }
            for &next in self.links(candidate.slot, layer) {
                if !visited.insert(next) {
                    continue;
                }
                let similarity = vectors.similarity(query, next);
                let worst = results.peek().map_or(f32::MIN, |r| r.0.similarity);
                if results.len() < ef || similarity > worst {
                    let scored = Scored {
                        similarity,
                        slot: next,
                    };
                    candidates.push(scored);
                    results.push(std::cmp::Reverse(scored));
                    if results.len() > ef {
                        results.pop();
                    }
                }
            }
        }
        let mut found: Vec<Scored> = results.into_iter().map(|r| r.0).collect();
        found.sort_by(|a, b| b.cmp(a));
        found
    }

    /// The `ef` nodes most similar to the query (at least `ef` are looked at), most similar
    /// first, as (slot, similarity).
    pub fn search(&self, vectors: Vectors, query: &[f32], ef: usize) -> Vec<(usize, f32)> {
        let Some(entry) = self.entry else {
            return Vec::new();
        };
        let mut best = Scored {
            similarity: vectors.similarity(query, entry),
            slot: entry,
        };
        for layer in (1..=self.top_level).rev() {
            best = self.greedy(vectors, query, best, layer);
        }
        self.search_layer(vectors, query, &[best], ef, 0)
            .into_iter()
            .map(|s| (s.slot as usize, s.similarity))
            .collect()
    }

    /// Keeps up to `m` of the candidates (most similar first): one is kept when it is more
    /// similar to the node than to any kept one, so links spread in every direction; then the
    /// rest fill up what is left.
    fn select(vectors: Vectors, candidates: &[Scored], m: usize) -> Vec<u32> {
        let mut kept: Vec<u32> = Vec::with_capacity(m);
        for candidate in candidates {
            if kept.len() == m {
                break;
            }
            let diverse = kept
                .iter()
                .all(|&other| dot(vectors.get(candidate.slot), vectors.get(other)) < candidate.similarity);
            if diverse {
                kept.push(candidate.slot);
            }
        }
        for candidate in candidates {
            if kept.len() == m {
                break;
            }
            if !kept.contains(&candidate.slot) {
                kept.push(candidate.slot);
            }
        }
        kept
    }

    /// Finds where the next slot (`len`) goes, at `level` (see [`random_level`]). Reads the
    /// graph only.
    pub fn plan(&self, vectors: Vectors, level: usize) -> Plan {
        let slot = self.len as u32;
        let query = vectors.get(slot);
        let mut neighbours = vec![Vec::new(); level + 1];
        if let Some(entry) = self.entry {
            let mut best = Scored {
                similarity: vectors.similarity(query, entry),
                slot: entry,
            };
            for layer in (level + 1..=self.top_level).rev() {
                best = self.greedy(vectors, query, best, layer);
            }
            let mut entries = vec![best];
            for layer in (0..=level.min(self.top_level)).rev() {
                let found = self.search_layer(vectors, query, &entries, EF_CONSTRUCTION, layer);
                neighbours[layer] = Self::select(vectors, &found, if layer == 0 { M0 } else { M });
                entries = found;
            }
        }
        Plan {
            slot,
            level,
            neighbours,
        }
    }

    /// Adds the planned node and its links both ways, trimming neighbours that overflow.
    pub fn apply(&mut self, vectors: Vectors, plan: Plan) {
        let Plan {
            slot,
            level,
            neighbours,
        } = plan;
        debug_assert_eq!(slot as usize, self.len);
        if self.base.len() == self.base.capacity() {
            // Grow by an eighth, not by doubling: links are most of the graph's memory.
            self.base.reserve_exact((self.len / 8).max(64) * (M0 + 1));
        }
        self.base.resize(self.base.len() + M0 + 1, 0);
        self.len += 1;
        for (layer, links) in neighbours.iter().enumerate() {
            self.set_links(slot, layer, links);
            let cap = if layer == 0 { M0 } else { M };
            for &neighbour in links {
                let mut theirs: Vec<u32> = self.links(neighbour, layer).to_vec();
                theirs.push(slot);
                if theirs.len() > cap {
                    let anchor = vectors.get(neighbour);
                    let mut scored: Vec<Scored> = theirs
                        .iter()
                        .map(|&other| Scored {
                            similarity: vectors.similarity(anchor, other),
                            slot: other,
                        })
                        .collect();
                    scored.sort_by(|a, b| b.cmp(a));
                    theirs = Self::select(vectors, &scored, cap);
                }
                self.set_links(neighbour, layer, &theirs);
            }
        }
        if self.entry.is_none() || level > self.top_level {
            self.entry = Some(slot);
            self.top_level = level;
        }
    }

    /// Bytes held by the links.
    #[cfg(test)]
    pub fn link_bytes(&self) -> usize {
        self.base.capacity() * 4
            + self
                .upper
                .values()
                .flat_map(|layers| layers.iter().map(|l| l.capacity() * 4 + 24))
                .sum::<usize>()
    }
}
