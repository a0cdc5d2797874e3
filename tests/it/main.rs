//! Integration tests: one binary, so the crate and the model load once.

mod admin;
mod crash;
mod dashboard;
mod embedding;
mod eval;
mod proxy;
mod quality;
mod store;
mod support;
