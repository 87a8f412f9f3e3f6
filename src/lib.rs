//! switchyard: Port and Coder webhooks in, Slack Block Kit out, decided by YAML rules.
//!
//! The pipeline, one module per stage, data flowing one way:
//!
//! ```text
//! server (ingress) → sources (verify, decode) → routing (pure) → outbox → deliver → destinations
//! ```
//!
//! `config` turns a rules directory into an immutable [`config::Ruleset`]; `render` holds the
//! templates; `check` and `simulate` are the offline commands, built on the same code.

// Diagnostics are returned by value on cold paths (loading rules); boxing them buys nothing.
#![allow(clippy::result_large_err)]

pub mod check;
pub mod config;
pub mod deliver;
pub mod destinations;
pub mod event;
pub mod ingest;
pub mod job;
pub mod outbox;
pub mod port_api;
pub mod render;
pub mod routing;
pub mod runs;
pub mod server;
pub mod simulate;
pub mod sources;
pub mod upstream;
