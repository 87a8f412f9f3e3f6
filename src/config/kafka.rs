//! Kafka connection settings, shared by the `port_kafka` source and the `kafka` destination.

use super::diag::{did_you_mean, Diagnostic};
use super::secret::Secret;
use super::yaml::{join_index, join_key};

use super::parsed::*;

pub(super) const PROTOCOLS: &[&str] = &["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];

pub(super) const MECHANISMS: &[&str] = &["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"];

/// Validates and resolves Kafka connection settings (offline: no broker is contacted).
#[allow(clippy::too_many_arguments)]
pub(super) fn kafka_conn(
    p: &Parsed,
    sp: &str,
    brokers: &Option<super::spec::OneOrMany>,
    protocol: Option<&str>,
    default_protocol: &str,
    mechanism: Option<&str>,
    username: &Option<String>,
    password: Option<Secret>,
    ca: &Option<String>,
    from_port: bool,
    diags: &mut Vec<Diagnostic>,
) -> Option<super::KafkaConn> {
    let before = diags.len();
    let brokers: Vec<String> = brokers
        .as_ref()
        .map(|b| b.to_vec())
        .unwrap_or_default()
        .into_iter()
        .filter(|b| !b.trim().is_empty())
        .collect();
    if brokers.is_empty() && !from_port && p.unset_under(&join_key(sp, "brokers")).is_empty() {
        diags.push(p.at_key(
            Diagnostic::error(
                "missing-key",
                "Kafka settings need `brokers` (`host:port`, Port's listen on 9196)",
            ),
            sp,
        ));
    }
    for (i, b) in brokers.iter().enumerate() {
        let ok = b
            .rsplit_once(':')
            .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            diags.push(p.at(
                Diagnostic::error("bad-value", format!("broker `{b}` is not `host:port`")),
                &join_index(&join_key(sp, "brokers"), i),
            ));
        }
    }
    let protocol = protocol.unwrap_or(default_protocol).to_ascii_uppercase();
    if !PROTOCOLS.contains(&protocol.as_str()) {
        let hint = did_you_mean(&protocol, PROTOCOLS.iter().copied())
            .map(|x| format!("did you mean `{x}`?"))
            .unwrap_or_else(|| PROTOCOLS.join(", "));
        diags.push(
            p.at(
                Diagnostic::error(
                    "bad-value",
                    format!("unknown security protocol `{protocol}`"),
                )
                .hint(hint),
                &join_key(sp, "security_protocol"),
            ),
        );
    }
    let mechanism = mechanism.unwrap_or("SCRAM-SHA-512").to_ascii_uppercase();
    if !MECHANISMS.contains(&mechanism.as_str()) {
        let hint = did_you_mean(&mechanism, MECHANISMS.iter().copied())
            .map(|x| format!("did you mean `{x}`?"))
            .unwrap_or_else(|| MECHANISMS.join(", "));
        diags.push(
            p.at(
                Diagnostic::error("bad-value", format!("unknown SASL mechanism `{mechanism}`"))
                    .hint(hint),
                &join_key(sp, "sasl_mechanism"),
            ),
        );
    }
    if protocol.starts_with("SASL")
        && !from_port
        && (username.is_none() || password.is_none())
        && p.unset_under(sp).is_empty()
    {
        diags.push(p.at_key(
            Diagnostic::error("missing-key", format!("{protocol} needs `username` and `password`")).hint("Port gives them with the topics; or set `security_protocol: PLAINTEXT` for a local broker"),
            sp,
        ));
    }
    if diags[before..].iter().any(Diagnostic::is_error) {
        return None;
    }
    Some(super::KafkaConn {
        brokers,
        security_protocol: protocol,
        sasl_mechanism: mechanism,
        username: username.clone(),
        password,
        ssl_ca_location: ca.clone(),
    })
}
