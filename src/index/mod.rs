//! The vector index: one partition per (tenant, context fingerprint), so a search only ever
//! sees entries that are allowed to answer the request.
//!
//! Small partitions are searched exactly by brute force. Once a partition grows past
//! [`HNSW_FROM`] vectors, an HNSW graph (hnsw_rs) is built for it and kept up to date; searches
//! then go through the graph. hnsw_rs has no delete, so removals are tombstones that searches
//! skip.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use hnsw_rs::anndists::dist::Distance;
use hnsw_rs::hnsw::Hnsw;
use parking_lot::{Mutex, RwLock};

/// Partitions up to this many vectors are searched exactly; larger ones get an HNSW graph.
pub const HNSW_FROM: usize = 2048;
const HNSW_MAX_CONNECTIONS: usize = 16;
const HNSW_MAX_LAYERS: usize = 16;
const HNSW_EF_CONSTRUCTION: usize = 200;
const HNSW_EF_SEARCH: usize = 64;

/// Opaque key of a partition; the cache derives it from the tenant and the context fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartitionId(pub [u8; 32]);

/// The nearest live vector found by a search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nearest {
    pub entry_id: u64,
    pub similarity: f32,
}

/// Dot product, written so that the compiler vectorises it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut lanes = [0.0f32; 8];
    let chunks_a = a.chunks_exact(8);
    let chunks_b = b.chunks_exact(8);
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for lane in 0..8 {
            lanes[lane] += ca[lane] * cb[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Cosine distance for unit vectors. Unlike `DistDot`, it clamps rounding error instead of
/// asserting that the dot product stays at or below 1.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnitCosine;

impl Distance<f32> for UnitCosine {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        (1.0 - dot(va, vb)).max(0.0)
    }
}

#[derive(Default)]
pub struct Index {
    partitions: RwLock<HashMap<PartitionId, Arc<Partition>>>,
}

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    /// The `limit` most similar live vectors in the partition, most similar first.
    pub fn top(&self, partition: &PartitionId, query: &[f32], limit: usize) -> Vec<Nearest> {
        match self.partitions.read().get(partition).cloned() {
            Some(partition) => partition.top(query, limit),
            None => Vec::new(),
        }
    }

    /// The `limit` most similar live vectors across every partition, most similar first.
    pub fn nearest_anywhere(&self, query: &[f32], limit: usize) -> Vec<Nearest> {
        let partitions: Vec<_> = self.partitions.read().values().cloned().collect();
        let mut found: Vec<Nearest> = partitions
            .iter()
            .flat_map(|partition| partition.top(query, limit))
            .collect();
        found.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
        found.truncate(limit);
        found
    }

    /// Adds a vector. It is searchable at once (exactly, until [`Index::catch_up`] adds it to
    /// the partition's graph).
    pub fn insert(&self, partition: PartitionId, entry_id: u64, vector: Vec<f32>) {
        let partition = {
            let mut partitions = self.partitions.write();
            Arc::clone(
                partitions
                    .entry(partition)
                    .or_insert_with(|| Arc::new(Partition::default())),
            )
        };
        partition.insert(entry_id, vector);
    }

    /// Brings the partition's graph up to date (building it once the partition is large).
    /// Slow, about 1 ms a vector: call it off the request path.
    pub fn catch_up(&self, partition: &PartitionId) {
        let partition = self.partitions.read().get(partition).cloned();
        if let Some(partition) = partition {
            partition.catch_up();
        }
    }

    /// Brings every partition's graph up to date. Slow: call it off the request path.
    pub fn catch_up_all(&self) {
        let partitions: Vec<_> = self.partitions.read().values().cloned().collect();
        for partition in partitions {
            partition.catch_up();
        }
    }

    /// Ids of every live vector at least `min_similarity` similar to `query`, in any partition.
    /// An exact scan: for rare operator actions, not the request path.
    pub fn within(&self, query: &[f32], min_similarity: f32) -> Vec<u64> {
        let partitions: Vec<_> = self.partitions.read().values().cloned().collect();
        partitions
            .iter()
            .flat_map(|partition| {
                let flat = partition.flat.read();
                (0..flat.entry_ids.len())
                    .filter(|slot| !flat.removed.contains(slot))
                    .filter(|slot| dot(query, &flat.vectors[*slot]) >= min_similarity)
                    .map(|slot| flat.entry_ids[slot])
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Drops empty partitions and rebuilds those where tombstones outnumber live vectors, so
    /// that memory follows the live entries. The rebuilt graph is built again by a later
    /// catch-up; until then the partition is searched exactly.
    pub fn compact(&self) {
        let mut partitions = self.partitions.write();
        partitions.retain(|_, partition| partition.len() > 0);
        for partition in partitions.values_mut() {
            let needs_compaction = {
                let flat = partition.flat.read();
                flat.removed.len() > 64 && flat.removed.len() > flat.entry_ids.len() / 2
            };
            if needs_compaction {
                *partition = Arc::new(partition.compacted());
            }
        }
    }

    /// Marks a vector as removed; searches skip it from now on.
    pub fn remove(&self, partition: &PartitionId, entry_id: u64) {
        if let Some(partition) = self.partitions.read().get(partition) {
            partition.remove(entry_id);
        }
    }

    /// Number of live vectors.
    pub fn len(&self) -> usize {
        self.partitions.read().values().map(|p| p.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Default)]
struct Partition {
    /// Serialises graph maintenance, so that the graph holds exactly the slots below its length.
    graph_lock: Mutex<()>,
    flat: RwLock<Flat>,
    graph: RwLock<Option<Arc<Hnsw<'static, f32, UnitCosine>>>>,
}

/// Every vector of a partition, by slot; a slot is the vector's id inside the graph.
#[derive(Default)]
struct Flat {
    entry_ids: Vec<u64>,
    vectors: Vec<Vec<f32>>,
    removed: HashSet<usize>,
    slot_of: HashMap<u64, usize>,
}

impl Partition {
    fn len(&self) -> usize {
        let flat = self.flat.read();
        flat.entry_ids.len() - flat.removed.len()
    }

    fn top(&self, query: &[f32], limit: usize) -> Vec<Nearest> {
        let graph = self.graph.read().clone();
        let flat = self.flat.read();
        let candidate = |slot: usize| Nearest {
            entry_id: flat.entry_ids[slot],
            similarity: dot(query, &flat.vectors[slot]),
        };
        let mut found: Vec<Nearest> = Vec::new();
        // The graph may lag behind the newest inserts: those are searched exactly.
        let graph_len = match graph {
            Some(graph) => {
                let graph_len = graph.get_nb_point();
                // Ask for extra neighbours so that tombstones cannot crowd out live ones.
                let wanted = (limit + flat.removed.len()).min(graph_len);
                found.extend(
                    graph
                        .search(query, wanted, HNSW_EF_SEARCH.max(wanted))
                        .into_iter()
                        .filter(|n| !flat.removed.contains(&n.d_id))
                        .map(|n| candidate(n.d_id)),
                );
                graph_len
            }
            None => 0,
        };
        found.extend(
            (graph_len..flat.entry_ids.len())
                .filter(|slot| !flat.removed.contains(slot))
                .map(candidate),
        );
        found.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
        found.truncate(limit);
        found
    }

    fn insert(&self, entry_id: u64, vector: Vec<f32>) {
        let mut flat = self.flat.write();
        let slot = flat.entry_ids.len();
        flat.entry_ids.push(entry_id);
        flat.vectors.push(vector);
        flat.slot_of.insert(entry_id, slot);
    }

    /// Adds to the graph every vector it does not hold yet, building it once the partition is
    /// large enough.
    fn catch_up(&self) {
        let _serial = self.graph_lock.lock();
        let graph = self.graph.read().clone();
        match graph {
            Some(graph) => {
                let from = graph.get_nb_point();
                let flat = self.flat.read();
                // Copies, so that request-path inserts into `flat` are not held up by the graph.
                let points: Vec<(Vec<f32>, usize)> = (from..flat.vectors.len())
                    .map(|slot| (flat.vectors[slot].clone(), slot))
                    .collect();
                drop(flat);
                for (vector, slot) in &points {
                    graph.insert((vector, *slot));
                }
            }
            None => {
                let flat = self.flat.read();
                if flat.vectors.len() < HNSW_FROM {
                    return;
                }
                let graph = Hnsw::new(
                    HNSW_MAX_CONNECTIONS,
                    flat.vectors.len() * 2,
                    HNSW_MAX_LAYERS,
                    HNSW_EF_CONSTRUCTION,
                    UnitCosine,
                );
                let points: Vec<(&Vec<f32>, usize)> = flat.vectors.iter().zip(0..).collect();
                graph.parallel_insert(&points);
                drop(flat);
                *self.graph.write() = Some(Arc::new(graph));
            }
        }
    }

    /// A copy holding only the live vectors, without a graph.
    fn compacted(&self) -> Partition {
        let flat = self.flat.read();
        let fresh = Partition::default();
        for slot in (0..flat.entry_ids.len()).filter(|slot| !flat.removed.contains(slot)) {
            fresh.insert(flat.entry_ids[slot], flat.vectors[slot].clone());
        }
        fresh
    }

    fn remove(&self, entry_id: u64) {
        let mut flat = self.flat.write();
        if let Some(slot) = flat.slot_of.remove(&entry_id) {
            flat.removed.insert(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    impl Index {
        fn nearest(&self, partition: &PartitionId, query: &[f32]) -> Option<Nearest> {
            self.top(partition, query, 1).into_iter().next()
        }
    }

    fn unit(rng: &mut StdRng, dims: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dims).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let norm = dot(&v, &v).sqrt();
        v.into_iter().map(|x| x / norm).collect()
    }

    #[test]
    fn partitions_never_see_each_other() {
        let index = Index::new();
        let (a, b) = (PartitionId([1; 32]), PartitionId([2; 32]));
        let v = vec![1.0, 0.0, 0.0, 0.0];
        index.insert(a, 7, v.clone());
        assert_eq!(index.nearest(&a, &v).map(|n| n.entry_id), Some(7));
        assert_eq!(index.nearest(&b, &v), None);
    }

    #[test]
    fn removed_vectors_are_not_found() {
        let index = Index::new();
        let p = PartitionId([1; 32]);
        index.insert(p, 1, vec![1.0, 0.0]);
        index.insert(p, 2, vec![0.0, 1.0]);
        index.remove(&p, 1);
        assert_eq!(index.nearest(&p, &[1.0, 0.0]).map(|n| n.entry_id), Some(2));
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn graph_search_agrees_with_brute_force() {
        let mut rng = StdRng::seed_from_u64(7);
        let dims = 32;
        let index = Index::new();
        let p = PartitionId([3; 32]);
        let vectors: Vec<Vec<f32>> = (0..HNSW_FROM + 200).map(|_| unit(&mut rng, dims)).collect();
        for (id, v) in vectors.iter().enumerate() {
            index.insert(p, id as u64, v.clone());
        }
        index.catch_up(&p);
        let partition = index.partitions.read().get(&p).cloned().unwrap();
        assert!(
            partition.graph.read().is_some(),
            "a graph is built past HNSW_FROM"
        );
        let mut agree = 0;
        for _ in 0..100 {
            let q = unit(&mut rng, dims);
            let exact = vectors
                .iter()
                .enumerate()
                .max_by(|a, b| dot(&q, a.1).total_cmp(&dot(&q, b.1)))
                .map(|(id, _)| id as u64);
            if index.nearest(&p, &q).map(|n| n.entry_id) == exact {
                agree += 1;
            }
        }
        assert!(agree >= 95, "recall@1 {agree}/100");
    }

    #[test]
    fn compaction_drops_tombstones_and_empty_partitions() {
        let index = Index::new();
        let (p, q) = (PartitionId([1; 32]), PartitionId([2; 32]));
        for id in 0..200u64 {
            index.insert(p, id, vec![1.0, id as f32]);
        }
        index.insert(q, 1000, vec![1.0, 0.0]);
        for id in 0..150u64 {
            index.remove(&p, id);
        }
        index.remove(&q, 1000);
        index.compact();
        let partitions = index.partitions.read();
        assert_eq!(partitions.len(), 1, "the empty partition is gone");
        let flat = partitions[&p].flat.read();
        assert_eq!((flat.entry_ids.len(), flat.removed.len()), (50, 0));
        drop(flat);
        drop(partitions);
        assert_eq!(index.nearest(&p, &[0.0, 1.0]).map(|n| n.entry_id), Some(199));
        assert_eq!(index.within(&[1.0, 0.0], -1.0).len(), 50);
    }

    #[test]
    fn unit_cosine_never_goes_negative() {
        let v = [0.6f32, 0.8000001];
        assert!(UnitCosine.eval(&v, &v) >= 0.0);
    }
}
