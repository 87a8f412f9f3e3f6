//! Sources in the rules: each kind's settings (`port`, `coder`, `slack`, `port_kafka`),
//! validated and compiled into a [`SourceEntry`], and where each reports its runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::diag::Diagnostic;
use super::spec::{CoderSourceSpec, PortKafkaSpec, PortSourceSpec, SlackSourceSpec, SourceSpec};
use super::yaml::join_key;
use super::{
    parse_duration, parse_size, DestinationConfig, DestinationKind, KafkaSource, SourceEntry,
    SourceKind,
};
use crate::routing::path::JsonPathExpr;
use crate::sources::coder::CoderSource;
use crate::sources::port::PortSource;
use crate::sources::slack::SlackSource;
use crate::sources::Source;

use super::kafka::*;
use super::parsed::*;

pub(super) fn build_source(
    p: &Parsed,
    name: &str,
    spec: &SourceSpec,
    path: &str,
    opts: &LoadOptions,
    diags: &mut Vec<Diagnostic>,
) -> Option<SourceEntry> {
    let max_body = match &spec.max_body {
        None => 1024 * 1024,
        Some(s) => match parse_size(s) {
            Some(n) => n,
            None => {
                diags.push(
                    p.at(
                        Diagnostic::error("bad-value", format!("`{s}` is not a size"))
                            .hint("e.g. `1MiB`, `256KiB`"),
                        &join_key(path, "max_body"),
                    ),
                );
                return None;
            }
        },
    };
    let compiled = compile_kind(p, name, spec, path, diags)?;
    let Compiled {
        kind,
        source,
        unset: secrets_unset,
        has_secret,
        dedup_window,
        kafka,
    } = compiled;
    let dedup_window = dedup_window.unwrap_or(Duration::from_secs(24 * 3600));
    let mut disabled = None;
    if !secrets_unset.is_empty() {
        let vars = secrets_unset.join(", ");
        let msg = format!("source `{name}`: variable {vars} is unset");
        match opts.mode {
            Mode::Check => diags.push(
                p.at(Diagnostic::warning("unset-var", msg), &first_unset(p, path))
                    .hint("fine in CI; `serve` disables this source until it is set"),
            ),
            Mode::Serve => {
                diags.push(p.at(
                    Diagnostic::warning(
                        "unset-var",
                        format!("{msg}: the source is disabled and answers 503"),
                    ),
                    &first_unset(p, path),
                ));
            }
        }
        if !has_secret {
            disabled = Some(format!("source `{name}` is not configured: set {vars}"));
        }
    }
    Some(SourceEntry {
        name: name.to_string(),
        kind,
        source,
        disabled,
        max_body,
        dedup_window,
        report_to: spec
            .port
            .as_ref()
            .and_then(|s| s.report_to.clone())
            .or_else(|| spec.port_kafka.as_ref().and_then(|s| s.report_to.clone())),
        kafka,
        report_unmatched: spec
            .port
            .as_ref()
            .and_then(|s| s.report_unmatched)
            .unwrap_or(true),
        file: p.path.clone(),
    })
}

/// One source kind in a rules file: its key and its settings.
enum KindSpec<'a> {
    Port(&'a PortSourceSpec),
    Coder(&'a CoderSourceSpec),
    Slack(&'a SlackSourceSpec),
    PortKafka(&'a PortKafkaSpec),
}

/// The kinds a source entry names, with their keys. The one list of source kinds: a new kind
/// is a line here, a variant above, and its compile function below.
fn kinds_of(spec: &SourceSpec) -> Vec<(&'static str, KindSpec<'_>)> {
    let mut v = Vec::new();
    if let Some(s) = &spec.port {
        v.push(("port", KindSpec::Port(s)));
    }
    if let Some(s) = &spec.coder {
        v.push(("coder", KindSpec::Coder(s)));
    }
    if let Some(s) = &spec.slack {
        v.push(("slack", KindSpec::Slack(s)));
    }
    if let Some(s) = &spec.port_kafka {
        v.push(("port_kafka", KindSpec::PortKafka(s)));
    }
    v
}

/// What compiling one kind's settings yields.
struct Compiled {
    kind: SourceKind,
    source: Arc<dyn Source>,
    /// Variables of its secrets that are unset.
    unset: Vec<String>,
    /// It has something to verify requests with (or needs nothing).
    has_secret: bool,
    dedup_window: Option<Duration>,
    kafka: Option<KafkaSource>,
}

impl Compiled {
    fn new(
        kind: SourceKind,
        source: Arc<dyn Source>,
        unset: Vec<String>,
        has_secret: bool,
    ) -> Self {
        Compiled {
            kind,
            source,
            unset,
            has_secret,
            dedup_window: None,
            kafka: None,
        }
    }
}

/// Where a kind's settings are, for its diagnostics.
struct Cx<'a> {
    p: &'a Parsed,
    name: &'a str,
    /// The path of the kind's settings (`sources.<name>.<kind>`).
    path: String,
    diags: &'a mut Vec<Diagnostic>,
}

/// Exactly one kind, compiled; `None` (with a diagnostic) otherwise.
fn compile_kind(
    p: &Parsed,
    name: &str,
    spec: &SourceSpec,
    path: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<Compiled> {
    let mut kinds = kinds_of(spec);
    if kinds.len() != 1 {
        let all = [
            SourceKind::Port,
            SourceKind::Coder,
            SourceKind::Slack,
            SourceKind::PortKafka,
        ]
        .map(|k| format!("`{}:`", k.name()))
        .join(", ");
        diags.push(
            p.at_key(
                Diagnostic::error(
                    "bad-source",
                    format!("source `{name}` must have exactly one kind"),
                )
                .hint(format!("one of {all}")),
                path,
            ),
        );
        return None;
    }
    let (key, kind) = kinds.pop()?;
    let mut cx = Cx {
        p,
        name,
        path: join_key(path, key),
        diags,
    };
    Some(match kind {
        KindSpec::Port(s) => port(&mut cx, s),
        KindSpec::Coder(s) => coder(&mut cx, s),
        KindSpec::Slack(s) => slack(&mut cx, s),
        KindSpec::PortKafka(k) => port_kafka(&mut cx, k),
    })
}

/// `port:` webhooks, HMAC-signed by Port.
fn port(cx: &mut Cx<'_>, s: &PortSourceSpec) -> Compiled {
    let (p, name, diags) = (cx.p, cx.name, &mut *cx.diags);
    let sp = cx.path.clone();
    let (secrets, unset) = secrets_of(
        p,
        &join_key(&sp, "client_secret"),
        s.client_secret.as_ref().map(|c| c.to_vec()),
        "client_secret_file",
        s.client_secret_file.as_ref(),
        diags,
    );
    let tolerance = match &s.tolerance {
        None => 300,
        Some(t) => match parse_duration(t) {
            Some(d) => d.as_secs() as i64,
            None => {
                diags.push(
                    p.at(
                        Diagnostic::error("bad-value", format!("`{t}` is not a duration"))
                            .hint("e.g. `5m`"),
                        &join_key(&sp, "tolerance"),
                    ),
                );
                300
            }
        },
    };
    let run_id_path = match &s.run_id_path {
        None => None,
        Some(rp) => match JsonPathExpr::compile(rp) {
            Ok(c) => Some(c),
            Err(e) => {
                diags.push(p.at(
                    Diagnostic::error("bad-jsonpath", format!("invalid JSONPath `{rp}`: {e}")),
                    &join_key(&sp, "run_id_path"),
                ));
                None
            }
        },
    };
    if s.insecure_no_signature {
        diags.push(
            p.at(
                Diagnostic::warning(
                    "insecure",
                    format!(
                        "source `{name}` accepts unsigned requests (`insecure_no_signature: true`)"
                    ),
                ),
                &join_key(&sp, "insecure_no_signature"),
            )
            .hint("anyone who can reach the engine can inject events; set `client_secret` instead"),
        );
    } else if s.client_secret.is_none() && s.client_secret_file.is_none() {
        diags.push(p.at_key(
            Diagnostic::error("missing-secret", format!("Port source `{name}` has no `client_secret`"))
                .hint("add `client_secret: \"${PORT_CLIENT_SECRET}\"`, or `insecure_no_signature: true` for local experiments"),
            &sp,
        ));
    }
    let has = !secrets.is_empty() || s.insecure_no_signature;
    let src = PortSource {
        secrets,
        insecure_no_signature: s.insecure_no_signature,
        tolerance,
        run_id_path,
        action: s.action.clone(),
        app_url: s
            .app_url
            .clone()
            .unwrap_or_else(|| crate::sources::port::DEFAULT_APP_URL.to_string()),
    };
    Compiled::new(SourceKind::Port, Arc::new(src), unset, has)
}

/// `coder:` notification webhooks, with a token in the path.
fn coder(cx: &mut Cx<'_>, s: &CoderSourceSpec) -> Compiled {
    let (p, name, diags) = (cx.p, cx.name, &mut *cx.diags);
    let mut dedup_window = None;
    let sp = cx.path.clone();
    let (tokens, unset) = secrets_of(
        p,
        &join_key(&sp, "token"),
        s.token.as_ref().map(|c| c.to_vec()),
        "token_file",
        s.token_file.as_ref(),
        diags,
    );
    if s.token.is_none() && s.token_file.is_none() {
        diags.push(
            p.at_key(
                Diagnostic::error(
                    "missing-secret",
                    format!("Coder source `{name}` has no `token`"),
                )
                .hint("add `token: \"${CODER_WEBHOOK_TOKEN}\"`"),
                &sp,
            ),
        );
    }
    if let Some(w) = &s.dedup_window {
        match parse_duration(w) {
            Some(d) => dedup_window = Some(d),
            None => diags.push(
                p.at(
                    Diagnostic::error("bad-value", format!("`{w}` is not a duration"))
                        .hint("e.g. `24h`"),
                    &join_key(&sp, "dedup_window"),
                ),
            ),
        }
    }
    let has = !tokens.is_empty();
    Compiled {
        dedup_window,
        ..Compiled::new(
            SourceKind::Coder,
            Arc::new(CoderSource { tokens }),
            unset,
            has,
        )
    }
}

/// `slack:` interactivity, signed with the app's signing secret.
fn slack(cx: &mut Cx<'_>, s: &SlackSourceSpec) -> Compiled {
    let (p, name, diags) = (cx.p, cx.name, &mut *cx.diags);
    let sp = cx.path.clone();
    let (secrets, unset) = secrets_of(
        p,
        &join_key(&sp, "signing_secret"),
        s.signing_secret.as_ref().map(|c| c.to_vec()),
        "signing_secret_file",
        s.signing_secret_file.as_ref(),
        diags,
    );
    if s.signing_secret.is_none() && s.signing_secret_file.is_none() {
        diags.push(
            p.at_key(
                Diagnostic::error(
                    "missing-secret",
                    format!("Slack source `{name}` has no `signing_secret`"),
                )
                .hint("add `signing_secret: \"${SLACK_SIGNING_SECRET}\"`"),
                &sp,
            ),
        );
    }
    let has = !secrets.is_empty();
    Compiled::new(
        SourceKind::Slack,
        Arc::new(SlackSource { secrets }),
        unset,
        has,
    )
}

/// `port_kafka:` Port's topics, read in a consumer group.
fn port_kafka(cx: &mut Cx<'_>, k: &PortKafkaSpec) -> Compiled {
    let (p, name, diags) = (cx.p, cx.name, &mut *cx.diags);
    let sp = cx.path.clone();
    let kafka = kafka_source(p, name, k, &sp, diags);
    let unset: Vec<String> = p.unset_under(&sp).iter().map(|u| u.var.clone()).collect();
    let has = unset.is_empty();
    let src = PortSource {
        insecure_no_signature: true,
        action: None,
        app_url: k
            .app_url
            .clone()
            .unwrap_or_else(|| crate::sources::port::DEFAULT_APP_URL.to_string()),
        ..PortSource::default()
    };
    Compiled {
        kafka,
        ..Compiled::new(SourceKind::PortKafka, Arc::new(src), unset, has)
    }
}

pub(super) fn kafka_source(
    p: &Parsed,
    name: &str,
    k: &super::spec::PortKafkaSpec,
    sp: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<super::KafkaSource> {
    use super::spec::TopicSetting;
    let org = k.org_id.clone().filter(|o| !o.is_empty());
    if org.is_none() && p.unset_under(&join_key(sp, "org_id")).is_empty() {
        diags.push(
            p.at_key(
                Diagnostic::error(
                    "missing-key",
                    format!("Kafka source `{name}` needs `org_id`"),
                )
                .hint("Port's topics and groups are named after it: `org_…`"),
                sp,
            ),
        );
    }
    let org = org.unwrap_or_else(|| "org".into());
    let (pw, _) = secrets_of(
        p,
        &join_key(sp, "password"),
        k.password.clone().map(|x| vec![x]),
        "password_file",
        k.password_file.as_ref(),
        diags,
    );
    let conn = kafka_conn(
        p,
        sp,
        &k.brokers,
        k.security_protocol.as_deref(),
        "SASL_SSL",
        k.sasl_mechanism.as_deref(),
        &k.username,
        pw.into_iter().next(),
        &k.ssl_ca_location,
        k.credentials_from.is_some(),
        diags,
    )?;
    let mut topics = Vec::new();
    for (setting, default, kind) in [
        (&k.runs_topic, format!("{org}.runs"), super::PortTopic::Runs),
        (
            &k.change_log_topic,
            format!("{org}.change.log"),
            super::PortTopic::ChangeLog,
        ),
    ] {
        match setting {
            None | Some(TopicSetting::On(true)) => topics.push((default, kind)),
            Some(TopicSetting::On(false)) => {}
            Some(TopicSetting::Name(n)) => topics.push((n.clone(), kind)),
        }
    }
    if topics.is_empty() {
        diags.push(p.at_key(
            Diagnostic::error(
                "bad-source",
                format!("Kafka source `{name}` has both topics turned off"),
            ),
            sp,
        ));
        return None;
    }
    let start_from = k.start_from.clone().unwrap_or_else(|| "earliest".into());
    if !matches!(start_from.as_str(), "earliest" | "latest") {
        diags.push(p.at(
            Diagnostic::error("bad-value", "`start_from` is `earliest` or `latest`"),
            &join_key(sp, "start_from"),
        ));
    }
    let session_timeout = match &k.session_timeout {
        None => Duration::from_secs(45),
        Some(t) => match parse_duration(t) {
            Some(d) if (Duration::from_secs(6)..=Duration::from_secs(300)).contains(&d) => d,
            _ => {
                diags.push(
                    p.at(
                        Diagnostic::error(
                            "bad-value",
                            format!("`{t}` is not a session timeout between 6s and 5m"),
                        )
                        .hint("brokers refuse sessions outside group.min/max.session.timeout.ms (6s and 5m by default); e.g. `45s`"),
                        &join_key(sp, "session_timeout"),
                    ),
                );
                Duration::from_secs(45)
            }
        },
    };
    Some(super::KafkaSource {
        conn,
        group: k
            .group
            .clone()
            .unwrap_or_else(|| format!("{org}.switchyard")),
        topics,
        start_from,
        instance_id: k.instance_id.clone().filter(|i| !i.is_empty()),
        session_timeout,
        credentials_from: k.credentials_from.clone(),
    })
}

/// Resolves each Port source's `report_to` (explicit, or the only `port` destination).
pub(super) fn resolve_reporting(
    parsed: &[Parsed],
    sources: &mut BTreeMap<String, SourceEntry>,
    dests: &BTreeMap<String, DestinationConfig>,
    diags: &mut Vec<Diagnostic>,
) {
    for src in sources.values().filter(|s| s.kind == SourceKind::PortKafka) {
        let Some(from) = src.kafka.as_ref().and_then(|k| k.credentials_from.clone()) else {
            continue;
        };
        if !dests
            .get(&from)
            .is_some_and(|d| matches!(d.kind, DestinationKind::Port { .. }))
        {
            if let Some(p) = parsed.iter().find(|p| p.path == src.file) {
                diags.push(p.at(
                    Diagnostic::error(
                        "unknown-destination",
                        format!("`credentials_from: {from}` is not a `port` destination"),
                    ),
                    &format!("sources.{}.port_kafka.credentials_from", src.name),
                ));
            }
        }
    }
    for src in sources
        .values_mut()
        .filter(|s| matches!(s.kind, SourceKind::Port | SourceKind::PortKafka))
    {
        match &src.report_to {
            Some(to) => {
                if !dests
                    .get(to)
                    .is_some_and(|d| matches!(d.kind, DestinationKind::Port { .. }))
                {
                    if let Some(p) = parsed.iter().find(|p| p.path == src.file) {
                        diags.push(p.at(
                            Diagnostic::error(
                                "unknown-destination",
                                format!("`report_to: {to}` is not a `port` destination"),
                            ),
                            &format!("sources.{}.port.report_to", src.name),
                        ));
                    }
                }
            }
            None => src.report_to = only_port_destination(dests),
        }
    }
}
