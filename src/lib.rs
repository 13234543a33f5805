//! chatd's engine as a library: the daemon (`src/main.rs`), the C ABI (`ffi`, built as
//! libchat.so / libchat.a) and the tests all drive the same [`engine::Engine`], set up by
//! [`service::Service`].
//!
//! A request travels one way: `api` parses and validates it and renders the prompt with `text`,
//! `engine` schedules it and runs `model` step by step, `sampling` picks each token, `text`
//! turns tokens back into text, and `api` shapes the events into OpenAI responses for `server`.

pub mod api;
pub mod config;
pub mod constraint;
pub mod daemon;
pub mod engine;
pub mod ffi;
pub mod memory;
pub mod model;
pub mod sampling;
pub mod server;
pub mod service;
pub mod text;
