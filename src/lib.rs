//! switchyard: Port and Coder webhooks in, Slack Block Kit out, decided by YAML rules.
//!
//! The pipeline, one module per stage, data flowing one way (no module depends on one that
//! depends on it; `tests/architecture.rs` checks it):
//!
//! ```text
//! server (ingress) → sources (verify, decode) → ingest → routing (pure) → outbox (Store)
//!     → deliver → destinations → follow-ups (runs, Port expansions)
//! ```
//!
//! `config` turns a rules directory into an immutable [`config::Ruleset`], whose
//! [`routing::Router`] is all routing reads; `envelope` describes what each event type's
//! envelope holds (what `config` checks rules against, and what the docs are generated from); `job` is the protocol between routing, the outbox
//! and delivery; `check` and `simulate` are the offline commands, built on the same routing.
//! A new source is a file in `sources/` implementing [`sources::Source`]; a new destination a
//! file in `destinations/` implementing [`destinations::Destination`].

// Diagnostics are returned by value on cold paths (loading rules); boxing them buys nothing.
#![allow(clippy::result_large_err)]

pub mod acts;
pub mod buttons;
pub mod check;
pub mod config;
pub mod deliver;
pub mod destinations;
pub mod digest;
pub mod envelope;
pub mod event;
pub mod ingest;
pub mod job;
pub mod outbox;
pub mod port_api;
pub mod render;
pub mod routing;
pub mod runs;
pub mod server;
pub mod silence;
pub mod simulate;
pub mod sources;
pub mod upstream;
pub mod window;
