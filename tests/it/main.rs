//! Integration tests: one binary, so the crate and the model load once.

mod admin;
mod embedding;
mod proxy;
mod support;
