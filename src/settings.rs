//! Settings that may change while the service runs. They are read per request through an
//! `ArcSwap`, so the hot path takes no lock.

use std::sync::Arc;

use arc_swap::ArcSwap;

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Cosine similarity at or above which a cached answer is served.
    pub threshold: f32,
}

pub type SharedSettings = Arc<ArcSwap<Settings>>;

pub fn shared(settings: Settings) -> SharedSettings {
    Arc::new(ArcSwap::from_pointee(settings))
}
