//! The Prometheus series: their `# HELP` and `# TYPE`, and the ones that exist from start.
//!
//! A series that appears only after its first event cannot be alerted on (`absent()` and
//! `rate()` both need it), so the label-free ones and the build and reload gauges are set at
//! start; per-source and per-destination ones are created when the rules name them.

/// Every documented series and its help text, in `/metrics` order.
const SERIES: &[(&str, &str, Kind)] = &[
    (
        "switchyard_build_info",
        "Always 1; the labels say which build this is.",
        Kind::Gauge,
    ),
    (
        "switchyard_config_last_reload_successful",
        "1 when the last load of the rules succeeded, 0 when it was refused.",
        Kind::Gauge,
    ),
    (
        "switchyard_config_last_reload_success_timestamp_seconds",
        "When the rules last loaded successfully (unix seconds).",
        Kind::Gauge,
    ),
    (
        "switchyard_events_total",
        "Webhook requests and scheduled ticks, by source and outcome.",
        Kind::Counter,
    ),
    (
        "switchyard_rule_matches_total",
        "Rule matches, by rule.",
        Kind::Counter,
    ),
    (
        "switchyard_throttled_total",
        "Dispatches suppressed by a rule's throttle.",
        Kind::Counter,
    ),
    (
        "switchyard_digests_total",
        "Digests sent for grouped rules, by rule.",
        Kind::Counter,
    ),
    (
        "switchyard_button_clicks_total",
        "Clicks on the engine's own buttons, by button and outcome (done, refused).",
        Kind::Counter,
    ),
    (
        "switchyard_port_actions_total",
        "Port actions run for rules, by outcome (started, not_allowed, refused).",
        Kind::Counter,
    ),
    (
        "switchyard_muted_total",
        "Dispatches dropped outside their rule's or destination's time window, by rule.",
        Kind::Counter,
    ),
    (
        "switchyard_silenced_total",
        "Dispatches suppressed by a silence, by rule.",
        Kind::Counter,
    ),
    (
        "switchyard_refused_total",
        "Dispatches refused by a safety rule (a One-Time Passcode off its owner's DM).",
        Kind::Counter,
    ),
    (
        "switchyard_deliveries_total",
        "Delivery attempts, by destination and outcome (delivered, retry, dead_letter).",
        Kind::Counter,
    ),
    (
        "switchyard_dead_letters_total",
        "Messages that became dead letters, by destination.",
        Kind::Counter,
    ),
    (
        "switchyard_queue_depth",
        "Messages not yet finished, by destination: waiting for their pace, in an attempt, or waiting to retry.",
        Kind::Gauge,
    ),
    (
        "switchyard_in_flight",
        "Delivery attempts in progress, by destination.",
        Kind::Gauge,
    ),
    (
        "switchyard_delivery_duration_seconds",
        "Time of one delivery attempt, by destination.",
        Kind::Histogram,
    ),
    (
        "switchyard_outcome_commit_seconds",
        "Time from a destination's answer to the commit of the attempt's outcome, by destination: the at-least-once window, in which a crash sends a delivered message again.",
        Kind::Histogram,
    ),
    (
        "switchyard_ingest_duration_seconds",
        "Time from a request's arrival to its durable commit.",
        Kind::Histogram,
    ),
    (
        "switchyard_outbox_commits_total",
        "Outbox transactions committed.",
        Kind::Counter,
    ),
    (
        "switchyard_outbox_commands_total",
        "Outbox commands (enqueues, outcomes) processed.",
        Kind::Counter,
    ),
    (
        "switchyard_outbox_commit_failures_total",
        "Outbox transactions that failed (their requests were answered 503).",
        Kind::Counter,
    ),
    (
        "switchyard_dedup_keys",
        "Event ids held in the dedup windows (kept in memory, about 40 bytes each).",
        Kind::Gauge,
    ),
    (
        "switchyard_reloads_total",
        "Loads of the rules, by outcome (ok, error).",
        Kind::Counter,
    ),
    (
        "switchyard_reload_duration_seconds",
        "Time to load and swap the rules.",
        Kind::Histogram,
    ),
    (
        "switchyard_connections_open",
        "HTTP connections open.",
        Kind::Gauge,
    ),
    (
        "switchyard_connections_refused_total",
        "HTTP connections refused at the connection cap.",
        Kind::Counter,
    ),
    (
        "switchyard_kafka_messages_total",
        "Kafka records consumed, by source and outcome.",
        Kind::Counter,
    ),
    (
        "switchyard_kafka_lag",
        "Records behind the end of each partition, by source, topic and partition.",
        Kind::Gauge,
    ),
    (
        "switchyard_kafka_rebalances_total",
        "Consumer-group rebalances, by source.",
        Kind::Counter,
    ),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Describes every series (their `# HELP`/`# TYPE` lines) and sets the ones that have a value
/// from start. Call once, after the recorder is installed.
pub fn describe() {
    for (name, help, kind) in SERIES {
        let (name, help) = (*name, *help);
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
    metrics::gauge!(
        "switchyard_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "commit" => env!("SWITCHYARD_GIT_COMMIT"),
        "profile" => env!("SWITCHYARD_BUILD_PROFILE")
    )
    .set(1.0);
    for outcome in ["ok", "error"] {
        metrics::counter!("switchyard_reloads_total", "outcome" => outcome).absolute(0);
    }
    for name in [
        "switchyard_throttled_total",
        "switchyard_outbox_commands_total",
        "switchyard_outbox_commit_failures_total",
        "switchyard_connections_refused_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    metrics::gauge!("switchyard_connections_open").set(0.0);
    metrics::gauge!("switchyard_dedup_keys").set(0.0);
}

/// The `process_*` series (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_open_fds`, `process_max_fds`, `process_start_time_seconds`, `process_threads`, ...)
/// as Prometheus' own client libraries name them; described now, read at each scrape.
pub fn process_collector() -> metrics_process::Collector {
    let c = metrics_process::Collector::default();
    c.describe();
    c.collect();
    c
}

/// Records the outcome of a load of the rules (at start and at every reload).
pub fn reloaded(ok: bool) {
    metrics::gauge!("switchyard_config_last_reload_successful").set(if ok { 1.0 } else { 0.0 });
    if ok {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        metrics::gauge!("switchyard_config_last_reload_success_timestamp_seconds").set(now);
    }
}
