//! OpenAI wire formats: what the cache needs from requests, and streamed responses.

pub mod request;
pub mod sse;

pub use request::{CacheInput, ChatRequest, Invalid};
