//! Integration tests: one binary, so the crate and the model load once.

mod admin;
mod cluster;
mod completions;
mod conversations;
mod crash;
mod dashboard;
mod embedding;
mod embeddings_api;
mod eval;
mod faults;
mod fingerprint;
mod fuzz_corpus;
mod hardening;
mod judge;
mod overload;
mod proxy;
mod quality;
mod responses;
mod sdk;
mod secrets;
mod shutdown;
mod store;
mod support;
