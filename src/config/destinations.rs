//! Destinations in the rules: each kind's settings validated and compiled into a
//! [`DestinationConfig`], and fallbacks resolved.

use std::collections::BTreeMap;
use std::time::Duration;

use super::diag::{did_you_mean, Diagnostic};
use super::secret::Secret;
use super::spec::DestinationSpec;
use super::yaml::join_key;
use super::{parse_duration, DestinationConfig, DestinationKind};
use crate::render::Templates;

use super::kafka::*;
use super::parsed::*;

pub(super) fn build_destination(
    p: &Parsed,
    name: &str,
    spec: &DestinationSpec,
    path: &str,
    opts: &LoadOptions,
    templates: &mut Templates,
    diags: &mut Vec<Diagnostic>,
) -> Option<DestinationConfig> {
    let n = [
        spec.slack_webhook.is_some(),
        spec.slack.is_some(),
        spec.webhook.is_some(),
        spec.stdout.is_some(),
        spec.port.is_some(),
        spec.kafka.is_some(),
    ]
    .iter()
    .filter(|k| **k)
    .count();
    if n != 1 {
        diags.push(
            p.at_key(
                Diagnostic::error(
                    "bad-destination",
                    format!("destination `{name}` must have exactly one kind"),
                )
                .hint(
                    "one of `slack_webhook:`, `slack:`, `webhook:`, `stdout:`, `port:`, `kafka:`",
                ),
                path,
            ),
        );
        return None;
    }
    let before = diags.len();
    let secret = |key: &str,
                  sub: &str,
                  v: &Option<String>,
                  file_key: &str,
                  file: &Option<String>,
                  diags: &mut Vec<Diagnostic>|
     -> Option<Secret> {
        let kp = join_key(&join_key(path, sub), key);
        if v.is_none() && file.is_none() {
            diags.push(p.at_key(
                Diagnostic::error("missing-key", format!("destination `{name}` needs `{key}`")),
                &join_key(path, sub),
            ));
            return None;
        }
        let (mut s, _) = secrets_of(
            p,
            &kp,
            v.clone().map(|x| vec![x]),
            file_key,
            file.as_ref(),
            diags,
        );
        Some(if s.is_empty() {
            Secret::new("")
        } else {
            s.remove(0)
        })
    };
    let kind = if let Some(s) = &spec.slack_webhook {
        let url = secret(
            "url",
            "slack_webhook",
            &s.url,
            "url_file",
            &s.url_file,
            diags,
        )?;
        DestinationKind::SlackWebhook { url }
    } else if let Some(s) = &spec.slack {
        let token = secret(
            "token",
            "slack",
            &s.token,
            "token_file",
            &s.token_file,
            diags,
        )?;
        let mut api_url = s
            .api_url
            .clone()
            .unwrap_or_else(|| "https://slack.com/api/".into());
        if !api_url.ends_with('/') {
            api_url.push('/');
        }
        DestinationKind::Slack { token, api_url }
    } else if let Some(s) = &spec.webhook {
        let url = secret("url", "webhook", &s.url, "url_file", &s.url_file, diags)?;
        let method = s
            .method
            .clone()
            .unwrap_or_else(|| "POST".into())
            .to_ascii_uppercase();
        if !matches!(method.as_str(), "POST" | "PUT" | "PATCH") {
            diags.push(
                p.at(
                    Diagnostic::error(
                        "bad-value",
                        format!("method `{method}` cannot carry a body"),
                    )
                    .hint("use POST, PUT or PATCH"),
                    &join_key(path, "webhook.method"),
                ),
            );
        }
        let mut headers = Vec::new();
        for (h, v) in &s.headers {
            let tname = format!("dest:{name}:header:{h}");
            if let Err(e) = templates.add_plain(&tname, v) {
                diags.push(p.at(
                    Diagnostic::error("template", format!("header `{h}`: {}", e.message)),
                    &join_key(path, &format!("webhook.headers.{h}")),
                ));
            }
            headers.push((h.clone(), tname));
        }
        if let Some(t) = &s.template {
            if !templates.has(t) && !templates.is_broken(t) {
                diags.push(missing_template(
                    p,
                    &join_key(path, "webhook.template"),
                    t,
                    templates,
                ));
            }
        }
        DestinationKind::Webhook {
            url,
            method,
            headers,
            template: s.template.clone(),
        }
    } else if let Some(s) = &spec.port {
        let client_id = secret(
            "client_id",
            "port",
            &s.client_id,
            "client_id_file",
            &None,
            diags,
        )?;
        let client_secret = secret(
            "client_secret",
            "port",
            &s.client_secret,
            "client_secret_file",
            &s.client_secret_file,
            diags,
        )?;
        let base_url = s
            .base_url
            .clone()
            .unwrap_or_else(|| "https://api.port.io".into())
            .trim_end_matches('/')
            .to_string();
        DestinationKind::Port {
            client_id,
            client_secret,
            base_url,
        }
    } else if let Some(k) = &spec.kafka {
        let sp = join_key(path, "kafka");
        let pw = k
            .password
            .clone()
            .filter(|x| !x.is_empty())
            .map(Secret::new);
        let conn = kafka_conn(
            p,
            &sp,
            &k.brokers,
            k.security_protocol.as_deref(),
            "PLAINTEXT",
            k.sasl_mechanism.as_deref(),
            &k.username,
            pw,
            &k.ssl_ca_location,
            false,
            diags,
        )?;
        let Some(topic) = k.topic.clone().filter(|t| !t.is_empty()) else {
            diags.push(p.at_key(
                Diagnostic::error("missing-key", format!("destination `{name}` needs `topic`")),
                &sp,
            ));
            return None;
        };
        let key = match &k.key {
            None => None,
            Some(t) => {
                let tname = format!("dest:{name}:key");
                if let Err(e) = templates.add_plain(&tname, t) {
                    diags.push(p.at(
                        Diagnostic::error("template", format!("key: {}", e.message)),
                        &join_key(&sp, "key"),
                    ));
                }
                Some(tname)
            }
        };
        DestinationKind::Kafka { conn, topic, key }
    } else {
        DestinationKind::Stdout
    };
    let mut duration = |key: &str, v: &Option<String>, default: Duration| match v {
        None => default,
        Some(t) => parse_duration(t).unwrap_or_else(|| {
            diags.push(
                p.at(
                    Diagnostic::error("bad-value", format!("`{t}` is not a duration"))
                        .hint("e.g. `10s`, `5m`"),
                    &join_key(path, key),
                ),
            );
            default
        }),
    };
    let timeout = duration("timeout", &spec.timeout, Duration::from_secs(10));
    let retry_initial = duration("retry_initial", &spec.retry_initial, Duration::from_secs(1));
    let retry_max = duration("retry_max", &spec.retry_max, Duration::from_secs(300));
    let max_age = duration("max_age", &spec.max_age, Duration::from_secs(24 * 3600));
    if let Some(r) = spec.rate_per_second {
        if !(r > 0.0 && r.is_finite()) {
            diags.push(p.at(
                Diagnostic::error("bad-value", "`rate_per_second` must be above 0"),
                &join_key(path, "rate_per_second"),
            ));
        }
    }
    let window = compile_window(p, &join_key(path, "window"), spec.window.as_ref(), diags);
    let slackish = matches!(
        kind,
        DestinationKind::SlackWebhook { .. } | DestinationKind::Slack { .. }
    );
    let unset: Vec<String> = p.unset_under(path).iter().map(|u| u.var.clone()).collect();
    let mut use_fallback = false;
    let mut disabled = None;
    if !unset.is_empty() {
        let vars = unset.join(", ");
        let path = &first_unset(p, path);
        match (opts.mode, &spec.fallback) {
            (Mode::Check, fallback) => diags.push(
                p.at(
                    Diagnostic::warning(
                        "unset-var",
                        format!("destination `{name}`: variable {vars} is unset"),
                    ),
                    path,
                )
                .hint(match fallback {
                    Some(f) => {
                        format!("fine in CI; until it is set, `serve` delivers to `{f}` instead")
                    }
                    None => "fine in CI; `serve` needs it set (or a `fallback`)".to_string(),
                }),
            ),
            (Mode::Serve, Some(f)) => {
                use_fallback = true;
                diags.push(p.at(
                    Diagnostic::warning(
                        "fallback",
                        format!("destination `{name}`: {vars} unset, delivering to `{f}` instead"),
                    ),
                    path,
                ));
            }
            (Mode::Serve, None) => {
                disabled = Some(format!(
                    "destination `{name}` is not configured: set {vars}"
                ));
                diags.push(
                    p.at(Diagnostic::warning("unset-var", format!("destination `{name}`: variable {vars} is unset; its messages become dead letters until it is set")), path)
                        .hint("set it, or add `fallback: <destination>`"),
                )
            }
        }
    }
    if diags[before..].iter().any(Diagnostic::is_error) {
        return None;
    }
    Some(DestinationConfig {
        name: name.to_string(),
        kind,
        fallback: spec.fallback.clone(),
        use_fallback,
        disabled,
        timeout,
        max_attempts: spec.max_attempts.unwrap_or(u32::MAX).max(1),
        rate_per_second: spec
            .rate_per_second
            .or(if slackish { Some(1.0) } else { None }),
        concurrency: spec.concurrency.unwrap_or(4).clamp(1, 256),
        retry_initial,
        retry_max: retry_max.max(retry_initial),
        max_age,
        window,
        file: p.path.clone(),
    })
}

pub(super) fn resolve_fallbacks(
    parsed: &[Parsed],
    dests: &mut BTreeMap<String, DestinationConfig>,
    _opts: &LoadOptions,
    diags: &mut Vec<Diagnostic>,
) {
    let names: Vec<String> = dests.keys().cloned().collect();
    for p in parsed {
        for (name, spec) in &p.spec.destinations {
            let Some(f) = &spec.fallback else { continue };
            let path = join_key(&join_key("destinations", name), "fallback");
            match dests.get(f) {
                None => diags.push(
                    p.at(
                        Diagnostic::error(
                            "unknown-destination",
                            format!("fallback `{f}` is not a destination"),
                        )
                        .hint(
                            did_you_mean(f, names.iter().map(String::as_str))
                                .map(|s| format!("did you mean `{s}`?"))
                                .unwrap_or_else(|| format!("known: {}", names.join(", "))),
                        ),
                        &path,
                    ),
                ),
                Some(d) if d.fallback.is_some() || f == name => diags.push(
                    p.at(
                        Diagnostic::error(
                            "bad-fallback",
                            format!("fallback `{f}` has a fallback itself"),
                        )
                        .hint("a fallback must be a plain destination such as `stdout`"),
                        &path,
                    ),
                ),
                Some(_) => {}
            }
        }
    }
}
