//! OpenAI wire formats (chat completions, legacy completions, embeddings, responses): what the cache needs
//! from requests, and streamed responses.

mod chat;
mod completions;
pub mod embeddings;
pub mod request;
pub mod responses;
pub mod sse;

pub use crate::cache::{CacheInput, Invalid};
pub use chat::ChatCompletions;
pub use completions::{CompletionRequest, Completions};
pub use request::ChatRequest;
pub use responses::{Responses, ResponsesRequest};
