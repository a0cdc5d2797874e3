//! The vector index: one partition per (tenant, context fingerprint), so a search only ever
//! sees entries that are allowed to answer the request.
//!
//! Small partitions are searched exactly by brute force. Once a partition grows past
//! [`HNSW_FROM`] vectors, an HNSW graph (`graph.rs`) is built for it in the background and kept
//! up to date; searches then go through the graph, plus an exact scan of the newest vectors the
//! graph has not taken in yet. Each vector is held once, in the partition's flat array, which
//! the graph reads. Removals are tombstones that searches skip; a partition where they
//! outnumber live vectors is rebuilt.

mod graph;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rand::rngs::StdRng;
use rand::SeedableRng;

use graph::{Graph, Vectors};

/// Partitions up to this many vectors are searched exactly; larger ones get an HNSW graph.
pub const HNSW_FROM: usize = 2048;
/// Candidates a graph search keeps: recall@1 against speed.
const EF_SEARCH: usize = 64;

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
        self.insert_slice(partition, entry_id, &vector);
    }

    pub fn insert_slice(&self, partition: PartitionId, entry_id: u64, vector: &[f32]) {
        self.partition(partition).insert(entry_id, vector);
    }

    /// Makes room for `additional` more vectors in the partition, exactly (a growing array
    /// would otherwise double, leaving up to half of it unused).
    pub fn reserve(&self, partition: PartitionId, additional: usize) {
        self.partition(partition).reserve(additional);
    }

    fn partition(&self, partition: PartitionId) -> Arc<Partition> {
        if let Some(found) = self.partitions.read().get(&partition) {
            return Arc::clone(found);
        }
        let mut partitions = self.partitions.write();
        Arc::clone(
            partitions
                .entry(partition)
                .or_insert_with(|| Arc::new(Partition::default())),
        )
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
                let inner = partition.inner.read();
                (0..inner.entry_ids.len())
                    .filter(|slot| !inner.removed.contains(slot))
                    .filter(|slot| dot(query, inner.vector(*slot)) >= min_similarity)
                    .map(|slot| inner.entry_ids[slot])
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
                let inner = partition.inner.read();
                inner.removed.len() > 64 && inner.removed.len() > inner.entry_ids.len() / 2
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

    /// Live vectors in one partition.
    pub fn partition_len(&self, partition: &PartitionId) -> usize {
        self.partitions.read().get(partition).map_or(0, |p| p.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Partition {
    /// Serialises graph maintenance, and draws the levels of new graph nodes.
    building: Mutex<StdRng>,
    inner: RwLock<Inner>,
}

impl Default for Partition {
    fn default() -> Self {
        Self {
            building: Mutex::new(StdRng::seed_from_u64(0x5eed)),
            inner: RwLock::default(),
        }
    }
}

/// Every vector of a partition, by slot (a slot is also the vector's node in the graph), and
/// the graph over the first `graph.len()` slots.
#[derive(Default)]
struct Inner {
    dims: usize,
    entry_ids: Vec<u64>,
    /// The vectors, `dims` floats per slot.
    vectors: Vec<f32>,
    removed: HashSet<usize>,
    slot_of: HashMap<u64, usize>,
    graph: Option<Graph>,
    /// Vectors reserved for before the first one told their size.
    pending_reserve: usize,
}

impl Inner {
    fn vector(&self, slot: usize) -> &[f32] {
        &self.vectors[slot * self.dims..(slot + 1) * self.dims]
    }

    fn vectors(&self) -> Vectors<'_> {
        Vectors {
            flat: &self.vectors,
            dims: self.dims,
        }
    }
}

impl Partition {
    fn len(&self) -> usize {
        let inner = self.inner.read();
        inner.entry_ids.len() - inner.removed.len()
    }

    fn top(&self, query: &[f32], limit: usize) -> Vec<Nearest> {
        let inner = self.inner.read();
        if query.len() != inner.dims {
            return Vec::new();
        }
        let candidate = |slot: usize, similarity: f32| Nearest {
            entry_id: inner.entry_ids[slot],
            similarity,
        };
        let mut found: Vec<Nearest> = Vec::new();
        let graph_len = inner.graph.as_ref().map_or(0, Graph::len);
        if let Some(graph) = &inner.graph {
            // Extra candidates, so that tombstones cannot crowd out live ones.
            let ef = EF_SEARCH.max(limit + inner.removed.len().min(EF_SEARCH));
            found.extend(
                graph
                    .search(inner.vectors(), query, ef)
                    .into_iter()
                    .filter(|(slot, _)| !inner.removed.contains(slot))
                    .map(|(slot, similarity)| candidate(slot, similarity)),
            );
        }
        // The graph may lag behind the newest inserts: those are searched exactly.
        found.extend(
            (graph_len..inner.entry_ids.len())
                .filter(|slot| !inner.removed.contains(slot))
                .map(|slot| candidate(slot, dot(query, inner.vector(slot)))),
        );
        found.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
        found.truncate(limit);
        found
    }

    fn reserve(&self, additional: usize) {
        let mut inner = self.inner.write();
        inner.entry_ids.reserve_exact(additional);
        inner.slot_of.reserve(additional);
        if inner.dims > 0 {
            let floats = additional * inner.dims;
            inner.vectors.reserve_exact(floats);
        } else {
            inner.pending_reserve = additional;
        }
    }

    fn insert(&self, entry_id: u64, vector: &[f32]) {
        let mut inner = self.inner.write();
        if inner.entry_ids.is_empty() {
            inner.dims = vector.len();
            let floats = inner.pending_reserve * inner.dims;
            inner.vectors.reserve_exact(floats);
        }
        if vector.len() != inner.dims {
            tracing::error!(
                expected = inner.dims,
                got = vector.len(),
                "vector of the wrong size not indexed"
            );
            return;
        }
        let slot = inner.entry_ids.len();
        inner.entry_ids.push(entry_id);
        if inner.vectors.len() + vector.len() > inner.vectors.capacity() {
            // Grow by an eighth, not by doubling: the vectors are most of the cache's memory.
            let floats = (inner.entry_ids.len() / 8).max(64) * inner.dims;
            inner.vectors.reserve_exact(floats);
        }
        inner.vectors.extend_from_slice(vector);
        inner.slot_of.insert(entry_id, slot);
    }

    /// Adds to the graph every vector it does not hold yet, building it once the partition is
    /// large enough. Each node is planned under the read lock (the slow part) and linked under
    /// the write lock (the short part), so searches and inserts wait at most for one linking.
    fn catch_up(&self) {
        let mut rng = self.building.lock();
        {
            let mut inner = self.inner.write();
            if inner.graph.is_none() {
                if inner.entry_ids.len() < HNSW_FROM {
                    return;
                }
                inner.graph = Some(Graph::default());
            }
        }
        loop {
            let level = graph::random_level(&mut *rng);
            let plan = {
                let inner = self.inner.read();
                let Some(graph) = &inner.graph else { return };
                if graph.len() >= inner.entry_ids.len() {
                    return;
                }
                graph.plan(inner.vectors(), level)
            };
            let mut inner = self.inner.write();
            let Inner {
                vectors, dims, graph, ..
            } = &mut *inner;
            if let Some(graph) = graph {
                graph.apply(
                    Vectors {
                        flat: vectors,
                        dims: *dims,
                    },
                    plan,
                );
            }
        }
    }

    /// A copy holding only the live vectors, without a graph.
    fn compacted(&self) -> Partition {
        let inner = self.inner.read();
        let fresh = Partition::default();
        fresh.reserve(inner.entry_ids.len() - inner.removed.len());
        for slot in (0..inner.entry_ids.len()).filter(|slot| !inner.removed.contains(slot)) {
            fresh.insert(inner.entry_ids[slot], inner.vector(slot));
        }
        fresh
    }

    fn remove(&self, entry_id: u64) {
        let mut inner = self.inner.write();
        if let Some(slot) = inner.slot_of.remove(&entry_id) {
            inner.removed.insert(slot);
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
        assert_eq!(
            partition.inner.read().graph.as_ref().map(Graph::len),
            Some(vectors.len()),
            "a graph of every vector is built past HNSW_FROM"
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
        let inner = partitions[&p].inner.read();
        assert_eq!((inner.entry_ids.len(), inner.removed.len()), (50, 0));
        drop(inner);
        drop(partitions);
        assert_eq!(index.nearest(&p, &[0.0, 1.0]).map(|n| n.entry_id), Some(199));
        assert_eq!(index.within(&[1.0, 0.0], -1.0).len(), 50);
    }

    #[test]
    fn tombstones_in_the_graph_are_skipped_and_links_stay_small() {
        let mut rng = StdRng::seed_from_u64(9);
        let dims = 16;
        let index = Index::new();
        let p = PartitionId([4; 32]);
        let vectors: Vec<Vec<f32>> = (0..HNSW_FROM + 50).map(|_| unit(&mut rng, dims)).collect();
        for (id, v) in vectors.iter().enumerate() {
            index.insert(p, id as u64, v.clone());
        }
        index.catch_up(&p);
        for id in 0..100u64 {
            index.remove(&p, id);
            let found = index.nearest(&p, &vectors[id as usize]).unwrap();
            assert_ne!(found.entry_id, id, "a removed vector is never found");
        }
        let partition = index.partitions.read().get(&p).cloned().unwrap();
        let link_bytes = partition.inner.read().graph.as_ref().unwrap().link_bytes();
        assert!(
            link_bytes / vectors.len() <= 200,
            "{} bytes of links per node",
            link_bytes / vectors.len()
        );
    }
}
