//! The rules-file format as Rust types: what the loader deserializes and what
//! `switchyard schema` turns into JSON Schema. These types are the *user-facing contract*;
//! everything here is plain data, compiled into a [`crate::config::Ruleset`] by the loader.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One rules file. Every file in a rules directory has this shape; the loader merges them.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "switchyard rules file")]
pub struct RulesFile {
    /// Named inputs. Each is served at `POST /hooks/<name>`.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceSpec>,
    /// Named outputs that rules send to.
    #[serde(default)]
    pub destinations: BTreeMap<String, DestinationSpec>,
    /// Rules, evaluated in file order (files in name order).
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// Rule tests run by `switchyard check`.
    #[serde(default)]
    pub tests: Vec<TestSpec>,
    /// Named schedules; each emits `schedule/<name>` events on its cron.
    #[serde(default)]
    pub schedules: BTreeMap<String, ScheduleSpec>,
    /// Rule tests of a sequence: events and clock steps, each with what it must do to keyed
    /// messages and digests.
    #[serde(default)]
    pub scenarios: Vec<ScenarioSpec>,
}

/// A scenario: steps run in order against one simulated state (open message keys, pending
/// digest groups, a clock).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScenarioSpec {
    /// What it shows.
    pub name: String,
    pub steps: Vec<StepSpec>,
}

/// One step of a scenario: an event, or the clock moving on (`advance: 30s`, which sends the
/// digests that are due).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<TestEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advance: Option<String>,
    /// Every dispatch this step makes, in any order; `[]` means none.
    pub expect: Vec<Expectation>,
    /// `with:` stand-ins, as in a test.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub with: BTreeMap<String, WithResult>,
}

/// What a dispatch does, as a scenario sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Does {
    /// A new message.
    Post,
    /// The key's message replaced.
    Update,
    /// A reply in the key's message's thread.
    Reply,
    /// The key's message replaced and the key closed.
    Resolve,
    /// Held in its group for a digest.
    Group,
}

/// A schedule: a cron pattern in a time zone.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Cron pattern: 5 fields (`0 9 * * MON`), or 6 with seconds first (`*/10 * * * * *`).
    pub cron: String,
    /// IANA time zone, e.g. `Europe/Berlin` (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// A string, or a list of strings.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// A source: exactly one of the kinds below.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Port webhooks (automations, legacy changelog destinations, action runs), HMAC-signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSourceSpec>,
    /// Coder notification webhooks, protected by a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coder: Option<CoderSourceSpec>,
    /// Slack interactivity (button clicks), signed with the app's signing secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<SlackSourceSpec>,
    /// Port's managed Kafka topics (`ORG_ID.runs`, `ORG_ID.change.log`), read in a consumer group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_kafka: Option<PortKafkaSpec>,
    /// Largest accepted body (e.g. `1MiB`, `256KiB`). Default 1 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body: Option<String>,
}

/// Settings of a Port source.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortSourceSpec {
    /// The Port client secret(s) that sign requests; several allow rotation.
    /// Use `${VAR}`; a literal value is a `check` warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<OneOrMany>,
    /// A file holding the client secret (one secret per line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<String>,
    /// Accept unsigned requests. Only for local experiments; `check` warns about it.
    #[serde(default)]
    pub insecure_no_signature: bool,
    /// Allowed clock difference for `X-Port-Timestamp`, e.g. `5m` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<String>,
    /// JSONPath of the run id in author-defined action bodies, tried after the built-in places.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id_path: Option<String>,
    /// The action identifier to assume for author-defined run bodies that do not name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The `port` destination that reports action runs received here (default: the only one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to: Option<String>,
    /// Report a run that no rule handles as FAILURE "no rule matched" (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_unmatched: Option<bool>,
    /// Port's web app, for `entity.url` links: `https://app.port.io` (EU, the default) or
    /// `https://app.us.port.io` (US).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_url: Option<String>,
}

/// A topic setting: a name, or `false` to turn the topic off (`true` keeps the default).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum TopicSetting {
    On(bool),
    Name(String),
}

/// Settings of a Port Kafka source. Defaults follow Port: topics `{org_id}.runs` and
/// `{org_id}.change.log`, `SASL_SSL` with `SCRAM-SHA-512`, group `{org_id}.switchyard`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortKafkaSpec {
    /// Port's web app, for `entity.url` links (default `https://app.port.io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_url: Option<String>,
    /// Bootstrap brokers, `host:port` (Port's listen on 9196).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brokers: Option<OneOrMany>,
    /// The Port organisation id (`org_…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// A secret: use `${VAR}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// Consumer group (default `{org_id}.switchyard`; Port accepts names starting with the org id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The action-runs topic (default `{org_id}.runs`), or `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs_topic: Option<TopicSetting>,
    /// The entity change-log topic (default `{org_id}.change.log`), or `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_log_topic: Option<TopicSetting>,
    /// `SASL_SSL` (default), `SASL_PLAINTEXT`, `SSL` or `PLAINTEXT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_protocol: Option<String>,
    /// `SCRAM-SHA-512` (default), `SCRAM-SHA-256` or `PLAIN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<String>,
    /// CA certificate file for TLS (default: the system's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_ca_location: Option<String>,
    /// Static group membership (`group.instance.id`): a stable id per engine (e.g. the pod name
    /// of a StatefulSet) lets a restarted engine take its partitions back at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// How long the group waits for a member that stopped heartbeating before giving its
    /// partitions to the others (`session.timeout.ms`), 6s to 5m. Default `45s`, Kafka's own:
    /// with `instance_id`, a restart well inside it gets the partitions back without a
    /// rebalance; shorter makes a dead engine's partitions move sooner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_timeout: Option<String>,
    /// Where to start in a new group: `earliest` (default) or `latest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_from: Option<String>,
    /// The `port` destination whose credentials fetch brokers, username and password from
    /// `GET /v1/kafka-credentials` (instead of giving them here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_from: Option<String>,
    /// The `port` destination that reports action runs read here (default: the only one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to: Option<String>,
}

/// Settings of a Coder source.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CoderSourceSpec {
    /// The token(s) Coder presents as the URL's last path segment or as a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<OneOrMany>,
    /// A file holding the token (one per line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// How long a `msg_id` is remembered to drop re-deliveries, e.g. `24h` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup_window: Option<String>,
}

/// Settings of a Slack interactivity source.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlackSourceSpec {
    /// The app's signing secret(s) (Basic Information page), not the bot token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret: Option<OneOrMany>,
    /// A file holding the signing secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_secret_file: Option<String>,
}

/// A destination: exactly one of the kinds below, plus delivery settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationSpec {
    /// A Slack incoming webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack_webhook: Option<SlackWebhookSpec>,
    /// The Slack Web API with a bot token (channels and DMs by email).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<SlackBotSpec>,
    /// Any HTTP endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
    /// Print each message as one JSON line on standard output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<StdoutSpec>,
    /// Port's REST API: reports action runs, and answers `with:` queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortApiSpec>,
    /// A Kafka topic: each rendered message is produced as JSON (idempotent producer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaDestSpec>,
    /// Another destination to use instead while this one's variables are unset
    /// (e.g. `console`, so example rules work without credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// Per-request timeout, e.g. `10s` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Most delivery attempts before a message becomes a dead letter (default: no cap; a
    /// message is retried until `max_age`, so an outage shorter than that loses nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Messages per second (default 1, as Slack asks, for `slack_webhook` and per channel for
    /// `slack`; unlimited otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_second: Option<f64>,
    /// Concurrent deliveries (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// First retry delay, doubled per attempt with full jitter (default `1s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_initial: Option<String>,
    /// Longest retry delay (default `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_max: Option<String>,
    /// Age after which an undelivered message becomes a dead letter (default `24h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
    /// When this destination may send (e.g. office hours); outside, sends are held or dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::window::WindowSpec>,
}

/// Slack incoming webhook settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlackWebhookSpec {
    /// The webhook URL (a secret: use `${VAR}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A file holding the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<String>,
}

/// Slack Web API settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SlackBotSpec {
    /// The bot token `xoxb-…` (a secret: use `${VAR}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A file holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// Base URL of the Web API, default `https://slack.com/api/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
}

/// Generic webhook settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// The URL (may hold a secret: use `${VAR}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A file holding the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_file: Option<String>,
    /// HTTP method, default POST.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Extra headers; values are Handlebars templates over the event.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A template (in `templates/`) for the body. Without it the rendered message is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

/// Port API settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortApiSpec {
    /// Client id (Port → Credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Client secret (a secret: use `${VAR}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    /// A file holding the client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<String>,
    /// API base URL: `https://api.port.io` (EU, the default) or `https://api.us.port.io` (US).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
}

/// Kafka destination settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KafkaDestSpec {
    pub brokers: Option<OneOrMany>,
    pub topic: Option<String>,
    /// Record key, a template over the event (e.g. `{{entity.identifier}}`): same key, same partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `PLAINTEXT` (default), `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_ca_location: Option<String>,
}

/// Standard output settings (none yet).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdoutSpec {}

/// One rule.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique id across all files.
    pub id: String,
    /// What the rule is for (shown by `simulate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Event type(s): `port/entity.updated`, `coder/notification`, `port/*`, `*`...
    pub on: OneOrMany,
    /// Conditions that must all hold.
    #[serde(default, rename = "where")]
    #[schemars(with = "Vec<ConditionSchema>")]
    pub conditions: Vec<Value>,
    /// Messages to send when the rule matches.
    pub send: Vec<SendSpec>,
    /// Stop evaluating later rules when this one matches.
    #[serde(default)]
    pub stop: bool,
    /// Send at most once per `window` for the same `key` (e.g. `{{entity.identifier}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleSpec>,
    /// Queries run before the templates render; results are under `$.with.<name>`.
    #[serde(default, rename = "with", skip_serializing_if = "BTreeMap::is_empty")]
    pub queries: BTreeMap<String, QuerySpec>,
    /// For action runs: what the engine reports to Port when the work is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ReportSpec>,
    /// When this rule may send (e.g. `active: ["mon-fri 09:00-18:00"]`); outside, its sends are
    /// held until the window opens or dropped (`outside: drop`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::window::WindowSpec>,
    /// Send one digest per group instead of one message per match: the matches wait in their
    /// group, and the rule's send steps render once with `items` (their envelopes), `count` and
    /// `group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupSpec>,
}

/// How a rule's matches are grouped into digests (Alertmanager's `group_by`, `group_wait`,
/// `group_interval`).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// A Handlebars template naming the group (e.g. `{{entity.team}}`); default: one group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// How long the first match of a group waits for others before the digest goes out
    /// (default `30s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
    /// After a digest, how long later matches of the same group wait for the next one
    /// (default `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// The most items one digest lists (default 50); `count` still says how many there were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

/// A query against Port's entity search API.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuerySpec {
    /// The `port` destination whose credentials are used.
    pub port: String,
    /// The search: a blueprint and Port search rules (string values are templates).
    pub search: SearchSpec,
    /// Entity fields to return (Port's `include`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Most pages to follow (default 20, of up to 1,000 entities each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pages: Option<u32>,
    /// Page size (default 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Time limit for the whole query, e.g. `30s` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// `POST /v1/blueprints/<blueprint>/entities/search`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchSpec {
    pub blueprint: String,
    /// `and` (default) or `or`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub combinator: Option<String>,
    /// Port search rules, e.g. `{property: "$team", operator: "=", value: "payments"}`.
    #[serde(default)]
    pub rules: Vec<Value>,
}

/// What to write on the Port run when the rule's work is done.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportSpec {
    /// The `port` destination to report with (default: the source's `report_to`, or the only one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Written with status SUCCESS when every message was delivered.
    #[serde(default)]
    pub success: ReportContent,
    /// Written with status FAILURE when any message became a dead letter.
    #[serde(default)]
    pub failure: ReportContent,
}

/// Run fields; each a template over the event plus `report` (`delivered`, `failed`, `errors`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReportContent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

/// Suppresses repeats of a rule for the same key within a window.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ThrottleSpec {
    /// A Handlebars template over the event, e.g. `{{entity.identifier}}`.
    pub key: String,
    /// How long repeats are suppressed, e.g. `10m`.
    pub window: String,
}

/// Where and what to send.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SendSpec {
    /// A destination name.
    pub to: String,
    /// A template in `templates/<name>.hbs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Inline Block Kit blocks (strings are Handlebars templates), instead of `template`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Value>,
    /// Inline notification text (Handlebars); the fallback when blocks do not show.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Slack bot only: a channel (`#name` or an id), Handlebars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Slack bot only: DM the user with this email, Handlebars (e.g. `{{user.email}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_email: Option<String>,
    /// Slack bot only: reply in this thread, Handlebars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_ts: Option<String>,
    /// Slack bot only: also show the thread reply in the channel.
    #[serde(default)]
    pub reply_broadcast: bool,
    /// Send one message per element: a template rendering a JSON list (e.g.
    /// `{{raw_json (scorecard_teams with.services "ProductionReadiness")}}`); each element is
    /// `item` in the other templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<String>,
    /// Slack bot only: this message's identity, Handlebars (e.g.
    /// `health:{{entity.identifier}}`). The engine remembers which message a key last posted,
    /// so a later match can update it, reply in its thread, or resolve it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// With `key`: what this send does to the key's message. `update` (the default) replaces
    /// it, `reply` answers in its thread, `resolve` replaces it and closes the key, `post`
    /// always starts a new one. With no message for the key, each of them posts.
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub key_as: Option<KeyAs>,
    /// With `key` and `as: update` or `resolve`: a thread reply to post after the update, as
    /// text (Handlebars), e.g. `Recovered: {{entity.title}} is healthy again`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// With `key`: how long the key is remembered after its last use (default `7d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_ttl: Option<String>,
    /// With `key`: built-in buttons on the message ("Acknowledge", "Snooze"), handled by the
    /// engine itself through the signed `slack` source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buttons: Option<ButtonsSpec>,
    /// `port` destinations only: run a self-service action instead of sending a message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<PortRunSpec>,
    /// `port` destinations only: create or update an entity instead of sending a message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<PortEntitySpec>,
}

/// A self-service action to run on Port (`POST /v1/actions/{action}/runs`). Strings are
/// Handlebars over the event.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortRunSpec {
    /// The action's identifier, e.g. `scale_up`.
    pub action: String,
    /// The entity it runs on (entity actions), e.g. `{{action.value}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    /// The action's inputs (string leaves are Handlebars).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Value>,
    /// Whom Port runs it as: `clicker` (the default for Slack clicks: the clicker's email from
    /// `users.info`, so Port applies their permissions), `engine` (the destination's
    /// credentials; the default otherwise), or an email (Handlebars).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
    /// Who may start it from Slack: user ids (`U…`) or emails. Default: whoever Port lets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// The Slack bot destination that answers the clicker and writes the run's progress in
    /// the clicked message's thread (default: the only `slack` destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    /// Following the run in the thread (default: read it every 10s, give up after 30m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow: Option<FollowRunSpec>,
    /// A click on the same button of the same message acts once within this time (default
    /// `1m`): double clicks and two people clicking start one run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub once_per: Option<String>,
}

/// How a started run is followed.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FollowRunSpec {
    /// How often the run is read (default `10s`); `off`: only at the timeout, leaving the
    /// progress to rules on `port/run.updated` keyed `port-run:{{run.id}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll: Option<String>,
    /// When the thread is told the run has not finished (default `30m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// An entity to create or update on Port. Strings are Handlebars over the event.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortEntitySpec {
    pub blueprint: String,
    pub identifier: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<Value>,
    /// Merged into the entity's properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relations: Option<Value>,
    /// Create the entity when it does not exist (`POST ?upsert=true&merge=true`); default:
    /// update an existing one (`PATCH`).
    #[serde(default)]
    pub create: bool,
    /// Ties the change to an action run (`?run_id=`), e.g. `{{run.id}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

/// Built-in buttons of a keyed message.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ButtonsSpec {
    /// Which buttons (default both): `acknowledge` updates the message with who acknowledged
    /// it; `snooze` silences this key for `snooze` and says so on the message.
    #[serde(default = "all_buttons")]
    pub actions: Vec<ButtonKind>,
    /// How long a snooze lasts (default `1h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snooze: Option<String>,
    /// Who may use them: Slack user ids (`U…`) or emails (looked up with `users.lookupByEmail`,
    /// scope `users:read.email`); default: anyone who sees the message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
}

fn all_buttons() -> Vec<ButtonKind> {
    vec![ButtonKind::Acknowledge, ButtonKind::Snooze]
}

/// A built-in button.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ButtonKind {
    Acknowledge,
    Snooze,
}

/// What a keyed send does to its key's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyAs {
    /// Post a new message; it becomes the key's message.
    Post,
    /// Replace the key's message (`chat.update`).
    Update,
    /// Reply in the key's message's thread (`reply_broadcast` also shows it in the channel).
    Reply,
    /// Replace the key's message and close the key, so the next match starts a new message.
    Resolve,
}

/// A rule test: one event in, the expected dispatches out.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestSpec {
    /// What the test shows.
    pub name: String,
    /// The event to route.
    pub event: TestEvent,
    /// Every dispatch expected, in any order; `[]` means nothing is sent.
    pub expect: Vec<Expectation>,
    /// Stand-ins for `with:` query results, by query name: a list of entities, or
    /// `{file: ...}` holding one (or a search answer `{entities: [...]}`). Rules whose queries
    /// are all given are rendered with them; without them `check` still renders such rules
    /// against an empty result and a one-entity sample.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub with: BTreeMap<String, WithResult>,
}

/// A `with:` stand-in in a rule test.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum WithResult {
    /// The entities inline.
    Entities(Vec<Value>),
    /// A JSON file relative to the rules file.
    File {
        /// The file.
        file: String,
    },
}

/// The event of a rule test: a raw body, as the source would receive it.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestEvent {
    /// The source name (its kind decides the decoder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// A schedule's tick instead of a webhook: the schedule name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The tick's time (RFC 3339) for `schedule`; default the schedule's next tick after now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// A file with the raw webhook body, relative to this rules file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The body inline, instead of `file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// Request headers the decoder may read (e.g. `RUN_ID`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// One expected dispatch.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    /// The rule id.
    pub rule: String,
    /// The destination name.
    pub to: String,
    /// A subset of the rendered message that must be present (objects match key by key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Value>,
    /// The channel the message must go to (Slack bot destinations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// The user it must be a direct message to (Slack bot destinations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_email: Option<String>,
    /// The thread it must reply in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_ts: Option<String>,
    /// The message key it must carry (keyed messages), e.g. `health:payments-api`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// In a scenario: what it does (`post`, `update`, `reply`, `resolve`, `group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub does: Option<Does>,
}

/// A condition in `where` (schema only; conditions are parsed by the rule compiler).
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum ConditionSchema {
    /// One line: `<jsonpath> <op> [value]`, e.g. `$.after.properties.cpuUtil crosses_above 80`.
    Line(String),
    /// Structured form.
    Structured(StructuredCondition),
    /// All must hold.
    All { all: Vec<ConditionSchema> },
    /// At least one must hold.
    Any { any: Vec<ConditionSchema> },
    /// Must not hold.
    Not { not: Box<ConditionSchema> },
}

/// `{path, op, value}`.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct StructuredCondition {
    /// An RFC 9535 JSONPath into the event envelope.
    path: String,
    /// The operator.
    op: OpSchema,
    /// The operand (absent for `exists` and `changed`).
    #[serde(default)]
    value: Option<Value>,
}

/// Operators.
#[derive(JsonSchema)]
#[allow(dead_code, non_camel_case_types)]
pub enum OpSchema {
    #[serde(rename = "==")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = "in")]
    In,
    #[serde(rename = "contains")]
    Contains,
    #[serde(rename = "matches")]
    Matches,
    #[serde(rename = "exists")]
    Exists,
    #[serde(rename = "changed")]
    Changed,
    #[serde(rename = "changed_from")]
    ChangedFrom,
    #[serde(rename = "changed_to")]
    ChangedTo,
    #[serde(rename = "crosses_above")]
    CrossesAbove,
    #[serde(rename = "crosses_below")]
    CrossesBelow,
}

/// The JSON Schema of a rules file, as checked in at `schemas/rules.schema.json`.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(RulesFile);
    let mut v = serde_json::to_value(&schema).unwrap_or_default();
    tighten(&mut v);
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

/// Settings that are durations (`10s`, `1h 30m`): what `humantime` reads.
const DURATION_KEYS: &[&str] = &[
    "timeout",
    "window",
    "tolerance",
    "retry_initial",
    "retry_max",
    "max_age",
    "dedup_window",
    "session_timeout",
    "key_ttl",
    "wait",
    "interval",
    "once_per",
];

/// What the generated schema cannot say from the types alone, added so that it agrees with
/// `check` wherever JSON Schema can: `on` completes from the event types, `on` and `send` are
/// non-empty, a destination has exactly one kind, a send step has a template, blocks or text
/// (or acts on Port with `run`/`entity`),
/// durations and cron patterns have their shapes, and no format is left that strict validators
/// (ajv) do not know (`uint32`, `double`).
fn tighten(v: &mut Value) {
    strip_formats(v);
    let Some(defs) = v.get_mut("$defs").and_then(Value::as_object_mut) else {
        return;
    };
    let event_type = serde_json::json!({
        "anyOf": [
            {"enum": crate::event::EVENT_TYPES},
            {"type": "string", "pattern": "^(\\*|[a-z]+/\\*|port/(entity|timer|run)\\.\\*|schedule/[A-Za-z0-9_.-]+)$"}
        ]
    });
    if let Some(on) = defs
        .get_mut("RuleSpec")
        .and_then(|r| r.pointer_mut("/properties/on"))
    {
        let description = on.get("description").cloned().unwrap_or(Value::Null);
        *on = serde_json::json!({
            "description": description,
            "anyOf": [
                event_type.clone(),
                {"type": "array", "items": event_type, "minItems": 1}
            ]
        });
    }
    if let Some(Value::Object(send)) = defs
        .get_mut("RuleSpec")
        .and_then(|r| r.pointer_mut("/properties/send"))
    {
        send.insert("minItems".into(), Value::from(1));
    }
    if let Some(Value::Object(d)) = defs.get_mut("DestinationSpec") {
        let kinds = [
            "slack_webhook",
            "slack",
            "webhook",
            "stdout",
            "port",
            "kafka",
        ];
        d.insert(
            "oneOf".into(),
            Value::Array(
                kinds
                    .iter()
                    .map(|k| serde_json::json!({"properties": {*k: true}, "required": [k]}))
                    .collect(),
            ),
        );
    }
    if let Some(Value::Object(st)) = defs.get_mut("SendSpec") {
        st.insert(
            "anyOf".into(),
            serde_json::json!([
                {"properties": {"template": true}, "required": ["template"]},
                {"properties": {"blocks": true}, "required": ["blocks"]},
                {"properties": {"text": true}, "required": ["text"]},
                {"properties": {"run": true}, "required": ["run"]},
                {"properties": {"entity": true}, "required": ["entity"]}
            ]),
        );
        st.insert(
            "not".into(),
            serde_json::json!({"properties": {"template": true, "blocks": true}, "required": ["template", "blocks"]}),
        );
    }
    if let Some(cron) = defs
        .get_mut("ScheduleSpec")
        .and_then(|r| r.pointer_mut("/properties/cron"))
        .and_then(Value::as_object_mut)
    {
        cron.insert(
            "pattern".into(),
            Value::from("^\\s*\\S+(\\s+\\S+){4,5}\\s*$"),
        );
    }
    for def in defs.values_mut() {
        let Some(props) = def.get_mut("properties").and_then(Value::as_object_mut) else {
            continue;
        };
        for key in DURATION_KEYS {
            // Only text settings: a rule's `window` is an object (a time window), not the
            // throttle's `window` duration.
            let is_text = |p: &serde_json::Map<String, Value>| match p.get("type") {
                Some(Value::String(t)) => t == "string",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "string"),
                _ => false,
            };
            if let Some(Value::Object(p)) = props
                .get_mut(*key)
                .filter(|p| p.as_object().is_some_and(is_text))
            {
                p.insert(
                    "pattern".into(),
                    Value::from("^\\s*([0-9]+\\s*[a-zA-Z\u{b5}]+\\s*)+$"),
                );
            }
        }
    }
}

fn strip_formats(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.get("format").and_then(Value::as_str).is_some_and(|f| {
                f.starts_with("uint") || f.starts_with("int") || f == "double" || f == "float"
            }) {
                m.remove("format");
            }
            m.values_mut().for_each(strip_formats);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_formats),
        _ => {}
    }
}
