//! Integration tests: one binary, so the crate and the model load once.

mod admin;
mod crash;
mod dashboard;
mod embedding;
mod eval;
mod fingerprint;
mod overload;
mod proxy;
mod quality;
mod secrets;
mod store;
mod support;
