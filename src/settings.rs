//! Settings that may change while the service runs. They are read per request through an
//! `ArcSwap`, so the hot path takes no lock. Changes made through the admin API are written to
//! the data directory and win over the command line at the next start.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::ContextMode;

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Cosine similarity at or above which a cached answer is served.
    pub threshold: f32,
    /// Whether semantic hits must pass the hit verifier.
    pub verify: bool,
    /// How a conversation's earlier turns are compared.
    pub context: ContextMode,
    /// The similarity a conversation's compared text needs in the semantic context mode (see
    /// [`crate::config::DEFAULT_CONTEXT_THRESHOLD`]).
    pub context_threshold: f32,
}

pub type SharedSettings = Arc<ArcSwap<Settings>>;

pub fn shared(settings: Settings) -> SharedSettings {
    Arc::new(ArcSwap::from_pointee(settings))
}

/// On-disk form of the settings, versioned.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsFile {
    version: u32,
    threshold: f32,
    #[serde(default = "default_verify")]
    verify: bool,
    /// Absent in files written before the mode existed, when every context was exact.
    #[serde(default)]
    context: ContextMode,
    /// Absent in files written before conversations had a threshold of their own.
    #[serde(default = "default_context_threshold")]
    context_threshold: f32,
}

fn default_context_threshold() -> f32 {
    crate::config::DEFAULT_CONTEXT_THRESHOLD
}

impl SettingsFile {
    fn of(settings: &Settings) -> Self {
        SettingsFile {
            version: FILE_VERSION,
            threshold: settings.threshold,
            verify: settings.verify,
            context: settings.context,
            context_threshold: settings.context_threshold,
        }
    }

    /// The settings, or what is wrong with them.
    fn settings(&self) -> Result<Settings, String> {
        for (name, value) in [
            ("threshold", self.threshold),
            ("context_threshold", self.context_threshold),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(format!("{name} {value} is outside [0, 1]"));
            }
        }
        Ok(Settings {
            threshold: self.threshold,
            verify: self.verify,
            context: self.context,
            context_threshold: self.context_threshold,
        })
    }
}

fn default_verify() -> bool {
    true
}

const FILE_VERSION: u32 = 1;
const FILE_NAME: &str = "settings.json";

/// The settings as the shared store keeps them (the same versioned form as the file).
pub fn to_json(settings: &Settings) -> String {
    serde_json::to_string(&SettingsFile::of(settings)).expect("settings serialise")
}

/// Settings kept by [`to_json`]; `None` for anything this build cannot read.
pub fn from_json(json: &str) -> Option<Settings> {
    let file: SettingsFile = serde_json::from_str(json).ok()?;
    (file.version == FILE_VERSION)
        .then(|| file.settings().ok())
        .flatten()
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    #[error("saving the settings in the shared store: {0}")]
    Shared(String),
}

/// Where settings changed at run time are kept: the data directory, or the store shared by
/// several nodes (every node applies a change from its log, and reads them at start).
#[derive(Clone)]
pub struct SettingsStore {
    path: PathBuf,
    shared: Option<Arc<crate::store::redis::RedisStore>>,
}

impl SettingsStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            path: data_dir.join(FILE_NAME),
            shared: None,
        }
    }

    pub fn shared(store: Arc<crate::store::redis::RedisStore>) -> Self {
        Self {
            path: PathBuf::new(),
            shared: Some(store),
        }
    }

    /// Keeps the settings where they outlive the process, for every node when shared.
    pub async fn keep(&self, settings: &Settings) -> Result<(), Error> {
        match &self.shared {
            Some(store) => store
                .save_settings(settings)
                .await
                .map_err(|err| Error::Shared(err.to_string())),
            None => self.save(settings),
        }
    }

    /// The saved settings, if any were saved (those of a shared store come with its load).
    pub fn load(&self) -> Result<Option<Settings>, Error> {
        if self.shared.is_some() {
            return Ok(None);
        }
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let format_error = |message: String| Error::Format {
            path: self.path.clone(),
            message,
        };
        let file: SettingsFile =
            serde_json::from_slice(&bytes).map_err(|err| format_error(err.to_string()))?;
        if file.version != FILE_VERSION {
            return Err(format_error(format!(
                "written by settings format version {}, this semcache reads version {FILE_VERSION}",
                file.version
            )));
        }
        file.settings().map(Some).map_err(format_error)
    }

    /// Writes the settings atomically: a crash leaves the old file or the new one, never half.
    pub fn save(&self, settings: &Settings) -> Result<(), Error> {
        let io_error = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_error)?;
        let bytes = serde_json::to_vec_pretty(&SettingsFile::of(settings)).expect("settings serialise");
        let temp = self.path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temp).map_err(io_error)?;
        file.write_all(&bytes).map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        std::fs::rename(&temp, &self.path).map_err(io_error)?;
        if let Ok(dir) = std::fs::File::open(dir) {
            // Makes the rename itself durable; not every platform supports it, hence no error.
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_settings_load_back_and_bad_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("semcache-settings-{}", std::process::id()));
        let store = SettingsStore::new(&dir);
        assert_eq!(store.load().unwrap(), None);
        store
            .save(&Settings {
                threshold: 0.9,
                verify: false,
                context: ContextMode::Semantic,
                context_threshold: 0.75,
            })
            .unwrap();
        assert_eq!(
            store.load().unwrap(),
            Some(Settings {
                threshold: 0.9,
                verify: false,
                context: ContextMode::Semantic,
                context_threshold: 0.75,
            })
        );
        // A file from before conversations had their own threshold takes the default.
        std::fs::write(dir.join(FILE_NAME), r#"{"version": 1, "threshold": 0.9}"#).unwrap();
        assert_eq!(
            store.load().unwrap().unwrap().context_threshold,
            crate::config::DEFAULT_CONTEXT_THRESHOLD
        );
        std::fs::write(
            dir.join(FILE_NAME),
            r#"{"version": 1, "threshold": 0.9, "context_threshold": 1.5}"#,
        )
        .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("context_threshold 1.5"), "{err}");
        std::fs::write(dir.join(FILE_NAME), r#"{"version": 99, "threshold": 0.9}"#).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("version 99"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
