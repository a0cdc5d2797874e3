//! OpenAI wire formats: what the cache needs from requests, and streamed responses.

mod chat;
pub mod request;
pub mod sse;

pub use crate::cache::{CacheInput, Invalid};
pub use chat::ChatCompletions;
pub use request::ChatRequest;
