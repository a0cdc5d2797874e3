//! Durable entries: an embedded redb database in the data directory.
//!
//! Writes go through one writer thread ([`Writer`]) that commits whatever has queued up in a
//! single transaction (group commit), so many concurrent misses share one fsync. The on-disk
//! format is versioned in the `meta` table; a database written by another version is refused.

mod record;
pub mod redis;
mod scripts;
mod writer;

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

pub use record::{Record, RecordContext};

/// redb's page cache.
const STORE_CACHE_BYTES: usize = 32 << 20;

/// Every record in the store, with its embedding (if any) moved out into one array.
///
/// Decoded one by one, each embedding would otherwise stay a small allocation of its own until
/// the whole store is loaded; freed after that, those allocations leave the allocator's heap
/// full of holes and the process's resident memory high. One array is one allocation, handed
/// back to the system whole when loading is done.
pub struct Loaded {
    /// Each record (its `embedding` taken out) and where its vector is in `vectors`.
    pub records: Vec<(Record, Option<std::ops::Range<usize>>)>,
    pub vectors: Vec<f32>,
}

impl Loaded {
    /// Room for `total` records.
    pub fn with_capacity(total: usize) -> Self {
        Self {
            records: Vec::with_capacity(total),
            vectors: Vec::new(),
        }
    }

    /// Adds a record, moving its embedding into `vectors` (sized for `total` vectors at the
    /// first one).
    pub fn push(&mut self, mut record: Record, total: usize) {
        let vector = record.embedding.take().map(|embedding| {
            if self.vectors.capacity() == 0 {
                self.vectors.reserve_exact(total * embedding.len());
            }
            let start = self.vectors.len();
            self.vectors.extend_from_slice(&embedding);
            start..self.vectors.len()
        });
        self.records.push((record, vector));
    }
}

/// A progress callback, `(done, total)`, that logs a line every tenth of the way when there
/// are at least `least` items.
pub fn every_tenth(what: &'static str, items: &'static str, least: usize) -> impl FnMut(usize, usize) {
    let mut next_report = 0;
    move |done, total| {
        if total >= least && done >= next_report {
            tracing::info!("{what}: {done}/{total} {items}");
            next_report = done + total.div_ceil(10);
        }
    }
}
pub use writer::{Durability, Writer};

use crate::embed::EmbedderId;

/// The durable side of the cache: where entries are kept so that they outlive the process.
/// redb in the data directory ([`Writer`] in front of [`Store`]) keeps one node's entries;
/// [`redis::RedisStore`] is shared by several nodes. The cache holds the live entries in memory
/// and tells the store every change; the store loads them all back at start ([`Loaded`]).
pub trait EntryStore: Send + Sync {
    /// Saves a change; in strict durability, returns once it is durable.
    fn write(&self, op: Op) -> futures::future::BoxFuture<'_, Result<(), Error>>;
    /// Queues a change without waiting (usage counts, deletions).
    fn submit(&self, op: Op);
    /// Waits until everything queued so far is saved.
    fn flush(&self) -> futures::future::BoxFuture<'_, Result<(), Error>>;
    /// Saves everything queued and closes; later changes are not saved.
    fn close(&self) -> futures::future::BoxFuture<'_, Result<(), Error>>;
    /// Changes that could not be saved so far.
    fn failures(&self) -> u64;
    /// Why the store can no longer keep entries, if it cannot.
    fn lost(&self) -> Option<String>;
}

/// Version of the on-disk format this build reads and writes.
pub const FORMAT_VERSION: u64 = 2;
/// The oldest format this build reads; opening such a store marks it as the current one.
const OLDEST_FORMAT_READ: u64 = 1;

/// Whether a store or namespace of format `found` is read as it is and marked the current
/// format: an older one whose records this build still decodes.
pub fn upgrades_from(found: u64) -> bool {
    (OLDEST_FORMAT_READ..FORMAT_VERSION).contains(&found)
}
const FILE_NAME: &str = "semcache.redb";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Which embedder made the stored vectors: `model`, `backend`, `dimensions`, `weights`.
const EMBEDDER: TableDefinition<&str, &str> = TableDefinition::new("embedder");
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
/// Hit counts, last-hit times, feedback-raised thresholds (f32 bits) and wrong-answer reports,
/// apart from the entries so that updating them rewrites 32 bytes, not a whole record.
const USAGE: TableDefinition<u64, (u64, u64, u64, u64)> = TableDefinition::new("usage");
/// The judge's verdicts on an entry (postcard), apart from the entries like `USAGE`: a table
/// added without a new format version, since a store without it simply has no verdicts.
const VERDICTS: TableDefinition<u64, &[u8]> = TableDefinition::new("verdicts");

/// What changes about an entry after it is stored: its hit counts and feedback.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counts {
    pub hits: u64,
    pub last_hit_ms: u64,
    pub own_threshold: f32,
    pub wrong_reports: u64,
}

impl Counts {
    fn of(record: &Record) -> Self {
        Self {
            hits: record.hits,
            last_hit_ms: record.last_hit_ms,
            own_threshold: record.own_threshold,
            wrong_reports: record.wrong_reports,
        }
    }

    fn row(self) -> (u64, u64, u64, u64) {
        (
            self.hits,
            self.last_hit_ms,
            u64::from(self.own_threshold.to_bits()),
            self.wrong_reports,
        )
    }

    fn apply(row: (u64, u64, u64, u64), record: &mut Record) {
        record.hits = row.0;
        record.last_hit_ms = row.1;
        record.own_threshold = f32::from_bits(row.2 as u32);
        record.wrong_reports = row.3;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the store at {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error(
        "the store at {path} has format version {found}; this semcache reads version {FORMAT_VERSION}. \
         Use the semcache release that wrote it, or move the data directory away to start empty"
    )]
    Version { path: PathBuf, found: u64 },
    #[error("the store at {path} has entries but no format version; refusing to guess what wrote it")]
    Unversioned { path: PathBuf },
    #[error(
        "the store at {path} holds vectors made by {stored}; this semcache embeds with {current}, \
         and re-embedding its prompts failed: {message}. The store is unchanged: start with the \
         embedder that wrote it (--embedder, --model-dir), or move the data directory away to \
         start empty"
    )]
    OtherEmbedder {
        path: PathBuf,
        stored: Box<EmbedderId>,
        current: Box<EmbedderId>,
        message: String,
    },
    #[error("store: {0}")]
    Db(String),
    #[error("store record {id} cannot be decoded: {message}")]
    Decode { id: u64, message: String },
    #[error("the store writer has stopped")]
    WriterGone,
}

fn record_embedder(table: &mut redb::Table<&str, &str>, id: &EmbedderId) -> Result<(), Error> {
    let dimensions = id.dimensions.to_string();
    for (name, value) in [
        ("model", id.model.as_str()),
        ("backend", id.backend.as_str()),
        ("dimensions", dimensions.as_str()),
        ("weights", id.weights.as_str()),
    ] {
        table.insert(name, value).map_err(db_error)?;
    }
    Ok(())
}

fn db_error(err: impl std::fmt::Display) -> Error {
    Error::Db(err.to_string())
}

/// One change to the store.
#[derive(Debug, Clone)]
pub enum Op {
    Put(Box<Record>),
    Delete(u64),
    /// What changed about an entry since it was stored.
    Touch {
        id: u64,
        counts: Counts,
    },
    /// The judge's verdicts on an entry, as they are now.
    Judged {
        id: u64,
        verdicts: Box<crate::judge::Verdicts>,
    },
}

pub struct Store {
    db: Database,
    path: PathBuf,
    identity: FileIdentity,
}

/// Which file the store is: device and inode, as opened. A data directory removed or replaced
/// while semcache runs leaves redb writing to a file no path leads to, and every commit still
/// succeeds; comparing this with what the path names now is how that is noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(path)?;
        Ok(Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
        })
    }
}

/// Why the file at `path` is no longer the store opened as `identity`, if it is not.
pub fn moved_away(path: &Path, identity: FileIdentity) -> Option<String> {
    match FileIdentity::of(path) {
        Ok(now) if now == identity => None,
        Ok(_) => Some(format!(
            "the store file {} was replaced by another file while semcache ran",
            path.display()
        )),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Some(format!(
            "the store file {} was removed while semcache ran (was the data directory deleted?)",
            path.display()
        )),
        Err(err) => Some(format!(
            "the store file {} cannot be checked: {err}",
            path.display()
        )),
    }
}

impl Store {
    /// Opens (or creates) the store in `data_dir`, checking its format version.
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        let path = data_dir.join(FILE_NAME);
        let open_error = |message: String| Error::Open {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(data_dir).map_err(|err| open_error(err.to_string()))?;
        // The store is read whole once, at start, and then only written: redb's default 1 GiB
        // page cache would keep much of what start-up read, for nothing.
        let db = Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(&path)
            .map_err(|err| open_error(err.to_string()))?;
        let identity = FileIdentity::of(&path).map_err(|err| open_error(err.to_string()))?;
        let store = Self { db, path, identity };
        store.check_version()?;
        Ok(store)
    }

    fn check_version(&self) -> Result<(), Error> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut meta = txn.open_table(META).map_err(db_error)?;
            let entries = txn.open_table(ENTRIES).map_err(db_error)?;
            txn.open_table(USAGE).map_err(db_error)?;
            txn.open_table(VERDICTS).map_err(db_error)?;
            let found = meta.get("format_version").map_err(db_error)?.map(|v| v.value());
            match found {
                Some(FORMAT_VERSION) => {}
                Some(found) if upgrades_from(found) => {
                    // Its records read as they are; new ones are written in this format.
                    meta.insert("format_version", FORMAT_VERSION).map_err(db_error)?;
                }
                Some(found) => {
                    return Err(Error::Version {
                        path: self.path.clone(),
                        found,
                    })
                }
                None if entries.len().map_err(db_error)? > 0 => {
                    return Err(Error::Unversioned {
                        path: self.path.clone(),
                    })
                }
                None => {
                    meta.insert("format_version", FORMAT_VERSION).map_err(db_error)?;
                }
            }
        }
        txn.commit().map_err(db_error)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses a store whose vectors another embedder made; records `current` in a store that
    /// names none yet (a new one, or one written before embedders were recorded, when only
    /// one embedder existed).
    /// The embedder that made the store's vectors, when it is not `current` (whose vectors
    /// cannot be compared with them); a store without one records `current`.
    pub fn check_embedder(&self, current: &EmbedderId) -> Result<Option<EmbedderId>, Error> {
        let txn = self.db.begin_write().map_err(db_error)?;
        let other = {
            let mut table = txn.open_table(EMBEDDER).map_err(db_error)?;
            let field = |name: &str| -> Result<Option<String>, Error> {
                Ok(table.get(name).map_err(db_error)?.map(|v| v.value().to_owned()))
            };
            let stored = match (
                field("model")?,
                field("backend")?,
                field("dimensions")?,
                field("weights")?,
            ) {
                (Some(model), Some(backend), Some(dimensions), Some(weights)) => Some(EmbedderId {
                    model,
                    backend,
                    dimensions: dimensions.parse().unwrap_or(0),
                    weights,
                }),
                _ => None,
            };
            match stored {
                Some(stored) if stored.same_vectors(current) => None,
                Some(stored) => Some(stored),
                None => {
                    record_embedder(&mut table, current)?;
                    None
                }
            }
        };
        txn.commit().map_err(db_error)?;
        Ok(other)
    }

    /// Gives every stored prompt that has a vector a new one from `embed` (in passes of up to
    /// 32 prompts; `embed` checks each vector, as `embed::usable` does), and records `current` as the store's embedder, all in one transaction:
    /// interrupted, the store keeps its old vectors and embedder. Calls `progress(done, total)`
    /// after each pass; returns the number of prompts embedded.
    pub fn reembed(
        &self,
        stored: &EmbedderId,
        current: &EmbedderId,
        mut embed: impl FnMut(&[&str]) -> Result<Vec<Vec<f32>>, String>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<usize, Error> {
        let failed = |message: String| Error::OtherEmbedder {
            path: self.path.clone(),
            stored: Box::new(stored.clone()),
            current: Box::new(current.clone()),
            message,
        };
        let txn = self.db.begin_write().map_err(db_error)?;
        let mut done = 0;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(db_error)?;
            let mut records = Vec::new();
            for row in entries.iter().map_err(db_error)? {
                let (id, bytes) = row.map_err(db_error)?;
                let id = id.value();
                let record =
                    Record::decode(bytes.value()).map_err(|message| Error::Decode { id, message })?;
                if record.embedding.is_some() {
                    records.push(record);
                }
            }
            let total = records.len();
            for pass in records.chunks_mut(32) {
                let prompts: Vec<&str> = pass.iter().map(|record| record.prompt.as_str()).collect();
                let vectors = embed(&prompts).map_err(failed)?;
                if vectors.len() != pass.len() {
                    return Err(failed(format!(
                        "the embedder returned {} vectors for {} prompts",
                        vectors.len(),
                        pass.len()
                    )));
                }
                for (record, vector) in pass.iter_mut().zip(vectors) {
                    record.embedding = Some(vector);
                    entries
                        .insert(record.id, record.encode().as_slice())
                        .map_err(db_error)?;
                }
                done += pass.len();
                progress(done, total);
            }
            let mut table = txn.open_table(EMBEDDER).map_err(db_error)?;
            record_embedder(&mut table, current)?;
        }
        txn.commit().map_err(db_error)?;
        Ok(done)
    }

    pub fn identity(&self) -> FileIdentity {
        self.identity
    }

    /// Reads every record, calling `progress(done, total)` as it goes. Embeddings are moved
    /// into one array as they are read (see [`Loaded`]).
    pub fn load(&self, mut progress: impl FnMut(usize, usize)) -> Result<Loaded, Error> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let entries = txn.open_table(ENTRIES).map_err(db_error)?;
        let usage = txn.open_table(USAGE).map_err(db_error)?;
        let verdicts = txn.open_table(VERDICTS).map_err(db_error)?;
        let total = entries.len().map_err(db_error)? as usize;
        let mut loaded = Loaded::with_capacity(total);
        for (done, row) in entries.iter().map_err(db_error)?.enumerate() {
            let (id, bytes) = row.map_err(db_error)?;
            let id = id.value();
            let mut record =
                Record::decode(bytes.value()).map_err(|message| Error::Decode { id, message })?;
            if let Some(counts) = usage.get(id).map_err(db_error)? {
                Counts::apply(counts.value(), &mut record);
            }
            if let Some(bytes) = verdicts.get(id).map_err(db_error)? {
                // Verdicts that no longer read are only lost learning: the judge is asked again.
                record.verdicts = postcard::from_bytes(bytes.value()).unwrap_or_default();
            }
            loaded.push(record, total);
            progress(done + 1, total);
        }
        Ok(loaded)
    }

    /// Applies changes in one transaction, durable (fsynced) when this returns.
    pub fn apply(&self, ops: &[Op]) -> Result<(), Error> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(db_error)?;
            let mut usage = txn.open_table(USAGE).map_err(db_error)?;
            let mut verdicts = txn.open_table(VERDICTS).map_err(db_error)?;
            for op in ops {
                match op {
                    Op::Put(record) => {
                        entries
                            .insert(record.id, record.encode().as_slice())
                            .map_err(db_error)?;
                        usage
                            .insert(record.id, Counts::of(record).row())
                            .map_err(db_error)?;
                        if record.verdicts.is_empty() {
                            verdicts.remove(record.id).map_err(db_error)?;
                        } else {
                            let bytes =
                                postcard::to_stdvec(&record.verdicts).expect("verdicts always encode");
                            verdicts.insert(record.id, bytes.as_slice()).map_err(db_error)?;
                        }
                    }
                    Op::Delete(id) => {
                        entries.remove(id).map_err(db_error)?;
                        usage.remove(id).map_err(db_error)?;
                        verdicts.remove(id).map_err(db_error)?;
                    }
                    Op::Judged { id, verdicts: judged } => {
                        if entries.get(id).map_err(db_error)?.is_some() {
                            let bytes = postcard::to_stdvec(judged.as_ref()).expect("verdicts always encode");
                            verdicts.insert(id, bytes.as_slice()).map_err(db_error)?;
                        }
                    }
                    Op::Touch { id, counts: changed } => {
                        // A touch for an entry deleted in the meantime must not resurrect it.
                        if entries.get(id).map_err(db_error)?.is_some() {
                            usage.insert(id, changed.row()).map_err(db_error)?;
                        }
                    }
                }
            }
        }
        txn.commit().map_err(db_error)
    }

    /// Number of records on disk.
    pub fn len(&self) -> Result<usize, Error> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let entries = txn.open_table(ENTRIES).map_err(db_error)?;
        Ok(entries.len().map_err(db_error)? as usize)
    }

    pub fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("semcache-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn embedder(weights: &str) -> EmbedderId {
        EmbedderId {
            model: "all-MiniLM-L6-v2".into(),
            backend: "candle f32 mean-pooled".into(),
            dimensions: 384,
            weights: weights.into(),
        }
    }

    #[test]
    fn a_store_written_by_another_embedder_is_named_and_re_embedded() {
        let dir = temp_dir("embedder");
        {
            let store = Store::open(&dir).unwrap();
            assert_eq!(store.check_embedder(&embedder("aaaa")).unwrap(), None);
            let mut record = Record::sample(1);
            record.embedding = Some(vec![1.0, 0.0]);
            let mut exact_only = Record::sample(2);
            exact_only.embedding = None;
            store
                .apply(&[Op::Put(Box::new(record)), Op::Put(Box::new(exact_only))])
                .unwrap();
        }
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.check_embedder(&embedder("aaaa")).unwrap(), None);
        let mut renamed = embedder("aaaa");
        renamed.model = "minilm".into();
        assert_eq!(store.check_embedder(&renamed).unwrap(), None);
        let mut other_backend = embedder("aaaa");
        other_backend.backend = "onnxruntime int8 mean-pooled".into();
        assert_eq!(
            store.check_embedder(&other_backend).unwrap(),
            Some(embedder("aaaa"))
        );
        let (stored, mut current) = (embedder("aaaa"), embedder("bbbb"));
        assert_eq!(store.check_embedder(&current).unwrap(), Some(stored.clone()));

        // A failing embedder leaves everything as it was, and the message names both.
        let err = store
            .reembed(&stored, &current, |_| Err("out of memory".into()), |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("weights aaaa") && err.contains("weights bbbb") && err.contains("out of memory"),
            "{err}"
        );
        assert_eq!(store.check_embedder(&current).unwrap(), Some(stored.clone()));

        current.dimensions = 2;
        let mut progress = Vec::new();
        let embedded = store
            .reembed(
                &stored,
                &current,
                |texts| Ok(texts.iter().map(|_| vec![0.0, 1.0]).collect()),
                |done, total| progress.push((done, total)),
            )
            .unwrap();
        assert_eq!(
            (embedded, progress),
            (1, vec![(1, 1)]),
            "only prompts with a vector"
        );
        assert_eq!(store.check_embedder(&current).unwrap(), None);
        let loaded = store.load(|_, _| {}).unwrap();
        let vectors: Vec<_> = loaded
            .records
            .iter()
            .map(|(record, range)| (record.id, range.clone().map(|r| loaded.vectors[r].to_vec())))
            .collect();
        assert_eq!(vectors, vec![(1, Some(vec![0.0, 1.0])), (2, None)]);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_survive_reopening() {
        let dir = temp_dir("reopen");
        {
            let store = Store::open(&dir).unwrap();
            let ops = vec![
                Op::Put(Box::new(Record::sample(1))),
                Op::Put(Box::new(Record::sample(2))),
                Op::Delete(1),
                Op::Touch {
                    id: 2,
                    counts: Counts {
                        hits: 5,
                        last_hit_ms: 77,
                        own_threshold: 0.91,
                        wrong_reports: 1,
                    },
                },
                Op::Touch {
                    id: 1,
                    counts: Counts {
                        hits: 9,
                        last_hit_ms: 9,
                        own_threshold: 0.0,
                        wrong_reports: 0,
                    },
                },
            ];
            store.apply(&ops).unwrap();
        }
        let store = Store::open(&dir).unwrap();
        let loaded = store.load(|_, _| {}).unwrap();
        assert_eq!(loaded.records.len(), 1);
        let (mut record, vector) = loaded.records.into_iter().next().unwrap();
        record.embedding = vector.map(|range| loaded.vectors[range].to_vec());
        let mut expected = Record::sample(2);
        expected.hits = 5;
        expected.last_hit_ms = 77;
        expected.own_threshold = 0.91;
        expected.wrong_reports = 1;
        assert_eq!(record, expected);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_version_1_store_opens_and_its_records_read() {
        let dir = temp_dir("version-1");
        let record = Record::sample(3);
        {
            let store = Store::open(&dir).unwrap();
            let txn = store.db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("format_version", 1).unwrap();
            // Version 1 wrote the same fields without the context: this one's `None` is its
            // last byte.
            let mut v1 = record.encode();
            assert_eq!(v1.pop(), Some(0));
            txn.open_table(ENTRIES)
                .unwrap()
                .insert(record.id, v1.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(&dir).unwrap();
        let loaded = store.load(|_, _| {}).unwrap();
        let (mut read, vector) = loaded.records.into_iter().next().expect("the record");
        read.embedding = vector.map(|range| loaded.vectors[range].to_vec());
        assert_eq!(read, record);
        let txn = store.db.begin_read().unwrap();
        let version = txn
            .open_table(META)
            .unwrap()
            .get("format_version")
            .unwrap()
            .unwrap()
            .value();
        assert_eq!(version, FORMAT_VERSION);
        drop(txn);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_format_version_is_refused() {
        let dir = temp_dir("version");
        {
            let store = Store::open(&dir).unwrap();
            let txn = store.db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("format_version", 99)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = Store::open(&dir).err().expect("refused").to_string();
        assert!(err.contains("format version 99"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
