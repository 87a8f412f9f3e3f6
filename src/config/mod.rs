//! The rules directory: reading files, `${VAR}` expansion, validation with positions, and
//! compilation into an immutable [`Ruleset`].
//!
//! [`load_dir`] never panics and never stops at the first problem it can survive: it collects
//! every diagnostic it can (per file, per rule) so `check` shows them all at once. A ruleset is
//! returned only when there is no error.

mod acts;
pub mod blueprints;
mod destinations;
pub mod diag;
pub mod env;
mod kafka;
mod load;
mod parsed;
mod rule_tests;
mod rules;
mod schedules;
pub mod secret;
mod shapes;
mod sources;
pub mod spec;
pub mod yaml;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use load::load_dir;
pub use parsed::{read_bounded, EnvLookup, LoadOptions, Mode};

use crate::render::Templates;
use crate::routing::{Output, Router, Rule};
use crate::sources::Source;
use secret::Secret;
use yaml::Pos;

/// Everything loaded from a rules directory, compiled and validated: the [`Router`] that
/// routing reads, and what the rest of the engine runs (sources, destinations, schedules) or
/// `check` runs (rule tests). Immutable: a reload builds a new one and swaps it in whole.
///
/// It dereferences to its router, so `rs.rules` and `route(&rs, &ev)` read as before.
#[derive(Debug)]
pub struct Ruleset {
    pub router: Router,
    pub sources: BTreeMap<String, SourceEntry>,
    pub destinations: BTreeMap<String, DestinationConfig>,
    pub tests: Vec<RuleTest>,
    pub files: Vec<LoadedFile>,
    /// Schedules by name.
    pub schedules: BTreeMap<String, Schedule>,
    /// Port blueprints from `blueprints/*.json` (for `check`; empty when there are none).
    pub blueprints: BTreeMap<String, blueprints::Blueprint>,
    /// Some rule or destination has a time window (the ingest stage skips them all otherwise).
    pub any_window: bool,
    /// Scenario tests (`check` only).
    pub scenarios: Vec<Scenario>,
}

/// A scenario test: steps against one simulated state.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub file: PathBuf,
    pub pos: Pos,
    pub steps: Vec<ScenarioStep>,
}

/// One step: an event (as a rule test, whose `expect` may say what each dispatch `does`), or
/// the clock moving on.
#[derive(Debug, Clone)]
pub enum ScenarioStep {
    Event(RuleTest),
    Advance {
        by: Duration,
        expect: Vec<spec::Expectation>,
        pos: Pos,
    },
}

impl Ruleset {
    /// Assembles a ruleset; the router gets each destination's [`Output`].
    pub fn new(
        rules: Vec<Rule>,
        sources: BTreeMap<String, SourceEntry>,
        destinations: BTreeMap<String, DestinationConfig>,
        templates: Templates,
        tests: Vec<RuleTest>,
        files: Vec<LoadedFile>,
    ) -> Self {
        let outputs = destinations
            .iter()
            .map(|(n, d)| (n.clone(), d.output()))
            .collect();
        let any_window = rules.iter().any(|r| r.window.is_some())
            || destinations.values().any(|d| d.window.is_some());
        Ruleset {
            any_window,
            router: Router::new(rules, Arc::new(templates), outputs),
            sources,
            destinations,
            tests,
            files,
            schedules: BTreeMap::new(),
            blueprints: BTreeMap::new(),
            scenarios: Vec::new(),
        }
    }
}

impl std::ops::Deref for Ruleset {
    type Target = Router;
    fn deref(&self) -> &Router {
        &self.router
    }
}

/// A rules file as read, kept for rendering diagnostics.
#[derive(Debug, Clone)]
pub struct LoadedFile {
    pub path: PathBuf,
    pub text: Arc<str>,
}

/// What a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Port webhooks (automations, self-service actions).
    Port,
    /// Port's Kafka topics.
    PortKafka,
    /// Coder notifications.
    Coder,
    /// Slack interactivity (button clicks).
    Slack,
}

impl SourceKind {
    /// The kind as rules files spell it.
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Port => "port",
            SourceKind::PortKafka => "port_kafka",
            SourceKind::Coder => "coder",
            SourceKind::Slack => "slack",
        }
    }
}

/// `kind == "coder"`: compares with the spelling in rules files.
impl PartialEq<&str> for SourceKind {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A configured source.
#[derive(Debug, Clone)]
pub struct SourceEntry {
    pub name: String,
    pub kind: SourceKind,
    /// The verifier and decoder.
    pub source: Arc<dyn Source>,
    /// Set when the source cannot accept requests (its secret is unset); the reason names the
    /// variable, never a value.
    pub disabled: Option<String>,
    /// Largest accepted body in bytes.
    pub max_body: usize,
    /// Dedup window for sources that need one (Coder `msg_id`).
    pub dedup_window: Duration,
    /// The `port` destination that reports runs received here.
    pub report_to: Option<String>,
    /// Report runs no rule handles as FAILURE.
    pub report_unmatched: bool,
    /// For `port_kafka` sources: the consumer settings (the source takes no HTTP requests).
    pub kafka: Option<KafkaSource>,
    pub file: PathBuf,
}

/// What a destination is.
#[derive(Debug, Clone, PartialEq)]
pub enum DestinationKind {
    SlackWebhook {
        url: Secret,
    },
    Slack {
        token: Secret,
        api_url: String,
    },
    Webhook {
        url: Secret,
        method: String,
        /// Header name and the name of its (plain) template.
        headers: Vec<(String, String)>,
        /// Body template name; `None` sends the rendered message.
        template: Option<String>,
    },
    Stdout,
    Port {
        client_id: Secret,
        client_secret: Secret,
        base_url: String,
    },
    Kafka {
        conn: KafkaConn,
        topic: String,
        /// (Plain) template name of the record key.
        key: Option<String>,
    },
}

/// How to reach a Kafka cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaConn {
    pub brokers: Vec<String>,
    pub security_protocol: String,
    pub sasl_mechanism: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ssl_ca_location: Option<String>,
}

impl KafkaConn {
    /// librdkafka settings for this connection.
    #[cfg(feature = "kafka")]
    pub fn client_config(&self) -> rdkafka::config::ClientConfig {
        let conn = self;
        let mut c = rdkafka::config::ClientConfig::new();
        c.set("bootstrap.servers", conn.brokers.join(","))
            .set("security.protocol", &conn.security_protocol)
            .set(
                "client.id",
                concat!("switchyard/", env!("CARGO_PKG_VERSION")),
            );
        if conn.security_protocol.starts_with("SASL") {
            c.set("sasl.mechanisms", &conn.sasl_mechanism);
            if let Some(u) = &conn.username {
                c.set("sasl.username", u);
            }
            if let Some(p) = &conn.password {
                c.set("sasl.password", p.expose());
            }
        }
        if let Some(ca) = &conn.ssl_ca_location {
            c.set("ssl.ca.location", ca);
        }
        c
    }
}

/// Which Port topic a Kafka topic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortTopic {
    Runs,
    ChangeLog,
}

/// A Port Kafka source's consumer settings.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaSource {
    pub conn: KafkaConn,
    pub group: String,
    pub topics: Vec<(String, PortTopic)>,
    pub start_from: String,
    /// Static group membership id, when set.
    pub instance_id: Option<String>,
    /// `session.timeout.ms`.
    pub session_timeout: Duration,
    /// A `port` destination whose credentials fetch brokers, username and password from Port.
    pub credentials_from: Option<String>,
}

impl DestinationKind {
    /// The kind as written in rules files.
    pub fn name(&self) -> &'static str {
        match self {
            DestinationKind::SlackWebhook { .. } => "slack_webhook",
            DestinationKind::Slack { .. } => "slack",
            DestinationKind::Webhook { .. } => "webhook",
            DestinationKind::Stdout => "stdout",
            DestinationKind::Port { .. } => "port",
            DestinationKind::Kafka { .. } => "kafka",
        }
    }
}

/// A configured destination with its delivery settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationConfig {
    pub name: String,
    pub kind: DestinationKind,
    pub fallback: Option<String>,
    /// True when variables this destination needs are unset and `fallback` delivers instead.
    pub use_fallback: bool,
    /// Set when variables it needs are unset and there is no fallback (`serve` only): its
    /// messages become dead letters with this reason until a reload configures it.
    pub disabled: Option<String>,
    pub timeout: Duration,
    pub max_attempts: u32,
    /// Messages per second; `None` is unlimited.
    pub rate_per_second: Option<f64>,
    pub concurrency: u32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub max_age: Duration,
    /// When it may send.
    pub window: Option<crate::window::Window>,
    pub file: PathBuf,
}

impl DestinationConfig {
    /// What routing needs to know of this destination.
    pub fn output(&self) -> Output {
        Output {
            delivers_as: if self.use_fallback {
                self.fallback.clone()
            } else {
                None
            },
            direct_messages: matches!(self.kind, DestinationKind::Slack { .. }),
            key: match &self.kind {
                DestinationKind::Kafka { key, .. } => key.clone(),
                _ => None,
            },
            body: match &self.kind {
                DestinationKind::Webhook { template, .. } => template.clone(),
                _ => None,
            },
        }
    }
}

/// A compiled schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    pub cron: croner::Cron,
    pub pattern: String,
    pub tz: chrono_tz::Tz,
}

impl Schedule {
    /// The first tick strictly after `t`.
    pub fn next_after(
        &self,
        t: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|d| d.with_timezone(&chrono::Utc))
    }

    /// The event of the tick at `tick`: what the engine routes when the schedule fires, and
    /// what `simulate --schedule` and rule tests with `event: {schedule}` route.
    pub fn tick_event(&self, tick: chrono::DateTime<chrono::Utc>) -> crate::event::Event {
        let local = tick.with_timezone(&self.tz);
        let id = format!("schedule:{}:{}", self.name, tick.to_rfc3339());
        let data = serde_json::json!({
            "schedule": {"name": self.name, "cron": self.pattern, "timezone": self.tz.name()},
            "tick": local.to_rfc3339(),
            "tick_utc": tick.to_rfc3339(),
        });
        crate::event::Event::new(
            "schedule",
            &format!("schedule/{}", self.name),
            id,
            data,
            false,
        )
    }
}

/// Parses an RFC 3339 time (`2026-01-05T09:00:00Z`).
pub fn parse_time(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

impl PartialEq for Schedule {
    fn eq(&self, o: &Self) -> bool {
        self.name == o.name && self.pattern == o.pattern && self.tz == o.tz
    }
}

/// A rule test, with its event body already read.
#[derive(Debug, Clone)]
pub struct RuleTest {
    pub name: String,
    pub file: PathBuf,
    pub pos: Pos,
    pub input: TestInput,
    /// `with:` stand-ins by query name (lists of entities).
    pub with: serde_json::Map<String, serde_json::Value>,
    pub expect: Vec<spec::Expectation>,
    /// Position of each expectation (for diagnostics).
    pub expect_pos: Vec<Pos>,
}

/// What a rule test feeds the engine.
#[derive(Debug, Clone)]
pub enum TestInput {
    /// A raw request to a source.
    Webhook {
        source: String,
        body: Vec<u8>,
        headers: std::collections::BTreeMap<String, String>,
    },
    /// A schedule's tick at a time.
    Tick {
        schedule: String,
        at: chrono::DateTime<chrono::Utc>,
    },
}

/// Parses `1MiB`, `512KiB`, `100000` (bytes).
pub fn parse_size(s: &str) -> Option<usize> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Parses `10s`, `5m`, `24h`, `500ms`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    humantime::parse_duration(s.trim()).ok()
}
