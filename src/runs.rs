//! Port action runs: the follow-up that reports a run back to Port.
//!
//! When switchyard is the backend of a self-service action (Port calls the webhook, or the run
//! arrives on the Kafka runs topic), Port shows the run as in progress until someone reports
//! it. The lifecycle lives here, in three steps:
//!
//! 1. **Plan** ([`plan`], at ingest): a run event that a rule with `report:` matched gets a
//!    tracker, committed with the event's jobs. A run that no rule handles, of an action whose
//!    backend we are, gets a tracker that fails it at once, so nobody waits on a stuck run.
//! 2. **Count** (the outbox): each finished job of the event adjusts the tracker's counts
//!    (delivered, failed, the first errors); when nothing is pending, the tracker is replaced,
//!    in the same transaction, by a report job carrying those counts ([`Tally`]). Storage keeps
//!    counts, never wording.
//! 3. **Report** ([`report_of`], at delivery): the Port destination turns the tally into the
//!    run's status, summary, link and log line, rendering the rule's `report:` templates.

use serde_json::Value;

use crate::config::{Ruleset, SourceEntry};
use crate::event::Event;
use crate::job::{ReportSpec, Tally};
use crate::outbox::NewTracker;

/// The run a report goes to: the automation's own run for automation bodies, else the run.
pub fn run_id(ev: &Value) -> Option<String> {
    ev["automation_run"]["id"]
        .as_str()
        .or_else(|| ev["run"]["id"].as_str())
        .map(str::to_string)
}

/// The tracker for a run event, keyed by the event id, when the run is to be reported.
pub fn plan(
    rs: &Ruleset,
    src: Option<&SourceEntry>,
    ev: &Event,
    matched: &[String],
) -> Option<(String, NewTracker)> {
    if !ev.event_type.starts_with("port/run.") {
        return None;
    }
    let run_id = run_id(&ev.data)?;
    let rule = matched
        .iter()
        .filter_map(|id| rs.rules.iter().find(|r| &r.id == id))
        .find(|r| r.report.is_some());
    if let Some(rule) = rule {
        let report = rule.report.as_ref()?;
        return Some((
            ev.id.clone(),
            NewTracker {
                destination: report.to.clone(),
                run_id,
                report: ReportSpec {
                    rule: rule.id.clone(),
                    success: report.success.clone(),
                    failure: report.failure.clone(),
                    context: ev.data.clone(),
                },
                fail: None,
            },
        ));
    }
    // No rule handled a run whose backend we are (legacy envelope or author-defined body):
    // close it as FAILURE so nobody is left with a run stuck in progress.
    let src = src?;
    let ours = matches!(ev.data["family"].as_str(), Some("run" | "custom"));
    if !matched.is_empty() || !ours || !src.report_unmatched || ev.event_type != "port/run.created"
    {
        return None;
    }
    let destination = src.report_to.clone()?;
    Some((
        ev.id.clone(),
        NewTracker {
            destination,
            run_id,
            report: ReportSpec {
                rule: "no-rule-matched".into(),
                context: ev.data.clone(),
                ..Default::default()
            },
            fail: Some("no rule matched this run".into()),
        },
    ))
}

/// What a closed tracker reports, in Port's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `SUCCESS` or `FAILURE`.
    pub status: &'static str,
    /// The summary when the rule's `report:` has none (or it renders empty).
    pub default_summary: String,
    /// The run log line.
    pub log: String,
}

/// The status and wording of a run's report, from its tally.
pub fn report_of(t: &Tally) -> Report {
    let ok = t.failed == 0;
    Report {
        status: if ok { "SUCCESS" } else { "FAILURE" },
        default_summary: if ok {
            format!("Sent {} message(s)", t.delivered)
        } else {
            format!("{} message(s) could not be delivered", t.failed)
        },
        log: if ok {
            format!("delivered {} message(s)", t.delivered)
        } else {
            format!(
                "{} of {} message(s) failed: {}",
                t.failed,
                t.delivered + t.failed,
                t.errors.join("; ")
            )
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_tally_succeeds_and_a_failed_one_says_why() {
        let ok = report_of(&Tally {
            delivered: 3,
            failed: 0,
            errors: vec![],
        });
        assert_eq!(ok.status, "SUCCESS");
        assert_eq!(ok.log, "delivered 3 message(s)");
        let bad = report_of(&Tally {
            delivered: 1,
            failed: 2,
            errors: vec!["channel_not_found".into(), "HTTP 500".into()],
        });
        assert_eq!(bad.status, "FAILURE");
        assert_eq!(
            bad.log,
            "2 of 3 message(s) failed: channel_not_found; HTTP 500"
        );
        assert_eq!(bad.default_summary, "2 message(s) could not be delivered");
    }
}
